package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"cloud.google.com/go/pubsub/v2"

	"github.com/fhirexport/fhirexport/events"
)

// maxAttempts bounds redeliveries of a message the function keeps refusing
// (real Pub/Sub retries for up to 7 days, or until a dead-letter topic takes
// it); locally the retries are quick so failures show at once.
const maxAttempts = 5

// pusher delivers a subscription's messages to a function over HTTP the way
// Eventarc does: a binary-mode CloudEvent of type messagePublished whose data
// is MessagePublishedData. 2xx acknowledges; anything else is nacked and
// redelivered after a backoff, at most maxAttempts times.
type pusher struct {
	client *pubsub.Client
	sub    string
	topic  string
	url    string
	http   *http.Client
	con    *console
	log    *eventLog

	mu       sync.Mutex
	attempts map[string]int // message ID → deliveries so far
}

func newPusher(client *pubsub.Client, sub, topic, url string, hc *http.Client, con *console, log *eventLog) *pusher {
	return &pusher{client: client, sub: sub, topic: topic, url: url, http: hc, con: con, log: log, attempts: map[string]int{}}
}

// run delivers until ctx is done.
func (p *pusher) run(ctx context.Context) error {
	return p.client.Subscriber(p.sub).Receive(ctx, p.deliver)
}

func (p *pusher) deliver(ctx context.Context, m *pubsub.Message) {
	p.mu.Lock()
	p.attempts[m.ID]++
	attempt := p.attempts[m.ID]
	p.mu.Unlock()

	status, err := p.post(ctx, m, attempt)
	if err == nil && status/100 == 2 {
		p.forget(m.ID)
		m.Ack()
		p.log.ack(m.ID)
		return
	}
	if ctx.Err() != nil {
		m.Nack()
		return
	}
	fn := p.url[strings.LastIndex(p.url, "/")+1:]
	problem := fmt.Sprintf("%s answered HTTP %d", fn, status)
	if err != nil {
		problem = fmt.Sprintf("%s unreachable: %v", fn, err)
	}
	if attempt >= maxAttempts {
		p.forget(m.ID)
		p.con.Printf("  ! message %s on %s: %s, attempt %d of %d; giving up (a real subscription would dead-letter it)\n",
			m.ID, short(p.topic), problem, attempt, maxAttempts)
		p.log.giveUp(m.ID, fmt.Sprintf("%s %d times; see the function logs", problem, attempt))
		m.Ack()
		return
	}
	p.con.Printf("  ! message %s on %s: %s, attempt %d of %d; Pub/Sub redelivers it\n", m.ID, short(p.topic), problem, attempt, maxAttempts)
	backoff := min(250*time.Millisecond<<(attempt-1), 5*time.Second)
	select {
	case <-ctx.Done():
	case <-time.After(backoff):
	}
	m.Nack()
}

func (p *pusher) forget(id string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.attempts, id)
}

// post sends one delivery and returns the HTTP status.
func (p *pusher) post(ctx context.Context, m *pubsub.Message, attempt int) (int, error) {
	published := m.PublishTime.UTC().Format(time.RFC3339Nano)
	attrs := m.Attributes
	if attrs == nil {
		attrs = map[string]string{}
	}
	body, err := json.Marshal(events.MessagePublishedData{
		Message: events.PubsubMessage{Data: m.Data, Attributes: attrs, MessageID: m.ID,
			PublishTime: m.PublishTime, OrderingKey: m.OrderingKey},
		Subscription:    p.sub,
		DeliveryAttempt: attempt,
	})
	if err != nil {
		return 0, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, p.url, bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	for k, v := range map[string]string{
		"ce-specversion": "1.0",
		"ce-type":        events.MessagePublishedType,
		"ce-source":      "//pubsub.googleapis.com/" + p.topic,
		"ce-id":          m.ID,
		"ce-time":        published,
		"Content-Type":   "application/json",
	} {
		req.Header.Set(k, v)
	}
	resp, err := p.http.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, nil
}

// received is an outcome event as the local subscriber got it.
type received struct {
	Type  string // without events.TypePrefix
	Attrs map[string]string
	Data  events.Data
	At    time.Time // when the local subscriber got it
}

// eventLog keeps the outcome events received, the messages a function
// acknowledged and the deliveries given up, and wakes waiters when any
// changes.
type eventLog struct {
	mu      sync.Mutex
	evs     []received
	acked   map[string]bool   // message ID → a function answered 2xx
	gaveUp  map[string]string // message ID → why
	changed chan struct{}
}

func newEventLog() *eventLog {
	return &eventLog{acked: map[string]bool{}, gaveUp: map[string]string{}, changed: make(chan struct{})}
}

func (l *eventLog) add(e received) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.evs = append(l.evs, e)
	l.wake()
}

func (l *eventLog) ack(id string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.acked[id] = true
	l.wake()
}

func (l *eventLog) giveUp(id, why string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.gaveUp[id] = why
	l.wake()
}

// wake signals a change. The caller holds l.mu.
func (l *eventLog) wake() {
	close(l.changed)
	l.changed = make(chan struct{})
}

// delivery reports whether a function acknowledged message id, why its
// delivery was given up ("" if it was not), and a channel closed at the next
// change.
func (l *eventLog) delivery(id string) (acked bool, gaveUp string, changed <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.acked[id], l.gaveUp[id], l.changed
}

// snapshot returns the events so far, why the delivery of trigger was given up
// ("" if it was not), and a channel closed at the next change.
func (l *eventLog) snapshot(trigger string) ([]received, string, <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]received(nil), l.evs...), l.gaveUp[trigger], l.changed
}

// receiveEvents subscribes to the events topic, prints every outcome event as
// it arrives and records it. A re-published event (same ce-id, as after a
// crash or a retried publish) is dropped, as the README tells consumers to.
func (st *stack) receiveEvents(ctx context.Context) error {
	var mu sync.Mutex
	seen := map[string]bool{}
	return st.psClient.Subscriber(subName("fhirexport-local-events")).Receive(ctx, func(_ context.Context, m *pubsub.Message) {
		mu.Lock()
		dup := seen[m.Attributes["ce-id"]]
		seen[m.Attributes["ce-id"]] = true
		mu.Unlock()
		if dup {
			m.Ack()
			return
		}
		e := received{Type: strings.TrimPrefix(m.Attributes["ce-type"], events.TypePrefix), Attrs: m.Attributes, At: time.Now()}
		if err := json.Unmarshal(m.Data, &e.Data); err != nil {
			st.con.Printf("  ! event %s has data that is not JSON: %v\n", m.Attributes["ce-id"], err)
		}
		st.con.Printf("  ◀ event %s\n", describeEvent(e))
		st.events.add(e)
		m.Ack()
	})
}

// describeEvent renders an outcome event on one line: type, store,
// operation, counters, deletions, since and watermark.
func describeEvent(e received) string {
	d := e.Data
	var b strings.Builder
	fmt.Fprintf(&b, "export.%-9s", e.Type)
	if d.Store != "" {
		fmt.Fprintf(&b, " store %s", short(d.Store))
	}
	if d.Reason != "" {
		fmt.Fprintf(&b, " (%s)", queueReason(d.Reason))
	}
	if d.Operation != "" {
		fmt.Fprintf(&b, " op %s", opShort(d.Operation))
	}
	if c := d.Counters; c != nil && e.Type != "started" {
		fmt.Fprintf(&b, " counters success=%d failure=%d pending=%d", c.Success, c.Failure, c.Pending)
	}
	if d.Deleted != nil {
		fmt.Fprintf(&b, " deleted=%d", *d.Deleted)
	}
	since := d.Since
	if since == "" {
		since = "(none: everything)"
	}
	if e.Type != "rejected" && e.Type != "queued" {
		fmt.Fprintf(&b, " since %s", since)
	}
	if d.Watermark != "" {
		adv := ""
		if d.WatermarkAdvanced != nil && *d.WatermarkAdvanced {
			adv = " (advanced)"
		}
		fmt.Fprintf(&b, " watermark %s%s", d.Watermark, adv)
	}
	if d.Duration != "" {
		fmt.Fprintf(&b, " duration %s", d.Duration)
	}
	if m := cmp.Or(d.ManifestURL, d.Manifest); m != "" {
		fmt.Fprintf(&b, " manifest %s", m)
	}
	if d.Error != nil {
		fmt.Fprintf(&b, " error %d %q", d.Error.Code, d.Error.Message)
		if d.Error.Field != "" {
			fmt.Fprintf(&b, " (field %s)", d.Error.Field)
		}
	}
	fmt.Fprintf(&b, " [trigger %s]", d.Trigger.ID)
	return b.String()
}

// queueReason explains the reason of a queued event.
func queueReason(r string) string {
	switch r {
	case "budget":
		return "budget: FHIREXPORT_MAX_RUNNING exports are running"
	case "busy":
		return "busy: its pipeline has a run in progress"
	case "exhausted":
		return "exhausted: the API answered 429"
	}
	return r
}

// opShort shortens an operation name to "operations/ID".
func opShort(op string) string {
	if i := strings.LastIndex(op, "/operations/"); i >= 0 {
		return op[i+1:]
	}
	return op
}
