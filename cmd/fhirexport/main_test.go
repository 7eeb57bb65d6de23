package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"cloud.google.com/go/pubsub/v2/pstest"
	"github.com/fsouza/fake-gcs-server/fakestorage"
	"github.com/google/go-cmp/cmp"
	healthcare "google.golang.org/api/healthcare/v1"
	"google.golang.org/api/option"

	"github.com/fhirexport/fhirexport/events"
	"github.com/fhirexport/fhirexport/export"
	"github.com/fhirexport/fhirexport/healthcaretest"
	"github.com/fhirexport/fhirexport/healthcaretest/stacktest"
)

const (
	location      = "projects/test-project/locations/us-central1"
	store         = location + "/datasets/d/fhirStores/s"
	eventsTopic   = "projects/test-project/topics/fhirexport-events"
	requestsTopic = "projects/test-project/topics/fhirexport-requests"
	stateLoc      = "gs://state/fx"
)

// stack is the local stack the command runs against: fake-gcs-server, the
// Healthcare emulator and pstest, with an Exporter (the functions' core)
// writing real state into it.
type stack struct {
	gcs   *fakestorage.Server
	emu   *healthcaretest.Server
	clock *healthcaretest.FakeClock
	ps    *pstest.Server
	x     *export.Exporter
	env   map[string]string
	now   time.Time // the command's clock
	// hcOpts are the command's first Healthcare client options.
	hcOpts []option.ClientOption
	// clocked: the command's clock is the emulator's fake clock.
	clocked bool
}

func newStack(t *testing.T) *stack { return newStackWith(t, false) }

// newStackWith returns a stack; a deterministic one has the emulator's
// deterministic ids, and the Exporter and the command on its fake clock, so
// that the command prints the same every time (the README's transcript).
func newStackWith(t *testing.T, deterministic bool) *stack {
	t.Helper()
	clock := healthcaretest.NewFakeClock(time.Date(2026, 11, 26, 0, 0, 0, 0, time.UTC))
	s := stacktest.New(t, stacktest.Options{
		Buckets:    []string{"state", "exports"},
		Topics:     []string{eventsTopic, requestsTopic},
		Healthcare: healthcaretest.Options{Clock: clock, DeterministicIDs: deterministic},
	})
	if err := s.Healthcare.CreateDataset(location + "/datasets/d"); err != nil {
		t.Fatal(err)
	}
	if err := s.Healthcare.CreateFHIRStore(store, "R4"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Healthcare.Seed(store, 1, 3); err != nil {
		t.Fatal(err)
	}
	pub := events.NewPublisher(s.PubSub, eventsTopic)
	t.Cleanup(pub.Stop)
	policy, err := export.ParsePolicy(location+"/datasets/*/fhirStores/*", "gs://exports")
	if err != nil {
		t.Fatal(err)
	}
	var now func() time.Time
	if deterministic {
		now = clock.Now
	}
	return &stack{
		gcs: s.GCS, emu: s.Healthcare, clock: clock, ps: s.Pstest, clocked: deterministic,
		x: export.New(s.HealthcareService, export.NewState(s.Storage, "state", "fx"), pub, policy, now),
		env: map[string]string{
			"FHIREXPORT_STATE":               stateLoc,
			"FHIREXPORT_HEALTHCARE_ENDPOINT": s.Healthcare.URL,
			"STORAGE_EMULATOR_HOST":          s.GCSURL,
			"PUBSUB_EMULATOR_HOST":           s.PubSubAddr,
		},
		now: time.Now().UTC().Truncate(time.Second),
	}
}

// fhirexport runs one command line in-process.
func (s *stack) fhirexport(args ...string) (stdout, stderr string, code int) {
	var out, errOut bytes.Buffer
	if s.clocked {
		s.now = s.clock.Now()
	}
	c := config{getenv: func(k string) string { return s.env[k] }, now: func() time.Time { return s.now }, healthcareOptions: s.hcOpts}
	code = c.run(context.Background(), args, &out, &errOut)
	return out.String(), errOut.String(), code
}

// ok runs a command line that must succeed.
func (s *stack) ok(t *testing.T, args ...string) string {
	t.Helper()
	out, errOut, code := s.fhirexport(args...)
	if code != 0 {
		t.Fatalf("fhirexport %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

// fails runs a command line that must exit with code and say want on stderr.
func (s *stack) fails(t *testing.T, code int, want string, args ...string) {
	t.Helper()
	out, errOut, got := s.fhirexport(args...)
	if got != code || !strings.Contains(errOut, want) {
		t.Errorf("fhirexport %s: exit %d, stderr %q (stdout %q); want exit %d saying %q", strings.Join(args, " "), got, errOut, out, code, want)
	}
}

// put writes a state record as records.go lays it out.
func (s *stack) put(t *testing.T, name string, v any, meta map[string]string) {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	s.gcs.CreateObject(fakestorage.Object{ObjectAttrs: fakestorage.ObjectAttrs{BucketName: "state", Name: "fx/" + name,
		ContentType: "application/json", Metadata: meta}, Content: data})
}

// get reads a state record.
func (s *stack) get(t *testing.T, name string, v any) {
	t.Helper()
	o, err := s.gcs.GetObject("state", "fx/"+name)
	if err != nil {
		t.Fatalf("state %s: %v", name, err)
	}
	if err := json.Unmarshal(o.Content, v); err != nil {
		t.Fatal(err)
	}
}

func (s *stack) trigger(t *testing.T, id string, spec map[string]any) string {
	t.Helper()
	data, _ := json.Marshal(spec)
	if err := s.x.Start(context.Background(), events.Trigger{Source: "//test", ID: id, Spec: data}, nil); err != nil {
		t.Fatalf("Start %s: %v", id, err)
	}
	return export.RunKey("//test", id)
}

func (s *stack) poll(t *testing.T) {
	t.Helper()
	if _, err := s.x.Poll(context.Background()); err != nil {
		t.Fatal(err)
	}
}

var hourly = map[string]any{"fhirStore": store, "name": "hourly", "incremental": true,
	"gcsDestination": map[string]any{"uriPrefix": "gs://exports/hourly"}}

// twoRuns leaves the hourly pipeline with a succeeded run (and so a
// watermark) and a second run half way through its export.
func twoRuns(t *testing.T, s *stack) (key, done, running string) {
	t.Helper()
	done = s.trigger(t, "first", hourly)
	s.poll(t)
	s.emu.SetExportTiming(time.Hour, 4)
	s.clock.Advance(time.Minute)
	if _, err := s.emu.Seed(store, 2, 3); err != nil { // changes for the increment
		t.Fatal(err)
	}
	running = s.trigger(t, "second", hourly)
	s.clock.Advance(30 * time.Minute)
	spec, _ := json.Marshal(hourly)
	parsed, err := export.ParseSpec(spec)
	if err != nil {
		t.Fatal(err)
	}
	return export.PipelineKey(parsed), done, running
}

// counters returns an operation's progress as operations.get answers it.
func counters(t *testing.T, s *stack, op string) healthcare.ProgressCounter {
	t.Helper()
	o, ok := s.emu.Operation(op)
	if !ok {
		t.Fatalf("no operation %s", op)
	}
	var meta healthcare.OperationMetadata
	if err := json.Unmarshal(o.Metadata, &meta); err != nil || meta.Counter == nil {
		t.Fatalf("operation %s metadata %s: %v", op, o.Metadata, err)
	}
	return *meta.Counter
}

// pending is the shape of pending/{pipeline}.json this test reads and writes.
type pending struct {
	Run       string            `json:"run"`
	Trigger   events.TriggerRef `json:"trigger"`
	Pipeline  string            `json:"pipeline"`
	Store     string            `json:"store"`
	Name      string            `json:"name,omitempty"`
	Slot      int               `json:"slot"`
	Started   time.Time         `json:"started"`
	Operation string            `json:"operation,omitempty"`
	Cancelled string            `json:"cancelled,omitempty"`
	Spec      json.RawMessage   `json:"spec,omitempty"`
}

func TestStatus(t *testing.T) {
	t.Parallel()
	s := newStack(t)
	key, _, running := twoRuns(t, s)
	// An orphaned start lock: no operation, five minutes old.
	s.put(t, "pending/n-orphan.json", pending{Run: "r-orphan", Trigger: events.TriggerRef{Source: "//test", ID: "lost"},
		Pipeline: "n-orphan", Store: store, Name: "orphan", Slot: -1, Started: s.now.Add(-5 * time.Minute)}, map[string]string{"run": "r-orphan"})
	// A follow-up queued behind the running run.
	s.put(t, "queue/"+key+".json", map[string]any{"run": "r-next", "trigger": map[string]string{"source": "//test", "id": "third"},
		"pipeline": key, "store": store, "destination": "gs://exports/hourly", "slot": -1, "started": time.Time{},
		"enqueued": s.now.Add(-90 * time.Second), "coalesced": []map[string]string{{"source": "//test", "id": "fourth"}}}, nil)

	out := s.ok(t, "status")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "PIPELINE") {
		t.Fatalf("status printed:\n%s\nwant a header and two pipelines", out)
	}
	row := func(prefix string) string {
		for _, l := range lines {
			if strings.HasPrefix(l, prefix+" ") {
				return l
			}
		}
		t.Fatalf("no row for %s in:\n%s", prefix, out)
		return ""
	}
	var wm struct{ Watermark string }
	s.get(t, "watermarks/"+key+".json", &wm)
	var lock pending
	s.get(t, "pending/"+key+".json", &lock)
	c := counters(t, s, lock.Operation)
	if c.Success == 0 || c.Pending == 0 {
		t.Fatalf("operation counters %+v; want an export half way", c)
	}
	progress := fmt.Sprintf(`running \d+s \(%d%% %d ok/0 failed/%d pending\)`, c.Success*100/(c.Success+c.Pending), c.Success, c.Pending)
	for _, re := range []string{`hourly`, `d/s`, `gs://exports/hourly`, regexp.QuoteMeta(wm.Watermark), `succeeded \d+s ago`,
		progress, `queued 1m \+1 coalesced`} {
		if !regexp.MustCompile(re).MatchString(row(key)) {
			t.Errorf("hourly row lacks %s:\n%s", re, row(key))
		}
	}
	if r := row("n-orphan"); !strings.Contains(r, "starting 5m ORPHANED (no operation)") || !strings.Contains(r, "orphan") {
		t.Errorf("orphaned start lock not shown with its age:\n%s", r)
	}

	var got []export.PipelineStatus
	if err := json.Unmarshal([]byte(s.ok(t, "status", "--json")), &got); err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Pipeline != key || got[1].Pipeline != "n-orphan" {
		t.Fatalf("status --json = %+v", got)
	}
	h, o := got[0], got[1]
	if h.Watermark != wm.Watermark || h.Lock == nil || h.Lock.Run != running || h.Lock.Operation != lock.Operation ||
		h.Lock.Progress == nil || h.Lock.Progress.Pending != c.Pending || h.Lock.Progress.Success != c.Success || h.Queued == nil || h.Queued.Run != "r-next" || h.Last == nil || h.Last.Outcome != "succeeded" {
		t.Errorf("hourly in JSON does not match the state: %+v (lock %+v)", h, h.Lock)
	}
	if o.Lock == nil || !o.Lock.Orphaned || o.Lock.State != "starting" || o.Lock.Age != "5m0s" {
		t.Errorf("orphan in JSON = %+v; want an orphaned start lock aged 5m0s", o.Lock)
	}

	// An empty bucket: nothing, and [] for scripts.
	s.env["FHIREXPORT_STATE"] = "gs://state/empty"
	if out := s.ok(t, "status", "--json"); strings.TrimSpace(out) != "[]" {
		t.Errorf("status --json on an empty bucket = %q, want []", out)
	}
}

func TestRunsAndShow(t *testing.T) {
	t.Parallel()
	s := newStack(t)
	key, done, running := twoRuns(t, s)

	out := s.ok(t, "runs")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[1], running) || !strings.Contains(lines[1], "running") ||
		!strings.HasPrefix(lines[2], done) || !strings.Contains(lines[2], "succeeded") {
		t.Errorf("runs printed:\n%s\nwant the running run, then the done one", out)
	}
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"--status", "done"}, []string{done}},
		{[]string{"--status", "running"}, []string{running}},
		{[]string{"--pipeline", key, "--limit", "1"}, []string{running}},
		{[]string{"--pipeline", "n-other"}, nil},
		{[]string{"--since", "1h"}, []string{running, done}},
		{[]string{"--since", s.now.Add(time.Hour).Format(time.RFC3339)}, nil},
	} {
		var runs []export.Run
		if err := json.Unmarshal([]byte(s.ok(t, append([]string{"runs", "--json"}, tc.args...)...)), &runs); err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, r := range runs {
			ids = append(ids, r.ID)
		}
		if diff := cmp.Diff(tc.want, ids); diff != "" {
			t.Errorf("runs %s (-want +got):\n%s", tc.args, diff)
		}
	}
	s.fails(t, 2, "--status", "runs", "--status", "bogus")
	s.fails(t, 2, "--since", "runs", "--since", "yesterday")

	// show, by run id, trigger id and operation.
	var lock pending
	s.get(t, "pending/"+key+".json", &lock)
	for _, id := range []string{running, "second", lock.Operation} {
		out := s.ok(t, "show", id)
		c := counters(t, s, lock.Operation)
		for _, want := range []string{"run          " + running, "second", lock.Operation, "lock", "running for", fmt.Sprintf("%d ok/0 failed/%d pending", c.Success, c.Pending), `"fhirStore":"` + store} {
			if !strings.Contains(out, want) {
				t.Errorf("show %s lacks %q:\n%s", id, want, out)
			}
		}
	}
	var d export.RunDetail
	if err := json.Unmarshal([]byte(s.ok(t, "show", "first", "--json")), &d); err != nil {
		t.Fatal(err)
	}
	if d.Run.ID != done || d.Run.Status != "done" || d.Run.Outcome != "succeeded" || d.Run.Started == nil || d.Run.Started.Type != events.TypeStarted || d.Lock != nil {
		t.Errorf("show first --json = %+v", d)
	}
	s.fails(t, 1, "no such run", "show", "nope")
	s.fails(t, 2, "one argument", "show")
	s.fails(t, 2, "one argument", "show", "a", "b")
}

func TestCancel(t *testing.T) {
	t.Parallel()
	s := newStack(t)
	key, done, running := twoRuns(t, s)
	var lock pending
	s.get(t, "pending/"+key+".json", &lock)

	s.fails(t, 1, "not running", "cancel", done)
	out := s.ok(t, "cancel", "second")
	if !strings.Contains(out, "cancel requested for operation "+lock.Operation) {
		t.Errorf("cancel printed %q", out)
	}
	var cancels []string
	for _, r := range s.emu.Requests() {
		if r.APIMethod == "operations.cancel" {
			cancels = append(cancels, r.Method+" "+r.Path)
		}
	}
	if diff := cmp.Diff([]string{"POST /v1/" + lock.Operation + ":cancel"}, cancels); diff != "" {
		t.Errorf("operations.cancel requests (-want +got):\n%s", diff)
	}
	s.get(t, "pending/"+key+".json", &lock)
	if lock.Cancelled != "operator" || lock.Run != running {
		t.Errorf("lock after cancel = %+v; want Cancelled operator", lock)
	}
	if op, _ := s.emu.Operation(lock.Operation); op == nil || !op.Done || op.Error == nil || op.Error.Code != 1 {
		t.Errorf("operation after cancel = %+v; want done with 1 CANCELLED", op)
	}

	s.fails(t, 1, "already finished", "cancel", running)

	// The next sweep reports it failed and frees the pipeline.
	s.poll(t)
	var d export.RunDetail
	if err := json.Unmarshal([]byte(s.ok(t, "show", running, "--json")), &d); err != nil {
		t.Fatal(err)
	}
	if d.Run.Outcome != "failed" || d.Lock != nil {
		t.Errorf("after the sweep: %+v; want failed, lock freed", d.Run)
	}
	if out := s.ok(t, "status"); !strings.Contains(out, "idle") {
		t.Errorf("status after the cancelled run ended:\n%s\nwant the pipeline idle", out)
	}
	s.fails(t, 1, "not running", "cancel", running)

	// A start lock without an operation has nothing to cancel yet.
	s.put(t, "pending/"+key+".json", pending{Run: "r-start", Pipeline: key, Store: store, Slot: -1, Started: s.now.Add(-time.Minute)}, map[string]string{"run": "r-start"})
	s.fails(t, 1, "starting for 1m0s and has no operation yet", "cancel", "r-start")
}

func TestRerun(t *testing.T) {
	t.Parallel()
	s := newStack(t)
	spec := json.RawMessage(`{"fhirStore":"` + store + `","name":"hourly","incremental":true,"gcsDestination":{"uriPrefix":"gs://exports/hourly"}}`)
	s.put(t, "runs/r-spec.json", map[string]any{"trigger": map[string]string{"source": "//test", "id": "t1"}, "pipeline": "n-x",
		"status": "done", "claimed": s.now.Add(-time.Hour), "spec": spec, "operation": location + "/datasets/d/operations/5", "outcome": events.TypeSucceeded}, nil)
	s.put(t, "runs/r-old.json", map[string]any{"trigger": map[string]string{"source": "//test", "id": "t0"}, "pipeline": "n-x",
		"status": "done", "claimed": s.now.Add(-2 * time.Hour)}, nil)

	s.fails(t, 2, "no requests topic", "rerun", "r-spec")
	s.fails(t, 1, "no stored spec", "rerun", "r-old", "--topic", requestsTopic)

	out := s.ok(t, "rerun", "t1", "--topic", requestsTopic)
	msgs := s.ps.Messages()
	if len(msgs) != 1 {
		t.Fatalf("%d messages published, want 1", len(msgs))
	}
	m := msgs[0]
	if string(m.Data) != string(spec) || m.Attributes["fhirexport-rerun-of"] != "r-spec" || m.ID == "" {
		t.Errorf("published %s %v; want the run's spec", m.Data, m.Attributes)
	}
	if !strings.Contains(out, "as message "+m.ID) {
		t.Errorf("rerun printed %q; want the new message id %s", out, m.ID)
	}
	// A short topic name takes the project.
	s.env["FHIREXPORT_REQUESTS_TOPIC"] = "fhirexport-requests"
	s.fails(t, 2, "short name", "rerun", "r-spec")
	s.ok(t, "rerun", "r-spec", "--project", "test-project")
	if n := len(s.ps.Messages()); n != 2 {
		t.Errorf("%d messages after the second rerun, want 2", n)
	}
}

func TestWatermark(t *testing.T) {
	t.Parallel()
	s := newStack(t)
	done := s.trigger(t, "first", hourly)
	s.poll(t)
	spec, _ := json.Marshal(hourly)
	parsed, _ := export.ParseSpec(spec)
	key := export.PipelineKey(parsed)
	var wm struct{ Watermark string }
	s.get(t, "watermarks/"+key+".json", &wm)
	if wm.Watermark == "" || done == "" {
		t.Fatal("the first run set no watermark")
	}

	byName := []string{"--store", store, "--name", "hourly"}
	for _, args := range [][]string{{key}, byName} {
		out := s.ok(t, append([]string{"watermark", "show"}, args...)...)
		if !strings.Contains(out, wm.Watermark) || !strings.Contains(out, key+" (hourly)") {
			t.Errorf("watermark show %s:\n%s", args, out)
		}
	}
	var shown export.Watermark
	if err := json.Unmarshal([]byte(s.ok(t, "--json", "watermark", "show", key)), &shown); err != nil {
		t.Fatal(err)
	}
	if shown.Watermark != wm.Watermark || shown.Store != store || shown.Name != "hourly" {
		t.Errorf("watermark show --json = %+v", shown)
	}

	out := s.ok(t, "watermark", "set", key, "--to", "2026-01-01T02:00:00+02:00")
	if want := fmt.Sprintf("  old: %s\n  new: 2026-01-01T00:00:00Z\n", wm.Watermark); !strings.Contains(out, want) {
		t.Errorf("watermark set printed:\n%s\nwant:\n%s", out, want)
	}
	s.get(t, "watermarks/"+key+".json", &wm)
	if wm.Watermark != "2026-01-01T00:00:00Z" {
		t.Errorf("stored watermark %q after set", wm.Watermark)
	}

	// A run in progress blocks changes unless forced.
	s.put(t, "pending/"+key+".json", pending{Run: "r", Pipeline: key, Store: store, Slot: -1, Started: s.now, Operation: location + "/datasets/d/operations/9"},
		map[string]string{"run": "r", "operation": location + "/datasets/d/operations/9"})
	s.fails(t, 1, "--force", "watermark", "reset", key)
	out = s.ok(t, "watermark", "reset", "--force", key)
	if !strings.Contains(out, "old: 2026-01-01T00:00:00Z") || !strings.Contains(out, "new: none") {
		t.Errorf("watermark reset printed:\n%s", out)
	}
	if _, err := s.gcs.GetObject("state", "fx/watermarks/"+key+".json"); err == nil {
		t.Error("the watermark is still stored after reset")
	}

	s.fails(t, 1, "unknown pipeline", "watermark", "show", "n-nothing")
	s.fails(t, 1, "unknown pipeline", "watermark", "set", "--store", store, "--name", "never", "--to", "2026-01-01T00:00:00Z")
	s.fails(t, 2, "--to", "watermark", "set", key, "--to", "yesterday")
	s.fails(t, 2, "needs --to", "watermark", "set", key)
	s.fails(t, 2, "name one pipeline", "watermark", "show")
	s.fails(t, 2, "go together", "watermark", "show", "--store", store)
	s.fails(t, 2, "show, set or reset", "watermark", "move", key)
	s.fails(t, 2, "unknown flag: --to", "watermark", "show", key, "--to", "2026-01-01T00:00:00Z")
}

func TestUsage(t *testing.T) {
	t.Parallel()
	s := newStack(t)
	for _, args := range [][]string{
		{"--help"}, {"-h"}, {"help"}, {"status", "--help"}, {"runs", "-h"}, {"show", "--help"}, {"cancel", "--help"},
		{"rerun", "--help"}, {"watermark", "--help"}, {"watermark", "set", "--help"}, {"help", "runs"}, {"help", "watermark", "set"},
	} {
		out, errOut, code := s.fhirexport(args...)
		if code != 0 || strings.Count(out, "Usage:") != 1 || errOut != "" {
			t.Errorf("fhirexport %s: exit %d, stderr %q, stdout:\n%s\nwant usage once on stdout, exit 0", args, code, errOut, out)
		}
	}
	// Each default is shown once, by the variable it comes from, even when
	// the variable is set.
	out := s.ok(t, "status", "--help")
	for _, line := range strings.Split(out, "\n") {
		if strings.Count(line, "(default") > 1 || strings.Contains(line, stateLoc) {
			t.Errorf("status --help shows a default twice or the environment's value:\n%s", line)
		}
	}
	for _, want := range []string{"(default $FHIREXPORT_STATE)", "(default $FHIREXPORT_HEALTHCARE_ENDPOINT)", "(default 168h0m0s)"} {
		if strings.Count(out, want) != 1 {
			t.Errorf("status --help shows %q %d times, want once:\n%s", want, strings.Count(out, want), out)
		}
	}
	if out := s.ok(t, "help", "watermark", "set"); !strings.Contains(out, "--to TIME") || !strings.Contains(out, "--force") {
		t.Errorf("help watermark set lacks its flags:\n%s", out)
	}
	if out := s.ok(t, "--help"); !regexp.MustCompile(`(?m)^  status +every pipeline`).MatchString(out) || !strings.Contains(out, "completion") {
		t.Errorf("fhirexport --help does not list the verbs and completion:\n%s", out)
	}
	// Shell completion, for free.
	if out := s.ok(t, "completion", "bash"); !strings.Contains(out, "__start_fhirexport") {
		t.Errorf("completion bash printed no completion script:\n%.300s", out)
	}
	if out := s.ok(t, "__complete", "watermark", ""); !strings.Contains(out, "reset") || !strings.Contains(out, "set") {
		t.Errorf("completing 'watermark ' offers %q", out)
	}

	// A mistake prints the error and a one-line hint on stderr, no usage.
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "fhirexport: no verb given\nRun 'fhirexport --help' for usage.\n"},
		{[]string{"frobnicate"}, "fhirexport: unknown verb \"frobnicate\"\nRun 'fhirexport --help' for usage.\n"},
		{[]string{"statsu"}, "fhirexport: unknown verb \"statsu\"; did you mean status?\nRun 'fhirexport --help' for usage.\n"},
		{[]string{"status", "--bogus"}, "fhirexport: unknown flag: --bogus\nRun 'fhirexport status --help' for usage.\n"},
		{[]string{"--bogus", "status"}, "fhirexport: unknown flag: --bogus\nRun 'fhirexport --help' for usage.\n"},
		{[]string{"watermark", "set", "k", "--bogus"}, "fhirexport: unknown flag: --bogus\nRun 'fhirexport watermark set --help' for usage.\n"},
		{[]string{"status", "extra"}, "fhirexport: status takes no arguments, got [\"extra\"]\nRun 'fhirexport status --help' for usage.\n"},
		{[]string{"runs", "--limit"}, "fhirexport: flag needs an argument: --limit\nRun 'fhirexport runs --help' for usage.\n"},
	} {
		out, errOut, code := s.fhirexport(tc.args...)
		if code != 2 || out != "" || errOut != tc.want {
			t.Errorf("fhirexport %q: exit %d, stdout %q, stderr:\n%s\nwant exit 2, nothing on stdout, stderr:\n%s", tc.args, code, out, errOut, tc.want)
		}
	}
	s.fails(t, 2, "not a Cloud Storage location", "status", "--state", "/tmp/x")
	s.fails(t, 2, "not a base URL", "status", "--healthcare-endpoint", "localhost:1")
	delete(s.env, "FHIREXPORT_STATE")
	s.fails(t, 2, "FHIREXPORT_STATE", "status")
	// Global flags go before or after the verb.
	s.ok(t, "--state", stateLoc, "status")
	s.ok(t, "status", "--state", stateLoc, "--json")
}

// TestShowFinishedRuns: show prints how a run ended, as its final event
// told: the type, counters, error, manifest and watermark, for a run that
// succeeded and for one an operator cancelled.
func TestShowFinishedRuns(t *testing.T) {
	t.Parallel()
	s := newStack(t)
	key, done, running := twoRuns(t, s)
	var wm struct{ Watermark string }
	s.get(t, "watermarks/"+key+".json", &wm)
	s.ok(t, "cancel", running)
	s.poll(t)

	var d export.RunDetail
	if err := json.Unmarshal([]byte(s.ok(t, "show", done, "--json")), &d); err != nil {
		t.Fatal(err)
	}
	f := d.Run.Final
	if f == nil || f.Type != events.TypeSucceeded || f.Data.Counters == nil || f.Data.Counters.Success == 0 || f.Data.Manifest == "" || f.Data.Watermark != wm.Watermark {
		t.Fatalf("show %s --json: final event %+v; want the succeeded event with counters, manifest and watermark", done, f)
	}
	out := s.ok(t, "show", done)
	for k, want := range map[string]string{
		"status":      "done, succeeded",
		"final event": "succeeded " + f.ID + " at " + f.Time.UTC().Format(time.RFC3339),
		"counters":    fmt.Sprintf("%d ok/0 failed/0 pending", f.Data.Counters.Success),
		"manifest":    f.Data.Manifest,
		"watermark":   wm.Watermark,
	} {
		if got := field(out, k); got != want {
			t.Errorf("show of a succeeded run: %s %q, want %q:\n%s", k, got, want, out)
		}
	}

	out = s.ok(t, "show", running)
	for _, re := range []string{
		`status +done, failed\n`,
		`final event +failed [0-9a-f]+ at \S+: error 1 .*cancel`,
		`counters +\d+ ok/0 failed/\d+ pending\n`,
	} {
		if !regexp.MustCompile(re).MatchString(out) {
			t.Errorf("show of a cancelled run lacks %s:\n%s", re, out)
		}
	}
}

// TestStatusShowsTheLatestDestination: runs of one pipeline write to
// different destinations ({run} in the prefix); status shows the latest
// run's, every time.
func TestStatusShowsTheLatestDestination(t *testing.T) {
	t.Parallel()
	s := newStack(t)
	spec := map[string]any{"fhirStore": store, "name": "daily", "gcsDestination": map[string]any{"uriPrefix": "gs://exports/daily/{run}"}}
	var last string
	for i := range 4 {
		last = s.trigger(t, fmt.Sprintf("day-%d", i), spec)
		s.poll(t)
		s.clock.Advance(time.Minute)
	}
	want := "gs://exports/daily/" + last[:16]
	for range 8 {
		var ps []export.PipelineStatus
		if err := json.Unmarshal([]byte(s.ok(t, "status", "--json")), &ps); err != nil {
			t.Fatal(err)
		}
		if len(ps) != 1 || ps[0].Destination != want {
			t.Fatalf("status shows destination %q; want the latest run's, %s", ps[0].Destination, want)
		}
	}
	if out := s.ok(t, "status"); !strings.Contains(out, want) {
		t.Errorf("status table lacks %s:\n%s", want, out)
	}
}

// TestShowWithoutHealthcareCredentials: show and status print what the state
// bucket knows when no Healthcare client can be made, and say that progress
// is unavailable.
func TestShowWithoutHealthcareCredentials(t *testing.T) {
	t.Parallel()
	s := newStack(t)
	_, done, running := twoRuns(t, s)
	delete(s.env, "FHIREXPORT_HEALTHCARE_ENDPOINT")
	s.hcOpts = []option.ClientOption{option.WithCredentialsFile(filepath.Join(t.TempDir(), "no-such-credentials.json"))}

	if out := s.ok(t, "show", done); !strings.HasPrefix(field(out, "final event"), "succeeded") {
		t.Errorf("show of a finished run without credentials:\n%s", out)
	}
	out := s.ok(t, "show", running)
	if !strings.HasPrefix(field(out, "progress"), "unavailable: no Healthcare API client") || !strings.HasPrefix(field(out, "operation"), "projects/") {
		t.Errorf("show of a running run without credentials does not say progress is unavailable:\n%s", out)
	}
	if out := s.ok(t, "status"); !strings.Contains(out, "(progress unavailable: no Healthcare API client)") {
		t.Errorf("status without credentials:\n%s", out)
	}
	s.fails(t, 1, "healthcare client", "cancel", running)
}

// TestRejectedTriggers: a rejected trigger is recorded with its event, so
// show finds it by trigger id and runs --status rejected lists it.
func TestRejectedTriggers(t *testing.T) {
	t.Parallel()
	s := newStack(t)
	key, _, _ := twoRuns(t, s)
	foreign := map[string]any{"fhirStore": store, "name": "leak", "gcsDestination": map[string]any{"uriPrefix": "gs://someone-else/x"}}
	rejected := s.trigger(t, "bad-destination", foreign)
	if err := s.x.Start(context.Background(), events.Trigger{Source: "//test", ID: "not-json", Spec: []byte("{nope")}, nil); err != nil {
		t.Fatal(err)
	}

	out := s.ok(t, "show", "bad-destination")
	for _, re := range []string{`run +` + rejected, `status +rejected\n`, `final event +rejected [0-9a-f]+ at \S+: error 7 .*gs://someone-else/x`} {
		if !regexp.MustCompile(re).MatchString(out) {
			t.Errorf("show of a rejected trigger lacks %s:\n%s", re, out)
		}
	}
	if out := s.ok(t, "show", "not-json"); !regexp.MustCompile(`final event +rejected .*error 3 `).MatchString(out) {
		t.Errorf("show of an undecodable trigger:\n%s", out)
	}
	var runs []export.Run
	if err := json.Unmarshal([]byte(s.ok(t, "runs", "--status", "rejected", "--json")), &runs); err != nil {
		t.Fatal(err)
	}
	var triggers []string
	for _, r := range runs {
		triggers = append(triggers, r.Trigger.ID)
	}
	slices.Sort(triggers)
	if diff := cmp.Diff([]string{"bad-destination", "not-json"}, triggers); diff != "" {
		t.Errorf("runs --status rejected (-want +got):\n%s", diff)
	}
	// Rejected triggers invent no pipelines.
	var ps []export.PipelineStatus
	if err := json.Unmarshal([]byte(s.ok(t, "status", "--json")), &ps); err != nil {
		t.Fatal(err)
	}
	if len(ps) != 1 || ps[0].Pipeline != key {
		t.Errorf("status after rejections lists %+v; want only %s", ps, key)
	}
}

// TestShortNamesAreAccepted: runs prints the operation as DATASET/ID and
// destinations carry the run id's first 16 digits; show, cancel and rerun
// take both back.
func TestShortNamesAreAccepted(t *testing.T) {
	t.Parallel()
	s := newStack(t)
	_, done, running := twoRuns(t, s)
	out := s.ok(t, "runs")
	var shortOp string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, running) {
			shortOp = regexp.MustCompile(`\bd/\d+\b`).FindString(l)
		}
	}
	if shortOp == "" {
		t.Fatalf("runs prints no DATASET/ID operation for %s:\n%s", running, out)
	}
	for _, tc := range []struct{ name, arg, want string }{
		{"short operation", shortOp, running},
		{"run id prefix", running[:16], running},
		{"done run id prefix", done[:16], done},
	} {
		out, errOut, code := s.fhirexport("show", tc.arg)
		if code != 0 || field(out, "run") != tc.want {
			t.Errorf("%s: show %s: exit %d %s\n%s", tc.name, tc.arg, code, errOut, out)
		}
	}
	s.fails(t, 1, "no such run", "show", "ffffffffffffffff")
	s.fails(t, 1, "no such run", "show", "d/1")
	out = s.ok(t, "cancel", shortOp)
	if !strings.Contains(out, "cancel requested") {
		t.Errorf("cancel %s: %s", shortOp, out)
	}
}

// TestWatermarkSetNeedsAnIncrementalPipeline: a watermark on a pipeline that
// never reads one is refused, saying why.
func TestWatermarkSetNeedsAnIncrementalPipeline(t *testing.T) {
	t.Parallel()
	s := newStack(t)
	full := map[string]any{"fhirStore": store, "name": "nightly", "gcsDestination": map[string]any{"uriPrefix": "gs://exports/nightly"}}
	s.trigger(t, "n1", full)
	s.poll(t)
	s.fails(t, 1, "is not incremental", "watermark", "set", "--store", store, "--name", "nightly", "--to", "2026-01-01T00:00:00Z")
	if _, err := s.gcs.GetObject("state", "fx/watermarks/"+mustKey(t, full)+".json"); err == nil {
		t.Error("a watermark was stored for a pipeline that is not incremental")
	}
	if out := s.ok(t, "status"); regexp.MustCompile(`2026-01-01`).MatchString(out) {
		t.Errorf("status shows a watermark:\n%s", out)
	}
	// reset is harmless there, and an incremental pipeline may be set.
	s.ok(t, "watermark", "reset", "--store", store, "--name", "nightly")
	s.trigger(t, "h1", hourly)
	s.poll(t)
	s.ok(t, "watermark", "set", "--store", store, "--name", "hourly", "--to", "2026-01-01T00:00:00Z")
}

// field is the value of a row of show's table.
func field(out, key string) string {
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(key) + `  +(.*)$`).FindStringSubmatch(out)
	if m == nil {
		return ""
	}
	return m[1]
}

func mustKey(t *testing.T, spec map[string]any) string {
	t.Helper()
	data, _ := json.Marshal(spec)
	parsed, err := export.ParseSpec(data)
	if err != nil {
		t.Fatal(err)
	}
	return export.PipelineKey(parsed)
}

// TestStatusOnAnEmptyLocation: a --state with nothing under it says so, and
// one whose bucket does not exist is an error.
func TestStatusOnAnEmptyLocation(t *testing.T) {
	t.Parallel()
	s := newStack(t)
	twoRuns(t, s)
	out, errOut, code := s.fhirexport("status", "--state", "gs://state/typo")
	if code != 0 || !strings.Contains(errOut, "nothing is stored under gs://state/typo") || !strings.Contains(out, "no pipelines") {
		t.Errorf("status on an empty prefix: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	out, errOut, code = s.fhirexport("runs", "--state", "gs://state/typo")
	if code != 0 || !strings.Contains(errOut, "nothing is stored under gs://state/typo") {
		t.Errorf("runs on an empty prefix: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	for _, args := range [][]string{{"status"}, {"status", "--json"}, {"runs"}} {
		s.fails(t, 1, "state location gs://no-such-bucket/fx: gs://no-such-bucket: bucket does not exist", append(args, "--state", "gs://no-such-bucket/fx")...)
	}
	// A location holding state says nothing of the kind, even when a
	// filter matches nothing.
	if _, errOut, _ := s.fhirexport("runs", "--pipeline", "n-none"); errOut != "" {
		t.Errorf("runs with an empty answer from a real location: stderr %q", errOut)
	}
}

// TestOperatingReadme runs the README's "Operating fhirexport" transcript
// against the local emulators and checks that the README shows exactly what
// the command prints: status, runs, cancel, show of the failed run with its
// error, rerun and watermark.
func TestOperatingReadme(t *testing.T) {
	t.Parallel()
	s := newStackWith(t, true)
	var tr strings.Builder
	cmd := func(args ...string) {
		t.Helper()
		out, errOut, code := s.fhirexport(args...)
		if code != 0 {
			t.Fatalf("fhirexport %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errOut)
		}
		if tr.Len() > 0 {
			tr.WriteString("\n")
		}
		fmt.Fprintf(&tr, "$ fhirexport %s\n%s", strings.Join(args, " "), out)
	}
	note := func(s string) { fmt.Fprintf(&tr, "\n# %s", s) }
	key, _, running := twoRuns(t, s)

	cmd("status")
	note("recent runs, newest first; RUN and OPERATION are taken back as printed")
	cmd("runs")
	note("the second run is taking too long: cancel it")
	cmd("cancel", running[:16])
	s.poll(t)
	note("after the next poll sweep (every minute)")
	cmd("show", "second")
	cmd("rerun", running[:16], "--topic", requestsTopic)
	note("re-export the last day with the next run")
	cmd("watermark", "show", key)
	cmd("watermark", "set", key, "--to", "2026-11-25T00:00:00Z")

	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, block, ok := strings.Cut(string(readme), "```console operating\n")
	block, _, _ = strings.Cut(block, "```")
	if !ok {
		t.Fatalf("README.md has no ```console operating block; it should read:\n%s", tr.String())
	}
	if d := cmp.Diff(tr.String(), block); d != "" {
		t.Errorf("README's operating transcript differs from the command's output (-command +README):\n%s\nThe block should read:\n%s", d, tr.String())
	}
}
