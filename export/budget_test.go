package export

// The export budget (FHIREXPORT_MAX_RUNNING), fleets, coalescing, 429
// backoff and crashes in the middle of a dequeue, against the emulators with
// a fake clock (DESIGN.md, "Fleets and budget"; issue 11). Each test has a
// world of its own, so they run in parallel.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cloud.google.com/go/storage"
	healthcare "google.golang.org/api/healthcare/v1"
	"google.golang.org/api/option"

	"github.com/fhirexport/fhirexport/events"
	"github.com/fhirexport/fhirexport/healthcaretest"
)

// quiet is the context of the Exporter's calls here: its logs would bury
// the tests' own.
var quiet = WithLogger(context.Background(), NewLogger(io.Discard, nil))

// fronts are HTTP handlers put between the Exporter and the fakes: fault
// injection as the Exporter sees it, while the emulator writes its exports
// and the test reads state directly.
type fronts struct {
	gcs func(next http.Handler) http.Handler
	hc  func(next http.Handler) http.Handler
}

// newFrontedWorld is newWorld with the Exporter's Cloud Storage and
// Healthcare traffic going through f (either may be nil).
func newFrontedWorld(t *testing.T, f fronts) *world {
	t.Helper()
	ctx := context.Background()
	s, clock := newWorldStack(t)
	st := s.Storage
	if f.gcs != nil {
		front := httptest.NewServer(f.gcs(proxyTo(t, s.GCSURL)))
		t.Cleanup(front.Close)
		var err error
		if st, err = storage.NewClient(ctx, option.WithEndpoint(front.URL+"/storage/v1/"), option.WithoutAuthentication(), storage.WithJSONReads()); err != nil {
			t.Fatal(err)
		}
	}
	hc := s.HealthcareService
	if f.hc != nil {
		front := httptest.NewServer(f.hc(proxyTo(t, s.Healthcare.URL)))
		t.Cleanup(front.Close)
		var err error
		if hc, err = healthcare.NewService(ctx, option.WithEndpoint(front.URL), option.WithoutAuthentication()); err != nil {
			t.Fatal(err)
		}
	}
	w := worldOn(t, s, clock, hc, st, clock.Now)
	w.x.WaitForPeer = 0 // a concurrent delivery asks for a redelivery at once
	return w
}

func proxyTo(t *testing.T, base string) http.Handler {
	t.Helper()
	u, err := url.Parse(base)
	if err != nil {
		t.Fatal(err)
	}
	return httputil.NewSingleHostReverseProxy(u)
}

// fleet creates a dataset with n R4 stores s000, s001, …
func (w *world) fleet(t *testing.T, n int) (dataset string, stores []string) {
	t.Helper()
	dataset = fmt.Sprintf("%s/datasets/fleet%d", testLocation, w.seq.Add(1))
	if err := w.emu.CreateDataset(dataset); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		s := fmt.Sprintf("%s/fhirStores/s%03d", dataset, i)
		if err := w.emu.CreateFHIRStore(s, "R4"); err != nil {
			t.Fatal(err)
		}
		stores = append(stores, s)
	}
	return dataset, stores
}

// newTrigger makes a trigger for spec with a fresh id.
func (w *world) newTrigger(t *testing.T, spec map[string]any) events.Trigger {
	t.Helper()
	data, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	return events.Trigger{Source: "//test", ID: fmt.Sprintf("t%d", w.seq.Add(1)), Spec: data}
}

// deliver delivers trig as Pub/Sub does: again while Start returns an error.
func (w *world) deliver(t *testing.T, trig events.Trigger) {
	t.Helper()
	var err error
	for range 20 {
		if err = w.x.Start(quiet, trig, nil); err == nil {
			return
		}
	}
	t.Errorf("trigger %s: Start kept failing: %v", trig.ID, err)
}

// event is a published outcome event, decoded.
type event struct {
	id, typ, source, subject string
	data                     events.Data
}

// events returns the published events, each id once (a re-publish after a
// crash repeats its id; consumers drop it).
func (w *world) events(t *testing.T) []event {
	t.Helper()
	seen := map[string]bool{}
	var out []event
	for _, m := range w.ps.Messages() {
		e := event{id: m.Attributes["ce-id"], typ: m.Attributes["ce-type"], source: m.Attributes["ce-source"], subject: m.Attributes["ce-subject"]}
		if seen[e.id] {
			continue
		}
		seen[e.id] = true
		if err := json.Unmarshal(m.Data, &e.data); err != nil {
			t.Fatalf("event %s: %v", e.id, err)
		}
		out = append(out, e)
	}
	return out
}

// count returns how many events of type typ each store got.
func count(evs []event, typ string) map[string]int {
	n := map[string]int{}
	for _, e := range evs {
		if e.typ == typ {
			n[e.data.Store]++
		}
	}
	return n
}

// objects lists the state objects under dir.
func (w *world) objects(t *testing.T, dir string) []string {
	t.Helper()
	objs, err := w.x.state.list(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, o := range objs {
		names = append(names, o.Name)
	}
	return names
}

// drain polls, moving the clock step before each sweep, until nothing is
// pending or queued; it fails the test after max sweeps.
func (w *world) drain(t *testing.T, step time.Duration, max int) (sweeps int) {
	t.Helper()
	for sweeps = 1; sweeps <= max; sweeps++ {
		w.clock.Advance(step)
		if _, err := w.x.Poll(quiet); err != nil {
			t.Logf("sweep %d: %v", sweeps, err)
		}
		if len(w.objects(t, "pending")) == 0 && len(w.objects(t, "queue")) == 0 {
			return sweeps
		}
	}
	t.Fatalf("still pending after %d sweeps: pending %v, queue %v", max, w.objects(t, "pending"), w.objects(t, "queue"))
	return sweeps
}

// refused counts fhirStores.export requests the emulator did not accept.
func refused(emu *healthcaretest.Server) int {
	return len(emu.ExportRequests()) - len(emu.Exports())
}

// exportsByStore counts accepted exports per store.
func exportsByStore(emu *healthcaretest.Server) map[string]int {
	n := map[string]int{}
	for _, e := range emu.Exports() {
		n[e.Store]++
	}
	return n
}

// TestFleetUnderBudget: one fleet trigger over 100 stores, 5 of them not on
// the allow-list, with a budget of 5 and an emulator that refuses a sixth
// running export. Every allowed store is exported exactly once, never more
// than 5 at a time, without a single 429; the runs beyond the budget are
// reported queued and then started, and started is published only when the
// export really starts. Redelivering the trigger creates nothing.
func TestFleetUnderBudget(t *testing.T) {
	t.Parallel()
	const stores, budget = 100, 5
	w := newFrontedWorld(t, fronts{})
	w.emu.SetMaxRunningOperations(budget)
	w.emu.SetExportTiming(time.Minute, 1)
	w.x.MaxRunning = budget
	dataset, names := w.fleet(t, stores)
	denied := map[string]bool{names[7]: true, names[42]: true, names[43]: true, names[80]: true, names[99]: true}
	var allowed []string
	for _, s := range names {
		if !denied[s] {
			allowed = append(allowed, s)
		}
	}
	policy, err := ParsePolicy(strings.Join(allowed, ","), "gs://"+exportsBkt)
	if err != nil {
		t.Fatal(err)
	}
	w.x.policy = policy

	trig := w.newTrigger(t, map[string]any{"fhirStore": dataset + "/fhirStores/*", "name": "nightly",
		"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/fleet/{store}/{date}"}})
	w.deliver(t, trig)

	evs := w.events(t)
	if got := len(w.emu.Exports()); got != budget {
		t.Errorf("exports started by the trigger = %d, want the budget, %d", got, budget)
	}
	if n := len(count(evs, events.TypeStarted)); n != budget {
		t.Errorf("started events after the trigger = %d, want %d (only runs that really started)", n, budget)
	}
	queued := 0
	for _, e := range evs {
		if e.typ == events.TypeQueued {
			queued++
			if e.data.Reason != "budget" {
				t.Errorf("queued %s: reason %q, want budget", e.data.Store, e.data.Reason)
			}
		}
	}
	if want := len(allowed) - budget; queued != want {
		t.Errorf("queued events = %d, want %d (every allowed run beyond the budget)", queued, want)
	}
	rejected := count(evs, events.TypeRejected)
	for s := range denied {
		if rejected[s] != 1 {
			t.Errorf("store %s not on the allow-list: %d rejected events, want 1", s, rejected[s])
		}
	}
	if len(rejected) != len(denied) {
		t.Errorf("rejected events for %d stores, want %d: %v", len(rejected), len(denied), rejected)
	}

	w.deliver(t, trig) // a redelivery: every run exists already
	if got := len(w.emu.Exports()); got != budget {
		t.Errorf("exports after a redelivery of the fleet trigger = %d, want still %d", got, budget)
	}

	sweeps := w.drain(t, time.Minute, 3*stores/budget)
	w.deliver(t, trig) // a late redelivery, after every run ended
	t.Logf("%d stores, budget %d: drained in %d sweeps (ideal %d)", len(allowed), budget, sweeps, (len(allowed)+budget-1)/budget)

	evs = w.events(t)
	got := exportsByStore(w.emu)
	succeeded, started := count(evs, events.TypeSucceeded), count(evs, events.TypeStarted)
	for _, s := range allowed {
		if got[s] != 1 || succeeded[s] != 1 || started[s] != 1 {
			t.Errorf("store %s: %d exports, %d started, %d succeeded events; want 1, 1, 1", s, got[s], started[s], succeeded[s])
		}
	}
	for s := range denied {
		if got[s] != 0 {
			t.Errorf("store %s is not on the allow-list but was exported %d times", s, got[s])
		}
	}
	for _, typ := range []string{events.TypeFailed, events.TypePartial} {
		if n := count(evs, typ); len(n) > 0 {
			t.Errorf("%s events: %v", typ, n)
		}
	}
	// started only once the run holds a slot: after its queued event.
	queuedAt := map[string]int{}
	for i, e := range evs {
		switch e.typ {
		case events.TypeQueued:
			queuedAt[e.data.Store] = i
		case events.TypeStarted:
			if q, ok := queuedAt[e.data.Store]; ok && q > i {
				t.Errorf("store %s: started published before queued", e.data.Store)
			}
		}
	}
	if peak := w.emu.PeakRunningOperations(); peak > budget {
		t.Errorf("peak running operations = %d, want ≤ %d", peak, budget)
	}
	if n := refused(w.emu); n != 0 {
		t.Errorf("fhirStores.export refused %d times (429), want 0", n)
	}
	if left := w.objects(t, "slots"); len(left) != 0 {
		t.Errorf("slots still taken at the end: %v", left)
	}
}

// TestTriggerStormOnePipeline: 50 triggers for one pipeline, the last 49
// concurrently, while its first run is running. One follow-up is queued, the
// other 48 are merged into it and reported rejected with code 10 naming it;
// at most two exports run in all.
func TestTriggerStormOnePipeline(t *testing.T) {
	t.Parallel()
	w := newFrontedWorld(t, fronts{})
	w.emu.SetExportTiming(time.Minute, 1)
	store := w.store(t)
	spec := map[string]any{"fhirStore": store, "name": "storm", "incremental": true,
		"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/storm"}}
	w.deliver(t, w.newTrigger(t, spec))
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for range 49 {
		trig := w.newTrigger(t, spec)
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			w.deliver(t, trig)
		}()
	}
	wg.Wait()
	if n := len(w.emu.Exports()); n != 1 {
		t.Errorf("exports while the first run is running = %d, want 1", n)
	}
	evs := w.events(t)
	var queuedRun string
	queued, merged := 0, 0
	for _, e := range evs {
		if e.typ == events.TypeQueued {
			queued++
			if e.data.Reason != "busy" {
				t.Errorf("queued reason %q, want busy", e.data.Reason)
			}
		}
	}
	q, _, err := w.x.readQueue(context.Background(), PipelineKey(mustSpec(t, spec)))
	if err != nil {
		t.Fatalf("no queued follow-up: %v", err)
	}
	queuedRun = q.Run
	for _, e := range evs {
		if e.typ != events.TypeRejected {
			continue
		}
		merged++
		if e.data.Error == nil || e.data.Error.Code != codeAborted || e.data.QueuedRun != queuedRun {
			t.Errorf("rejected event %s: error %+v, queuedRun %q; want code 10 naming %s", e.id, e.data.Error, e.data.QueuedRun, queuedRun)
		}
	}
	if queued != 1 || merged != 48 {
		t.Errorf("queued events = %d, merged (rejected) = %d; want 1 and 48", queued, merged)
	}
	w.drain(t, time.Minute, 10)
	evs = w.events(t)
	if n := len(w.emu.Exports()); n != 2 {
		t.Errorf("exports in all = %d, want 2 (the first run and one follow-up)", n)
	}
	if n := count(evs, events.TypeSucceeded)[store]; n != 2 {
		t.Errorf("succeeded events = %d, want 2", n)
	}
	if since := w.sinceSent(store); len(since) == 2 && since[1] == "" {
		t.Errorf("the follow-up exported everything; want _since = the first run's watermark")
	}
	if left := w.objects(t, "slots"); len(left) != 0 {
		t.Errorf("slots still taken at the end: %v", left)
	}
}

// everyNth answers 429 RESOURCE_EXHAUSTED to every nth fhirStores.export
// request before it reaches the emulator.
type everyNth struct {
	n     int64
	calls atomic.Int64
	hits  atomic.Int64
}

func (e *everyNth) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, ":export") && e.calls.Add(1)%e.n == 0 {
			e.hits.Add(1)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusTooManyRequests)
			io.WriteString(w, `{"error":{"code":429,"message":"injected: quota exceeded","status":"RESOURCE_EXHAUSTED"}}`)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// Test429EveryThirdCall: every third fhirStores.export answers 429. Each of
// 20 pipelines' runs is queued again with backoff (reason "exhausted"), never
// reported failed, never redelivered, and exported exactly once in the end.
func Test429EveryThirdCall(t *testing.T) {
	t.Parallel()
	inject := &everyNth{n: 3}
	w := newFrontedWorld(t, fronts{hc: inject.wrap})
	w.emu.SetExportTiming(time.Minute, 1)
	w.x.MaxRunning = 5
	w.x.RetryBackoff = time.Minute
	var stores []string
	for range 20 {
		store := w.store(t)
		stores = append(stores, store)
		trig := w.newTrigger(t, map[string]any{"fhirStore": store, "name": "p",
			"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/q/{store}"}})
		if err := w.x.Start(quiet, trig, nil); err != nil {
			t.Errorf("trigger for %s: Start returned %v; a 429 must not ask Pub/Sub to redeliver", store, err)
		}
	}
	sweeps := w.drain(t, 2*time.Minute, 200)
	evs := w.events(t)
	got := exportsByStore(w.emu)
	succeeded := count(evs, events.TypeSucceeded)
	for _, s := range stores {
		if got[s] != 1 || succeeded[s] != 1 {
			t.Errorf("store %s: %d exports, %d succeeded events; want 1 and 1", s, got[s], succeeded[s])
		}
	}
	if n := count(evs, events.TypeFailed); len(n) > 0 {
		t.Errorf("failed events: %v", n)
	}
	exhausted := 0
	for _, e := range evs {
		if e.typ == events.TypeQueued && e.data.Reason == "exhausted" {
			exhausted++
			if e.data.NotBefore == "" {
				t.Errorf("queued (exhausted) for %s without notBefore", e.data.Store)
			}
		}
	}
	// No retry before its backoff: each store's export after its last 429
	// comes at or after the notBefore it was queued with.
	notBefore := map[string]time.Time{}
	for _, e := range evs {
		if e.typ == events.TypeQueued && e.data.Reason == "exhausted" {
			nb, err := time.Parse(time.RFC3339, e.data.NotBefore)
			if err != nil {
				t.Fatalf("notBefore %q: %v", e.data.NotBefore, err)
			}
			notBefore[e.data.Store] = nb
		}
	}
	for _, e := range w.emu.Exports() {
		if nb, ok := notBefore[e.Store]; ok && e.CreateTime.Before(nb) {
			t.Errorf("store %s exported at %s, before its backoff ended (%s)", e.Store, e.CreateTime, nb)
		}
	}
	if hits := int(inject.hits.Load()); hits == 0 || exhausted != hits {
		t.Errorf("429 answers = %d, queued events with reason exhausted = %d; want equal and > 0", hits, exhausted)
	}
	t.Logf("%d export calls, %d answered 429, drained in %d sweeps", inject.calls.Load(), inject.hits.Load(), sweeps)
	if left := w.objects(t, "slots"); len(left) != 0 {
		t.Errorf("slots still taken at the end: %v", left)
	}
}

// crashPoint stops a process at its nth write to Cloud Storage: before the
// write takes effect, or after it took effect and before the answer. From
// then on every Cloud Storage and Healthcare request of the process fails, as
// if it had died; the next sweep is a new instance.
type crashPoint struct {
	n     int64 // 0: disarmed
	after bool
	mu    sync.Mutex
	seen  int64
	dead  bool
	steps []string // the writes seen while armed
}

func (c *crashPoint) arm(n int64, after bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.n, c.after, c.seen, c.dead, c.steps = n, after, 0, false, nil
}

func (c *crashPoint) disarm() (crashed bool, steps []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	crashed, steps = c.dead, c.steps
	c.n, c.dead = 0, false
	return crashed, steps
}

func isWrite(r *http.Request) bool { return r.Method != http.MethodGet && r.Method != http.MethodHead }

// refuse answers 403 to the requests match picks, as Cloud Storage answers
// an identity that lacks the permission; the others go through.
func refuse(match func(*http.Request) bool) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
			if match(r) {
				rw.Header().Set("Content-Type", "application/json")
				rw.WriteHeader(http.StatusForbidden)
				io.WriteString(rw, `{"error":{"code":403,"message":"injected: permission denied"}}`)
				return
			}
			next.ServeHTTP(rw, r)
		})
	}
}

func describeRequest(r *http.Request) string {
	p, _ := url.PathUnescape(r.URL.Path)
	if name := r.URL.Query().Get("name"); name != "" {
		p += " " + name
	}
	return r.Method + " " + p
}

// gcs fronts Cloud Storage.
func (c *crashPoint) gcs(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.mu.Lock()
		dead, crashNow, after := c.dead, false, c.after
		if !dead && c.n > 0 && isWrite(r) {
			c.seen++
			c.steps = append(c.steps, describeRequest(r))
			if c.seen == c.n {
				crashNow, c.dead = true, true
			}
		}
		c.mu.Unlock()
		switch {
		case crashNow && after:
			next.ServeHTTP(discard{w.Header()}, r) // it takes effect; the answer is lost
			fallthrough
		case crashNow || dead:
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusForbidden)
			io.WriteString(w, `{"error":{"code":403,"message":"injected: the instance crashed"}}`)
		default:
			next.ServeHTTP(w, r)
		}
	})
}

// hc fronts the Healthcare API: nothing reaches it from a dead instance.
func (c *crashPoint) hc(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.mu.Lock()
		dead := c.dead
		c.mu.Unlock()
		if dead {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, `{"error":{"code":503,"message":"injected: the instance crashed"}}`)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// discard is a ResponseWriter that drops the answer.
type discard struct{ h http.Header }

func (d discard) Header() http.Header         { return d.h }
func (d discard) Write(b []byte) (int, error) { return len(b), nil }
func (d discard) WriteHeader(int)             {}

// TestDequeueCrash crashes the sweep that finishes a run and starts the
// queued one, at each of its Cloud Storage writes, before and after the
// write takes effect; then sweeps run normally. No run is lost, none is
// exported twice, and no slot is leaked.
func TestDequeueCrash(t *testing.T) {
	t.Parallel()
	crashEveryWrite(t, 40, dequeueCrash)
}

// crashEveryWrite runs crashAt for the 1st, 2nd, … write, each before and
// after it takes effect, until a case reports it had fewer writes (every
// crash point covered) or max is passed.
func crashEveryWrite(t *testing.T, max int64, crashAt func(t *testing.T, n int64, after bool) (done bool)) {
	for n := int64(1); n <= max; n++ {
		last := false
		for _, after := range []bool{false, true} {
			name := fmt.Sprintf("write=%d/before", n)
			if after {
				name = fmt.Sprintf("write=%d/after", n)
			}
			ok := t.Run(name, func(t *testing.T) {
				if crashAt(t, n, after) {
					last = true
				}
			})
			if !ok {
				return
			}
		}
		if last {
			return
		}
	}
	t.Errorf("still more writes after %d: crash points past it were not tried (raise the bound)", max)
}

// dequeueCrash runs one crash case; it reports whether the sweep had fewer
// than n writes (every crash point is covered).
func dequeueCrash(t *testing.T, n int64, after bool) (done bool) {
	crash := &crashPoint{}
	w := newFrontedWorld(t, fronts{gcs: crash.gcs, hc: crash.hc})
	w.emu.SetExportTiming(time.Minute, 1)
	w.x.MaxRunning = 1
	first, second := w.store(t), w.store(t)
	for _, s := range []string{first, second} {
		w.deliver(t, w.newTrigger(t, map[string]any{"fhirStore": s, "name": "p", "incremental": true,
			"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/crash/{store}"}}))
	}
	if q := w.objects(t, "queue"); len(q) != 1 || len(w.emu.Exports()) != 1 {
		t.Fatalf("setup: queue %v, exports %d; want the second run queued behind the first", q, len(w.emu.Exports()))
	}

	w.clock.Advance(2 * time.Minute) // the first export is done
	crash.arm(n, after)
	_, _ = w.x.Poll(quiet)
	crashed, steps := crash.disarm()
	if !crashed {
		t.Logf("the sweep made %d writes; every crash point is covered: %s", len(steps), strings.Join(steps, "; "))
		done = true
	} else {
		t.Logf("crashed at %s", steps[len(steps)-1])
	}

	// Later sweeps, past every lease, by a healthy instance.
	w.drain(t, 3*time.Minute, 20)

	evs := w.events(t)
	got := exportsByStore(w.emu)
	succeeded := count(evs, events.TypeSucceeded)
	for _, s := range []string{first, second} {
		if got[s] != 1 || succeeded[s] != 1 {
			t.Errorf("store %s: %d exports, %d succeeded events; want 1 and 1 (writes of the crashed sweep: %v)", s, got[s], succeeded[s], steps)
		}
	}
	for _, typ := range []string{events.TypeFailed, events.TypePartial} {
		if n := count(evs, typ); len(n) > 0 {
			t.Errorf("%s events: %v", typ, n)
		}
	}
	if left := w.objects(t, "slots"); len(left) != 0 {
		t.Errorf("slots leaked: %v (writes of the crashed sweep: %v)", left, steps)
	}
	return done
}

// TestFleetCrashMidExpansion crashes the delivery of a fleet trigger at each
// of its Cloud Storage writes, before and after the write takes effect, and
// redelivers it: every store is still exported exactly once and no slot is
// leaked.
func TestFleetCrashMidExpansion(t *testing.T) {
	t.Parallel()
	crashEveryWrite(t, 200, fleetCrash)
}

func fleetCrash(t *testing.T, n int64, after bool) (done bool) {
	const stores, budget = 6, 2
	crash := &crashPoint{}
	w := newFrontedWorld(t, fronts{gcs: crash.gcs, hc: crash.hc})
	w.emu.SetExportTiming(time.Minute, 1)
	w.emu.SetMaxRunningOperations(budget)
	w.x.MaxRunning = budget
	// One worker: crash points are numbered in one delivery's write order.
	// (With stores resolved side by side, one store in doubt could once adopt
	// a sibling's unrecorded export; TestLostAnswerBesideAStartingSibling pins
	// that case.)
	w.x.FleetWorkers = 1
	dataset, names := w.fleet(t, stores)
	trig := w.newTrigger(t, map[string]any{"fhirStore": dataset + "/fhirStores/*", "name": "nightly",
		"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/fleet/{store}"}})
	crash.arm(n, after)
	err := w.x.Start(quiet, trig, nil)
	crashed, steps := crash.disarm()
	switch {
	case !crashed:
		if err != nil {
			t.Fatalf("Start without a crash: %v", err)
		}
		t.Logf("the delivery made %d writes; every crash point is covered", len(steps))
		done = true
	case err == nil:
		t.Logf("crashed at %s, yet Start returned nil: Pub/Sub will not redeliver", steps[len(steps)-1])
	}
	// Pub/Sub redelivers with backoff (10 s and up) until Start returns nil.
	for attempt := 0; err != nil || crashed; attempt++ {
		if attempt == 30 {
			t.Fatalf("redeliveries kept failing: %v", err)
		}
		w.clock.Advance(30 * time.Second)
		err, crashed = w.x.Start(quiet, trig, nil), false
	}
	w.drain(t, 3*time.Minute, 30)

	evs := w.events(t)
	got := exportsByStore(w.emu)
	succeeded := count(evs, events.TypeSucceeded)
	for _, s := range names {
		if got[s] != 1 || succeeded[s] != 1 {
			t.Errorf("store %s: %d exports, %d succeeded events; want 1 and 1 (crashed at write %d of %v)", s, got[s], succeeded[s], n, steps)
		}
	}
	if peak := w.emu.PeakRunningOperations(); peak > budget {
		t.Errorf("peak running operations = %d, want ≤ %d", peak, budget)
	}
	if left := w.objects(t, "slots"); len(left) != 0 {
		t.Errorf("slots leaked: %v", left)
	}
	return done
}

// TestSweepOfRunningExportsReadsNoLocks: a sweep over exports that are all
// still running, past their start lease, needs the listings and one
// operations.get per run; the pending listing already says which run holds
// which slot. reconcileSlots used to read the lock of every taken slot, one
// after the other: MaxRunning sequential reads per sweep (BENCHMARKS.md, the
// sweep under latency); now it reads only locks the listing did not confirm.
func TestSweepOfRunningExportsReadsNoLocks(t *testing.T) {
	t.Parallel()
	var reads atomic.Int64
	counting := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodGet && (r.URL.Query().Get("alt") == "media" || strings.Contains(r.URL.Path, "/download/")) {
				reads.Add(1)
			}
			next.ServeHTTP(w, r)
		})
	}
	w := newFrontedWorld(t, fronts{gcs: counting})
	w.emu.SetExportTiming(time.Hour, 1)
	const runs = 20
	w.x.MaxRunning = runs
	for range runs {
		w.deliver(t, w.newTrigger(t, map[string]any{"fhirStore": w.store(t), "name": "p",
			"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/r/{store}"}}))
	}
	w.clock.Advance(10 * time.Minute) // past the start lease, long before the end
	reads.Store(0)
	res, err := w.x.Poll(quiet)
	if err != nil || res.Running != runs {
		t.Fatalf("sweep: %+v, %v; want %d running", res, err, runs)
	}
	if n := reads.Load(); n != 0 {
		t.Errorf("a sweep over %d running exports read %d state objects; want 0 (the listings say everything)", runs, n)
	}
}

// TestConcurrentSweeps: every sweep run by two instances at once, the fleet
// trigger delivered twice (Pub/Sub may). The budget still holds and every
// store is exported once. Deliveries at the same moment are
// TestRedeliveryRacingTheFirstStart.
func TestConcurrentSweeps(t *testing.T) {
	t.Parallel()
	const stores, budget = 30, 3
	w := newFrontedWorld(t, fronts{})
	w.emu.SetMaxRunningOperations(budget)
	w.emu.SetExportTiming(time.Minute, 1)
	w.x.MaxRunning = budget
	dataset, names := w.fleet(t, stores)
	trig := w.newTrigger(t, map[string]any{"fhirStore": dataset + "/fhirStores/*", "name": "nightly",
		"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/both/{store}"}})
	w.deliver(t, trig)
	w.deliver(t, trig)
	var wg sync.WaitGroup
	for sweep := 1; ; sweep++ {
		if sweep > 10*stores/budget {
			t.Fatalf("still pending after %d sweeps: pending %v, queue %v", sweep, w.objects(t, "pending"), w.objects(t, "queue"))
		}
		w.clock.Advance(time.Minute)
		for range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				w.x.Poll(quiet) // errors: the other instance won a race; the next sweep settles it
			}()
		}
		wg.Wait()
		if len(w.objects(t, "pending")) == 0 && len(w.objects(t, "queue")) == 0 {
			break
		}
	}
	evs := w.events(t)
	got := exportsByStore(w.emu)
	succeeded := count(evs, events.TypeSucceeded)
	for _, s := range names {
		if got[s] != 1 || succeeded[s] != 1 {
			t.Errorf("store %s: %d exports, %d succeeded events; want 1 and 1", s, got[s], succeeded[s])
			for _, e := range w.emu.Exports() {
				if e.Store == s {
					t.Logf("  export %s created %s", e.Operation, e.CreateTime.Sub(time.Date(2026, 11, 26, 0, 0, 0, 0, time.UTC)))
				}
			}
			for _, e := range evs {
				if e.data.Store == s {
					t.Logf("  event %s run %s trigger %s op %s", e.typ, e.data.Trigger.ID, e.data.Pipeline, e.subject)
				}
			}
		}
	}
	if peak := w.emu.PeakRunningOperations(); peak > budget {
		t.Errorf("peak running operations = %d, want ≤ %d", peak, budget)
	}
	if n := refused(w.emu); n != 0 {
		t.Errorf("fhirStores.export refused %d times (429), want 0", n)
	}
	if left := w.objects(t, "slots"); len(left) != 0 {
		t.Errorf("slots still taken at the end: %v", left)
	}
}

// staleRead answers 404 to the next read of a pending/ object once armed: a
// delivery that read the pipeline's lock an instant before another delivery
// of the same trigger created it.
type staleRead struct{ armed atomic.Bool }

func (s *staleRead) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if p, _ := url.PathUnescape(r.URL.Path); r.Method == http.MethodGet && strings.Contains(p, "/fx/pending/") && s.armed.CompareAndSwap(true, false) {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusNotFound)
			io.WriteString(w, `{"error":{"code":404,"message":"No such object (stale: read before the other delivery created it)"}}`)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// TestRedeliveryRacingTheFirstStart: two deliveries of one trigger at the
// same moment while every export slot is taken (the first delivery took the
// last one). The second read the pipeline's lock just before the first
// created it, found no slot, and queued the very run the first one started;
// once that run ends, the sweep dequeued and exported it again. Now
// admitFree looks at the lock again before queueing, and startQueued drops a
// queued run that already ended.
func TestRedeliveryRacingTheFirstStart(t *testing.T) {
	t.Parallel()
	stale := &staleRead{}
	w := newFrontedWorld(t, fronts{gcs: stale.wrap})
	w.emu.SetExportTiming(time.Minute, 1)
	w.x.MaxRunning = 1
	store := w.store(t)
	trig := w.newTrigger(t, map[string]any{"fhirStore": store, "name": "p",
		"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/race"}})
	w.deliver(t, trig) // the first delivery: started, holding the only slot
	stale.armed.Store(true)
	w.deliver(t, trig) // the second, as if it had read the lock before the first created it
	w.drain(t, 2*time.Minute, 10)
	evs := w.events(t)
	if n, s := exportsByStore(w.emu)[store], count(evs, events.TypeSucceeded)[store]; n != 1 || s != 1 {
		t.Errorf("one trigger delivered twice: %d exports, %d succeeded events; want 1 and 1", n, s)
	}
	if n := count(evs, events.TypeQueued)[store]; n != 0 {
		t.Errorf("the started run was also reported queued (%d events)", n)
	}
}

// TestBudgetAboveTheAPILimit: FHIREXPORT_MAX_RUNNING set above what the
// project allows (5 against the API's 3). The API's 429s put runs back in
// the queue with backoff; every store is still exported once and none is
// reported failed.
func TestBudgetAboveTheAPILimit(t *testing.T) {
	t.Parallel()
	w := newFrontedWorld(t, fronts{})
	w.emu.SetMaxRunningOperations(3)
	w.emu.SetExportTiming(time.Minute, 1)
	w.x.MaxRunning = 5
	w.x.RetryBackoff = time.Minute
	dataset, names := w.fleet(t, 20)
	w.deliver(t, w.newTrigger(t, map[string]any{"fhirStore": dataset + "/fhirStores/*", "name": "n",
		"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/over/{store}"}}))
	w.drain(t, 2*time.Minute, 200)
	evs := w.events(t)
	got, succeeded := exportsByStore(w.emu), count(evs, events.TypeSucceeded)
	for _, s := range names {
		if got[s] != 1 || succeeded[s] != 1 {
			t.Errorf("store %s: %d exports, %d succeeded events; want 1 and 1", s, got[s], succeeded[s])
		}
	}
	if n := count(evs, events.TypeFailed); len(n) > 0 {
		t.Errorf("failed events: %v", n)
	}
	if refused(w.emu) == 0 {
		t.Errorf("the API never refused an export: the test does not test what it says")
	}
	if left := w.objects(t, "slots"); len(left) != 0 {
		t.Errorf("slots still taken at the end: %v", left)
	}
}

// TestBudgetLoweredWhileRunning: FHIREXPORT_MAX_RUNNING lowered from 4 to
// 2 (a redeploy) while 4 exports run, two runs queued. The new revision did
// not count slots numbered above its budget, so it started queued runs (and
// new triggers) while 3 still ran. Now no run starts while the running count
// is at or above the budget in force, whatever the slot numbers.
func TestBudgetLoweredWhileRunning(t *testing.T) {
	t.Parallel()
	w := newFrontedWorld(t, fronts{})
	w.x.MaxRunning = 4
	var stores []string
	trigger := func() string {
		store := w.store(t)
		stores = append(stores, store)
		w.deliver(t, w.newTrigger(t, map[string]any{"fhirStore": store, "name": "p",
			"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/low/{store}"}}))
		return store
	}
	w.emu.SetExportTiming(10*time.Minute, 1) // the run in slot 0 ends first
	trigger()
	w.emu.SetExportTiming(time.Hour, 1)
	for range 3 {
		trigger()
	}
	w.emu.SetExportTiming(10*time.Minute, 1)
	trigger()
	trigger()
	if n, q := len(w.emu.Exports()), len(w.objects(t, "queue")); n != 4 || q != 2 {
		t.Fatalf("setup: %d exports, %d queued; want 4 and 2", n, q)
	}

	w.x.MaxRunning = 2 // the new revision
	w.emu.ResetPeakRunningOperations()
	w.clock.Advance(11 * time.Minute)
	w.poll(t) // the run in slot 0 is reported; 3 still run
	if n := len(w.emu.Exports()); n != 4 {
		t.Errorf("exports after the first run ended = %d, want still 4 (3 run, the budget is 2)", n)
	}
	late := trigger() // a new trigger while 3 run: queued
	if n := exportsByStore(w.emu)[late]; n != 0 {
		t.Errorf("a trigger delivered while 3 exports run under a budget of 2 started its export")
	}

	w.drain(t, 5*time.Minute, 60)
	if peak := w.emu.PeakRunningOperations(); peak > 2 {
		t.Errorf("peak running exports after the budget was lowered to 2 = %d, want ≤ 2", peak)
	}
	evs := w.events(t)
	got, succeeded := exportsByStore(w.emu), count(evs, events.TypeSucceeded)
	for _, s := range stores {
		if got[s] != 1 || succeeded[s] != 1 {
			t.Errorf("store %s: %d exports, %d succeeded events; want 1 and 1", s, got[s], succeeded[s])
		}
	}
	if left := w.objects(t, "slots"); len(left) != 0 {
		t.Errorf("slots still taken at the end: %v", left)
	}
}

// TestQueuedRunWhoseStoreIsGone: with a budget of 1, two runs wait behind a
// running one; the store of the older was deleted meanwhile. The sweep that
// frees the slot reports the older failed (code 5, NOT_FOUND) once, never
// asks again, and gives the slot to the next queued run in the same sweep
// (the failed start used to count as one of the sweep's starts: the slot
// idled a tick).
func TestQueuedRunWhoseStoreIsGone(t *testing.T) {
	t.Parallel()
	w := newFrontedWorld(t, fronts{})
	w.emu.SetExportTiming(time.Minute, 1)
	w.x.MaxRunning = 1
	spec := func(store string) map[string]any {
		return map[string]any{"fhirStore": store, "name": "p",
			"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/gone/{store}"}}
	}
	first, gone, next := w.store(t), w.store(t), w.store(t)
	for _, s := range []string{first, gone, next} {
		w.deliver(t, w.newTrigger(t, spec(s)))
		w.clock.Advance(time.Second) // queued oldest first: gone, then next
	}
	if _, err := w.x.hc.Projects.Locations.Datasets.FhirStores.Delete(gone).Do(); err != nil {
		t.Fatal(err)
	}

	w.clock.Advance(2 * time.Minute) // the first run is done
	w.poll(t)
	if n := exportsByStore(w.emu)[next]; n != 1 {
		t.Errorf("exports of the next queued run in the sweep that freed the slot = %d, want 1", n)
	}
	w.drain(t, 2*time.Minute, 10)

	var failed []event
	for _, e := range w.events(t) {
		if e.typ == events.TypeFailed {
			failed = append(failed, e)
		}
	}
	if len(failed) != 1 || failed[0].data.Store != gone || failed[0].data.Error == nil || failed[0].data.Error.Code != 5 {
		t.Errorf("failed events = %+v; want one, for the deleted store, code 5", failed)
	}
	asked := 0
	for _, r := range w.emu.ExportRequests() {
		if strings.Contains(r.Path, gone+":export") {
			asked++
		}
	}
	if asked != 1 {
		t.Errorf("fhirStores.export requests for the deleted store = %d, want 1 (never retried)", asked)
	}
	if n := count(w.events(t), events.TypeSucceeded); n[first] != 1 || n[next] != 1 {
		t.Errorf("succeeded events = %v; want one each for the other two stores", n)
	}
}
