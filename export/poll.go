package export

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/api/googleapi"
	healthcare "google.golang.org/api/healthcare/v1"

	"github.com/fhirexport/fhirexport/events"
)

// SweepResult counts what one poll sweep saw and did.
type SweepResult struct {
	Pending   int // pending markers found
	Running   int // operations still running
	Finished  int // outcomes reported and markers removed
	Starting  int // locks whose start has not recorded an operation yet
	Transient int // markers left for the next sweep after a transient failure
	Resolved  int // starting locks past their lease that were resolved
	Dequeued  int // queued runs started
	Garbage   int // objects under pending/ that are not fhirexport's
}

type sweepCounters struct {
	running, finished, starting, transient, resolved atomic.Int64
}

// Poll checks every pending export once with operations.get and reports each
// finished one, resolves start locks past their lease, frees slots left by
// crashes, then starts queued runs as slots allow. The listing streams into
// the workers: memory does not grow with the number of pending runs.
// Transient failures leave the marker for the next sweep; they are counted,
// logged and returned joined.
func (x *Exporter) Poll(ctx context.Context) (SweepResult, error) {
	log := Logger(ctx)
	var res SweepResult
	var c sweepCounters
	var mu sync.Mutex
	var errs []error
	addErr := func(err error) {
		mu.Lock()
		errs = append(errs, err)
		mu.Unlock()
	}
	jobs := make(chan sweepJob)
	var wg sync.WaitGroup
	for range max(1, x.PollWorkers) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				o := j.o
				if err := x.sweepListed(ctx, j, &c); err != nil {
					c.transient.Add(1)
					log.Warn("poll: left for the next sweep", "object", "pending/"+o.Name, "operation", o.Metadata["operation"], "error", err.Error())
					addErr(err)
				}
			}
		}()
	}
	// Which run holds each taken slot (at most FHIREXPORT_MAX_RUNNING), so the
	// pending listing confirms their holders without reading their locks.
	slotRuns := map[string]string{}
	_ = x.state.each(ctx, "slots", func(o stateObject) error {
		slotRuns[o.Metadata["pipeline"]] = o.Metadata["run"]
		return nil
	})
	confirmed := map[string]bool{}
	var garbage []string
	err := x.state.each(ctx, "pending", func(o stateObject) error {
		run, ok := slotRuns[strings.TrimSuffix(o.Name, ".json")]
		slotted := ok && run == o.Metadata["run"]
		if slotted {
			confirmed[strings.TrimSuffix(o.Name, ".json")] = true
		}
		if !strings.HasSuffix(o.Name, ".json") || strings.Contains(o.Name, "/") || o.Metadata["run"] == "" {
			res.Garbage++
			if len(garbage) < 20 {
				garbage = append(garbage, o.Name)
			}
			return nil
		}
		res.Pending++
		select {
		case <-ctx.Done():
			return ctx.Err()
		case jobs <- sweepJob{o, slotted}:
			return nil
		}
	})
	close(jobs)
	wg.Wait()
	if err != nil {
		addErr(err)
	}
	if res.Garbage > 0 {
		log.Warn("objects under pending/ that fhirexport did not write; ignored", "count", res.Garbage, "names", garbage)
	}
	free, err := x.reconcileSlots(ctx, confirmed)
	if err != nil {
		addErr(err)
	}
	if err == nil {
		res.Dequeued, err = x.dequeue(ctx, free)
		if err != nil {
			addErr(err)
		}
	}
	x.logWatermarkAges(ctx)
	res.Running, res.Finished, res.Starting = int(c.running.Load()), int(c.finished.Load()), int(c.starting.Load())
	res.Transient, res.Resolved = int(c.transient.Load()), int(c.resolved.Load())
	log.Info("poll sweep", "pending", res.Pending, "running", res.Running, "finished", res.Finished,
		"starting", res.Starting, "resolved", res.Resolved, "dequeued", res.Dequeued, "transient", res.Transient, "garbage", res.Garbage)
	return res, errors.Join(errs...)
}

// sweepJob is one listed pending object; slotted when an export slot names
// its run (the listing confirms it is this deployment's).
type sweepJob struct {
	o       stateObject
	slotted bool
}

// sweepListed handles one listed pending object. One naming an operation
// while no export slot names its run is first asked whether it is this
// deployment's at all (disowned).
func (x *Exporter) sweepListed(ctx context.Context, j sweepJob, c *sweepCounters) error {
	if op := j.o.Metadata["operation"]; op != "" && !j.slotted {
		if gone, err := x.disowned(ctx, j.o, op); gone || err != nil {
			return err
		}
	}
	return x.sweepOne(ctx, j.o, c)
}

// sweepOne handles one pending object: a starting lock, or a running export.
func (x *Exporter) sweepOne(ctx context.Context, o stateObject, c *sweepCounters) error {
	op := o.Metadata["operation"]
	if op == "" {
		return x.sweepStarting(ctx, o, c)
	}
	done, err := x.check(ctx, o, op)
	switch {
	case err != nil:
		return err
	case done:
		c.finished.Add(1)
	default:
		c.running.Add(1)
	}
	return nil
}

// sweepStarting resolves a start lock whose lease is over: the attempt died,
// or its answer was lost and no redelivery came.
func (x *Exporter) sweepStarting(ctx context.Context, o stateObject, c *sweepCounters) error {
	started, err := time.Parse(time.RFC3339Nano, o.Metadata["started"])
	if re, rerr := time.Parse(time.RFC3339Nano, o.Metadata["redelivered"]); rerr == nil && re.After(started) {
		started = re // a redelivery found it in flight: the trigger is alive
	}
	if err == nil && x.now().Sub(started) < x.StartLease && o.Metadata["requeued"] == "" && o.Metadata["ending"] == "" {
		c.starting.Add(1)
		return nil
	}
	var p pendingRecord
	gen, err := x.state.read(ctx, "pending/"+o.Name, &p)
	switch {
	case errors.Is(err, ErrNotFound):
		return nil
	case errors.Is(err, ErrCorrupt):
		Logger(ctx).Error("pipeline lock is corrupt; quarantined so its pipeline moves on", "object", "pending/"+o.Name, "error", err.Error())
		return x.state.quarantine(ctx, "pending/"+o.Name, gen, err.Error())
	case err != nil:
		return err
	}
	if p.Requeued != "" && p.Operation == "" {
		return x.finishRequeue(ctx, p, gen)
	}
	if p.Ending != nil && p.Operation == "" {
		return x.finishEnding(ctx, p, gen)
	}
	if p.Operation != "" || x.now().Sub(p.Started) < x.StartLease {
		c.starting.Add(1)
		return nil
	}
	c.resolved.Add(1)
	return x.resolve(ctx, p, gen, true)
}

// check gets one operation and, when it is done, finalizes its run. The
// listing's metadata says all a running check needs: no read of the marker.
func (x *Exporter) check(ctx context.Context, o stateObject, opName string) (bool, error) {
	if o.Metadata["reported"] != "" {
		// The outcome is decided and recorded in the lock: publishing it and
		// the bookkeeping are left, and they need nothing from the API (whose
		// answer, or refusal, would only hold them up).
		return true, x.finalize(ctx, o, &healthcare.Operation{Name: opName, Done: true}, &healthcare.OperationMetadata{}, "")
	}
	callCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	op, err := x.hc.Projects.Locations.Datasets.Operations.Get(opName).Context(callCtx).Do()
	cancel()
	if err != nil {
		if unobservable(err) {
			return x.unobserved(ctx, o, opName, err)
		}
		if !Permanent(err) {
			return false, fmt.Errorf("get operation %s: %w", opName, err)
		}
		// The operation is gone or unreadable for good (finished operations
		// expire after about 30 days): report the run as failed.
		code, msg := statusOf(err)
		op = &healthcare.Operation{Name: opName, Done: true, Error: &healthcare.Status{Code: int64(code),
			Message: "operations.get failed: " + msg}}
	}
	meta, problem := decodeMetadata(op.Metadata)
	if !op.Done {
		x.watchdog(ctx, o, opName, meta)
		c := meta.Counter
		if c == nil {
			c = &healthcare.ProgressCounter{}
		}
		Logger(ctx).Info("export running", "operation", opName, "success", c.Success, "failure", c.Failure, "pending", c.Pending)
		return false, nil
	}
	return true, x.finalize(ctx, o, op, meta, problem)
}

// unobservable reports 401/403 from operations.get: IAM changes take minutes
// to propagate, so one answer is not a verdict on the export.
func unobservable(err error) bool {
	var ge *googleapi.Error
	return errors.As(err, &ge) && (ge.Code == http.StatusUnauthorized || ge.Code == http.StatusForbidden)
}

// unobserved keeps following a run whose operation cannot be read, loudly,
// for ObservePatience; after it the run is reported failed as unobservable.
func (x *Exporter) unobserved(ctx context.Context, o stateObject, opName string, cause error) (bool, error) {
	log := Logger(ctx).With("operation", opName, "pipeline", strings.TrimSuffix(o.Name, ".json"))
	since, err := time.Parse(time.RFC3339Nano, o.Metadata["unobserved"])
	if err != nil {
		p, gen, err := x.readLock(ctx, strings.TrimSuffix(o.Name, ".json"))
		if err != nil {
			return false, err
		}
		p.Unobserved = x.now()
		if _, err := x.state.update(ctx, "pending/"+o.Name, gen, p, lockMeta(p)); err != nil {
			return false, err
		}
		since = p.Unobserved
	}
	waited := x.now().Sub(since)
	log.Error("PERMISSION PROBLEM: operations.get is refused; the export is still followed", "error", cause.Error(),
		"refusedFor", waited.Round(time.Second).String(), "patience", x.ObservePatience.String(),
		"fix", "grant the poller's service account healthcare.operations.get on the dataset")
	if waited < x.ObservePatience {
		return false, nil
	}
	code, msg := statusOf(cause)
	op := &healthcare.Operation{Name: opName, Done: true, Error: &healthcare.Status{Code: int64(code), Message: fmt.Sprintf(
		"the operation could not be observed for %s (operations.get: %s); the export itself may have finished: check it with gcloud healthcare operations describe", waited.Round(time.Second), msg)}}
	return true, x.finalize(ctx, o, op, &healthcare.OperationMetadata{}, "")
}

// watchdog cancels a running export past its timeout; the sweep that sees it
// end reports it failed with DEADLINE_EXCEEDED. The lock is marked before
// operations.cancel is called (so an end after a crash is still told as the
// timeout), and the operation's own cancelRequested tells whether the call
// went through: until it does, every sweep asks again (cancel is idempotent).
func (x *Exporter) watchdog(ctx context.Context, o stateObject, opName string, meta *healthcare.OperationMetadata) {
	if meta.CancelRequested {
		return
	}
	if why := o.Metadata["cancelled"]; why != "" {
		x.cancel(ctx, opName, why, true)
		return
	}
	// Our own clock at both ends: the start attempt's time, not the
	// service's createTime.
	begun, err := time.Parse(time.RFC3339Nano, o.Metadata["started"])
	if err != nil {
		return
	}
	timeout := timeoutOf(o.Metadata["timeout"])
	if x.now().Sub(begun) < timeout {
		return
	}
	p, gen, err := x.readLock(ctx, strings.TrimSuffix(o.Name, ".json"))
	if err != nil || p.Operation != opName || p.Cancelled != "" {
		return
	}
	p.Cancelled = "timeout"
	if _, err := x.state.update(ctx, "pending/"+o.Name, gen, p, lockMeta(p)); err != nil {
		return
	}
	if x.cancel(ctx, opName, p.Cancelled, false) {
		Logger(ctx).With("operation", opName).Warn("watchdog: export still running past its timeout; cancelled", "timeout", timeout.String())
	}
}

// cancel asks the service to cancel an operation the lock marks cancelled
// (why); a failed call is logged and retried by the next sweep.
func (x *Exporter) cancel(ctx context.Context, opName, why string, retry bool) bool {
	log := Logger(ctx).With("operation", opName, "cancelled", why)
	callCtx, done := context.WithTimeout(ctx, 30*time.Second)
	_, err := x.hc.Projects.Locations.Datasets.Operations.Cancel(opName, &healthcare.CancelOperationRequest{}).Context(callCtx).Do()
	done()
	if err != nil {
		log.Error("watchdog: operations.cancel failed; the next sweep asks again", "error", err.Error())
		return false
	}
	if retry {
		log.Warn("watchdog: operations.cancel went through on a later sweep")
	}
	return true
}

// decodeMetadata reads OperationMetadata leniently: metadata that is not an
// object, or counters beyond int64, are a problem to report, not a reason to
// keep a finished run unreported forever.
func decodeMetadata(raw []byte) (*healthcare.OperationMetadata, string) {
	meta := &healthcare.OperationMetadata{}
	if len(raw) == 0 {
		return meta, ""
	}
	if err := json.Unmarshal(raw, meta); err != nil {
		meta = &healthcare.OperationMetadata{}
		var loose struct {
			CreateTime string `json:"createTime"`
			EndTime    string `json:"endTime"`
			LogsURL    string `json:"logsUrl"`
		}
		_ = json.Unmarshal(raw, &loose)
		meta.CreateTime, meta.EndTime, meta.LogsUrl = loose.CreateTime, loose.EndTime, loose.LogsURL
		return meta, "its metadata is unusable: " + err.Error()
	}
	return meta, ""
}

// finalize reports a finished operation. The order makes a crash at any point
// repeat work idempotently instead of losing it: feed files, watermark, event,
// run record, then the pending marker and the slot.
func (x *Exporter) finalize(ctx context.Context, o stateObject, op *healthcare.Operation, meta *healthcare.OperationMetadata, problem string) error {
	name := "pending/" + o.Name
	p, gen, err := x.readLock(ctx, strings.TrimSuffix(o.Name, ".json")) // a corrupt lock its records vouch for is rebuilt
	switch {
	case errors.Is(err, ErrNotFound):
		return nil // another sweep finished it
	case errors.Is(err, ErrCorrupt):
		return x.finalizeCorrupt(ctx, o, gen, op, err)
	case err != nil:
		return err
	}
	if p.Operation != op.Name {
		return nil // the marker moved on to another run
	}
	log := Logger(ctx).With("trigger", p.Trigger.ID, "store", p.Store, "operation", p.Operation, "pipeline", p.Pipeline)
	if !p.Finalizing.IsZero() {
		// An earlier sweep reported the outcome but may not have removed the
		// marker; if the run record says so, only the removal is left.
		var rec runRecord
		if _, err := x.state.read(ctx, runObject(p.Run), &rec); err == nil && rec.Status == statusDone && rec.Operation == p.Operation {
			x.release(ctx, p, gen)
			return nil
		}
		if x.now().Sub(p.Finalizing) < x.FinalizeLease {
			return nil // another sweep is reporting it
		}
	}
	// Take a lease so concurrent sweeps do not both report the outcome.
	p.Finalizing = x.now()
	gen, err = x.state.update(ctx, name, gen, p, lockMeta(p))
	if errors.Is(err, ErrConflict) {
		return nil
	}
	if err != nil {
		return err
	}

	if p.Reported == nil {
		// Decide the outcome (feed files, watermark) and record it in the
		// lock at the generation this lease holds before publishing it: a
		// sweep whose lease ran out meanwhile finds its record refused and
		// gives way, instead of publishing an event of the same id decided
		// on a later state (a watermark a later run moved on). Whoever finds
		// a recorded outcome publishes that one.
		ev, err := x.decide(ctx, p, op, meta, problem)
		if err == nil {
			p.Reported = &ev
			gen, err = x.state.update(ctx, name, gen, p, lockMeta(p))
			if errors.Is(err, ErrConflict) || errors.Is(err, ErrNotFound) {
				log.Info("another sweep took this run's report over; giving way")
				return nil
			}
		}
		if err != nil {
			p.Reported = nil
			x.giveUpFinalizing(ctx, p, gen)
			return err
		}
	}
	if err := x.report(ctx, p); err != nil {
		x.giveUpFinalizing(ctx, p, gen)
		return err
	}
	x.release(ctx, p, gen)
	log.Info("export finished")
	return nil
}

// giveUpFinalizing gives up the finalize lease after a failure, so the next
// sweep retries at once instead of after the lease.
func (x *Exporter) giveUpFinalizing(ctx context.Context, p pendingRecord, gen int64) {
	p.Finalizing = time.Time{}
	if _, err := x.state.update(ctx, pendingObject(p.Pipeline), gen, p, lockMeta(p)); err != nil {
		Logger(ctx).Warn("could not release the finalize lease; it expires", "pipeline", p.Pipeline, "error", err.Error())
	}
}

// finalizeCorrupt reports what can be reported of a finished operation whose
// marker is corrupt (the operation and run come from the listing's
// metadata), then quarantines the marker so the pipeline moves on.
func (x *Exporter) finalizeCorrupt(ctx context.Context, o stateObject, gen int64, op *healthcare.Operation, cause error) error {
	name := "pending/" + o.Name
	Logger(ctx).Error("pending marker is corrupt; reporting what is known and quarantining it", "object", name, "operation", op.Name, "error", cause.Error())
	ev := events.Event{ID: eventID("failed", op.Name), Type: events.TypeFailed, Source: "//healthcare.googleapis.com/" + op.Name,
		Subject: op.Name, Time: x.now(), Data: events.Data{Operation: op.Name, Counters: countersOf(nil),
			Error: &events.Error{Code: codeInternal, Message: fmt.Sprintf(
				"the state object %s of this run is corrupt (%v); it was quarantined, the outcome of the operation could not be reported in full: check it with gcloud healthcare operations describe", name, cause)}}}
	// The run the marker's metadata names ends with this event, so a late
	// redelivery of its trigger re-publishes it instead of exporting again.
	if run := o.Metadata["run"]; run != "" {
		var rec runRecord
		if _, err := x.state.read(ctx, runObject(run), &rec); err == nil && rec.Store != "" {
			ev.Source, ev.Subject, ev.Data.Store, ev.Data.Pipeline, ev.Data.Trigger = SourceOf(rec.Store), rec.Trigger.ID, rec.Store, rec.Pipeline, rec.Trigger
		}
		final, err := x.endRun(ctx, run, statusFailed, &ev, "")
		if err != nil {
			return err
		}
		if final == nil { // the run was reported before its marker broke
			return x.state.quarantine(ctx, name, gen, cause.Error())
		}
		ev = *final
	}
	if err := x.outcome(ctx, ev); err != nil {
		return err
	}
	return x.state.quarantine(ctx, name, gen, cause.Error())
}

// report publishes the outcome recorded in the lock (and the started event
// of a run a sweep started or adopted), then marks the run done.
func (x *Exporter) report(ctx context.Context, p pendingRecord) error {
	if p.Adopted || p.FromQueue {
		// A sweep started or adopted it: no redelivery re-publishes a started
		// event whose publish failed, so this does (same id).
		if err := x.pub.Publish(ctx, startedEvent(p)); err != nil {
			return err
		}
	}
	ev := *p.Reported
	if err := x.outcome(ctx, ev, "success", ev.Data.Counters.Success, "failure", ev.Data.Counters.Failure); err != nil {
		return err
	}
	return x.markDone(ctx, p, ev)
}

// decide makes a finished run's outcome event: it writes the feed files and,
// after a fully successful incremental run, advances the watermark.
func (x *Exporter) decide(ctx context.Context, p pendingRecord, op *healthcare.Operation, meta *healthcare.OperationMetadata, problem string) (events.Event, error) {
	log := Logger(ctx).With("operation", p.Operation, "pipeline", p.Pipeline, "store", p.Store)
	ev := outcomeEvent(p, op, meta)
	switch {
	case problem != "":
		ev = retype(ev, events.TypeFailed, op.Name)
		ev.Data.Error = &events.Error{Code: codeInternal, Message: "the export operation finished but " + problem + "; the watermark was not moved: check the operation with gcloud healthcare operations describe"}
	case p.Cancelled == "timeout" && op.Error != nil && op.Error.Code == codeCancelled:
		ev.Data.Error = &events.Error{Code: codeDeadlineExceeded, Message: fmt.Sprintf(
			"cancelled by fhirexport: the export was still running past its timeout (%s)", timeoutOf(p.Timeout))}
	case p.Incremental && ev.Type == events.TypeSucceeded && meta.CreateTime == "":
		ev = retype(ev, events.TypeFailed, op.Name)
		ev.Data.Error = &events.Error{Code: codeInternal, Message: "the export succeeded but its operation has no createTime, so no watermark can be set; the next run repeats this window"}
	}
	// Feed files first (feed.go): manifest and, for an incremental success,
	// the deleted file; the watermark and the deletion cursor then move
	// together, so a crash before them repeats the files with the same names.
	var cursor *deletionCursor
	var seen *watermarkSeen // read once: the deletion cursor now, the compare-and-swap's first try later
	if p.Incremental {
		w, err := x.readWatermark(ctx, p.Pipeline)
		if err != nil && !errors.Is(err, ErrCorrupt) {
			return events.Event{}, err
		}
		if err == nil {
			cursor, seen = w.rec.Deletions, &w
		}
	}
	feed, err := x.writeFeed(ctx, p, op, meta, ev.Type, cursor)
	switch {
	case errors.Is(err, ErrDeletionsExpired):
		ev = retype(ev, events.TypePartial, op.Name)
		ev.Data.Error = &events.Error{Code: codeFailedPrecondition, Message: err.Error()}
		feed, err = x.writeFeed(ctx, p, op, meta, events.TypePartial, cursor)
	case errors.Is(err, ErrCorrupt):
		// A feed file under this operation's name that fhirexport cannot
		// have written: retrying would fail forever. Report the run without
		// a feed, and do not move the watermark: the next run covers it.
		log.Error("feed file unusable; the run is reported partial without a feed", "error", err.Error())
		ev = retype(ev, events.TypePartial, op.Name)
		ev.Data.Error = &events.Error{Code: codeInternal, Message: err.Error() + "; the run is reported without a feed and the watermark was not moved: delete that object, and the pipeline's next run delivers this window again"}
		feed, err = feedResult{}, nil
	}
	if err != nil {
		return events.Event{}, err
	}
	ev.Data.Manifest, ev.Data.ManifestURL, ev.Data.Outputs, ev.Data.Deleted = feed.Manifest, feed.ManifestURL, feed.Outputs, feed.Deleted
	if p.Incremental {
		// Only a fully successful run moves the watermark. The event carries
		// the watermark this run established, not whatever is stored when it
		// is published, so a repeat after later runs is identical.
		advanced := false
		if ev.Type == events.TypeSucceeded {
			moved, err := x.advanceWatermark(ctx, p, meta.CreateTime, feed.Cursor, seen)
			switch {
			case errors.Is(err, ErrCorrupt):
				log.Error("watermark is corrupt; not moved. Incremental runs of this pipeline are held until it is reset", "error", err.Error())
			case err != nil:
				return events.Event{}, err
			}
			advanced = moved
			if moved {
				ev.Data.Watermark = normalizeTime(meta.CreateTime)
			}
		}
		ev.Data.WatermarkAdvanced = &advanced
	}
	return ev, nil
}

// retype changes an outcome event's type, and so its id.
func retype(ev events.Event, typ, op string) events.Event {
	ev.Type, ev.ID = typ, eventID(typ, op)
	return ev
}

// normalizeTime writes an RFC 3339 time in UTC with the precision it has.
func normalizeTime(v string) string {
	t, err := time.Parse(time.RFC3339Nano, v)
	if err != nil {
		return v
	}
	return t.UTC().Format(time.RFC3339Nano)
}

// advanceWatermark moves the pipeline's watermark forward to createTime with
// a compare-and-swap; it never moves it back. It reports whether the stored
// watermark is now createTime.
func (x *Exporter) advanceWatermark(ctx context.Context, p pendingRecord, createTime string, cursor *deletionCursor, seen *watermarkSeen) (bool, error) {
	ct, err := time.Parse(time.RFC3339Nano, createTime)
	if err != nil {
		return false, fmt.Errorf("operation %s has createTime %q: %w", p.Operation, createTime, err)
	}
	next := normalizeTime(createTime)
	for {
		var w watermarkSeen
		var err error
		if seen != nil {
			w, seen = *seen, nil
		} else {
			w, err = x.readWatermark(ctx, p.Pipeline)
		}
		cur, gen := w.rec, w.gen
		switch {
		case err != nil:
			return false, err
		case gen != 0:
			t, err := time.Parse(time.RFC3339Nano, cur.Watermark)
			if err != nil {
				return false, fmt.Errorf("state %s: %w: watermark %q is not a time", watermarkObject(p.Pipeline), ErrCorrupt, cur.Watermark)
			}
			if !ct.After(t) {
				return ct.Equal(t) && cur.Operation == p.Operation, nil // a repeat of this run, or further on
			}
		}
		rec := watermarkRecord{Pipeline: p.Pipeline, Store: p.Store, Name: p.Name, Watermark: next, Operation: p.Operation, Updated: x.now(), Deletions: cur.Deletions}
		if cursor != nil {
			rec.Deletions = cursor
		}
		if gen == 0 {
			_, err = x.state.create(ctx, watermarkObject(p.Pipeline), rec, watermarkMeta(rec))
		} else {
			_, err = x.state.update(ctx, watermarkObject(p.Pipeline), gen, rec, watermarkMeta(rec))
		}
		if errors.Is(err, ErrExists) || errors.Is(err, ErrConflict) {
			continue // someone moved it meanwhile: compare again
		}
		return err == nil, err
	}
}

// markDone records in the run record that the run ended, with the outcome
// event it was reported with, so a late redelivery of its trigger does not
// start it again and operators see how it ended.
func (x *Exporter) markDone(ctx context.Context, p pendingRecord, ev events.Event) error {
	var rec runRecord
	gen, err := x.state.read(ctx, runObject(p.Run), &rec)
	switch {
	case errors.Is(err, ErrNotFound):
		rec.Claimed = p.Started
	case errors.Is(err, ErrCorrupt):
		Logger(ctx).Error("run record is corrupt; replaced with the finished run", "object", runObject(p.Run), "error", err.Error())
		rec = runRecord{Claimed: p.Started}
	case err != nil:
		return err
	case rec.Status == statusDone:
		return nil
	}
	started := startedEvent(p)
	rec.Trigger, rec.Pipeline, rec.Store, rec.Status, rec.Operation, rec.Outcome, rec.Started = p.Trigger, p.Pipeline, p.Store, statusDone, p.Operation, ev.Type, &started
	rec.Ended, rec.Final, rec.Reported = x.now(), nil, &ev
	if rec.Spec == nil {
		rec.Spec = p.Spec
	}
	if gen == 0 {
		_, err = x.state.create(ctx, runObject(p.Run), rec, nil)
	} else {
		_, err = x.state.update(ctx, runObject(p.Run), gen, rec, nil)
	}
	if errors.Is(err, ErrExists) || errors.Is(err, ErrConflict) {
		return fmt.Errorf("run %s changed concurrently: %w", p.Run, errTransient)
	}
	return err
}

// countersOf is an operation's resource counters (zero when it has none).
func countersOf(meta *healthcare.OperationMetadata) *events.Counters {
	c := &events.Counters{}
	if meta != nil && meta.Counter != nil {
		c.Success, c.Failure, c.Pending = meta.Counter.Success, meta.Counter.Failure, meta.Counter.Pending
	}
	return c
}

// outcomeEvent classifies a finished operation: failed (an error), partial (no
// error but counter.failure > 0) or succeeded.
func outcomeEvent(p pendingRecord, op *healthcare.Operation, meta *healthcare.OperationMetadata) events.Event {
	d := baseData(p)
	d.Counters = countersOf(meta)
	d.CreateTime, d.EndTime, d.LogsURL = meta.CreateTime, meta.EndTime, meta.LogsUrl
	ct, err1 := time.Parse(time.RFC3339Nano, meta.CreateTime)
	et, err2 := time.Parse(time.RFC3339Nano, meta.EndTime)
	if err1 == nil && err2 == nil {
		d.Duration = fmt.Sprintf("%.3fs", et.Sub(ct).Seconds())
	}
	typ := events.TypeSucceeded
	switch {
	case op.Error != nil:
		typ = events.TypeFailed
		d.Error = &events.Error{Code: int32(op.Error.Code), Message: op.Error.Message}
	case d.Counters.Failure > 0:
		typ = events.TypePartial
	}
	at := et
	if err2 != nil {
		at = p.Started
	}
	return events.Event{ID: eventID(typ, op.Name), Type: typ, Source: SourceOf(p.Store), Subject: op.Name, Time: at, Data: d}
}

// timeoutOf is a run's watchdog timeout: its spec's, or DefaultTimeout.
func timeoutOf(v string) time.Duration {
	return (&Spec{Timeout: v}).TimeoutDuration()
}

// watermarkSeen is a pipeline's watermark as read: gen 0 when it has none.
type watermarkSeen struct {
	rec watermarkRecord
	gen int64
}

// readWatermark reads a pipeline's watermark record; none is gen 0. A
// watermark that is not a time is ErrCorrupt: it must not pass for "none",
// which would re-export everything.
func (x *Exporter) readWatermark(ctx context.Context, pipeline string) (watermarkSeen, error) {
	var w watermarkSeen
	gen, err := x.state.read(ctx, watermarkObject(pipeline), &w.rec)
	if errors.Is(err, ErrNotFound) {
		return watermarkSeen{}, nil
	}
	w.gen = gen
	if err == nil && w.rec.Watermark != "" {
		if _, perr := time.Parse(time.RFC3339Nano, w.rec.Watermark); perr != nil {
			err = fmt.Errorf("state %s: %w: watermark %q is not a time", watermarkObject(pipeline), ErrCorrupt, w.rec.Watermark)
		}
	}
	return w, err
}

// logWatermarkAges logs, for every incremental pipeline, how long ago its
// watermark's export began: the "watermark age" lines deploy.sh's metric and
// its stale-pipeline alert read. One listing a sweep; the watermark comes from
// the object's metadata (or, for one written before it was kept there, from
// when the object last changed).
func (x *Exporter) logWatermarkAges(ctx context.Context) {
	log := Logger(ctx)
	err := x.state.each(ctx, "watermarks", func(o stateObject) error {
		pipeline, ok := strings.CutSuffix(o.Name, ".json")
		if !ok || strings.Contains(pipeline, "/") {
			return nil
		}
		at, err := time.Parse(time.RFC3339Nano, o.Metadata["watermark"])
		if err != nil {
			at = o.Updated
		}
		log.Info("watermark age", "pipeline", pipeline, "watermarkAgeSeconds", int64(x.now().Sub(at).Seconds()))
		return nil
	})
	if err != nil {
		log.Warn("could not list watermarks for their age", "error", err.Error())
	}
}

// watermarkMeta is a watermark object's metadata: the watermark itself, so
// a listing tells every pipeline's age.
func watermarkMeta(rec watermarkRecord) map[string]string {
	return map[string]string{"watermark": rec.Watermark}
}
