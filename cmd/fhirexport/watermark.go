package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/fhirexport/fhirexport/export"
)

const watermarkLong = `A pipeline's watermark is the server createTime of its last fully successful
incremental export; its next run exports what changed since. 'set' moves it,
backwards too (to re-export a period); 'reset' removes it, so the next run
exports everything (or from its spec's _since). Both refuse while a run of the
pipeline is in progress, which would overwrite the change, unless --force.

PIPELINE is a pipeline key as 'fhirexport status' lists it; --store with
--name derive the key of a named pipeline, --spec FILE that of any spec.`

// watermarkOptions are the flags of watermark show, set and reset.
type watermarkOptions struct {
	store, name, spec, to string
	force                 bool
}

func (inv *invocation) watermarkCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "watermark",
		Short: "a pipeline's incremental watermark",
		Long:  watermarkLong,
		Example: `  fhirexport watermark show  PIPELINE | --store S --name N | --spec FILE
  fhirexport watermark set   PIPELINE --to TIME [--force]
  fhirexport watermark reset PIPELINE [--force]`,
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return usagef("watermark needs show, set or reset")
			}
			return usagef("watermark %s: want show, set or reset%s", args[0], suggest(cmd, args[0]))
		},
	}
	for _, sub := range []struct{ name, short string }{
		{"show", "show a pipeline's watermark"},
		{"set", "move a pipeline's watermark, backwards too"},
		{"reset", "remove a pipeline's watermark: the next run exports everything"},
	} {
		var o watermarkOptions
		c := &cobra.Command{
			Use:   sub.name + " PIPELINE",
			Short: sub.short,
			Long:  watermarkLong,
			Args:  cobra.ArbitraryArgs, // pipelineKey checks them with the flags
			RunE: func(cmd *cobra.Command, args []string) error {
				return inv.watermark(cmd.Context(), sub.name, args, o)
			},
		}
		f := c.Flags()
		f.StringVar(&o.store, "store", "", "the pipeline's FHIR `STORE`, with --name")
		f.StringVar(&o.name, "name", "", "the pipeline's `NAME` (the spec's name), with --store")
		f.StringVar(&o.spec, "spec", "", "derive the pipeline from the spec in `FILE`")
		if sub.name == "set" {
			f.StringVar(&o.to, "to", "", "the new watermark, RFC 3339 `TIME` with a zone, e.g. 2026-01-01T00:00:00Z")
		}
		if sub.name != "show" {
			f.BoolVar(&o.force, "force", false, "change it even while a run is in progress (that run may overwrite it)")
		}
		cmd.AddCommand(c)
	}
	return cmd
}

func (inv *invocation) watermark(ctx context.Context, sub string, pos []string, o watermarkOptions) error {
	key, err := pipelineKey(pos, o.store, o.name, o.spec)
	if err != nil {
		return err
	}
	if sub == "set" {
		if o.to == "" {
			return usagef("watermark set needs --to TIME")
		}
		if _, err := export.ParseSince(o.to); err != nil {
			return usagef("--to %q: want RFC 3339 to the second with a time zone, e.g. 2026-01-01T00:00:00Z", o.to)
		}
	}

	use := hcNone
	if sub == "show" {
		use = hcProgress
	}
	in, st, err := inv.inspector(ctx, use)
	if err != nil {
		return err
	}
	p, err := in.Pipeline(ctx, key)
	if errors.Is(err, export.ErrUnknownPipeline) {
		return fmt.Errorf("%w; check the key with 'fhirexport status' (a pipeline is known once it has run; to start a new one from a time, give its spec a _since)", err)
	}
	if err != nil {
		return err
	}
	if sub == "show" {
		w, err := st.GetWatermark(ctx, key)
		if err != nil {
			return err
		}
		fill(&w.Store, p.Store)
		fill(&w.Name, p.Name)
		if inv.json {
			return inv.printJSON(w)
		}
		tw := tabwriter.NewWriter(inv.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintf(tw, "pipeline\t%s%s\n", key, paren(w.Name))
		fmt.Fprintf(tw, "store\t%s\n", dash(w.Store))
		if w.Watermark == "" {
			fmt.Fprintf(tw, "watermark\tnone: the next run exports everything (or from its spec's _since)\n")
		} else {
			fmt.Fprintf(tw, "watermark\t%s (%s ago)\n", w.Watermark, inv.since(w.Watermark))
			by := w.Operation
			if strings.HasPrefix(by, "projects/") {
				by = "by operation " + by
			}
			fmt.Fprintf(tw, "set\t%s at %s\n", dash(by), stamp(w.Updated))
		}
		if w.Running != "" {
			fmt.Fprintf(tw, "running\t%s\n", w.Running)
		}
		return tw.Flush()
	}

	if sub == "set" && p.Incremental != nil && !*p.Incremental {
		return fmt.Errorf("pipeline %s%s is not incremental (its latest run's spec has no \"incremental\": true), so no run would read a watermark; "+
			"to export from a time, give the spec a _since, or make it incremental first", key, paren(p.Name))
	}
	old := p.Watermark
	at := ""
	if sub == "set" {
		at = o.to
	}
	if err := st.SetWatermark(ctx, key, p.Store, p.Name, at, o.force, inv.now()); err != nil {
		if errors.Is(err, export.ErrPipelineBusy) {
			return fmt.Errorf("%w (--force overrides)", err)
		}
		return err
	}
	w, err := st.GetWatermark(ctx, key)
	if err != nil {
		return err
	}
	if inv.json {
		return inv.printJSON(map[string]any{"pipeline": key, "old": old, "new": w.Watermark})
	}
	fmt.Fprintf(inv.stdout, "pipeline %s%s\n  old: %s\n  new: %s\n", key, paren(p.Name), orNone(old), orNone(w.Watermark))
	return nil
}

func orNone(w string) string {
	if w == "" {
		return "none (the next run exports everything, or from its spec's _since)"
	}
	return w
}

// pipelineKey derives the pipeline key from exactly one of: a positional
// key, --store with --name, or --spec.
func pipelineKey(pos []string, store, name, file string) (string, error) {
	given := 0
	for _, b := range []bool{len(pos) > 0, store != "" || name != "", file != ""} {
		if b {
			given++
		}
	}
	switch {
	case given != 1 || len(pos) > 1:
		return "", usagef("name one pipeline: PIPELINE, or --store with --name, or --spec FILE")
	case len(pos) == 1:
		return pos[0], nil
	case file != "":
		data, err := os.ReadFile(file)
		if err != nil {
			return "", err
		}
		spec, err := export.ParseSpec(data)
		if err != nil {
			return "", fmt.Errorf("%s: %w", file, err)
		}
		return export.PipelineKey(spec), nil
	case store == "" || name == "":
		return "", usagef("--store and --name go together (a pipeline without a name: --spec FILE)")
	}
	// A placeholder destination makes the spec valid; with a name it takes
	// no part in the key.
	data, _ := json.Marshal(map[string]any{"fhirStore": store, "name": name, "gcsDestination": map[string]string{"uriPrefix": "gs://placeholder"}})
	spec, err := export.ParseSpec(data)
	if err != nil {
		return "", usagef("--store/--name: %v", err)
	}
	return export.PipelineKey(spec), nil
}

func fill(dst *string, v string) {
	if *dst == "" {
		*dst = v
	}
}
