package healthcaretest

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestHistoryAndVread: fhir.history lists every version of a resource,
// newest first, deletions included (no resource, 204), with the times that
// tell what the store held at an instant; _since and _count with its next
// link page it; fhir.vread reads one version (410 for a deletion).
func TestHistoryAndVread(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	fhir := e.svc.Projects.Locations.Datasets.FhirStores.Fhir
	do := func(resp *http.Response, err error) (int, []byte) { t.Helper(); return fhirDo(t, resp, err) }
	name := testStore + "/fhir/Patient/p1"
	e.fhirUpdate(t, "Patient", "p1", `{"resourceType":"Patient","id":"p1","active":true}`)
	e.clock.Advance(time.Second)
	e.fhirUpdate(t, "Patient", "p1", `{"resourceType":"Patient","id":"p1","active":false}`)
	e.clock.Advance(time.Second)
	if code, b := do(fhir.Delete(name).Do()); code != 200 {
		t.Fatalf("delete: %d %s", code, b)
	}
	e.clock.Advance(time.Second)
	e.fhirUpdate(t, "Patient", "p1", `{"resourceType":"Patient","id":"p1","gender":"other"}`)

	type entry struct {
		Resource *struct {
			Active *bool
			Gender string
			Meta   struct{ VersionID, LastUpdated string }
		}
		Request  struct{ Method, URL string }
		Response struct{ Status, Etag, LastModified string }
	}
	var b struct {
		ResourceType, Type string
		Total              int
		Entry              []entry
		Link               []struct{ Relation, URL string }
	}
	code, body := do(fhir.History(name).Do())
	if code != 200 || json.Unmarshal(body, &b) != nil || b.ResourceType != "Bundle" || b.Type != "history" || b.Total != 4 || len(b.Entry) != 4 {
		t.Fatalf("history: %d %s", code, body)
	}
	wantMethods := []string{"PUT", "DELETE", "PUT", "PUT"}
	var last time.Time
	for i, en := range b.Entry {
		at, err := time.Parse(time.RFC3339Nano, en.Response.LastModified)
		if err != nil || (i > 0 && !at.Before(last)) {
			t.Errorf("entry %d: lastModified %q not older than the one before", i, en.Response.LastModified)
		}
		last = at
		if en.Request.Method != wantMethods[i] || en.Request.URL != "Patient/p1" {
			t.Errorf("entry %d: request %+v, want %s Patient/p1", i, en.Request, wantMethods[i])
		}
		if deleted := en.Request.Method == "DELETE"; deleted != (en.Resource == nil) || deleted != strings.HasPrefix(en.Response.Status, "204") {
			t.Errorf("entry %d: a deletion carries no resource and 204: %+v", i, en)
		}
	}
	if r := b.Entry[0].Resource; r == nil || r.Gender != "other" {
		t.Errorf("newest version %+v, want the re-created one", r)
	}

	// vread: a live version, and the deletion.
	oldest := b.Entry[3]
	vid := strings.Trim(strings.TrimPrefix(oldest.Response.Etag, "W/"), `"`)
	code, body = do(fhir.Vread(name + "/_history/" + vid).Do())
	if code != 200 || !strings.Contains(string(body), `"active":true`) {
		t.Errorf("vread of the first version: %d %s", code, body)
	}
	del := strings.Trim(strings.TrimPrefix(b.Entry[1].Response.Etag, "W/"), `"`)
	if code, body := do(fhir.Vread(name + "/_history/" + del).Do()); code != http.StatusGone {
		t.Errorf("vread of the deletion: %d %s, want 410", code, body)
	}
	if code, _ := do(fhir.Vread(name + "/_history/nope").Do()); code != 404 {
		t.Errorf("vread of an unknown version: %d, want 404", code)
	}

	// _since and paging.
	code, body = do(fhir.History(name).Since(b.Entry[1].Response.LastModified).Count(1).Do())
	if code != 200 || json.Unmarshal(body, &b) != nil || b.Total != 2 || len(b.Entry) != 1 || b.Entry[0].Request.Method != "PUT" {
		t.Fatalf("history _since _count=1: %d %s", code, body)
	}
	var next string
	for _, l := range b.Link {
		if l.Relation == "next" {
			next = l.URL
		}
	}
	if code, body := rawDo(t, "GET", next, ""); code != 200 || !strings.Contains(string(body), `"method":"DELETE"`) {
		t.Errorf("next page %s: %d %s, want the deletion", next, code, body)
	}
	if code, _ := do(fhir.History(testStore + "/fhir/Patient/none").Do()); code != 404 {
		t.Errorf("history of a resource never written: %d, want 404", code)
	}
}
