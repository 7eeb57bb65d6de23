package export

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Watermark is a pipeline's watermark as operators see it.
type Watermark struct {
	Pipeline  string    `json:"pipeline"`
	Store     string    `json:"store,omitempty"`
	Name      string    `json:"name,omitempty"`
	Watermark string    `json:"watermark,omitempty"` // "" when the pipeline has none: its next run exports everything
	Operation string    `json:"operation,omitempty"` // the operation that set it
	Updated   time.Time `json:"updated,omitzero"`
	Running   string    `json:"running,omitempty"` // the operation of a run in progress, if any
}

// ErrPipelineBusy is returned when an operator changes the watermark of a
// pipeline whose run is in progress: that run would overwrite the change.
var ErrPipelineBusy = errors.New("pipeline has a run in progress")

// GetWatermark returns a pipeline's watermark and whether a run is pending.
func (s *State) GetWatermark(ctx context.Context, pipeline string) (Watermark, error) {
	w := Watermark{Pipeline: pipeline}
	var rec watermarkRecord
	switch _, err := s.read(ctx, watermarkObject(pipeline), &rec); {
	case errors.Is(err, ErrNotFound):
	case err != nil:
		return Watermark{}, err
	default:
		w.Store, w.Name, w.Watermark, w.Operation, w.Updated = rec.Store, rec.Name, rec.Watermark, rec.Operation, rec.Updated
	}
	var p pendingRecord
	switch _, err := s.read(ctx, pendingObject(pipeline), &p); {
	case errors.Is(err, ErrNotFound):
	case err != nil:
		return Watermark{}, err
	default:
		w.Running = p.Operation
		if w.Running == "" {
			w.Running = "(starting)"
		}
	}
	return w, nil
}

// SetWatermark sets a pipeline's watermark to at (RFC 3339 with a zone), or
// removes it when at is "" so the next run is a full export (or starts at the
// spec's _since). Unlike the poller it may move the watermark backwards: that
// is how an operator re-exports a period. It refuses while a run is in
// progress unless force is set.
func (s *State) SetWatermark(ctx context.Context, pipeline, store, name, at string, force bool, now time.Time) error {
	if !force {
		var p pendingRecord
		_, err := s.read(ctx, pendingObject(pipeline), &p)
		if err == nil {
			return fmt.Errorf("pipeline %s: %w (trigger %s, operation %q); wait for it to finish or force", pipeline, ErrPipelineBusy, p.Trigger.ID, p.Operation)
		}
		if !errors.Is(err, ErrNotFound) {
			return err
		}
	}
	var cur watermarkRecord
	gen, err := s.read(ctx, watermarkObject(pipeline), &cur)
	if err != nil && !errors.Is(err, ErrNotFound) && !errors.Is(err, ErrCorrupt) { // a corrupt one is what reset is for
		return err
	}
	if at == "" {
		if gen == 0 {
			return nil
		}
		return s.remove(ctx, watermarkObject(pipeline), gen)
	}
	t, err := ParseSince(at)
	if err != nil {
		return err
	}
	rec := watermarkRecord{Pipeline: pipeline, Store: store, Name: name, Watermark: t.UTC().Format(time.RFC3339Nano), Operation: "set by operator", Updated: now,
		Deletions: cur.Deletions} // deletions already delivered stay delivered
	if gen == 0 {
		_, err = s.create(ctx, watermarkObject(pipeline), rec, watermarkMeta(rec))
	} else {
		_, err = s.update(ctx, watermarkObject(pipeline), gen, rec, watermarkMeta(rec))
	}
	return err
}
