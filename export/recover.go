package export

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"cloud.google.com/go/storage"
)

// Corrupt and foreign objects under pending/. Besides its lock, a running
// export is recorded by its run record and its operation record, which keeps
// a copy of the lock as it was when the operation was recorded. A lock whose
// bytes are corrupt while its metadata names a run and an operation those two
// records agree on is rebuilt from that copy: the export is still followed to
// its outcome, and the pipeline stays locked (a new trigger waits, queued). An
// object naming an operation no run of this deployment owns is moved aside and
// never reported.

// readLock reads a pipeline's lock, rebuilding a corrupt one when its records
// allow (rebuildLock); one they do not is ErrCorrupt, as read returns it.
func (x *Exporter) readLock(ctx context.Context, pipeline string) (pendingRecord, int64, error) {
	var p pendingRecord
	gen, err := x.state.read(ctx, pendingObject(pipeline), &p)
	if !errors.Is(err, ErrCorrupt) {
		return p, gen, err
	}
	rebuilt, rgen, ok, rerr := x.rebuildLock(ctx, pipeline, gen, err)
	switch {
	case rerr != nil:
		return p, gen, rerr
	case !ok:
		return p, gen, err
	}
	return rebuilt, rgen, nil
}

// rebuildLock rewrites the corrupt lock of pipeline (at gen) from the lock
// copy in the operation record its metadata names, when that record and the
// run record of the run its metadata names agree that the run is running
// that operation in this pipeline. What changed in the lock since the
// operation was recorded (the lease, the slot, a cancel, unobserved) comes
// from the metadata; an outcome being reported is decided again.
func (x *Exporter) rebuildLock(ctx context.Context, pipeline string, gen int64, cause error) (pendingRecord, int64, bool, error) {
	name := pendingObject(pipeline)
	md, err := x.lockMetadata(ctx, pipeline, gen)
	if err != nil {
		return pendingRecord{}, 0, false, err
	}
	run, op := md["run"], md["operation"]
	if run == "" || op == "" {
		return pendingRecord{}, 0, false, nil
	}
	var own opRecord
	switch _, err := x.state.read(ctx, opObject(op), &own); {
	case errors.Is(err, ErrNotFound), errors.Is(err, ErrCorrupt):
		return pendingRecord{}, 0, false, nil
	case err != nil:
		return pendingRecord{}, 0, false, err
	case own.Run != run || own.Pipeline != pipeline || own.Lock == nil || own.Lock.Operation != op:
		return pendingRecord{}, 0, false, nil
	}
	var rec runRecord
	switch _, err := x.state.read(ctx, runObject(run), &rec); {
	case errors.Is(err, ErrNotFound), errors.Is(err, ErrCorrupt):
		return pendingRecord{}, 0, false, nil
	case err != nil:
		return pendingRecord{}, 0, false, err
	case rec.Pipeline != pipeline || ended(rec.Status):
		return pendingRecord{}, 0, false, nil
	}
	p := *own.Lock
	if t, err := time.Parse(time.RFC3339Nano, md["started"]); err == nil {
		p.Started = t
	}
	if n, err := strconv.Atoi(md["slot"]); err == nil {
		p.Slot = n
	}
	if t, err := time.Parse(time.RFC3339Nano, md["unobserved"]); err == nil {
		p.Unobserved = t
	}
	p.Cancelled, p.Finalizing, p.Reported = md["cancelled"], time.Time{}, nil
	ngen, err := x.state.update(ctx, name, gen, p, lockMeta(p))
	if err != nil {
		return pendingRecord{}, 0, false, fmt.Errorf("rebuild lock of pipeline %s: %w", pipeline, err)
	}
	Logger(ctx).Error("pipeline lock is corrupt; rebuilt from its operation record, and its export is still followed",
		"object", name, "run", run, "operation", op, "error", cause.Error())
	return p, ngen, true, nil
}

// lockMetadata is the metadata of a pipeline's lock at generation gen.
func (x *Exporter) lockMetadata(ctx context.Context, pipeline string, gen int64) (map[string]string, error) {
	name := pendingObject(pipeline)
	attrs, err := x.state.bkt.Object(x.state.object(name)).Attrs(ctx)
	if err != nil {
		return nil, x.state.classify(name, err, storage.Conditions{})
	}
	if attrs.Generation != gen {
		return nil, fmt.Errorf("state %s: %w", name, ErrConflict)
	}
	return attrs.Metadata, nil
}

// disowned moves aside an object under pending/ that names an operation no
// run of this deployment owns (no operation record, no run record of the run
// it names; or an operation record of another run), logging it like other
// garbage: it must never produce an outcome event, nor block its pipeline.
// The sweep asks only about locks no export slot confirms.
func (x *Exporter) disowned(ctx context.Context, o stateObject, op string) (bool, error) {
	run := o.Metadata["run"]
	var own opRecord
	_, err := x.state.read(ctx, opObject(op), &own)
	switch {
	case err == nil && own.Run == run, errors.Is(err, ErrCorrupt):
		return false, nil
	case err == nil: // another run's operation: this object is not that run's lock
	case !errors.Is(err, ErrNotFound):
		return false, err
	default: // no operation record: a lock from before they were kept still has its run record
		var rec runRecord
		_, err := x.state.read(ctx, runObject(run), &rec)
		if err == nil || errors.Is(err, ErrCorrupt) {
			return false, nil
		}
		if !errors.Is(err, ErrNotFound) {
			return false, err
		}
	}
	Logger(ctx).Warn("an object under pending/ names an operation no run of this deployment owns; moved aside, never reported",
		"object", "pending/"+o.Name, "operation", op, "run", run)
	return true, x.state.quarantine(ctx, "pending/"+o.Name, o.Generation, "names operation "+op+", which no run of this deployment owns")
}
