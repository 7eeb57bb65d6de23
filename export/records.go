package export

import (
	"crypto/sha256"
	"encoding/hex"
	"slices"
	"strings"
	"time"

	"github.com/fhirexport/fhirexport/events"
)

// Run statuses kept in a run record.
const (
	statusClaimed = "claimed" // being started
	statusDone    = "done"    // its operation finished and the outcome was published
	statusFailed  = "failed"  // the API refused the export; Final holds the event
	statusSkipped = "skipped" // its pipeline was busy; Final holds the event
)

// runRecord is the claim on one trigger (runs/{run}.json). Creating it with
// DoesNotExist is what makes redeliveries of a trigger start at most one run.
type runRecord struct {
	Trigger   events.TriggerRef `json:"trigger"`
	Pipeline  string            `json:"pipeline"`
	Status    string            `json:"status"`
	Claimed   time.Time         `json:"claimed"`
	Operation string            `json:"operation,omitempty"`
	Outcome   string            `json:"outcome,omitempty"`
	Final     *events.Event     `json:"final,omitempty"`   // the terminal event of a run that never got an operation
	Started   *events.Event     `json:"started,omitempty"` // a done run's started event, re-published to a late redelivery
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
	Types       []string          `json:"types,omitempty"`
	Since       string            `json:"since,omitempty"`
	Incremental bool              `json:"incremental,omitempty"`
	Started     time.Time         `json:"started"` // when this start attempt began (our clock): the lease
	Operation   string            `json:"operation,omitempty"`
	Finalizing  time.Time         `json:"finalizing,omitzero"` // when a poller began reporting the outcome: its lease
}

// watermarkRecord is a pipeline's watermark (watermarks/{pipeline}.json): the
// server createTime of its last fully successful export.
type watermarkRecord struct {
	Pipeline  string    `json:"pipeline"`
	Store     string    `json:"store"`
	Name      string    `json:"name,omitempty"`
	Watermark string    `json:"watermark"`
	Operation string    `json:"operation,omitempty"`
	Updated   time.Time `json:"updated"`
}

func runObject(run string) string            { return "runs/" + run + ".json" }
func pendingObject(pipeline string) string   { return "pending/" + pipeline + ".json" }
func watermarkObject(pipeline string) string { return "watermarks/" + pipeline + ".json" }

func digest(parts ...string) string {
	h := sha256.Sum256([]byte(strings.Join(parts, "\n")))
	return hex.EncodeToString(h[:])
}

// RunKey is the idempotency key of a trigger: its CloudEvent source and id.
func RunKey(source, id string) string { return digest("run", source, id)[:32] }

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
