package healthcaretest

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	healthcare "google.golang.org/api/healthcare/v1"
)

// rawOp fetches an operation's exact wire JSON the way the Go client does.
func (e *env) rawOp(t *testing.T, name string) []byte {
	t.Helper()
	status, b := rawDo(t, "GET", e.srv.URL+"/v1/"+name+"?alt=json&prettyPrint=false", "")
	if status != 200 {
		t.Fatalf("GET %s: %d %s", name, status, b)
	}
	return b
}

func TestOperationGoldens(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		golden string
		// act runs after the export call and returns the JSON to compare.
		act func(t *testing.T, e *env, op string) []byte
	}{
		{"running", "op_running.json", func(t *testing.T, e *env, op string) []byte {
			e.clock.Advance(5 * time.Second) // 2 whole steps of 2 s elapsed (createTime is a few µs past the clock)
			return e.rawOp(t, op)
		}},
		{"done", "op_done.json", func(t *testing.T, e *env, op string) []byte {
			e.clock.Advance(11 * time.Second)
			return e.rawOp(t, op)
		}},
		{"done with failures", "op_done_failures.json", func(t *testing.T, e *env, op string) []byte {
			if err := e.srv.ForceOutcome(op, Outcome{FailureCount: 3}); err != nil {
				t.Fatal(err)
			}
			e.clock.Advance(time.Minute)
			return e.rawOp(t, op)
		}},
		{"failed", "op_failed.json", func(t *testing.T, e *env, op string) []byte {
			if err := e.srv.ForceOutcome(op, Outcome{ErrorCode: 13, ErrorMessage: "internal error exporting resources"}); err != nil {
				t.Fatal(err)
			}
			e.clock.Advance(11 * time.Second)
			return e.rawOp(t, op)
		}},
		{"cancelled", "op_cancelled.json", func(t *testing.T, e *env, op string) []byte {
			e.clock.Advance(6 * time.Second)
			if _, err := e.svc.Projects.Locations.Datasets.Operations.Cancel(op, &healthcare.CancelOperationRequest{}).Do(); err != nil {
				t.Fatalf("cancel: %v", err)
			}
			return e.rawOp(t, op)
		}},
		{"list running", "op_list.json", func(t *testing.T, e *env, op string) []byte {
			_, b := rawDo(t, "GET", e.srv.URL+"/v1/"+testDataset+"/operations?alt=json&prettyPrint=false&filter=done%3Dfalse", "")
			return b
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, func(o *Options) {
				o.ExportDuration, o.ExportSteps, o.DeterministicIDs = 10*time.Second, 5, true
			})
			if _, err := e.srv.Seed(testStore, 7, 2); err != nil {
				t.Fatal(err)
			}
			op := e.mustExport(t, gcsExport("gs://bucket/golden"))
			golden(t, tc.golden, tc.act(t, e, op.Name))
		})
	}
}

func TestSynchronousErrorGoldens(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(o *Options) { o.DeterministicIDs = true })
	tests := []struct {
		name, method, path, body, golden string
		status                           int
	}{
		{"invalid since", "POST", testStore + ":export", `{"_since":"2024-01-01","gcsDestination":{"uriPrefix":"gs://bucket/x"}}`, "error_invalid_since.json", 400},
		{"unknown field", "POST", testStore + ":export", `{"gcsDestination":{"uriPrefix":"gs://bucket/x","bogus":1}}`, "error_unknown_field.json", 400},
		{"unknown store", "POST", testDataset + "/fhirStores/nope:export", `{"gcsDestination":{"uriPrefix":"gs://bucket/x"}}`, "error_store_not_found.json", 404},
		{"unknown operation", "GET", testDataset + "/operations/123", ``, "error_operation_not_found.json", 404},
		{"dataset exists", "POST", "projects/test-project/locations/us-central1/datasets?datasetId=ds", `{}`, "error_already_exists.json", 409},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sep := "?"
			if strings.Contains(tc.path, "?") {
				sep = "&"
			}
			status, b := rawDo(t, tc.method, e.srv.URL+"/v1/"+tc.path+sep+"alt=json&prettyPrint=false", tc.body)
			if status != tc.status {
				t.Errorf("status %d, want %d (%s)", status, tc.status, b)
			}
			golden(t, tc.golden, b)
		})
	}
	t.Run("429 injected", func(t *testing.T) {
		e.srv.FailNext("operations.get", 1, 429)
		_, b := rawDo(t, "GET", e.srv.URL+"/v1/"+testDataset+"/operations/1", "")
		golden(t, "error_resource_exhausted.json", b)
	})
}

func TestExportContentAndFilters(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	n, err := e.srv.Seed(testStore, 3, 8)
	if err != nil {
		t.Fatal(err)
	}
	if n < 40 {
		t.Fatalf("seeded only %d resources", n)
	}
	all := e.srv.Resources(testStore)
	// A cut in the middle: resources updated strictly after it.
	var mid map[string]any
	json.Unmarshal(all[len(all)/2], &mid)
	cut := mid["meta"].(map[string]any)["lastUpdated"].(string)
	cutT, _ := time.Parse(time.RFC3339Nano, cut)
	after := func(m map[string]any) bool {
		lu, _ := time.Parse(time.RFC3339Nano, m["meta"].(map[string]any)["lastUpdated"].(string))
		return lu.After(cutT)
	}
	tests := []struct {
		name   string
		prefix string // uriPrefix
		objDir string // object name prefix it implies
		since  string
		types  string
		keep   func(typ string, m map[string]any) bool
	}{
		{name: "all", prefix: "gs://bucket/all", objDir: "all/"},
		{name: "trailing slash", prefix: "gs://bucket/slash/", objDir: "slash/"},
		{name: "bucket root", prefix: "gs://bucket", objDir: ""},
		{name: "types", prefix: "gs://bucket/types", objDir: "types/", types: "Patient,Condition",
			keep: func(typ string, _ map[string]any) bool { return typ == "Patient" || typ == "Condition" }},
		{name: "since strictly after", prefix: "gs://bucket/since", objDir: "since/", since: cut,
			keep: func(_ string, m map[string]any) bool { return after(m) }},
		{name: "since in another zone", prefix: "gs://bucket/zone", objDir: "zone/", since: cutT.In(time.FixedZone("", -5*3600)).Format(time.RFC3339Nano),
			keep: func(_ string, m map[string]any) bool { return after(m) }},
		{name: "since and type", prefix: "gs://bucket/both", objDir: "both/", since: cut, types: "Observation",
			keep: func(typ string, m map[string]any) bool { return typ == "Observation" && after(m) }},
		{name: "since after everything", prefix: "gs://bucket/none", objDir: "none/", since: "2999-01-01T00:00:00Z",
			keep: func(string, map[string]any) bool { return false }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req := gcsExport(tc.prefix)
			req.Since, req.Type = tc.since, tc.types
			op := e.mustExport(t, req)
			got := e.getOp(t, op.Name)
			if !got.Done || got.Error != nil {
				t.Fatalf("operation not done successfully: %+v", got)
			}
			want := wantNDJSON(all, tc.objDir+opID(op.Name)+"_", tc.keep)
			objs := e.readObjects(t, "bucket", tc.objDir+opID(op.Name))
			if diff := cmp.Diff(want, objs); diff != "" {
				t.Errorf("objects (-want +got):\n%s", diff)
			}
			lines := 0
			for _, v := range want {
				lines += strings.Count(v, "\n")
			}
			var md struct{ Counter map[string]string }
			json.Unmarshal(got.Metadata, &md)
			wantCounter := map[string]string{}
			if lines > 0 {
				wantCounter["success"] = itoa(lines)
			}
			if diff := cmp.Diff(wantCounter, md.Counter, cmpEmpty); diff != "" {
				t.Errorf("counter (-want +got):\n%s", diff)
			}
		})
	}
}

var cmpEmpty = cmp.FilterValues(func(a, b map[string]string) bool { return len(a) == 0 && len(b) == 0 }, cmp.Ignore())

func itoa(n int) string { b, _ := json.Marshal(n); return string(b) }

func TestExportValidation(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	gcs := `"gcsDestination":{"uriPrefix":"gs://bucket/x"}`
	bq := func(extra string) string {
		return `"bigqueryDestination":{"datasetUri":"bq://my-project.my_ds","schemaConfig":{"schemaType":"ANALYTICS_V2"}` + extra + `}`
	}
	tests := []struct {
		name, body, field string
	}{
		{"no destination", `{}`, "gcsDestination"},
		{"both destinations", `{` + gcs + `,` + bq("") + `}`, "bigqueryDestination"},
		{"since date only", `{"_since":"2024-01-01",` + gcs + `}`, "_since"},
		{"since without zone", `{"_since":"2024-01-01T10:00:00",` + gcs + `}`, "_since"},
		{"since without seconds", `{"_since":"2024-01-01T10:00Z",` + gcs + `}`, "_since"},
		{"since garbage", `{"_since":"yesterday",` + gcs + `}`, "_since"},
		{"since bad month", `{"_since":"2024-13-01T10:00:00Z",` + gcs + `}`, "_since"},
		{"since not a string", `{"_since":5,` + gcs + `}`, "_since"},
		{"type unknown", `{"_type":"Patient,Bogus",` + gcs + `}`, "_type"},
		{"type R5 only", `{"_type":"NutritionIntake",` + gcs + `}`, "_type"},
		{"type empty item", `{"_type":"Patient,",` + gcs + `}`, "_type"},
		{"uri prefix not gs", `{"gcsDestination":{"uriPrefix":"s3://bucket/x"}}`, "gcsDestination.uriPrefix"},
		{"uri prefix empty", `{"gcsDestination":{}}`, "gcsDestination.uriPrefix"},
		{"bucket upper case", `{"gcsDestination":{"uriPrefix":"gs://Bucket/x"}}`, "gcsDestination.uriPrefix"},
		{"bucket too short", `{"gcsDestination":{"uriPrefix":"gs://ab/x"}}`, "gcsDestination.uriPrefix"},
		{"bucket goog prefix", `{"gcsDestination":{"uriPrefix":"gs://goog-data/x"}}`, "gcsDestination.uriPrefix"},
		{"dataset uri missing", `{"bigqueryDestination":{"schemaConfig":{"schemaType":"ANALYTICS"}}}`, "bigqueryDestination.datasetUri"},
		{"dataset uri no dataset", `{"bigqueryDestination":{"datasetUri":"bq://my-project","schemaConfig":{"schemaType":"ANALYTICS"}}}`, "bigqueryDestination.datasetUri"},
		{"dataset uri wrong scheme", `{"bigqueryDestination":{"datasetUri":"my-project.ds","schemaConfig":{"schemaType":"ANALYTICS"}}}`, "bigqueryDestination.datasetUri"},
		{"schema config missing", `{"bigqueryDestination":{"datasetUri":"bq://my-project.ds"}}`, "schemaType"},
		{"schema type unspecified", `{"bigqueryDestination":{"datasetUri":"bq://my-project.ds","schemaConfig":{"schemaType":"SCHEMA_TYPE_UNSPECIFIED"}}}`, "schemaType"},
		{"schema type lossless", `{"bigqueryDestination":{"datasetUri":"bq://my-project.ds","schemaConfig":{"schemaType":"LOSSLESS"}}}`, "schema_type"},
		{"depth 6", `{"bigqueryDestination":{"datasetUri":"bq://my-project.ds","schemaConfig":{"schemaType":"ANALYTICS","recursiveStructureDepth":"6"}}}`, "recursiveStructureDepth"},
		{"depth negative", `{"bigqueryDestination":{"datasetUri":"bq://my-project.ds","schemaConfig":{"schemaType":"ANALYTICS","recursiveStructureDepth":-1}}}`, "recursiveStructureDepth"},
		{"depth not a number", `{"bigqueryDestination":{"datasetUri":"bq://my-project.ds","schemaConfig":{"schemaType":"ANALYTICS","recursiveStructureDepth":"deep"}}}`, "recursive_structure_depth"},
		{"partition type missing", `{` + bq(`,"force":false`)[:len(bq(""))-2] + `,"lastUpdatedPartitionConfig":{"expirationMs":"5"}}}}`, "lastUpdatedPartitionConfig.type"},
		{"write disposition unknown", `{` + bq(`,"writeDisposition":"WRITE_SOMETIMES"`) + `}`, "write_disposition"},
		{"unknown top-level field", `{"bogus":1,` + gcs + `}`, `"bogus"`},
		{"unknown nested field", `{"gcsDestination":{"uriPrefix":"gs://bucket/x","path":"y"}}`, `"path" at 'gcs_destination'`},
		{"not JSON", `{"gcsDestination":`, "Invalid JSON payload"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			status, b := rawDo(t, "POST", e.srv.URL+"/v1/"+testStore+":export?alt=json&prettyPrint=false", tc.body)
			var body struct {
				Error struct {
					Code    int
					Message string
					Status  string
				}
			}
			if err := json.Unmarshal(b, &body); err != nil {
				t.Fatalf("%d %s: %v", status, b, err)
			}
			if status != 400 || body.Error.Code != 400 || body.Error.Status != "INVALID_ARGUMENT" || !strings.Contains(body.Error.Message, tc.field) {
				t.Errorf("got %d %s, want 400 INVALID_ARGUMENT naming %q", status, b, tc.field)
			}
		})
	}
	t.Run("through the Go client", func(t *testing.T) {
		_, err := e.export(t, testStore, &healthcare.ExportResourcesRequest{Since: "2024-01-01", GcsDestination: gcsExport("gs://bucket/x").GcsDestination})
		apiErr(t, err, 400, "_since")
	})
	t.Run("unknown store", func(t *testing.T) {
		_, err := e.export(t, testDataset+"/fhirStores/missing", gcsExport("gs://bucket/x"))
		apiErr(t, err, 404, "missing")
	})
	t.Run("unknown dataset", func(t *testing.T) {
		_, err := e.export(t, "projects/test-project/locations/us-central1/datasets/nope/fhirStores/store", gcsExport("gs://bucket/x"))
		apiErr(t, err, 404, "not found")
	})
	t.Run("accepted forms", func(t *testing.T) {
		for _, body := range []string{
			`{"_since":"2015-02-07T13:28:17.239+02:00",` + gcs + `}`,
			`{"_since":"2017-01-01T00:00:00Z","_type":"Patient,Observation",` + gcs + `}`,
			`{"gcs_destination":{"uri_prefix":"gs://bucket/snake"}}`,
			`{` + bq(`,"writeDisposition":"WRITE_APPEND"`) + `}`,
			`{"bigqueryDestination":{"datasetUri":"bq://my-project.ds2","schemaConfig":{"schemaType":"ANALYTICS","recursiveStructureDepth":5,"lastUpdatedPartitionConfig":{"type":"DAY","expirationMs":"86400000"}}}}`,
		} {
			if status, b := rawDo(t, "POST", e.srv.URL+"/v1/"+testStore+":export", body); status != 200 {
				t.Errorf("%s: got %d %s, want 200", body, status, b)
			}
		}
	})
}
