// Command healthcare-emulator serves the healthcaretest emulator of the Cloud
// Healthcare API v1 on a local address, with one dataset and one seeded FHIR
// store, until SIGINT or SIGTERM.
//
// Point a client at it with option.WithEndpoint(url) and
// option.WithoutAuthentication(), or gcloud with
// api_endpoint_overrides/healthcare. Cloud Storage exports go to an embedded
// fake-gcs-server on a folder (--gcs-dir) or to STORAGE_EMULATOR_HOST; FHIR
// change notifications go to a Pub/Sub emulator (--pubsub or
// PUBSUB_EMULATOR_HOST). The emulator's admin API lives under /emulator/v1/
// on the same address; --help lists it with an example per endpoint.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"cloud.google.com/go/pubsub/v2"
	"cloud.google.com/go/storage"
	"github.com/fsouza/fake-gcs-server/fakestorage"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/fhirexport/fhirexport/healthcaretest"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, os.Args[1:], os.Stdout, os.Getenv)
	stop()
	os.Exit(exitCode(err, os.Stderr))
}

// exitCode is the one place that turns an error into an exit status and
// says what went wrong on stderr: a usage mistake with a one-line hint.
func exitCode(err error, stderr io.Writer) int {
	if err == nil {
		return 0
	}
	fmt.Fprintln(stderr, "healthcare-emulator:", err)
	var ue usageError
	if errors.As(err, &ue) {
		fmt.Fprintln(stderr, "Run 'healthcare-emulator --help' for usage.")
		return 2
	}
	return 1
}

type usageError struct{ error }

func (u usageError) Unwrap() error { return u.error }

// usage writes the flags and the admin API, one curl example per endpoint.
func usage(fs *flag.FlagSet) {
	w := fs.Output()
	fmt.Fprint(w, `Usage: healthcare-emulator [flags]

Serves an emulator of the Cloud Healthcare API v1 (datasets, FHIR stores, FHIR
create/read/update/patch/delete and bundles, fhirStores.export to Cloud Storage
or an in-memory BigQuery, operations get/list/cancel, change notifications to
Pub/Sub) with one dataset and one FHIR store.

Flags:
`)
	fs.PrintDefaults()
	fmt.Fprint(w, `
Cloud Storage: --gcs-dir DIR serves an embedded fake-gcs-server on DIR (each
subfolder is a bucket; --gcs-buckets creates some); otherwise exports go to
STORAGE_EMULATOR_HOST. With neither, Cloud Storage exports are rejected with
400 FAILED_PRECONDITION.

Pub/Sub: --pubsub HOST:PORT (or PUBSUB_EMULATOR_HOST) receives the FHIR
stores' change notifications (fhirStores.create/patch notificationConfigs, or
--notify TOPIC for the demo store).

Admin API (JSON, on the same address; ADDR=http://127.0.0.1:8089):
`)
	for _, ep := range healthcaretest.AdminEndpoints {
		fmt.Fprintf(w, "  %s %s\n      %s\n", ep.Method, ep.Path, ep.Doc)
		if ep.Body != "" {
			fmt.Fprintf(w, "      curl -X %s $ADDR%s -d '%s'\n", ep.Method, ep.Path, ep.Body)
		} else {
			fmt.Fprintf(w, "      curl $ADDR%s\n", ep.Path)
		}
	}
}

// run serves until ctx is done. getenv reads the environment.
func run(ctx context.Context, args []string, stdout io.Writer, getenv func(string) string) error {
	fs := flag.NewFlagSet("healthcare-emulator", flag.ContinueOnError)
	// flag prints its error and the whole usage on a mistake: keep quiet
	// and let exitCode say it in two lines; print the usage only for --help.
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	addr := fs.String("addr", "127.0.0.1:8089", "listen address (port 0: random)")
	datasetName := fs.String("dataset", "projects/local-project/locations/us-central1/datasets/demo", "dataset to create")
	storeID := fs.String("store", "demo-store", "FHIR store id to create in the dataset")
	version := fs.String("version", "R4", "FHIR version of the store: DSTU2, STU3, R4 or R5")
	patients := fs.Int("seed-patients", 0, "synthetic patients to seed (with encounters, observations, conditions; R4 only)")
	seed := fs.Int64("seed", 1, "seed of the synthetic data")
	exportDuration := fs.Duration("export-duration", 0, "how long each export runs, on the emulator clock")
	exportSteps := fs.Int("export-steps", 1, "progress steps of each export")
	maxRunning := fs.Int("max-running-operations", 0, "running exports allowed per project (0: unlimited)")
	fakeClock := fs.String("fake-clock", "", "run on a fake clock starting at this RFC 3339 time (moved via POST /emulator/v1/clock)")
	gcsDir := fs.String("gcs-dir", "", "serve an embedded fake-gcs-server on this folder and write Cloud Storage exports there")
	gcsBuckets := fs.String("gcs-buckets", "", "comma-separated buckets to create in --gcs-dir")
	pubsubHost := fs.String("pubsub", "", "HOST:PORT of a Pub/Sub emulator for change notifications (default: PUBSUB_EMULATOR_HOST)")
	notify := fs.String("notify", "", "Pub/Sub topic projects/P/topics/T for the demo store's change notifications (name only)")
	deterministic := fs.Bool("deterministic-ids", false, "the same operation and resource ids in every run")
	verbose := fs.Bool("v", false, "log every request")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(stdout)
			usage(fs)
			return nil
		}
		return usageError{err}
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Errorf("unexpected arguments: %v", fs.Args())}
	}
	if *gcsBuckets != "" && *gcsDir == "" {
		return usageError{errors.New("--gcs-buckets needs --gcs-dir")}
	}
	opts := healthcaretest.Options{
		ExportDuration:       *exportDuration,
		ExportSteps:          *exportSteps,
		MaxRunningOperations: *maxRunning,
		DeterministicIDs:     *deterministic,
	}
	if *fakeClock != "" {
		t, err := time.Parse(time.RFC3339Nano, *fakeClock)
		if err != nil {
			return usageError{fmt.Errorf("invalid --fake-clock: %v", err)}
		}
		opts.Clock = healthcaretest.NewFakeClock(t)
	}
	if *verbose {
		logger := log.New(os.Stderr, "", log.LstdFlags|log.Lmicroseconds)
		opts.Logf = logger.Printf
	}
	var storageNote string
	switch {
	case *gcsDir != "":
		gcs, url, stop, err := startGCS(ctx, *gcsDir, *gcsBuckets)
		if err != nil {
			return err
		}
		defer stop()
		opts.Storage = gcs
		storageNote = fmt.Sprintf("Cloud Storage exports go to %s (fake-gcs-server at %s)", *gcsDir, url)
	case getenv("STORAGE_EMULATOR_HOST") != "":
		storageNote = "Cloud Storage exports go to STORAGE_EMULATOR_HOST=" + getenv("STORAGE_EMULATOR_HOST")
	default:
		storageNote = "WARNING: no Cloud Storage configured (--gcs-dir or STORAGE_EMULATOR_HOST): Cloud Storage exports will be rejected with 400 FAILED_PRECONDITION"
	}
	project := strings.Join(strings.Split(*datasetName, "/")[:min(2, len(strings.Split(*datasetName, "/")))], "/")
	var pubsubNote string
	switch {
	case *pubsubHost != "":
		ps, err := pubsub.NewClient(ctx, strings.TrimPrefix(project, "projects/"), option.WithEndpoint(*pubsubHost),
			option.WithoutAuthentication(), option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())))
		if err != nil {
			return fmt.Errorf("Pub/Sub client for --pubsub %s: %w", *pubsubHost, err)
		}
		defer ps.Close()
		opts.PubSub = ps
		pubsubNote = "change notifications go to the Pub/Sub emulator at " + *pubsubHost
	case getenv("PUBSUB_EMULATOR_HOST") != "":
		pubsubNote = "change notifications go to PUBSUB_EMULATOR_HOST=" + getenv("PUBSUB_EMULATOR_HOST")
	default:
		pubsubNote = "no Pub/Sub configured (--pubsub or PUBSUB_EMULATOR_HOST): change notifications are logged and dropped"
		if *notify != "" {
			return usageError{errors.New("--notify needs --pubsub or PUBSUB_EMULATOR_HOST")}
		}
	}
	srv, err := healthcaretest.Start(*addr, opts)
	if err != nil {
		return err
	}
	defer srv.Close()
	store := *datasetName + "/fhirStores/" + *storeID
	if err := srv.CreateDataset(*datasetName); err != nil {
		return usageError{err}
	}
	if err := srv.CreateFHIRStore(store, *version); err != nil {
		return usageError{err}
	}
	if *notify != "" {
		if err := srv.SetNotificationConfigs(store, healthcaretest.NotificationConfig{PubsubTopic: *notify}); err != nil {
			return usageError{fmt.Errorf("--notify: %w", err)}
		}
	}
	n := 0
	if *patients > 0 {
		if *version != "R4" {
			return usageError{fmt.Errorf("--seed-patients needs --version R4 (got %s)", *version)}
		}
		if n, err = srv.Seed(store, *seed, *patients); err != nil {
			return err
		}
	}
	fmt.Fprintf(stdout, "healthcare emulator listening on %s\n", srv.URL)
	fmt.Fprintf(stdout, "FHIR store %s (%s, %d resources)\n", store, *version, n)
	fmt.Fprintln(stdout, storageNote)
	fmt.Fprintln(stdout, pubsubNote)
	fmt.Fprintf(stdout, "admin API: %s/emulator/v1/ (see --help)\n", srv.URL)
	<-ctx.Done()
	fmt.Fprintln(stdout, "shutting down")
	return nil
}

// startGCS serves fake-gcs-server on dir, creates buckets, and returns a
// client for it.
func startGCS(ctx context.Context, dir, buckets string) (*storage.Client, string, func(), error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, "", nil, fmt.Errorf("--gcs-dir: %w", err)
	}
	gsrv, err := fakestorage.NewServerWithOptions(fakestorage.Options{Scheme: "http", Host: "127.0.0.1", StorageRoot: dir, Writer: io.Discard})
	if err != nil {
		return nil, "", nil, fmt.Errorf("starting fake-gcs-server on %s: %w", dir, err)
	}
	for _, b := range strings.Split(buckets, ",") {
		if b = strings.TrimSpace(b); b != "" {
			gsrv.CreateBucketWithOpts(fakestorage.CreateBucketOpts{Name: b})
		}
	}
	gcs, err := storage.NewClient(ctx, option.WithEndpoint(gsrv.URL()+"/storage/v1/"), option.WithoutAuthentication(), storage.WithJSONReads())
	if err != nil {
		gsrv.Stop()
		return nil, "", nil, fmt.Errorf("storage client for fake-gcs-server: %w", err)
	}
	return gcs, gsrv.URL(), func() { gcs.Close(); gsrv.Stop() }, nil
}
