package deploy

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/fhirexport/fhirexport/export"
)

// schemaBase is the $id prefix every schema in schemas/ shares; the compiler
// resolves it to the local files, never to the network.
const schemaBase = "https://github.com/fhirexport/fhirexport/deploy/schemas/"

// compileSchemas loads every schema in schemas/ and compiles each one, with
// format assertions on so that date-time and uri are checked too.
func compileSchemas(t *testing.T) map[string]*jsonschema.Schema {
	t.Helper()
	files, err := filepath.Glob("schemas/*.schema.json")
	if err != nil || len(files) == 0 {
		t.Fatalf("no schemas found: %v", err)
	}
	c := jsonschema.NewCompiler()
	c.DefaultDraft(jsonschema.Draft2020)
	c.AssertFormat()
	for _, f := range files {
		doc := readJSON(t, f)
		id, _ := doc.(map[string]any)["$id"].(string)
		if want := schemaBase + filepath.Base(f); id != want {
			t.Fatalf("%s: $id = %q, want %q", f, id, want)
		}
		if err := c.AddResource(id, doc); err != nil {
			t.Fatalf("add %s: %v", f, err)
		}
	}
	out := map[string]*jsonschema.Schema{}
	for _, f := range files {
		s, err := c.Compile(schemaBase + filepath.Base(f))
		if err != nil {
			t.Fatalf("compile %s: %v", f, err)
		}
		out[filepath.Base(f)] = s
	}
	return out
}

func readJSON(t *testing.T, path string) any {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	v, err := jsonschema.UnmarshalJSON(f)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return v
}

func decode(t *testing.T, s string) any {
	t.Helper()
	v, err := jsonschema.UnmarshalJSON(strings.NewReader(s))
	if err != nil {
		t.Fatalf("bad test JSON %s: %v", s, err)
	}
	return v
}

func TestSpecFilesMatchSchema(t *testing.T) {
	schemas := compileSchemas(t)
	files, err := filepath.Glob("specs/*.json")
	if err != nil || len(files) < 2 {
		t.Fatalf("want the example specs in specs/, got %v (%v)", files, err)
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			if err := schemas["spec.schema.json"].Validate(readJSON(t, f)); err != nil {
				t.Errorf("%s does not match spec.schema.json:\n%v", f, err)
			}
		})
	}
}

func TestSchemaExamplesMatchTheirSchema(t *testing.T) {
	schemas := compileSchemas(t)
	want := []string{"spec", "event-data", "started", "succeeded", "partial", "failed", "rejected"}
	for _, name := range want {
		file := name + ".schema.json"
		t.Run(name, func(t *testing.T) {
			s, ok := schemas[file]
			if !ok {
				t.Fatalf("schemas/%s is missing", file)
			}
			doc := readJSON(t, filepath.Join("schemas", file)).(map[string]any)
			examples, _ := doc["examples"].([]any)
			if len(examples) == 0 {
				t.Fatalf("%s has no examples", file)
			}
			for i, ex := range examples {
				if err := s.Validate(ex); err != nil {
					t.Errorf("example %d does not match %s:\n%v", i, file, err)
				}
			}
		})
	}
}

// TestEventSchemasRejectWrongData guards the per-type rules: what each event
// type must carry and must not.
func TestEventSchemasRejectWrongData(t *testing.T) {
	schemas := compileSchemas(t)
	const (
		trig  = `"trigger":{"source":"//pubsub.googleapis.com/projects/p/topics/t","id":"1"}`
		store = `"store":"projects/my-project/locations/l/datasets/d/fhirStores/s"`
		op    = `"operation":"projects/my-project/locations/l/datasets/d/operations/1"`
		times = `"createTime":"2026-03-01T02:00:03Z","endTime":"2026-03-01T02:41:30.5Z"`
	)
	cases := []struct{ name, schema, data string }{
		{"started without operation", "started", `{` + store + `,"destination":"gs://b/x",` + trig + `}`},
		{"started without trigger", "started", `{` + store + `,` + op + `,"destination":"gs://b/x"}`},
		{"started with an error", "started", `{` + store + `,` + op + `,"destination":"gs://b/x",` + trig + `,"error":{"code":2,"message":"x"}}`},
		{"started with a bad destination", "started", `{` + store + `,` + op + `,"destination":"s3://b/x",` + trig + `}`},
		{"started with an operation on the store", "started", `{` + store + `,"operation":"projects/p/locations/l/datasets/d/fhirStores/s/operations/1","destination":"gs://b/x",` + trig + `}`},
		{"succeeded without counters", "succeeded", `{` + store + `,` + op + `,` + times + `,` + trig + `}`},
		{"succeeded with failures", "succeeded", `{` + store + `,` + op + `,` + times + `,` + trig + `,"counters":{"success":1,"failure":1,"pending":0}}`},
		{"succeeded incremental without watermark", "succeeded", `{` + store + `,` + op + `,` + times + `,` + trig + `,"incremental":true,"counters":{"success":1,"failure":0,"pending":0}}`},
		{"succeeded full with watermark", "succeeded", `{` + store + `,` + op + `,` + times + `,` + trig + `,"watermark":"2026-03-01T02:00:03Z","counters":{"success":1,"failure":0,"pending":0}}`},
		{"succeeded with a string counter", "succeeded", `{` + store + `,` + op + `,` + times + `,` + trig + `,"counters":{"success":"1","failure":0,"pending":0}}`},
		{"succeeded with a bad duration", "succeeded", `{` + store + `,` + op + `,` + times + `,` + trig + `,"duration":"12.5","counters":{"success":1,"failure":0,"pending":0}}`},
		{"succeeded with a time without zone", "succeeded", `{` + store + `,` + op + `,"createTime":"2026-03-01T02:00:03","endTime":"2026-03-01T02:41:30Z",` + trig + `,"counters":{"success":1,"failure":0,"pending":0}}`},
		{"partial without failures", "partial", `{` + store + `,` + op + `,` + times + `,` + trig + `,"counters":{"success":1,"failure":0,"pending":0}}`},
		{"partial with watermark", "partial", `{` + store + `,` + op + `,` + times + `,` + trig + `,"watermark":"2026-03-01T02:00:03Z","counters":{"success":1,"failure":2,"pending":0}}`},
		{"failed without error", "failed", `{` + store + `,` + trig + `}`},
		{"failed with operation but no times", "failed", `{` + store + `,` + op + `,` + trig + `,"error":{"code":13,"message":"x"}}`},
		{"failed with an unknown field", "failed", `{` + store + `,` + trig + `,"error":{"code":13,"message":"x"},"status":"INTERNAL"}`},
		{"failed with a code out of range", "failed", `{` + store + `,` + trig + `,"error":{"code":17,"message":"x"}}`},
		{"rejected with operation", "rejected", `{` + op + `,` + trig + `,"error":{"code":3,"message":"x"}}`},
		{"rejected without error", "rejected", `{` + trig + `}`},
		{"rejected without trigger", "rejected", `{"error":{"code":3,"message":"x"}}`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if err := schemas[tc.schema+".schema.json"].Validate(decode(t, tc.data)); err == nil {
				t.Errorf("%s.schema.json accepted %s", tc.schema, tc.data)
			}
		})
	}
}

func TestSpecSchemaRejectsInvalidSpecs(t *testing.T) {
	s := compileSchemas(t)["spec.schema.json"]
	const store = `"fhirStore":"projects/my-project/locations/l/datasets/d/fhirStores/s"`
	const gcs = `"gcsDestination":{"uriPrefix":"gs://bucket/x/{date}"}`
	bq := func(extra string) string {
		if !strings.Contains(extra, "schemaConfig") {
			extra += `,"schemaConfig":{"schemaType":"ANALYTICS_V2"}`
		}
		return `"bigqueryDestination":{"datasetUri":"bq://my-project.ds"` + extra + `}`
	}
	valid := []struct{ name, spec string }{
		{"gcs minimal", `{` + store + `,` + gcs + `}`},
		{"bq minimal", `{` + store + `,` + bq("") + `}`},
		{"incremental bq append", `{` + store + `,"incremental":true,` + bq(`,"writeDisposition":"WRITE_APPEND"`) + `}`},
		{"incremental gcs", `{` + store + `,"incremental":true,` + gcs + `}`},
		{"non-incremental truncate", `{` + store + `,` + bq(`,"writeDisposition":"WRITE_TRUNCATE","force":true`) + `}`},
		{"expirationMs as number", `{` + store + `,` + bq(`,"schemaConfig":{"schemaType":"ANALYTICS","lastUpdatedPartitionConfig":{"type":"HOUR","expirationMs":86400000}}`) + `}`},
		{"since with offset", `{` + store + `,"_since":"2026-01-01T00:00:00+01:00",` + gcs + `}`},
	}
	for _, tc := range valid {
		t.Run("valid/"+tc.name, func(t *testing.T) {
			if err := s.Validate(decode(t, tc.spec)); err != nil {
				t.Errorf("rejected a valid spec %s:\n%v", tc.spec, err)
			}
			if _, err := export.ParseSpec([]byte(tc.spec)); err != nil {
				t.Errorf("the schema accepts %s, the function does not: %v", tc.spec, err)
			}
		})
	}
	invalid := []struct{ name, spec string }{
		{"empty", `{}`},
		{"not an object", `[]`},
		{"no store", `{` + gcs + `}`},
		{"no destination", `{` + store + `}`},
		{"both destinations", `{` + store + `,` + gcs + `,` + bq("") + `}`},
		{"unknown field", `{` + store + `,` + gcs + `,"fhir_store":"x"}`},
		{"typo in destination", `{` + store + `,"gcsDestination":{"uriprefix":"gs://b/x"}}`},
		{"store is a dataset", `{"fhirStore":"projects/p/locations/l/datasets/d",` + gcs + `}`},
		{"store with spaces", `{"fhirStore":"projects/p/locations/l/datasets/d/fhirStores/s t",` + gcs + `}`},
		{"store not a string", `{"fhirStore":42,` + gcs + `}`},
		{"uriPrefix not gs", `{` + store + `,"gcsDestination":{"uriPrefix":"s3://bucket/x"}}`},
		{"unknown placeholder", `{` + store + `,"gcsDestination":{"uriPrefix":"gs://bucket/{project}"}}`},
		{"datasetUri without bq", `{` + store + `,"bigqueryDestination":{"datasetUri":"my-project.ds"}}`},
		{"datasetUri with table", `{` + store + `,"bigqueryDestination":{"datasetUri":"bq://my-project.ds.table"}}`},
		{"since without zone", `{` + store + `,"_since":"2026-01-01T00:00:00",` + gcs + `}`},
		{"since a date", `{` + store + `,"_since":"2026-01-01",` + gcs + `}`},
		{"since impossible date", `{` + store + `,"_since":"2026-02-30T00:00:00Z",` + gcs + `}`},
		{"type lowercase", `{` + store + `,"_type":"patient",` + gcs + `}`},
		{"type with spaces", `{` + store + `,"_type":"Patient, Observation",` + gcs + `}`},
		{"type array", `{` + store + `,"_type":["Patient"],` + gcs + `}`},
		{"incremental string", `{` + store + `,"incremental":"true",` + gcs + `}`},
		{"name uppercase", `{` + store + `,"name":"Nightly",` + gcs + `}`},
		{"name too long", `{` + store + `,"name":"` + strings.Repeat("a", 64) + `",` + gcs + `}`},
		{"label not a string", `{` + store + `,"labels":{"n":1},` + gcs + `}`},
		{"schemaType unknown", `{` + store + `,` + bq(`,"schemaConfig":{"schemaType":"ANALYTICS_V3"}`) + `}`},
		{"schemaType lossless", `{` + store + `,` + bq(`,"schemaConfig":{"schemaType":"LOSSLESS"}`) + `}`},
		{"no schemaConfig", `{` + store + `,"bigqueryDestination":{"datasetUri":"bq://my-project.ds"}}`},
		{"schemaConfig without schemaType", `{` + store + `,` + bq(`,"schemaConfig":{}`) + `}`},
		{"depth too deep", `{` + store + `,` + bq(`,"schemaConfig":{"recursiveStructureDepth":6}`) + `}`},
		{"partition type unknown", `{` + store + `,` + bq(`,"schemaConfig":{"lastUpdatedPartitionConfig":{"type":"WEEK"}}`) + `}`},
		{"partition without type", `{` + store + `,` + bq(`,"schemaConfig":{"lastUpdatedPartitionConfig":{"expirationMs":"0"}}`) + `}`},
		{"expirationMs not a number", `{` + store + `,` + bq(`,"schemaConfig":{"lastUpdatedPartitionConfig":{"type":"DAY","expirationMs":"1d"}}`) + `}`},
		{"writeDisposition unknown", `{` + store + `,` + bq(`,"writeDisposition":"APPEND"`) + `}`},
		{"force a string", `{` + store + `,` + bq(`,"force":"false"`) + `}`},
		{"incremental bq without disposition", `{` + store + `,"incremental":true,` + bq("") + `}`},
		{"incremental bq truncate", `{` + store + `,"incremental":true,` + bq(`,"writeDisposition":"WRITE_TRUNCATE"`) + `}`},
		{"incremental bq empty", `{` + store + `,"incremental":true,` + bq(`,"writeDisposition":"WRITE_EMPTY"`) + `}`},
		{"incremental bq force", `{` + store + `,"incremental":true,` + bq(`,"writeDisposition":"WRITE_APPEND","force":true`) + `}`},
	}
	for _, tc := range invalid {
		t.Run("invalid/"+tc.name, func(t *testing.T) {
			if err := s.Validate(decode(t, tc.spec)); err == nil {
				t.Errorf("accepted an invalid spec %s", tc.spec)
			}
			if _, err := export.ParseSpec([]byte(tc.spec)); err == nil {
				t.Errorf("the schema refuses %s, the function accepts it", tc.spec)
			}
		})
	}
}

// TestSchemasAreWellFormedJSON catches a broken file before the other tests
// report it less clearly.
func TestSchemasAreWellFormedJSON(t *testing.T) {
	files, _ := filepath.Glob("schemas/*.json")
	specs, _ := filepath.Glob("specs/*.json")
	for _, f := range append(files, specs...) {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if !json.Valid(b) {
			t.Errorf("%s is not valid JSON", f)
		}
	}
}
