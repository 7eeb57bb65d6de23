package events

import (
	"encoding/json"
	"errors"
	"flag"
	"os"
	"testing"
	"time"

	cloudevents "github.com/cloudevents/sdk-go/v2"
	"github.com/google/go-cmp/cmp"
)

var update = flag.Bool("update", false, "rewrite golden files")

const spec = `{"fhirStore":"projects/p/locations/l/datasets/d/fhirStores/s","gcsDestination":{"uriPrefix":"gs://b/x"}}`

func event(t *testing.T, typ, source, id, contentType string, data []byte) cloudevents.Event {
	t.Helper()
	e := cloudevents.NewEvent()
	e.SetType(typ)
	e.SetSource(source)
	e.SetID(id)
	e.SetTime(time.Date(2026, 11, 26, 1, 2, 3, 0, time.UTC))
	if data != nil {
		e.DataEncoded = data
		e.SetDataContentType(contentType)
	}
	return e
}

func TestDecodeTrigger(t *testing.T) {
	t.Parallel()
	const topic = "//pubsub.googleapis.com/projects/p/topics/requests"
	eventarc := `{"message":{"data":"` + b64(spec) + `","attributes":{"a":"b"},"messageId":"42","message_id":"42",` +
		`"publishTime":"2026-11-26T01:02:03Z","publish_time":"2026-11-26T01:02:03Z","@type":"type.googleapis.com/google.pubsub.v1.PubsubMessage"},` +
		`"subscription":"projects/p/subscriptions/s","deliveryAttempt":3}`
	tests := []struct {
		name    string
		event   cloudevents.Event
		want    Trigger
		wantErr bool
	}{
		{
			name:  "eventarc pub/sub",
			event: event(t, MessagePublishedType, topic, "42", "application/json", []byte(eventarc)),
			want:  Trigger{Source: topic, ID: "42", Time: time.Date(2026, 11, 26, 1, 2, 3, 0, time.UTC), Spec: []byte(spec), DeliveryAttempt: 3},
		},
		{
			name:  "direct cloudevent",
			event: event(t, "com.example.export.requested", "//example/service", "x-1", "application/json", []byte(spec)),
			want:  Trigger{Source: "//example/service", ID: "x-1", Time: time.Date(2026, 11, 26, 1, 2, 3, 0, time.UTC), Spec: []byte(spec)},
		},
		{
			name:    "pub/sub without data",
			event:   event(t, MessagePublishedType, topic, "43", "application/json", []byte(`{"message":{"messageId":"43"}}`)),
			wantErr: true,
		},
		{
			name:    "pub/sub bad base64",
			event:   event(t, MessagePublishedType, topic, "44", "application/json", []byte(`{"message":{"data":"!!!"}}`)),
			wantErr: true,
		},
		{
			name:    "pub/sub envelope not an object",
			event:   event(t, MessagePublishedType, topic, "45", "application/json", []byte(`[]`)),
			wantErr: true,
		},
		{
			name:    "direct cloudevent not json",
			event:   event(t, "com.example.export.requested", "//example/service", "x-2", "text/plain", []byte("hi")),
			wantErr: true,
		},
		{
			name:    "direct cloudevent without data",
			event:   event(t, "com.example.export.requested", "//example/service", "x-3", "", nil),
			wantErr: true,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := DecodeTrigger(tc.event)
			if tc.wantErr {
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("DecodeTrigger error = %v, want ErrMalformed", err)
				}
				if got.ID != tc.event.ID() || got.Source != tc.event.Source() {
					t.Errorf("a rejected trigger lost its identity: %+v", got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("DecodeTrigger mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func b64(s string) string {
	b, _ := json.Marshal([]byte(s))
	return string(b[1 : len(b)-1])
}

// TestMessageGolden pins the Pub/Sub wire form of an outcome event: binary
// content mode with lower-case ce- attributes.
func TestMessageGolden(t *testing.T) {
	t.Parallel()
	f := false
	msg, err := Message(Event{
		ID: "0123456789abcdef", Type: TypeSucceeded, Source: "//healthcare.googleapis.com/projects/p/locations/l/datasets/d/fhirStores/s",
		Subject: "projects/p/locations/l/datasets/d/operations/123", Time: time.Date(2026, 11, 26, 1, 2, 3, 500, time.FixedZone("x", 3600)),
		Data: Data{Store: "projects/p/locations/l/datasets/d/fhirStores/s", Operation: "projects/p/locations/l/datasets/d/operations/123",
			Destination: "gs://b/x", Types: []string{"Patient"}, Counters: &Counters{Success: 10},
			CreateTime: "2026-11-26T00:00:00Z", EndTime: "2026-11-26T00:02:03Z", Duration: "123.000s",
			Trigger: TriggerRef{Source: "//pubsub.googleapis.com/projects/p/topics/t", ID: "42"}, WatermarkAdvanced: &f},
	})
	if err != nil {
		t.Fatal(err)
	}
	got, err := json.MarshalIndent(map[string]any{"attributes": msg.Attributes, "data": json.RawMessage(msg.Data)}, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	const golden = "testdata/succeeded_message.golden.json"
	if *update {
		if err := os.WriteFile(golden, append(got, '\n'), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(string(want), string(got)+"\n"); diff != "" {
		t.Errorf("message mismatch (-want +got):\n%s", diff)
	}
}
