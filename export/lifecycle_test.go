package export

// Races between the transitions of lifecycle.go, made deterministic by
// holding one request of the Exporter at a chosen point.

import (
	"maps"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fhirexport/fhirexport/events"
)

// TestOrphanEndingRacesARedelivery: a start died before calling the API and
// the sweep, after the lease, lists the dataset's operations to resolve it.
// Its listing is slow; meanwhile its own lease runs out, a late redelivery
// of the trigger takes the run over, finds nothing, and exports. The sweep
// then sees its (old) listing without an operation. It used to report the
// run failed (code 4) while the redelivery's export ran on and was reported
// succeeded too: two outcomes for one trigger, and a failure reported for
// data that was exported. The sweep's ending now marks the lock at the
// generation it holds first, so it gives way to the redelivery.
func TestOrphanEndingRacesARedelivery(t *testing.T) {
	t.Parallel()
	// The first operations.list reaches the emulator; its answer is held:
	// the sweep acts on a listing older than what happens meanwhile.
	held := holdRequest(true, func(r *http.Request) bool {
		return r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/operations")
	})
	w := newFrontedWorld(t, fronts{hc: held.wrap})
	w.emu.SetExportTiming(time.Minute, 1)
	store := w.store(t)
	trig := w.newTrigger(t, map[string]any{"fhirStore": store, "name": "p",
		"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/race"}})

	// A delivery that claimed the run and took the lock, then died.
	spec, err := ParseSpec(trig.Spec)
	if err != nil {
		t.Fatal(err)
	}
	r, err := w.x.newRun(trig, spec, RunKey(trig.Source, trig.ID), Logger(quiet))
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := w.x.claim(quiet, r); err != nil {
		t.Fatal(err)
	}
	p := r.pending(w.clock.Now())
	if _, err := w.x.state.create(quiet, pendingObject(p.Pipeline), p, lockMeta(p)); err != nil {
		t.Fatal(err)
	}

	w.clock.Advance(3 * time.Minute) // past the start lease
	swept := make(chan error, 1)
	go func() {
		_, err := w.x.Poll(quiet)
		swept <- err
	}()
	<-held.reached // the sweep took the lease and has its (empty) listing

	w.clock.Advance(3 * time.Minute) // the sweep's lease is over too
	if err := w.x.Start(quiet, trig, nil); err != nil {
		t.Fatalf("the late redelivery: %v", err)
	}
	close(held.release)
	if err := <-swept; err != nil {
		t.Logf("the racing sweep: %v", err)
	}
	w.drain(t, time.Minute, 10)

	evs := w.events(t)
	if n := len(w.emu.Exports()); n != 1 {
		t.Errorf("%d exports for one trigger, want 1", n)
	}
	for typ, want := range map[string]int{events.TypeStarted: 1, events.TypeSucceeded: 1, events.TypeFailed: 0} {
		if got := count(evs, typ)[store]; got != want {
			t.Errorf("%s events: %d, want %d", typ, got, want)
		}
	}
}

// heldRequest holds the first request matching match until release is
// closed: before it reaches the server, or (after) once the server has acted
// on it, holding its answer.
type heldRequest struct {
	after   bool
	match   func(*http.Request) bool
	once    sync.Once
	reached chan struct{}
	release chan struct{}
}

func holdRequest(after bool, match func(*http.Request) bool) *heldRequest {
	return &heldRequest{after: after, match: match, reached: make(chan struct{}), release: make(chan struct{})}
}

func (h *heldRequest) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		first := false
		if h.match(r) {
			h.once.Do(func() { first = true })
		}
		switch {
		case !first:
			next.ServeHTTP(w, r)
		case h.after:
			rec := httptest.NewRecorder()
			next.ServeHTTP(rec, r)
			close(h.reached)
			<-h.release
			maps.Copy(w.Header(), rec.Header())
			w.WriteHeader(rec.Code)
			_, _ = w.Write(rec.Body.Bytes())
		default:
			close(h.reached)
			<-h.release
			next.ServeHTTP(w, r)
		}
	})
}

// TestRequeueRacesTheDequeuer: a sweep starts a queued run (slot, lock) and
// is slow to remove the queue record; the lock's lease runs out and another
// sweep puts the run back in the queue, finding the old record still there.
// The slow sweep then removed that record and the run was in neither the
// queue nor a lock: never exported, never reported. The requeue now rewrites
// the record, the slow removal fails, and the run is exported once.
func TestRequeueRacesTheDequeuer(t *testing.T) {
	t.Parallel()
	held := holdRequest(false, func(r *http.Request) bool {
		return r.Method == http.MethodDelete && strings.Contains(r.URL.Path, "fx/queue/")
	})
	w := newFrontedWorld(t, fronts{gcs: held.wrap})
	w.emu.SetExportTiming(time.Minute, 1)
	w.x.MaxRunning = 1
	first, second := w.store(t), w.store(t)
	spec := func(store string) map[string]any {
		return map[string]any{"fhirStore": store, "name": "p", "gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/requeue/{store}"}}
	}
	w.deliver(t, w.newTrigger(t, spec(first)))  // takes the only slot
	w.deliver(t, w.newTrigger(t, spec(second))) // queued for the budget

	w.clock.Advance(2 * time.Minute) // the first export is done
	swept := make(chan error, 1)
	go func() {
		_, err := w.x.Poll(quiet) // finishes the first run, starts the second: held at removing its queue record
		swept <- err
	}()
	<-held.reached

	w.clock.Advance(3 * time.Minute) // the second run's start lease is over
	var p pendingRecord
	gen, err := w.x.state.read(quiet, pendingObject(PipelineKey(mustSpec(t, spec(second)))), &p)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.x.resolve(quiet, p, gen, true); err != nil { // another sweep: no operation, from the queue: queued again
		t.Fatalf("resolve: %v", err)
	}
	close(held.release)
	if err := <-swept; err != nil {
		t.Logf("the slow sweep: %v", err)
	}
	w.drain(t, 2*time.Minute, 10)

	evs := w.events(t)
	for _, s := range []string{first, second} {
		if n, ok := exportsByStore(w.emu)[s], count(evs, events.TypeSucceeded)[s]; n != 1 || ok != 1 {
			t.Errorf("store %s: %d exports, %d succeeded events; want 1 and 1", s, n, ok)
		}
	}
}

// TestCorruptQueueRecordEndsItsRun: a queue record that cannot be decoded is
// moved aside, and the run its metadata names is reported failed (code 13,
// telling how to start it again) instead of staying "queued" for good with
// its trigger never answered.
func TestCorruptQueueRecordEndsItsRun(t *testing.T) {
	t.Parallel()
	w := newFrontedWorld(t, fronts{})
	w.emu.SetExportTiming(time.Minute, 1)
	w.x.MaxRunning = 1
	first, second := w.store(t), w.store(t)
	spec := func(store string) map[string]any {
		return map[string]any{"fhirStore": store, "name": "p", "gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/cq/{store}"}}
	}
	w.deliver(t, w.newTrigger(t, spec(first)))
	w.deliver(t, w.newTrigger(t, spec(second))) // queued for the budget
	pipeline := PipelineKey(mustSpec(t, spec(second)))
	q, _, err := w.x.readQueue(quiet, pipeline)
	if err != nil {
		t.Fatal(err)
	}
	obj := w.storage.Bucket("state").Object("fx/" + queueObject(pipeline))
	wr := obj.NewWriter(quiet)
	wr.Metadata = queueMeta(q)
	if _, err := wr.Write([]byte("{not json")); err != nil {
		t.Fatal(err)
	}
	if err := wr.Close(); err != nil {
		t.Fatal(err)
	}
	w.drain(t, 2*time.Minute, 10)

	evs := w.events(t)
	if n := exportsByStore(w.emu)[second]; n != 0 {
		t.Errorf("the corrupt queued run was exported %d times", n)
	}
	var failed []event
	for _, e := range evs {
		if e.typ == events.TypeFailed && e.data.Store == second {
			failed = append(failed, e)
		}
	}
	if len(failed) != 1 || failed[0].data.Error == nil || failed[0].data.Error.Code != codeInternal ||
		!strings.Contains(failed[0].data.Error.Message, "fhirexport rerun "+q.Run) {
		t.Fatalf("failed events of the corrupt queued run: %+v; want one, code 13, saying how to rerun it", failed)
	}
	var rec runRecord
	if _, err := w.x.state.read(quiet, runObject(q.Run), &rec); err != nil || rec.Status != statusFailed {
		t.Errorf("run record %+v (%v), want failed", rec, err)
	}
	if n := len(w.objects(t, "quarantine")); n == 0 {
		t.Errorf("the corrupt queue record was not moved aside")
	}
}

// TestStaleFinalizerAfterLaterRun: a sweep reporting a finished incremental
// run is slow (held at reading the watermark) until its finalize lease runs
// out. Another sweep reports the run, releases the pipeline, and the
// pipeline's next run moves the watermark further on. The slow sweep then
// went on with a watermark past its run's, and published the first run's
// succeeded event again under the same id but with watermarkAdvanced false:
// two different events for one id, which consumers deduplicating by id
// cannot reconcile. A finalizer now records its outcome in the lock at the
// generation its lease holds before publishing, so the stale one gives way.
func TestStaleFinalizerAfterLaterRun(t *testing.T) {
	t.Parallel()
	var armed atomic.Bool
	held := holdRequest(false, func(r *http.Request) bool {
		return armed.Load() && r.Method == http.MethodGet && strings.Contains(r.URL.Path, "fx/watermarks/")
	})
	w := newFrontedWorld(t, fronts{gcs: held.wrap})
	w.emu.SetExportTiming(time.Minute, 1)
	store := w.store(t)
	spec := map[string]any{"fhirStore": store, "name": "inc", "incremental": true,
		"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/stale"}}
	w.deliver(t, w.newTrigger(t, spec))
	w.clock.Advance(2 * time.Minute) // the first export is done

	armed.Store(true)
	swept := make(chan error, 1)
	go func() {
		_, err := w.x.Poll(quiet) // takes the finalize lease, then waits on the watermark
		swept <- err
	}()
	<-held.reached

	w.clock.Advance(3 * time.Minute) // past the slow sweep's finalize lease
	if _, err := w.x.Poll(quiet); err != nil {
		t.Fatalf("the second sweep: %v", err)
	}
	w.deliver(t, w.newTrigger(t, spec)) // the pipeline's next run
	w.clock.Advance(2 * time.Minute)
	if _, err := w.x.Poll(quiet); err != nil {
		t.Fatalf("the sweep finishing the next run: %v", err)
	}
	close(held.release)
	if err := <-swept; err != nil {
		t.Logf("the slow sweep: %v", err)
	}
	w.drain(t, time.Minute, 10)

	byID := map[string]string{}
	for _, m := range w.ps.Messages() {
		id := m.Attributes["ce-id"]
		if prev, ok := byID[id]; ok && prev != string(m.Data) {
			t.Errorf("event %s published twice with different data:\n%s\n%s", id, prev, m.Data)
		}
		byID[id] = string(m.Data)
	}
	if got := count(w.events(t), events.TypeSucceeded)[store]; got != 2 {
		t.Errorf("succeeded events: %d, want 2 (one a run)", got)
	}
}
