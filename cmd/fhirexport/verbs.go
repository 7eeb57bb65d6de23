package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"cloud.google.com/go/pubsub/v2"
	"cloud.google.com/go/storage"
	"github.com/spf13/cobra"

	"github.com/fhirexport/fhirexport/events"
	"github.com/fhirexport/fhirexport/export"
)

func (inv *invocation) statusCmd() *cobra.Command {
	var recent time.Duration
	cmd := &cobra.Command{
		Use:   "status",
		Short: "every pipeline: watermark, last outcome, running operation, queue",
		Long: `Shows every pipeline the state bucket knows (from its watermarks, locks, queue
and recent runs): its name, store and destination (its latest run's), its
watermark and how old it is, the last outcome and when, what runs now and the
running operation's progress (operations.get), and any queued follow-up.

A lock "starting" has no operation yet; one older than the start lease (2m) is
marked ORPHANED: its start attempt most likely died. A redelivery of its
trigger takes it over, or else the next sweep resolves it (adopting an export
operations.list finds, queueing it again, or reporting it failed, code 4).`,
		Args: noArgs(""),
		RunE: func(cmd *cobra.Command, _ []string) error { return inv.status(cmd.Context(), recent) },
	}
	cmd.Flags().DurationVar(&recent, "recent", 7*24*time.Hour, "read runs written within this `DURATION` for the last outcome (0: all)")
	return cmd
}

func (inv *invocation) status(ctx context.Context, recent time.Duration) error {
	in, _, err := inv.inspector(ctx, hcProgress)
	if err != nil {
		return err
	}
	ps, err := in.Status(ctx, recent)
	if err != nil {
		return inv.stateError(err)
	}
	if len(ps) == 0 {
		if err := inv.checkLocation(ctx, in); err != nil {
			return err
		}
	}
	if inv.json {
		return inv.printJSON(nonNil(ps))
	}
	if len(ps) == 0 {
		fmt.Fprintf(inv.stdout, "no pipelines in %s\n", inv.state)
		return nil
	}
	tw := tabwriter.NewWriter(inv.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PIPELINE\tNAME\tSTORE\tDESTINATION\tWATERMARK\tAGE\tLAST\tNOW\tQUEUED")
	for _, p := range ps {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.Pipeline, dash(p.Name), shortStore(p.Store), dash(p.Destination),
			dash(p.Watermark), inv.since(p.Watermark), inv.last(p.Last), inv.activity(p.Lock), inv.queued(p.Queued))
	}
	return tw.Flush()
}

// checkLocation explains an empty answer by the state location: its bucket
// does not exist (an error), or nothing at all is stored under its prefix
// (said on stderr), most likely a mistyped --state.
func (inv *invocation) checkLocation(ctx context.Context, in *export.Inspector) error {
	found, err := in.CheckLocation(ctx)
	if err != nil {
		return inv.stateError(err)
	}
	if !found {
		fmt.Fprintf(inv.stderr, "fhirexport: nothing is stored under %s: no fhirexport deployment has written state there yet.\n"+
			"Check --state (or $FHIREXPORT_STATE): it is the functions' FHIREXPORT_STATE.\n", inv.state)
	}
	return nil
}

// stateError names the state location when its bucket does not exist.
func (inv *invocation) stateError(err error) error {
	if errors.Is(err, storage.ErrBucketNotExist) || errors.Is(err, export.ErrNoBucket) {
		bucket, _, _ := export.ParseStateLocation(inv.state)
		return fmt.Errorf("state location %s: gs://%s: %w; check --state (or $FHIREXPORT_STATE): it is the functions' FHIREXPORT_STATE", inv.state, bucket, export.ErrNoBucket)
	}
	return err
}

// last describes a pipeline's last ended run: "succeeded 3h ago".
func (inv *invocation) last(r *export.Run) string {
	if r == nil {
		return "-"
	}
	what := r.Outcome
	if what == "" {
		what = r.Status
	}
	if t := r.EndedAt(); !t.IsZero() {
		what += " " + human(inv.now().Sub(t)) + " ago"
	}
	return what
}

// activity describes a pipeline's lock: what runs now.
func (inv *invocation) activity(l *export.Lock) string {
	if l == nil {
		return "idle"
	}
	s := l.State + " " + human(inv.now().Sub(l.Started))
	if l.Orphaned {
		s += " ORPHANED (no operation)"
	}
	if l.Cancelled != "" {
		s += " cancelled by " + l.Cancelled
	}
	if p := l.Progress; p != nil {
		s += " " + progress(p)
	} else if l.Operation != "" && inv.hcErr != nil {
		s += " (progress unavailable: no Healthcare API client)"
	}
	return s
}

func progress(p *export.Progress) string {
	if p.GetError != "" {
		return "(progress unknown: " + p.GetError + ")"
	}
	s := fmt.Sprintf("%d ok/%d failed/%d pending", p.Success, p.Failure, p.Pending)
	if total := p.Success + p.Failure + p.Pending; total > 0 && !p.Done {
		s = fmt.Sprintf("%d%% ", (p.Success+p.Failure)*100/total) + s
	}
	if p.Done {
		s = "done, " + s
		if p.Error != nil {
			s += fmt.Sprintf(", error %d %s", p.Error.Code, p.Error.Message)
		}
		s += ", not yet reported"
	}
	if p.CancelRequested {
		s += ", cancel requested"
	}
	return "(" + s + ")"
}

func (inv *invocation) queued(q *export.Queued) string {
	if q == nil {
		return "-"
	}
	s := "queued " + human(inv.now().Sub(q.Enqueued))
	if n := len(q.Coalesced); n > 0 {
		s += fmt.Sprintf(" +%d coalesced", n)
	}
	if q.NotBefore.After(inv.now()) {
		s += " backoff " + human(q.NotBefore.Sub(inv.now()))
	}
	return s
}

// since is how long ago an RFC 3339 time was, "-" when there is none.
func (inv *invocation) since(v string) string {
	t, err := time.Parse(time.RFC3339Nano, v)
	if err != nil {
		return "-"
	}
	return human(inv.now().Sub(t))
}

func (inv *invocation) runsCmd() *cobra.Command {
	var o runsOptions
	cmd := &cobra.Command{
		Use:   "runs",
		Short: "recent runs (--pipeline, --status, --since, --limit)",
		Long: `Lists runs, newest first. STATUS is running or one of claimed, queued, done,
failed, skipped, coalesced, rejected. RUN and OPERATION (DATASET/ID) are printed
short; show, cancel and rerun take them back as printed.`,
		Args: noArgs(" (filter with --pipeline)"),
		RunE: func(cmd *cobra.Command, _ []string) error { return inv.runs(cmd.Context(), o) },
	}
	f := cmd.Flags()
	f.StringVar(&o.pipeline, "pipeline", "", "only runs of this pipeline `KEY`")
	f.StringVar(&o.status, "status", "", "only runs with this `STATUS`")
	f.StringVar(&o.since, "since", "", "only runs claimed within a `DURATION` (24h) or since a TIME (RFC 3339)")
	f.IntVar(&o.limit, "limit", 50, "at most `N` runs (0: all)")
	return cmd
}

type runsOptions struct {
	pipeline, status, since string
	limit                   int
}

func (inv *invocation) runs(ctx context.Context, o runsOptions) error {
	f := export.RunFilter{Pipeline: o.pipeline, Status: o.status, Limit: o.limit}
	if f.Status != "" && f.Status != "running" && !slices.Contains(export.RunStatuses, f.Status) {
		return usagef("--status %q: want running or one of %s", f.Status, strings.Join(export.RunStatuses, ", "))
	}
	if o.limit < 0 {
		return usagef("--limit %d: want 0 (all) or more", o.limit)
	}
	if o.since != "" {
		var err error
		if f.Since, err = parseSince(o.since, inv.now()); err != nil {
			return err
		}
	}
	in, _, err := inv.inspector(ctx, hcNone)
	if err != nil {
		return err
	}
	runs, err := in.Runs(ctx, f)
	if err != nil {
		return inv.stateError(err)
	}
	if len(runs) == 0 {
		if err := inv.checkLocation(ctx, in); err != nil {
			return err
		}
	}
	if inv.json {
		return inv.printJSON(nonNil(runs))
	}
	if len(runs) == 0 {
		fmt.Fprintln(inv.stdout, "no runs match")
		return nil
	}
	tw := tabwriter.NewWriter(inv.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "RUN\tCLAIMED\tPIPELINE\tNAME\tSTATUS\tOUTCOME\tOPERATION\tTRIGGER")
	for _, r := range runs {
		fmt.Fprintf(tw, "%s\t%s ago\t%s\t%s\t%s\t%s\t%s\t%s\n", r.ID, human(inv.now().Sub(r.Claimed)), r.Pipeline, dash(r.Name),
			runStatus(r), dash(r.Outcome), dash(shortOp(r.Operation)), r.Trigger.ID)
	}
	return tw.Flush()
}

func runStatus(r export.Run) string {
	if r.Running {
		return "running"
	}
	return r.Status
}

// parseSince reads a duration back from now, or an RFC 3339 time.
func parseSince(v string, now time.Time) (time.Time, error) {
	if d, err := time.ParseDuration(v); err == nil && d >= 0 {
		return now.Add(-d), nil
	}
	if t, err := time.Parse(time.RFC3339Nano, v); err == nil {
		return t, nil
	}
	return time.Time{}, usagef("--since %q: want a duration such as 24h or a time such as 2026-01-01T00:00:00Z", v)
}

func (inv *invocation) showCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "show RUN|TRIGGER|OPERATION",
		Short: "everything known about one run",
		Long: `Shows everything known about one run: its run record, its pipeline's lock or
queue record while it holds them, the started and final events stored with it,
and the running operation's progress. A run is named by its run id, by the id
of the trigger that claimed it (the Pub/Sub message id), or by its operation
(projects/…/operations/ID).`,
		Args: oneArg("RUN|TRIGGER|OPERATION"),
		RunE: func(cmd *cobra.Command, args []string) error { return inv.show(cmd.Context(), args[0]) },
	}
}

func (inv *invocation) show(ctx context.Context, id string) error {
	in, _, err := inv.inspector(ctx, hcProgress)
	if err != nil {
		return err
	}
	d, err := in.Show(ctx, id)
	if err != nil {
		return err
	}
	if inv.json {
		return inv.printJSON(d)
	}
	inv.printDetail(d)
	return nil
}

func (inv *invocation) printDetail(d export.RunDetail) {
	r := d.Run
	tw := tabwriter.NewWriter(inv.stdout, 0, 4, 2, ' ', 0)
	row := func(k, format string, args ...any) { fmt.Fprintf(tw, "%s\t"+format+"\n", append([]any{k}, args...)...) }
	row("run", "%s", r.ID)
	row("trigger", "%s (source %s)", r.Trigger.ID, r.Trigger.Source)
	row("pipeline", "%s%s", r.Pipeline, paren(r.Name))
	row("store", "%s", dash(r.Store))
	row("destination", "%s", dash(r.Destination))
	status := runStatus(r)
	if r.Outcome != "" && r.Outcome != status {
		status += ", " + r.Outcome
	}
	if r.Into != "" {
		status += ", into run " + r.Into
	}
	row("status", "%s", status)
	row("claimed", "%s (%s ago)", stamp(r.Claimed), human(inv.now().Sub(r.Claimed)))
	if !r.Ended.IsZero() {
		row("ended", "%s (%s ago)", stamp(r.Ended), human(inv.now().Sub(r.Ended)))
	}
	row("operation", "%s", dash(r.Operation))
	if l := d.Lock; l != nil {
		row("lock", "%s for %s (since %s)%s", l.State, human(inv.now().Sub(l.Started)), stamp(l.Started), flagIf(l.Orphaned, ", ORPHANED: no operation past the start lease"))
		if l.Since != "" {
			row("_since", "%s", l.Since)
		}
		if l.Slot >= 0 && l.FromQueue {
			row("slot", "%d (from the queue)", l.Slot)
		}
		if l.Timeout != "" {
			row("timeout", "%s", l.Timeout)
		}
		if l.Cancelled != "" {
			row("cancelled", "by %s", l.Cancelled)
		}
		switch {
		case l.Progress != nil:
			row("progress", "%s", progress(l.Progress))
		case l.Operation != "" && inv.hcErr != nil:
			row("progress", "unavailable: no Healthcare API client (%v); the rest is what the state bucket knows", inv.hcErr)
		}
	}
	if q := d.Queued; q != nil {
		row("queued", "since %s (%s ago), %d attempts, %d coalesced triggers", stamp(q.Enqueued), human(inv.now().Sub(q.Enqueued)), q.Attempts, len(q.Coalesced))
	}
	for _, e := range []struct {
		k string
		e *events.Event
	}{{"started event", r.Started}, {"final event", r.Final}} {
		if e.e == nil {
			continue
		}
		s := fmt.Sprintf("%s %s at %s", strings.TrimPrefix(e.e.Type, events.TypePrefix), e.e.ID, stamp(e.e.Time))
		if er := e.e.Data.Error; er != nil {
			s += fmt.Sprintf(": error %d %s", er.Code, er.Message)
		}
		row(e.k, "%s", s)
	}
	// How the run ended, as its final event told: what a consumer received.
	if f := r.Final; f != nil {
		if c := f.Data.Counters; c != nil {
			row("counters", "%d ok/%d failed/%d pending", c.Success, c.Failure, c.Pending)
		}
		if f.Data.Duration != "" {
			row("duration", "%s", f.Data.Duration)
		}
		if f.Data.Manifest != "" {
			row("manifest", "%s", f.Data.Manifest)
		}
		if u := f.Data.ManifestURL; u != "" && u != f.Data.Manifest {
			row("manifest url", "%s", u)
		}
		if f.Data.Deleted != nil {
			row("deleted", "%d resources", *f.Data.Deleted)
		}
		if f.Data.Watermark != "" {
			adv := ""
			if a := f.Data.WatermarkAdvanced; a != nil && !*a {
				adv = " (not advanced)"
			}
			row("watermark", "%s%s", f.Data.Watermark, adv)
		}
		if f.Data.LogsURL != "" {
			row("logs", "%s", f.Data.LogsURL)
		}
	}
	if len(r.Spec) > 0 {
		row("spec", "%s", compact(r.Spec))
	} else {
		row("spec", "(not stored)")
	}
	tw.Flush()
}

func (inv *invocation) cancelCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "cancel RUN|OPERATION",
		Short: "cancel a running export (operations.cancel)",
		Long: `Cancels a running export with operations.cancel and records in its pipeline's
lock that an operator asked. The next poll sweep reports the run as
export.failed (code 1, CANCELLED) and frees the pipeline. A run that is not
running (ended, queued, or still starting without an operation) is refused.`,
		Args: oneArg("RUN|OPERATION"),
		RunE: func(cmd *cobra.Command, args []string) error { return inv.cancel(cmd.Context(), args[0]) },
	}
}

func (inv *invocation) cancel(ctx context.Context, id string) error {
	in, _, err := inv.inspector(ctx, hcRequired)
	if err != nil {
		return err
	}
	d, err := in.Cancel(ctx, id)
	if err != nil {
		if errors.Is(err, export.ErrNotRunning) {
			return fmt.Errorf("%w; see 'fhirexport show %s'", err, id)
		}
		return err
	}
	if inv.json {
		return inv.printJSON(d)
	}
	fmt.Fprintf(inv.stdout, "cancel requested for operation %s (run %s, pipeline %s).\n"+
		"The next poll sweep reports it as export.failed (1 CANCELLED) and frees the pipeline.\n",
		d.Run.Operation, d.Run.ID, d.Run.Pipeline)
	return nil
}

func (inv *invocation) rerunCmd() *cobra.Command {
	var topic string
	cmd := &cobra.Command{
		Use:   "rerun RUN|TRIGGER|OPERATION",
		Short: "publish a run's spec again as a new trigger",
		Long: `Publishes the spec a run ran with on the requests topic as a new message: a new
trigger, started by the normal path (allow-lists, pipeline lock and queue
apply). The run must have its spec stored.`,
		Args: oneArg("RUN|TRIGGER|OPERATION"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !cmd.Flags().Changed("topic") {
				topic = inv.getenv("FHIREXPORT_REQUESTS_TOPIC")
			}
			return inv.rerun(cmd.Context(), args[0], topic)
		},
	}
	cmd.Flags().StringVar(&topic, "topic", "", "the requests `TOPIC`, projects/P/topics/T or T with --project (default $FHIREXPORT_REQUESTS_TOPIC)")
	return cmd
}

func (inv *invocation) rerun(ctx context.Context, id, topic string) error {
	t := topic
	if t != "" && !strings.HasPrefix(t, "projects/") {
		if inv.project == "" {
			return usagef("--topic %q is a short name: give projects/P/topics/T or --project", t)
		}
		t = "projects/" + inv.project + "/topics/" + t
	}
	if t == "" {
		return usagef("no requests topic: give --topic projects/P/topics/T (the topic StartExport is triggered from) or set FHIREXPORT_REQUESTS_TOPIC")
	}
	parts := strings.Split(t, "/")
	if len(parts) != 4 || parts[0] != "projects" || parts[2] != "topics" || parts[1] == "" || parts[3] == "" {
		return usagef("requests topic %q is not projects/P/topics/T (--topic or FHIREXPORT_REQUESTS_TOPIC)", t)
	}
	in, _, err := inv.inspector(ctx, hcNone)
	if err != nil {
		return err
	}
	spec, d, err := in.Spec(ctx, id)
	if err != nil {
		return err
	}
	ps, err := inv.pubsub(ctx, parts[1])
	if err != nil {
		return err
	}
	pub := ps.Publisher(t)
	defer pub.Stop()
	msgID, err := pub.Publish(ctx, &pubsub.Message{Data: spec, Attributes: map[string]string{"fhirexport-rerun-of": d.Run.ID}}).Get(ctx)
	if err != nil {
		return fmt.Errorf("publish to %s: %w", t, err)
	}
	if inv.json {
		return inv.printJSON(map[string]any{"rerunOf": d.Run.ID, "topic": t, "messageId": msgID, "spec": spec})
	}
	fmt.Fprintf(inv.stdout, "published the spec of run %s to %s as message %s.\n"+
		"It is a new trigger; follow it with 'fhirexport show %s'.\n", d.Run.ID, t, msgID, msgID)
	return nil
}

func (inv *invocation) printJSON(v any) error {
	enc := json.NewEncoder(inv.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// nonNil makes an empty list print as [] in JSON.
func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

// human renders a duration for people: 45s, 12m, 3h5m, 2d4h.
func human(d time.Duration) string {
	switch {
	case d < 0:
		return "0s"
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 24*time.Hour:
		h := int(d.Hours())
		return fmt.Sprintf("%dh%dm", h, int(d.Minutes())-60*h)
	}
	days := int(d.Hours()) / 24
	return fmt.Sprintf("%dd%dh", days, int(d.Hours())-24*days)
}

// shortStore keeps a store's dataset and store ids: DATASET/STORE.
func shortStore(s string) string {
	p := strings.Split(s, "/")
	if len(p) == 8 {
		return p[5] + "/" + p[7]
	}
	return dash(s)
}

// shortOp keeps an operation's dataset and id: DATASET/ID.
func shortOp(op string) string {
	p := strings.Split(op, "/")
	if len(p) == 8 {
		return p[5] + "/" + p[7]
	}
	return op
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func paren(s string) string {
	if s == "" {
		return ""
	}
	return " (" + s + ")"
}

func flagIf(b bool, s string) string {
	if b {
		return s
	}
	return ""
}

func stamp(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

func compact(raw json.RawMessage) string {
	var b bytes.Buffer
	if err := json.Compact(&b, raw); err != nil {
		return string(raw)
	}
	return b.String()
}
