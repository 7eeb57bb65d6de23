package export

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/fhirexport/fhirexport/events"
)

// put writes a state record in the shape records.go names, as the start and
// poll paths will, for states the current code does not write yet.
func put(t *testing.T, s *State, name string, v any, meta map[string]string) {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	wr := s.bkt.Object(s.object(name)).NewWriter(context.Background())
	wr.ContentType, wr.Metadata = "application/json", meta
	if _, err := wr.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := wr.Close(); err != nil {
		t.Fatalf("write %s: %v", name, err)
	}
}

// trigger delivers the trigger id with spec and returns its run id.
func (w *world) trigger(t *testing.T, id string, spec map[string]any) string {
	t.Helper()
	data, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.x.Start(context.Background(), events.Trigger{Source: "//test", ID: id, Spec: data}, nil); err != nil {
		t.Fatalf("Start %s: %v", id, err)
	}
	return RunKey("//test", id)
}

// inspectWorld is a world with one finished incremental run and one running
// run of the same pipeline, and an inspector whose clock is at the run.
func inspectWorld(t *testing.T) (*world, *Inspector, map[string]any, string, string) {
	t.Helper()
	w := newWorld(t)
	store := w.store(t)
	if _, err := w.emu.Seed(store, 1, 3); err != nil {
		t.Fatal(err)
	}
	spec := map[string]any{"fhirStore": store, "name": "hourly", "incremental": true,
		"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/h"}}
	done := w.trigger(t, "first", spec)
	w.poll(t)
	w.emu.SetExportTiming(time.Hour, 4)
	w.clock.Advance(time.Minute)
	if _, err := w.emu.Seed(store, 2, 3); err != nil { // something for the increment to export
		t.Fatal(err)
	}
	running := w.trigger(t, "second", spec)
	w.clock.Advance(30 * time.Minute)
	hc, err := w.emu.Service(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return w, NewInspector(w.x.state, hc, time.Now), spec, done, running
}

func TestInspectorStatus(t *testing.T) {
	t.Parallel()
	w, in, spec, done, running := inspectWorld(t)
	ctx := context.Background()
	now := time.Now().UTC().Truncate(time.Second)
	in.now = func() time.Time { return now }
	key := PipelineKey(mustSpec(t, spec))

	// A start lock without an operation, 5 minutes old: an orphan.
	orphanSpec := map[string]any{"fhirStore": spec["fhirStore"], "name": "orphan", "gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/o"}}
	orphan := PipelineKey(mustSpec(t, orphanSpec))
	put(t, w.x.state, pendingObject(orphan), pendingRecord{Run: "r-orphan", Trigger: events.TriggerRef{Source: "//test", ID: "lost"},
		Pipeline: orphan, Store: spec["fhirStore"].(string), Name: "orphan", Destination: "gs://exports/o", Slot: -1,
		Started: now.Add(-5 * time.Minute)}, map[string]string{"run": "r-orphan"})
	// A follow-up queued behind the running run.
	put(t, w.x.state, queueObject(key), queueRecord{pendingRecord: pendingRecord{Run: "r-next", Trigger: events.TriggerRef{Source: "//test", ID: "third"},
		Pipeline: key, Destination: "gs://exports/h"}, Enqueued: now.Add(-90 * time.Second),
		Coalesced: []events.TriggerRef{{Source: "//test", ID: "fourth"}}}, nil)

	got, err := in.Status(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 {
		t.Fatalf("Status returned %d pipelines, want 2: %+v", len(got), got)
	}
	byKey := map[string]PipelineStatus{got[0].Pipeline: got[0], got[1].Pipeline: got[1]}

	p := byKey[key]
	if p.Name != "hourly" || p.Store != spec["fhirStore"] || p.Watermark == "" || p.WatermarkAge == "" {
		t.Errorf("pipeline = %+v; want its name, store and watermark with an age", p)
	}
	if p.Last == nil || p.Last.ID != done || p.Last.Outcome != "succeeded" {
		t.Errorf("last run = %+v; want run %s succeeded", p.Last, done)
	}
	if l := p.Lock; l == nil || l.Run != running || l.State != "running" || l.Operation == "" || l.Orphaned {
		t.Fatalf("lock = %+v; want run %s running", l, running)
	}
	if pr := p.Lock.Progress; pr == nil || pr.Done || pr.Pending == 0 || pr.GetError != "" {
		t.Errorf("progress = %+v; want the running operation's counters", pr)
	}
	if q := p.Queued; q == nil || q.Run != "r-next" || q.Age != "1m30s" || len(q.Coalesced) != 1 {
		t.Errorf("queued = %+v; want r-next queued 1m30s ago with one coalesced trigger", q)
	}

	o := byKey[orphan]
	want := &Lock{Run: "r-orphan", Trigger: events.TriggerRef{Source: "//test", ID: "lost"}, Pipeline: orphan,
		Store: spec["fhirStore"].(string), Name: "orphan", Destination: "gs://exports/o", Slot: -1,
		State: "starting", Started: now.Add(-5 * time.Minute), Age: "5m0s", Orphaned: true}
	if diff := cmp.Diff(want, o.Lock); diff != "" {
		t.Errorf("orphaned lock (-want +got):\n%s", diff)
	}

	// A recent window leaves out older runs but never locks or watermarks.
	got, err = in.Status(ctx, time.Nanosecond)
	if err != nil || len(got) != 2 {
		t.Fatalf("Status(recent) = %d pipelines, %v", len(got), err)
	}
}

func TestInspectorShowAndRuns(t *testing.T) {
	t.Parallel()
	w, in, spec, done, running := inspectWorld(t)
	ctx := context.Background()
	key := PipelineKey(mustSpec(t, spec))

	d, err := in.Show(ctx, running)
	if err != nil {
		t.Fatal(err)
	}
	if !d.Run.Running || d.Lock == nil || d.Lock.Progress == nil || d.Run.Operation == "" {
		t.Fatalf("Show(running) = %+v; want the lock with progress", d)
	}
	op := d.Run.Operation

	var doneOp string
	for _, id := range []string{done, "first"} {
		d, err := in.Show(ctx, id)
		if err != nil {
			t.Fatalf("Show(%s): %v", id, err)
		}
		if d.Run.ID != done || d.Run.Status != RunDone || d.Run.Started == nil || d.Lock != nil {
			t.Errorf("Show(%s) = %+v; want the done run with its started event", id, d)
		}
		doneOp = d.Run.Operation
	}
	// An operation: through the lock (running), the run records (done), and
	// the operations/ index.
	for op, want := range map[string]string{op: running, doneOp: done} {
		d, err := in.Show(ctx, op)
		if err != nil || d.Run.ID != want {
			t.Errorf("Show(%s) = %s, %v; want run %s", op, d.Run.ID, err, want)
		}
	}
	indexed := "projects/p/locations/l/datasets/d/operations/77"
	put(t, w.x.state, opObject(indexed), opRecord{Operation: indexed, Run: done, Pipeline: key}, nil)
	if d, err := in.Show(ctx, indexed); err != nil || d.Run.ID != done {
		t.Errorf("Show(indexed op) = %s, %v; want run %s", d.Run.ID, err, done)
	}

	// A fleet trigger claims one run per store: ambiguous by trigger id.
	for _, r := range []string{"fleet-a", "fleet-b"} {
		put(t, w.x.state, runObject(r), runRecord{Trigger: events.TriggerRef{Source: "//test", ID: "fleet"}, Pipeline: "p-" + r, Status: RunFailed}, nil)
	}
	for id, want := range map[string]error{"nope": ErrUnknownRun, "fleet": ErrAmbiguous, "projects/p/locations/l/datasets/d/operations/9": ErrUnknownRun} {
		if _, err := in.Show(ctx, id); !errors.Is(err, want) {
			t.Errorf("Show(%s) = %v; want %v", id, err, want)
		}
	}

	for name, tc := range map[string]struct {
		f    RunFilter
		want []string
	}{
		"pipeline": {RunFilter{Pipeline: key}, []string{running, done}},
		"running":  {RunFilter{Status: "running"}, []string{running}},
		"done":     {RunFilter{Status: RunDone}, []string{done}},
		"limit":    {RunFilter{Pipeline: key, Limit: 1}, []string{running}},
		"future":   {RunFilter{Since: time.Now().Add(time.Hour)}, nil},
	} {
		runs, err := in.Runs(ctx, tc.f)
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, r := range runs {
			ids = append(ids, r.ID)
		}
		if diff := cmp.Diff(tc.want, ids); diff != "" {
			t.Errorf("%s: Runs (-want +got):\n%s", name, diff)
		}
	}

	if _, err := in.Pipeline(ctx, key); err != nil {
		t.Errorf("Pipeline(known) = %v", err)
	}
	if _, err := in.Pipeline(ctx, "n-unknown"); !errors.Is(err, ErrUnknownPipeline) {
		t.Errorf("Pipeline(unknown) = %v; want ErrUnknownPipeline", err)
	}
}

func TestInspectorCancel(t *testing.T) {
	t.Parallel()
	w, in, spec, done, running := inspectWorld(t)
	ctx := context.Background()
	key := PipelineKey(mustSpec(t, spec))

	if _, err := in.Cancel(ctx, done); !errors.Is(err, ErrNotRunning) || !strings.Contains(err.Error(), "succeeded") {
		t.Errorf("Cancel(done run) = %v; want ErrNotRunning naming its outcome", err)
	}
	d, err := in.Cancel(ctx, "second")
	if err != nil {
		t.Fatal(err)
	}
	op := d.Run.Operation
	var cancels []string
	for _, r := range w.emu.Requests() {
		if r.APIMethod == "operations.cancel" {
			cancels = append(cancels, r.Path)
		}
	}
	if diff := cmp.Diff([]string{"/v1/" + op + ":cancel"}, cancels); diff != "" {
		t.Errorf("operations.cancel requests (-want +got):\n%s", diff)
	}
	if d.Lock == nil || d.Lock.Cancelled != "operator" {
		t.Errorf("lock after cancel = %+v; want Cancelled operator", d.Lock)
	}
	// The poller still finds the operation in the lock's metadata.
	objs, err := w.x.state.list(ctx, "pending")
	if err != nil || len(objs) != 1 || objs[0].Metadata["operation"] != op {
		t.Fatalf("pending objects = %+v, %v; want the operation kept in the metadata", objs, err)
	}

	// Cancelled (done) but not reported yet: nothing left to cancel.
	if _, err := in.Cancel(ctx, running); !errors.Is(err, ErrNotRunning) || !strings.Contains(err.Error(), "already finished") {
		t.Errorf("Cancel(cancelled, not yet reported) = %v; want ErrNotRunning", err)
	}

	w.poll(t)
	d, err = in.Show(ctx, running)
	if err != nil {
		t.Fatal(err)
	}
	if d.Run.Status != RunDone || d.Run.Outcome != "failed" || d.Lock != nil {
		t.Errorf("after the sweep: %+v; want done, failed, lock freed", d.Run)
	}
	if got := w.lastOutcome(spec["fhirStore"].(string)); got != events.TypeFailed {
		t.Errorf("last outcome %q; want failed", got)
	}

	// A start lock without an operation cannot be cancelled.
	put(t, w.x.state, pendingObject(key), pendingRecord{Run: "r-start", Pipeline: key, Started: time.Now()}, map[string]string{"run": "r-start"})
	if _, err := in.Cancel(ctx, "r-start"); !errors.Is(err, ErrNotRunning) || !strings.Contains(err.Error(), "starting") {
		t.Errorf("Cancel(starting) = %v; want ErrNotRunning saying it is starting", err)
	}
}

func TestInspectorSpec(t *testing.T) {
	t.Parallel()
	w := newWorld(t)
	in := NewInspector(w.x.state, nil, nil)
	ctx := context.Background()
	spec := json.RawMessage(`{"fhirStore":"projects/p-1234/locations/us/datasets/d/fhirStores/s","name":"n","gcsDestination":{"uriPrefix":"gs://bkt/x"}}`)
	put(t, w.x.state, runObject("with"), runRecord{Trigger: events.TriggerRef{Source: "//s", ID: "t1"}, Pipeline: "p", Status: RunDone, Spec: spec}, nil)
	put(t, w.x.state, runObject("without"), runRecord{Trigger: events.TriggerRef{Source: "//s", ID: "t2"}, Pipeline: "p", Status: RunDone}, nil)

	got, d, err := in.Spec(ctx, "t1")
	if err != nil || string(got) != string(spec) {
		t.Errorf("Spec(t1) = %s, %v; want the stored spec", got, err)
	}
	if d.Run.Name != "n" || d.Run.Destination != "gs://bkt/x" {
		t.Errorf("run = %+v; want name and destination from the spec", d.Run)
	}
	if _, _, err := in.Spec(ctx, "without"); !errors.Is(err, ErrNoSpec) {
		t.Errorf("Spec(without) = %v; want ErrNoSpec", err)
	}
	if _, err := in.Cancel(ctx, "with"); !errors.Is(err, ErrNotRunning) {
		t.Errorf("Cancel(ended) = %v; want ErrNotRunning", err)
	}
}

// TestLockStates names what a lock says about its run.
func TestLockStates(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	in := NewInspector(nil, nil, func() time.Time { return now })
	op := "projects/p/locations/l/datasets/d/operations/1"
	for name, tc := range map[string]struct {
		p        pendingRecord
		state    string
		orphaned bool
	}{
		"starting":        {pendingRecord{Started: now.Add(-time.Minute)}, "starting", false},
		"orphaned":        {pendingRecord{Started: now.Add(-2 * time.Minute)}, "starting", true},
		"in doubt":        {pendingRecord{Started: now.Add(-time.Hour), Called: now.Add(-time.Hour)}, "in doubt", true},
		"running":         {pendingRecord{Started: now.Add(-time.Hour), Operation: op}, "running", false},
		"finalizing":      {pendingRecord{Started: now.Add(-time.Hour), Operation: op, Finalizing: now}, "finalizing", false},
		"clock behind it": {pendingRecord{Started: now.Add(time.Minute)}, "starting", false},
	} {
		l := in.lockOf(tc.p)
		if l.State != tc.state || l.Orphaned != tc.orphaned {
			t.Errorf("%s: state %q orphaned %v; want %q %v", name, l.State, l.Orphaned, tc.state, tc.orphaned)
		}
	}
}

// TestInspectorSkipsCorruptRecords: one run record that cannot be decoded
// does not hide every other run from status and runs; it is named in a
// warning instead.
func TestInspectorSkipsCorruptRecords(t *testing.T) {
	t.Parallel()
	w, in, spec, done, running := inspectWorld(t)
	wr := w.storage.Bucket("state").Object("fx/" + runObject("garbage")).NewWriter(context.Background())
	wr.Write([]byte("{not json"))
	if err := wr.Close(); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	ctx := WithLogger(context.Background(), NewLogger(&buf, nil))
	runs, err := in.Runs(ctx, RunFilter{Pipeline: PipelineKey(mustSpec(t, spec))})
	if err != nil {
		t.Fatalf("Runs with a corrupt record beside: %v", err)
	}
	var ids []string
	for _, r := range runs {
		ids = append(ids, r.ID)
	}
	if !slices.Contains(ids, done) || !slices.Contains(ids, running) {
		t.Errorf("runs %v, want %s and %s", ids, done, running)
	}
	if _, err := in.Status(ctx, 0); err != nil {
		t.Errorf("Status with a corrupt record beside: %v", err)
	}
	if !strings.Contains(buf.String(), "runs/garbage.json") {
		t.Errorf("the corrupt record is not named:\n%s", buf.String())
	}
}

// TestRejectionIsRecorded: a rejected trigger leaves a run record holding its
// event, which Show finds by trigger id; a redelivery publishes the same event
// again and changes nothing.
func TestRejectionIsRecorded(t *testing.T) {
	t.Parallel()
	w := newWorld(t)
	store := w.store(t)
	ctx := context.Background()
	spec, _ := json.Marshal(map[string]any{"fhirStore": store, "name": "leak", "gcsDestination": map[string]any{"uriPrefix": "gs://elsewhere/x"}})
	trig := events.Trigger{Source: "//test", ID: "t-foreign", Spec: spec}
	for range 2 {
		if err := w.x.Start(ctx, trig, nil); err != nil {
			t.Fatal(err)
		}
	}
	var ids []string
	for _, m := range w.ps.Messages() {
		ids = append(ids, m.Attributes["ce-type"]+" "+m.Attributes["ce-id"])
	}
	if len(ids) != 2 || ids[0] != ids[1] || !strings.HasPrefix(ids[0], events.TypeRejected) {
		t.Fatalf("events %q; want the same rejected event twice", ids)
	}
	in := NewInspector(w.x.state, nil, w.clock.Now)
	d, err := in.Show(ctx, "t-foreign")
	if err != nil {
		t.Fatal(err)
	}
	if d.Run.ID != RunKey("//test", "t-foreign") || d.Run.Status != RunRejected || d.Run.Final == nil || d.Run.Final.ID != strings.Fields(ids[0])[1] ||
		d.Run.Final.Data.Error == nil || d.Run.Final.Data.Error.Code != 7 || d.Run.Store != store || d.Run.Pipeline == "" || len(d.Run.Spec) == 0 {
		t.Errorf("Show(t-foreign) = %+v (final %+v)", d.Run, d.Run.Final)
	}
	// Its pipeline is not one: it never ran.
	if _, err := in.Pipeline(ctx, d.Run.Pipeline); !errors.Is(err, ErrUnknownPipeline) {
		t.Errorf("Pipeline of a rejected run: %v, want ErrUnknownPipeline", err)
	}
}
