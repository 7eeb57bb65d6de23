package healthcaretest

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"cloud.google.com/go/pubsub/v2"
	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"cloud.google.com/go/pubsub/v2/pstest"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/api/googleapi"
	healthcare "google.golang.org/api/healthcare/v1"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// newPubSub starts pstest with one subscription per topic and returns a
// client on it.
func newPubSub(t *testing.T, topics ...string) *pubsub.Client {
	t.Helper()
	ctx := context.Background()
	srv := pstest.NewServer()
	t.Cleanup(func() { srv.Close() })
	client, err := pubsub.NewClient(ctx, "test-project", option.WithEndpoint(srv.Addr), option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	for _, topic := range topics {
		if _, err := client.TopicAdminClient.CreateTopic(ctx, &pb.Topic{Name: topic}); err != nil {
			t.Fatal(err)
		}
		sub := strings.Replace(topic, "/topics/", "/subscriptions/", 1)
		if _, err := client.SubscriptionAdminClient.CreateSubscription(ctx, &pb.Subscription{Name: sub, Topic: topic}); err != nil {
			t.Fatal(err)
		}
	}
	return client
}

// pull receives n messages from the subscription of topic (named like the
// topic) and fails the test if they do not all arrive within 20 s.
func pull(t *testing.T, client *pubsub.Client, topic string, n int) []*pubsub.Message {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var mu sync.Mutex
	var got []*pubsub.Message
	sub := strings.Replace(topic, "/topics/", "/subscriptions/", 1)
	err := client.Subscriber(sub).Receive(ctx, func(_ context.Context, m *pubsub.Message) {
		m.Ack()
		mu.Lock()
		defer mu.Unlock()
		got = append(got, m)
		if len(got) == n {
			cancel()
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != n {
		t.Fatalf("%s: received %d messages, want %d", sub, len(got), n)
	}
	return got
}

type wireMsg struct {
	Data       string
	Attributes map[string]string
}

func TestChangeNotifications(t *testing.T) {
	t.Parallel()
	const (
		names = "projects/test-project/topics/names"
		full  = "projects/test-project/topics/full"
		store = testDataset + "/fhirStores/notified"
	)
	ps := newPubSub(t, names, full)
	e := newEnv(t, func(o *Options) { o.PubSub = ps })
	stores := e.svc.Projects.Locations.Datasets.FhirStores
	// Created without notifications, then patched to two configs.
	if _, err := stores.Create(testDataset, &healthcare.FhirStore{Version: "R4", EnableUpdateCreate: true}).FhirStoreId("notified").Do(); err != nil {
		t.Fatal(err)
	}
	patched, err := stores.Patch(store, &healthcare.FhirStore{NotificationConfigs: []*healthcare.FhirNotificationConfig{
		{PubsubTopic: names},
		{PubsubTopic: full, SendFullResource: true, SendPreviousResourceOnDelete: true},
	}}).UpdateMask("notificationConfigs").Do()
	if err != nil || len(patched.NotificationConfigs) != 2 {
		t.Fatalf("patch: %+v %v", patched, err)
	}

	do := func(method, path, ctype, body string) map[string]any {
		t.Helper()
		req, _ := http.NewRequest(method, e.srv.URL+"/v1/"+store+"/fhir"+path, strings.NewReader(body))
		req.Header.Set("Content-Type", ctype)
		resp, err := http.DefaultClient.Do(req)
		status, b := fhirDo(t, resp, err)
		if status >= 300 {
			t.Fatalf("%s %s: %d %s", method, path, status, b)
		}
		return decodeMap(t, b)
	}
	const fj = "application/fhir+json"
	p := do("POST", "/Patient", fj, `{"resourceType":"Patient","gender":"female"}`)
	pid := p["id"].(string)
	updated := do("PUT", "/Patient/"+pid, fj, `{"resourceType":"Patient","id":"`+pid+`","gender":"male"}`)
	patchedP := do("PATCH", "/Patient/"+pid, "application/json-patch+json", `[{"op":"add","path":"/active","value":true}]`)
	tx := do("POST", "", fj, `{"resourceType":"Bundle","type":"transaction","entry":[
		{"fullUrl":"urn:uuid:p2","resource":{"resourceType":"Patient"},"request":{"method":"POST","url":"Patient"}},
		{"resource":{"resourceType":"Encounter","id":"e1","status":"finished","subject":{"reference":"urn:uuid:p2"}},"request":{"method":"PUT","url":"Encounter/e1"}}]}`)
	do("DELETE", "/Patient/"+pid, fj, "")
	p2 := tx["entry"].([]any)[0].(map[string]any)["resource"].(map[string]any)
	enc := tx["entry"].([]any)[1].(map[string]any)["resource"].(map[string]any)

	// The emulator's record, in commit order.
	type change struct{ action, typ, id string }
	wantOrder := []change{
		{ActionCreate, "Patient", pid}, {ActionUpdate, "Patient", pid}, {ActionPatch, "Patient", pid},
		{ActionCreate, "Patient", p2["id"].(string)}, {ActionUpdate, "Encounter", "e1"}, {ActionDelete, "Patient", pid},
	}
	var gotOrder []change
	for _, n := range e.srv.Notifications() {
		if n.Err != nil || n.MessageID == "" {
			t.Errorf("notification %+v not published: %v", n.Attributes, n.Err)
		}
		if n.Topic == names {
			gotOrder = append(gotOrder, change{n.Attributes["action"], n.Attributes["resourceType"], strings.TrimPrefix(string(n.Data), store+"/fhir/"+n.Attributes["resourceType"]+"/")})
		}
	}
	if diff := cmp.Diff(wantOrder, gotOrder, cmp.AllowUnexported(change{})); diff != "" {
		t.Errorf("notifications in commit order (-want +got):\n%s", diff)
	}

	meta := func(m map[string]any) (vid, last string) {
		mm := m["meta"].(map[string]any)
		ts, err := time.Parse(time.RFC3339Nano, mm["lastUpdated"].(string))
		if err != nil {
			t.Fatal(err)
		}
		return mm["versionId"].(string), ts.UTC().Format("Mon, 02 Jan 2006 15:04:05 UTC")
	}
	attrs := func(action, typ string, m map[string]any, payload string) map[string]string {
		vid, last := meta(m)
		return map[string]string{"action": action, "resourceType": typ, "lastUpdatedTime": last, "payloadType": payload, "storeName": store, "versionId": vid}
	}
	var del Notification
	for _, n := range e.srv.Notifications() {
		if n.Attributes["action"] == ActionDelete {
			del = n
		}
	}
	deleted := func(payload string) map[string]string {
		// The delete's own version and time, after the patch's.
		if del.Attributes["versionId"] == "" || del.Attributes["versionId"] == patchedP["meta"].(map[string]any)["versionId"] {
			t.Errorf("delete notification versionId %q", del.Attributes["versionId"])
		}
		return map[string]string{"action": ActionDelete, "resourceType": "Patient", "lastUpdatedTime": del.Attributes["lastUpdatedTime"],
			"payloadType": payload, "storeName": store, "versionId": del.Attributes["versionId"]}
	}
	name := func(typ, id string) string { return store + "/fhir/" + typ + "/" + id }
	canon := func(m map[string]any) string { b, _ := json.Marshal(m); return string(b) }

	// The wire, pulled through real subscriptions. Pub/Sub does not keep
	// order without ordering keys: compare sorted by versionId and action.
	p2ID := p2["id"].(string)
	sortMsgs := func(ms []wireMsg) {
		sort.Slice(ms, func(i, j int) bool {
			return ms[i].Attributes["versionId"]+ms[i].Attributes["action"] < ms[j].Attributes["versionId"]+ms[j].Attributes["action"]
		})
	}
	for _, tc := range []struct {
		topic string
		want  []wireMsg
	}{
		{names, []wireMsg{
			{name("Patient", pid), attrs(ActionCreate, "Patient", p, PayloadNameOnly)},
			{name("Patient", pid), attrs(ActionUpdate, "Patient", updated, PayloadNameOnly)},
			{name("Patient", pid), attrs(ActionPatch, "Patient", patchedP, PayloadNameOnly)},
			{name("Patient", p2ID), attrs(ActionCreate, "Patient", p2, PayloadNameOnly)},
			{name("Encounter", "e1"), attrs(ActionUpdate, "Encounter", enc, PayloadNameOnly)},
			{name("Patient", pid), deleted(PayloadNameOnly)},
		}},
		{full, []wireMsg{
			{canon(p), attrs(ActionCreate, "Patient", p, PayloadFullResource)},
			{canon(updated), attrs(ActionUpdate, "Patient", updated, PayloadFullResource)},
			{canon(patchedP), attrs(ActionPatch, "Patient", patchedP, PayloadFullResource)},
			{canon(p2), attrs(ActionCreate, "Patient", p2, PayloadFullResource)},
			{canon(enc), attrs(ActionUpdate, "Encounter", enc, PayloadFullResource)},
			{canon(patchedP), deleted(PayloadFullResource)}, // the resource before the delete
		}},
	} {
		t.Run(tc.topic, func(t *testing.T) {
			var got []wireMsg
			for _, m := range pull(t, ps, tc.topic, len(tc.want)) {
				data := string(m.Data)
				if strings.HasPrefix(data, "{") {
					var v map[string]any
					if err := json.Unmarshal(m.Data, &v); err != nil {
						t.Fatal(err)
					}
					data = canon(v)
				}
				got = append(got, wireMsg{data, m.Attributes})
			}
			sortMsgs(got)
			sortMsgs(tc.want)
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("messages (-want +got):\n%s", diff)
			}
		})
	}
}

// TestNotificationPublishFailureKeepsWrite: a topic that does not exist makes
// the publish fail, not the write.
func TestNotificationPublishFailureKeepsWrite(t *testing.T) {
	t.Parallel()
	ps := newPubSub(t)
	e := newEnv(t, func(o *Options) { o.PubSub = ps })
	if err := e.srv.SetNotificationConfigs(testStore, NotificationConfig{PubsubTopic: "projects/test-project/topics/missing"}); err != nil {
		t.Fatal(err)
	}
	p := e.fhirCreate(t, "Patient", `{"resourceType":"Patient"}`)
	if len(e.srv.Resources(testStore)) != 1 {
		t.Fatalf("the write did not stick: %v", p)
	}
	ns := e.srv.Notifications()
	if len(ns) != 1 || ns[0].Err == nil || ns[0].MessageID != "" {
		t.Errorf("notifications %+v, want one failed publish", ns)
	}
}

// TestNoPubSubConfigured: without a client or PUBSUB_EMULATOR_HOST the
// notification fails with a clear error and the write still succeeds.
func TestNoPubSubConfigured(t *testing.T) {
	t.Setenv("PUBSUB_EMULATOR_HOST", "")
	e := newEnv(t, nil)
	if err := e.srv.SetNotificationConfigs(testStore, NotificationConfig{PubsubTopic: "projects/test-project/topics/t"}); err != nil {
		t.Fatal(err)
	}
	e.fhirCreate(t, "Patient", `{"resourceType":"Patient"}`)
	e.fhirCreate(t, "Patient", `{"resourceType":"Patient"}`)
	ns := e.srv.Notifications()
	if len(ns) != 2 || ns[0].Err == nil || !strings.Contains(ns[1].Err.Error(), "PUBSUB_EMULATOR_HOST") {
		t.Errorf("notifications %+v, want two failed with the missing-configuration error", ns)
	}
}

func TestStorePatchAndDatasetPatch(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	stores := e.svc.Projects.Locations.Datasets.FhirStores
	tests := []struct {
		name   string
		store  *healthcare.FhirStore
		mask   string
		code   int
		substr string
	}{
		{"labels", &healthcare.FhirStore{Labels: map[string]string{"team": "data"}}, "labels", 200, ""},
		{"update create off", &healthcare.FhirStore{}, "enableUpdateCreate", 200, ""},
		{"nested mask as gcloud sends it", &healthcare.FhirStore{NotificationConfig: &healthcare.NotificationConfig{PubsubTopic: "projects/test-project/topics/old"}}, "notificationConfig.pubsubTopic", 200, ""},
		{"no mask", &healthcare.FhirStore{}, "", 400, "updateMask is required"},
		{"immutable", &healthcare.FhirStore{DisableReferentialIntegrity: true}, "disableReferentialIntegrity", 400, "cannot be updated"},
		{"immutable version", &healthcare.FhirStore{Version: "R5"}, "version", 400, "cannot be updated"},
		{"unknown field", &healthcare.FhirStore{}, "bogus", 400, "unknown field"},
		{"bad topic", &healthcare.FhirStore{NotificationConfigs: []*healthcare.FhirNotificationConfig{{PubsubTopic: "topics/t"}}}, "notificationConfigs", 400, "pubsubTopic"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			call := stores.Patch(testStore, tc.store)
			if tc.mask != "" {
				call.UpdateMask(tc.mask)
			}
			got, err := call.Do()
			if tc.code != 200 {
				apiErr(t, err, tc.code, tc.substr)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tc.mask == "labels" && got.Labels["team"] != "data" {
				t.Errorf("labels %v", got.Labels)
			}
			if strings.HasPrefix(tc.mask, "notificationConfig.") && (got.NotificationConfig == nil || got.NotificationConfig.PubsubTopic != "projects/test-project/topics/old") {
				t.Errorf("notificationConfig %+v", got.NotificationConfig)
			}
		})
	}
	// enableUpdateCreate was patched off: an update of a missing resource fails.
	if status, out := e.fhirUpdate(t, "Patient", "nobody", `{"resourceType":"Patient","id":"nobody"}`); status != 404 || out["resourceType"] != "OperationOutcome" {
		t.Errorf("update-as-create with enableUpdateCreate false: %d %v, want 404 OperationOutcome", status, out)
	}
	ds, err := e.svc.Projects.Locations.Datasets.Patch(testDataset, &healthcare.Dataset{TimeZone: "Europe/Paris"}).UpdateMask("timeZone").Do()
	if err != nil || ds.TimeZone != "Europe/Paris" {
		t.Errorf("datasets.patch: %+v %v", ds, err)
	}
	_, err = e.svc.Projects.Locations.Datasets.Patch(testDataset, &healthcare.Dataset{Name: "x"}).UpdateMask("name").Do()
	apiErr(t, err, 400, "cannot be updated")
}

func TestUnimplementedMethods(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	tests := []struct {
		method, path string
		code         int
	}{
		{"GET", "/v1/" + testStore + "/fhir/Patient?name=x", 501},
		{"GET", "/v1/" + testStore + "/fhir/Patient/1/$everything", 501},
		{"POST", "/v1/" + testStore + ":import", 501},
		{"GET", "/v1/" + testDataset + "/dicomStores", 501},
		{"GET", "/v1/projects/p/locations", 501},
		{"GET", "/v1/" + testStore + ":frobnicate", 404},
		{"GET", "/v1/projects/p/widgets/w", 404},
	}
	for _, tc := range tests {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			status, b := rawDo(t, tc.method, e.srv.URL+tc.path, "")
			var body struct{ Error googleapi.Error }
			if err := json.Unmarshal(b, &body); err != nil {
				t.Fatalf("%s: %v", b, err)
			}
			want := map[int]string{501: "UNIMPLEMENTED", 404: "NOT_FOUND"}[tc.code]
			if status != tc.code || body.Error.Code != tc.code || !strings.Contains(string(b), fmt.Sprintf(`"status":%q`, want)) {
				t.Errorf("%d %s, want %d %s", status, b, tc.code, want)
			}
		})
	}
}
