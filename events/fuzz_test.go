package events

import (
	"bytes"
	"errors"
	"testing"
	"time"

	cloudevents "github.com/cloudevents/sdk-go/v2"
)

// FuzzDecodeTrigger checks that DecodeTrigger never panics, that every error
// is ErrMalformed (so the function acknowledges and reports the event instead
// of retrying it forever), and that the trigger keeps the event's identity
// either way, so even a bad trigger can be reported against its source and id.
func FuzzDecodeTrigger(f *testing.F) {
	const topic = "//pubsub.googleapis.com/projects/p/topics/requests"
	eventarc := `{"message":{"data":"` + b64(spec) + `","attributes":{"a":"b"},"messageId":"42","message_id":"42",` +
		`"publishTime":"2026-11-26T01:02:03Z","publish_time":"2026-11-26T01:02:03Z","@type":"type.googleapis.com/google.pubsub.v1.PubsubMessage"},` +
		`"subscription":"projects/p/subscriptions/s","deliveryAttempt":3}`
	seeds := []struct {
		typ, source, id, contentType string
		data                         string
	}{
		{MessagePublishedType, topic, "42", "application/json", eventarc},
		{MessagePublishedType, topic, "43", "application/json", `{"message":{"messageId":"43"}}`},
		{MessagePublishedType, topic, "44", "application/json", `{"message":{"data":"!!!"}}`},
		{MessagePublishedType, topic, "45", "application/json", `[]`},
		{MessagePublishedType, topic, "46", "", `{"message":{"data":"e30=","publishTime":"not a time"},"deliveryAttempt":"1"}`},
		{MessagePublishedType, topic, "47", "text/plain", `{"message":{"data":"e30="},"deliveryAttempt":1e99}`},
		{MessagePublishedType, "", "", "application/json", eventarc},
		{"com.example.export.requested", "//example/service", "x-1", "application/json", spec},
		{"com.example.export.requested", "//example/service", "x-2", "text/plain", "hi"},
		{"com.example.export.requested", "//example/service", "x-3", "", ""},
		{"com.example.export.requested", "//example/service", "x-4", "application/cloudevents+json; charset=utf-8", spec},
		{"com.example.export.requested", "//example/service", "x-5", "application/json; charset=\"", spec},
		{"", "//example/service", "x-6", ";;;", "\x00"},
	}
	for _, s := range seeds {
		f.Add(s.typ, s.source, s.id, s.contentType, []byte(s.data))
	}
	f.Fuzz(func(t *testing.T, typ, source, id, contentType string, data []byte) {
		e := cloudevents.NewEvent()
		e.SetType(typ)
		e.SetSource(source)
		e.SetID(id)
		e.SetTime(time.Date(2026, 11, 26, 1, 2, 3, 0, time.UTC))
		e.DataEncoded = data
		if contentType != "" {
			e.SetDataContentType(contentType)
		}
		got, err := DecodeTrigger(e)
		if got.ID != e.ID() || got.Source != e.Source() {
			t.Fatalf("trigger %q/%q lost the event's identity %q/%q (error: %v)", got.Source, got.ID, e.Source(), e.ID(), err)
		}
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("DecodeTrigger error %v does not wrap ErrMalformed", err)
			}
			return
		}
		if id == "" || source == "" {
			t.Fatal("an event without id or source was accepted")
		}
		if len(got.Spec) == 0 {
			t.Fatal("an accepted trigger carries no spec")
		}
		if typ != MessagePublishedType && !bytes.Equal(got.Spec, data) {
			t.Fatalf("a direct CloudEvent's spec %q is not its data %q", got.Spec, data)
		}
	})
}
