// Package events holds fhirexport's wire formats: the inbound triggers (Pub/Sub
// messages delivered by Eventarc, and direct CloudEvents carrying an export
// spec) and the outbound outcome CloudEvents published on Pub/Sub.
package events

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	cloudevents "github.com/cloudevents/sdk-go/v2"
)

// MessagePublishedType is the CloudEvent type Eventarc uses for a Pub/Sub
// message, and the one functions-framework-go converts legacy background
// events and raw push bodies into.
const MessagePublishedType = "google.cloud.pubsub.topic.v1.messagePublished"

// MessagePublishedData is the data of a google.cloud.pubsub.topic.v1.messagePublished
// CloudEvent, as declared in google-cloudevents
// (https://github.com/googleapis/google-cloudevents/blob/main/proto/google/events/cloud/pubsub/v1/data.proto).
// Real payloads also carry message_id, publish_time and @type duplicates; they
// are ignored.
type MessagePublishedData struct {
	Message         PubsubMessage `json:"message"`
	Subscription    string        `json:"subscription,omitempty"`
	DeliveryAttempt int           `json:"deliveryAttempt,omitempty"`
}

// PubsubMessage is a Pub/Sub message as it appears inside MessagePublishedData
// (https://cloud.google.com/pubsub/docs/reference/rest/v1/PubsubMessage).
// Data is base64 in JSON; encoding/json decodes it into bytes.
type PubsubMessage struct {
	Data        []byte            `json:"data,omitempty"`
	Attributes  map[string]string `json:"attributes,omitempty"`
	MessageID   string            `json:"messageId,omitempty"`
	PublishTime time.Time         `json:"publishTime,omitzero"`
	OrderingKey string            `json:"orderingKey,omitempty"`
}

// Trigger is an inbound request to export, reduced to what the domain needs:
// who sent it (for idempotency), when, and the raw spec JSON.
type Trigger struct {
	// Source and ID are the CloudEvent's source and id; together they are the
	// idempotency key (for Pub/Sub, ID is the message ID).
	Source string
	ID     string
	// Time is when the trigger was created (the CloudEvent time or the Pub/Sub
	// publish time); zero when unknown. Placeholders expand against it, so a
	// redelivery expands to the same destination.
	Time time.Time
	// Spec is the export spec exactly as received; nil when it could not be
	// extracted (see DecodeTrigger's error).
	Spec []byte
	// DeliveryAttempt is Pub/Sub's delivery attempt counter (0 when unknown).
	DeliveryAttempt int
}

// ErrMalformed marks a trigger whose envelope cannot carry a spec: the event is
// permanently bad and must be acknowledged, not retried.
var ErrMalformed = errors.New("malformed trigger")

// DecodeTrigger extracts the export spec from a CloudEvent: a Pub/Sub
// messagePublished event (the spec is the message data) or any other event type
// whose data is the spec itself (binary or structured mode). The returned
// Trigger always carries the event's source and id, even with an error, so a
// bad trigger can still be reported.
func DecodeTrigger(e cloudevents.Event) (Trigger, error) {
	t := Trigger{Source: e.Source(), ID: e.ID(), Time: e.Time()}
	if t.ID == "" || t.Source == "" {
		return t, fmt.Errorf("%w: the CloudEvent has no id or source", ErrMalformed)
	}
	if e.Type() != MessagePublishedType {
		if ct := e.DataMediaType(); ct != "" && ct != "application/json" && !strings.HasSuffix(ct, "+json") {
			return t, fmt.Errorf("%w: data content type %q is not JSON; send the spec as application/json", ErrMalformed, ct)
		}
		t.Spec = e.Data()
		if len(t.Spec) == 0 {
			return t, fmt.Errorf("%w: the CloudEvent carries no data; its data must be the export spec as JSON", ErrMalformed)
		}
		return t, nil
	}
	var d MessagePublishedData
	if err := json.Unmarshal(e.Data(), &d); err != nil {
		return t, fmt.Errorf("%w: Pub/Sub event data is not a MessagePublishedData: %v", ErrMalformed, jsonProblem(err))
	}
	t.DeliveryAttempt = d.DeliveryAttempt
	if t.Time.IsZero() {
		t.Time = d.Message.PublishTime
	}
	if len(d.Message.Data) == 0 {
		return t, fmt.Errorf("%w: the Pub/Sub message has no data; publish the export spec as the message data", ErrMalformed)
	}
	t.Spec = d.Message.Data
	return t, nil
}

// jsonProblem shortens encoding/json errors to what a user can act on.
func jsonProblem(err error) string {
	var b64 base64.CorruptInputError
	if errors.As(err, &b64) {
		return "message.data is not valid base64"
	}
	return err.Error()
}
