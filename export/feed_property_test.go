package export

// The feed's replay rule as a property: random creates, updates, deletes and
// re-creates on a model store, change notifications duplicated, reordered and
// delayed past later runs, runs of several pipelines with different type sets
// simulated by writing {dest}/{op}_{Type} objects from the model at their
// createTime and finalized with writeFeed (some partial, some failed, some
// retried after a crash). After the writes stop, every notification is
// delivered and each pipeline finishes one more run, replaying all of a
// pipeline's manifests in any order (newest time wins per Type/id) must give
// the model store restricted to the pipeline's types.

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
)

var (
	feedCases      = flag.Int("feed.cases", 30, "random cases of TestFeedReplayReproducesStore")
	feedFaultCases = flag.Int("feed.faultcases", 10, "random cases of TestFeedReplayUnderFaults")
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

// modelVersion is a resource's latest state in the model store.
type modelVersion struct {
	lastUpdated time.Time
	present     bool
}

// modelPipeline is one incremental pipeline and its run in flight.
type modelPipeline struct {
	name      string
	types     []string // nil: all
	dir       string   // object prefix in exportsBkt
	watermark time.Time
	cursor    *deletionCursor
	runs      int
	flight    *pendingRecord
	created   time.Time
}

func (p *modelPipeline) wants(typ string) bool {
	return p.types == nil || slices.Contains(p.types, typ)
}

// queued is a notification waiting for delivery.
type queued struct {
	n        events.Notification
	at       time.Time
	redelivr bool
}

func (w *feedWorld) replayCase(t *testing.T, seed uint64) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(seed, 0xfeed))
	store := fmt.Sprintf("%s/datasets/feed%d/fhirStores/s", testLocation, seed)
	allTypes := []string{"Patient", "Observation", "Encounter"}
	model := map[string]*modelVersion{}
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

	notify := func(action, typ, id string, at time.Time) {
		msgs++
		n := events.Notification{Resource: store + "/fhir/" + typ + "/" + id, ResourceType: typ, ID: id, Action: action, Store: store,
			PayloadType: events.PayloadNameOnly, VersionID: fmt.Sprint(msgs), LastUpdated: at.Truncate(time.Second),
			MessageID: fmt.Sprint(msgs), PublishTime: at.Add(time.Duration(rng.IntN(6)) * time.Millisecond)}
		delays := []time.Duration{0, time.Second, 30 * time.Second, 3 * time.Minute, 25 * time.Minute}
		queue = append(queue, queued{n: n, at: at.Add(delays[rng.IntN(len(delays))])})
		if rng.IntN(5) == 0 { // Pub/Sub delivers at least once
			queue = append(queue, queued{n: n, at: at.Add(delays[rng.IntN(len(delays))]), redelivr: true})
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
			w.retry(t, "RecordChange", func() error { return w.x.RecordChange(ctx, q.n) })
		}
		queue = rest
	}
	write := func() {
		typ, id := allTypes[rng.IntN(len(allTypes))], fmt.Sprint(rng.IntN(2))
		key := typ + "/" + id
		now := w.clock.Now()
		v := model[key]
		switch {
		case v == nil || !v.present:
			model[key] = &modelVersion{lastUpdated: now, present: true}
			notify(events.ActionCreate, typ, id, now)
		case rng.IntN(2) == 0:
			v.lastUpdated = now
			notify(events.ActionUpdate, typ, id, now)
		default:
			v.lastUpdated, v.present = now, false
			notify(events.ActionDelete, typ, id, now)
		}
	}
	// start writes the run's objects from the model, as the export would.
	start := func(p *modelPipeline) {
		p.runs++
		op := fmt.Sprintf("%s/datasets/feed%d/operations/%s-%d", testLocation, seed, p.name, p.runs)
		now := w.clock.Now()
		lines := map[string]*bytes.Buffer{}
		for key, v := range model {
			typ, id, _ := strings.Cut(key, "/")
			if !v.present || !p.wants(typ) || (!p.watermark.IsZero() && !v.lastUpdated.After(p.watermark)) {
				continue
			}
			if lines[typ] == nil {
				lines[typ] = &bytes.Buffer{}
			}
			fmt.Fprintf(lines[typ], `{"resourceType":%q,"id":%q,"meta":{"lastUpdated":%q}}`+"\n", typ, id, v.lastUpdated.Format(time.RFC3339Nano))
		}
		for typ, b := range lines {
			w.put(t, exportsBkt, p.dir+"/"+op[strings.LastIndex(op, "/")+1:]+"_"+typ, b.String())
		}
		since := ""
		if !p.watermark.IsZero() {
			since = p.watermark.Format(time.RFC3339Nano)
		}
		p.flight = &pendingRecord{Pipeline: p.name, Store: store, Destination: "gs://" + exportsBkt + "/" + p.dir, Types: p.types,
			Since: since, Incremental: true, Operation: op}
		p.created = now
	}
	finish := func(p *modelPipeline, outcome string) {
		f := p.flight
		p.flight = nil
		if outcome == events.TypeFailed {
			return
		}
		op := &healthcare.Operation{Name: f.Operation, Done: true}
		meta := &healthcare.OperationMetadata{CreateTime: p.created.Format(time.RFC3339Nano), Counter: &healthcare.ProgressCounter{}}
		if outcome == events.TypePartial {
			meta.Counter.Failure = 1
		}
		var res feedResult
		w.retry(t, "writeFeed "+f.Operation, func() (err error) {
			res, err = w.x.writeFeed(ctx, *f, op, meta, outcome, p.cursor)
			return err
		})
		if rng.IntN(5) == 0 {
			// A crash before the manifest was written: the retry runs later,
			// with more notifications in.
			base := strings.TrimPrefix(f.Destination, "gs://"+exportsBkt+"/") + "/" + op.Name[strings.LastIndex(op.Name, "/")+1:]
			if err := w.st.Bucket(exportsBkt).Object(base + ".manifest.json").Delete(ctx); err != nil {
				t.Fatal(err)
			}
			w.clock.Advance(time.Duration(rng.IntN(120)) * time.Second)
			deliver(false)
			w.retry(t, "writeFeed again "+f.Operation, func() (err error) {
				res, err = w.x.writeFeed(ctx, *f, op, meta, outcome, p.cursor)
				return err
			})
		}
		if outcome == events.TypeSucceeded {
			if res.Cursor == nil {
				t.Fatalf("succeeded incremental run %s returned no cursor", f.Operation)
			}
			p.watermark, p.cursor = p.created, res.Cursor
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

	for _, p := range pipes {
		got := w.replay(t, rng, p.dir)
		for key, v := range model {
			typ, _, _ := strings.Cut(key, "/")
			if !p.wants(typ) {
				continue
			}
			g, ok := got[key]
			switch {
			case v.present && (!ok || !g.present || !g.lastUpdated.Equal(v.lastUpdated)):
				t.Errorf("pipeline %s: %s is in the store (lastUpdated %s), replay has %+v", p.name, key, v.lastUpdated.Format(time.RFC3339Nano), g)
			case !v.present && ok && g.present:
				t.Errorf("pipeline %s: %s was deleted at %s, replay has it (lastUpdated %s)", p.name, key, v.lastUpdated.Format(time.RFC3339Nano), g.lastUpdated.Format(time.RFC3339Nano))
			}
		}
		for key, g := range got {
			if typ, _, _ := strings.Cut(key, "/"); g.present && (!p.wants(typ) || model[key] == nil) {
				t.Errorf("pipeline %s: replay has %s, which the pipeline never should", p.name, key)
			}
		}
	}
}

// replay applies every manifest under dir, in random order, to an empty map:
// each output line upserts at its meta.lastUpdated, each deleted entry removes
// at its Bundle's meta.lastUpdated; the newest time wins.
func (w *feedWorld) replay(t *testing.T, rng *rand.Rand, dir string) map[string]modelVersion {
	t.Helper()
	var manifests []string
	for _, name := range w.objects(t, exportsBkt, dir+"/") {
		if strings.HasSuffix(name, ".manifest.json") {
			manifests = append(manifests, "gs://"+exportsBkt+"/"+name)
		}
	}
	rng.Shuffle(len(manifests), func(i, j int) { manifests[i], manifests[j] = manifests[j], manifests[i] })
	got := map[string]modelVersion{}
	apply := func(key string, at time.Time, present bool) {
		cur, ok := got[key]
		if ok && at.Equal(cur.lastUpdated) && present != cur.present {
			t.Errorf("replay: %s upserted and deleted at the same instant %s", key, at.Format(time.RFC3339Nano))
		}
		if !ok || at.After(cur.lastUpdated) {
			got[key] = modelVersion{lastUpdated: at, present: present}
		}
	}
	for _, u := range manifests {
		m := w.manifest(t, u)
		for _, o := range m.Output {
			sc := bufio.NewScanner(bytes.NewReader(w.read(t, o.URL)))
			for sc.Scan() {
				var r struct {
					ResourceType string `json:"resourceType"`
					ID           string `json:"id"`
					Meta         struct {
						LastUpdated string `json:"lastUpdated"`
					} `json:"meta"`
				}
				if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
					t.Fatal(err)
				}
				if r.ResourceType != o.Type {
					t.Errorf("%s: a %s in the %s output", u, r.ResourceType, o.Type)
				}
				apply(r.ResourceType+"/"+r.ID, mustTime(t, r.Meta.LastUpdated), true)
			}
		}
		for _, d := range m.Deleted {
			bs := w.bundles(t, d.URL)
			if d.Count == nil || *d.Count != int64(len(bs)) {
				t.Errorf("%s: deleted count %v, file has %d lines", u, d.Count, len(bs))
			}
			for _, b := range bs {
				apply(b.Entry[0].Request.URL, mustTime(t, b.Meta.LastUpdated), false)
			}
		}
	}
	return got
}
