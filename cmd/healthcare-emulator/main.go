// Command healthcare-emulator serves the healthcaretest emulator of the Cloud
// Healthcare API v1 on a local address, with one dataset and one seeded FHIR
// store, until SIGINT or SIGTERM.
//
// Point a client at it with option.WithEndpoint(url) and
// option.WithoutAuthentication(). With STORAGE_EMULATOR_HOST set, Cloud
// Storage exports are written there. The emulator's admin API lives under
// /emulator/v1/ on the same address (clock, faults, outcomes, timing,
// requests, bigquery).
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
	"syscall"
	"time"

	"github.com/fhirexport/fhirexport/healthcaretest"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, os.Args[1:], os.Stdout)
	stop()
	os.Exit(exitCode(err))
}

// exitCode is the one place that turns an error into an exit status.
func exitCode(err error) int {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 2
	}
	fmt.Fprintln(os.Stderr, "healthcare-emulator:", err)
	var ue usageError
	if errors.As(err, &ue) {
		return 2
	}
	return 1
}

type usageError struct{ error }

func (u usageError) Unwrap() error { return u.error }

// run serves until ctx is done.
func run(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("healthcare-emulator", flag.ContinueOnError)
	fs.SetOutput(stdout)
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
	verbose := fs.Bool("v", false, "log every request")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return usageError{err}
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Errorf("unexpected arguments: %v", fs.Args())}
	}
	opts := healthcaretest.Options{
		ExportDuration:       *exportDuration,
		ExportSteps:          *exportSteps,
		MaxRunningOperations: *maxRunning,
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
	if os.Getenv("STORAGE_EMULATOR_HOST") != "" {
		fmt.Fprintf(stdout, "GCS exports go to STORAGE_EMULATOR_HOST=%s\n", os.Getenv("STORAGE_EMULATOR_HOST"))
	}
	<-ctx.Done()
	fmt.Fprintln(stdout, "shutting down")
	return nil
}
