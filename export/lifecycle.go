package export

// A run's life, in one place. A run is one store's export for one trigger (a
// fleet trigger makes one run per store). Its states and the objects that
// hold them (records.go):
//
//	claimed   runs/{run} status "claimed"; nothing else yet
//	queued    queue/{pipeline} holds it; runs/{run} status "queued"
//	starting  pending/{pipeline} names it without an operation; slots/{n} held.
//	          With Called set the export call's answer was lost: in doubt.
//	running   pending/{pipeline} names its operation; operations/{op} owns it
//	done      runs/{run} status "done" with Reported (or "failed" / "coalesced" with Final)
//	rejected  runs/{run} status "rejected" with Final: the trigger can never run
//
//	fleet trigger ─expand─► one trigger per listed store: allowed ─claim─► claimed, refused ─► rejected
//	trigger ─claim─► claimed ─admit─┬─► starting ─export─► running ─finish─► done
//	                                ├─► queued ──dequeue (sweep)──► starting
//	                                └─► coalesced (its pipeline already has a queued run)
//	starting ─429─► queued (backoff)     starting ─400/403/404─► failed
//	starting ─answer lost─► in doubt ─resolve─► running (adopted) | starting (no operation: export again)
//	starting, lease over, never redelivered ─sweep─► failed (code 4), or queued again when it came from the queue
//	running, lock corrupt ─rebuild (its records agree)─► running; otherwise its end is
//	          reported failed (code 13) and the lock quarantined; triggers queue behind it
//	pending/ object naming an operation no run owns ─sweep─► quarantined, no event
//	running ─past its timeout─► cancelled ─finish─► failed (code 4)
//	          (operations.cancel asked again each sweep until the operation shows cancelRequested)
//
// Every transition below writes in an order that makes a crash at any point
// repeat work instead of losing it or doing it twice:
//
//	expand      (fleet.go) list the dataset's stores (every page, sorted), skip
//	            those up to fleets/{trigger}'s cursor, then claim and admit each
//	            store's run as below, FleetWorkers at a time (runs of different
//	            stores share no object but the slots, taken DoesNotExist). After
//	            FleetSlice no store is taken: create or update (GenerationMatch)
//	            fleets/{trigger} with the last store up to which all are handled,
//	            and ask for a redelivery, which resumes after it. Crash: the
//	            redelivery resumes from the last cursor; claims make it idempotent.
//	claim       create runs/{run} (DoesNotExist). Exists: resume by status.
//	reject      create runs/{run} rejected with Final (DoesNotExist: a claim or an
//	            earlier rejection wins; a failed write is only logged), then the
//	            rejected event. A redelivery rejects again, or resumes the rejected
//	            run: it re-publishes Final.
//	admit       read pending/{pipeline}; free: list slots/, and while fewer are held
//	            (any number) than MAX_RUNNING, create slots/{n} (DoesNotExist), then
//	            create pending/{pipeline} (DoesNotExist). Crash between: the slot has no
//	            lock and the sweep frees it after the start lease.
//	enqueue     create queue/{pipeline} (DoesNotExist), then runs/{run} → queued, then
//	            the queued event. Crash: the redelivery finds its own queue record.
//	coalesce    update queue/{pipeline} (GenerationMatch) adding the trigger, then
//	            runs/{run} → coalesced with Final, then the rejected event.
//	export      fhirStores.export; then create operations/{op} (ownership), then
//	            update pending/{pipeline} with the operation (GenerationMatch), then the
//	            started event. A lost answer sets Called and the run is in doubt.
//	            operations/{op} keeps a copy of the lock: a lock found corrupt while
//	            its export runs is rebuilt from it (recover.go, GenerationMatch) when
//	            the lock's metadata, runs/{run} and operations/{op} agree.
//	resolve     take the lock's lease (GenerationMatch), operations.list every page of
//	            the dataset (no filter, no order), keeping the lease while it reads;
//	            candidates: ExportResources operations created from Locked to Called
//	            (or now) on our clock, ±CallSkew; read operations/{op} of those only.
//	            One owned by this run, or one nobody owns while no sibling run of the
//	            dataset is starting: adopt it (operations/{op} DoesNotExist decides
//	            races); for Cloud Storage, output under the destination confirms a
//	            candidate and ended ones that wrote elsewhere drop out; none: export
//	            again; several or undecided: give the lease back and wait (the next
//	            delivery or sweep looks again), then fail. Siblings are told by
//	            the lock listing's metadata (its dataset), without reading them.
//	            A resolution that fails before calling the API gives its lease back;
//	            after a call that timed out, "none" counts only once Called+CallSkew
//	            has passed (the request may still take effect); the lease ends there.
//	finish      (poll.go) take the finalize lease (GenerationMatch), [feed files],
//	            watermark (CAS), record the outcome event in pending/{pipeline}
//	            (GenerationMatch: a finalizer whose lease ran out gives way), publish
//	            it, runs/{run} → done with Reported, remove pending/{pipeline}, remove slots/{n}.
//	            Whoever finds a recorded outcome publishes that one, unchanged, without
//	            asking operations.get again.
//	endEarly    mark pending/{pipeline} ending with the failed event (GenerationMatch:
//	            whoever took the run over since decides instead), then runs/{run} →
//	            failed with Final, the event, remove the lock, the slot. Whoever
//	            finds a lock marked ending only finishes the ending.
//	cancel      (poll.go, watchdog) update pending/{pipeline} Cancelled (GenerationMatch),
//	            then operations.cancel. Refused or lost: the mark stays, and each
//	            sweep calls it again while the operation lacks cancelRequested.
//	dequeue     (queue.go) create slots/{n}, create pending/{pipeline} from the
//	            queue record, read runs/{run} again (ended meanwhile, by a sweep that
//	            dequeued it first: release, no export), remove queue/{pipeline}
//	            (GenerationMatch), export. A
//	            start that ends (400/403/404) frees its slot, and the same sweep
//	            gives it to the next queued run (not after a 429: the API is full). A
//	            requeue rewrites the record it finds of its own run (Requeues), so a
//	            dequeuer whose lease ran out before it removed the record leaves it.
//	            A queue record written late (after its run was dequeued and ended)
//	            never sets the run back to queued: its writer removes it, and a
//	            trigger finding it does not merge into it.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/fhirexport/fhirexport/events"
)

// lockMeta is the pending object's metadata: what a sweep needs from the
// listing alone, without reading the object.
func lockMeta(p pendingRecord) map[string]string {
	m := map[string]string{"run": p.Run, "started": p.Started.UTC().Format(time.RFC3339Nano)}
	if ds := datasetOf(p.Store); ds != "" {
		m["dataset"] = datasetKey(ds)
	}
	if p.Operation != "" {
		m["operation"] = p.Operation
	}
	if p.Timeout != "" {
		m["timeout"] = p.Timeout
	}
	if !p.Unobserved.IsZero() {
		m["unobserved"] = p.Unobserved.UTC().Format(time.RFC3339Nano)
	}
	if p.Cancelled != "" {
		m["cancelled"] = p.Cancelled
	}
	if p.Requeued != "" {
		m["requeued"] = p.Requeued
	}
	if p.Ending != nil {
		m["ending"] = "failed"
	}
	if p.Reported != nil {
		m["reported"] = strings.TrimPrefix(p.Reported.Type, events.TypePrefix)
	}
	if !p.Redelivered.IsZero() {
		m["redelivered"] = p.Redelivered.UTC().Format(time.RFC3339Nano)
	}
	if !p.Called.IsZero() {
		m["called"] = p.Called.UTC().Format(time.RFC3339Nano)
	}
	m["slot"] = strconv.Itoa(p.Slot)
	return m
}

// claim creates the run record; created is false when a delivery claimed it
// before (rec and gen then hold it). A corrupt record is replaced by a fresh
// claim: the pipeline lock still tells whether the run had started.
func (x *Exporter) claim(ctx context.Context, r *run) (rec runRecord, gen int64, created bool, err error) {
	spec, _ := json.Marshal(r.spec)
	fresh := runRecord{Trigger: r.ref, Pipeline: r.pipeline, Store: r.spec.FHIRStore, Status: statusClaimed, Claimed: x.now(), Spec: spec}
	_, err = x.state.create(ctx, runObject(r.key), fresh, nil)
	if err == nil {
		return fresh, 0, true, nil
	}
	if !errors.Is(err, ErrExists) {
		return rec, 0, false, fmt.Errorf("claim trigger %s: %w", r.trig.ID, err)
	}
	gen, err = x.state.read(ctx, runObject(r.key), &rec)
	switch {
	case errors.Is(err, ErrCorrupt):
		// While the pipeline lock names this run, the lock tells where it
		// is: a fresh claim lets admit carry on. Otherwise the run may have
		// finished already, and exporting again could duplicate it: end it,
		// saying how to run it again.
		var held pendingRecord
		if _, lerr := x.state.read(ctx, pendingObject(r.pipeline), &held); lerr == nil && held.Run == r.key {
			r.log.Error("run record is corrupt; its lock names it, so it is replaced with a fresh claim", "object", runObject(r.key), "error", err.Error())
			if _, err := x.state.update(ctx, runObject(r.key), gen, fresh, nil); err != nil {
				return rec, 0, false, fmt.Errorf("replace corrupt claim of trigger %s: %w", r.trig.ID, err)
			}
			return fresh, 0, true, nil
		}
		r.log.Error("run record is corrupt and no lock names the run; not exported again", "object", runObject(r.key), "error", err.Error())
		ev := events.Event{ID: eventID("failed", r.key), Type: events.TypeFailed, Source: SourceOf(r.spec.FHIRStore), Subject: r.trig.ID,
			Time: x.now(), Data: baseData(r.pending(x.now()))}
		ev.Data.Error = &events.Error{Code: codeInternal, Message: fmt.Sprintf(
			"the state object %s of this trigger is corrupt (%v); the run may have exported already, so it is not exported again: check with fhirexport show, and start it anew with fhirexport rerun or a new trigger", runObject(r.key), err)}
		ended := fresh
		ended.Status, ended.Final, ended.Ended = statusFailed, &ev, x.now()
		if _, err := x.state.update(ctx, runObject(r.key), gen, ended, nil); err != nil {
			return rec, 0, false, fmt.Errorf("replace corrupt claim of trigger %s: %w", r.trig.ID, err)
		}
		return ended, 0, false, nil
	case errors.Is(err, ErrNotFound): // released between our create and read
		return rec, 0, false, fmt.Errorf("trigger %s: claim released concurrently, retry: %w", r.trig.ID, errTransient)
	case err != nil:
		return rec, 0, false, fmt.Errorf("read claim of trigger %s: %w", r.trig.ID, err)
	}
	return rec, gen, false, nil
}

// admit starts a claimed run now, or queues it: when its pipeline is busy,
// when a run of its pipeline is already queued, or when no export slot is free.
func (x *Exporter) admit(ctx context.Context, r *run) error {
	deadline := x.now().Add(x.WaitForPeer)
	for {
		held, gen, err := x.readLock(ctx, r.pipeline) // a corrupt lock of a running export is rebuilt
		switch {
		case errors.Is(err, ErrCorrupt):
			if md, merr := x.lockMetadata(ctx, r.pipeline, gen); merr == nil && md["operation"] != "" {
				// Its records do not vouch for it, but an export may run: no
				// second one beside it. The sweep reports it when it ends.
				r.log.Error("pipeline lock is corrupt and names an operation; queued behind it", "object", pendingObject(r.pipeline), "operation", md["operation"], "error", err.Error())
				return x.enqueue(ctx, r, "busy")
			}
			r.log.Error("pipeline lock is corrupt; quarantined", "object", pendingObject(r.pipeline), "error", err.Error())
			if err := x.state.quarantine(ctx, pendingObject(r.pipeline), gen, err.Error()); err != nil {
				return err
			}
			continue
		case errors.Is(err, ErrNotFound):
			return x.admitFree(ctx, r)
		case err != nil:
			return fmt.Errorf("read lock of pipeline %s: %w", r.pipeline, err)
		}
		if held.Run != r.key {
			return x.enqueue(ctx, r, "busy")
		}
		if held.Operation != "" { // an earlier delivery started it; make sure started was published
			r.log.Info("duplicate delivery of a started run; acknowledged", "operation", held.Operation)
			return x.pub.Publish(ctx, startedEvent(held))
		}
		if held.Requeued != "" {
			return x.finishRequeue(ctx, held, gen)
		}
		if held.Ending != nil {
			return x.finishEnding(ctx, held, gen)
		}
		// Called after Started: the answer was lost and nobody has taken the
		// run over since (resolve moves Started on), so no wait is needed.
		if held.Called.After(held.Started) || x.now().Sub(held.Started) >= x.StartLease {
			return x.resolve(ctx, held, gen, false)
		}
		if !x.now().Before(deadline) {
			// Tell the sweep the trigger is being redelivered, so it does not
			// release this start as orphaned while a redelivery can take it over.
			held.Redelivered = x.now()
			_, _ = x.state.update(ctx, pendingObject(r.pipeline), gen, held, lockMeta(held))
			return fmt.Errorf("trigger %s: another delivery is starting this run; retry later: %w", r.trig.ID, errTransient)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// admitFree takes a slot and the pipeline's lock, then exports.
func (x *Exporter) admitFree(ctx context.Context, r *run) error {
	if _, _, err := x.readQueue(ctx, r.pipeline); err == nil {
		return x.enqueue(ctx, r, "busy") // a run of this pipeline is waiting: this one merges into it
	} else if !errors.Is(err, ErrNotFound) {
		return err
	}
	slot, ok, err := x.takeSlot(ctx, r.key, 0, r.pipeline)
	if err != nil {
		return err
	}
	if !ok {
		var held pendingRecord
		if _, err := x.state.read(ctx, pendingObject(r.pipeline), &held); err == nil {
			return x.admit(ctx, r) // the pipeline was taken meanwhile, perhaps by another delivery of this run
		}
		return x.enqueue(ctx, r, "budget")
	}
	p := r.pending(x.now())
	p.Slot = slot
	gen, err := x.state.create(ctx, pendingObject(r.pipeline), p, lockMeta(p))
	if err != nil {
		x.freeSlot(ctx, slot, r.key, 0)
		if errors.Is(err, ErrExists) {
			return x.admit(ctx, r) // another run took the pipeline meanwhile
		}
		return fmt.Errorf("lock pipeline %s: %w", r.pipeline, err)
	}
	// A poller may have finished this very run between our reading the claim
	// and taking the lock (a redelivery racing the sweep): read it again.
	var rec runRecord
	switch _, err := x.state.read(ctx, runObject(r.key), &rec); {
	case err != nil && !errors.Is(err, ErrCorrupt):
		x.release(ctx, p, gen)
		return fmt.Errorf("read claim of trigger %s: %w", r.trig.ID, err)
	case err == nil && rec.Status != statusClaimed:
		x.release(ctx, p, gen)
		return x.resume(ctx, r, rec, 0)
	}
	_, err = x.export(ctx, r.spec, p, gen)
	return err
}

// export calls fhirStores.export for a run holding its pipeline's lock at
// generation gen, and records what became of the call. ended reports a run
// the start ended for good (the API refused it: 400/403/404; a corrupt
// watermark): its slot is free for another run at once, and a dequeuing sweep
// gives it on. A 429 or an unsent call puts the run back without ending it.
func (x *Exporter) export(ctx context.Context, spec *Spec, p pendingRecord, gen int64) (ended bool, err error) {
	log := Logger(ctx).With("run", p.Run, "pipeline", p.Pipeline, "store", p.Store, "trigger", p.Trigger.ID)
	p.Since = spec.Since
	if p.Incremental {
		since, err := x.incrementalSince(ctx, p, spec.Since)
		if errors.Is(err, ErrCorrupt) {
			return true, x.endEarly(ctx, p, gen, codeFailedPrecondition, fmt.Sprintf(
				"%v; incremental runs of this pipeline are held until an operator resets it (fhirexport watermark reset %s)", err, p.Pipeline))
		}
		if err != nil {
			return false, x.giveBack(ctx, p, gen, err)
		}
		p.Since = since
	}
	// The call never outlives the lease that makes it ours: a takeover after
	// the lease cannot list operations while this call may still be accepted.
	// With less than half the lease left (a slow watermark read), renew it.
	remaining := p.Started.Add(x.StartLease).Sub(x.now())
	if remaining < x.StartLease/2 {
		p.Started = x.now()
		var err error
		if gen, err = x.state.update(ctx, pendingObject(p.Pipeline), gen, p, lockMeta(p)); err != nil {
			return false, fmt.Errorf("renew the start lease of run %s: %v: %w", p.Run, err, errTransient)
		}
		remaining = x.StartLease
	}
	callCtx, cancel := context.WithTimeout(ctx, min(time.Minute, remaining-x.StartLease/4))
	op, err := x.hc.Projects.Locations.Datasets.FhirStores.Export(p.Store, ExportRequest(spec, p.Destination, p.Since)).Context(callCtx).Do()
	cancel()
	switch {
	case err == nil:
		return false, x.recordOperation(ctx, p, gen, op.Name, false)
	case exhausted(err):
		log.Warn("export refused with 429 RESOURCE_EXHAUSTED; queued with backoff", "attempts", p.Attempts+1)
		return false, x.requeue(ctx, p, gen, "exhausted")
	case Permanent(err):
		code, msg := statusOf(err)
		log.Error("export refused by the Healthcare API", "code", code, "error", msg)
		return true, x.endEarly(ctx, p, gen, code, msg)
	case notSent(err):
		log.Warn("export call not sent; released for a retry", "error", err.Error())
		return false, x.giveBack(ctx, p, gen, fmt.Errorf("export %s: %w", p.Store, err))
	}
	// The request may have reached the API: never export again blindly.
	log.Warn("export answer lost; the run is in doubt until operations.list resolves it", "error", err.Error())
	p.Called, p.TimedOut = x.now(), errors.Is(err, context.DeadlineExceeded)
	if _, uerr := x.state.update(ctx, pendingObject(p.Pipeline), gen, p, lockMeta(p)); uerr != nil {
		log.Warn("could not mark the run in doubt; the start lease covers it", "error", uerr.Error())
	}
	return false, fmt.Errorf("export %s: answer lost, in doubt: %w", p.Store, err)
}

// giveBack undoes a start that failed before the API was called: a run from
// the queue goes back to it (no trigger will be redelivered for it); a
// trigger's run releases the lock and returns cause for Pub/Sub to retry.
func (x *Exporter) giveBack(ctx context.Context, p pendingRecord, gen int64, cause error) error {
	if p.FromQueue {
		if err := x.requeue(ctx, p, gen, "budget"); err != nil {
			return errors.Join(cause, err)
		}
		return nil
	}
	x.release(ctx, p, gen)
	return cause
}

// notSent reports a call that surely never reached the API (no connection).
func notSent(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

// recordOperation makes an operation this run's: operations/{op} first (so a
// crash before the lock names it leaves the ownership to find), then the lock,
// then the started event.
func (x *Exporter) recordOperation(ctx context.Context, p pendingRecord, gen int64, op string, adopted bool) error {
	log := Logger(ctx).With("run", p.Run, "pipeline", p.Pipeline, "operation", op, "trigger", p.Trigger.ID, "store", p.Store)
	own := opRecord{Operation: op, Run: p.Run, Pipeline: p.Pipeline, Store: p.Store, Recorded: x.now()}
	lock := p
	lock.Operation, lock.Adopted, lock.Called = op, adopted, time.Time{}
	own.Lock = &lock
	if _, err := x.state.create(ctx, opObject(op), own, map[string]string{"run": p.Run}); errors.Is(err, ErrExists) {
		var cur opRecord
		if _, rerr := x.state.read(ctx, opObject(op), &cur); rerr == nil && cur.Run != p.Run {
			return fmt.Errorf("operation %s belongs to run %s, not %s: %w", op, cur.Run, p.Run, errTransient)
		}
	} else if err != nil {
		log.Error("export started but not recorded; a retry finds it with operations.list", "error", err.Error())
		return fmt.Errorf("record operation %s: %w", op, err)
	}
	p.Operation, p.Adopted, p.Called, p.TimedOut = op, adopted, time.Time{}, false
	if _, err := x.state.update(ctx, pendingObject(p.Pipeline), gen, p, lockMeta(p)); err != nil {
		log.Error("export started but not recorded in the lock; a retry adopts it", "error", err.Error())
		return fmt.Errorf("record operation %s: %w", op, err)
	}
	log.Info("export started", "since", p.Since, "destination", p.Destination, "adopted", adopted)
	return x.outcome(ctx, startedEvent(p), "run", p.Run)
}

// resolve settles a starting run whose export call may have reached the API
// (its answer was lost, or its attempt died). fromSweep is set when no
// delivery of the trigger is at hand: an orphan without a lost answer is then
// reported failed (or queued again), rather than exported again.
func (x *Exporter) resolve(ctx context.Context, p pendingRecord, gen int64, fromSweep bool) error {
	log := Logger(ctx).With("run", p.Run, "pipeline", p.Pipeline, "store", p.Store, "trigger", p.Trigger.ID)
	called := p.Called
	if !fromSweep {
		p.Redelivered = x.now() // a delivery of the trigger is here: it is alive
	}
	p.Started = x.now() // our lease while we resolve (not before Called: see admit)
	if p.Started.Before(called) {
		p.Started = called
	}
	gen, err := x.state.update(ctx, pendingObject(p.Pipeline), gen, p, lockMeta(p))
	if err != nil {
		return fmt.Errorf("resolve run %s: %v: %w", p.Run, err, errTransient)
	}
	var rec runRecord
	if _, err := x.state.read(ctx, runObject(p.Run), &rec); err == nil && (rec.Status == statusDone || rec.Status == statusFailed) {
		if rec.Final != nil { // ended (endEarly) but the lock outlived it
			if err := x.pub.Publish(ctx, *rec.Final); err != nil {
				return err
			}
		}
		x.release(ctx, p, gen)
		return nil
	}
	// A long history takes a while to read: keep the lease meanwhile, so
	// the next delivery waits for this resolution instead of cutting it off.
	renew := func(ctx context.Context) error {
		if x.now().Sub(p.Started) < x.StartLease/2 {
			return nil
		}
		p.Started = x.now()
		g, err := x.state.update(ctx, pendingObject(p.Pipeline), gen, p, lockMeta(p))
		if err != nil {
			return fmt.Errorf("resolve run %s: renew its lease: %v: %w", p.Run, err, errTransient)
		}
		gen = g
		return nil
	}
	op, others, err := x.findOperation(ctx, p, renew)
	if err != nil {
		return x.yieldLease(ctx, p, gen, err)
	}
	switch {
	case op != "":
		log.Warn("adopting the operation the API started for this run", "operation", op)
		if p.Since == "" { // the call's _since was not recorded: it is still what the locked pipeline gives
			since, err := x.sinceOf(ctx, p)
			if err != nil {
				return x.yieldLease(ctx, p, gen, fmt.Errorf("adopt %s: %w", op, err))
			}
			p.Since = since
		}
		return x.recordOperation(ctx, p, gen, op, true)
	case others > 0:
		if !called.IsZero() && x.now().Sub(called) > x.InDoubtPatience {
			return x.endEarly(ctx, p, gen, codeUnknown, fmt.Sprintf(
				"the answer to fhirStores.export was lost and %d operations of the dataset could be this run's; none could be confirmed within %s, so no export was repeated (check them with gcloud healthcare operations list)", others, x.InDoubtPatience))
		}
		// Nothing is in progress while it waits: the lease goes back, so
		// the next delivery or sweep looks again at once.
		log.Warn("run in doubt: several unowned export operations could be this run's; waiting for their output to tell", "candidates", others)
		return x.yieldLease(ctx, p, gen, fmt.Errorf("run %s in doubt among %d operations: %w", p.Run, others, errTransient))
	case !called.IsZero() && p.TimedOut && x.now().Before(called.Add(x.CallSkew)):
		// A call that timed out may still be taking effect at the service:
		// "none" is an answer only once the window it could appear in has
		// passed. The lease ends then, so the next delivery looks again.
		p.Started = called.Add(x.CallSkew - x.StartLease)
		if _, err := x.state.update(ctx, pendingObject(p.Pipeline), gen, p, lockMeta(p)); err != nil {
			log.Warn("could not shorten the resolution's lease; it runs out", "error", err.Error())
		}
		return fmt.Errorf("run %s in doubt: no export of it is listed yet, and its call may still take effect until %s: %w", p.Run, called.Add(x.CallSkew).Format(time.RFC3339), errTransient)
	case fromSweep && called.IsZero() && x.now().Sub(p.Redelivered) < x.StartLease:
		return fmt.Errorf("run %s: its trigger is being redelivered; the redelivery resolves it: %w", p.Run, errTransient)
	case fromSweep && called.IsZero() && p.FromQueue:
		log.Warn("a dequeued start died before calling the API; queued again")
		return x.requeue(ctx, p, gen, "budget")
	case fromSweep && called.IsZero():
		return x.endEarly(ctx, p, gen, codeDeadlineExceeded, fmt.Sprintf(
			"the start of this run did not finish within its %s lease and its trigger was not redelivered; operations.list shows no export for it, so none runs; the pipeline is free for the next trigger", x.StartLease))
	}
	log.Warn("no export found for the run in doubt; exporting again")
	var spec Spec
	if err := json.Unmarshal(p.Spec, &spec); err != nil {
		return x.endEarly(ctx, p, gen, codeInternal, "the run's spec in its lock is unreadable: "+err.Error())
	}
	// Listing took time: renew the lease (and check it is still ours)
	// before calling the API again.
	p.Called, p.Started = time.Time{}, x.now()
	if gen, err = x.state.update(ctx, pendingObject(p.Pipeline), gen, p, lockMeta(p)); err != nil {
		return fmt.Errorf("resolve run %s: %v: %w", p.Run, err, errTransient)
	}
	_, err = x.export(ctx, &spec, p, gen)
	return err
}

// yieldLease gives up the lease a resolution took, when it failed before
// calling the API (a read or a listing failed): the next delivery or sweep
// resolves at once instead of being refused for a whole lease while nobody
// works on the run. Without it, a history whose reading kept failing held
// its trigger behind "another delivery is starting this run" for good.
func (x *Exporter) yieldLease(ctx context.Context, p pendingRecord, gen int64, cause error) error {
	p.Started = x.now().Add(-x.StartLease)
	if _, err := x.state.update(ctx, pendingObject(p.Pipeline), gen, p, lockMeta(p)); err != nil {
		Logger(ctx).Warn("could not give up the resolution's lease; it runs out", "run", p.Run, "pipeline", p.Pipeline, "error", err.Error())
	}
	return cause
}

// sinceOf is the _since a run of p's spec sends now.
func (x *Exporter) sinceOf(ctx context.Context, p pendingRecord) (string, error) {
	var spec Spec
	if err := json.Unmarshal(p.Spec, &spec); err != nil {
		return "", err
	}
	if !p.Incremental {
		return spec.Since, nil
	}
	return x.incrementalSince(ctx, p, spec.Since)
}

// endEarly ends a run that got no operation as failed. The lock is marked
// first, at the generation this start holds: a resolution that took the run
// over meanwhile (and may have exported) makes the mark fail, and whoever
// finds the mark only finishes the ending (finishEnding), never exports.
func (x *Exporter) endEarly(ctx context.Context, p pendingRecord, gen int64, code int32, msg string) error {
	ev := events.Event{
		ID: eventID("failed", p.Run), Type: events.TypeFailed, Source: SourceOf(p.Store),
		Subject: p.Trigger.ID, Time: x.now(), Data: baseData(p),
	}
	ev.Data.Error = &events.Error{Code: code, Message: msg}
	p.Ending = &ev
	gen, err := x.state.update(ctx, pendingObject(p.Pipeline), gen, p, lockMeta(p))
	if err != nil {
		return fmt.Errorf("end run %s: %v: %w", p.Run, err, errTransient)
	}
	return x.finishEnding(ctx, p, gen)
}

// finishEnding completes an ending whose lock is marked: the run record (with
// the event, so a late redelivery re-publishes it and starts nothing), the
// event, then the lock and the slot.
func (x *Exporter) finishEnding(ctx context.Context, p pendingRecord, gen int64) error {
	final, err := x.endRun(ctx, p.Run, statusFailed, p.Ending, "")
	if err != nil {
		return err
	}
	if final != nil {
		if err := x.outcome(ctx, *final, "run", p.Run); err != nil {
			return err
		}
	}
	x.release(ctx, p, gen)
	return nil
}

// outcome publishes an event a run reached and logs it as the one
// "export outcome" line deploy.sh's metrics and alerts count (event,
// pipeline, store, trigger, operation and error code from the event).
// Re-publishing an event already reported goes through Publisher directly.
func (x *Exporter) outcome(ctx context.Context, ev events.Event, attrs ...any) error {
	if err := x.pub.Publish(ctx, ev); err != nil {
		return err
	}
	d := ev.Data
	attrs = append(attrs, "event", strings.TrimPrefix(ev.Type, events.TypePrefix), "pipeline", d.Pipeline, "store", d.Store, "operation", d.Operation)
	if d.Trigger.ID != "" {
		attrs = append(attrs, "trigger", d.Trigger.ID)
	}
	if d.Error != nil {
		attrs = append(attrs, "code", d.Error.Code)
	}
	Logger(ctx).Info("export outcome", attrs...)
	return nil
}

// endRun records a run's terminal status with its event, and returns the
// event the run ended with, to publish: ev, or the event recorded when the
// run had ended before (a repeat publishes that one, unchanged), or nil when
// it ended without one (done: its finalizer published the outcome). An
// actor acting on stale state so never reports a run that ended otherwise.
func (x *Exporter) endRun(ctx context.Context, run, status string, ev *events.Event, into string) (*events.Event, error) {
	for {
		var rec runRecord
		gen, err := x.state.read(ctx, runObject(run), &rec)
		switch {
		case errors.Is(err, ErrNotFound), errors.Is(err, ErrCorrupt):
		case err != nil:
			return nil, fmt.Errorf("read run %s: %w", run, err)
		case ended(rec.Status):
			return rec.Final, nil
		}
		rec.Status, rec.Final, rec.Into, rec.Ended = status, ev, into, x.now()
		if gen == 0 {
			_, err = x.state.create(ctx, runObject(run), rec, nil)
		} else {
			_, err = x.state.update(ctx, runObject(run), gen, rec, nil)
		}
		if errors.Is(err, ErrExists) || errors.Is(err, ErrConflict) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("record %s run %s: %w", status, run, err)
		}
		return ev, nil
	}
}

// release removes the pipeline lock this run holds at gen, then its slot. A
// lock it cannot remove is resolved by a later sweep; a slot, freed there.
func (x *Exporter) release(ctx context.Context, p pendingRecord, gen int64) {
	if err := x.state.remove(ctx, pendingObject(p.Pipeline), gen); err != nil {
		Logger(ctx).Warn("could not release pipeline lock; a later sweep resolves it", "pipeline", p.Pipeline, "run", p.Run, "trigger", p.Trigger.ID, "error", err.Error())
		return
	}
	x.freeSlot(ctx, p.Slot, p.Run, p.Requeues)
}
