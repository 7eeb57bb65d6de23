package healthcaretest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"cloud.google.com/go/pubsub/v2"
)

// NotificationConfig is one entry of FhirStore.notificationConfigs: where
// change notifications of the store are published, and with what payload.
// https://cloud.google.com/healthcare-api/docs/fhir-pubsub
type NotificationConfig struct {
	// PubsubTopic is "projects/P/topics/T"; empty sends nothing, as on the
	// service ("notifications are only sent if the topic is non-empty").
	PubsubTopic string `json:"pubsubTopic,omitempty"`
	// SendFullResource puts the created, updated or patched resource in the
	// message data instead of its name.
	SendFullResource bool `json:"sendFullResource,omitempty"`
	// SendPreviousResourceOnDelete puts the deleted resource in the message
	// data of a delete instead of its name.
	SendPreviousResourceOnDelete bool `json:"sendPreviousResourceOnDelete,omitempty"`
}

// Notification actions, the "action" attribute of a change notification.
const (
	ActionCreate = "CreateResource"
	ActionUpdate = "UpdateResource"
	ActionPatch  = "PatchResource"
	ActionDelete = "DeleteResource"
)

// Payload types, the "payloadType" attribute of a change notification.
const (
	PayloadNameOnly     = "NameOnly"
	PayloadFullResource = "FullResource"
)

// maxFullPayload is the emulator's stand-in for "when a resource change is
// too large ... only the resource name will be sent" (FhirNotificationConfig
// in the discovery document): larger resources are sent NameOnly.
const maxFullPayload = 1 << 20

// Notification is one change notification the emulator published (or tried
// to), for tests that assert the wire without a subscription.
type Notification struct {
	Topic      string
	Data       []byte
	Attributes map[string]string
	// MessageID is the Pub/Sub message ID; empty when publishing failed.
	MessageID string
	// Err is the publish error; the FHIR write succeeded regardless, as on
	// the service, which logs and retries.
	Err error
}

// notifyChange queues one notification per config of st for a committed
// change. prev is the resource before a delete. The caller holds e.mu.
func (e *Emulator) notifyChange(st *fhirStore, action string, r *resource, prev []byte) {
	for _, c := range st.notify {
		if c.PubsubTopic == "" {
			continue
		}
		name := st.name + "/fhir/" + r.typ + "/" + r.id
		data, payload := []byte(name), PayloadNameOnly
		full := r.data
		send := c.SendFullResource
		if action == ActionDelete {
			full, send = prev, c.SendPreviousResourceOnDelete
		}
		if send && len(full) > 0 && len(full) <= maxFullPayload {
			data, payload = append([]byte(nil), full...), PayloadFullResource
		}
		// Attributes as the "Notification format and content" section of
		// https://cloud.google.com/healthcare-api/docs/fhir-pubsub lists them.
		e.outbox = append(e.outbox, Notification{
			Topic: c.PubsubTopic,
			Data:  data,
			Attributes: map[string]string{
				"action":          action,
				"lastUpdatedTime": r.updated.UTC().Format(time.RFC1123),
				"payloadType":     payload,
				"resourceType":    r.typ,
				"storeName":       st.name,
				"versionId":       r.versionID,
			},
		})
	}
}

// Flush publishes the change notifications of every committed write, in
// commit order, and returns when Pub/Sub has answered each of them. FHIR
// writes call it before they answer, so a test that wrote through the API
// need not call it; it is for writes racing with the test.
func (e *Emulator) Flush() {
	e.publishMu.Lock()
	defer e.publishMu.Unlock()
	e.mu.Lock()
	batch := e.outbox
	e.outbox = nil
	e.mu.Unlock()
	if len(batch) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(e.bg, 30*time.Second)
	defer cancel()
	results := make([]*pubsub.PublishResult, len(batch))
	for i := range batch {
		n := &batch[i]
		p, err := e.publisher(ctx, n.Topic)
		if err != nil {
			n.Err = err
			continue
		}
		results[i] = p.Publish(ctx, &pubsub.Message{Data: n.Data, Attributes: n.Attributes})
	}
	for i, res := range results {
		n := &batch[i]
		if res != nil {
			n.MessageID, n.Err = res.Get(ctx)
		}
		if n.Err != nil {
			e.logf("healthcaretest: publishing %s notification of %s to %s: %v", n.Attributes["action"], n.Attributes["storeName"], n.Topic, n.Err)
		}
	}
	e.mu.Lock()
	e.published = append(e.published, batch...)
	e.mu.Unlock()
}

// Notifications returns every change notification published so far (after
// Flush), in commit order, with its publish result.
func (e *Emulator) Notifications() []Notification {
	e.Flush()
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]Notification(nil), e.published...)
}

// publisher returns the cached publisher of topic. The caller holds
// e.publishMu.
func (e *Emulator) publisher(ctx context.Context, topic string) (*pubsub.Publisher, error) {
	if p := e.publishers[topic]; p != nil {
		return p, nil
	}
	c, err := e.pubsubClient(ctx, topic)
	if err != nil {
		return nil, err
	}
	p := c.Publisher(topic)
	// Small batches: a write waits for its notifications before answering.
	p.PublishSettings.DelayThreshold = time.Millisecond
	e.publishers[topic] = p
	return p, nil
}

// pubsubClient returns Options.PubSub or a client built once from
// PUBSUB_EMULATOR_HOST; a failure to build it is cached too. The caller
// holds e.publishMu.
func (e *Emulator) pubsubClient(ctx context.Context, topic string) (*pubsub.Client, error) {
	if e.pubsub != nil || e.pubsubErr != nil {
		return e.pubsub, e.pubsubErr
	}
	s := strings.Split(topic, "/")
	if os.Getenv("PUBSUB_EMULATOR_HOST") == "" {
		e.pubsubErr = errors.New("no Pub/Sub client: Options.PubSub is nil and PUBSUB_EMULATOR_HOST is not set")
		return nil, e.pubsubErr
	}
	c, err := pubsub.NewClient(context.WithoutCancel(ctx), s[1])
	if err != nil {
		e.pubsubErr = fmt.Errorf("creating a Pub/Sub client from PUBSUB_EMULATOR_HOST: %w", err)
		return nil, e.pubsubErr
	}
	e.pubsub, e.ownPubsub = c, true
	return c, nil
}

// closePubSub stops the publishers and closes a client the emulator built.
func (e *Emulator) closePubSub() {
	e.publishMu.Lock()
	defer e.publishMu.Unlock()
	for _, p := range e.publishers {
		p.Stop()
	}
	clear(e.publishers)
	if e.ownPubsub && e.pubsub != nil {
		e.pubsub.Close()
		e.pubsub, e.ownPubsub = nil, false
	}
}

// parseNotificationConfigs reads FhirStore.notificationConfigs (already
// checked by parseBody) and validates the topic names.
func parseNotificationConfigs(v any) ([]NotificationConfig, *apiError) {
	list, _ := v.([]any)
	var out []NotificationConfig
	for i, x := range list {
		m, _ := x.(map[string]any)
		var c NotificationConfig
		c.PubsubTopic, _ = m["pubsubTopic"].(string)
		c.SendFullResource, _ = m["sendFullResource"].(bool)
		c.SendPreviousResourceOnDelete, _ = m["sendPreviousResourceOnDelete"].(bool)
		if c.PubsubTopic != "" {
			s := strings.Split(c.PubsubTopic, "/")
			if len(s) != 4 || s[0] != "projects" || s[2] != "topics" || !projectRE.MatchString(s[1]) || s[3] == "" {
				return nil, invalidArg("invalid notificationConfigs[%d].pubsubTopic %q: want projects/{project}/topics/{topic}", i, c.PubsubTopic)
			}
		}
		out = append(out, c)
	}
	return out, nil
}

// bufferedResponse holds a handler's answer until the change notifications
// of its writes are published.
type bufferedResponse struct {
	http.ResponseWriter
	status int
	body   []byte
}

func (b *bufferedResponse) WriteHeader(status int) {
	if b.status == 0 {
		b.status = status
	}
}

func (b *bufferedResponse) Write(p []byte) (int, error) {
	if b.status == 0 {
		b.status = http.StatusOK
	}
	b.body = append(b.body, p...)
	return len(p), nil
}

// Hijack lets a fault drop the connection from inside a handler.
func (b *bufferedResponse) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return http.NewResponseController(b.ResponseWriter).Hijack()
}

func (b *bufferedResponse) send() {
	if b.status == 0 {
		return
	}
	b.ResponseWriter.WriteHeader(b.status)
	b.ResponseWriter.Write(b.body)
}
