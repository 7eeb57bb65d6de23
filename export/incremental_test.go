package export

// Incremental exports against the Healthcare emulator with a controlled
// clock, through the real Healthcare, Cloud Storage and Pub/Sub clients.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"cloud.google.com/go/pubsub/v2/pstest"
	"cloud.google.com/go/storage"
	healthcare "google.golang.org/api/healthcare/v1"
	"google.golang.org/api/iterator"

	"github.com/fhirexport/fhirexport/events"
	"github.com/fhirexport/fhirexport/healthcaretest"
	"github.com/fhirexport/fhirexport/healthcaretest/stacktest"
)

var incrementalCases = flag.Int("incremental.cases", 200, "random cases of TestIncrementalNeverMissesAnUpdate")

const (
	testLocation = "projects/test-project/locations/us-central1"
	exportsBkt   = "exports"
)

// world is one set of emulators and an Exporter using them.
type world struct {
	x       *Exporter
	emu     *healthcaretest.Server
	clock   *healthcaretest.FakeClock
	storage *storage.Client
	ps      *pstest.Server
	seq     atomic.Int64
}

func newWorld(t *testing.T) *world {
	t.Helper()
	s, clock := newWorldStack(t)
	return worldOn(t, s, clock, s.HealthcareService, s.Storage, nil)
}

// eventsTopic is where a world's Exporter publishes its outcome events.
const eventsTopic = "projects/test-project/topics/events"

// newWorldStack starts the emulators of a world on a fake clock.
func newWorldStack(t *testing.T) (*stacktest.Stack, *healthcaretest.FakeClock) {
	t.Helper()
	clock := healthcaretest.NewFakeClock(time.Date(2026, 11, 26, 0, 0, 0, 0, time.UTC))
	s := stacktest.New(t, stacktest.Options{
		Buckets:    []string{"state", exportsBkt},
		Topics:     []string{eventsTopic},
		Healthcare: healthcaretest.Options{Clock: clock},
	})
	return s, clock
}

// worldOn is a world whose Exporter reaches the Healthcare API and Cloud
// Storage through hc and st (the stack's or fronts of them).
func worldOn(t *testing.T, s *stacktest.Stack, clock *healthcaretest.FakeClock, hc *healthcare.Service, st *storage.Client, now func() time.Time) *world {
	t.Helper()
	pub := events.NewPublisher(s.PubSub, eventsTopic)
	t.Cleanup(pub.Stop)
	policy, err := ParsePolicy(testLocation+"/datasets/*/fhirStores/*", "gs://"+exportsBkt)
	if err != nil {
		t.Fatal(err)
	}
	return &world{x: New(hc, NewState(st, "state", "fx"), pub, policy, now), emu: s.Healthcare, clock: clock, storage: s.Storage, ps: s.Pstest}
}

// store creates a store in a dataset of its own.
func (w *world) store(t *testing.T) string {
	t.Helper()
	ds := fmt.Sprintf("%s/datasets/d%d", testLocation, w.seq.Add(1))
	if err := w.emu.CreateDataset(ds); err != nil {
		t.Fatal(err)
	}
	store := ds + "/fhirStores/s"
	if err := w.emu.CreateFHIRStore(store, "R4"); err != nil {
		t.Fatal(err)
	}
	return store
}

// start delivers a trigger, redelivering while the function asks for it.
func (w *world) start(t *testing.T, spec map[string]any) {
	t.Helper()
	data, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	trig := events.Trigger{Source: "//test", ID: fmt.Sprintf("t%d", w.seq.Add(1)), Spec: data}
	for attempt := 0; ; attempt++ {
		err := w.x.Start(context.Background(), trig, nil)
		if err == nil {
			return
		}
		if attempt == 5 {
			t.Fatalf("Start kept failing: %v", err)
		}
	}
}

func (w *world) poll(t *testing.T) {
	t.Helper()
	if _, err := w.x.Poll(context.Background()); err != nil {
		t.Fatalf("Poll: %v", err)
	}
}

// busy reports whether the spec's pipeline has a run pending.
func (w *world) busy(t *testing.T, spec map[string]any) bool {
	t.Helper()
	wm, err := w.x.state.GetWatermark(context.Background(), PipelineKey(mustSpec(t, spec)))
	if err != nil {
		t.Fatal(err)
	}
	return wm.Running != ""
}

// lastOutcome returns the type of the last outcome event published for store.
func (w *world) lastOutcome(store string) string {
	last := ""
	for _, m := range w.ps.Messages() {
		if typ := m.Attributes["ce-type"]; m.Attributes["ce-source"] == SourceOf(store) && typ != events.TypeStarted && typ != events.TypeRejected {
			last = typ
		}
	}
	return last
}

// version is one exported or stored resource version.
type version struct{ key, versionID, lastUpdated string }

func parseVersion(t *testing.T, raw []byte) version {
	t.Helper()
	var r struct {
		ResourceType string `json:"resourceType"`
		ID           string `json:"id"`
		Meta         struct {
			VersionID   string `json:"versionId"`
			LastUpdated string `json:"lastUpdated"`
		} `json:"meta"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		t.Fatalf("resource %s: %v", raw, err)
	}
	return version{r.ResourceType + "/" + r.ID, r.Meta.VersionID, r.Meta.LastUpdated}
}

func mustTime(t *testing.T, v string) time.Time {
	t.Helper()
	ts, err := time.Parse(time.RFC3339Nano, v)
	if err != nil {
		t.Fatal(err)
	}
	return ts
}

// exported returns the latest version of every resource in the NDJSON objects
// under prefix: the union of everything the pipeline delivered.
func (w *world) exported(t *testing.T, prefix string) map[string]version {
	t.Helper()
	latest := map[string]version{}
	it := w.storage.Bucket(exportsBkt).Objects(context.Background(), &storage.Query{Prefix: prefix})
	for {
		a, err := it.Next()
		if err == iterator.Done {
			return latest
		}
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasSuffix(a.Name, ".json") || strings.HasSuffix(a.Name, ".ndjson") {
			continue // the run's manifest and feed files, not the export's output
		}
		r, err := w.storage.Bucket(exportsBkt).Object(a.Name).NewReader(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(r)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			v := parseVersion(t, sc.Bytes())
			if cur, ok := latest[v.key]; !ok || mustTime(t, v.lastUpdated).After(mustTime(t, cur.lastUpdated)) {
				latest[v.key] = v
			}
		}
		r.Close()
	}
}

// sinceSent returns the _since of every export request for store, in order.
func (w *world) sinceSent(store string) []string {
	var out []string
	for _, r := range w.emu.ExportRequests() {
		if strings.HasPrefix(r.Path, "/v1/"+store+":") {
			var body struct {
				Since string `json:"_since"`
			}
			json.Unmarshal(r.Body, &body)
			out = append(out, body.Since)
		}
	}
	return out
}

// TestIncrementalNeverMissesAnUpdate is a property test: random interleavings
// of creates, updates and deletes with incremental runs (some failing, some
// partial, some overlapping), ending with a successful run. The union of
// everything exported, latest version per resource, must equal the latest
// version of every resource that exists at the end and was written after the
// first run's floor.
func TestIncrementalNeverMissesAnUpdate(t *testing.T) {
	w := newWorld(t)
	w.emu.SetExportTiming(10*time.Second, 2)
	for c := 0; c < *incrementalCases; c++ {
		seed := uint64(c)
		if !t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) { w.incrementalCase(t, seed) }) {
			t.Fatalf("reproduce with: go test ./export -run 'TestIncrementalNeverMissesAnUpdate/seed=%d$'", seed)
		}
	}
}

func (w *world) incrementalCase(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 0x5eed))
	store := w.store(t)
	prefix := fmt.Sprintf("inc/%d", w.seq.Add(1))
	spec := map[string]any{"fhirStore": store, "incremental": true, "name": "p",
		"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/" + prefix}}
	resources := healthcaretest.Synthetic(int64(seed), 2)
	put := func(raw []byte) {
		if _, err := w.emu.PutResource(store, raw); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range resources[:len(resources)/2] {
		put(r)
	}
	var floor time.Time
	if rng.IntN(2) == 0 { // half the pipelines start from a floor
		w.clock.Advance(time.Second)
		floor = w.clock.Now()
		spec["_since"] = floor.Format(time.RFC3339Nano)
	}
	next := len(resources) / 2
	steps := 6 + rng.IntN(8)
	for i := 0; i < steps; i++ {
		switch op := rng.IntN(10); {
		case op < 4: // write: create, update or delete
			stored := w.emu.Resources(store)
			switch k := rng.IntN(3); {
			case k == 0 && next < len(resources):
				put(resources[next])
				next++
			case k == 1 && len(stored) > 0:
				var m map[string]any
				json.Unmarshal(stored[rng.IntN(len(stored))], &m)
				m["language"] = fmt.Sprintf("x-%d", rng.IntN(1000))
				delete(m, "meta")
				raw, _ := json.Marshal(m)
				put(raw)
			case len(stored) > 0:
				v := parseVersion(t, stored[rng.IntN(len(stored))])
				typ, id, _ := strings.Cut(v.key, "/")
				if err := w.emu.DeleteResource(store, typ, id); err != nil {
					t.Fatal(err)
				}
			}
		case op < 7: // a trigger, maybe with a forced outcome or a transient failure
			if w.busy(t, spec) {
				w.start(t, spec) // overlapping: must be skipped
				break
			}
			switch rng.IntN(6) {
			case 0:
				w.emu.ForceNextOutcomes(healthcaretest.Outcome{ErrorCode: 13, ErrorMessage: "injected"})
			case 1:
				w.emu.ForceNextOutcomes(healthcaretest.Outcome{FailureCount: 1 + int64(rng.IntN(3))})
			case 2:
				w.emu.FailNext("fhirStores.export", 1, 503)
			}
			w.start(t, spec)
		default: // a scheduler tick
			w.poll(t)
		}
		// Time moves in steps from a microsecond to well past an export.
		w.clock.Advance([]time.Duration{time.Microsecond, 300 * time.Millisecond, time.Second, 11 * time.Second}[rng.IntN(4)])
	}
	// Let any run in flight finish, then a clean run that must succeed.
	w.clock.Advance(11 * time.Second)
	w.poll(t)
	w.start(t, spec)
	w.clock.Advance(11 * time.Second)
	w.poll(t)

	if last := w.lastOutcome(store); last != events.TypeSucceeded {
		t.Fatalf("the final run ended %q, want succeeded", last)
	}
	got := w.exported(t, prefix+"/")
	for _, raw := range w.emu.Resources(store) {
		v := parseVersion(t, raw)
		if !mustTime(t, v.lastUpdated).After(floor) {
			continue // before the pipeline's floor: not its business
		}
		if g, ok := got[v.key]; !ok || g.versionID != v.versionID {
			t.Errorf("%s: stored version %s (%s), exported %+v; _since sent: %v", v.key, v.versionID, v.lastUpdated, g, w.sinceSent(store))
		}
	}
}

// TestIncrementalBoundaries checks the watermark at its edges: an update one
// microsecond after it, full sub-second precision on the wire, and floors in
// other time zones.
func TestIncrementalBoundaries(t *testing.T) {
	w := newWorld(t)
	store := w.store(t)
	prefix := "bound"
	spec := map[string]any{"fhirStore": store, "incremental": true, "name": "b",
		"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/" + prefix}}
	w.clock.Set(time.Date(2026, 11, 26, 10, 0, 0, 123456000, time.UTC))
	first, err := w.emu.PutResource(store, []byte(`{"resourceType":"Patient","id":"a"}`))
	if err != nil {
		t.Fatal(err)
	}
	w.start(t, spec) // full export: no watermark, no floor
	w.poll(t)
	wm, err := w.x.state.GetWatermark(context.Background(), PipelineKey(mustSpec(t, spec)))
	if err != nil || wm.Watermark == "" {
		t.Fatalf("no watermark after a successful run: %+v %v", wm, err)
	}
	// The clock has not moved: this update lands in the same second (and
	// microseconds after) the watermark.
	second, err := w.emu.PutResource(store, []byte(`{"resourceType":"Patient","id":"b"}`))
	if err != nil {
		t.Fatal(err)
	}
	if lu := parseVersion(t, second).lastUpdated; !mustTime(t, lu).After(mustTime(t, wm.Watermark)) ||
		mustTime(t, lu).Sub(mustTime(t, wm.Watermark)) > time.Millisecond {
		t.Fatalf("test setup: update at %s is not just after the watermark %s", lu, wm.Watermark)
	}
	w.start(t, spec)
	w.poll(t)
	sent := w.sinceSent(store)
	if len(sent) != 2 || sent[0] != "" || sent[1] != wm.Watermark {
		t.Fatalf("_since sent = %q, want [\"\" %q]", sent, wm.Watermark)
	}
	if !strings.Contains(sent[1], ".") {
		t.Errorf("watermark %q lost its fractional seconds", sent[1])
	}
	got := w.exported(t, prefix+"/")
	for _, raw := range []json.RawMessage{first, second} {
		v := parseVersion(t, raw)
		if got[v.key].versionID != v.versionID {
			t.Errorf("%s not exported", v.key)
		}
	}

	// A floor later than the watermark wins, compared as instants across
	// time zones; an earlier one does not.
	for _, offset := range []time.Duration{time.Hour, -time.Hour} {
		cur, err := w.x.state.GetWatermark(context.Background(), PipelineKey(mustSpec(t, spec)))
		if err != nil {
			t.Fatal(err)
		}
		floor := mustTime(t, cur.Watermark).Add(offset).In(time.FixedZone("", -5*3600)).Format(time.RFC3339Nano)
		want := cur.Watermark
		if offset > 0 {
			want = floor
		}
		spec["_since"] = floor
		w.start(t, spec)
		w.clock.Advance(time.Second)
		w.poll(t)
		sent := w.sinceSent(store)
		if got := sent[len(sent)-1]; got != want {
			t.Errorf("floor %s: _since sent %s, want %s", floor, got, want)
		}
	}
}

func mustSpec(t *testing.T, spec map[string]any) *Spec {
	t.Helper()
	data, _ := json.Marshal(spec)
	s, err := ParseSpec(data)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestOneRunAtATime: a trigger arriving while its pipeline's run is pending
// is queued as the pipeline's follow-up (it starts no overlapping export); a
// third is merged into the queued one; the sweep that finishes the first run
// starts the follow-up, whose _since is the first run's watermark.
func TestOneRunAtATime(t *testing.T) {
	w := newWorld(t)
	w.emu.SetExportTiming(time.Minute, 1)
	store := w.store(t)
	spec := map[string]any{"fhirStore": store, "incremental": true, "name": "busy",
		"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/busy"}}
	w.start(t, spec)
	w.start(t, spec) // overlaps: queued
	w.start(t, spec) // merged into the queued run
	if n := len(w.sinceSent(store)); n != 1 {
		t.Fatalf("exports while busy = %d, want 1", n)
	}
	var queued, merged int
	for _, m := range w.ps.Messages() {
		switch {
		case m.Attributes["ce-type"] == events.TypeQueued && bytes.Contains(m.Data, []byte(`"reason":"busy"`)):
			queued++
		case m.Attributes["ce-type"] == events.TypeRejected && bytes.Contains(m.Data, []byte(`"queuedRun"`)) && bytes.Contains(m.Data, []byte(`"code":10`)):
			merged++
		}
	}
	if queued != 1 || merged != 1 {
		t.Errorf("queued events = %d, merged (rejected, code 10) = %d; want 1 and 1", queued, merged)
	}
	w.clock.Advance(2 * time.Minute)
	w.poll(t) // finishes the first run and starts the follow-up in the same sweep
	sent := w.sinceSent(store)
	if len(sent) != 2 {
		t.Fatalf("exports after the run ended = %d, want 2 (the follow-up)", len(sent))
	}
	if sent[1] == "" {
		t.Errorf("the follow-up exported everything; want _since = the first run's watermark")
	}
}
