package events

import (
	"encoding/json"
	"fmt"
	"strings"
	"time"

	cloudevents "github.com/cloudevents/sdk-go/v2"
)

// The actions of a FHIR store change notification (attribute "action").
const (
	ActionCreate = "CreateResource"
	ActionUpdate = "UpdateResource"
	ActionPatch  = "PatchResource"
	ActionDelete = "DeleteResource"
)

// The payload types of a FHIR store change notification (attribute
// "payloadType"): the message data is the resource name, or the resource
// itself when the store sends full resources (large ones fall back to the name).
const (
	PayloadNameOnly     = "NameOnly"
	PayloadFullResource = "FullResource"
)

// Notification is a Cloud Healthcare API FHIR store change notification
// (https://cloud.google.com/healthcare-api/docs/fhir-pubsub): one Pub/Sub
// message per create, update, patch or delete of a resource, none for imports.
// The message data is the resource name
// projects/P/locations/L/datasets/D/fhirStores/S/fhir/Type/id, or the full
// resource JSON when PayloadType is FullResource; the attributes carry
// action, resourceType, lastUpdatedTime (RFC 1123), payloadType, storeName
// and versionId.
type Notification struct {
	// Resource is the resource's full name, .../fhirStores/S/fhir/Type/id.
	Resource     string
	ResourceType string
	ID           string
	Action       string // one of the Action* constants
	Store        string // projects/P/locations/L/datasets/D/fhirStores/S
	PayloadType  string
	VersionID    string
	// LastUpdated is the change's time from the lastUpdatedTime attribute.
	// RFC 1123 carries whole seconds only: use PublishTime to order changes
	// within one second (see export/feed.go).
	LastUpdated time.Time
	// MessageID and PublishTime are Pub/Sub's: the same on every redelivery.
	MessageID   string
	PublishTime time.Time
}

// DecodeNotification extracts a FHIR store change notification from a Pub/Sub
// messagePublished CloudEvent (Eventarc, or a raw push body the functions
// framework converted). Every error wraps ErrMalformed and names what was
// wrong: such a notification can never be processed and must be acknowledged.
func DecodeNotification(e cloudevents.Event) (Notification, error) {
	var n Notification
	if e.Type() != MessagePublishedType {
		return n, fmt.Errorf("%w: CloudEvent type %q is not %s; subscribe RecordChange to the store's notification topic", ErrMalformed, e.Type(), MessagePublishedType)
	}
	var d MessagePublishedData
	if err := json.Unmarshal(e.Data(), &d); err != nil {
		return n, fmt.Errorf("%w: Pub/Sub event data is not a MessagePublishedData: %v", ErrMalformed, jsonProblem(err))
	}
	m := d.Message
	a := m.Attributes
	n.MessageID, n.PublishTime = m.MessageID, m.PublishTime
	if n.MessageID == "" {
		n.MessageID = e.ID()
	}
	if n.PublishTime.IsZero() {
		n.PublishTime = e.Time()
	}
	n.Action, n.ResourceType, n.PayloadType, n.VersionID = a["action"], a["resourceType"], a["payloadType"], a["versionId"]
	switch n.Action {
	case ActionCreate, ActionUpdate, ActionPatch, ActionDelete:
	case "":
		return n, fmt.Errorf("%w: the notification has no action attribute; is this a FHIR store notification topic?", ErrMalformed)
	default:
		return n, fmt.Errorf("%w: unknown action %q; accepted: CreateResource, UpdateResource, PatchResource, DeleteResource", ErrMalformed, n.Action)
	}
	lu := a["lastUpdatedTime"]
	if lu == "" {
		return n, fmt.Errorf("%w: the notification has no lastUpdatedTime attribute", ErrMalformed)
	}
	t, err := parseRFC1123(lu)
	if err != nil {
		return n, fmt.Errorf("%w: lastUpdatedTime %q is not an RFC 1123 time", ErrMalformed, lu)
	}
	n.LastUpdated = t
	if len(m.Data) == 0 {
		return n, fmt.Errorf("%w: the notification has no data; expected the resource name", ErrMalformed)
	}

	switch n.PayloadType {
	case PayloadFullResource:
		// The data is the resource: Type/id from it, the store from storeName.
		var r struct {
			ResourceType string `json:"resourceType"`
			ID           string `json:"id"`
		}
		if err := json.Unmarshal(m.Data, &r); err != nil || r.ResourceType == "" || r.ID == "" {
			return n, fmt.Errorf("%w: payloadType FullResource but the data is not a FHIR resource with resourceType and id", ErrMalformed)
		}
		n.Store = a["storeName"]
		if !isStoreName(n.Store) {
			return n, fmt.Errorf("%w: storeName %q is not projects/P/locations/L/datasets/D/fhirStores/S", ErrMalformed, n.Store)
		}
		if n.ResourceType != "" && n.ResourceType != r.ResourceType {
			return n, fmt.Errorf("%w: resourceType attribute %q differs from the resource's %q", ErrMalformed, n.ResourceType, r.ResourceType)
		}
		n.ResourceType, n.ID = r.ResourceType, r.ID
		n.Resource = n.Store + "/fhir/" + r.ResourceType + "/" + r.ID
	case PayloadNameOnly, "":
		name := strings.TrimSpace(string(m.Data))
		store, rest, ok := strings.Cut(name, "/fhir/")
		typ, id, ok2 := strings.Cut(rest, "/")
		if !ok || !ok2 || !isStoreName(store) || !isToken(typ) || !isToken(id) {
			return n, fmt.Errorf("%w: data %q is not a resource name projects/P/locations/L/datasets/D/fhirStores/S/fhir/Type/id", ErrMalformed, clip(name))
		}
		if n.ResourceType != "" && n.ResourceType != typ {
			return n, fmt.Errorf("%w: resourceType attribute %q differs from the resource name's %q", ErrMalformed, n.ResourceType, typ)
		}
		if s := a["storeName"]; s != "" && s != store {
			return n, fmt.Errorf("%w: storeName %q differs from the resource name's store %q", ErrMalformed, s, store)
		}
		n.Resource, n.Store, n.ResourceType, n.ID = name, store, typ, id
	default:
		return n, fmt.Errorf("%w: unknown payloadType %q; accepted: NameOnly, FullResource", ErrMalformed, n.PayloadType)
	}
	return n, nil
}

// parseRFC1123 parses lastUpdatedTime. The documented format is RFC 1123
// ("Mon, 02 Jan 2006 15:04:05 GMT"); the numeric-zone form and RFC 3339 are
// accepted too, so a sender with more precision is not rejected.
func parseRFC1123(v string) (time.Time, error) {
	var err error
	for _, layout := range []string{time.RFC1123, time.RFC1123Z, time.RFC3339Nano} {
		var t time.Time
		if t, err = time.Parse(layout, v); err == nil {
			return t.UTC(), nil
		}
	}
	return time.Time{}, err
}

func isStoreName(s string) bool {
	segs := strings.Split(s, "/")
	if len(segs) != 8 || segs[0] != "projects" || segs[2] != "locations" || segs[4] != "datasets" || segs[6] != "fhirStores" {
		return false
	}
	for _, seg := range segs {
		if !isToken(seg) {
			return false
		}
	}
	return true
}

// isToken reports whether s is a non-empty path segment without spaces.
func isToken(s string) bool {
	return s != "" && s != "." && s != ".." && !strings.ContainsAny(s, "/ \t\r\n")
}

func clip(s string) string {
	if len(s) > 200 {
		return s[:200] + "…"
	}
	return s
}
