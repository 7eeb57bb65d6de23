package export

import (
	"context"
	"encoding/json"
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
	// operation yet is presumed alive; after it a redelivery takes over, or
	// the next sweep resolves and releases the orphaned lock.
	StartLease time.Duration
	// WaitForPeer is how long a concurrent redelivery waits for the attempt in
	// flight before asking Pub/Sub to retry later.
	WaitForPeer time.Duration
	// FinalizeLease is how long a sweep reporting an outcome is presumed
	// alive; after it another sweep reports the outcome again (same event id).
	FinalizeLease time.Duration
	// PollWorkers bounds concurrent operations.get calls during a sweep.
	PollWorkers int
	// MaxRunning bounds the exports running at once (FHIREXPORT_MAX_RUNNING).
	MaxRunning int
	// ObservePatience is how long operations.get may answer 401/403 before
	// the run is reported failed as unobservable.
	ObservePatience time.Duration
	// RetryBackoff is the first wait after 429 RESOURCE_EXHAUSTED; it
	// doubles per attempt, up to an hour.
	RetryBackoff time.Duration
	// FleetWorkers bounds the stores of a fleet trigger started at once.
	FleetWorkers int
	// FleetSlice is how long one delivery of a fleet trigger takes new
	// stores; the rest are left to its redelivery (fleet.go).
	FleetSlice time.Duration
	// CallSkew is how far our clock and the Healthcare API's may disagree:
	// a run in doubt looks for its operation among those created from when
	// it took its lock to when its export call returned, widened by it.
	CallSkew time.Duration
	// InDoubtPatience is how long a run whose export answer was lost waits
	// for operations.list to tell its operation apart from others before it
	// is reported failed.
	InDoubtPatience time.Duration
	// FileURL is the URL a Bulk Data client GETs for a feed file, written as
	// the url of manifest entries; nil is CloudStorageURL. Against a Cloud
	// Storage emulator it is EmulatorFileURL.
	FileURL func(bucket, object string) string
}

// New returns an Exporter over the given clients. now may be nil (time.Now).
func New(hc *healthcare.Service, state *State, pub Publisher, policy Policy, now func() time.Time) *Exporter {
	if now == nil {
		now = time.Now
	}
	return &Exporter{hc: hc, state: state, pub: pub, policy: policy, now: now,
		StartLease: 2 * time.Minute, FinalizeLease: 2 * time.Minute, WaitForPeer: 10 * time.Second, PollWorkers: 16,
		MaxRunning: DefaultMaxRunning, ObservePatience: time.Hour, RetryBackoff: time.Minute, InDoubtPatience: time.Hour,
		FleetWorkers: DefaultFleetWorkers, FleetSlice: DefaultFleetSlice,
		CallSkew: DefaultCallSkew}
}

// DefaultMaxRunning is FHIREXPORT_MAX_RUNNING's default: Google's advice for
// concurrent long-running operations per project.
const DefaultMaxRunning = 5

// errTransient marks failures Pub/Sub should retry by redelivering.
var errTransient = errors.New("transient")

// run is one store's run of a trigger being admitted or started.
type run struct {
	key      string
	trig     events.Trigger
	ref      events.TriggerRef
	spec     *Spec
	pipeline string
	dest     string
	feed     string // the expanded deletedUriPrefix, if any
	types    []string
	log      *slog.Logger
}

// pending is the lock/pending record this run would hold.
func (r *run) pending(now time.Time) pendingRecord {
	spec, _ := json.Marshal(r.spec)
	return pendingRecord{Run: r.key, Trigger: r.ref, Pipeline: r.pipeline, Store: r.spec.FHIRStore, Name: r.spec.Name,
		Labels: r.spec.Labels, Destination: r.dest, Feed: r.feed, Types: r.types, Incremental: r.spec.Incremental,
		Spec: spec, Timeout: r.spec.Timeout, Slot: -1, Locked: now, Started: now}
}

// Start turns one trigger into at most one export per store (queued when the
// budget or the pipeline is busy). It returns nil when the trigger is done
// with (started, queued, or permanently rejected and reported) and an error
// when Pub/Sub should redeliver it.
func (x *Exporter) Start(ctx context.Context, trig events.Trigger, decodeErr error) error {
	log := Logger(ctx).With("trigger", trig.ID, "triggerSource", trig.Source)
	if decodeErr != nil {
		return x.reject(ctx, log, trig, nil, "", &SpecError{Problem: decodeErr.Error(), Accepted: "a Pub/Sub message or CloudEvent whose data is the export spec as JSON"})
	}
	spec, err := ParseSpec(trig.Spec)
	if err != nil {
		return x.reject(ctx, log, trig, nil, "", err)
	}
	if !spec.IsFleet() {
		r, err := x.newRun(trig, spec, RunKey(trig.Source, trig.ID), log)
		if err != nil {
			return x.reject(ctx, log, trig, spec, "", err)
		}
		return x.startRun(ctx, r)
	}
	return x.startFleet(ctx, trig, spec, log)
}

// newRun checks one store's spec against the allow-lists and expands its
// destination.
func (x *Exporter) newRun(trig events.Trigger, spec *Spec, key string, log *slog.Logger) (*run, error) {
	log = log.With("store", spec.FHIRStore)
	if !x.policy.AllowStore(spec.FHIRStore) {
		return nil, deniedErr("fhirStore", "a store matching FHIREXPORT_ALLOWED_STORES", "%q is not on the allow-list%s", spec.FHIRStore, emptyHint(x.policy.stores, "FHIREXPORT_ALLOWED_STORES"))
	}
	r := &run{key: key, trig: trig, ref: events.TriggerRef{Source: trig.Source, ID: trig.ID}, spec: spec, pipeline: PipelineKey(spec)}
	r.types, _ = spec.Types()
	r.dest = spec.Destination()
	if spec.GCSDestination != nil {
		r.dest = ExpandURIPrefix(spec.GCSDestination.URIPrefix, spec.FHIRStore, key[:16], triggerTime(trig, x.now))
	}
	if !x.policy.AllowDestination(r.dest) {
		field := "gcsDestination.uriPrefix"
		if spec.BigQueryDestination != nil {
			field = "bigqueryDestination.datasetUri"
		}
		return nil, deniedErr(field, "a destination inside FHIREXPORT_ALLOWED_DESTINATIONS", "%q is not on the allow-list%s", r.dest, emptyHint(x.policy.destinations, "FHIREXPORT_ALLOWED_DESTINATIONS"))
	}
	if spec.DeletedURIPrefix != "" {
		r.feed = ExpandURIPrefix(spec.DeletedURIPrefix, spec.FHIRStore, key[:16], triggerTime(trig, x.now))
		if !x.policy.AllowDestination(r.feed) {
			return nil, deniedErr("deletedUriPrefix", "a Cloud Storage prefix inside FHIREXPORT_ALLOWED_DESTINATIONS", "%q is not on the allow-list%s", r.feed, emptyHint(x.policy.destinations, "FHIREXPORT_ALLOWED_DESTINATIONS"))
		}
	}
	r.log = log.With("pipeline", r.pipeline, "run", key)
	return r, nil
}

// startRun claims the run, or resumes it when a delivery claimed it before.
func (x *Exporter) startRun(ctx context.Context, r *run) error {
	rec, gen, created, err := x.claim(ctx, r)
	if err != nil {
		return err
	}
	if created {
		return x.admit(ctx, r)
	}
	return x.resume(ctx, r, rec, gen)
}

// resume handles a trigger whose claim exists: a redelivery, concurrent or
// after a crash or a transient failure.
func (x *Exporter) resume(ctx context.Context, r *run, rec runRecord, gen int64) error {
	switch rec.Status {
	case statusClaimed:
		return x.admit(ctx, r)
	case statusQueued:
		r.log.Info("duplicate delivery of a queued run; acknowledged")
		return nil
	case statusDone:
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
	return nil
}

// incrementalSince is the _since of an incremental run: the pipeline's
// watermark, or the spec's _since when that is later (a floor), or the spec's
// _since alone when there is no watermark yet.
func (x *Exporter) incrementalSince(ctx context.Context, p pendingRecord, specSince string) (string, error) {
	wm, err := x.watermark(ctx, p.Pipeline)
	if err != nil {
		return "", err
	}
	if wm == "" {
		return specSince, nil
	}
	if specSince != "" {
		floor, _ := ParseSince(specSince)
		w, _ := time.Parse(time.RFC3339Nano, wm)
		if floor.After(w) {
			return specSince, nil
		}
	}
	return wm, nil
}

// watermark returns a pipeline's watermark, "" when it has none. A corrupt
// watermark is an error wrapping ErrCorrupt: it must not pass for "none",
// which would re-export everything.
func (x *Exporter) watermark(ctx context.Context, pipeline string) (string, error) {
	w, err := x.readWatermark(ctx, pipeline)
	if err != nil {
		return "", fmt.Errorf("read watermark of pipeline %s: %w", pipeline, err)
	}
	return w.rec.Watermark, nil
}

// reject reports a trigger (or one store of a fleet trigger) that can never
// succeed and acknowledges it.
func (x *Exporter) reject(ctx context.Context, log *slog.Logger, trig events.Trigger, spec *Spec, store string, cause error) error {
	var se *SpecError
	field, code := "", int32(codeInvalidArgument)
	if errors.As(cause, &se) {
		field = se.Field
		if se.Code != 0 {
			code = se.Code
		}
	}
	ref := events.TriggerRef{Source: trig.Source, ID: trig.ID}
	data := events.Data{Trigger: ref, Error: &events.Error{Code: code, Message: cause.Error(), Field: field}}
	source := trig.Source
	if spec != nil {
		data.Store, data.Name, data.Labels, data.Incremental = spec.FHIRStore, spec.Name, spec.Labels, spec.Incremental
		source = SourceOf(spec.FHIRStore)
	}
	log.Warn("trigger rejected", "field", field, "error", cause.Error())
	ev := events.Event{
		ID: eventID("rejected", trig.Source, trig.ID, store), Type: events.TypeRejected, Source: source,
		Subject: trig.ID, Time: triggerTime(trig, x.now), Data: data,
	}
	// The record is for operators: a rejection stands without it, so a
	// state bucket that cannot be written does not hold the trigger back.
	if err := x.recordRejection(ctx, trig, spec, store, ev); err != nil {
		log.Warn("rejected trigger not recorded; fhirexport show will not find it", "error", err.Error())
	}
	return x.outcome(ctx, ev)
}

// recordRejection keeps a rejected trigger's event in a run record, so that
// operators find it (fhirexport show TRIGGER, runs --status rejected) and a
// redelivery re-publishes the same event. A record that exists already (a
// claim, or this rejection before) is left as it is.
func (x *Exporter) recordRejection(ctx context.Context, trig events.Trigger, spec *Spec, store string, ev events.Event) error {
	key := RunKey(trig.Source, trig.ID)
	if store != "" {
		key = FleetRunKey(trig.Source, trig.ID, store)
	}
	rec := runRecord{Trigger: ev.Data.Trigger, Store: ev.Data.Store, Status: statusRejected, Claimed: x.now(), Ended: x.now(),
		Outcome: ev.Type, Final: &ev}
	if spec != nil {
		rec.Spec, _ = json.Marshal(spec)
		if !spec.IsFleet() {
			rec.Pipeline = PipelineKey(spec)
		}
	}
	_, err := x.state.create(ctx, runObject(key), rec, nil)
	if err != nil && !errors.Is(err, ErrExists) {
		return fmt.Errorf("record rejected run %s: %w", key, err)
	}
	return nil
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
	codeCancelled          = 1
	codeUnknown            = 2
	codeInvalidArgument    = 3
	codeDeadlineExceeded   = 4
	codeNotFound           = 5
	codePermissionDenied   = 7
	codeFailedPrecondition = 9
	codeAborted            = 10
	codeInternal           = 13
	codeUnauthenticated    = 16
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

// exhausted reports 429 RESOURCE_EXHAUSTED: the API refused the call, so it
// surely did nothing.
func exhausted(err error) bool {
	var ge *googleapi.Error
	return errors.As(err, &ge) && ge.Code == http.StatusTooManyRequests
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
