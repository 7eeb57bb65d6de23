package deploy

import (
	"testing"

	"github.com/fhirexport/fhirexport/export"
)

// TestSpecSchemaTimeoutFleetsAndPrintable keeps spec.schema.json in step with
// the function's timeout, fleet and printable-character rules
// (export.Spec.Validate).
func TestSpecSchemaTimeoutFleetsAndPrintable(t *testing.T) {
	s := compileSchemas(t)["spec.schema.json"]
	const (
		store = `"fhirStore":"projects/my-project/locations/l/datasets/d/fhirStores/s"`
		fleet = `"fhirStore":"projects/my-project/locations/l/datasets/d/fhirStores/*"`
		gcs   = `"gcsDestination":{"uriPrefix":"gs://bucket/x/{date}"}`
	)
	bq := func(extra string) string {
		return `"bigqueryDestination":{"datasetUri":"bq://my-project.ds","schemaConfig":{"schemaType":"ANALYTICS_V2"}` + extra + `}`
	}
	tests := []struct {
		name  string
		spec  string
		valid bool
	}{
		{"timeout", `{` + store + `,` + gcs + `,"timeout":"90m"}`, true},
		{"timeout compound", `{` + store + `,` + gcs + `,"timeout":"1h30m"}`, true},
		{"timeout without unit", `{` + store + `,` + gcs + `,"timeout":"90"}`, false},
		{"timeout in days", `{` + store + `,` + gcs + `,"timeout":"1d"}`, false},
		{"timeout a number", `{` + store + `,` + gcs + `,"timeout":5400}`, false},
		{"fleet with store placeholder", `{` + fleet + `,"gcsDestination":{"uriPrefix":"gs://bucket/{store}/{date}"}}`, true},
		{"fleet without store placeholder", `{` + fleet + `,` + gcs + `}`, false},
		{"fleet bq append", `{` + fleet + `,` + bq(`,"writeDisposition":"WRITE_APPEND"`) + `}`, true},
		{"fleet bq default disposition", `{` + fleet + `,` + bq(``) + `}`, false},
		{"fleet bq empty", `{` + fleet + `,` + bq(`,"writeDisposition":"WRITE_EMPTY"`) + `}`, false},
		{"fleet bq truncate", `{` + fleet + `,` + bq(`,"writeDisposition":"WRITE_TRUNCATE"`) + `}`, false},
		{"fleet bq force", `{` + fleet + `,` + bq(`,"writeDisposition":"WRITE_APPEND","force":true`) + `}`, false},
		{"wildcard dataset", `{"fhirStore":"projects/my-project/locations/l/datasets/*/fhirStores/*",` + gcs + `}`, false},
		{"wildcard in a store id", `{"fhirStore":"projects/my-project/locations/l/datasets/d/fhirStores/s*",` + gcs + `}`, false},
		{"store with bidi override", `{"fhirStore":"projects/my-project/locations/l/datasets/d/fhirStores/s\u202e",` + gcs + `}`, false},
		{"label accented", `{` + store + `,` + gcs + `,"labels":{"team":"équipe données"}}`, true},
		{"label bidi override", `{` + store + `,` + gcs + `,"labels":{"team":"a\u202eb"}}`, false},
		{"label zero-width space", `{` + store + `,` + gcs + `,"labels":{"team":"a\u200bb"}}`, false},
		{"label line separator", `{` + store + `,` + gcs + `,"labels":{"team":"a\u2028b"}}`, false},
		{"label paragraph separator", `{` + store + `,` + gcs + `,"labels":{"team":"a\u2029b"}}`, false},
		{"label NEL", `{` + store + `,` + gcs + `,"labels":{"team":"a\u0085b"}}`, false},
		{"label newline", `{` + store + `,` + gcs + `,"labels":{"team":"a\nb"}}`, false},
		{"label key uppercase", `{` + store + `,` + gcs + `,"labels":{"Team":"x"}}`, false},
		{"uriPrefix bidi override", `{` + store + `,"gcsDestination":{"uriPrefix":"gs://bucket/x\u202ey"}}`, false},
		{"uriPrefix percent", `{` + store + `,"gcsDestination":{"uriPrefix":"gs://bucket/x%2Fy"}}`, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := s.Validate(decode(t, tc.spec))
			if tc.valid && err != nil {
				t.Errorf("rejected a valid spec %s:\n%v", tc.spec, err)
			}
			if !tc.valid && err == nil {
				t.Errorf("accepted an invalid spec %s", tc.spec)
			}
			if _, perr := export.ParseSpec([]byte(tc.spec)); (perr == nil) != tc.valid {
				t.Errorf("the function disagrees with the schema on %s: %v", tc.spec, perr)
			}
		})
	}
}
