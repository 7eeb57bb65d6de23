// Package stacktest starts fhirexport's whole local platform in-process, in
// the spirit of net/http/httptest and pstest: fake-gcs-server for Cloud
// Storage, pstest (or a Pub/Sub emulator already running) for Pub/Sub, and
// the Healthcare API emulator of package healthcaretest, which writes its
// exports into that Cloud Storage and publishes its change notifications on
// that Pub/Sub, each with a real client pointed at it. [ServeFunctions] serves
// the functions registered in the process against them.
//
// [Start] needs no testing package (cmd/fhirexport-local and
// cmd/fhirexport-bench serve the stack as a program); [New] starts one for a
// test and stops it when the test ends.
package stacktest

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"

	"cloud.google.com/go/pubsub/v2"
	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"cloud.google.com/go/pubsub/v2/pstest"
	"cloud.google.com/go/storage"
	"github.com/fsouza/fake-gcs-server/fakestorage"
	healthcare "google.golang.org/api/healthcare/v1"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/fhirexport/fhirexport/healthcaretest"
)

// Options says what to start and what to create in it. The zero value starts
// every emulator on a free loopback port, empty.
type Options struct {
	// Project is the Pub/Sub client's project; "test-project" when empty.
	Project string

	// Buckets are created in fake-gcs-server.
	Buckets []string
	// StorageRoot is fake-gcs-server's folder (BUCKET/OBJECT below it);
	// empty keeps objects in memory.
	StorageRoot string
	// GCSPort is fake-gcs-server's port; 0 picks a free one.
	GCSPort int
	// GCSLog receives fake-gcs-server's log; nil discards it.
	GCSLog io.Writer
	// WrapGCS, when set, wraps fake-gcs-server's handler, and every client of
	// [Stack.GCSURL] (the stack's own Storage client and the emulator's export
	// writes among them) goes through the wrapper: to count or delay every
	// request. A front for some clients only is the caller's, over GCSURL.
	WrapGCS func(http.Handler) http.Handler

	// PubSubEmulator is the host:port of a Pub/Sub emulator already running
	// (e.g. gcloud's); empty starts pstest.
	PubSubEmulator string
	// PubSubPort is pstest's port; 0 picks a free one.
	PubSubPort int
	// Pstest are pstest's reactors (fault injection); ignored with
	// PubSubEmulator.
	Pstest []pstest.ServerReactorOption
	// Topics are created, by full name ("projects/P/topics/T").
	Topics []string
	// Subscriptions are created after the topics.
	Subscriptions []*pb.Subscription

	// HealthcarePort is the Healthcare emulator's port; 0 picks a free one.
	HealthcarePort int
	// Healthcare configures the Healthcare emulator. A nil Storage or PubSub
	// is the stack's client; a nil Logf logs nothing.
	Healthcare healthcaretest.Options
}

// Stack is a running local platform. Its fields are read-only.
type Stack struct {
	// GCS is fake-gcs-server, for seeding and reading objects directly.
	GCS *fakestorage.Server
	// GCSURL is Cloud Storage's base URL, "http://127.0.0.1:port", the
	// value of STORAGE_EMULATOR_HOST.
	GCSURL string
	// Storage is a Cloud Storage client on GCSURL (JSON reads, no auth).
	Storage *storage.Client

	// Pstest is the pstest server, nil with Options.PubSubEmulator.
	Pstest *pstest.Server
	// PubSubAddr is the Pub/Sub emulator's host:port, the value of
	// PUBSUB_EMULATOR_HOST.
	PubSubAddr string
	// PubSub is a Pub/Sub client on PubSubAddr (insecure gRPC, no auth).
	PubSub *pubsub.Client

	// Healthcare is the Healthcare API emulator.
	Healthcare *healthcaretest.Server
	// HealthcareService is a Cloud Healthcare API client on Healthcare.URL.
	HealthcareService *healthcare.Service

	gcsSrv *http.Server // serves fake-gcs-server behind preconditions and WrapGCS
	gcsLn  net.Listener // closed by Close itself: Serve may not have taken it yet
	pre    *preconditions
}

// Start starts fake-gcs-server, Pub/Sub and the Healthcare emulator, with
// opts's buckets, topics and subscriptions, until Close. On error it stops
// what it started. An error names the part that failed first.
func Start(ctx context.Context, opts Options) (_ *Stack, err error) {
	s := &Stack{}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	if err := s.startGCS(ctx, opts); err != nil {
		return nil, err
	}
	if err := s.startPubSub(ctx, opts); err != nil {
		return nil, err
	}
	hopts := opts.Healthcare
	if hopts.Storage == nil {
		hopts.Storage = s.Storage
	}
	if hopts.PubSub == nil {
		hopts.PubSub = s.PubSub
	}
	if s.Healthcare, err = healthcaretest.Start(hostPort(opts.HealthcarePort), hopts); err != nil {
		return nil, fmt.Errorf("healthcare emulator: %w", err)
	}
	if s.HealthcareService, err = s.Healthcare.Service(ctx); err != nil {
		return nil, fmt.Errorf("healthcare client: %w", err)
	}
	return s, nil
}

func (s *Stack) startGCS(ctx context.Context, opts Options) error {
	log := opts.GCSLog
	if log == nil {
		log = io.Discard
	}
	var err error
	s.GCS, err = fakestorage.NewServerWithOptions(fakestorage.Options{NoListener: true, StorageRoot: opts.StorageRoot, Writer: log})
	if err != nil {
		return fmt.Errorf("cloud storage emulator: %w", err)
	}
	ln, err := net.Listen("tcp", hostPort(opts.GCSPort))
	if err != nil {
		return fmt.Errorf("cloud storage emulator: %w", err)
	}
	s.GCSURL = "http://" + ln.Addr().String()
	s.pre = &preconditions{next: s.GCS.HTTPHandler()}
	var h http.Handler = s.pre
	if opts.WrapGCS != nil {
		h = opts.WrapGCS(h)
	}
	s.gcsSrv, s.gcsLn = &http.Server{Handler: h}, ln
	go s.gcsSrv.Serve(ln)
	for _, b := range opts.Buckets {
		s.GCS.CreateBucketWithOpts(fakestorage.CreateBucketOpts{Name: b})
	}
	s.Storage, err = storage.NewClient(ctx, option.WithEndpoint(s.GCSURL+"/storage/v1/"),
		option.WithoutAuthentication(), storage.WithJSONReads())
	if err != nil {
		return fmt.Errorf("storage client: %w", err)
	}
	return nil
}

func (s *Stack) startPubSub(ctx context.Context, opts Options) error {
	s.PubSubAddr = opts.PubSubEmulator
	if s.PubSubAddr == "" {
		addr := hostPort(opts.PubSubPort)
		// pstest panics when it cannot listen: check the address first.
		if opts.PubSubPort != 0 {
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				return fmt.Errorf("pub/sub emulator: %w", err)
			}
			ln.Close()
		}
		s.Pstest = pstest.NewServerWithAddress(addr, opts.Pstest...)
		s.PubSubAddr = s.Pstest.Addr
	}
	project := opts.Project
	if project == "" {
		project = "test-project"
	}
	var err error
	s.PubSub, err = pubsub.NewClient(ctx, project, option.WithEndpoint(s.PubSubAddr), option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())))
	if err != nil {
		return fmt.Errorf("pubsub client: %w", err)
	}
	for _, t := range opts.Topics {
		if _, err := s.PubSub.TopicAdminClient.CreateTopic(ctx, &pb.Topic{Name: t}); err != nil {
			return fmt.Errorf("create topic %s: %w", t, err)
		}
	}
	for _, sub := range opts.Subscriptions {
		if _, err := s.PubSub.SubscriptionAdminClient.CreateSubscription(ctx, sub); err != nil {
			return fmt.Errorf("create subscription %s: %w", sub.GetName(), err)
		}
	}
	return nil
}

// Close stops everything started, in reverse order: the Healthcare emulator
// first, since it publishes with the PubSub client and writes with Storage.
// A Pub/Sub emulator the caller started is the caller's to stop.
func (s *Stack) Close() {
	if s.Healthcare != nil {
		s.Healthcare.Close()
	}
	if s.PubSub != nil {
		s.PubSub.Close()
	}
	if s.Pstest != nil {
		s.Pstest.Close()
	}
	if s.Storage != nil {
		s.Storage.Close()
	}
	if s.gcsSrv != nil {
		s.gcsSrv.Close()
		s.gcsLn.Close()
	}
	if s.GCS != nil {
		s.GCS.Stop()
	}
}

// RefusedDeletes counts deletes answered 412 because their
// ifGenerationMatch did not hold (fake-gcs-server alone would have deleted).
func (s *Stack) RefusedDeletes() int64 { return s.pre.refused.Load() }

func hostPort(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }
