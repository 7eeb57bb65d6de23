package stacktest

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"cloud.google.com/go/pubsub/v2"
	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"cloud.google.com/go/pubsub/v2/pstest"
	"cloud.google.com/go/storage"
	"google.golang.org/api/googleapi"
	healthcare "google.golang.org/api/healthcare/v1"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/fhirexport/fhirexport/healthcaretest"
)

const (
	dataset = "projects/p/locations/l/datasets/d"
	store   = dataset + "/fhirStores/s"
	topic   = "projects/p/topics/changes"
)

// exportTo creates store, writes one Patient and exports the store to
// gs://bucket/out through the stack's Healthcare client.
func exportTo(t *testing.T, s *Stack, bucket string) {
	t.Helper()
	if err := s.Healthcare.CreateDataset(dataset); err != nil {
		t.Fatal(err)
	}
	if err := s.Healthcare.CreateFHIRStore(store, "R4"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Healthcare.PutResource(store, []byte(`{"resourceType":"Patient","id":"a"}`)); err != nil {
		t.Fatal(err)
	}
	op, err := s.HealthcareService.Projects.Locations.Datasets.FhirStores.Export(store, &healthcare.ExportResourcesRequest{
		GcsDestination: &healthcare.GoogleCloudHealthcareV1FhirGcsDestination{UriPrefix: "gs://" + bucket + "/out"},
	}).Do()
	if err != nil {
		t.Fatal(err)
	}
	for !op.Done {
		if op, err = s.HealthcareService.Projects.Locations.Datasets.Operations.Get(op.Name).Do(); err != nil {
			t.Fatal(err)
		}
	}
	if op.Error != nil {
		t.Fatalf("export: %+v", op.Error)
	}
}

// objects lists bucket as fake-gcs-server holds it.
func objects(t *testing.T, s *Stack, bucket string) []string {
	t.Helper()
	objs, _, err := s.GCS.ListObjects(bucket, "", "", false)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, o := range objs {
		names = append(names, o.Name)
	}
	return names
}

// TestStackIsWired: the emulator writes its exports into the stack's Cloud
// Storage and publishes its notifications on the stack's Pub/Sub, on the
// stack's clock, and the buckets, topics and subscriptions asked for exist.
func TestStackIsWired(t *testing.T) {
	t.Parallel()
	clock := healthcaretest.NewFakeClock(time.Date(2026, 11, 26, 0, 0, 0, 0, time.UTC))
	s := New(t, Options{
		Project:       "p",
		Buckets:       []string{"exports", "other"},
		Topics:        []string{topic},
		Subscriptions: []*pb.Subscription{{Name: "projects/p/subscriptions/all", Topic: topic}},
		Healthcare:    healthcaretest.Options{Clock: clock},
	})
	if err := s.Healthcare.CreateDataset(dataset); err != nil {
		t.Fatal(err)
	}
	if err := s.Healthcare.CreateFHIRStore(store, "R4"); err != nil {
		t.Fatal(err)
	}
	if err := s.Healthcare.SetNotificationConfigs(store, healthcaretest.NotificationConfig{PubsubTopic: topic}); err != nil {
		t.Fatal(err)
	}
	raw, err := s.Healthcare.PutResource(store, []byte(`{"resourceType":"Patient","id":"a"}`))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(raw), `"lastUpdated":"2026-11-26T00:00:00.`) {
		t.Errorf("resource %s: want lastUpdated from the fake clock", raw)
	}
	msgs := s.Pstest.Messages()
	if len(msgs) != 1 || string(msgs[0].Data) != store+"/fhir/Patient/a" {
		t.Fatalf("published %+v; want one notification of Patient/a", msgs)
	}
	if _, err := s.PubSub.SubscriptionAdminClient.GetSubscription(context.Background(),
		&pb.GetSubscriptionRequest{Subscription: "projects/p/subscriptions/all"}); err != nil {
		t.Errorf("subscription: %v", err)
	}

	op, err := s.HealthcareService.Projects.Locations.Datasets.FhirStores.Export(store, &healthcare.ExportResourcesRequest{
		GcsDestination: &healthcare.GoogleCloudHealthcareV1FhirGcsDestination{UriPrefix: "gs://exports/out"},
	}).Do()
	if err != nil {
		t.Fatal(err)
	}
	if op, err = s.HealthcareService.Projects.Locations.Datasets.Operations.Get(op.Name).Do(); err != nil || !op.Done || op.Error != nil {
		t.Fatalf("export: %+v, %v", op, err)
	}
	if got := objects(t, s, "exports"); len(got) != 1 || !strings.HasPrefix(got[0], "out/") || !strings.HasSuffix(got[0], "_Patient") {
		t.Errorf("exported objects %q; want out/…_Patient", got)
	}
	if got := objects(t, s, "other"); len(got) != 0 {
		t.Errorf("bucket other: %q", got)
	}
}

// TestWrapGCS: every client of GCSURL, the emulator's export writes among
// them, goes through the wrapper.
func TestWrapGCS(t *testing.T) {
	t.Parallel()
	var seen atomic.Int64
	var emulatorWrites atomic.Int64
	s := New(t, Options{
		Buckets: []string{"exports"},
		WrapGCS: func(next http.Handler) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				seen.Add(1)
				if r.Method == http.MethodPost && strings.Contains(r.URL.RawQuery, "name=out") {
					emulatorWrites.Add(1)
				}
				next.ServeHTTP(w, r)
			})
		},
	})
	exportTo(t, s, "exports")
	if got := objects(t, s, "exports"); len(got) != 1 || emulatorWrites.Load() != 1 {
		t.Fatalf("exported objects %q, %d written through the wrapper; want one", got, emulatorWrites.Load())
	}
	before := seen.Load()
	if _, err := s.Storage.Bucket("exports").Attrs(context.Background()); err != nil {
		t.Fatal(err)
	}
	if seen.Load() != before+1 {
		t.Errorf("the stack's Storage client: %d requests through the wrapper, want 1", seen.Load()-before)
	}
}

// TestDeletePreconditions: a delete whose ifGenerationMatch no longer holds
// is refused with 412 and deletes nothing, as on Cloud Storage
// (fake-gcs-server alone deletes); one that holds deletes.
func TestDeletePreconditions(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := New(t, Options{Buckets: []string{"state"}})
	o := s.Storage.Bucket("state").Object("dir/lock.json")
	write := func(data string) int64 {
		w := o.NewWriter(ctx)
		w.Write([]byte(data))
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		return w.Attrs().Generation
	}
	old := write("first")
	cur := write("second")
	err := o.If(storage.Conditions{GenerationMatch: old}).Delete(ctx)
	var ge *googleapi.Error
	if !errors.As(err, &ge) || ge.Code != http.StatusPreconditionFailed {
		t.Fatalf("delete at a stale generation: %v, want 412", err)
	}
	if _, err := o.Attrs(ctx); err != nil {
		t.Fatalf("the refused delete removed the object: %v", err)
	}
	if n := s.RefusedDeletes(); n != 1 {
		t.Errorf("RefusedDeletes = %d, want 1", n)
	}
	if err := o.If(storage.Conditions{GenerationMatch: cur}).Delete(ctx); err != nil {
		t.Fatalf("delete at the current generation: %v", err)
	}
	if _, err := o.Attrs(ctx); !errors.Is(err, storage.ErrObjectNotExist) {
		t.Errorf("after the delete: %v, want not found", err)
	}
}

// TestExternalPubSub: with PubSubEmulator the stack starts no pstest,
// creates its topics on the one given and leaves it running at Close.
func TestExternalPubSub(t *testing.T) {
	t.Parallel()
	ps := pstest.NewServer()
	t.Cleanup(func() { ps.Close() })
	s, err := Start(context.Background(), Options{PubSubEmulator: ps.Addr, Topics: []string{"projects/test-project/topics/t"}})
	if err != nil {
		t.Fatal(err)
	}
	if s.Pstest != nil || s.PubSubAddr != ps.Addr {
		t.Errorf("Pstest %v, PubSubAddr %s; want none started and %s", s.Pstest, s.PubSubAddr, ps.Addr)
	}
	s.Close()
	client, err := pubsub.NewClient(context.Background(), "test-project", option.WithEndpoint(ps.Addr), option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	if _, err := client.TopicAdminClient.GetTopic(context.Background(), &pb.GetTopicRequest{Topic: "projects/test-project/topics/t"}); err != nil {
		t.Errorf("after Close, the caller's emulator: %v", err)
	}
}

// TestStartFailureStopsWhatStarted: when a part cannot start, Start says
// which and stops the parts it had started (their ports are free again).
func TestStartFailureStopsWhatStarted(t *testing.T) {
	t.Parallel()
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	gcsPort := freePort(t)
	_, err = Start(context.Background(), Options{GCSPort: gcsPort, PubSubPort: taken.Addr().(*net.TCPAddr).Port})
	if err == nil || !strings.HasPrefix(err.Error(), "pub/sub emulator: ") {
		t.Fatalf("Start with pstest's port taken: %v; want a pub/sub emulator error", err)
	}
	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(gcsPort)))
	if err != nil {
		t.Fatalf("fake-gcs-server still holds its port: %v", err)
	}
	ln.Close()
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}
