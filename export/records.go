package export

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"slices"
	"strings"
	"time"

	"github.com/fhirexport/fhirexport/events"
)

// The state bucket's layout (every path is under FHIREXPORT_STATE). lifecycle.go
// says which object each transition writes, with which precondition, in
// which order.
//
//	runs/{run}.json           runRecord: the claim on one trigger (× store for fleets)
//	pending/{pipeline}.json   pendingRecord: the pipeline's lock and its running operation
//	queue/{pipeline}.json     queueRecord: the pipeline's next run, waiting for a slot or the lock
//	slots/{n}.json            slotRecord: one of FHIREXPORT_MAX_RUNNING export slots
//	operations/{op}.json      opRecord: every operation fhirexport started, by digest of its name, with a copy of its lock
//	watermarks/{pipeline}.json watermarkRecord: the watermark and the deletion cursor
//	tombstones/{store}/…      tombstoneRecord: deletions seen in the store's change notifications
//	quarantine/…              corrupt state objects, moved aside with the reason

// Run statuses kept in a run record.
const (
	statusClaimed   = "claimed"   // being admitted or started
	statusQueued    = "queued"    // waiting in queue/{pipeline}.json
	statusDone      = "done"      // its operation finished and the outcome was published
	statusFailed    = "failed"    // it ended without an operation; Final holds the event
	statusSkipped   = "skipped"   // (before queueing existed) its pipeline was busy; Final holds the event
	statusCoalesced = "coalesced" // merged into its pipeline's queued run; Final holds the event
	statusRejected  = "rejected"  // the trigger (or this store of it) can never run; Final holds the event
)

// runRecord is the claim on one trigger (runs/{run}.json). Creating it with
// DoesNotExist is what makes redeliveries of a trigger start at most one run.
type runRecord struct {
	Trigger   events.TriggerRef `json:"trigger"`
	Pipeline  string            `json:"pipeline"`
	Store     string            `json:"store,omitempty"`
	Status    string            `json:"status"`
	Claimed   time.Time         `json:"claimed"`
	Spec      json.RawMessage   `json:"spec,omitempty"` // the store's spec, as run (fhirexport rerun publishes it again)
	Operation string            `json:"operation,omitempty"`
	Outcome   string            `json:"outcome,omitempty"`
	Ended     time.Time         `json:"ended,omitzero"`
	Final     *events.Event     `json:"final,omitempty"`   // the terminal event of a run that never got an operation
	Started   *events.Event     `json:"started,omitempty"` // a done run's started event, re-published to a late redelivery
	// Reported is a done run's outcome event as its finalizer published it,
	// kept for operators (fhirexport show). Unlike Final it is never
	// re-published: a done run's outcome belongs to its finalizer.
	Reported *events.Event `json:"reported,omitempty"`
	Into     string        `json:"into,omitempty"` // coalesced: the run it was merged into
}

// pendingRecord is both the pipeline's lock (one run at a time) and the
// pending marker of its running operation (pending/{pipeline}.json). It holds
// everything the poller needs to report the outcome.
type pendingRecord struct {
	Run         string            `json:"run"`
	Trigger     events.TriggerRef `json:"trigger"`
	Pipeline    string            `json:"pipeline"`
	Store       string            `json:"store"`
	Name        string            `json:"name,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
	Destination string            `json:"destination"`
	Feed        string            `json:"feed,omitempty"` // gs:// prefix of the feed files of a BigQuery run (deletedUriPrefix, expanded)
	Types       []string          `json:"types,omitempty"`
	Since       string            `json:"since,omitempty"`
	Incremental bool              `json:"incremental,omitempty"`
	Spec        json.RawMessage   `json:"spec,omitempty"`    // the store's spec (a queued run is started from it)
	Timeout     string            `json:"timeout,omitempty"` // the watchdog: a Go duration
	Slot        int               `json:"slot"`              // the export slot held, -1 for none
	FromQueue   bool              `json:"fromQueue,omitempty"`
	Locked      time.Time         `json:"locked,omitzero"`    // when this run took the lock: an operation it started is not older
	Started     time.Time         `json:"started"`            // when this start attempt began (our clock): the lease
	Called      time.Time         `json:"called,omitzero"`    // when fhirStores.export was called: from then on the run is in doubt until Operation is set
	TimedOut    bool              `json:"timedOut,omitempty"` // the call with Called gave up waiting: the request may still take effect
	Operation   string            `json:"operation,omitempty"`
	Adopted     bool              `json:"adopted,omitempty"`    // Operation was found with operations.list after a lost answer
	Finalizing  time.Time         `json:"finalizing,omitzero"`  // when a poller began reporting the outcome: its lease
	Unobserved  time.Time         `json:"unobserved,omitzero"`  // since when operations.get has answered 401/403
	Cancelled   string            `json:"cancelled,omitempty"`  // why fhirexport asked operations.cancel: "timeout" or "operator"
	Attempts    int               `json:"attempts,omitempty"`   // 429 RESOURCE_EXHAUSTED answers so far (the backoff)
	Requeued    string            `json:"requeued,omitempty"`   // set (with the reason) once this start is being put back in the queue
	Requeues    int               `json:"requeues,omitempty"`   // times this run was put back in the queue: which queue record is whose
	Redelivered time.Time         `json:"redelivered,omitzero"` // last delivery of the trigger that found this start in flight: its trigger is alive
	Ending      *events.Event     `json:"ending,omitempty"`     // set (with the failed event) once this start is being ended without an operation
	Reported    *events.Event     `json:"reported,omitempty"`   // the outcome a finalizer decided, recorded under its lease before it is published
}

// queueRecord is a pipeline's next run (queue/{pipeline}.json): a run beyond
// the budget, or the follow-up of a busy pipeline. Triggers arriving while it
// waits are coalesced into it.
type queueRecord struct {
	pendingRecord
	Enqueued  time.Time           `json:"enqueued"`            // oldest first
	NotBefore time.Time           `json:"notBefore,omitzero"`  // backoff after 429 RESOURCE_EXHAUSTED
	Coalesced []events.TriggerRef `json:"coalesced,omitempty"` // triggers merged into it
	Reason    string              `json:"reason,omitempty"`    // why it waits (busy, budget, exhausted): its queued event's reason, the same on every re-publish
}

// slotRecord is one export slot (slots/{n}.json, n < FHIREXPORT_MAX_RUNNING),
// held from just before fhirStores.export until the outcome is reported.
type slotRecord struct {
	Run      string    `json:"run"`
	Attempt  int       `json:"attempt,omitempty"` // the run's Requeues when it took the slot: a stale release of an earlier attempt leaves it
	Pipeline string    `json:"pipeline"`
	Taken    time.Time `json:"taken"`
}

// opRecord names the run that owns an operation (operations/{digest}.json),
// so an operation found by operations.list can be told from one fhirexport
// already follows.
type opRecord struct {
	Operation string    `json:"operation"`
	Run       string    `json:"run"`
	Pipeline  string    `json:"pipeline"`
	Store     string    `json:"store"`
	Recorded  time.Time `json:"recorded"`
	// Lock is the pipeline lock as it was when the operation was recorded:
	// what rebuilds the lock should it be found corrupt (recover.go).
	Lock *pendingRecord `json:"lock,omitempty"`
}

// watermarkRecord is a pipeline's watermark (watermarks/{pipeline}.json): the
// server createTime of its last fully successful export, and the deletions
// already delivered to it.
type watermarkRecord struct {
	Pipeline  string          `json:"pipeline"`
	Store     string          `json:"store"`
	Name      string          `json:"name,omitempty"`
	Watermark string          `json:"watermark"`
	Operation string          `json:"operation,omitempty"`
	Updated   time.Time       `json:"updated"`
	Deletions *deletionCursor `json:"deletions,omitempty"`
}

func runObject(run string) string            { return "runs/" + run + ".json" }
func pendingObject(pipeline string) string   { return "pending/" + pipeline + ".json" }
func queueObject(pipeline string) string     { return "queue/" + pipeline + ".json" }
func watermarkObject(pipeline string) string { return "watermarks/" + pipeline + ".json" }
func opObject(op string) string              { return "operations/" + digest("op", op)[:32] + ".json" }

func digest(parts ...string) string {
	h := sha256.Sum256([]byte(strings.Join(parts, "\n")))
	return hex.EncodeToString(h[:])
}

// RunKey is the idempotency key of a trigger: its CloudEvent source and id.
func RunKey(source, id string) string { return digest("run", source, id)[:32] }

// FleetRunKey is the idempotency key of one store's run of a fleet trigger.
func FleetRunKey(source, id, store string) string { return digest("run", source, id, store)[:32] }

// PipelineKey keys a pipeline's lock and watermark: the store and name, or,
// without a name, the store, the sorted types and the destination template.
func PipelineKey(s *Spec) string {
	if s.Name != "" {
		return "n-" + digest("pipeline", s.FHIRStore, s.Name)[:30]
	}
	types, _ := s.Types()
	types = slices.Clone(types)
	slices.Sort(types)
	return "d-" + digest("pipeline", s.FHIRStore, strings.Join(types, ","), s.Destination())[:30]
}

// eventID derives a deterministic CloudEvent id, so a re-publish after a crash
// carries the id of the first publish.
func eventID(kind string, parts ...string) string {
	return digest(append([]string{"event", kind}, parts...)...)[:32]
}

// SourceOf returns the CloudEvent source for a FHIR store, in Google's full
// resource name style.
func SourceOf(store string) string { return "//healthcare.googleapis.com/" + store }

// deletionCursor is what a pipeline has been given of its store's tombstones
// (feed.go): every tombstone recorded up to Through, less a margin for
// writers still in flight, plus the ones in Recent.
type deletionCursor struct {
	Through time.Time `json:"through"`
	Recent  []string  `json:"recent,omitempty"`
	// Deferred are tombstones given to the pipeline but not yet decided:
	// their resource changed after the run's transactionTime, so neither
	// listing nor dropping them was sound yet. The next run decides them.
	Deferred []deferredDeletion `json:"deferred,omitempty"`
}

// deferredDeletion is a tombstone a later run decides.
type deferredDeletion struct {
	Key     string    `json:"key"`
	Type    string    `json:"type"`
	ID      string    `json:"id"`
	Deleted time.Time `json:"deleted"`
}
