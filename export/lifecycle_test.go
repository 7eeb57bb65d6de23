package export

// Races between the transitions of lifecycle.go, made deterministic by
// holding one request of the Exporter at a chosen point.

import (
	"bytes"
	"maps"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fhirexport/fhirexport/events"
	"github.com/fhirexport/fhirexport/healthcaretest/stacktest"
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

	w.startingLock(t, trig, lockMeta) // a delivery that claimed the run and took the lock, then died

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

// queuedBehindTheBudget makes two stores under a budget of one export: the
// first store's run holds the only slot, the second's waits in the queue.
func (w *world) queuedBehindTheBudget(t *testing.T, dir string) (first, second string, spec func(string) map[string]any) {
	t.Helper()
	w.emu.SetExportTiming(time.Minute, 1)
	w.x.MaxRunning = 1
	first, second = w.store(t), w.store(t)
	spec = func(store string) map[string]any {
		return map[string]any{"fhirStore": store, "name": "p", "gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/" + dir + "/{store}"}}
	}
	w.deliver(t, w.newTrigger(t, spec(first)))  // takes the only slot
	w.deliver(t, w.newTrigger(t, spec(second))) // queued for the budget
	return first, second, spec
}

// exportedOnce checks that each store got one export and one succeeded event.
func (w *world) exportedOnce(t *testing.T, stores ...string) {
	t.Helper()
	evs := w.events(t)
	for _, s := range stores {
		if n, ok := exportsByStore(w.emu)[s], count(evs, events.TypeSucceeded)[s]; n != 1 || ok != 1 {
			t.Errorf("store %s: %d exports, %d succeeded events; want 1 and 1", s, n, ok)
		}
	}
}

// startingLock makes trig's run claimed and holding its pipeline's lock
// without an operation, as a delivery that died before the export call
// leaves it; meta gives the lock's metadata.
func (w *world) startingLock(t *testing.T, trig events.Trigger, meta func(pendingRecord) map[string]string) pendingRecord {
	t.Helper()
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
	if _, err := w.x.state.create(quiet, pendingObject(p.Pipeline), p, meta(p)); err != nil {
		t.Fatal(err)
	}
	return p
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
	first, second, spec := w.queuedBehindTheBudget(t, "requeue")

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
	w.exportedOnce(t, first, second)
}

// TestStaleDequeuerAfterTheRunEnded: a sweep reads a queued run's record
// (still queued), then is slow to take its slot; meanwhile another sweep
// dequeues the run, exports it, and a third reports it succeeded and frees
// the lock and the slot. The slow sweep then took the free slot and lock,
// found the queue record gone (as if it had removed it itself) and exported
// the run a second time: two exports of PHI for one trigger (the fault suite
// met it at 2,000 triggers). A dequeuer now reads the run again once its
// lock is taken, as a delivery does, and gives way to a run that ended.
func TestStaleDequeuerAfterTheRunEnded(t *testing.T) {
	t.Parallel()
	var armed atomic.Bool
	held := holdRequest(false, func(r *http.Request) bool {
		return armed.Load() && r.Method == http.MethodPost && strings.Contains(r.URL.Query().Get("name"), "fx/slots/")
	})
	w := newFrontedWorld(t, fronts{gcs: held.wrap})
	first, second, _ := w.queuedBehindTheBudget(t, "stale")

	w.clock.Advance(2 * time.Minute) // the first export is done
	armed.Store(true)
	slow := make(chan error, 1)
	go func() {
		_, err := w.x.Poll(quiet) // finishes the first run; held taking a slot for the second
		slow <- err
	}()
	<-held.reached
	if _, err := w.x.Poll(quiet); err != nil { // another sweep dequeues and exports the second run
		t.Logf("the second sweep: %v", err)
	}
	w.clock.Advance(2 * time.Minute)
	if _, err := w.x.Poll(quiet); err != nil { // and the next reports it, freeing its lock and slot
		t.Logf("the third sweep: %v", err)
	}
	if n := count(w.events(t), events.TypeSucceeded)[second]; n != 1 {
		t.Fatalf("the second run was not reported before the slow sweep went on (%d succeeded events)", n)
	}
	close(held.release)
	if err := <-slow; err != nil {
		t.Logf("the slow sweep: %v", err)
	}
	w.drain(t, 2*time.Minute, 10)
	w.exportedOnce(t, first, second)
	if left := w.objects(t, "slots"); len(left) != 0 {
		t.Errorf("slots left taken: %v", left)
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

	w.sameIDSameData(t)
	if got := count(w.events(t), events.TypeSucceeded)[store]; got != 2 {
		t.Errorf("succeeded events: %d, want 2 (one a run)", got)
	}
}

// TestLateRequeueFinisher: a 429 puts a run back in the queue, and the
// requeuer's create of the queue record is slow. A sweep finishes the
// requeue meanwhile (every actor finding the lock marked does), the run is
// dequeued, exported and reported; then the slow create lands. It used to
// leave a queue record of the ended run, and its run record set back to
// "queued": the next sweep exported the run a second time.
func TestLateRequeueFinisher(t *testing.T) {
	t.Parallel()
	held := holdRequest(false, queueCreate)
	w := newFrontedWorld(t, fronts{gcs: held.wrap})
	w.emu.SetExportTiming(time.Minute, 1)
	store := w.store(t)
	trig := w.newTrigger(t, map[string]any{"fhirStore": store, "name": "p", "incremental": true,
		"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/late"}})
	w.emu.FailNext("fhirStores.export", 1, 429)

	started := make(chan error, 1)
	go func() { started <- w.x.Start(quiet, trig, nil) }() // 429: marks the lock Requeued, its putBack create is held
	<-held.reached

	// Sweeps finish the requeue, dequeue the run, export it and report it.
	w.clock.Advance(2 * time.Minute)
	w.drain(t, time.Minute, 10)

	close(held.release) // the requeuer's create lands now
	<-started
	w.drain(t, time.Minute, 10)

	evs := w.events(t)
	if n, ok := len(w.emu.Exports()), count(evs, events.TypeSucceeded)[store]; n != 1 || ok != 1 {
		t.Errorf("%d exports and %d succeeded events for one trigger, want 1 and 1", n, ok)
	}
	w.sameIDSameData(t)
}

// TestLateRequeueRecordAndTheNextTrigger: as TestLateRequeueFinisher, but
// the slow create lands while the dequeued run is running; the run is
// reported, and the pipeline's next trigger arrives before any dequeue
// removes the stale record. That trigger used to be merged into the ended
// run (rejected) and never exported.
func TestLateRequeueRecordAndTheNextTrigger(t *testing.T) {
	t.Parallel()
	held := holdRequest(false, queueCreate)
	w := newFrontedWorld(t, fronts{gcs: held.wrap})
	w.emu.SetExportTiming(time.Minute, 1)
	store := w.store(t)
	spec := map[string]any{"fhirStore": store, "name": "p", "incremental": true,
		"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/late"}}
	trig := w.newTrigger(t, spec)
	w.emu.FailNext("fhirStores.export", 1, 429)

	started := make(chan error, 1)
	go func() { started <- w.x.Start(quiet, trig, nil) }()
	<-held.reached
	w.clock.Advance(2 * time.Minute)
	if _, err := w.x.Poll(quiet); err != nil { // finishes the requeue, dequeues, exports
		t.Log(err)
	}
	close(held.release)
	<-started

	w.clock.Advance(2 * time.Minute)
	objs, err := w.x.state.list(quiet, "pending")
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range objs { // the finishing part of a sweep, before its dequeue
		if err := w.x.sweepOne(quiet, o, &sweepCounters{}); err != nil {
			t.Log(err)
		}
	}

	w.deliver(t, w.newTrigger(t, spec)) // the pipeline's next trigger
	w.drain(t, time.Minute, 10)
	evs := w.events(t)
	for _, e := range evs {
		if e.typ == events.TypeRejected {
			t.Errorf("rejected: trigger %s: %s", e.data.Trigger.ID, e.data.Error.Message)
		}
	}
	if n, ok := len(w.emu.Exports()), count(evs, events.TypeSucceeded)[store]; n != 2 || ok != 2 {
		t.Errorf("%d exports and %d succeeded events for two triggers, want 2 and 2", n, ok)
	}
	w.sameIDSameData(t)
}

// queueCreate matches the create (DoesNotExist) of a queue record.
func queueCreate(r *http.Request) bool {
	if r.Method != http.MethodPost || r.URL.Query().Get("ifGenerationMatch") != "0" {
		return false
	}
	return bytes.Contains(stacktest.PeekBody(r), []byte(`"name":"fx/queue/`))
}

// sameIDSameData fails the test when two published events share a ce-id
// but not their data: consumers deduplicating by id could not reconcile them.
func (w *world) sameIDSameData(t *testing.T) {
	t.Helper()
	byID := map[string]string{}
	for _, m := range w.ps.Messages() {
		id := m.Attributes["ce-id"]
		if prev, ok := byID[id]; ok && prev != string(m.Data) {
			t.Errorf("event %s published twice with different data:\n%s\n%s", id, prev, m.Data)
		}
		byID[id] = string(m.Data)
	}
}

// TestStaleRequeueFinisherAfterItsRunEnded: a finisher of a requeue that
// stalled until its run had been dequeued, exported and reported, and until
// the pipeline had queued another run, found that run's queue record and
// merged its own run into it: a rejected event for a trigger that had
// already succeeded. A run's end is now recorded once (endRun), and an actor
// finding it ended otherwise publishes nothing.
func TestStaleRequeueFinisherAfterItsRunEnded(t *testing.T) {
	t.Parallel()
	w := newFrontedWorld(t, fronts{})
	w.emu.SetExportTiming(time.Minute, 1)
	w.x.MaxRunning = 1
	a, b := w.store(t), w.store(t)
	spec := func(store string) map[string]any {
		return map[string]any{"fhirStore": store, "name": "p", "gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/stalerq/{store}"}}
	}
	first := w.newTrigger(t, spec(a))
	w.deliver(t, first)
	var stale pendingRecord // the lock as the stalled finisher saw it, marked requeued
	if _, err := w.x.state.read(quiet, pendingObject(PipelineKey(mustSpec(t, spec(a)))), &stale); err != nil {
		t.Fatal(err)
	}
	stale.Requeued, stale.Operation = "exhausted", ""
	w.drain(t, 2*time.Minute, 10)          // the first run succeeds
	w.deliver(t, w.newTrigger(t, spec(b))) // takes the only slot
	w.deliver(t, w.newTrigger(t, spec(a))) // the pipeline's next run: queued for the budget
	if q, _, err := w.x.readQueue(quiet, stale.Pipeline); err != nil || q.Run == stale.Run {
		t.Fatalf("the pipeline's queue should hold its next run: %q, %v", q.Run, err)
	}
	if err := w.x.finishRequeue(quiet, stale, 1); err != nil { // the stalled finisher wakes up
		t.Logf("the stale finisher: %v", err)
	}
	evs := w.events(t)
	for _, e := range evs {
		if e.typ == events.TypeRejected && e.data.Trigger.ID == first.ID {
			t.Errorf("trigger %s succeeded and was then reported rejected: %s", first.ID, e.data.Error.Message)
		}
	}
	if got := count(evs, events.TypeSucceeded)[a]; got != 1 {
		t.Errorf("succeeded events of store a: %d, want 1", got)
	}
}

// TestStaleReleaseKeepsTheNextAttemptsSlot: a release by an attempt whose
// lock is gone (a requeue finished it, and the run was dequeued again) used
// to free the slot the run's next attempt holds, by run alone: one more
// export than FHIREXPORT_MAX_RUNNING could then start. A slot now names the
// attempt that took it.
func TestStaleReleaseKeepsTheNextAttemptsSlot(t *testing.T) {
	t.Parallel()
	w := newFrontedWorld(t, fronts{})
	w.emu.SetExportTiming(time.Minute, 1)
	w.x.MaxRunning = 1
	store := w.store(t)
	trig := w.newTrigger(t, map[string]any{"fhirStore": store, "name": "p", "gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/slot"}})
	w.emu.FailNext("fhirStores.export", 1, 429)
	w.deliver(t, trig) // 429: back in the queue, attempt 1
	w.clock.Advance(time.Hour)
	if _, err := w.x.Poll(quiet); err != nil { // dequeued: attempt 1 takes the slot and exports
		t.Fatal(err)
	}
	slots := w.objects(t, "slots")
	if len(slots) != 1 {
		t.Fatalf("slots %v, want one taken", slots)
	}
	n, _ := strconv.Atoi(strings.TrimSuffix(slots[0], ".json"))
	w.x.freeSlot(quiet, n, RunKey(trig.Source, trig.ID), 0) // the first attempt's late release
	if got := w.objects(t, "slots"); len(got) != 1 {
		t.Errorf("slots after a stale release: %v, want the running attempt's kept", got)
	}
}

// TestRecordedOutcomeNeedsNoOperationsGet: a sweep decided a run's outcome and
// recorded it in the lock, then failed to mark the run done. Until then each
// later sweep asked operations.get again before finishing the bookkeeping, so
// a failing or refused get held the run (its lock, its slot, the pipeline's
// next trigger) although nothing was left to learn from the API.
func TestRecordedOutcomeNeedsNoOperationsGet(t *testing.T) {
	t.Parallel()
	var refuseRuns atomic.Bool
	gcs := refuse(func(r *http.Request) bool {
		return refuseRuns.Load() && isWrite(r) && strings.Contains(r.URL.Query().Get("name"), "fx/runs/")
	})
	w := newFrontedWorld(t, fronts{gcs: gcs})
	w.emu.SetExportTiming(time.Minute, 1)
	store := w.store(t)
	trig := w.newTrigger(t, map[string]any{"fhirStore": store, "gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/recorded/{store}"}})
	w.deliver(t, trig)

	w.clock.Advance(2 * time.Minute) // the export is done
	refuseRuns.Store(true)
	if _, err := w.x.Poll(quiet); err == nil {
		t.Fatal("the sweep marked the run done although its run record could not be written")
	}
	refuseRuns.Store(false)
	if p := w.objects(t, "pending"); len(p) != 1 {
		t.Fatalf("pending %v, want the lock with its recorded outcome", p)
	}
	w.emu.FailRate("operations.get", 1, 1, http.StatusServiceUnavailable)
	t.Cleanup(func() { w.emu.FailRate("operations.get", 0, 0) })
	w.clock.Advance(10 * time.Second)
	if _, err := w.x.Poll(quiet); err != nil {
		t.Fatalf("the next sweep did not finish the recorded run: %v", err)
	}
	if p := w.objects(t, "pending"); len(p) != 0 {
		t.Errorf("pending %v after the sweep, want none", p)
	}
	var rec runRecord
	if _, err := w.x.state.read(quiet, runObject(RunKey(trig.Source, trig.ID)), &rec); err != nil || rec.Status != statusDone {
		t.Errorf("run record %+v (%v), want done", rec, err)
	}
	if n := count(w.events(t), events.TypeSucceeded)[store]; n != 1 {
		t.Errorf("succeeded events = %d, want 1", n)
	}
}
