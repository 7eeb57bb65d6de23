package healthcaretest

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	healthcare "google.golang.org/api/healthcare/v1"
)

// fhirRaw sends a FHIR interaction over plain HTTP with headers and returns
// the status, the ETag and the decoded body (nil when empty).
func fhirRaw(t *testing.T, method, url, body string, header ...string) (int, string, map[string]any) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/fhir+json")
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var m map[string]any
	if len(b) > 0 {
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatalf("%s %s: %d %s", method, url, resp.StatusCode, b)
		}
	}
	return resp.StatusCode, resp.Header.Get("ETag"), m
}

// outcome returns the diagnostics of an OperationOutcome body, failing the
// test when the body is not one.
func outcome(t *testing.T, m map[string]any) string {
	t.Helper()
	if m["resourceType"] != "OperationOutcome" {
		t.Fatalf("body %v, want an OperationOutcome", m)
	}
	return m["issue"].([]any)[0].(map[string]any)["diagnostics"].(string)
}

func TestStoreRules(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	const lax = testDataset + "/fhirStores/lax"
	if err := e.srv.CreateFHIRStoreWithConfig(lax, &healthcare.FhirStore{Version: "R4", DisableReferentialIntegrity: true}); err != nil {
		t.Fatal(err)
	}
	base := e.srv.URL + "/v1/" + testStore + "/fhir/"
	// A patient referenced by an encounter.
	status, etag, _ := fhirRaw(t, "PUT", base+"Patient/p1", `{"resourceType":"Patient","id":"p1"}`)
	if status != 201 {
		t.Fatalf("put p1: %d", status)
	}
	if s, _, m := fhirRaw(t, "PUT", base+"Encounter/e1", `{"resourceType":"Encounter","id":"e1","status":"finished","subject":{"reference":"Patient/p1"}}`); s != 201 {
		t.Fatalf("put e1: %d %v", s, m)
	}
	tests := []struct {
		name, method, url, body string
		header                  []string
		status                  int
		diag                    string
	}{
		{"dangling reference on create", "POST", base + "Observation", `{"resourceType":"Observation","status":"final","code":{},"subject":{"reference":"Patient/nobody"}}`, nil, 400, "Patient/nobody"},
		{"dangling reference on update", "PUT", base + "Encounter/e1", `{"resourceType":"Encounter","id":"e1","status":"finished","subject":{"reference":"Patient/gone"}}`, nil, 400, "referential integrity"},
		{"dangling reference in an extension", "POST", base + "Patient", `{"resourceType":"Patient","extension":[{"url":"x","valueReference":{"reference":"Patient/nobody"}}]}`, nil, 400, "Patient/nobody"},
		{"delete of a referenced resource", "DELETE", base + "Patient/p1", "", nil, 409, "Encounter/e1"},
		{"stale If-Match on update", "PUT", base + "Patient/p1", `{"resourceType":"Patient","id":"p1","active":true}`, []string{"If-Match", `W/"stale"`}, 412, "If-Match"},
		{"If-None-Match * on an existing resource", "PUT", base + "Patient/p1", `{"resourceType":"Patient","id":"p1"}`, []string{"If-None-Match", "*"}, 412, "If-None-Match"},
		{"stale If-Match on delete", "DELETE", base + "Encounter/e1", "", []string{"If-Match", `W/"stale"`}, 412, "If-Match"},
		{"unknown resource type", "POST", base + "Widget", `{"resourceType":"Widget"}`, nil, 400, "unknown resource type"},
		{"R5-only type in an R4 store", "POST", base + "NutritionIntake", `{"resourceType":"NutritionIntake"}`, nil, 400, "unknown resource type"},
		{"malformed id", "PUT", base + "Patient/bad_id!", `{"resourceType":"Patient","id":"bad_id!"}`, nil, 400, "invalid resource id"},
		{"wrong JSON type", "POST", base + "Patient", `{"resourceType":"Patient","active":"yes"}`, nil, 400, "Patient.active: want a boolean"},
		{"wrong JSON type of an array", "POST", base + "Observation", `{"resourceType":"Observation","status":"final","category":{}}`, nil, 400, "want an array"},
		{"wrong JSON type of a common element", "POST", base + "Basic", `{"resourceType":"Basic","meta":[]}`, nil, 400, "want an object"},
		{"unknown top-level element", "POST", base + "Patient", `{"resourceType":"Patient","favouriteColour":"blue"}`, nil, 400, "unknown field"},
		{"patch to an invalid resource", "PATCH", base + "Patient/p1", `[{"op":"add","path":"/active","value":"yes"}]`, []string{"Content-Type", "application/json-patch+json"}, 400, "want a boolean"},
		{"patch test failure", "PATCH", base + "Patient/p1", `[{"op":"test","path":"/id","value":"p2"}]`, []string{"Content-Type", "application/json-patch+json"}, 422, "test failed"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			status, _, m := fhirRaw(t, tc.method, tc.url, tc.body, tc.header...)
			if d := outcome(t, m); status != tc.status || !strings.Contains(d, tc.diag) {
				t.Errorf("%d %q, want %d containing %q", status, d, tc.status, tc.diag)
			}
		})
	}
	// The same writes succeed where they should.
	if s, _, m := fhirRaw(t, "PUT", base+"Patient/p1", `{"resourceType":"Patient","id":"p1","active":true}`, "If-Match", etag); s != 200 {
		t.Errorf("update with the current If-Match: %d %v", s, m)
	}
	if s, _, m := fhirRaw(t, "POST", e.srv.URL+"/v1/"+lax+"/fhir/Observation", `{"resourceType":"Observation","status":"final","code":{},"subject":{"reference":"Patient/nobody"}}`); s != 201 {
		t.Errorf("dangling reference with disableReferentialIntegrity: %d %v", s, m)
	}
	status, etag, _ = fhirRaw(t, "GET", base+"Patient/p1", "")
	if s, _, _ := fhirRaw(t, "GET", base+"Patient/p1", "", "If-None-Match", etag); status != 200 || s != 304 {
		t.Errorf("read with the current If-None-Match: %d then %d, want 200 then 304", status, s)
	}
	if s, _, m := fhirRaw(t, "DELETE", base+"Encounter/e1", ""); s != 200 {
		t.Fatalf("delete e1: %d %v", s, m)
	}
	if s, _, m := fhirRaw(t, "DELETE", base+"Patient/p1", ""); s != 200 {
		t.Errorf("delete of a no longer referenced patient: %d %v", s, m)
	}
}

func TestTransactionRules(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	e.srv.PutResource(testStore, []byte(`{"resourceType":"Patient","id":"p1"}`))
	e.srv.PutResource(testStore, []byte(`{"resourceType":"Encounter","id":"e1","status":"finished","subject":{"reference":"Patient/p1"}}`))
	url := e.srv.URL + "/v1/" + testStore + "/fhir"
	tests := []struct {
		name    string
		entries string
		status  int
		diag    string
	}{
		{"reference to a resource deleted in the same transaction",
			`{"request":{"method":"DELETE","url":"Encounter/e1"}},{"request":{"method":"DELETE","url":"Patient/p1"}},
			 {"resource":{"resourceType":"Observation","id":"o1","status":"final","code":{},"subject":{"reference":"Patient/p1"}},"request":{"method":"PUT","url":"Observation/o1"}}`,
			400, "referential integrity"},
		{"delete of a resource still referenced", `{"request":{"method":"DELETE","url":"Patient/p1"}}`, 409, "Encounter/e1"},
		{"delete together with its referrer",
			`{"request":{"method":"DELETE","url":"Encounter/e1"}},{"request":{"method":"DELETE","url":"Patient/p1"}}`, 200, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := e.srv.Resources(testStore)
			status, _, m := fhirRaw(t, "POST", url, `{"resourceType":"Bundle","type":"transaction","entry":[`+tc.entries+`]}`)
			if tc.status == 200 {
				if status != 200 || len(e.srv.Resources(testStore)) != 0 {
					t.Errorf("%d %v; %d resources left", status, m, len(e.srv.Resources(testStore)))
				}
				return
			}
			if d := outcome(t, m); status != tc.status || !strings.Contains(d, tc.diag) {
				t.Errorf("%d %q, want %d containing %q", status, d, tc.status, tc.diag)
			}
			if len(e.srv.Resources(testStore)) != len(before) {
				t.Error("a failed transaction changed the store")
			}
		})
	}
}

func TestCapabilityStatement(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	tests := []struct {
		name, store, version string
		config               *healthcare.FhirStore
		wantType, wantFHIR   string
		wantUpdateCreate     bool
	}{
		{"R4 via CreateFHIRStore", testStore, "", nil, "CapabilityStatement", "4.0.1", true},
		{"DSTU2 as configured", testDataset + "/fhirStores/old", "DSTU2", &healthcare.FhirStore{Version: "DSTU2"}, "Conformance", "1.0.2", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.config != nil {
				if err := e.srv.CreateFHIRStoreWithConfig(tc.store, tc.config); err != nil {
					t.Fatal(err)
				}
			}
			call := e.svc.Projects.Locations.Datasets.FhirStores.Fhir.Capabilities(tc.store)
			resp, err := call.Do()
			status, b := fhirDo(t, resp, err)
			var cs struct {
				ResourceType, FhirVersion string
				Rest                      []struct {
					Resource []struct {
						Type         string
						UpdateCreate bool
						Interaction  []struct{ Code string }
					}
				}
			}
			if err := json.Unmarshal(b, &cs); err != nil || status != 200 {
				t.Fatalf("%d %s", status, b)
			}
			if cs.ResourceType != tc.wantType || cs.FhirVersion != tc.wantFHIR || len(cs.Rest) != 1 {
				t.Fatalf("capabilities %s", b)
			}
			found := false
			for _, r := range cs.Rest[0].Resource {
				if r.Type == "Patient" {
					found = r.UpdateCreate == tc.wantUpdateCreate && len(r.Interaction) == 5
				}
			}
			if !found {
				t.Errorf("Patient not listed with updateCreate=%v and 5 interactions: %s", tc.wantUpdateCreate, b)
			}
		})
	}
}

// TestJSONPatchKeepsNumbersAndCopies: a JSON Patch keeps the text of stored
// numbers (1.50 stays 1.50, a 20-digit integer is not rounded) and a copied
// value does not share its maps with the original.
func TestJSONPatchKeepsNumbersAndCopies(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	base := e.srv.URL + "/v1/" + testStore + "/fhir/"
	if status, _, m := fhirRaw(t, "PUT", base+"Patient/n1", `{"resourceType":"Patient","id":"n1","name":[{"given":["A"]}],"multipleBirthInteger":2}`); status != 201 {
		t.Fatalf("create: %d %v", status, m)
	}
	patch := `[{"op":"copy","from":"/name/0","path":"/name/-"},{"op":"add","path":"/name/1/family","value":"B"},{"op":"replace","path":"/multipleBirthInteger","value":12345678901234567890}]`
	if status, _, m := fhirRaw(t, "PATCH", base+"Patient/n1", patch, "Content-Type", "application/json-patch+json"); status != 200 {
		t.Fatalf("patch: %d %v", status, m)
	}
	resp, err := http.Get(base + "Patient/n1")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if !strings.Contains(string(raw), "12345678901234567890") {
		t.Errorf("the patched integer lost its digits: %s", raw)
	}
	var p struct {
		Name []map[string]any `json:"name"`
	}
	if err := json.Unmarshal(raw, &p); err != nil || len(p.Name) != 2 {
		t.Fatalf("patched patient %s (%v)", raw, err)
	}
	if _, shared := p.Name[0]["family"]; shared || p.Name[1]["family"] != "B" {
		t.Errorf("names after copy and add: %v; the copy must not change the original", p.Name)
	}
}
