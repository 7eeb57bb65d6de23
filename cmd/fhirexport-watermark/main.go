// Command fhirexport-watermark shows, sets or resets the watermark of an
// incremental fhirexport pipeline, so operators never edit state objects by
// hand.
//
//	fhirexport-watermark --state gs://BUCKET/PREFIX --store projects/…/fhirStores/S --name PIPELINE
//	fhirexport-watermark --state … --spec deploy/specs/hourly-incremental-bq.json --set 2026-01-01T00:00:00Z
//	fhirexport-watermark --state … --store … --name … --reset
//
// Without --set or --reset it prints the watermark. --reset makes the next run
// a full export (or start at the spec's _since). Both refuse while a run of
// the pipeline is in progress unless --force is given.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"time"

	"cloud.google.com/go/storage"

	"github.com/fhirexport/fhirexport/export"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Getenv); err != nil {
		fmt.Fprintln(os.Stderr, "fhirexport-watermark:", err)
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout io.Writer, getenv func(string) string) error {
	fs := flag.NewFlagSet("fhirexport-watermark", flag.ContinueOnError)
	state := fs.String("state", getenv("FHIREXPORT_STATE"), "state location gs://BUCKET/PREFIX (default $FHIREXPORT_STATE)")
	store := fs.String("store", "", "FHIR store of the pipeline")
	name := fs.String("name", "", "pipeline name (the spec's name)")
	specFile := fs.String("spec", "", "a spec file to take the pipeline from, instead of --store and --name")
	set := fs.String("set", "", "set the watermark to this RFC 3339 time")
	reset := fs.Bool("reset", false, "remove the watermark: the next run exports everything (or from the spec's _since)")
	force := fs.Bool("force", false, "change the watermark even while a run is in progress")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	spec, err := pipelineSpec(*specFile, *store, *name)
	if err != nil {
		return err
	}
	if *set != "" && *reset {
		return errors.New("--set and --reset exclude each other")
	}
	if *set != "" {
		if _, err := export.ParseSince(*set); err != nil {
			return fmt.Errorf("--set: %q is not RFC 3339 to the second with a time zone, e.g. 2026-01-01T00:00:00Z", *set)
		}
	}
	bucket, prefix, err := export.ParseStateLocation(*state)
	if err != nil {
		return fmt.Errorf("--state (or $FHIREXPORT_STATE): %w", err)
	}
	client, err := storage.NewClient(ctx, storage.WithJSONReads())
	if err != nil {
		return err
	}
	defer client.Close()
	st := export.NewState(client, bucket, prefix)
	key := export.PipelineKey(spec)
	if *set != "" || *reset {
		if err := st.SetWatermark(ctx, key, spec.FHIRStore, spec.Name, *set, *force, time.Now()); err != nil {
			return err
		}
	}
	w, err := st.GetWatermark(ctx, key)
	if err != nil {
		return err
	}
	if w.Store == "" {
		w.Store, w.Name = spec.FHIRStore, spec.Name
	}
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(w)
}

// pipelineSpec returns a spec that identifies the pipeline: from a spec file,
// or from --store and --name.
func pipelineSpec(file, store, name string) (*export.Spec, error) {
	if file != "" {
		if store != "" || name != "" {
			return nil, errors.New("give --spec, or --store with --name, not both")
		}
		data, err := os.ReadFile(file)
		if err != nil {
			return nil, err
		}
		spec, err := export.ParseSpec(data)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", file, err)
		}
		return spec, nil
	}
	if store == "" || name == "" {
		return nil, errors.New("give --store and --name of the pipeline (or --spec FILE for a pipeline without a name)")
	}
	// A placeholder destination makes the spec valid; with a name it does not
	// take part in the pipeline key.
	data, _ := json.Marshal(map[string]any{"fhirStore": store, "name": name, "gcsDestination": map[string]string{"uriPrefix": "gs://placeholder"}})
	spec, err := export.ParseSpec(data)
	if err != nil {
		return nil, fmt.Errorf("--store/--name: %w", err)
	}
	return spec, nil
}
