package export

// The feed's contract as a property, read as a standard HL7 Bulk Data client
// reads it: random creates, updates, deletes and re-creates of the same ids
// in the Healthcare emulator, change notifications duplicated, reordered and
// delayed past later runs, exports of several pipelines with different type
// sets run by the emulator (fhirStores.export with _since and _type) while
// writes and deletions go on, finalized with writeFeed (some partial, some
// failed, some retried after a crash). After the writes stop, every
// notification is delivered and each pipeline finishes one more run.
// Replaying a pipeline's manifests in transactionTime order with the client's
// rule (upsert every output resource, then remove every deleted one) must
// give the store restricted to the pipeline's types; no manifest lists a
// resource in both output and deleted, no deletion is listed twice, and no
// deletion removes a version newer than itself.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	healthcare "google.golang.org/api/healthcare/v1"

	"github.com/fhirexport/fhirexport/events"
	"github.com/fhirexport/fhirexport/healthcaretest/bulkdatatest"
)

var (
	feedCases      = flag.Int("feed.cases", 30, "random cases of TestFeedReplayReproducesStore")
	feedFaultCases = flag.Int("feed.faultcases", 10, "random cases of TestFeedReplayUnderFaults")
	feedDebug      = flag.Bool("feed.debug", false, "log what the replay applies")
	feedFaultRate  = flag.Float64("feed.faultrate", 0.1, "TestFeedReplayUnderFaults: fraction of the Exporter's Cloud Storage requests that fail")
)

func TestFeedReplayReproducesStore(t *testing.T) {
	t.Parallel()
	w := newFeedWorld(t)
	for c := 0; c < *feedCases; c++ {
		seed := uint64(c)
		if !t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) { w.replayCase(t, seed) }) {
			t.Fatalf("reproduce with: go test ./export -run 'TestFeedReplayReproducesStore/seed=%d$'", seed)
		}
	}
}

// TestFeedReplayUnderFaults is the same property with Cloud Storage failing
// under RecordChange and the feed writes: a fraction of the Exporter's
// requests answer 503, half of them after the request took effect (the
// answer is lost). A failed call is made again, as Pub/Sub redelivers a
// notification and the next sweep finalizes a run again.
func TestFeedReplayUnderFaults(t *testing.T) {
	t.Parallel()
	for c := 0; c < *feedFaultCases; c++ {
		seed := uint64(1000 + c)
		faults := &storageFaults{rng: rand.New(rand.NewPCG(seed, 0xfa17)), rate: *feedFaultRate}
		w := newFeedWorldFronted(t, faults.wrap)
		if !t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) { w.replayCase(t, seed) }) {
			t.Fatalf("reproduce with: go test ./export -run 'TestFeedReplayUnderFaults/seed=%d$'", seed)
		}
		t.Logf("seed %d: %d requests, %d failed before taking effect, %d after; %d calls made again",
			seed, faults.requests, faults.before, faults.after, w.again)
		if faults.after == 0 {
			t.Errorf("seed %d: no request failed after taking effect: the case tests less than it says", seed)
		}
	}
}

// storageFaults fails a seeded fraction of Cloud Storage requests with 503,
// half of them after passing the request on. A fault starts an outage of up
// to 8 requests, longer than the clients' own retries last, so calls fail:
// either nothing gets through, or everything does and no answer comes back.
type storageFaults struct {
	mu                      sync.Mutex
	rng                     *rand.Rand
	rate                    float64
	outage                  int  // requests still to fail
	late                    bool // this outage loses answers (the requests take effect)
	requests, before, after int
}

func (f *storageFaults) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		f.requests++
		if f.outage == 0 && f.rng.Float64() < f.rate {
			f.outage, f.late = 1+f.rng.IntN(8), f.rng.IntN(2) == 0
		}
		fail, late := f.outage > 0, f.late
		if fail {
			f.outage--
		}
		switch {
		case fail && late:
			f.after++
		case fail:
			f.before++
		}
		f.mu.Unlock()
		if !fail {
			next.ServeHTTP(w, r)
			return
		}
		if late {
			next.ServeHTTP(discard{http.Header{}}, r)
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusServiceUnavailable)
		io.WriteString(w, `{"error":{"code":503,"message":"injected: backend unavailable"}}`)
	})
}

// retry makes call again while it fails, as Pub/Sub and the next sweep do.
func (w *feedWorld) retry(t *testing.T, what string, call func() error) {
	t.Helper()
	var err error
	for range 30 {
		if err = call(); err == nil {
			return
		}
		w.again++
	}
	t.Fatalf("%s kept failing: %v", what, err)
}

// modelPipeline is one incremental pipeline and its run in flight.
type modelPipeline struct {
	name      string
	types     []string // nil: all
	dir       string   // object prefix in exportsBkt
	watermark string   // the last succeeded run's createTime
	cursor    *deletionCursor
	flight    *pendingRecord
}

// queued is a notification waiting for delivery.
type queued struct {
	n  events.Notification
	at time.Time
}

func (w *feedWorld) replayCase(t *testing.T, seed uint64) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(seed, 0xfeed))
	dataset := fmt.Sprintf("%s/datasets/feed%d", testLocation, seed)
	store := dataset + "/fhirStores/s"
	if err := w.emu.CreateDataset(dataset); err != nil {
		t.Fatal(err)
	}
	if err := w.emu.CreateFHIRStore(store, "R4"); err != nil {
		t.Fatal(err)
	}
	allTypes := []string{"Patient", "Observation", "Encounter"}
	present := map[string]bool{}
	pipes := []*modelPipeline{
		{name: "pat", types: []string{"Patient"}},
		{name: "pat-obs", types: []string{"Patient", "Observation"}},
		{name: "all"},
	}
	for _, p := range pipes {
		p.dir = fmt.Sprintf("replay/%d/%s", seed, p.name)
	}
	var queue []queued
	msgs := 0
	quiet := false // the writes have stopped

	notify := func(action, typ, id string, stamp time.Time) {
		if *feedDebug {
			t.Logf("write %s %s/%s at %s (msg %d)", action, typ, id, stamp.Format(time.RFC3339Nano), msgs+1)
		}
		msgs++
		n := events.Notification{Resource: store + "/fhir/" + typ + "/" + id, ResourceType: typ, ID: id, Action: action, Store: store,
			PayloadType: events.PayloadNameOnly, VersionID: fmt.Sprint(msgs), LastUpdated: stamp.Truncate(time.Second),
			MessageID: fmt.Sprint(msgs), PublishTime: stamp.Add(time.Duration(1+rng.IntN(5)) * time.Millisecond)}
		delays := []time.Duration{0, time.Second, 30 * time.Second, 3 * time.Minute, 25 * time.Minute}
		queue = append(queue, queued{n: n, at: stamp.Add(delays[rng.IntN(len(delays))])})
		if rng.IntN(5) == 0 { // Pub/Sub delivers at least once
			queue = append(queue, queued{n: n, at: stamp.Add(delays[rng.IntN(len(delays))])})
		}
	}
	// deliver hands every due notification to RecordChange, in random order.
	deliver := func(all bool) {
		now := w.clock.Now()
		rng.Shuffle(len(queue), func(i, j int) { queue[i], queue[j] = queue[j], queue[i] })
		var rest []queued
		for _, q := range queue {
			if !all && q.at.After(now) {
				rest = append(rest, q)
				continue
			}
			if q.n.Action == events.ActionDelete {
				w.retry(t, "RecordChange", func() error { return w.x.RecordChange(ctx, q.n) })
			}
		}
		queue = rest
	}
	write := func() {
		typ, id := allTypes[rng.IntN(len(allTypes))], fmt.Sprint(rng.IntN(2))
		key := typ + "/" + id
		if present[key] && rng.IntN(2) == 1 {
			if err := w.emu.DeleteResource(store, typ, id); err != nil {
				t.Fatal(err)
			}
			present[key] = false
			// The deletion's stamp is the store's newest: read it back.
			notify(events.ActionDelete, typ, id, w.lastModified(t, store, key))
			return
		}
		action := events.ActionUpdate
		if !present[key] {
			action = events.ActionCreate
		}
		data, err := w.emu.PutResource(store, []byte(fmt.Sprintf(`{"resourceType":%q,"id":%q,"language":%q}`, typ, id, []string{"en", "fr"}[rng.IntN(2)])))
		if err != nil {
			t.Fatal(err)
		}
		var r struct{ Meta struct{ LastUpdated string } }
		json.Unmarshal(data, &r)
		present[key] = true
		notify(action, typ, id, mustTime(t, r.Meta.LastUpdated))
	}
	// start asks the emulator for the pipeline's next export.
	start := func(p *modelPipeline) {
		req := &healthcare.ExportResourcesRequest{GcsDestination: &healthcare.GoogleCloudHealthcareV1FhirGcsDestination{
			UriPrefix: "gs://" + exportsBkt + "/" + p.dir}, Since: p.watermark, Type: strings.Join(p.types, ",")}
		op, err := w.hc.Projects.Locations.Datasets.FhirStores.Export(store, req).Context(ctx).Do()
		if err != nil {
			t.Fatal(err)
		}
		p.flight = &pendingRecord{Pipeline: p.name, Store: store, Destination: "gs://" + exportsBkt + "/" + p.dir, Types: p.types,
			Since: p.watermark, Incremental: true, Operation: op.Name}
	}
	finish := func(p *modelPipeline, outcome string) {
		f := p.flight
		p.flight = nil
		if outcome == events.TypeFailed {
			return
		}
		op, err := w.hc.Projects.Locations.Datasets.Operations.Get(f.Operation).Context(ctx).Do()
		if err != nil || !op.Done || op.Error != nil {
			t.Fatalf("operation %s: %+v, %v", f.Operation, op, err)
		}
		var meta healthcare.OperationMetadata
		if err := json.Unmarshal(op.Metadata, &meta); err != nil {
			t.Fatal(err)
		}
		if outcome == events.TypePartial {
			meta.Counter.Failure = 1
		}
		var res feedResult
		w.retry(t, "writeFeed "+f.Operation, func() (err error) {
			res, err = w.x.writeFeed(ctx, *f, op, &meta, outcome, p.cursor)
			return err
		})
		if rng.IntN(5) == 0 {
			// A crash before the manifest was written: the retry runs later,
			// with more notifications in and the store changed.
			base := p.dir + "/" + op.Name[strings.LastIndex(op.Name, "/")+1:]
			if err := w.st.Bucket(exportsBkt).Object(base + ".manifest.json").Delete(ctx); err != nil {
				t.Fatal(err)
			}
			w.clock.Advance(time.Duration(rng.IntN(120)) * time.Second)
			if !quiet {
				write()
			}
			deliver(false)
			w.retry(t, "writeFeed again "+f.Operation, func() (err error) {
				res, err = w.x.writeFeed(ctx, *f, op, &meta, outcome, p.cursor)
				return err
			})
		}
		if outcome == events.TypeSucceeded {
			if res.Cursor == nil {
				t.Fatalf("succeeded incremental run %s returned no cursor", f.Operation)
			}
			p.watermark, p.cursor = meta.CreateTime, res.Cursor
		}
	}
	randomOutcome := func() string {
		switch r := rng.IntN(8); {
		case r == 0:
			return events.TypeFailed
		case r == 1:
			return events.TypePartial
		}
		return events.TypeSucceeded
	}

	steps := 40 + rng.IntN(60)
	for i := 0; i < steps; i++ {
		switch r := rng.IntN(20); {
		case r < 11:
			write()
		case r < 15:
			if p := pipes[rng.IntN(len(pipes))]; p.flight == nil {
				start(p)
			}
		case r < 19:
			if p := pipes[rng.IntN(len(pipes))]; p.flight != nil {
				finish(p, randomOutcome())
			}
		}
		deliver(false)
		// Writes are at least 10 ms apart: more than the publish latency.
		// Short steps often, so that writes and runs share a second.
		steps := []time.Duration{10 * time.Millisecond, 10 * time.Millisecond, 40 * time.Millisecond, 250 * time.Millisecond,
			time.Second, 20 * time.Second, 3 * time.Minute, 11 * time.Minute}
		w.clock.Advance(steps[rng.IntN(len(steps))])
	}

	// Quiescence: the writes stop, runs in flight end, every notification
	// arrives, and each pipeline finishes one more run.
	quiet = true
	for _, p := range pipes {
		if p.flight != nil {
			finish(p, randomOutcome())
		}
	}
	w.clock.Advance(time.Hour)
	deliver(true)
	w.clock.Advance(time.Minute)
	for _, p := range pipes {
		start(p)
		w.clock.Advance(time.Minute)
		finish(p, events.TypeSucceeded)
	}

	want := map[string]string{} // Type/id → meta.lastUpdated
	for _, raw := range w.emu.Resources(store) {
		var r struct {
			ResourceType, ID string
			Meta             struct{ LastUpdated string }
		}
		json.Unmarshal(raw, &r)
		want[r.ResourceType+"/"+r.ID] = r.Meta.LastUpdated
	}
	for _, p := range pipes {
		got := w.replay(t, p.dir)
		for key, lu := range want {
			if typ, _, _ := strings.Cut(key, "/"); p.wants(typ) && got[key] != lu {
				t.Errorf("pipeline %s: %s is in the store (lastUpdated %s); the replay has %q", p.name, key, lu, got[key])
			}
		}
		for key, lu := range got {
			if typ, _, _ := strings.Cut(key, "/"); want[key] == "" || !p.wants(typ) {
				t.Errorf("pipeline %s: the replay has %s (lastUpdated %s), which the store does not (or the pipeline must not)", p.name, key, lu)
			}
		}
	}
}

func (p *modelPipeline) wants(typ string) bool {
	return p.types == nil || slices.Contains(p.types, typ)
}

// lastModified is the time of a resource's newest version, from its history.
func (w *feedWorld) lastModified(t *testing.T, store, key string) time.Time {
	t.Helper()
	resp, err := w.hc.Projects.Locations.Datasets.FhirStores.Fhir.History(store + "/fhir/" + key).Count(1).Do()
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b struct {
		Entry []struct{ Response struct{ LastModified string } }
	}
	if err := json.NewDecoder(resp.Body).Decode(&b); err != nil || len(b.Entry) != 1 {
		t.Fatalf("history of %s: %d %v", key, resp.StatusCode, err)
	}
	return mustTime(t, b.Entry[0].Response.LastModified)
}

// replay is a standard Bulk Data client: it fetches every manifest under
// dir over its URL, in transactionTime order, and applies each one: every
// output resource upserted, then every deleted one removed. It returns
// Type/id → meta.lastUpdated of what it holds, and checks the IG's rules a
// client relies on: no resource both in a manifest's output and its deleted
// file, no deletion (tombstone) listed twice, and no deletion of a version
// newer than the deletion itself.
func (w *feedWorld) replay(t *testing.T, dir string) map[string]string {
	t.Helper()
	type run struct {
		m   bulkManifest
		url string
	}
	var runs []run
	for _, name := range w.objects(t, exportsBkt, dir+"/") {
		if strings.HasSuffix(name, ".manifest.json") {
			u := w.x.fileURL(exportsBkt, name)
			// Every manifest keeps the IG's Complete Status rules.
			for _, err := range bulkdatatest.Check(context.Background(), nil, w.read(t, u)) {
				t.Errorf("%s: %v", name, err)
			}
			runs = append(runs, run{m: w.manifest(t, u), url: u})
		}
	}
	slices.SortFunc(runs, func(a, b run) int {
		return mustTime(t, a.m.TransactionTime).Compare(mustTime(t, b.m.TransactionTime))
	})
	held := map[string]string{}
	listed := map[string]string{} // tombstone key → the manifest that listed it
	for _, r := range runs {
		if *feedDebug {
			t.Logf("manifest %s T=%s since=%s outputs=%d deleted=%v", r.m.Extension.Operation[strings.LastIndex(r.m.Extension.Operation, "/")+1:], r.m.TransactionTime, r.m.Extension.Since, len(r.m.Output), r.m.Deleted)
		}
		out := map[string]bool{}
		for _, o := range r.m.Output {
			sc := bufio.NewScanner(bytes.NewReader(w.read(t, o.URL)))
			sc.Buffer(nil, 1<<20)
			for sc.Scan() {
				var res struct {
					ResourceType string `json:"resourceType"`
					ID           string `json:"id"`
					Meta         struct {
						LastUpdated string `json:"lastUpdated"`
					} `json:"meta"`
				}
				if err := json.Unmarshal(sc.Bytes(), &res); err != nil {
					t.Fatal(err)
				}
				if res.ResourceType != o.Type {
					t.Errorf("%s: a %s in the %s output", r.url, res.ResourceType, o.Type)
				}
				key := res.ResourceType + "/" + res.ID
				held[key], out[key] = res.Meta.LastUpdated, true
				if *feedDebug {
					t.Logf("  output %s %s", key, res.Meta.LastUpdated)
				}
			}
		}
		for _, d := range r.m.Deleted {
			bs := w.bundles(t, d.URL)
			if d.Type != "Bundle" || d.Count == nil || *d.Count != int64(len(bs)) {
				t.Errorf("%s: deleted item %+v, file has %d lines", r.url, d, len(bs))
			}
			for _, b := range bs {
				key := b.Entry[0].Request.URL
				if out[key] {
					t.Errorf("%s: %s is in both output and deleted", r.url, key)
				}
				if prev := listed[b.ID]; prev != "" {
					t.Errorf("%s: the deletion %s of %s was listed before, by %s", r.url, b.ID, key, prev)
				}
				listed[b.ID] = r.url
				if *feedDebug {
					t.Logf("  deleted %s %s", key, b.Meta.LastUpdated)
				}
				if lu, ok := held[key]; ok && mustTime(t, lu).After(mustTime(t, b.Meta.LastUpdated)) {
					t.Errorf("%s: deletes %s (deleted %s), but the client holds a newer version (lastUpdated %s)", r.url, key, b.Meta.LastUpdated, lu)
				}
				delete(held, key)
			}
		}
	}
	return held
}
