package events

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

const (
	nStore    = "projects/p/locations/us-central1/datasets/d/fhirStores/s"
	nTopic    = "//pubsub.googleapis.com/projects/p/topics/fhir-changes"
	nLastUpd  = "Thu, 26 Nov 2026 01:02:03 UTC"
	nPublish  = "2026-11-26T01:02:03.456Z"
	nResource = nStore + "/fhir/Patient/p-1"
)

// notificationBody is a MessagePublishedData as Eventarc delivers it, with the
// attributes the Cloud Healthcare API documents for FHIR notifications.
func notificationBody(t *testing.T, data string, attrs map[string]string, eventarc bool) []byte {
	t.Helper()
	msg := map[string]any{"data": b64(data), "attributes": attrs, "messageId": "m-7", "publishTime": nPublish}
	body := map[string]any{"message": msg}
	if eventarc {
		// Real Eventarc bodies repeat fields in snake case and add @type.
		msg["message_id"], msg["publish_time"] = "m-7", nPublish
		msg["@type"] = "type.googleapis.com/google.pubsub.v1.PubsubMessage"
		body["subscription"] = "projects/p/subscriptions/eventarc-us-central1-recordchange-sub-1"
		body["deliveryAttempt"] = 2
	}
	raw, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

func attrs(action string, extra ...string) map[string]string {
	a := map[string]string{"action": action, "lastUpdatedTime": nLastUpd, "payloadType": PayloadNameOnly,
		"resourceType": "Patient", "storeName": nStore, "versionId": "MTY4"}
	for i := 0; i+1 < len(extra); i += 2 {
		if extra[i+1] == "<none>" {
			delete(a, extra[i])
		} else {
			a[extra[i]] = extra[i+1]
		}
	}
	return a
}

func TestDecodeNotification(t *testing.T) {
	t.Parallel()
	lastUpd := time.Date(2026, 11, 26, 1, 2, 3, 0, time.UTC)
	pub := time.Date(2026, 11, 26, 1, 2, 3, 456e6, time.UTC)
	deleted := Notification{Resource: nResource, ResourceType: "Patient", ID: "p-1", Action: ActionDelete, Store: nStore,
		PayloadType: PayloadNameOnly, VersionID: "MTY4", LastUpdated: lastUpd, MessageID: "m-7", PublishTime: pub}
	with := func(f func(*Notification)) Notification { n := deleted; f(&n); return n }
	tests := []struct {
		name    string
		body    []byte
		want    Notification
		wantErr string // a fragment of the error; "" for success
		ceType  string
	}{
		{name: "eventarc delete", body: notificationBody(t, nResource, attrs(ActionDelete), true), want: deleted},
		{name: "raw push converted by the framework", body: notificationBody(t, nResource, attrs(ActionDelete), false), want: deleted},
		{name: "create", body: notificationBody(t, nResource, attrs(ActionCreate), true),
			want: with(func(n *Notification) { n.Action = ActionCreate })},
		{name: "patch, GMT and no storeName", body: notificationBody(t, nResource, attrs(ActionPatch, "lastUpdatedTime", "Thu, 26 Nov 2026 01:02:03 GMT", "storeName", "<none>"), true),
			want: with(func(n *Notification) { n.Action = ActionPatch })},
		{name: "full resource", body: notificationBody(t, `{"resourceType":"Patient","id":"p-1","meta":{"versionId":"MTY4"}}`, attrs(ActionUpdate, "payloadType", PayloadFullResource), true),
			want: with(func(n *Notification) { n.Action, n.PayloadType = ActionUpdate, PayloadFullResource })},
		{name: "no payloadType: a name", body: notificationBody(t, nResource, attrs(ActionDelete, "payloadType", "<none>"), true),
			want: with(func(n *Notification) { n.PayloadType = "" })},
		{name: "wrong event type", body: notificationBody(t, nResource, attrs(ActionDelete), true), ceType: "com.example.other", wantErr: "CloudEvent type"},
		{name: "not json", body: []byte("{"), wantErr: "not a MessagePublishedData"},
		{name: "bad base64", body: []byte(`{"message":{"data":"!!!"}}`), wantErr: "base64"},
		{name: "no action", body: notificationBody(t, nResource, attrs("", "action", "<none>"), true), wantErr: "no action"},
		{name: "unknown action", body: notificationBody(t, nResource, attrs("PurgeResource"), true), wantErr: `unknown action "PurgeResource"`},
		{name: "no lastUpdatedTime", body: notificationBody(t, nResource, attrs(ActionDelete, "lastUpdatedTime", "<none>"), true), wantErr: "no lastUpdatedTime"},
		{name: "bad lastUpdatedTime", body: notificationBody(t, nResource, attrs(ActionDelete, "lastUpdatedTime", "yesterday"), true), wantErr: `lastUpdatedTime "yesterday"`},
		{name: "no data", body: notificationBody(t, "", attrs(ActionDelete), true), wantErr: "no data"},
		{name: "not a resource name", body: notificationBody(t, nStore+"/Patient/p-1", attrs(ActionDelete), true), wantErr: "is not a resource name"},
		{name: "resource name without id", body: notificationBody(t, nStore+"/fhir/Patient", attrs(ActionDelete), true), wantErr: "is not a resource name"},
		{name: "type mismatch", body: notificationBody(t, nResource, attrs(ActionDelete, "resourceType", "Observation"), true), wantErr: "differs from the resource name"},
		{name: "store mismatch", body: notificationBody(t, nResource, attrs(ActionDelete, "storeName", nStore+"x"), true), wantErr: "differs from the resource name's store"},
		{name: "unknown payloadType", body: notificationBody(t, nResource, attrs(ActionDelete, "payloadType", "Diff"), true), wantErr: `unknown payloadType "Diff"`},
		{name: "full resource without id", body: notificationBody(t, `{"resourceType":"Patient"}`, attrs(ActionUpdate, "payloadType", PayloadFullResource), true), wantErr: "resourceType and id"},
		{name: "full resource without storeName", body: notificationBody(t, `{"resourceType":"Patient","id":"p-1"}`, attrs(ActionUpdate, "payloadType", PayloadFullResource, "storeName", "<none>"), true), wantErr: "storeName"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			typ := MessagePublishedType
			if tc.ceType != "" {
				typ = tc.ceType
			}
			got, err := DecodeNotification(event(t, typ, nTopic, "m-7", "application/json", tc.body))
			if tc.wantErr != "" {
				if err == nil || !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error = %v, want ErrMalformed mentioning %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("notification (-want +got):\n%s", diff)
			}
		})
	}
}
