package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	cloudevents "github.com/cloudevents/sdk-go/v2"
	gocmp "github.com/google/go-cmp/cmp"

	"github.com/fhirexport/fhirexport/events"
	"github.com/fhirexport/fhirexport/export"
	"github.com/fhirexport/fhirexport/export/mirror"
	"github.com/fhirexport/fhirexport/healthcaretest"
	"github.com/fhirexport/fhirexport/healthcaretest/stacktest"
)

const changesTopic = "projects/test-project/topics/fhirexport-changes"

// feedStack is the local stack with the store's change notifications
// recorded by RecordChange, as deploy.sh wires them, and a front on Cloud
// Storage that can fail or interrupt the feed's downloads.
type feedStack struct {
	*stack
	st *stacktest.Stack

	mu        sync.Mutex
	delivered map[string]bool
	// fault, when set, sees every Cloud Storage request first; true answers
	// it 503.
	fault func(*http.Request) bool
}

func newFeedStack(t *testing.T) *feedStack {
	t.Helper()
	fs := &feedStack{delivered: map[string]bool{}}
	clock := healthcaretest.NewFakeClock(time.Date(2026, 11, 26, 0, 0, 0, 0, time.UTC))
	s := stacktest.New(t, stacktest.Options{
		Buckets: []string{"state", "exports"},
		Topics:  []string{eventsTopic, changesTopic},
		WrapGCS: func(next http.Handler) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				fs.mu.Lock()
				fault := fs.fault
				fs.mu.Unlock()
				if fault != nil && fault(r) {
					http.Error(w, "injected fault", http.StatusServiceUnavailable)
					return
				}
				next.ServeHTTP(w, r)
			})
		},
		Healthcare: healthcaretest.Options{Clock: clock, DeterministicIDs: true},
	})
	for _, err := range []error{
		s.Healthcare.CreateDataset(location + "/datasets/d"),
		s.Healthcare.CreateFHIRStore(store, "R4"),
		s.Healthcare.SetNotificationConfigs(store, healthcaretest.NotificationConfig{PubsubTopic: changesTopic}),
	} {
		if err != nil {
			t.Fatal(err)
		}
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
	x := export.New(s.HealthcareService, export.NewState(s.Storage, "state", "fx"), pub, policy, nil)
	x.FileURL = export.EmulatorFileURL(s.GCSURL)
	fs.stack = &stack{gcs: s.GCS, emu: s.Healthcare, clock: clock, ps: s.Pstest, x: x,
		env: map[string]string{
			"FHIREXPORT_STATE":               stateLoc,
			"FHIREXPORT_HEALTHCARE_ENDPOINT": s.Healthcare.URL,
			"STORAGE_EMULATOR_HOST":          s.GCSURL,
			"PUBSUB_EMULATOR_HOST":           s.PubSubAddr,
		},
		now: time.Date(2026, 11, 27, 0, 0, 0, 0, time.UTC),
	}
	fs.st = s
	return fs
}

func (s *feedStack) setFault(f func(*http.Request) bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fault = f
}

// deliver hands every change notification not yet delivered to RecordChange,
// as the push subscription would.
func (s *feedStack) deliver(t *testing.T) {
	t.Helper()
	for _, m := range s.ps.Messages() {
		if m.Topic != changesTopic || s.delivered[m.ID] {
			continue
		}
		s.delivered[m.ID] = true
		e := cloudevents.NewEvent()
		e.SetID(m.ID)
		e.SetSource("//pubsub.googleapis.com/" + changesTopic)
		e.SetType(events.MessagePublishedType)
		e.SetData(cloudevents.ApplicationJSON, events.MessagePublishedData{Message: events.PubsubMessage{
			Data: m.Data, Attributes: m.Attributes, MessageID: m.ID, PublishTime: m.PublishTime}})
		n, err := events.DecodeNotification(e)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.x.RecordChange(context.Background(), n); err != nil {
			t.Fatal(err)
		}
	}
}

// exportRun runs the hourly pipeline once to its end: the store's
// notifications recorded first, the clock moved on after.
func (s *feedStack) exportRun(t *testing.T, trigger string) string {
	t.Helper()
	s.deliver(t)
	return s.exportRunLate(t, trigger)
}

// exportRunLate runs the pipeline once with the store's latest notifications
// not yet recorded: RecordChange is late.
func (s *feedStack) exportRunLate(t *testing.T, trigger string) string {
	t.Helper()
	s.clock.Advance(time.Minute)
	run := s.trigger(t, trigger, hourly)
	s.poll(t)
	var rec struct {
		Status string `json:"status"`
	}
	s.get(t, "runs/"+run+".json", &rec)
	if rec.Status != "done" {
		t.Fatalf("run %s: status %s after a poll; want done", trigger, rec.Status)
	}
	s.clock.Advance(time.Minute)
	return run
}

func (s *feedStack) put(t *testing.T, res string) {
	t.Helper()
	if _, err := s.emu.PutResource(store, []byte(res)); err != nil {
		t.Fatal(err)
	}
}

func (s *feedStack) del(t *testing.T, typ, id string) {
	t.Helper()
	if err := s.emu.DeleteResource(store, typ, id); err != nil {
		t.Fatal(err)
	}
}

// first returns the id of the store's first resource of typ, and the
// resource.
func (s *feedStack) first(t *testing.T, typ string) (string, map[string]any) {
	t.Helper()
	for _, raw := range s.emu.Resources(store) {
		var r map[string]any
		json.Unmarshal(raw, &r)
		if r["resourceType"] == typ {
			return r["id"].(string), r
		}
	}
	t.Fatalf("no %s in the store", typ)
	return "", nil
}

// storeFiles is what a mirror of the store must hold: its resources at
// their current versions, one file per type, sorted by id.
func (s *feedStack) storeFiles(t *testing.T) map[string]string {
	t.Helper()
	byType := map[string][][]byte{}
	for _, raw := range s.emu.Resources(store) {
		var h struct{ ResourceType, ID string }
		json.Unmarshal(raw, &h)
		var b bytes.Buffer
		json.Compact(&b, raw)
		byType[h.ResourceType] = append(byType[h.ResourceType], b.Bytes())
	}
	out := map[string]string{}
	for typ, lines := range byType {
		slices.SortFunc(lines, func(a, b []byte) int { return cmp.Compare(idOf(a), idOf(b)) })
		out[typ+".ndjson"] = string(bytes.Join(lines, []byte("\n"))) + "\n"
	}
	return out
}

func idOf(line []byte) string {
	var h struct{ ID string }
	json.Unmarshal(line, &h)
	return h.ID
}

// mirrorFiles reads a mirror folder: every file when all, else the type files.
func mirrorFiles(t *testing.T, dir string, all bool) map[string]string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") || (!all && (e.Name() == mirror.CursorFile || e.Name() == mirror.ChangesFile)) {
			continue
		}
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = string(data)
	}
	return out
}

// pull runs feed pull with --json and decodes its summary.
func (s *feedStack) pull(t *testing.T, ctx context.Context, dir string, extra ...string) (pullSummary, string, int) {
	t.Helper()
	var out, errOut bytes.Buffer
	c := config{getenv: func(k string) string { return s.env[k] }, now: func() time.Time { return s.now }}
	args := append([]string{"feed", "pull", "--store", store, "--name", "hourly", "--dir", dir, "--json", "--changes"}, extra...)
	code := c.run(ctx, args, &out, &errOut)
	var sum pullSummary
	if err := json.Unmarshal(out.Bytes(), &sum); err != nil {
		t.Fatalf("fhirexport %s: exit %d, stdout is not a summary: %v\n%s%s", strings.Join(args, " "), code, err, out.String(), errOut.String())
	}
	return sum, errOut.String(), code
}

func appliedRuns(s pullSummary) []string {
	var ids []string
	for _, r := range s.Applied {
		ids = append(ids, r.Run)
	}
	return ids
}

// matchesStore checks that dir holds exactly the store's resources.
func (s *feedStack) matchesStore(t *testing.T, dir string) {
	t.Helper()
	if d := gocmp.Diff(s.storeFiles(t), mirrorFiles(t, dir, false)); d != "" {
		t.Errorf("%s differs from the store (-store +mirror):\n%s", dir, d)
	}
}

// TestFeedPull replays the feed of a pipeline through full, incremental,
// failed and partial runs into mirror folders, pulled whole, pulled run by
// run, and interrupted by a failed download and by Ctrl-C: each time the
// folder holds exactly the store, and every mirror ends byte for byte the
// same, its changes log included.
func TestFeedPull(t *testing.T) {
	t.Parallel()
	s := newFeedStack(t)
	ctx := context.Background()
	base := t.TempDir()
	dir := filepath.Join(base, "mirror")

	full := s.exportRun(t, "full")

	// Updates, creations and deletions, a resource deleted and re-created
	// with the same id among them (TestFeedPullRecreated: its deletion
	// recorded late).
	_, p := s.first(t, "Patient")
	p["gender"] = "other"
	delete(p, "meta")
	pj, _ := json.Marshal(p)
	s.put(t, string(pj))
	s.put(t, `{"resourceType":"Patient","id":"new-1","active":true}`)
	s.put(t, `{"resourceType":"Organization","id":"org-1","name":"New"}`)
	oid, _ := s.first(t, "Observation")
	s.del(t, "Observation", oid)
	eid, e := s.first(t, "Encounter")
	s.del(t, "Encounter", eid)
	delete(e, "meta")
	e["status"] = "cancelled"
	ej, _ := json.Marshal(e)
	s.put(t, string(ej))
	inc := s.exportRun(t, "increment-1")

	sum, errOut, code := s.pull(t, ctx, dir)
	if code != 0 {
		t.Fatalf("pull: exit %d: %s", code, errOut)
	}
	if d := gocmp.Diff([]string{full, inc}, appliedRuns(sum)); d != "" {
		t.Errorf("first pull applied (-want +got):\n%s", d)
	}
	if sum.Applied[0].Since != "" || sum.Applied[1].Since == "" {
		t.Errorf("first pull: since %q then %q; want a full run then an increment", sum.Applied[0].Since, sum.Applied[1].Since)
	}
	s.matchesStore(t, dir)

	// More changes and one more run: the second pull fetches only it.
	s.put(t, `{"resourceType":"Patient","id":"new-1","active":false}`)
	s.del(t, "Organization", "org-1")
	s.put(t, `{"resourceType":"Patient","id":"new-2"}`)
	next := s.exportRun(t, "increment-2")
	var getsMu sync.Mutex
	var gets []string
	s.setFault(func(r *http.Request) bool {
		if feedFile(r) {
			getsMu.Lock()
			defer getsMu.Unlock()
			gets = append(gets, r.URL.Path)
		}
		return false
	})
	sum, errOut, code = s.pull(t, ctx, dir)
	s.setFault(nil)
	getsMu.Lock()
	defer getsMu.Unlock()
	if code != 0 {
		t.Fatalf("second pull: exit %d: %s", code, errOut)
	}
	if d := gocmp.Diff([]string{next}, appliedRuns(sum)); d != "" {
		t.Errorf("second pull applied (-want +got):\n%s", d)
	}
	for _, g := range gets {
		if !strings.Contains(g, opID(sum.Applied[0].Operation)) {
			t.Errorf("second pull fetched %s, not a file of run %s", g, next)
		}
	}
	s.matchesStore(t, dir)

	// A failed run is skipped; a partial one is applied as its manifest
	// says, and the next run completes the mirror.
	s.put(t, `{"resourceType":"Patient","id":"new-3"}`)
	s.emu.ForceNextOutcomes(healthcaretest.Outcome{ErrorCode: 13, ErrorMessage: "injected"}, healthcaretest.Outcome{FailureCount: 1})
	failed := s.exportRun(t, "failed")
	s.del(t, "Patient", "new-2")
	s.put(t, `{"resourceType":"Patient","id":"new-4"}`)
	partial := s.exportRun(t, "partial")
	last := s.exportRun(t, "increment-3")
	sum, errOut, code = s.pull(t, ctx, dir)
	if code != 0 {
		t.Fatalf("third pull: exit %d: %s", code, errOut)
	}
	if d := gocmp.Diff([]string{partial, last}, appliedRuns(sum)); d != "" {
		t.Errorf("third pull applied (-want +got):\n%s", d)
	}
	if len(sum.Skipped) != 1 || sum.Skipped[0].Run != failed {
		t.Errorf("third pull skipped %+v; want the failed run %s", sum.Skipped, failed)
	}
	s.matchesStore(t, dir)
	want := mirrorFiles(t, dir, true)

	t.Run("since", func(t *testing.T) {
		for _, tc := range []struct {
			since string // a run, or a transactionTime
			want  []string
		}{
			{inc, []string{inc, next, partial, last}},
			{s.pullTimeOf(t, partial), []string{partial, last}},
		} {
			got, errOut, code := s.pull(t, ctx, filepath.Join(t.TempDir(), "m"), "--since", tc.since)
			if code != 0 || gocmp.Diff(tc.want, appliedRuns(got)) != "" {
				t.Errorf("pull --since %s: exit %d (%s), applied %v; want %v", tc.since, code, errOut, appliedRuns(got), tc.want)
			}
		}
	})

	t.Run("a failed download resumes", func(t *testing.T) {
		dir := filepath.Join(base, "failed-download")
		s.setFault(func(r *http.Request) bool {
			return feedFile(r) && strings.Contains(r.URL.Path, opID(sum.Applied[0].Operation))
		})
		got, errOut, code := s.pull(t, ctx, dir)
		s.setFault(nil)
		if code != 1 || !strings.Contains(errOut, "503") || !strings.Contains(errOut, "pull again to resume") {
			t.Errorf("pull with a failing download: exit %d, stderr %q; want 1 naming the 503", code, errOut)
		}
		if got.Cursor == nil || got.Cursor.Run != next || len(got.Applied) != 3 || got.Pending != 2 {
			t.Errorf("interrupted pull: cursor %+v, applied %v, %d pending; want the runs up to %s applied, 2 pending", got.Cursor, appliedRuns(got), got.Pending, next)
		}
		got, errOut, code = s.pull(t, ctx, dir)
		if code != 0 {
			t.Fatalf("resumed pull: exit %d: %s", code, errOut)
		}
		if d := gocmp.Diff([]string{partial, last}, appliedRuns(got)); d != "" {
			t.Errorf("resumed pull applied (-want +got):\n%s", d)
		}
		if d := gocmp.Diff(want, mirrorFiles(t, dir, true)); d != "" {
			t.Errorf("resumed mirror differs from the one pulled run by run (-want +got):\n%s", d)
		}
	})

	t.Run("Ctrl-C resumes", func(t *testing.T) {
		dir := filepath.Join(base, "interrupted")
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		incOp := opIDOfRun(t, s, inc)
		s.setFault(func(r *http.Request) bool {
			if feedFile(r) && strings.Contains(r.URL.Path, incOp) {
				cancel()
			}
			return false
		})
		got, errOut, code := s.pull(t, ctx, dir)
		s.setFault(nil)
		if code != 1 || !strings.Contains(errOut, "interrupted") {
			t.Errorf("interrupted pull: exit %d, stderr %q; want 1 saying interrupted", code, errOut)
		}
		if got.Cursor == nil || got.Cursor.Run != full {
			t.Errorf("interrupted pull left cursor %+v; want run %s", got.Cursor, full)
		}
		got, errOut, code = s.pull(t, context.Background(), dir)
		if code != 0 {
			t.Fatalf("resumed pull: exit %d: %s", code, errOut)
		}
		if d := gocmp.Diff([]string{inc, next, partial, last}, appliedRuns(got)); d != "" {
			t.Errorf("resumed pull applied (-want +got):\n%s", d)
		}
		if d := gocmp.Diff(want, mirrorFiles(t, dir, true)); d != "" {
			t.Errorf("resumed mirror differs from the one pulled run by run (-want +got):\n%s", d)
		}
	})
}

// feedFile reports whether r GETs a file a manifest lists: an export's
// output or deleted file (fhirexport reads the manifest itself from the
// state bucket's client, with retries a 503 would keep busy).
func feedFile(r *http.Request) bool {
	return r.Method == http.MethodGet && strings.HasPrefix(r.URL.Path, "/storage/v1/b/exports/o/") &&
		!strings.HasSuffix(r.URL.Path, ".manifest.json") && r.URL.Query().Get("alt") == "media"
}

// TestPullProgress: on a terminal the run being pulled and its bytes are
// redrawn in place, one line left per run.
func TestPullProgress(t *testing.T) {
	t.Parallel()
	var b bytes.Buffer
	p := &pullProgress{w: &b, total: 2}
	man, err := mirror.ParseManifest([]byte(`{"transactionTime":"2026-11-26T00:01:00Z"}`))
	if err != nil {
		t.Fatal(err)
	}
	p.start(0, feedItem{run: export.FeedRun{Operation: "projects/p/locations/l/datasets/d/operations/7"}, man: man})
	p.bytes(10)       // under 64 kB since the last redraw: not drawn
	p.bytes(70 << 10) // drawn
	p.done(80 << 10)
	want := "\r\033[Krun 1/2 2026-11-26T00:01:00Z d/7  0 B" + "\r\033[Krun 1/2 2026-11-26T00:01:00Z d/7  71.7 kB" +
		"\r\033[Krun 1/2 2026-11-26T00:01:00Z d/7  81.9 kB\n"
	if b.String() != want {
		t.Errorf("progress %q; want %q", b.String(), want)
	}
	var off bytes.Buffer
	q := newProgress(&off, 1) // not a terminal
	q.start(0, feedItem{man: man})
	q.done(1)
	if off.Len() != 0 {
		t.Errorf("progress off a terminal wrote %q", off.String())
	}
}

// pullTimeOf is a run's transactionTime, as its manifest says.
func (s *feedStack) pullTimeOf(t *testing.T, run string) string {
	t.Helper()
	op := opIDOfRun(t, s, run)
	o, err := s.gcs.GetObject("exports", "hourly/"+op+".manifest.json")
	if err != nil {
		t.Fatal(err)
	}
	m, err := mirror.ParseManifest(o.Content)
	if err != nil {
		t.Fatal(err)
	}
	return m.TransactionTime
}

// opID is an operation's id, the last segment of its name.
func opID(op string) string { return op[strings.LastIndex(op, "/")+1:] }

// opIDOfRun is the operation id of a run.
func opIDOfRun(t *testing.T, s *feedStack, run string) string {
	t.Helper()
	var rec struct {
		Operation string `json:"operation"`
	}
	s.get(t, "runs/"+run+".json", &rec)
	return opID(rec.Operation)
}

// TestFeedPullReadme runs the README's feed pull transcript against the
// local stack and checks the README shows what the command prints.
func TestFeedPullReadme(t *testing.T) {
	t.Parallel()
	s := newFeedStack(t)
	dir := filepath.Join(t.TempDir(), "mirror")
	var tr strings.Builder
	cmd := func(args ...string) {
		t.Helper()
		var out, errOut bytes.Buffer
		c := config{getenv: func(k string) string { return s.env[k] }, now: func() time.Time { return s.now }}
		code := c.run(context.Background(), args, &out, &errOut)
		line := strings.ReplaceAll(strings.Join(args, " "), dir, "mirror")
		if code != 0 {
			t.Fatalf("fhirexport %s: exit %d\n%s%s", line, code, out.String(), errOut.String())
		}
		fmt.Fprintf(&tr, "$ fhirexport %s\n%s", line, strings.ReplaceAll(out.String(), dir, "mirror"))
	}
	ls := func() {
		fmt.Fprintf(&tr, "$ ls mirror\n")
		for _, name := range slices.Sorted(maps.Keys(mirrorFiles(t, dir, true))) {
			fmt.Fprintln(&tr, name)
		}
	}
	key := export.PipelineKey(mustSpec(t, hourly))

	s.exportRun(t, "full")
	s.put(t, `{"resourceType":"Patient","id":"p-new","active":true}`)
	oid, _ := s.first(t, "Observation")
	s.del(t, "Observation", oid)
	s.exportRun(t, "hourly-1")
	cmd("feed", "pull", key, "--dir", dir, "--changes")
	ls()
	fmt.Fprintf(&tr, "# later: p-new updated, and the pipeline ran once more\n")
	s.put(t, `{"resourceType":"Patient","id":"p-new","active":false}`)
	s.exportRun(t, "hourly-2")
	cmd("feed", "pull", key, "--dir", dir, "--changes")
	cmd("feed", "pull", key, "--dir", dir)
	s.matchesStore(t, dir)

	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, block, ok := strings.Cut(string(readme), "```console feed-pull\n")
	block, _, _ = strings.Cut(block, "```")
	if !ok {
		t.Fatalf("README.md has no ```console feed-pull block; it should read:\n%s", tr.String())
	}
	if d := gocmp.Diff(tr.String(), block); d != "" {
		t.Errorf("README's feed pull transcript differs from the command's output (-command +README):\n%s\nThe block should read:\n%s", d, tr.String())
	}
}

func mustSpec(t *testing.T, spec map[string]any) *export.Spec {
	t.Helper()
	data, _ := json.Marshal(spec)
	s, err := export.ParseSpec(data)
	if err != nil {
		t.Fatal(err)
	}
	return s
}
