package export

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"google.golang.org/api/googleapi"
	healthcare "google.golang.org/api/healthcare/v1"

	"github.com/fhirexport/fhirexport/events"
)

// Publisher publishes outcome events; *events.Publisher is the real one.
type Publisher interface {
	Publish(ctx context.Context, e events.Event) error
}

var _ Publisher = (*events.Publisher)(nil)

// Exporter starts exports and follows them. It is safe for concurrent use and
// holds no per-event state: everything lives in the state bucket.
type Exporter struct {
	hc     *healthcare.Service
	state  *State
	pub    Publisher
	policy Policy
	now    func() time.Time

	// StartLease is how long a start attempt that has not recorded its
	// operation yet is presumed alive; a redelivery after it takes over.
	StartLease time.Duration
	// WaitForPeer is how long a concurrent redelivery waits for the attempt in
	// flight before asking Pub/Sub to retry later.
	WaitForPeer time.Duration
	// FinalizeLease is how long a sweep reporting an outcome is presumed
	// alive; after it another sweep reports the outcome again (same event id).
	FinalizeLease time.Duration
	// PollWorkers bounds concurrent operations.get calls during a sweep.
	PollWorkers int
}

// New returns an Exporter over the given clients. now may be nil (time.Now).
func New(hc *healthcare.Service, state *State, pub Publisher, policy Policy, now func() time.Time) *Exporter {
	if now == nil {
		now = time.Now
	}
	return &Exporter{hc: hc, state: state, pub: pub, policy: policy, now: now,
		StartLease: 2 * time.Minute, FinalizeLease: 2 * time.Minute, WaitForPeer: 10 * time.Second, PollWorkers: 16}
}

// errTransient marks failures Pub/Sub should retry by redelivering.
var errTransient = errors.New("transient")

// run is one trigger being started.
type run struct {
	key      string
	trig     events.Trigger
	ref      events.TriggerRef
	spec     *Spec
	pipeline string
	dest     string
	types    []string
	log      *slog.Logger
}

// Start turns one trigger into at most one export. It returns nil when the
// trigger is done with (started, or permanently rejected and reported) and an
// error when Pub/Sub should redeliver it.
func (x *Exporter) Start(ctx context.Context, trig events.Trigger, decodeErr error) error {
	ref := events.TriggerRef{Source: trig.Source, ID: trig.ID}
	log := Logger(ctx).With("trigger", trig.ID, "triggerSource", trig.Source)
	if decodeErr != nil {
		return x.reject(ctx, log, ref, trig, nil, &SpecError{Problem: decodeErr.Error(), Accepted: "a Pub/Sub message or CloudEvent whose data is the export spec as JSON"})
	}
	spec, err := ParseSpec(trig.Spec)
	if err != nil {
		return x.reject(ctx, log, ref, trig, nil, err)
	}
	log = log.With("store", spec.FHIRStore)
	if !x.policy.AllowStore(spec.FHIRStore) {
		return x.reject(ctx, log, ref, trig, spec, specErr("fhirStore", "a store matching FHIREXPORT_ALLOWED_STORES", "%q is not on the allow-list%s", spec.FHIRStore, emptyHint(x.policy.stores, "FHIREXPORT_ALLOWED_STORES")))
	}
	key := RunKey(trig.Source, trig.ID)
	r := &run{key: key, trig: trig, ref: ref, spec: spec, pipeline: PipelineKey(spec), log: log}
	r.types, _ = spec.Types()
	r.dest = spec.Destination()
	if spec.GCSDestination != nil {
		at := trig.Time
		if at.IsZero() {
			at = x.now()
		}
		r.dest = ExpandURIPrefix(spec.GCSDestination.URIPrefix, spec.FHIRStore, key[:16], at)
	}
	if !x.policy.AllowDestination(r.dest) {
		field := "gcsDestination.uriPrefix"
		if spec.BigQueryDestination != nil {
			field = "bigqueryDestination.datasetUri"
		}
		return x.reject(ctx, log, ref, trig, spec, specErr(field, "a destination inside FHIREXPORT_ALLOWED_DESTINATIONS", "%q is not on the allow-list%s", r.dest, emptyHint(x.policy.destinations, "FHIREXPORT_ALLOWED_DESTINATIONS")))
	}
	r.log = log.With("pipeline", r.pipeline, "run", key)

	_, err = x.state.create(ctx, runObject(key), runRecord{Trigger: ref, Pipeline: r.pipeline, Status: statusClaimed, Claimed: x.now()}, nil)
	switch {
	case errors.Is(err, ErrExists):
		return x.resume(ctx, r)
	case err != nil:
		return fmt.Errorf("claim trigger %s: %w", trig.ID, err)
	}
	return x.begin(ctx, r, false)
}

// resume handles a trigger whose claim exists: a redelivery, concurrent or
// after a crash or a transient failure.
func (x *Exporter) resume(ctx context.Context, r *run) error {
	var rec runRecord
	if _, err := x.state.read(ctx, runObject(r.key), &rec); err != nil {
		if errors.Is(err, ErrNotFound) { // released between our create and read
			return fmt.Errorf("trigger %s: claim released concurrently, retry: %w", r.trig.ID, errTransient)
		}
		return fmt.Errorf("read claim of trigger %s: %w", r.trig.ID, err)
	}
	if rec.Status == statusClaimed {
		return x.begin(ctx, r, true)
	}
	return x.ended(ctx, r, rec)
}

// ended answers a redelivery of a run that has ended: it publishes the run's
// events again (same ids; one may have been lost) and acknowledges.
func (x *Exporter) ended(ctx context.Context, r *run, rec runRecord) error {
	if rec.Status == statusDone {
		// The started event may have been lost: its publish failed and the
		// run ended before this redelivery.
		if rec.Started != nil {
			if err := x.pub.Publish(ctx, *rec.Started); err != nil {
				return err
			}
		}
		r.log.Info("duplicate delivery of a finished run; acknowledged", "operation", rec.Operation)
		return nil
	}
	if rec.Final != nil {
		if err := x.pub.Publish(ctx, *rec.Final); err != nil {
			return err
		}
	}
	r.log.Info("duplicate delivery of an ended run; acknowledged", "status", rec.Status)
	return x.releaseLock(ctx, r)
}

// begin takes the pipeline's lock, then starts the export. recheck is set for
// a redelivery whose claim was still "claimed": between reading the claim and
// taking the lock a poller may have finished this very run (marked it done,
// then removed its lock), so the claim is read again once the lock is held.
func (x *Exporter) begin(ctx context.Context, r *run, recheck bool) error {
	p := pendingRecord{Run: r.key, Trigger: r.ref, Pipeline: r.pipeline, Store: r.spec.FHIRStore, Name: r.spec.Name,
		Labels: r.spec.Labels, Destination: r.dest, Types: r.types, Incremental: r.spec.Incremental, Started: x.now()}
	gen, err := x.state.create(ctx, pendingObject(r.pipeline), p, map[string]string{"run": r.key})
	if errors.Is(err, ErrExists) {
		var held pendingRecord
		p, gen, err = x.lockHeld(ctx, r, &held)
		if err != nil || gen == 0 {
			return err
		}
	} else if err != nil {
		return fmt.Errorf("lock pipeline %s: %w", r.pipeline, err)
	} else if recheck {
		var rec runRecord
		if _, err := x.state.read(ctx, runObject(r.key), &rec); err != nil {
			x.dropLock(ctx, r, gen)
			return fmt.Errorf("read claim of trigger %s: %w", r.trig.ID, err)
		}
		if rec.Status != statusClaimed {
			if err := x.dropLock(ctx, r, gen); err != nil {
				return err
			}
			return x.ended(ctx, r, rec)
		}
	}

	if r.spec.Incremental {
		since, err := x.incrementalSince(ctx, r)
		if err != nil {
			return x.abandon(ctx, r, gen, err)
		}
		p.Since = since
	} else {
		p.Since = r.spec.Since
	}

	req := ExportRequest(r.spec, r.dest, p.Since)
	callCtx, cancel := context.WithTimeout(ctx, time.Minute)
	op, err := x.hc.Projects.Locations.Datasets.FhirStores.Export(r.spec.FHIRStore, req).Context(callCtx).Do()
	cancel()
	if err != nil {
		if !Permanent(err) {
			r.log.Warn("export call failed transiently; releasing the claim so a redelivery retries", "error", err.Error())
			return x.abandon(ctx, r, gen, fmt.Errorf("export %s: %w", r.spec.FHIRStore, err))
		}
		return x.refused(ctx, r, p, gen, err)
	}
	p.Operation = op.Name
	if _, err := x.state.update(ctx, pendingObject(r.pipeline), gen, p, map[string]string{"run": r.key, "operation": op.Name}); err != nil {
		// The export runs but is not recorded: a redelivery after the lease
		// would start a second one. The storage client already retried.
		r.log.Error("export started but not recorded", "operation", op.Name, "error", err.Error())
		return fmt.Errorf("record operation %s: %w", op.Name, err)
	}
	r.log.Info("export started", "operation", op.Name, "since", p.Since, "destination", r.dest)
	return x.pub.Publish(ctx, startedEvent(p))
}

// lockHeld handles a pipeline lock that already exists. It returns the lock
// and its generation when this attempt may go on (gen 0 when the trigger is
// done with), or an error to have Pub/Sub redeliver.
func (x *Exporter) lockHeld(ctx context.Context, r *run, held *pendingRecord) (pendingRecord, int64, error) {
	deadline := x.now().Add(x.WaitForPeer)
	for {
		gen, err := x.state.read(ctx, pendingObject(r.pipeline), held)
		if errors.Is(err, ErrNotFound) {
			return pendingRecord{}, 0, fmt.Errorf("pipeline %s: lock released concurrently, retry: %w", r.pipeline, errTransient)
		}
		if err != nil {
			return pendingRecord{}, 0, fmt.Errorf("read lock of pipeline %s: %w", r.pipeline, err)
		}
		if held.Run != r.key {
			return pendingRecord{}, 0, x.skip(ctx, r, held)
		}
		if held.Operation != "" { // an earlier delivery started it; make sure started was published
			r.log.Info("duplicate delivery of a started run; acknowledged", "operation", held.Operation)
			return pendingRecord{}, 0, x.pub.Publish(ctx, startedEvent(*held))
		}
		if x.now().Sub(held.Started) >= x.StartLease { // the earlier attempt died: take over
			held.Started = x.now()
			gen, err = x.state.update(ctx, pendingObject(r.pipeline), gen, held, map[string]string{"run": r.key})
			if err != nil {
				return pendingRecord{}, 0, fmt.Errorf("take over stale start of pipeline %s: %w", r.pipeline, err)
			}
			r.log.Warn("taking over a start attempt that did not finish")
			return *held, gen, nil
		}
		if !x.now().Before(deadline) {
			return pendingRecord{}, 0, fmt.Errorf("trigger %s: another delivery is starting this run; retry later: %w", r.trig.ID, errTransient)
		}
		select {
		case <-ctx.Done():
			return pendingRecord{}, 0, ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// incrementalSince is the _since of an incremental run: the pipeline's
// watermark, or the spec's _since when that is later (a floor), or the spec's
// _since alone when there is no watermark yet.
func (x *Exporter) incrementalSince(ctx context.Context, r *run) (string, error) {
	wm, err := x.watermark(ctx, r.pipeline)
	if err != nil {
		return "", err
	}
	if wm == "" {
		return r.spec.Since, nil
	}
	if r.spec.Since != "" {
		floor, _ := ParseSince(r.spec.Since)
		w, _ := time.Parse(time.RFC3339Nano, wm)
		if floor.After(w) {
			return r.spec.Since, nil
		}
	}
	return wm, nil
}

// watermark returns a pipeline's watermark, "" when it has none.
func (x *Exporter) watermark(ctx context.Context, pipeline string) (string, error) {
	var w watermarkRecord
	_, err := x.state.read(ctx, watermarkObject(pipeline), &w)
	if errors.Is(err, ErrNotFound) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read watermark of pipeline %s: %w", pipeline, err)
	}
	return w.Watermark, nil
}

// dropLock removes the pipeline lock this attempt holds at generation gen. A
// lock it cannot remove expires with the start lease.
func (x *Exporter) dropLock(ctx context.Context, r *run, gen int64) error {
	err := x.state.remove(ctx, pendingObject(r.pipeline), gen)
	if err != nil {
		r.log.Warn("could not release pipeline lock; it expires with the start lease", "error", err.Error())
	}
	return err
}

// abandon releases the lock and the claim after a transient failure, so the
// redelivery starts afresh, and returns cause for Pub/Sub to retry.
func (x *Exporter) abandon(ctx context.Context, r *run, gen int64, cause error) error {
	if x.dropLock(ctx, r, gen) != nil {
		return cause
	}
	var rec runRecord
	if g, err := x.state.read(ctx, runObject(r.key), &rec); err == nil && rec.Status == statusClaimed {
		if err := x.state.remove(ctx, runObject(r.key), g); err != nil {
			r.log.Warn("could not release trigger claim", "error", err.Error())
		}
	}
	return cause
}

// refused reports an export the API refused for good (400, 403, 404): the
// run ends as failed, the trigger is acknowledged.
func (x *Exporter) refused(ctx context.Context, r *run, p pendingRecord, gen int64, apiErr error) error {
	code, msg := statusOf(apiErr)
	ev := events.Event{
		ID: eventID("failed", r.key), Type: events.TypeFailed, Source: SourceOf(r.spec.FHIRStore),
		Subject: r.trig.ID, Time: p.Started,
		Data: baseData(p),
	}
	ev.Data.Error = &events.Error{Code: code, Message: msg}
	r.log.Error("export refused by the Healthcare API", "code", code, "error", msg)
	if err := x.finish(ctx, r, statusFailed, &ev); err != nil {
		return err
	}
	x.dropLock(ctx, r, gen) // the run is reported; a lock left behind expires
	return nil
}

// skip reports a trigger whose pipeline is busy with another run.
func (x *Exporter) skip(ctx context.Context, r *run, held *pendingRecord) error {
	ev := events.Event{
		ID: eventID("skipped", r.key), Type: events.TypeRejected, Source: SourceOf(r.spec.FHIRStore),
		Subject: r.trig.ID, Time: triggerTime(r.trig, x.now),
		Data: events.Data{Store: r.spec.FHIRStore, Pipeline: r.pipeline, Name: r.spec.Name, Labels: r.spec.Labels,
			Destination: r.dest, Types: r.types, Incremental: r.spec.Incremental, Trigger: r.ref,
			Error: &events.Error{Code: codeAborted, Message: fmt.Sprintf(
				"pipeline %s already has a run in progress (trigger %s, operation %q); this trigger was skipped, the next one after that run ends will export what changed",
				r.pipeline, held.Trigger.ID, held.Operation)}},
	}
	r.log.Warn("pipeline busy; trigger skipped", "heldBy", held.Trigger.ID, "operation", held.Operation)
	return x.finish(ctx, r, statusSkipped, &ev)
}

// finish records the terminal status of a run that has no operation, then
// publishes its event. A crash in between repeats both on redelivery.
func (x *Exporter) finish(ctx context.Context, r *run, status string, ev *events.Event) error {
	var rec runRecord
	gen, err := x.state.read(ctx, runObject(r.key), &rec)
	if err != nil {
		return fmt.Errorf("read claim of trigger %s: %w", r.trig.ID, err)
	}
	if rec.Status != statusClaimed {
		// Ended meanwhile (a poller finished it): nothing left to report.
		r.log.Info("duplicate delivery of an ended run; acknowledged", "status", rec.Status)
		return nil
	}
	rec.Status, rec.Final = status, ev
	if _, err := x.state.update(ctx, runObject(r.key), gen, rec, nil); err != nil {
		return fmt.Errorf("record %s run of trigger %s: %w", status, r.trig.ID, err)
	}
	return x.pub.Publish(ctx, *ev)
}

// releaseLock removes the pipeline lock if this run still holds it.
func (x *Exporter) releaseLock(ctx context.Context, r *run) error {
	var held pendingRecord
	gen, err := x.state.read(ctx, pendingObject(r.pipeline), &held)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read lock of pipeline %s: %w", r.pipeline, err)
	}
	if held.Run != r.key || held.Operation != "" {
		return nil
	}
	return x.dropLock(ctx, r, gen)
}

// reject reports a trigger that can never succeed and acknowledges it.
func (x *Exporter) reject(ctx context.Context, log *slog.Logger, ref events.TriggerRef, trig events.Trigger, spec *Spec, cause error) error {
	var se *SpecError
	field := ""
	if errors.As(cause, &se) {
		field = se.Field
	}
	data := events.Data{Trigger: ref, Error: &events.Error{Code: codeInvalidArgument, Message: cause.Error(), Field: field}}
	source := trig.Source
	if spec != nil {
		data.Store, data.Name, data.Labels, data.Incremental = spec.FHIRStore, spec.Name, spec.Labels, spec.Incremental
		source = SourceOf(spec.FHIRStore)
		if field == "fhirStore" || field == "gcsDestination.uriPrefix" || field == "bigqueryDestination.datasetUri" {
			data.Error.Code = codePermissionDenied
		}
	}
	log.Warn("trigger rejected", "field", field, "error", cause.Error())
	return x.pub.Publish(ctx, events.Event{
		ID: eventID("rejected", trig.Source, trig.ID), Type: events.TypeRejected, Source: source,
		Subject: trig.ID, Time: triggerTime(trig, x.now), Data: data,
	})
}

// emptyHint tells an operator whose allow-list is empty why everything is
// refused: deny by default, not a bad spec.
func emptyHint[T any](list []T, variable string) string {
	if len(list) > 0 {
		return ""
	}
	return " (" + variable + " is empty, so nothing may be exported: set it on the function)"
}

func triggerTime(t events.Trigger, now func() time.Time) time.Time {
	if !t.Time.IsZero() {
		return t.Time
	}
	return now()
}

// google.rpc.Code values used in events.
const (
	codeInvalidArgument  = 3
	codePermissionDenied = 7
	codeAborted          = 10
	codeUnknown          = 2
	codeNotFound         = 5
	codeUnauthenticated  = 16
)

// Permanent reports whether a Healthcare API error can never succeed on
// retry: 400, 401, 403 and 404. Everything else (429, 5xx, timeouts, broken
// connections) is transient.
func Permanent(err error) bool {
	var ge *googleapi.Error
	if !errors.As(err, &ge) {
		return false
	}
	switch ge.Code {
	case http.StatusBadRequest, http.StatusUnauthorized, http.StatusForbidden, http.StatusNotFound:
		return true
	}
	return false
}

// statusOf turns an API error into a google.rpc.Code and message.
func statusOf(err error) (int32, string) {
	var ge *googleapi.Error
	if errors.As(err, &ge) {
		msg := ge.Message
		if msg == "" {
			msg = ge.Error()
		}
		switch ge.Code {
		case http.StatusBadRequest:
			return codeInvalidArgument, msg
		case http.StatusUnauthorized:
			return codeUnauthenticated, msg
		case http.StatusForbidden:
			return codePermissionDenied, msg
		case http.StatusNotFound:
			return codeNotFound, msg
		}
		return codeUnknown, msg
	}
	return codeUnknown, err.Error()
}

// ExportRequest builds the API request for a spec, its expanded destination
// and the _since to use.
func ExportRequest(s *Spec, dest, since string) *healthcare.ExportResourcesRequest {
	req := &healthcare.ExportResourcesRequest{Since: since, Type: s.Type}
	if s.GCSDestination != nil {
		req.GcsDestination = &healthcare.GoogleCloudHealthcareV1FhirGcsDestination{UriPrefix: dest}
		return req
	}
	bq := s.BigQueryDestination
	d := &healthcare.GoogleCloudHealthcareV1FhirBigQueryDestination{
		DatasetUri: bq.DatasetURI, WriteDisposition: bq.WriteDisposition, Force: bq.Force,
	}
	if sc := bq.SchemaConfig; sc != nil {
		d.SchemaConfig = &healthcare.SchemaConfig{SchemaType: sc.SchemaType, RecursiveStructureDepth: int64(sc.RecursiveStructureDepth)}
		if pc := sc.LastUpdatedPartitionConfig; pc != nil {
			d.SchemaConfig.LastUpdatedPartitionConfig = &healthcare.TimePartitioning{Type: pc.Type, ExpirationMs: int64(pc.ExpirationMs)}
		}
	}
	req.BigqueryDestination = d
	return req
}

// baseData is the event data every event about a run shares.
func baseData(p pendingRecord) events.Data {
	return events.Data{
		Store: p.Store, Operation: p.Operation, Pipeline: p.Pipeline, Name: p.Name, Labels: p.Labels,
		Destination: p.Destination, Types: p.Types, Since: p.Since, Incremental: p.Incremental, Trigger: p.Trigger,
	}
}

func startedEvent(p pendingRecord) events.Event {
	return events.Event{
		ID: eventID("started", p.Operation), Type: events.TypeStarted, Source: SourceOf(p.Store),
		Subject: p.Operation, Time: p.Started, Data: baseData(p),
	}
}
