package healthcaretest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"reflect"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	healthcare "google.golang.org/api/healthcare/v1"
	"google.golang.org/api/option"
)

func TestDatasetsAndStores(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	ds := e.svc.Projects.Locations.Datasets
	const loc = "projects/test-project/locations/europe-west4"
	op, err := ds.Create(loc, &healthcare.Dataset{TimeZone: "Europe/Amsterdam"}).DatasetId("eu").Do()
	if err != nil {
		t.Fatalf("datasets.create: %v", err)
	}
	var resp healthcare.Dataset
	json.Unmarshal(op.Response, &resp)
	if !op.Done || resp.Name != loc+"/datasets/eu" || resp.TimeZone != "Europe/Amsterdam" {
		t.Errorf("create answered %+v / %+v, want a done operation with the dataset", op, resp)
	}
	if _, err := ds.Create(loc, &healthcare.Dataset{}).DatasetId("eu").Do(); err == nil {
		t.Error("second create: want 409")
	} else {
		apiErr(t, err, 409, "already exists")
	}
	_, err = ds.Create(loc, &healthcare.Dataset{}).Do()
	apiErr(t, err, 400, "datasetId")
	got, err := ds.Get(loc + "/datasets/eu").Do()
	if err != nil || got.Name != loc+"/datasets/eu" {
		t.Errorf("datasets.get: %v %v", got, err)
	}
	_, err = ds.Get(loc + "/datasets/nope").Do()
	apiErr(t, err, 404, "nope")
	list, err := ds.List(loc).Do()
	if err != nil || len(list.Datasets) != 1 {
		t.Errorf("datasets.list: %v %v", list, err)
	}

	stores := ds.FhirStores
	var names []string
	for i := 0; i < 5; i++ {
		id := fmt.Sprintf("s%d", i)
		st, err := stores.Create(loc+"/datasets/eu", &healthcare.FhirStore{Version: []string{"DSTU2", "STU3", "R4", "R5", "R4"}[i], EnableUpdateCreate: true}).FhirStoreId(id).Do()
		if err != nil {
			t.Fatalf("fhirStores.create: %v", err)
		}
		if st.Name != loc+"/datasets/eu/fhirStores/"+id || !st.EnableUpdateCreate {
			t.Errorf("created %+v", st)
		}
		names = append(names, st.Name)
	}
	_, err = stores.Create(loc+"/datasets/eu", &healthcare.FhirStore{}).FhirStoreId("nov").Do()
	apiErr(t, err, 400, "version")
	_, err = stores.Create(loc+"/datasets/eu", &healthcare.FhirStore{Version: "R4"}).FhirStoreId("s1").Do()
	apiErr(t, err, 409, "s1")
	_, err = stores.Create(loc+"/datasets/missing", &healthcare.FhirStore{Version: "R4"}).FhirStoreId("x").Do()
	apiErr(t, err, 404, "missing")

	var paged []string
	pages := 0
	err = stores.List(loc+"/datasets/eu").PageSize(2).Pages(context.Background(), func(r *healthcare.ListFhirStoresResponse) error {
		pages++
		for _, s := range r.FhirStores {
			paged = append(paged, s.Name)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(names, paged); diff != "" || pages != 3 {
		t.Errorf("paged list over %d pages (-want +got):\n%s", pages, diff)
	}
	_, err = stores.List(loc + "/datasets/eu").PageToken("garbage").Do()
	apiErr(t, err, 400, "pageToken")

	if _, err := stores.Delete(names[0]).Do(); err != nil {
		t.Fatalf("fhirStores.delete: %v", err)
	}
	_, err = stores.Get(names[0]).Do()
	apiErr(t, err, 404, "s0")
	if st, err := stores.Get(names[3]).Do(); err != nil || st.Version != "R5" {
		t.Errorf("fhirStores.get: %v %v", st, err)
	}
	// R5 stores accept R5 resource types in exports.
	if _, err := stores.Export(names[3], &healthcare.ExportResourcesRequest{Type: "NutritionIntake", GcsDestination: gcsExport("gs://bucket/r5").GcsDestination}).Do(); err != nil {
		t.Errorf("R5 export: %v", err)
	}
}

func TestOperationsListAndCancel(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(o *Options) { o.ExportDuration = 0 })
	ops := e.svc.Projects.Locations.Datasets.Operations
	var all []string
	for i := 0; i < 3; i++ {
		all = append(all, e.mustExport(t, gcsExport("gs://bucket/l")).Name)
	}
	e.srv.SetExportTiming(someTime, 1)
	for i := 0; i < 2; i++ {
		all = append(all, e.mustExport(t, gcsExport("gs://bucket/l")).Name)
	}
	list := func(filter string, size int64) []string {
		var out []string
		err := ops.List(testDataset).Filter(filter).PageSize(size).Pages(context.Background(), func(r *healthcare.ListOperationsResponse) error {
			for _, op := range r.Operations {
				out = append(out, op.Name)
			}
			return nil
		})
		if err != nil {
			t.Fatalf("list %q: %v", filter, err)
		}
		return out
	}
	for _, tc := range []struct {
		filter string
		want   []string
	}{{"", all}, {"done=true", all[:3]}, {"done = false", all[3:]}} {
		if diff := cmp.Diff(tc.want, list(tc.filter, 2)); diff != "" {
			t.Errorf("filter %q (-want +got):\n%s", tc.filter, diff)
		}
	}
	_, err := ops.List(testDataset).Filter("metadata.create_time>0").Do()
	apiErr(t, err, 400, "filter")
	// Cancel a running one; cancelling again or a done one is a no-op.
	for i := 0; i < 2; i++ {
		if _, err := ops.Cancel(all[3], &healthcare.CancelOperationRequest{}).Do(); err != nil {
			t.Fatalf("cancel: %v", err)
		}
	}
	op := e.getOp(t, all[3])
	if !op.Done || op.Error == nil || op.Error.Code != 1 {
		t.Errorf("cancelled operation %+v", op)
	}
	if len(e.readObjects(t, "bucket", "l/"+opID(all[3]))) != 0 {
		t.Error("a cancelled export wrote objects")
	}
	if _, err := ops.Cancel(all[0], &healthcare.CancelOperationRequest{}).Do(); err != nil {
		t.Fatalf("cancel done: %v", err)
	}
	if op := e.getOp(t, all[0]); op.Error != nil {
		t.Errorf("cancelling a done operation changed it: %+v", op.Error)
	}
	_, err = ops.Cancel(testDataset+"/operations/77", &healthcare.CancelOperationRequest{}).Do()
	apiErr(t, err, 404, "77")
	if got, ok := e.srv.Operation(all[4]); !ok || got.Done {
		t.Errorf("Operation(%s) = %+v, %v; want running", all[4], got, ok)
	}
}

const someTime = 3600 * 1e9

func TestFHIRInteractions(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	fhir := e.svc.Projects.Locations.Datasets.FhirStores.Fhir
	created := e.fhirCreate(t, "Patient", `{"resourceType":"Patient","id":"ignored","name":[{"family":"Doe"}]}`)
	id, _ := created["id"].(string)
	meta, _ := created["meta"].(map[string]any)
	if id == "" || id == "ignored" || meta["versionId"] == nil || meta["lastUpdated"] == nil {
		t.Fatalf("created %v: want a server id, versionId and lastUpdated", created)
	}
	read := func(typ, id string) (int, map[string]any) {
		resp, err := fhir.Read(testStore + "/fhir/" + typ + "/" + id).Do()
		status, b := fhirDo(t, resp, err)
		return status, decodeMap(t, b)
	}
	if status, got := read("Patient", id); status != 200 || !cmp.Equal(got, created) {
		t.Errorf("read: %d %v, want %v", status, got, created)
	}
	status, upd := e.fhirUpdate(t, "Patient", id, `{"resourceType":"Patient","id":"`+id+`","active":true}`)
	if status != 200 || upd["active"] != true || upd["meta"].(map[string]any)["versionId"] == meta["versionId"] {
		t.Errorf("update: %d %v", status, upd)
	}
	if status, _ := e.fhirUpdate(t, "Patient", "new-1", `{"resourceType":"Patient","id":"new-1"}`); status != 201 {
		t.Errorf("update-create: %d, want 201", status)
	}
	for _, tc := range []struct {
		name, typ, id, body string
		status              int
		diag                string
	}{
		{"id mismatch", "Patient", "a", `{"resourceType":"Patient","id":"b"}`, 400, "id"},
		{"type mismatch", "Patient", "a", `{"resourceType":"Observation","id":"a"}`, 400, "resourceType"},
		{"unknown type", "Bogus", "a", `{"resourceType":"Bogus","id":"a"}`, 400, "resourceType"},
		{"no id", "Patient", "a", `{"resourceType":"Patient"}`, 400, "id"},
		{"bad JSON", "Patient", "a", `{"resourceType":`, 400, "JSON"},
	} {
		status, out := e.fhirUpdate(t, tc.typ, tc.id, tc.body)
		if b, _ := json.Marshal(out); status != tc.status || out["resourceType"] != "OperationOutcome" || !strings.Contains(string(b), tc.diag) {
			t.Errorf("%s: %d %s, want %d OperationOutcome about %s", tc.name, status, b, tc.status, tc.diag)
		}
	}
	call := fhir.Create(testStore, "Patient", strings.NewReader(`{"resourceType":"Patient"}`))
	resp, err := call.Do() // no Content-Type
	if status, _ := fhirDo(t, resp, err); status != http.StatusUnsupportedMediaType {
		t.Errorf("create without Content-Type: %d, want 415", status)
	}
	resp, err = fhir.Delete(testStore + "/fhir/Patient/" + id).Do()
	if status, _ := fhirDo(t, resp, err); status != 200 {
		t.Errorf("delete: %d", status)
	}
	if status, out := read("Patient", id); status != 410 || out["resourceType"] != "OperationOutcome" {
		t.Errorf("read deleted: %d %v, want 410 OperationOutcome", status, out)
	}
	if status, out := read("Patient", "never"); status != 404 || out["resourceType"] != "OperationOutcome" {
		t.Errorf("read absent: %d %v, want 404 OperationOutcome", status, out)
	}
	if n := len(e.srv.Resources(testStore)); n != 1 {
		t.Errorf("%d current resources, want 1", n)
	}
}

func TestBundles(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	fhir := e.svc.Projects.Locations.Datasets.FhirStores.Fhir
	exec := func(body string) (int, map[string]any) {
		call := fhir.ExecuteBundle(testStore, strings.NewReader(body))
		call.Header().Set("Content-Type", "application/fhir+json;charset=utf-8")
		resp, err := call.Do()
		status, b := fhirDo(t, resp, err)
		return status, decodeMap(t, b)
	}
	status, out := exec(`{"resourceType":"Bundle","type":"transaction","entry":[
		{"fullUrl":"urn:uuid:p1","resource":{"resourceType":"Patient"},"request":{"method":"POST","url":"Patient"}},
		{"resource":{"resourceType":"Encounter","id":"e1","status":"finished","subject":{"reference":"urn:uuid:p1"}},"request":{"method":"PUT","url":"Encounter/e1"}}]}`)
	if status != 200 || out["type"] != "transaction-response" {
		t.Fatalf("transaction: %d %v", status, out)
	}
	entries := out["entry"].([]any)
	pid := entries[0].(map[string]any)["resource"].(map[string]any)["id"].(string)
	enc := entries[1].(map[string]any)["resource"].(map[string]any)
	if ref := enc["subject"].(map[string]any)["reference"]; ref != "Patient/"+pid {
		t.Errorf("urn:uuid reference resolved to %v, want Patient/%s", ref, pid)
	}
	for i, want := range []string{"201 Created", "201 Created"} {
		if got := entries[i].(map[string]any)["response"].(map[string]any)["status"]; got != want {
			t.Errorf("entry %d status %v, want %s", i, got, want)
		}
	}
	// A failing transaction changes nothing.
	before := e.srv.Resources(testStore)
	status, out = exec(`{"resourceType":"Bundle","type":"transaction","entry":[
		{"resource":{"resourceType":"Patient"},"request":{"method":"POST","url":"Patient"}},
		{"resource":{"resourceType":"Patient","id":"x"},"request":{"method":"PUT","url":"Patient/y"}}]}`)
	if status != 400 || out["resourceType"] != "OperationOutcome" {
		t.Errorf("bad transaction: %d %v", status, out)
	}
	if diff := cmp.Diff(before, e.srv.Resources(testStore)); diff != "" {
		t.Errorf("failed transaction changed the store:\n%s", diff)
	}
	// A batch applies what it can.
	status, out = exec(`{"resourceType":"Bundle","type":"batch","entry":[
		{"resource":{"resourceType":"Patient"},"request":{"method":"POST","url":"Patient"}},
		{"resource":{"resourceType":"Patient","id":"x"},"request":{"method":"PUT","url":"Patient/y"}},
		{"request":{"method":"DELETE","url":"Encounter/e1"}},
		{"request":{"method":"GET","url":"Patient/` + pid + `"}}]}`)
	var statuses []string
	for _, en := range out["entry"].([]any) {
		statuses = append(statuses, en.(map[string]any)["response"].(map[string]any)["status"].(string))
	}
	if diff := cmp.Diff([]string{"201 Created", "400 Bad Request", "200 OK", "200 OK"}, statuses); status != 200 || out["type"] != "batch-response" || diff != "" {
		t.Errorf("batch: %d %v (-want +got):\n%s", status, out["type"], diff)
	}
	if n := len(e.srv.Resources(testStore)); n != 2 {
		t.Errorf("%d resources after the batch, want 2 patients", n)
	}
	if status, _ := exec(`{"resourceType":"Bundle","type":"collection"}`); status != 400 {
		t.Errorf("collection bundle: %d, want 400", status)
	}
}

func TestEndpointForms(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	for _, ep := range []string{e.srv.URL, e.srv.URL + "/"} {
		svc, err := healthcare.NewService(context.Background(), option.WithEndpoint(ep), option.WithoutAuthentication())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := svc.Projects.Locations.Datasets.FhirStores.Get(testStore).Do(); err != nil {
			t.Errorf("endpoint %q: %v", ep, err)
		}
	}
	for _, r := range e.srv.Requests() {
		if r.APIMethod != "fhirStores.get" || r.Path != "/v1/"+testStore || r.Query.Get("alt") != "json" {
			t.Errorf("recorded %+v", r)
		}
	}
	for _, path := range []string{"/", "/v1/", "/v1/projects/p", "/v1/projects/p/locations/l/datasets/d/fhirStores/s:frobnicate", "/v1/projects/p/locations/l/datasets/d/widgets"} {
		status, b := rawDo(t, "GET", e.srv.URL+path, "")
		if status != 404 || !bytes.Contains(b, []byte(`"NOT_FOUND"`)) {
			t.Errorf("GET %s: %d %s, want a Google-style 404", path, status, b)
		}
	}
}

func TestSynthetic(t *testing.T) {
	t.Parallel()
	a, b := Synthetic(11, 20), Synthetic(11, 20)
	// reflect.DeepEqual: cmp on [][]byte takes seconds.
	if !reflect.DeepEqual(a, b) {
		t.Fatalf("same seed, different bytes")
	}
	if reflect.DeepEqual(a, Synthetic(12, 20)) {
		t.Error("different seeds, same bytes")
	}
	ids := map[string]bool{}
	types := map[string]int{}
	for _, r := range a {
		var m map[string]any
		if err := json.Unmarshal(r, &m); err != nil {
			t.Fatalf("invalid JSON %s", r)
		}
		typ, id := m["resourceType"].(string), m["id"].(string)
		types[typ]++
		ids[typ+"/"+id] = true
	}
	if types["Patient"] != 20 || types["Encounter"] < 20 || types["Observation"] < 40 || types["Condition"] == 0 {
		t.Errorf("types %v", types)
	}
	for _, r := range a {
		var m struct {
			ResourceType       string
			Subject, Encounter *struct{ Reference string }
			ValueQuantity      *struct{ System, Code string }
		}
		json.Unmarshal(r, &m)
		for _, ref := range []*struct{ Reference string }{m.Subject, m.Encounter} {
			if ref != nil && !ids[ref.Reference] {
				t.Errorf("%s: dangling reference %s", m.ResourceType, ref.Reference)
			}
		}
		if m.ResourceType == "Observation" && (m.ValueQuantity == nil || m.ValueQuantity.System != "http://unitsofmeasure.org") {
			t.Errorf("observation without a UCUM valueQuantity: %s", r)
		}
	}
	e := New(Options{})
	e.CreateDataset(testDataset)
	e.CreateFHIRStore(testStore, "R4")
	n, err := e.Seed(testStore, 11, 20)
	if err != nil || n != len(a) || len(e.Resources(testStore)) != n {
		t.Errorf("Seed: %d %v, want %d", n, err, len(a))
	}
}
