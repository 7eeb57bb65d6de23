package export

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

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
}

// Poll checks every pending export once with operations.get and reports each
// finished one. Transient failures leave the marker for the next sweep; they
// are counted, logged and returned joined.
func (x *Exporter) Poll(ctx context.Context) (SweepResult, error) {
	log := Logger(ctx)
	objs, err := x.state.list(ctx, "pending")
	if err != nil {
		return SweepResult{}, err
	}
	res := SweepResult{Pending: len(objs)}
	var running, finished, starting, transient atomic.Int64
	var mu sync.Mutex
	var errs []error
	workers := max(1, x.PollWorkers)
	sem := make(chan struct{}, workers)
	var wg sync.WaitGroup
	for _, o := range objs {
		if !strings.HasSuffix(o.Name, ".json") {
			continue
		}
		op := o.Metadata["operation"]
		if op == "" {
			starting.Add(1)
			continue
		}
		select {
		case <-ctx.Done():
			transient.Add(1)
			continue
		case sem <- struct{}{}:
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			done, err := x.check(ctx, o, op)
			switch {
			case err != nil:
				transient.Add(1)
				log.Warn("poll: operation left for the next sweep", "operation", op, "error", err.Error())
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			case done:
				finished.Add(1)
			default:
				running.Add(1)
			}
		}()
	}
	wg.Wait()
	res.Running, res.Finished = int(running.Load()), int(finished.Load())
	res.Starting, res.Transient = int(starting.Load()), int(transient.Load())
	log.Info("poll sweep", "pending", res.Pending, "running", res.Running, "finished", res.Finished,
		"starting", res.Starting, "transient", res.Transient)
	return res, errors.Join(errs...)
}

// check gets one operation and, when it is done, finalizes its run.
func (x *Exporter) check(ctx context.Context, o stateObject, opName string) (bool, error) {
	callCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	op, err := x.hc.Projects.Locations.Datasets.Operations.Get(opName).Context(callCtx).Do()
	cancel()
	if err != nil {
		if !Permanent(err) {
			return false, fmt.Errorf("get operation %s: %w", opName, err)
		}
		// The operation is gone or unreadable for good (finished operations
		// expire after about 30 days): report the run as failed.
		code, msg := statusOf(err)
		op = &healthcare.Operation{Name: opName, Done: true, Error: &healthcare.Status{Code: int64(code),
			Message: "operations.get failed: " + msg}}
	}
	meta := &healthcare.OperationMetadata{}
	if len(op.Metadata) > 0 {
		if err := json.Unmarshal(op.Metadata, meta); err != nil {
			return false, fmt.Errorf("decode metadata of operation %s: %w", opName, err)
		}
	}
	if !op.Done {
		c := meta.Counter
		if c == nil {
			c = &healthcare.ProgressCounter{}
		}
		Logger(ctx).Info("export running", "operation", opName, "success", c.Success, "failure", c.Failure, "pending", c.Pending)
		return false, nil
	}
	return true, x.finalize(ctx, o.Name, op, meta)
}

// finalize reports a finished operation. The order makes a crash at any point
// repeat work idempotently instead of losing it: watermark, event, run record,
// then the pending marker.
func (x *Exporter) finalize(ctx context.Context, object string, op *healthcare.Operation, meta *healthcare.OperationMetadata) error {
	name := "pending/" + object
	var p pendingRecord
	gen, err := x.state.read(ctx, name, &p)
	if errors.Is(err, ErrNotFound) {
		return nil // another sweep finished it
	}
	if err != nil {
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
			return x.state.remove(ctx, name, gen)
		}
		if x.now().Sub(p.Finalizing) < x.FinalizeLease {
			return nil // another sweep is reporting it
		}
	}
	// Take a lease so concurrent sweeps do not both report the outcome.
	p.Finalizing = x.now()
	gen, err = x.state.update(ctx, name, gen, p, map[string]string{"run": p.Run, "operation": p.Operation})
	if errors.Is(err, ErrConflict) {
		return nil
	}
	if err != nil {
		return err
	}

	if err := x.report(ctx, p, op, meta); err != nil {
		// Give up the lease so the next sweep retries at once.
		p.Finalizing = time.Time{}
		if _, uerr := x.state.update(ctx, name, gen, p, map[string]string{"run": p.Run, "operation": p.Operation}); uerr != nil {
			log.Warn("could not release the finalize lease; it expires", "error", uerr.Error())
		}
		return err
	}
	if err := x.state.remove(ctx, name, gen); err != nil {
		return err
	}
	log.Info("export finished")
	return nil
}

// report advances the watermark after a fully successful incremental run,
// publishes the outcome event and marks the run done.
func (x *Exporter) report(ctx context.Context, p pendingRecord, op *healthcare.Operation, meta *healthcare.OperationMetadata) error {
	ev := outcomeEvent(p, op, meta)
	if p.Incremental {
		// Only a fully successful run moves the watermark. The event carries
		// the watermark this run established, not whatever is stored when it
		// is published, so a repeat after later runs is identical.
		advanced := ev.Type == events.TypeSucceeded
		if advanced {
			if _, err := x.advanceWatermark(ctx, p, meta.CreateTime); err != nil {
				return err
			}
			ev.Data.Watermark = normalizeTime(meta.CreateTime)
		}
		ev.Data.WatermarkAdvanced = &advanced
	}
	if err := x.pub.Publish(ctx, ev); err != nil {
		return err
	}
	Logger(ctx).Info("export outcome published", "operation", p.Operation, "outcome", ev.Type,
		"success", ev.Data.Counters.Success, "failure", ev.Data.Counters.Failure)
	return x.markDone(ctx, p, ev.Type)
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
func (x *Exporter) advanceWatermark(ctx context.Context, p pendingRecord, createTime string) (bool, error) {
	ct, err := time.Parse(time.RFC3339Nano, createTime)
	if err != nil {
		return false, fmt.Errorf("operation %s has createTime %q: %w", p.Operation, createTime, err)
	}
	next := normalizeTime(createTime)
	for {
		var cur watermarkRecord
		gen, err := x.state.read(ctx, watermarkObject(p.Pipeline), &cur)
		switch {
		case errors.Is(err, ErrNotFound):
			gen = 0
		case err != nil:
			return false, err
		default:
			if t, err := time.Parse(time.RFC3339Nano, cur.Watermark); err == nil && !ct.After(t) {
				return ct.Equal(t), nil // already there (a repeat) or further on
			}
		}
		rec := watermarkRecord{Pipeline: p.Pipeline, Store: p.Store, Name: p.Name, Watermark: next, Operation: p.Operation, Updated: x.now()}
		if gen == 0 {
			_, err = x.state.create(ctx, watermarkObject(p.Pipeline), rec, nil)
		} else {
			_, err = x.state.update(ctx, watermarkObject(p.Pipeline), gen, rec, nil)
		}
		if errors.Is(err, ErrExists) || errors.Is(err, ErrConflict) {
			continue // someone moved it meanwhile: compare again
		}
		return err == nil, err
	}
}

// markDone records in the run record that the run ended, so a late
// redelivery of its trigger does not start it again.
func (x *Exporter) markDone(ctx context.Context, p pendingRecord, outcome string) error {
	var rec runRecord
	gen, err := x.state.read(ctx, runObject(p.Run), &rec)
	switch {
	case errors.Is(err, ErrNotFound):
		rec.Claimed = p.Started
	case err != nil:
		return err
	case rec.Status == statusDone:
		return nil
	}
	started := startedEvent(p)
	rec.Trigger, rec.Pipeline, rec.Status, rec.Operation, rec.Outcome, rec.Started = p.Trigger, p.Pipeline, statusDone, p.Operation, outcome, &started
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

// outcomeEvent classifies a finished operation: failed (an error), partial (no
// error but counter.failure > 0) or succeeded.
func outcomeEvent(p pendingRecord, op *healthcare.Operation, meta *healthcare.OperationMetadata) events.Event {
	d := baseData(p)
	c := meta.Counter
	if c == nil {
		c = &healthcare.ProgressCounter{}
	}
	d.Counters = &events.Counters{Success: c.Success, Failure: c.Failure, Pending: c.Pending}
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
	case c.Failure > 0:
		typ = events.TypePartial
	}
	at := et
	if err2 != nil {
		at = p.Started
	}
	return events.Event{ID: eventID(typ, op.Name), Type: typ, Source: SourceOf(p.Store), Subject: op.Name, Time: at, Data: d}
}
