package export

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// badSpec is one case of testdata/bad_specs.json, shared with the end-to-end
// tests and the fuzz seed corpus.
type badSpec struct {
	Name  string `json:"name"`
	Spec  string `json:"spec"`
	Field string `json:"field"`
}

func loadBadSpecs(t testing.TB) []badSpec {
	t.Helper()
	data, err := os.ReadFile("testdata/bad_specs.json")
	if err != nil {
		t.Fatal(err)
	}
	var cases []badSpec
	if err := json.Unmarshal(data, &cases); err != nil {
		t.Fatal(err)
	}
	return cases
}

func TestParseSpecRejects(t *testing.T) {
	t.Parallel()
	for _, tc := range loadBadSpecs(t) {
		t.Run(tc.Name, func(t *testing.T) {
			t.Parallel()
			_, err := ParseSpec([]byte(tc.Spec))
			var se *SpecError
			if !errors.As(err, &se) {
				t.Fatalf("ParseSpec(%s) = %v, want a *SpecError", tc.Spec, err)
			}
			if se.Field != tc.Field {
				t.Errorf("field = %q, want %q (error: %v)", se.Field, tc.Field, err)
			}
			if se.Problem == "" || (se.Accepted == "" && tc.Field != "") {
				t.Errorf("error %q does not say what was wrong and what is accepted", err)
			}
		})
	}
}

func TestParseSpecAccepts(t *testing.T) {
	t.Parallel()
	const store = "projects/test-project/locations/us-central1/datasets/ds/fhirStores/ehr"
	tests := []struct {
		name string
		spec string
		want Spec
	}{
		{
			name: "minimal gcs",
			spec: `{"fhirStore":"` + store + `","gcsDestination":{"uriPrefix":"gs://b-1/x"}}`,
			want: Spec{FHIRStore: store, GCSDestination: &GCSDestination{URIPrefix: "gs://b-1/x"}},
		},
		{
			name: "every field, bigquery, int64 as string and number",
			spec: `{"fhirStore":"` + store + `","_type":"Patient,Observation","_since":"2026-01-01T02:00:00.123456+02:00",
				"bigqueryDestination":{"datasetUri":"bq://test-project.analytics","schemaConfig":{"schemaType":"ANALYTICS_V2",
				"recursiveStructureDepth":"3","lastUpdatedPartitionConfig":{"type":"DAY","expirationMs":86400000}},
				"writeDisposition":"WRITE_APPEND","force":false},"incremental":true,"name":"hourly-bq","labels":{"team":"data"}}`,
			want: Spec{FHIRStore: store, Type: "Patient,Observation", Since: "2026-01-01T02:00:00.123456+02:00",
				BigQueryDestination: &BigQueryDestination{DatasetURI: "bq://test-project.analytics",
					SchemaConfig: &SchemaConfig{SchemaType: "ANALYTICS_V2", RecursiveStructureDepth: 3,
						LastUpdatedPartitionConfig: &TimePartitioning{Type: "DAY", ExpirationMs: 86400000}},
					WriteDisposition: "WRITE_APPEND"},
				Incremental: true, Name: "hourly-bq", Labels: map[string]string{"team": "data"}},
		},
		{
			name: "null means unset",
			spec: `{"fhirStore":"` + store + `","bigqueryDestination":null,"_type":null,"gcsDestination":{"uriPrefix":"gs://b-1/{store}/{date}/{time}/{run}/{dataset}"}}`,
			want: Spec{FHIRStore: store, GCSDestination: &GCSDestination{URIPrefix: "gs://b-1/{store}/{date}/{time}/{run}/{dataset}"}},
		},
		{
			name: "domain-scoped project in dataset uri",
			spec: `{"fhirStore":"` + store + `","bigqueryDestination":{"datasetUri":"bq://example.com:my-proj.ds_1","schemaConfig":{"schemaType":"ANALYTICS"}}}`,
			want: Spec{FHIRStore: store, BigQueryDestination: &BigQueryDestination{DatasetURI: "bq://example.com:my-proj.ds_1", SchemaConfig: &SchemaConfig{SchemaType: "ANALYTICS"}}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := ParseSpec([]byte(tc.spec))
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, *got); diff != "" {
				t.Errorf("ParseSpec mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

func TestExpandURIPrefix(t *testing.T) {
	t.Parallel()
	at := time.Date(2026, 11, 26, 23, 4, 5, 0, time.FixedZone("x", 3*3600))
	got := ExpandURIPrefix("gs://b/{dataset}/{store}/{date}/{time}-{run}", "projects/p/locations/l/datasets/ds/fhirStores/ehr", "r1", at)
	if want := "gs://b/ds/ehr/2026-11-26/200405-r1"; got != want {
		t.Errorf("ExpandURIPrefix = %q, want %q (UTC)", got, want)
	}
}

// TestExportRequestWire checks the exact JSON the Go client sends for a spec.
func TestExportRequestWire(t *testing.T) {
	t.Parallel()
	spec, err := ParseSpec([]byte(`{"fhirStore":"projects/p-1234/locations/l/datasets/d/fhirStores/s","_type":"Patient",
		"bigqueryDestination":{"datasetUri":"bq://p-1234.ds","schemaConfig":{"schemaType":"ANALYTICS_V2","recursiveStructureDepth":2,
		"lastUpdatedPartitionConfig":{"type":"DAY","expirationMs":"1000"}},"writeDisposition":"WRITE_APPEND"},"incremental":true}`))
	if err != nil {
		t.Fatal(err)
	}
	got, err := json.Marshal(ExportRequest(spec, "bq://p-1234.ds", "2026-01-01T00:00:00.5Z"))
	if err != nil {
		t.Fatal(err)
	}
	want := `{"_since":"2026-01-01T00:00:00.5Z","_type":"Patient","bigqueryDestination":{"datasetUri":"bq://p-1234.ds",` +
		`"schemaConfig":{"lastUpdatedPartitionConfig":{"expirationMs":"1000","type":"DAY"},"recursiveStructureDepth":"2",` +
		`"schemaType":"ANALYTICS_V2"},"writeDisposition":"WRITE_APPEND"}}`
	if string(got) != want {
		t.Errorf("request JSON\n got %s\nwant %s", got, want)
	}
}

func TestSpecErrorMessage(t *testing.T) {
	t.Parallel()
	_, err := ParseSpec([]byte(`{"fhirStore":"projects/p-1234/locations/l/datasets/d/fhirStores/s","gcsDestination":{"uriPrefix":"gs://b-1/x"},"_since":"2026-01-01"}`))
	for _, want := range []string{"_since", `"2026-01-01"`, "accepted: RFC 3339"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v does not contain %q", err, want)
		}
	}
}

// TestDeploySpecsParse keeps the example specs in deploy/specs acceptable to
// the function itself, not only to the JSON Schema.
func TestDeploySpecsParse(t *testing.T) {
	t.Parallel()
	files, err := filepath.Glob("../deploy/specs/*.json")
	if err != nil || len(files) == 0 {
		t.Fatalf("no example specs: %v", err)
	}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ParseSpec(data); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}
}
