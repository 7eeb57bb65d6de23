package export

// What operators see of the state bucket, and the two things they may do to a
// run (cancel it, take its spec to run it again). cmd/fhirexport is the
// command over it. It only reads the layout records.go names, except for the
// pending record's Cancelled field, written with a generation match.

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"cloud.google.com/go/storage"
	healthcare "google.golang.org/api/healthcare/v1"
	"google.golang.org/api/iterator"

	"github.com/fhirexport/fhirexport/events"
)

// The statuses of a run record, as Run.Status reports them.
const (
	RunClaimed   = statusClaimed   // being admitted, started or followed: see Run.Running
	RunQueued    = statusQueued    // waiting in its pipeline's queue
	RunDone      = statusDone      // its operation finished and the outcome was published
	RunFailed    = statusFailed    // it ended without an operation
	RunSkipped   = statusSkipped   // its pipeline was busy (before queueing existed)
	RunCoalesced = statusCoalesced // merged into its pipeline's queued run
	RunRejected  = statusRejected  // its trigger can never run (bad spec, not allowed)
)

// RunStatuses lists every run status, for validating filters.
var RunStatuses = []string{RunClaimed, RunQueued, RunDone, RunFailed, RunSkipped, RunCoalesced, RunRejected}

// Errors of the operator API.
var (
	ErrUnknownRun      = errors.New("no such run")
	ErrUnknownPipeline = errors.New("unknown pipeline")
	ErrNotRunning      = errors.New("not running")
	ErrNoSpec          = errors.New("no stored spec")
	ErrAmbiguous       = errors.New("more than one run matches")
)

// Run is a run record (runs/{run}.json) as operators see it.
type Run struct {
	ID          string            `json:"run"`
	Trigger     events.TriggerRef `json:"trigger"`
	Pipeline    string            `json:"pipeline"`
	Store       string            `json:"store,omitempty"`
	Name        string            `json:"name,omitempty"`        // from its spec or events
	Destination string            `json:"destination,omitempty"` // from its events or spec
	Status      string            `json:"status"`                // one of RunStatuses
	Running     bool              `json:"running,omitempty"`     // claimed and holding its pipeline's lock with an operation
	Claimed     time.Time         `json:"claimed"`
	Operation   string            `json:"operation,omitempty"`
	Outcome     string            `json:"outcome,omitempty"` // the outcome event type, without events.TypePrefix
	Ended       time.Time         `json:"ended,omitzero"`
	Spec        json.RawMessage   `json:"spec,omitempty"`
	Final       *events.Event     `json:"final,omitempty"` // the event it ended with: its outcome, failure or rejection
	Started     *events.Event     `json:"started,omitempty"`
	Into        string            `json:"into,omitempty"`
	Updated     time.Time         `json:"updated,omitzero"` // when the record was last written
	// Incremental is its spec's "incremental", when the spec is stored.
	Incremental *bool `json:"incremental,omitempty"`
}

// Lock is a pipeline's lock (pending/{pipeline}.json): the run starting or
// running in it.
type Lock struct {
	Run         string            `json:"run"`
	Trigger     events.TriggerRef `json:"trigger"`
	Pipeline    string            `json:"pipeline"`
	Store       string            `json:"store"`
	Name        string            `json:"name,omitempty"`
	Destination string            `json:"destination"`
	Since       string            `json:"since,omitempty"`
	Incremental bool              `json:"incremental,omitempty"`
	Spec        json.RawMessage   `json:"spec,omitempty"`
	Timeout     string            `json:"timeout,omitempty"`
	Slot        int               `json:"slot"`
	FromQueue   bool              `json:"fromQueue,omitempty"`
	// State is "starting" (no export call yet), "in doubt" (called, answer not
	// recorded), "ending" (failed without an export, lock not yet released),
	// "requeueing" (going back to the queue), "running" or "finalizing".
	State      string    `json:"state"`
	Started    time.Time `json:"started"`
	Called     time.Time `json:"called,omitzero"`
	Operation  string    `json:"operation,omitempty"`
	Adopted    bool      `json:"adopted,omitempty"`
	Finalizing time.Time `json:"finalizing,omitzero"`
	Unobserved time.Time `json:"unobserved,omitzero"`
	Cancelled  string    `json:"cancelled,omitempty"`
	// Age is how long the lock has been held (since Started), to the second.
	Age string `json:"age"`
	// Orphaned is set for a start lock without an operation held longer than
	// the start lease: its start attempt most likely died.
	Orphaned bool      `json:"orphaned,omitempty"`
	Progress *Progress `json:"progress,omitempty"`
}

// Progress is a running operation as operations.get reports it.
type Progress struct {
	Done            bool          `json:"done"`
	Success         int64         `json:"success"`
	Failure         int64         `json:"failure"`
	Pending         int64         `json:"pending"`
	CreateTime      string        `json:"createTime,omitempty"`
	CancelRequested bool          `json:"cancelRequested,omitempty"`
	Error           *events.Error `json:"error,omitempty"`    // the operation's own error, when done
	GetError        string        `json:"getError,omitempty"` // operations.get failed: progress unknown
}

// Queued is a pipeline's next run (queue/{pipeline}.json).
type Queued struct {
	Run         string              `json:"run"`
	Trigger     events.TriggerRef   `json:"trigger"`
	Destination string              `json:"destination,omitempty"`
	Enqueued    time.Time           `json:"enqueued"`
	NotBefore   time.Time           `json:"notBefore,omitzero"`
	Attempts    int                 `json:"attempts,omitempty"`
	Coalesced   []events.TriggerRef `json:"coalesced,omitempty"`
	Spec        json.RawMessage     `json:"spec,omitempty"`
	Age         string              `json:"age"`
}

// PipelineStatus is everything the state bucket holds about one pipeline.
type PipelineStatus struct {
	Pipeline           string    `json:"pipeline"`
	Name               string    `json:"name,omitempty"`
	Store              string    `json:"store,omitempty"`
	Destination        string    `json:"destination,omitempty"`
	Watermark          string    `json:"watermark,omitempty"`
	WatermarkAge       string    `json:"watermarkAge,omitempty"` // since the watermark's time
	WatermarkOperation string    `json:"watermarkOperation,omitempty"`
	WatermarkUpdated   time.Time `json:"watermarkUpdated,omitzero"`
	Last               *Run      `json:"last,omitempty"` // the latest ended run seen
	Lock               *Lock     `json:"lock,omitempty"`
	Queued             *Queued   `json:"queued,omitempty"`
	// Incremental is the latest stored spec's "incremental" (nil: no spec
	// of the pipeline is stored).
	Incremental *bool `json:"incremental,omitempty"`

	latest, latestSpec     time.Time // when the runs Destination and Incremental are from were claimed
	latestID, latestSpecID string
}

// RunDetail is everything known about one run.
type RunDetail struct {
	Run    Run     `json:"run"`
	Lock   *Lock   `json:"lock,omitempty"`   // its pipeline's lock, when this run holds it
	Queued *Queued `json:"queued,omitempty"` // its pipeline's queue record, when it is this run
	// Indexed is the operations/ index entry of its operation, if any.
	Indexed *OperationIndex `json:"indexed,omitempty"`
}

// OperationIndex is an operations/ index entry: the run that owns an operation.
type OperationIndex struct {
	Operation string    `json:"operation"`
	Run       string    `json:"run"`
	Pipeline  string    `json:"pipeline"`
	Store     string    `json:"store"`
	Recorded  time.Time `json:"recorded"`
}

// RunFilter selects runs. Zero fields select everything.
type RunFilter struct {
	Pipeline string
	Status   string    // a run status, or "running"
	Since    time.Time // claimed at or after
	Limit    int       // newest first; 0: no limit
}

// Inspector reads the state bucket for operators and cancels runs. hc may be
// nil: then no progress is shown and Cancel fails.
type Inspector struct {
	state *State
	hc    *healthcare.Service
	now   func() time.Time
	// StartLease is the Exporter's: a start lock without an operation older
	// than it is reported orphaned.
	StartLease time.Duration
	// Workers bounds concurrent reads of state objects.
	Workers int
}

// NewInspector returns an Inspector over state and hc. now may be nil
// (time.Now).
func NewInspector(state *State, hc *healthcare.Service, now func() time.Time) *Inspector {
	if now == nil {
		now = time.Now
	}
	return &Inspector{state: state, hc: hc, now: now, StartLease: 2 * time.Minute, Workers: 16}
}

// Status returns every pipeline the bucket knows from its watermarks, locks,
// queue and the runs written within recent (0: all runs), ordered by key.
// Running operations are asked for their progress.
func (in *Inspector) Status(ctx context.Context, recent time.Duration) ([]PipelineStatus, error) {
	byKey := map[string]*PipelineStatus{}
	get := func(key string) *PipelineStatus {
		p := byKey[key]
		if p == nil {
			p = &PipelineStatus{Pipeline: key}
			byKey[key] = p
		}
		return p
	}
	wms, err := readAll[watermarkRecord](ctx, in, "watermarks", time.Time{})
	if err != nil {
		return nil, err
	}
	for key, w := range wms {
		in.addWatermark(get(key), w.rec)
	}
	locks, err := readAll[pendingRecord](ctx, in, "pending", time.Time{})
	if err != nil {
		return nil, err
	}
	for key, l := range locks {
		in.addLock(get(key), l.rec)
	}
	queue, err := readAll[queueRecord](ctx, in, "queue", time.Time{})
	if err != nil {
		return nil, err
	}
	for key, q := range queue {
		in.addQueued(get(key), q.rec)
	}
	var since time.Time
	if recent > 0 {
		since = in.now().Add(-recent)
	}
	runs, err := in.runs(ctx, since)
	if err != nil {
		return nil, err
	}
	// A rejected trigger makes no pipeline (anyone who may publish could
	// invent them), but is the last outcome of one that exists.
	for _, rejected := range []bool{false, true} {
		for _, r := range runs {
			if (r.Status == RunRejected) != rejected || r.Pipeline == "" {
				continue
			}
			if _, ok := byKey[r.Pipeline]; rejected && !ok {
				continue
			}
			addRun(get(r.Pipeline), r)
		}
	}
	out := make([]PipelineStatus, 0, len(byKey))
	for _, p := range byKey {
		out = append(out, *p)
	}
	slices.SortFunc(out, func(a, b PipelineStatus) int { return cmp.Compare(a.Pipeline, b.Pipeline) })
	in.progress(ctx, out)
	return out, nil
}

// Pipeline returns one pipeline's status, or ErrUnknownPipeline when the
// bucket has no watermark, lock, queued run or run of it.
func (in *Inspector) Pipeline(ctx context.Context, key string) (PipelineStatus, error) {
	p := PipelineStatus{Pipeline: key}
	known := false
	var w watermarkRecord
	switch _, err := in.state.read(ctx, watermarkObject(key), &w); {
	case err == nil:
		known = true
		in.addWatermark(&p, w)
	case !errors.Is(err, ErrNotFound):
		return p, err
	}
	var l pendingRecord
	switch _, err := in.state.read(ctx, pendingObject(key), &l); {
	case err == nil:
		known = true
		in.addLock(&p, l)
	case !errors.Is(err, ErrNotFound):
		return p, err
	}
	var q queueRecord
	switch _, err := in.state.read(ctx, queueObject(key), &q); {
	case err == nil:
		known = true
		in.addQueued(&p, q)
	case !errors.Is(err, ErrNotFound):
		return p, err
	}
	runs, err := in.Runs(ctx, RunFilter{Pipeline: key})
	if err != nil {
		return p, err
	}
	for _, r := range runs {
		known = known || r.Status != RunRejected
		addRun(&p, r)
	}
	if !known {
		return p, fmt.Errorf("pipeline %s: %w: no watermark, lock, queued run or run in gs://%s/%s", key, ErrUnknownPipeline, in.state.bucket, in.state.prefix)
	}
	ps := []PipelineStatus{p}
	in.progress(ctx, ps)
	return ps[0], nil
}

// ErrNoBucket is returned by CheckLocation for a state bucket that does not
// exist.
var ErrNoBucket = errors.New("bucket does not exist")

// CheckLocation tells whether the state location holds anything: false when
// its prefix is empty, an error wrapping ErrNoBucket when its bucket does
// not exist. An empty answer from Status or Runs means something else when
// the location itself is wrong (a typo in --state).
func (in *Inspector) CheckLocation(ctx context.Context) (bool, error) {
	s := in.state
	q := &storage.Query{Prefix: strings.TrimSuffix(s.object("x"), "x")}
	if err := q.SetAttrSelection([]string{"Name"}); err != nil {
		return false, err
	}
	_, err := s.bkt.Objects(ctx, q).Next()
	switch {
	case errors.Is(err, iterator.Done):
	case errors.Is(err, storage.ErrBucketNotExist):
		return false, fmt.Errorf("gs://%s: %w", s.bucket, ErrNoBucket)
	case err != nil:
		return false, fmt.Errorf("list gs://%s/%s: %w", s.bucket, q.Prefix, err)
	default:
		return true, nil
	}
	// Listing an absent bucket is not an error everywhere (emulators): ask.
	if _, err := s.bkt.Attrs(ctx); errors.Is(err, storage.ErrBucketNotExist) {
		return false, fmt.Errorf("gs://%s: %w", s.bucket, ErrNoBucket)
	} else if err != nil {
		return false, fmt.Errorf("gs://%s: %w", s.bucket, err)
	}
	return false, nil
}

// Runs returns the runs matching f, newest first.
func (in *Inspector) Runs(ctx context.Context, f RunFilter) ([]Run, error) {
	runs, err := in.runs(ctx, f.Since)
	if err != nil {
		return nil, err
	}
	var out []Run
	for _, r := range runs {
		if f.Pipeline != "" && r.Pipeline != f.Pipeline {
			continue
		}
		if !f.Since.IsZero() && r.Claimed.Before(f.Since) {
			continue
		}
		if f.Status != "" && r.Status != f.Status && (f.Status != "running" || !r.Running) {
			continue
		}
		out = append(out, r)
	}
	slices.SortFunc(out, func(a, b Run) int {
		if c := b.Claimed.Compare(a.Claimed); c != 0 {
			return c
		}
		return cmp.Compare(a.ID, b.ID)
	})
	if f.Limit > 0 && len(out) > f.Limit {
		out = out[:f.Limit]
	}
	return out, nil
}

// Show returns everything known about one run, named by its run id, its
// trigger id or its operation name.
func (in *Inspector) Show(ctx context.Context, id string) (RunDetail, error) {
	runID, err := in.resolve(ctx, id)
	if err != nil {
		return RunDetail{}, err
	}
	return in.detail(ctx, runID)
}

// Spec returns the spec a run ran with, for running it again: the run
// record's, or its lock's or queue record's.
func (in *Inspector) Spec(ctx context.Context, id string) (json.RawMessage, RunDetail, error) {
	d, err := in.Show(ctx, id)
	if err != nil {
		return nil, d, err
	}
	for _, s := range []json.RawMessage{d.Run.Spec, lockSpec(d.Lock), queuedSpec(d.Queued)} {
		if len(s) > 0 {
			return s, d, nil
		}
	}
	return nil, d, fmt.Errorf("run %s: %w (it was recorded before runs kept their spec); publish the spec by hand", d.Run.ID, ErrNoSpec)
}

// Cancel asks operations.cancel for a running run's operation and records
// Cancelled "operator" in its pipeline's lock. The next poll sweep reports
// the run as failed (1 CANCELLED) and frees the pipeline.
func (in *Inspector) Cancel(ctx context.Context, id string) (RunDetail, error) {
	d, err := in.Show(ctx, id)
	if err != nil {
		return d, err
	}
	switch {
	case d.Lock == nil && d.Queued != nil:
		return d, fmt.Errorf("run %s: %w: it is queued, not started; nothing to cancel yet", d.Run.ID, ErrNotRunning)
	case d.Lock == nil:
		what := "status " + d.Run.Status
		if d.Run.Outcome != "" {
			what += ", outcome " + d.Run.Outcome
		}
		return d, fmt.Errorf("run %s: %w (%s)", d.Run.ID, ErrNotRunning, what)
	case d.Lock.Operation == "":
		return d, fmt.Errorf("run %s: %w: it is %s for %s and has no operation yet; try again once it has one", d.Run.ID, ErrNotRunning, d.Lock.State, d.Lock.Age)
	case d.Lock.Progress != nil && d.Lock.Progress.Done:
		return d, fmt.Errorf("run %s: %w: its operation %s already finished; the next poll sweep reports it", d.Run.ID, ErrNotRunning, d.Lock.Operation)
	case in.hc == nil:
		return d, errors.New("no Healthcare API client to cancel with")
	}
	op := d.Lock.Operation
	callCtx, cancel := context.WithTimeout(ctx, time.Minute)
	_, err = in.hc.Projects.Locations.Datasets.Operations.Cancel(op, &healthcare.CancelOperationRequest{}).Context(callCtx).Do()
	cancel()
	if err != nil {
		return d, fmt.Errorf("cancel operation %s: %w", op, err)
	}
	if err := in.markCancelled(ctx, d.Run.Pipeline, d.Run.ID, op, "operator"); err != nil {
		return d, fmt.Errorf("operation %s: cancel requested, but recording it failed: %w", op, err)
	}
	return in.detail(ctx, d.Run.ID)
}

// markCancelled sets Cancelled in the pipeline's lock if it still holds run's
// operation, keeping the object's metadata (the poller lists it).
func (in *Inspector) markCancelled(ctx context.Context, pipeline, run, op, why string) error {
	name := pendingObject(pipeline)
	for range 5 {
		var p pendingRecord
		gen, err := in.state.read(ctx, name, &p)
		if errors.Is(err, ErrNotFound) {
			return nil // the run ended meanwhile
		}
		if err != nil {
			return err
		}
		if p.Run != run || p.Operation != op || p.Cancelled != "" {
			return nil
		}
		p.Cancelled = why
		// lockMeta: the sweep reads "cancelled" from the listing, so its
		// watchdog does not relabel an operator's cancel as a timeout.
		_, err = in.state.update(ctx, name, gen, p, lockMeta(p))
		if !errors.Is(err, ErrConflict) {
			return err
		}
	}
	return fmt.Errorf("pipeline %s: %w: its lock kept changing", pipeline, ErrConflict)
}

// detail gathers a run's records.
func (in *Inspector) detail(ctx context.Context, runID string) (RunDetail, error) {
	var d RunDetail
	var rec runRecord
	_, err := in.state.read(ctx, runObject(runID), &rec)
	if err != nil && !errors.Is(err, ErrNotFound) {
		return d, err
	}
	found := err == nil
	if found {
		d.Run = in.runOf(runID, rec, time.Time{})
	}
	pipeline := rec.Pipeline
	if !found {
		// A lock whose run record is missing (markDone recreates it).
		l, ok, err := in.findLock(ctx, func(p pendingRecord) bool { return p.Run == runID })
		if err != nil {
			return d, err
		}
		if !ok {
			return d, fmt.Errorf("run %s: %w", runID, ErrUnknownRun)
		}
		pipeline = l.Pipeline
		d.Run = Run{ID: runID, Trigger: l.Trigger, Pipeline: l.Pipeline, Store: l.Store, Name: l.Name,
			Destination: l.Destination, Status: RunClaimed, Claimed: l.Started, Operation: l.Operation, Spec: l.Spec}
	}
	var l pendingRecord
	switch _, err := in.state.read(ctx, pendingObject(pipeline), &l); {
	case err == nil && l.Run == runID:
		d.Lock = in.lockOf(l)
		d.Run.Running = d.Run.Status == RunClaimed && l.Operation != ""
		fill(&d.Run.Operation, l.Operation)
		fill(&d.Run.Destination, l.Destination)
		fill(&d.Run.Name, l.Name)
		fill(&d.Run.Store, l.Store)
	case err != nil && !errors.Is(err, ErrNotFound):
		return d, err
	}
	var q queueRecord
	switch _, err := in.state.read(ctx, queueObject(pipeline), &q); {
	case err == nil && q.Run == runID:
		d.Queued = in.queuedOf(q)
		fill(&d.Run.Destination, q.Destination)
	case err != nil && !errors.Is(err, ErrNotFound):
		return d, err
	}
	if d.Run.Operation != "" {
		var o opRecord
		switch _, err := in.state.read(ctx, opObject(d.Run.Operation), &o); {
		case err == nil:
			d.Indexed = &OperationIndex{Operation: o.Operation, Run: o.Run, Pipeline: o.Pipeline, Store: o.Store, Recorded: o.Recorded}
		case !errors.Is(err, ErrNotFound):
			return d, err
		}
	}
	if d.Lock != nil {
		ps := []PipelineStatus{{Lock: d.Lock}}
		in.progress(ctx, ps)
	}
	return d, nil
}

// resolve turns a run id, a trigger id or an operation name into a run id.
func (in *Inspector) resolve(ctx context.Context, id string) (string, error) {
	id = strings.TrimSpace(id)
	if id == "" {
		return "", fmt.Errorf("%w: empty id", ErrUnknownRun)
	}
	if strings.Contains(id, "/operations/") {
		return in.resolveOperation(ctx, id)
	}
	if !strings.Contains(id, "/") {
		var rec runRecord
		switch _, err := in.state.read(ctx, runObject(id), &rec); {
		case err == nil:
			return id, nil
		case !errors.Is(err, ErrNotFound):
			return "", err
		}
	}
	// A trigger id: every run it claimed (one per store for fleets).
	runs, err := in.runs(ctx, time.Time{})
	if err != nil {
		return "", err
	}
	var ids []string
	for _, r := range runs {
		if r.Trigger.ID == id {
			ids = append(ids, r.ID)
		}
	}
	if len(ids) == 0 {
		l, ok, err := in.findLock(ctx, func(p pendingRecord) bool { return p.Run == id || p.Trigger.ID == id })
		if err != nil {
			return "", err
		}
		if ok {
			return l.Run, nil
		}
	}
	// What the command prints, it takes back: the run id's first 16 hex
	// digits (the {run} of destination paths) or any prefix of 8 or more,
	// and an operation as DATASET/ID.
	if len(ids) == 0 && runIDPrefix.MatchString(id) {
		for _, r := range runs {
			if strings.HasPrefix(r.ID, id) {
				ids = append(ids, r.ID)
			}
		}
	}
	if ds, op, ok := strings.Cut(id, "/"); len(ids) == 0 && ok && ds != "" && op != "" && !strings.Contains(op, "/") {
		suffix := "/datasets/" + ds + "/operations/" + op
		for _, r := range runs {
			if strings.HasSuffix(r.Operation, suffix) {
				ids = append(ids, r.ID)
			}
		}
		if len(ids) == 0 {
			l, ok, err := in.findLock(ctx, func(p pendingRecord) bool { return strings.HasSuffix(p.Operation, suffix) })
			if err != nil || ok {
				return l.Run, err
			}
		}
	}
	return one(id, ids)
}

// runIDPrefix matches a run id's leading hex digits (a run id has 32).
var runIDPrefix = regexp.MustCompile(`^[0-9a-f]{8,31}$`)

func (in *Inspector) resolveOperation(ctx context.Context, op string) (string, error) {
	var o opRecord
	switch _, err := in.state.read(ctx, opObject(op), &o); {
	case err == nil && o.Run != "":
		return o.Run, nil
	case err != nil && !errors.Is(err, ErrNotFound):
		return "", err
	}
	l, ok, err := in.findLock(ctx, func(p pendingRecord) bool { return p.Operation == op })
	if err != nil || ok {
		return l.Run, err
	}
	runs, err := in.runs(ctx, time.Time{})
	if err != nil {
		return "", err
	}
	var ids []string
	for _, r := range runs {
		if r.Operation == op {
			ids = append(ids, r.ID)
		}
	}
	return one(op, ids)
}

func one(id string, ids []string) (string, error) {
	switch len(ids) {
	case 0:
		return "", fmt.Errorf("%s: %w: it is neither a run id (or its first 16 digits), a trigger id nor an operation fhirexport started (projects/…/operations/ID or DATASET/ID)", id, ErrUnknownRun)
	case 1:
		return ids[0], nil
	}
	slices.Sort(ids)
	return "", fmt.Errorf("%s: %w (%s): name one by its run id", id, ErrAmbiguous, strings.Join(ids, ", "))
}

// findLock returns the first lock matching match.
func (in *Inspector) findLock(ctx context.Context, match func(pendingRecord) bool) (pendingRecord, bool, error) {
	locks, err := readAll[pendingRecord](ctx, in, "pending", time.Time{})
	if err != nil {
		return pendingRecord{}, false, err
	}
	keys := make([]string, 0, len(locks))
	for k := range locks {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if match(locks[k].rec) {
			return locks[k].rec, true, nil
		}
	}
	return pendingRecord{}, false, nil
}

// runs reads the run records written at or after since (zero: all), and marks
// the claimed ones that hold their pipeline's lock with an operation.
func (in *Inspector) runs(ctx context.Context, since time.Time) ([]Run, error) {
	recs, err := readAll[runRecord](ctx, in, "runs", since)
	if err != nil {
		return nil, err
	}
	locks, err := readAll[pendingRecord](ctx, in, "pending", time.Time{})
	if err != nil {
		return nil, err
	}
	running := map[string]pendingRecord{}
	for _, l := range locks {
		running[l.rec.Run] = l.rec
	}
	out := make([]Run, 0, len(recs))
	for id, r := range recs {
		run := in.runOf(id, r.rec, r.updated)
		if l, ok := running[id]; ok && run.Status == RunClaimed {
			run.Running = l.Operation != ""
			fill(&run.Operation, l.Operation)
			fill(&run.Destination, l.Destination)
			fill(&run.Name, l.Name)
			fill(&run.Store, l.Store)
		}
		out = append(out, run)
	}
	return out, nil
}

func (in *Inspector) runOf(id string, r runRecord, updated time.Time) Run {
	run := Run{ID: id, Trigger: r.Trigger, Pipeline: r.Pipeline, Store: r.Store, Status: r.Status, Claimed: r.Claimed,
		Operation: r.Operation, Outcome: strings.TrimPrefix(r.Outcome, events.TypePrefix), Ended: r.Ended, Spec: r.Spec,
		Final: cmp.Or(r.Final, r.Reported), Started: r.Started, Into: r.Into, Updated: updated}
	for _, e := range []*events.Event{r.Started, run.Final} {
		if e != nil {
			fill(&run.Store, e.Data.Store)
			fill(&run.Name, e.Data.Name)
			fill(&run.Destination, e.Data.Destination)
		}
	}
	if run.Outcome == "" && run.Final != nil {
		run.Outcome = strings.TrimPrefix(run.Final.Type, events.TypePrefix)
	}
	if len(r.Spec) > 0 {
		if s, err := ParseSpec(r.Spec); err == nil {
			fill(&run.Store, s.FHIRStore)
			fill(&run.Name, s.Name)
			fill(&run.Destination, s.Destination())
			run.Incremental = &s.Incremental
		}
	}
	return run
}

// addRun adds what a run says to its pipeline's status: its store and name
// where nothing else named them, the destination of the latest run (runs may
// have different ones, e.g. per date), and the last outcome.
func addRun(p *PipelineStatus, r Run) {
	fill(&p.Store, r.Store)
	fill(&p.Name, r.Name)
	if r.Destination != "" && r.Status != RunRejected && (p.latest.IsZero() || r.Claimed.After(p.latest) ||
		(r.Claimed.Equal(p.latest) && r.ID > p.latestID)) {
		p.Destination, p.latest, p.latestID = r.Destination, r.Claimed, r.ID
	}
	if r.Incremental != nil && r.Status != RunRejected && (p.latestSpec.IsZero() || r.Claimed.After(p.latestSpec) ||
		(r.Claimed.Equal(p.latestSpec) && r.ID > p.latestSpecID)) {
		p.Incremental, p.latestSpec, p.latestSpecID = r.Incremental, r.Claimed, r.ID
	}
	if r.Status != RunClaimed && r.Status != RunQueued && (p.Last == nil || r.EndedAt().After(p.Last.EndedAt())) {
		p.Last = &r
	}
}

func (in *Inspector) addWatermark(p *PipelineStatus, w watermarkRecord) {
	fill(&p.Store, w.Store)
	fill(&p.Name, w.Name)
	p.Watermark, p.WatermarkOperation, p.WatermarkUpdated = w.Watermark, w.Operation, w.Updated
	if t, err := time.Parse(time.RFC3339Nano, w.Watermark); err == nil {
		p.WatermarkAge = age(in.now().Sub(t))
	}
}

func (in *Inspector) addLock(p *PipelineStatus, l pendingRecord) {
	p.Lock = in.lockOf(l)
	fill(&p.Store, l.Store)
	fill(&p.Name, l.Name)
	fill(&p.Destination, l.Destination)
}

func (in *Inspector) addQueued(p *PipelineStatus, q queueRecord) {
	p.Queued = in.queuedOf(q)
	fill(&p.Store, q.Store)
	fill(&p.Name, q.Name)
	fill(&p.Destination, q.Destination)
}

func (in *Inspector) lockOf(p pendingRecord) *Lock {
	l := &Lock{Run: p.Run, Trigger: p.Trigger, Pipeline: p.Pipeline, Store: p.Store, Name: p.Name, Destination: p.Destination,
		Since: p.Since, Incremental: p.Incremental, Spec: p.Spec, Timeout: p.Timeout, Slot: p.Slot, FromQueue: p.FromQueue,
		Started: p.Started, Called: p.Called, Operation: p.Operation, Adopted: p.Adopted, Finalizing: p.Finalizing,
		Unobserved: p.Unobserved, Cancelled: p.Cancelled, Age: age(in.now().Sub(p.Started))}
	switch {
	case !p.Finalizing.IsZero(), p.Reported != nil:
		l.State = "finalizing"
	case p.Operation != "":
		l.State = "running"
	case p.Ending != nil:
		l.State = "ending"
	case p.Requeued != "":
		l.State = "requeueing"
	case !p.Called.IsZero():
		l.State = "in doubt"
	default:
		l.State = "starting"
	}
	l.Orphaned = p.Operation == "" && in.now().Sub(p.Started) >= in.StartLease
	return l
}

func (in *Inspector) queuedOf(q queueRecord) *Queued {
	return &Queued{Run: q.Run, Trigger: q.Trigger, Destination: q.Destination, Enqueued: q.Enqueued, NotBefore: q.NotBefore,
		Attempts: q.Attempts, Coalesced: q.Coalesced, Spec: q.Spec, Age: age(in.now().Sub(q.Enqueued))}
}

// progress asks operations.get for the progress of every running lock.
func (in *Inspector) progress(ctx context.Context, ps []PipelineStatus) {
	if in.hc == nil {
		return
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, max(1, in.Workers))
	for i := range ps {
		l := ps[i].Lock
		if l == nil || l.Operation == "" {
			continue
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			l.Progress = in.operationProgress(ctx, l.Operation)
		})
	}
	wg.Wait()
}

func (in *Inspector) operationProgress(ctx context.Context, name string) *Progress {
	callCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	op, err := in.hc.Projects.Locations.Datasets.Operations.Get(name).Context(callCtx).Do()
	if err != nil {
		return &Progress{GetError: err.Error()}
	}
	p := &Progress{Done: op.Done}
	var meta healthcare.OperationMetadata
	if len(op.Metadata) > 0 {
		if err := json.Unmarshal(op.Metadata, &meta); err != nil {
			p.GetError = fmt.Sprintf("decode metadata: %v", err)
		}
	}
	if c := meta.Counter; c != nil {
		p.Success, p.Failure, p.Pending = c.Success, c.Failure, c.Pending
	}
	p.CreateTime, p.CancelRequested = meta.CreateTime, meta.CancelRequested
	if op.Error != nil {
		p.Error = &events.Error{Code: int32(op.Error.Code), Message: op.Error.Message}
	}
	return p
}

// listed is a decoded state object and when it was last written.
type listed[T any] struct {
	rec     T
	updated time.Time
}

// readAll reads every JSON object in dir written at or after since (zero:
// all), keyed by name without ".json". Objects that vanish between list and
// read are skipped.
func readAll[T any](ctx context.Context, in *Inspector, dir string, since time.Time) (map[string]listed[T], error) {
	s := in.state
	q := &storage.Query{Prefix: s.object(dir) + "/"}
	if err := q.SetAttrSelection([]string{"Name", "Updated"}); err != nil {
		return nil, err
	}
	type item struct {
		name    string
		updated time.Time
	}
	var items []item
	it := s.bkt.Objects(ctx, q)
	for {
		a, err := it.Next()
		if errors.Is(err, iterator.Done) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("list state gs://%s/%s: %w", s.bucket, q.Prefix, err)
		}
		rel := a.Name[len(q.Prefix):]
		if strings.Contains(rel, "/") || !strings.HasSuffix(rel, ".json") || (!since.IsZero() && a.Updated.Before(since)) {
			continue
		}
		items = append(items, item{rel, a.Updated})
	}
	out := make(map[string]listed[T], len(items))
	var mu sync.Mutex
	var errs []error
	var wg sync.WaitGroup
	sem := make(chan struct{}, max(1, in.Workers))
	for _, o := range items {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			var v T
			_, err := s.read(ctx, dir+"/"+o.name, &v)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case errors.Is(err, ErrNotFound):
			case errors.Is(err, ErrCorrupt):
				// One bad object must not hide everything else: name it and go on.
				Logger(ctx).Warn("skipped a corrupt state object; inspect or delete it", "object", "gs://"+s.bucket+"/"+s.object(dir+"/"+o.name), "error", err.Error())
			case err != nil:
				errs = append(errs, err)
			default:
				out[strings.TrimSuffix(o.name, ".json")] = listed[T]{v, o.updated}
			}
		})
	}
	wg.Wait()
	return out, errors.Join(errs...)
}

func lockSpec(l *Lock) json.RawMessage {
	if l == nil {
		return nil
	}
	return l.Spec
}

func queuedSpec(q *Queued) json.RawMessage {
	if q == nil {
		return nil
	}
	return q.Spec
}

// EndedAt is when the run ended, as well as its records tell: its end, its
// final event, or the last write of its record.
func (r Run) EndedAt() time.Time {
	if !r.Ended.IsZero() {
		return r.Ended
	}
	if r.Final != nil && !r.Final.Time.IsZero() {
		return r.Final.Time
	}
	if !r.Updated.IsZero() {
		return r.Updated
	}
	return r.Claimed
}

func fill(dst *string, v string) {
	if *dst == "" {
		*dst = v
	}
}

// age renders a duration to the second.
func age(d time.Duration) string {
	if d < 0 {
		d = 0
	}
	return d.Truncate(time.Second).String()
}
