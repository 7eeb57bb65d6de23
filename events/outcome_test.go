package events

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"cloud.google.com/go/pubsub/v2"
	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"cloud.google.com/go/pubsub/v2/pstest"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// checkPubSubLimits fails t for every attribute of attrs, or the message as a
// whole, that is over Pub/Sub's limits.
func checkPubSubLimits(t *testing.T, attrs map[string]string, data []byte) {
	t.Helper()
	if len(attrs) > MaxAttributes {
		t.Errorf("%d attributes, over %d", len(attrs), MaxAttributes)
	}
	size := len(data)
	for k, v := range attrs {
		size += len(k) + len(v)
		if len(k) > MaxAttributeKeyBytes {
			t.Errorf("attribute key %.40q… is %d bytes, over %d", k, len(k), MaxAttributeKeyBytes)
		}
		if len(v) > MaxAttributeValueBytes {
			t.Errorf("attribute %s is %d bytes, over %d", k, len(v), MaxAttributeValueBytes)
		}
		if !utf8.ValidString(v) {
			t.Errorf("attribute %s is not valid UTF-8 after shortening", k)
		}
	}
	if size > MaxMessageBytes {
		t.Errorf("message is %d bytes, over %d", size, MaxMessageBytes)
	}
}

func TestFitAttribute(t *testing.T) {
	t.Parallel()
	hash := func(v string) string { s := sha256.Sum256([]byte(v)); return hex.EncodeToString(s[:8]) }
	long := strings.Repeat("a", 5000)
	// A multi-byte rune across the 900-byte cut: 899 ASCII bytes, then "é".
	straddle := strings.Repeat("x", 899) + strings.Repeat("é", 200)
	tests := []struct {
		name  string
		value string
		want  string
	}{
		{"short", "projects/p/locations/l/datasets/d/operations/1", "projects/p/locations/l/datasets/d/operations/1"},
		{"exactly the limit", strings.Repeat("b", MaxAttributeValueBytes), strings.Repeat("b", MaxAttributeValueBytes)},
		{"one byte over", strings.Repeat("b", MaxAttributeValueBytes+1), strings.Repeat("b", 900) + "…sha256:" + hash(strings.Repeat("b", MaxAttributeValueBytes+1))},
		{"5000 bytes", long, long[:900] + "…sha256:" + hash(long)},
		{"cut inside a rune", straddle, straddle[:899] + "…sha256:" + hash(straddle)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got := fitAttribute(tc.value)
			if got != tc.want {
				t.Errorf("fitAttribute(%d bytes) = %q…(%d bytes), want %q…(%d bytes)", len(tc.value), got[:min(20, len(got))], len(got), tc.want[:min(20, len(tc.want))], len(tc.want))
			}
			if len(got) > MaxAttributeValueBytes || !utf8.ValidString(got) {
				t.Errorf("fitAttribute gave %d bytes (valid UTF-8: %v)", len(got), utf8.ValidString(got))
			}
		})
	}
	if fitAttribute(long) == fitAttribute(long[:4999]+"b") {
		t.Error("two long values with the same prefix shortened to the same attribute")
	}
}

// TestPublishLongSourceAndSubject publishes an event whose source and subject
// are 5,000 bytes (as a direct CloudEvent's trigger can make them) through
// pstest. pstest does not enforce Pub/Sub's attribute limits, so the
// attributes it received are checked against them here; the data keeps the
// whole values.
func TestPublishLongSourceAndSubject(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	srv := pstest.NewServer()
	t.Cleanup(func() { srv.Close() })
	client, err := pubsub.NewClient(ctx, "p", option.WithEndpoint(srv.Addr), option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	const topic = "projects/p/topics/events"
	if _, err := client.TopicAdminClient.CreateTopic(ctx, &pb.Topic{Name: topic}); err != nil {
		t.Fatal(err)
	}
	pub := NewPublisher(client, topic)
	t.Cleanup(pub.Stop)

	source := "//example/" + strings.Repeat("s", 4990)
	subject := strings.Repeat("é", 2500) // 5,000 bytes of two-byte runes
	e := Event{ID: strings.Repeat("0", 32), Type: TypeRejected, Source: source, Subject: subject,
		Time: time.Date(2026, 11, 26, 1, 2, 3, 0, time.UTC),
		Data: Data{Error: &Error{Code: 3, Message: "bad spec"}, Trigger: TriggerRef{Source: source, ID: subject}}}
	if err := pub.Publish(ctx, e); err != nil {
		t.Fatal(err)
	}
	msgs := srv.Messages()
	if len(msgs) != 1 {
		t.Fatalf("pstest holds %d messages, want 1", len(msgs))
	}
	got := msgs[0]
	checkPubSubLimits(t, got.Attributes, got.Data)
	for _, a := range []struct{ key, full string }{{"ce-source", source}, {"ce-subject", subject}} {
		v := got.Attributes[a.key]
		if v != fitAttribute(a.full) || !strings.Contains(v, "…sha256:") {
			t.Errorf("%s = %.60q…, want the shortened form of the %d-byte value", a.key, v, len(a.full))
		}
	}
	for k, want := range map[string]string{"ce-id": e.ID, "ce-type": TypeRejected, "ce-specversion": "1.0", "content-type": "application/json"} {
		if got.Attributes[k] != want {
			t.Errorf("%s = %q, want %q (short values are not touched)", k, got.Attributes[k], want)
		}
	}
	var data Data
	if err := json.Unmarshal(got.Data, &data); err != nil {
		t.Fatal(err)
	}
	if data.Trigger.Source != source || data.Trigger.ID != subject {
		t.Errorf("the data lost the whole trigger source or id: %d and %d bytes, want %d and %d",
			len(data.Trigger.Source), len(data.Trigger.ID), len(source), len(subject))
	}
}

func TestMessageTooLarge(t *testing.T) {
	t.Parallel()
	_, err := Message(Event{ID: "x", Type: TypeFailed, Data: Data{Error: &Error{Code: 13, Message: strings.Repeat("m", MaxMessageBytes)}}})
	if err == nil || !strings.Contains(err.Error(), "limit") {
		t.Errorf("Message of an 10 MB event = %v, want an error about Pub/Sub's limit", err)
	}
}
