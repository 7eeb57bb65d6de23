package events

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"time"
	"unicode/utf8"

	"cloud.google.com/go/pubsub/v2"
)

// TypePrefix is the documented prefix of every outcome event type.
const TypePrefix = "com.github.fhirexport.export."

// The outcome event types.
const (
	TypeStarted   = TypePrefix + "started"
	TypeSucceeded = TypePrefix + "succeeded"
	TypePartial   = TypePrefix + "partial"
	TypeFailed    = TypePrefix + "failed"
	TypeRejected  = TypePrefix + "rejected"
	TypeQueued    = TypePrefix + "queued"
)

// Event is an outcome CloudEvent before it is put on the wire.
type Event struct {
	ID      string    // deterministic, so a re-publish after a crash carries the same id
	Type    string    // one of the Type* constants
	Source  string    // //healthcare.googleapis.com/projects/…/fhirStores/S
	Subject string    // the operation name, or the trigger id for rejected
	Time    time.Time // when what the event reports happened
	Data    Data
}

// Data is the JSON data of every outcome event. Fields that do not apply to an
// event type are omitted. It never carries FHIR resource content.
type Data struct {
	Store             string            `json:"store,omitempty"`
	Operation         string            `json:"operation,omitempty"`
	Pipeline          string            `json:"pipeline,omitempty"`
	Name              string            `json:"name,omitempty"`
	Labels            map[string]string `json:"labels,omitempty"`
	Destination       string            `json:"destination,omitempty"`
	Types             []string          `json:"types,omitempty"`
	Since             string            `json:"since,omitempty"`
	Incremental       bool              `json:"incremental,omitempty"`
	Counters          *Counters         `json:"counters,omitempty"`
	CreateTime        string            `json:"createTime,omitempty"`
	EndTime           string            `json:"endTime,omitempty"`
	Duration          string            `json:"duration,omitempty"`
	Error             *Error            `json:"error,omitempty"`
	LogsURL           string            `json:"logsUrl,omitempty"`
	Trigger           TriggerRef        `json:"trigger"`
	Watermark         string            `json:"watermark,omitempty"`
	WatermarkAdvanced *bool             `json:"watermarkAdvanced,omitempty"`
	// Reason says why a run was queued: "budget" (FHIREXPORT_MAX_RUNNING
	// exports are running), "busy" (its pipeline has a run in progress) or
	// "exhausted" (the API answered 429; NotBefore is the backoff).
	Reason    string `json:"reason,omitempty"`
	NotBefore string `json:"notBefore,omitempty"`
	// QueuedRun names the queued run a coalesced trigger was merged into.
	QueuedRun string `json:"queuedRun,omitempty"`
	Manifest  string `json:"manifest,omitempty"` // gs:// URL of the run's Bulk Data manifest
	// ManifestURL is the manifest's URL for a Bulk Data client: the one its
	// own urls are in (https://storage.googleapis.com/…, or the storage
	// emulator's).
	ManifestURL string   `json:"manifestUrl,omitempty"`
	Outputs     []Output `json:"outputs,omitempty"` // gs:// URLs, as the manifest's extension.gcs.output
	Deleted     *int64   `json:"deleted,omitempty"` // resources in the run's deleted file (incremental runs)
}

// Output is one file a run wrote, as listed in its manifest.
type Output struct {
	Type  string `json:"type"`
	URL   string `json:"url"`
	Count *int64 `json:"count,omitempty"`
}

// Counters are the operation's resource counters.
type Counters struct {
	Success int64 `json:"success"`
	Failure int64 `json:"failure"`
	Pending int64 `json:"pending"`
}

// Error is a google.rpc.Status reduced to code and message, plus the spec field
// at fault when a trigger was rejected.
type Error struct {
	Code    int32  `json:"code"`
	Message string `json:"message"`
	Field   string `json:"field,omitempty"`
}

// TriggerRef names the trigger an event answers.
type TriggerRef struct {
	Source string `json:"source"`
	ID     string `json:"id"`
}

// Pub/Sub's limits on a published message
// (https://cloud.google.com/pubsub/quotas#resource_limits). Outbound messages
// stay within them: a message over a limit is refused on publish, and a
// refusal that repeats on every redelivery would block the run's outcome.
const (
	MaxAttributeKeyBytes   = 256
	MaxAttributeValueBytes = 1024
	MaxAttributes          = 100
	MaxMessageBytes        = 10_000_000
)

// shortenedPrefixBytes is how much of an over-long attribute value is kept,
// leaving room under MaxAttributeValueBytes for the marker and the hash.
const shortenedPrefixBytes = 900

// fitAttribute returns v unchanged when it fits in an attribute. Otherwise
// it returns v's first shortenedPrefixBytes (cut at a UTF-8 boundary), then
// "…sha256:" and the first 16 hex digits of v's SHA-256: still readable,
// still distinct for distinct values, and short enough. The event data keeps
// the whole value.
func fitAttribute(v string) string {
	if len(v) <= MaxAttributeValueBytes {
		return v
	}
	cut := shortenedPrefixBytes
	for cut > 0 && !utf8.RuneStart(v[cut]) {
		cut--
	}
	sum := sha256.Sum256([]byte(v))
	return v[:cut] + "…sha256:" + hex.EncodeToString(sum[:8])
}

// Message encodes e as a Pub/Sub message in binary content mode, per the
// CloudEvents Pub/Sub protocol binding
// (https://github.com/cloudevents/spec/blob/main/cloudevents/bindings/pubsub-protocol-binding.md):
// context attributes become lower-case "ce-" attributes and the data is the
// message data. Attribute values longer than Pub/Sub allows (a source or
// subject taken from a direct CloudEvent's trigger can be) are shortened as
// fitAttribute says; the data always carries the trigger's whole source and id.
func Message(e Event) (*pubsub.Message, error) {
	data, err := json.Marshal(e.Data)
	if err != nil {
		return nil, fmt.Errorf("encode %s event %s: %w", e.Type, e.ID, err)
	}
	attrs := map[string]string{
		"ce-specversion": "1.0",
		"ce-id":          e.ID,
		"ce-source":      e.Source,
		"ce-type":        e.Type,
		"ce-time":        e.Time.UTC().Format(time.RFC3339Nano),
		"content-type":   "application/json",
	}
	if e.Subject != "" {
		attrs["ce-subject"] = e.Subject
	}
	size := len(data)
	for k, v := range attrs {
		attrs[k] = fitAttribute(v)
		size += len(k) + len(attrs[k])
	}
	if size > MaxMessageBytes {
		return nil, fmt.Errorf("encode %s event %s: %d bytes, over Pub/Sub's limit of %d", e.Type, e.ID, size, MaxMessageBytes)
	}
	return &pubsub.Message{Data: data, Attributes: attrs}, nil
}

// Publisher publishes outcome events to one Pub/Sub topic.
type Publisher struct {
	pub *pubsub.Publisher
}

// NewPublisher returns a Publisher for topic ("projects/P/topics/T") on client.
// Batching is kept short: each handler waits for its own event.
func NewPublisher(client *pubsub.Client, topic string) *Publisher {
	p := client.Publisher(topic)
	p.PublishSettings.DelayThreshold = time.Millisecond
	p.PublishSettings.Timeout = 30 * time.Second
	return &Publisher{pub: p}
}

// Publish publishes e and waits until Pub/Sub has accepted it.
func (p *Publisher) Publish(ctx context.Context, e Event) error {
	msg, err := Message(e)
	if err != nil {
		return err
	}
	if _, err := p.pub.Publish(ctx, msg).Get(ctx); err != nil {
		return fmt.Errorf("publish %s event %s: %w", e.Type, e.ID, err)
	}
	return nil
}

// Stop flushes and stops the underlying publisher.
func (p *Publisher) Stop() { p.pub.Stop() }
