package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/oauth2"
	"golang.org/x/oauth2/google"

	"github.com/fhirexport/fhirexport/export"
	"github.com/fhirexport/fhirexport/export/mirror"
)

const feedPullLong = `'feed pull' mirrors a pipeline's change feed into the folder DIR, as any HL7
Bulk Data client would read it: it finds the pipeline's finished Cloud
Storage runs in the state bucket, oldest transactionTime first, fetches each
run's manifest and the files it lists over the URLs it advertises (with a
Google access token for https://storage.googleapis.com, none for the storage
emulator), and applies it: every output resource upserted, then every
deleted resource removed. A full run (no _since) is a snapshot: what it does
not list of its types is removed, which heals deletions the feed could not
see. A partial run is applied as its manifest says (it only upserts); a
failed run has no manifest and is skipped.

DIR then holds one NDJSON file per resource type, {Type}.ndjson, sorted by
id (two mirrors of one store compare equal byte for byte), and
feed-cursor.json, the last run applied. A second pull fetches only newer
runs. Each run is applied atomically: an interrupted pull (Ctrl-C, a failed
download) leaves DIR as the last run left it, and the next pull resumes
without applying a run twice or skipping one. --changes appends every
upsert and removal, with its run, to DIR/changes.ndjson.

PIPELINE is a pipeline key as 'fhirexport status' lists it; --store with
--name derive the key of a named pipeline, --spec FILE that of any spec.
--since starts a new mirror at a run (its id, trigger id or operation) or at
the first run whose transactionTime is at or after TIME (RFC 3339); by
default a new mirror starts at the pipeline's first run.`

// pullOptions are the flags of feed pull.
type pullOptions struct {
	dir, since, store, name, spec string
	changes                       bool
}

func (inv *invocation) feedCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "feed",
		Short: "a pipeline's change feed: pull it into a folder",
		Long: `A pipeline's change feed is the HL7 Bulk Data manifests its Cloud Storage
runs write. 'feed pull' mirrors it into a folder.`,
		Example: `  fhirexport feed pull PIPELINE --dir DIR [--since RUN|TIME] [--changes] [--json]`,
		Args:    cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return usagef("feed needs a subcommand: pull")
			}
			return usagef("feed %s: want pull%s", args[0], suggest(cmd, args[0]))
		},
	}
	var o pullOptions
	pull := &cobra.Command{
		Use:   "pull PIPELINE --dir DIR",
		Short: "mirror a pipeline's change feed into a folder, resumably",
		Long:  feedPullLong,
		Example: `  fhirexport feed pull PIPELINE --dir DIR [--since RUN|TIME] [--changes] [--json]
  fhirexport feed pull --store S --name N --dir DIR
  fhirexport feed pull --spec FILE --dir DIR`,
		Args: cobra.ArbitraryArgs, // pipelineKey checks them with the flags
		RunE: func(cmd *cobra.Command, args []string) error {
			return inv.feedPull(cmd.Context(), args, o)
		},
	}
	f := pull.Flags()
	f.StringVar(&o.dir, "dir", "", "the mirror `DIR` (created if absent)")
	f.StringVar(&o.since, "since", "", "start a new mirror at `RUN|TIME`")
	f.BoolVar(&o.changes, "changes", false, "append every upsert and removal to DIR/"+mirror.ChangesFile)
	f.StringVar(&o.store, "store", "", "the pipeline's FHIR `STORE`, with --name")
	f.StringVar(&o.name, "name", "", "the pipeline's `NAME` (the spec's name), with --store")
	f.StringVar(&o.spec, "spec", "", "derive the pipeline from the spec in `FILE`")
	cmd.AddCommand(pull)
	return cmd
}

// pullSummary is what feed pull did, printed with --json.
type pullSummary struct {
	Pipeline string `json:"pipeline"`
	Dir      string `json:"dir"`
	// Finished is the run an interrupted pull had committed, finished now.
	Finished *mirror.Cursor   `json:"finished,omitempty"`
	Applied  []pulledRun      `json:"applied"`
	Skipped  []export.FeedRun `json:"skipped"` // failed runs: no manifest
	Pending  int              `json:"pending"` // runs found but not applied (the pull failed)
	Bytes    int64            `json:"bytes"`
	Cursor   *mirror.Cursor   `json:"cursor"` // DIR's state now; null while nothing is applied
	Error    string           `json:"error,omitempty"`
}

type pulledRun struct {
	Run             string `json:"run"`
	Operation       string `json:"operation"`
	TransactionTime string `json:"transactionTime"`
	Since           string `json:"since,omitempty"` // empty: a full run
	Outcome         string `json:"outcome"`
	Manifest        string `json:"manifest"`
	Upserts         int    `json:"upserts"`
	Removals        int    `json:"removals"`
	Bytes           int64  `json:"bytes"`
}

// feedItem is a run to apply with its manifest.
type feedItem struct {
	run export.FeedRun
	man *mirror.Manifest
}

// clockMargin widens the time window in which run records are read: a run
// record is written when the run ends, by our clock, after its
// transactionTime, by the server's.
const clockMargin = time.Hour

func (inv *invocation) feedPull(ctx context.Context, pos []string, o pullOptions) error {
	key, err := pipelineKey(pos, o.store, o.name, o.spec)
	if err != nil {
		return err
	}
	if o.dir == "" {
		return usagef("feed pull needs --dir DIR, the folder to mirror into")
	}
	var sinceTime time.Time
	sinceRun := ""
	if o.since != "" {
		if t, err := time.Parse(time.RFC3339Nano, o.since); err == nil {
			sinceTime = t
		} else {
			sinceRun = o.since
		}
	}
	in, _, err := inv.inspector(ctx, hcNone)
	if err != nil {
		return err
	}

	m, err := mirror.Open(o.dir, inv.now)
	if err != nil {
		return err
	}
	defer m.Close()
	sum := pullSummary{Pipeline: key, Dir: o.dir, Finished: m.Recovered, Applied: []pulledRun{}, Skipped: []export.FeedRun{}, Cursor: m.Cursor()}
	cur := m.Cursor()
	switch {
	case cur != nil && cur.Pipeline != key:
		return fmt.Errorf("%s mirrors pipeline %s, not %s: pull into another folder", o.dir, cur.Pipeline, key)
	case cur != nil && o.since != "":
		return usagef("--since starts a new mirror; %s already follows pipeline %s up to run %s (transactionTime %s)", o.dir, key, cur.Run, cur.TransactionTime)
	}

	todo, skipped, err := inv.feedRuns(ctx, in, key, cur, sinceRun, sinceTime)
	if err != nil {
		return err
	}
	if cur == nil && len(todo) == 0 && len(skipped) == 0 {
		// Nothing to pull into a new mirror: a typo in the key looks the same.
		if _, err := in.Pipeline(ctx, key); errors.Is(err, export.ErrUnknownPipeline) {
			return fmt.Errorf("%w; check the key with 'fhirexport status'", err)
		} else if err != nil {
			return err
		}
	}
	sum.Skipped = append(sum.Skipped, skipped...)
	sum.Pending = len(todo)
	fetcher := inv.fetcher()
	prog := newProgress(inv.stderr, len(todo))
	for i, p := range todo {
		prog.start(i, p)
		r := mirror.Run{ID: p.run.Run, Operation: p.run.Operation, Manifest: p.run.Manifest, Pipeline: key, Store: p.run.Store}
		res, err := m.Apply(ctx, r, p.man, fetcher, mirror.Options{Changes: o.changes, Progress: prog.bytes})
		prog.done(res.Bytes)
		sum.Bytes += res.Bytes
		if err != nil {
			sum.Cursor = m.Cursor()
			if ctx.Err() != nil {
				err = fmt.Errorf("interrupted: %w", ctx.Err())
			}
			err = fmt.Errorf("run %s (operation %s, transactionTime %s): %w; %s holds %s; pull again to resume", p.run.Run, p.run.Operation,
				p.man.TransactionTime, err, o.dir, held(sum.Cursor))
			sum.Error = err.Error()
			inv.printPull(sum)
			return err
		}
		sum.Pending--
		sum.Applied = append(sum.Applied, pulledRun{Run: p.run.Run, Operation: p.run.Operation, TransactionTime: p.man.TransactionTime,
			Since: p.man.Since(), Outcome: p.run.Outcome, Manifest: p.run.Manifest, Upserts: res.Upserts, Removals: res.Removals, Bytes: res.Bytes})
	}
	sum.Cursor = m.Cursor()
	return inv.printPull(sum)
}

// feedRuns finds the runs to apply after cur (or from sinceRun or
// sinceTime for a new mirror) with their manifests, oldest transactionTime
// first, and the failed runs among them.
func (inv *invocation) feedRuns(ctx context.Context, in *export.Inspector, key string, cur *mirror.Cursor, sinceRun string, sinceTime time.Time) ([]feedItem, []export.FeedRun, error) {
	var after time.Time // apply runs strictly after it
	var from time.Time  // and at or after it
	switch {
	case cur != nil:
		t, err := time.Parse(time.RFC3339Nano, cur.TransactionTime)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: transactionTime %q: %w", mirror.CursorFile, cur.TransactionTime, err)
		}
		after = t
	case sinceRun != "":
		d, err := in.Show(ctx, sinceRun)
		if err != nil {
			return nil, nil, fmt.Errorf("--since %s: %w (or give a time, RFC 3339 with a zone: 2026-01-01T00:00:00Z)", sinceRun, err)
		}
		if d.Run.Pipeline != key {
			return nil, nil, usagef("--since %s: run %s belongs to pipeline %s, not %s", sinceRun, d.Run.ID, d.Run.Pipeline, key)
		}
		runs, err := in.FeedRuns(ctx, key, d.Run.Claimed.Add(-clockMargin))
		if err != nil {
			return nil, nil, err
		}
		i := slices.IndexFunc(runs, func(r export.FeedRun) bool { return r.Run == d.Run.ID })
		if i < 0 || runs[i].Manifest == "" {
			return nil, nil, usagef("--since %s: run %s is not a finished Cloud Storage run with a manifest (status %s%s)", sinceRun, d.Run.ID, d.Run.Status, paren(d.Run.Outcome))
		}
		p, err := manifestOf(ctx, in, runs[i])
		if err != nil {
			return nil, nil, err
		}
		from = p.man.Time()
	default:
		from = sinceTime
	}
	var window time.Time // run records written from then on
	if t := after; !t.IsZero() || !from.IsZero() {
		if from.After(t) {
			t = from
		}
		window = t.Add(-clockMargin)
	}
	runs, err := in.FeedRuns(ctx, key, window)
	if err != nil {
		return nil, nil, err
	}
	var todo []feedItem
	var skipped []export.FeedRun
	for _, r := range runs {
		if r.Manifest == "" {
			if r.Ended.After(after) && !r.Ended.Before(from) {
				skipped = append(skipped, r)
			}
			continue
		}
		p, err := manifestOf(ctx, in, r)
		if err != nil {
			return nil, nil, err
		}
		if t := p.man.Time(); t.After(after) && !t.Before(from) {
			todo = append(todo, p)
		}
	}
	slices.SortStableFunc(todo, func(a, b feedItem) int { return a.man.Time().Compare(b.man.Time()) })
	return todo, skipped, nil
}

func manifestOf(ctx context.Context, in *export.Inspector, r export.FeedRun) (feedItem, error) {
	data, err := in.ReadManifest(ctx, r)
	if errors.Is(err, export.ErrNoManifest) {
		return feedItem{}, fmt.Errorf("%w; runs that ended before fhirexport wrote manifests have none: start a new mirror after them with --since", err)
	}
	if err != nil {
		return feedItem{}, err
	}
	man, err := mirror.ParseManifest(data)
	if err != nil {
		return feedItem{}, fmt.Errorf("%s: %w", r.Manifest, err)
	}
	return feedItem{run: r, man: man}, nil
}

// fetcher GETs the feed's files: without credentials against the storage
// emulator, with Application Default Credentials' token otherwise (the
// fetcher sends it to https://storage.googleapis.com only). The credentials
// are looked up once, when a file first needs them.
func (inv *invocation) fetcher() *mirror.Fetcher {
	f := &mirror.Fetcher{Emulator: inv.getenv("STORAGE_EMULATOR_HOST")}
	if f.Emulator != "" {
		return f
	}
	var once sync.Once
	var src oauth2.TokenSource
	var srcErr error
	f.Token = func(ctx context.Context) (string, error) {
		once.Do(func() {
			src, srcErr = google.DefaultTokenSource(context.WithoutCancel(ctx), "https://www.googleapis.com/auth/devstorage.read_only")
		})
		if srcErr != nil {
			return "", fmt.Errorf("Application Default Credentials: %w", srcErr)
		}
		t, err := src.Token()
		if err != nil {
			return "", err
		}
		return t.AccessToken, nil
	}
	return f
}

// held describes what a mirror holds.
func held(c *mirror.Cursor) string {
	if c == nil {
		return "nothing yet"
	}
	var parts []string
	for _, t := range slices.Sorted(maps.Keys(c.Resources)) {
		parts = append(parts, fmt.Sprintf("%d %s", c.Resources[t], t))
	}
	if len(parts) == 0 {
		parts = []string{"no resources"}
	}
	return fmt.Sprintf("%s as of run %s (transactionTime %s)", strings.Join(parts, ", "), c.Run, c.TransactionTime)
}

func (inv *invocation) printPull(s pullSummary) error {
	if inv.json {
		return inv.printJSON(s)
	}
	w := inv.stdout
	if s.Finished != nil {
		fmt.Fprintf(w, "finished applying run %s, which an interrupted pull had committed\n", s.Finished.Run)
	}
	for _, r := range s.Skipped {
		fmt.Fprintf(w, "skipped run %s (operation %s): it failed and has no manifest\n", r.Run, shortOp(r.Operation))
	}
	if len(s.Applied) > 0 {
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "RUN\tOPERATION\tTRANSACTION TIME\tKIND\tUPSERTS\tREMOVED\tBYTES")
		for _, r := range s.Applied {
			kind := "incremental"
			if r.Since == "" {
				kind = "full"
			}
			if r.Outcome == "partial" {
				kind += ", partial"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\t%s\n", r.Run, shortOp(r.Operation), r.TransactionTime, kind, r.Upserts, r.Removals, size(r.Bytes))
		}
		tw.Flush()
	}
	switch {
	case s.Error != "":
		fmt.Fprintf(w, "%d of %d runs applied; %s holds %s\n", len(s.Applied), len(s.Applied)+s.Pending, s.Dir, held(s.Cursor))
	case len(s.Applied) == 0:
		fmt.Fprintf(w, "%s is up to date: %s\n", s.Dir, held(s.Cursor))
	default:
		fmt.Fprintf(w, "%s holds %s\n", s.Dir, held(s.Cursor))
	}
	return nil
}

// size renders a byte count for people.
func size(n int64) string {
	switch {
	case n < 1000:
		return fmt.Sprintf("%d B", n)
	case n < 1000*1000:
		return fmt.Sprintf("%.1f kB", float64(n)/1000)
	case n < 1000*1000*1000:
		return fmt.Sprintf("%.1f MB", float64(n)/1000/1000)
	}
	return fmt.Sprintf("%.1f GB", float64(n)/1000/1000/1000)
}

// pullProgress shows on a terminal which run is being pulled and its bytes; off
// a terminal it shows nothing (the summary follows on stdout).
type pullProgress struct {
	w     io.Writer // nil: off
	total int
	line  string
	last  int64
}

func newProgress(stderr io.Writer, total int) *pullProgress {
	if f, ok := stderr.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			return &pullProgress{w: stderr, total: total}
		}
	}
	return &pullProgress{total: total}
}

func (p *pullProgress) start(i int, r feedItem) {
	p.line = fmt.Sprintf("run %d/%d %s %s", i+1, p.total, r.man.TransactionTime, shortOp(r.run.Operation))
	p.last = -1
	p.bytes(0)
}

// bytes redraws the line, at most once per 64 kB.
func (p *pullProgress) bytes(n int64) {
	if p.w == nil || (p.last >= 0 && n-p.last < 64<<10) {
		return
	}
	p.last = n
	fmt.Fprintf(p.w, "\r\033[K%s  %s", p.line, size(n))
}

func (p *pullProgress) done(n int64) {
	if p.w == nil {
		return
	}
	fmt.Fprintf(p.w, "\r\033[K%s  %s\n", p.line, size(n))
}
