package fhirexport

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/fhirexport/fhirexport/events"
)

// tombstonesOf returns the tombstone records the state bucket holds for store.
func tombstonesOf(t *testing.T, store string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, name := range stateObjects(t, "tombstones") {
		var rec map[string]any
		if err := json.Unmarshal(readObject(t, stateBucket, name), &rec); err != nil {
			t.Fatal(err)
		}
		if rec["store"] == store {
			out = append(out, rec)
		}
	}
	return out
}

// TestRecordChangeForms delivers FHIR store change notifications to
// RecordChange through the functions framework, as Eventarc does (binary
// CloudEvent) and as a raw Pub/Sub push: a deletion becomes a tombstone,
// anything else (and anything malformed) is acknowledged and writes nothing.
func TestRecordChangeForms(t *testing.T) {
	t.Parallel()
	const topic = "//pubsub.googleapis.com/projects/test-project/topics/fhir-changes"
	message := func(store, action, id string) map[string]any {
		return map[string]any{
			"data": base64.StdEncoding.EncodeToString([]byte(store + "/fhir/Patient/p-1")),
			"attributes": map[string]string{"action": action, "lastUpdatedTime": "Thu, 26 Nov 2026 01:02:03 UTC",
				"payloadType": "NameOnly", "resourceType": "Patient", "storeName": store, "versionId": "MTY4"},
			"messageId": id, "publishTime": "2026-11-26T01:02:03.456Z",
		}
	}
	eventarc := func(t *testing.T, store, action, id string) int {
		body := specJSON(t, map[string]any{"message": message(store, action, id), "subscription": "projects/test-project/subscriptions/eventarc", "deliveryAttempt": 1})
		return post(t, "RecordChange", map[string]string{"ce-specversion": "1.0", "ce-type": events.MessagePublishedType,
			"ce-source": topic, "ce-id": id, "ce-time": "2026-11-26T01:02:03.456Z", "Content-Type": "application/json"}, body)
	}
	push := func(t *testing.T, store, action, id string) int {
		body := specJSON(t, map[string]any{"message": message(store, action, id), "subscription": "projects/test-project/subscriptions/push"})
		return post(t, "RecordChange", map[string]string{"Content-Type": "application/json"}, body)
	}
	for _, tc := range []struct {
		name    string
		deliver func(t *testing.T, store, action, id string) int
	}{{"eventarc", eventarc}, {"raw push", push}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			store := fmt.Sprintf("%s/datasets/%s/fhirStores/s", location, newID("rc"))
			for _, action := range []string{events.ActionCreate, events.ActionUpdate, events.ActionPatch, "Bogus"} {
				if code := tc.deliver(t, store, action, newID("n")); code != http.StatusOK {
					t.Errorf("%s: RecordChange answered %d, want 200", action, code)
				}
			}
			if n := len(tombstonesOf(t, store)); n != 0 {
				t.Fatalf("%d tombstones for notifications that are not deletions", n)
			}
			if code := tc.deliver(t, store, events.ActionDelete, newID("n")); code != http.StatusOK {
				t.Fatalf("delete: RecordChange answered %d", code)
			}
			got := tombstonesOf(t, store)
			if len(got) != 1 || got[0]["type"] != "Patient" || got[0]["id"] != "p-1" {
				t.Fatalf("tombstones after a deletion: %v", got)
			}
		})
	}
}

// TestBigQueryDeletionsReachTheFeed: an incremental BigQuery pipeline with
// deletedUriPrefix. A deletion notified between two runs reaches the second
// run's deleted file, under the prefix, named by its manifest and counted in
// its event; the first run (a full export) gets a manifest without output.
func TestBigQueryDeletionsReachTheFeed(t *testing.T) {
	t.Parallel()
	store, _ := newStore(t, 2)
	spec := specJSON(t, map[string]any{"fhirStore": store, "name": "bq-feed", "incremental": true,
		"bigqueryDestination": map[string]any{"datasetUri": "bq://test-project.analytics",
			"schemaConfig": map[string]any{"schemaType": "ANALYTICS_V2"}, "writeDisposition": "WRITE_APPEND"},
		"deletedUriPrefix": "gs://" + exportBucket + "/fhir/deleted/{store}"})
	run := func(id string) events.Data {
		t.Helper()
		if code := deliverPubSub(t, "StartExport", id, spec); code != http.StatusOK {
			t.Fatalf("StartExport answered %d", code)
		}
		evs := pollUntil(t, byTrigger(id), 2)
		if got := types(evs); !slices.Equal(got, []string{"started", "succeeded"}) {
			t.Fatalf("events = %v", got)
		}
		return outcomes(evs)[0].Data
	}
	prefix := "gs://" + exportBucket + "/fhir/deleted/" + store[strings.LastIndex(store, "/")+1:] + "/"
	first := run(newID("bqfeed"))
	if !strings.HasPrefix(first.Manifest, prefix) || len(first.Outputs) != 0 {
		t.Errorf("first run: manifest %q, outputs %v; want a manifest under %s without outputs", first.Manifest, first.Outputs, prefix)
	}

	body := specJSON(t, map[string]any{"subscription": "projects/test-project/subscriptions/push", "message": map[string]any{
		"data": base64.StdEncoding.EncodeToString([]byte(store + "/fhir/Patient/gone")),
		"attributes": map[string]string{"action": events.ActionDelete, "lastUpdatedTime": "Thu, 26 Nov 2026 01:02:03 UTC",
			"payloadType": "NameOnly", "resourceType": "Patient", "storeName": store, "versionId": "MTY4"},
		"messageId": newID("n"), "publishTime": "2026-11-26T01:02:03.456Z"}})
	if code := post(t, "RecordChange", map[string]string{"Content-Type": "application/json"}, body); code != http.StatusOK {
		t.Fatalf("RecordChange answered %d", code)
	}

	second := run(newID("bqfeed"))
	if second.Deleted == nil || *second.Deleted != 1 || !strings.HasPrefix(second.Manifest, prefix) {
		t.Fatalf("second run: deleted %v, manifest %q; want 1 under %s", second.Deleted, second.Manifest, prefix)
	}
	var m struct {
		Output  []events.Output `json:"output"`
		Deleted []events.Output `json:"deleted"`
	}
	if err := json.Unmarshal(readObject(t, exportBucket, strings.TrimPrefix(second.Manifest, "gs://"+exportBucket+"/")), &m); err != nil {
		t.Fatal(err)
	}
	if len(m.Output) != 0 || len(m.Deleted) != 1 {
		t.Fatalf("manifest output %v, deleted %v", m.Output, m.Deleted)
	}
	deleted := string(fetchFile(t, m.Deleted[0].URL))
	if !strings.Contains(deleted, `"method":"DELETE","url":"Patient/gone"`) || strings.Count(deleted, "\n") != 1 {
		t.Errorf("deleted file:\n%s\nwant one DELETE of Patient/gone", deleted)
	}
}
