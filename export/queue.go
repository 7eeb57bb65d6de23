package export

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"cloud.google.com/go/storage"

	"github.com/fhirexport/fhirexport/events"
)

// The export budget: FHIREXPORT_MAX_RUNNING slots, each an object created
// with DoesNotExist, so concurrent instances can never run more exports than
// there are slots. Runs that find none, or find their pipeline busy, wait in
// queue/{pipeline}.json (one per pipeline) and PollExport starts them oldest
// first as slots free.

func slotObject(n int) string { return fmt.Sprintf("slots/%03d.json", n) }

// takeSlot takes a free export slot for a run's attempt (its Requeues); ok is
// false when the budget is used up. Every held slot counts, whatever its
// number: after FHIREXPORT_MAX_RUNNING was lowered, slots numbered above it
// still hold running exports. Of the numbers below the budget, only as many
// of the lowest free ones as the budget leaves are tried, so takers that
// listed the same slots race for the same objects instead of spilling into
// the next free number.
func (x *Exporter) takeSlot(ctx context.Context, run string, attempt int, pipeline string) (int, bool, error) {
	budget := max(1, x.MaxRunning)
	used := map[int]bool{}
	err := x.state.each(ctx, "slots", func(o stateObject) error {
		if n, ok := slotNumber(o.Name); ok {
			used[n] = true
		}
		return nil
	})
	if err != nil {
		return -1, false, err
	}
	left := budget - len(used)
	for n := 0; n < budget && left > 0; n++ {
		if used[n] {
			continue
		}
		left--
		name := slotObject(n)
		_, err := x.state.create(ctx, name, slotRecord{Run: run, Attempt: attempt, Pipeline: pipeline, Taken: x.now()},
			map[string]string{"run": run, "pipeline": pipeline, "taken": x.now().UTC().Format(time.RFC3339Nano)})
		if errors.Is(err, ErrExists) {
			continue
		}
		if err != nil {
			return -1, false, fmt.Errorf("take export slot: %w", err)
		}
		return n, true, nil
	}
	return -1, false, nil
}

// slotNumber is the slot a name under slots/ is, if it is one.
func slotNumber(name string) (int, bool) {
	n, err := strconv.Atoi(strings.TrimSuffix(name, ".json"))
	if err != nil || n < 0 || slotObject(n) != "slots/"+name {
		return 0, false
	}
	return n, true
}

// freeSlot removes slot n if this attempt of run still holds it: a stale
// release of an earlier attempt (its lock already gone, and the run
// dequeued again) must not free the slot the run holds now.
func (x *Exporter) freeSlot(ctx context.Context, n int, run string, attempt int) {
	if n < 0 {
		return
	}
	var s slotRecord
	gen, err := x.state.read(ctx, slotObject(n), &s)
	if err != nil || s.Run != run || s.Attempt != attempt {
		return
	}
	if err := x.state.remove(ctx, slotObject(n), gen); err != nil {
		Logger(ctx).Warn("could not free export slot; the sweep frees it", "slot", n, "error", err.Error())
	}
}

// reconcileSlots frees slots whose run does not hold its pipeline's lock any
// more (a crash between two steps), once the start lease is over.
// confirmed names pipelines whose lock, as listed by this sweep, is held by
// their slot's run: those locks are not read again.
func (x *Exporter) reconcileSlots(ctx context.Context, confirmed map[string]bool) (free int, err error) {
	taken := 0
	err = x.state.each(ctx, "slots", func(o stateObject) error {
		n, ok := slotNumber(o.Name)
		if !ok {
			Logger(ctx).Warn("unexpected object under slots/; ignored", "object", o.Name)
			return nil
		}
		// A slot object without our metadata would count as taken forever
		// (takeSlot goes by name): treat it as old, so the check below,
		// finding no lock that names it, frees it.
		at, _ := time.Parse(time.RFC3339Nano, o.Metadata["taken"])
		// Slots numbered at or above FHIREXPORT_MAX_RUNNING (it was lowered)
		// count too: their exports still run.
		taken++
		if x.now().Sub(at) < x.StartLease || confirmed[o.Metadata["pipeline"]] {
			return nil
		}
		var held pendingRecord
		if _, err := x.state.read(ctx, pendingObject(o.Metadata["pipeline"]), &held); err == nil && held.Run == o.Metadata["run"] {
			return nil
		} else if err != nil && !errors.Is(err, ErrNotFound) && !errors.Is(err, ErrCorrupt) {
			return nil
		}
		if err := x.state.remove(ctx, slotObject(n), o.Generation); err == nil {
			Logger(ctx).Warn("freed an export slot whose run no longer holds it", "slot", n, "run", o.Metadata["run"])
			taken--
		}
		return nil
	})
	return max(0, max(1, x.MaxRunning)-taken), err
}

func (x *Exporter) readQueue(ctx context.Context, pipeline string) (queueRecord, int64, error) {
	var q queueRecord
	gen, err := x.state.read(ctx, queueObject(pipeline), &q)
	if errors.Is(err, ErrCorrupt) {
		Logger(ctx).Error("queued run is corrupt; quarantined", "object", queueObject(pipeline), "error", err.Error())
		if qerr := x.endCorruptQueued(ctx, queueObject(pipeline), err); qerr != nil {
			return q, 0, qerr
		}
		if qerr := x.state.quarantine(ctx, queueObject(pipeline), gen, err.Error()); qerr != nil {
			return q, 0, qerr
		}
		return q, 0, fmt.Errorf("state %s: %w", queueObject(pipeline), ErrNotFound)
	}
	return q, gen, err
}

// endCorruptQueued reports the run a corrupt queue record names (in its
// metadata) failed, before the record is moved aside: otherwise the run would
// stay "queued" for good, its trigger without an outcome.
func (x *Exporter) endCorruptQueued(ctx context.Context, name string, cause error) error {
	attrs, err := x.state.bkt.Object(x.state.object(name)).Attrs(ctx)
	if err != nil {
		return x.state.classify(name, err, storage.Conditions{})
	}
	run := attrs.Metadata["run"]
	var rec runRecord
	if run == "" {
		return nil
	}
	if _, err := x.state.read(ctx, runObject(run), &rec); err != nil || rec.Status != statusQueued {
		return nil // unknown, or not waiting on this record: nothing to end
	}
	ev := events.Event{ID: eventID("failed", run), Type: events.TypeFailed, Source: SourceOf(rec.Store), Subject: rec.Trigger.ID,
		Time: x.now(), Data: events.Data{Store: rec.Store, Pipeline: rec.Pipeline, Trigger: rec.Trigger}}
	ev.Data.Error = &events.Error{Code: codeInternal, Message: fmt.Sprintf(
		"the queue record %s of this run is corrupt (%v); it was moved aside and the run was not started: start it again with fhirexport rerun %s", name, cause, run)}
	final, err := x.endRun(ctx, run, statusFailed, &ev, "")
	if err != nil || final == nil {
		return err
	}
	return x.outcome(ctx, *final, "run", run)
}

func queueMeta(q queueRecord) map[string]string {
	m := map[string]string{"run": q.Run, "enqueued": q.Enqueued.UTC().Format(time.RFC3339Nano)}
	if !q.NotBefore.IsZero() {
		m["notBefore"] = q.NotBefore.UTC().Format(time.RFC3339Nano)
	}
	return m
}

// enqueue queues a claimed run as its pipeline's next run, or merges it into
// the run already queued there.
func (x *Exporter) enqueue(ctx context.Context, r *run, reason string) error {
	q := queueRecord{pendingRecord: r.pending(x.now()), Enqueued: x.now(), Reason: reason}
	_, err := x.state.create(ctx, queueObject(r.pipeline), q, queueMeta(q))
	if errors.Is(err, ErrExists) {
		return x.coalesce(ctx, r)
	}
	if err != nil {
		return fmt.Errorf("queue run of pipeline %s: %w", r.pipeline, err)
	}
	return x.queueOrDrop(ctx, q)
}

// queued records a run as queued and reports it.
func (x *Exporter) queued(ctx context.Context, q queueRecord) error {
	reason := q.Reason
	if reason == "" {
		reason = "busy" // a record from before queue records kept their reason
	}
	for {
		var rec runRecord
		gen, err := x.state.read(ctx, runObject(q.Run), &rec)
		if err != nil && !errors.Is(err, ErrNotFound) && !errors.Is(err, ErrCorrupt) {
			return fmt.Errorf("read run %s: %w", q.Run, err)
		}
		if rec.Status == statusQueued {
			break
		}
		if ended(rec.Status) { // a late requeue or coalesce: the run was dequeued and ended meanwhile
			return errRunEnded
		}
		rec.Trigger, rec.Pipeline, rec.Store, rec.Status, rec.Spec = q.Trigger, q.Pipeline, q.Store, statusQueued, q.Spec
		if rec.Claimed.IsZero() {
			rec.Claimed = x.now()
		}
		if gen == 0 {
			_, err = x.state.create(ctx, runObject(q.Run), rec, nil)
		} else {
			_, err = x.state.update(ctx, runObject(q.Run), gen, rec, nil)
		}
		if errors.Is(err, ErrExists) || errors.Is(err, ErrConflict) {
			continue
		}
		if err != nil {
			return fmt.Errorf("record queued run %s: %w", q.Run, err)
		}
		break
	}
	d := baseData(q.pendingRecord)
	d.Reason = reason
	if !q.NotBefore.IsZero() {
		d.NotBefore = q.NotBefore.UTC().Format(time.RFC3339)
	}
	return x.outcome(ctx, events.Event{
		ID: eventID("queued", q.Run, strconv.Itoa(q.Requeues)), Type: events.TypeQueued, Source: SourceOf(q.Store),
		Subject: q.Trigger.ID, Time: x.now(), Data: d,
	}, "run", q.Run, "reason", reason)
}

// coalesce merges a trigger into its pipeline's queued run: at most one
// follow-up waits per pipeline, and an incremental one covers everything
// changed meanwhile.
func (x *Exporter) coalesce(ctx context.Context, r *run) error {
	for range 10 {
		q, gen, err := x.readQueue(ctx, r.pipeline)
		if errors.Is(err, ErrNotFound) {
			return x.admit(ctx, r) // dequeued meanwhile: try again from the start
		}
		if err != nil {
			return err
		}
		if q.Run == r.key { // our own queue record (a crash before the run record said so)
			return x.queueOrDrop(ctx, q)
		}
		var qrec runRecord
		if _, err := x.state.read(ctx, runObject(q.Run), &qrec); err == nil && ended(qrec.Status) {
			// A record put back late for a run that was dequeued and has ended: not a run to merge into.
			if err := x.state.remove(ctx, queueObject(r.pipeline), gen); err != nil && !errors.Is(err, ErrConflict) {
				return err
			}
			return x.admit(ctx, r)
		}
		if !slices.Contains(q.Coalesced, r.ref) {
			q.Coalesced = append(q.Coalesced, r.ref)
			if len(q.Coalesced) > 100 {
				q.Coalesced = q.Coalesced[len(q.Coalesced)-100:]
			}
			if _, err := x.state.update(ctx, queueObject(r.pipeline), gen, q, queueMeta(q)); errors.Is(err, ErrConflict) {
				continue
			} else if err != nil && !errors.Is(err, ErrNotFound) {
				return fmt.Errorf("coalesce into queued run %s: %w", q.Run, err)
			}
		}
		ev := events.Event{
			ID: eventID("coalesced", r.key), Type: events.TypeRejected, Source: SourceOf(r.spec.FHIRStore),
			Subject: r.trig.ID, Time: triggerTime(r.trig, x.now),
			Data: events.Data{Store: r.spec.FHIRStore, Pipeline: r.pipeline, Name: r.spec.Name, Labels: r.spec.Labels,
				Destination: r.dest, Types: r.types, Incremental: r.spec.Incremental, Trigger: r.ref, QueuedRun: q.Run,
				Error: &events.Error{Code: codeAborted, Message: fmt.Sprintf(
					"pipeline %s already has a queued run (%s, trigger %s); this trigger was merged into it and starts nothing of its own",
					r.pipeline, q.Run, q.Trigger.ID)}},
		}
		final, err := x.endRun(ctx, r.key, statusCoalesced, &ev, q.Run)
		if err != nil || final == nil {
			return err
		}
		r.log.Info("trigger merged into the pipeline's queued run", "queuedRun", final.Data.QueuedRun)
		return x.outcome(ctx, *final, "queuedRun", final.Data.QueuedRun)
	}
	return fmt.Errorf("queue of pipeline %s keeps changing; retry: %w", r.pipeline, errTransient)
}

// requeue puts a starting run back in the queue (429, or a dequeued start
// that died), releasing its lock and slot. The lock is marked first (its
// generation is our ownership), so whoever finds it marked only finishes the
// requeue and nobody exports the run meanwhile. A run of the pipeline queued
// meanwhile absorbs it instead.
func (x *Exporter) requeue(ctx context.Context, p pendingRecord, gen int64, reason string) error {
	p.Requeued = reason
	if reason == "exhausted" {
		p.Attempts++
	}
	gen, err := x.state.update(ctx, pendingObject(p.Pipeline), gen, p, lockMeta(p))
	if err != nil {
		return fmt.Errorf("queue run %s again: %v: %w", p.Run, err, errTransient)
	}
	return x.finishRequeue(ctx, p, gen)
}

// finishRequeue completes a requeue whose lock is marked: queue record, run
// record and event, then the lock and the slot.
func (x *Exporter) finishRequeue(ctx context.Context, p pendingRecord, gen int64) error {
	reason := p.Requeued
	q := queueRecord{pendingRecord: p, Enqueued: p.Started, Reason: reason}
	q.Operation, q.Called, q.Slot, q.FromQueue, q.Since, q.Requeued, q.Finalizing = "", time.Time{}, -1, false, "", "", time.Time{}
	q.Requeues = p.Requeues + 1
	if reason == "exhausted" {
		q.NotBefore = p.Started.Add(min(time.Hour, x.RetryBackoff<<min(max(q.Attempts, 1)-1, 6)))
	}
	cur, err := x.putBack(ctx, q)
	if err != nil {
		return fmt.Errorf("queue run %s again: %w", p.Run, err)
	}
	if cur != p.Run {
		ev := events.Event{
			ID: eventID("coalesced", p.Run), Type: events.TypeRejected, Source: SourceOf(p.Store), Subject: p.Trigger.ID,
			Time: x.now(), Data: baseData(p),
		}
		ev.Data.QueuedRun = cur
		ev.Data.Error = &events.Error{Code: codeAborted, Message: fmt.Sprintf("this run could not start (%s) and was merged into the pipeline's queued run %s", reason, cur)}
		final, err := x.endRun(ctx, p.Run, statusCoalesced, &ev, cur)
		if err != nil {
			return err
		}
		if final != nil { // nil: the run ended otherwise meanwhile (a stale finisher)
			if err := x.outcome(ctx, *final, "queuedRun", final.Data.QueuedRun); err != nil {
				return err
			}
		}
		x.release(ctx, p, gen)
		return nil
	}
	if err := x.queueOrDrop(ctx, q); err != nil {
		return err
	}
	x.release(ctx, p, gen)
	return nil
}

// queueOrDrop records the run of a queue record just written as queued and
// reports it; when the run has ended meanwhile (the write landed late,
// after another actor put the run back and it was dequeued and finished),
// it removes that stale record instead, so it neither runs the run again
// nor swallows the pipeline's next trigger.
func (x *Exporter) queueOrDrop(ctx context.Context, q queueRecord) error {
	err := x.queued(ctx, q)
	if !errors.Is(err, errRunEnded) {
		return err
	}
	Logger(ctx).Warn("a late queue record of an ended run; removed", "run", q.Run, "pipeline", q.Pipeline)
	if cur, qgen, rerr := x.readQueue(ctx, q.Pipeline); rerr == nil && cur.Run == q.Run && cur.Requeues == q.Requeues {
		if err := x.state.remove(ctx, queueObject(q.Pipeline), qgen); err != nil {
			Logger(ctx).Warn("could not remove a stale queue record; the sweep or the next trigger drops it", "run", q.Run, "error", err.Error())
		}
	}
	return nil
}

// errRunEnded: a queue record names a run that has ended since (a requeue
// or enqueue that landed late); it must not be queued again.
var errRunEnded = errors.New("run ended")

// ended reports a run record status no queue may bring back.
func ended(status string) bool {
	return status == statusDone || status == statusFailed || status == statusCoalesced || status == statusRejected
}

// putBack makes q its pipeline's queue record and returns the run the
// pipeline's queue now holds: q's, or another run's that q merges into.
//
// A record of q's run from before (its Requeues lower) is the one this run
// was started from: the sweep that started it may not have removed it yet,
// and would remove it once the lock is released, losing the run. Rewriting
// it with q's count gives it a new generation, so that removal fails and the
// starter sees the run was put back (startQueued).
func (x *Exporter) putBack(ctx context.Context, q queueRecord) (string, error) {
	for range 10 {
		_, err := x.state.create(ctx, queueObject(q.Pipeline), q, queueMeta(q))
		if err == nil {
			return q.Run, nil
		}
		if !errors.Is(err, ErrExists) {
			return "", err
		}
		cur, gen, err := x.readQueue(ctx, q.Pipeline)
		switch {
		case errors.Is(err, ErrNotFound):
			continue // dequeued meanwhile
		case err != nil:
			return "", err
		case cur.Run != q.Run || cur.Requeues >= q.Requeues:
			return cur.Run, nil
		}
		cur.Requeues, cur.NotBefore, cur.Attempts = q.Requeues, q.NotBefore, q.Attempts
		_, err = x.state.update(ctx, queueObject(q.Pipeline), gen, cur, queueMeta(cur))
		switch {
		case err == nil:
			return q.Run, nil
		case !errors.Is(err, ErrConflict) && !errors.Is(err, ErrNotFound):
			return "", err
		}
	}
	return "", fmt.Errorf("queue of pipeline %s keeps changing: %w", q.Pipeline, errTransient)
}

// dequeue starts queued runs, oldest first, while slots are free and their
// pipelines are idle. It returns how many it started.
func (x *Exporter) dequeue(ctx context.Context, free int) (int, error) {
	if free <= 0 {
		return 0, nil
	}
	type entry struct {
		pipeline string
		enqueued time.Time
	}
	var waiting []entry
	now := x.now()
	err := x.state.each(ctx, "queue", func(o stateObject) error {
		pipeline, ok := strings.CutSuffix(o.Name, ".json")
		at, err := time.Parse(time.RFC3339Nano, o.Metadata["enqueued"])
		if !ok || err != nil {
			Logger(ctx).Warn("unexpected object under queue/; ignored", "object", o.Name)
			return nil
		}
		if nb, err := time.Parse(time.RFC3339Nano, o.Metadata["notBefore"]); err == nil && now.Before(nb) {
			return nil
		}
		waiting = append(waiting, entry{pipeline, at})
		return nil
	})
	if err != nil {
		return 0, err
	}
	slices.SortFunc(waiting, func(a, b entry) int { return a.enqueued.Compare(b.enqueued) })
	started := 0
	var errs []error
	for _, w := range waiting {
		if started >= free {
			break
		}
		ok, err := x.startQueued(ctx, w.pipeline)
		if errors.Is(err, errNoSlot) {
			break // another instance took the last free slot: not an error
		}
		if err != nil {
			errs = append(errs, err)
		}
		if ok {
			started++
		}
	}
	return started, errors.Join(errs...)
}

var errNoSlot = errors.New("no export slot free")

// startQueued moves one pipeline's queued run to starting and exports it.
// ok reports a start attempt that counts against the sweep's free slots; one
// ended for good (its store gone: 404) does not, and leaves its slot to the
// next queued run. A 429 counts: the API is saturated, no more is tried for it.
func (x *Exporter) startQueued(ctx context.Context, pipeline string) (bool, error) {
	q, qgen, err := x.readQueue(ctx, pipeline)
	if errors.Is(err, ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	var held pendingRecord
	hgen, err := x.state.read(ctx, pendingObject(pipeline), &held)
	if !errors.Is(err, ErrNotFound) {
		switch {
		case err != nil || held.Run != q.Run: // busy (or unreadable: the sweep deals with the lock)
		case held.Requeued != "": // its requeue has not released the lock yet: finish it
			return false, x.finishRequeue(ctx, held, hgen)
		case held.Ending != nil: // ended without an operation, lock not yet released
			return false, x.finishEnding(ctx, held, hgen)
		case held.Operation != "": // started by a sweep that died before removing the queue record
			_ = x.state.remove(ctx, queueObject(pipeline), qgen)
		}
		return false, nil
	}
	// A delivery that raced the run's own first start can have queued a run
	// that then started and finished: it must not export again.
	var rec runRecord
	if _, err := x.state.read(ctx, runObject(q.Run), &rec); err == nil && (rec.Status == statusDone || rec.Status == statusFailed || rec.Status == statusCoalesced) {
		Logger(ctx).Warn("queued run already ended; its queue record removed", "run", q.Run, "status", rec.Status)
		return false, x.state.remove(ctx, queueObject(pipeline), qgen)
	}
	slot, ok, err := x.takeSlot(ctx, q.Run, q.Requeues, pipeline)
	if err != nil {
		return false, err
	}
	if !ok {
		return false, errNoSlot
	}
	p := q.pendingRecord
	p.Slot, p.FromQueue, p.Locked, p.Started, p.Called, p.Operation = slot, true, x.now(), x.now(), time.Time{}, ""
	gen, err := x.state.create(ctx, pendingObject(pipeline), p, lockMeta(p))
	if err != nil {
		x.freeSlot(ctx, slot, q.Run, q.Requeues)
		if errors.Is(err, ErrExists) {
			return false, nil
		}
		return false, err
	}
	// A sweep slow between reading the run above and taking its lock can
	// find it dequeued, exported and reported by another sweep meanwhile:
	// the lock this create found free was that run's, removed after the run
	// ended. So, as a delivery does, read the run again under the lock; one
	// that ended is not exported again (its queue record, if still there,
	// is stale).
	var now runRecord
	switch _, err := x.state.read(ctx, runObject(q.Run), &now); {
	case err != nil && !errors.Is(err, ErrNotFound) && !errors.Is(err, ErrCorrupt):
		x.release(ctx, p, gen)
		return false, fmt.Errorf("read queued run %s: %w", q.Run, err)
	case err == nil && ended(now.Status):
		x.release(ctx, p, gen)
		Logger(ctx).Warn("queued run ended while this sweep dequeued it; not exported again", "run", q.Run, "pipeline", pipeline, "status", now.Status)
		return false, x.state.remove(ctx, queueObject(pipeline), qgen)
	}
	for {
		err := x.state.remove(ctx, queueObject(pipeline), qgen)
		if err == nil || errors.Is(err, ErrNotFound) {
			break
		}
		if !errors.Is(err, ErrConflict) {
			return false, err // the lock names this run; the next sweep removes the queue record
		}
		cur, cgen, err := x.readQueue(ctx, pipeline)
		if err != nil {
			break
		}
		if cur.Run != q.Run || cur.Requeues != q.Requeues {
			// Our lock's lease ran out meanwhile and a sweep put the run back
			// in the queue (or another run is queued): that record is not ours
			// to remove, and our lock is no longer ours.
			Logger(ctx).Warn("queued run was put back in the queue while this sweep started it; left queued", "run", q.Run, "pipeline", pipeline)
			return false, nil
		}
		qgen = cgen // a trigger coalesced meanwhile: it is in this run too
	}
	var spec Spec
	if err := json.Unmarshal(p.Spec, &spec); err != nil {
		return false, x.endEarly(ctx, p, gen, codeInternal, "the queued run's spec is unreadable: "+err.Error())
	}
	Logger(ctx).Info("starting a queued run", "run", p.Run, "pipeline", pipeline, "slot", slot)
	ended, err := x.export(ctx, &spec, p, gen)
	return !ended, err
}
