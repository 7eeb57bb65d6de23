package export

import (
	"bytes"
	"encoding/json"
	"errors"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

// validSpecs seed the fuzzer with specs that parse, so mutations explore the
// validation rules as well as the JSON shape checks.
var validSpecs = []string{
	`{"fhirStore":"projects/test-project/locations/us-central1/datasets/ds/fhirStores/ehr","gcsDestination":{"uriPrefix":"gs://b-1/x"}}`,
	`{"fhirStore":"projects/p-1234/locations/us/datasets/d.s/fhirStores/e_h-r","_type":"Patient,Observation",` +
		`"_since":"2026-01-01T02:00:00.123456+02:00","gcsDestination":{"uriPrefix":"gs://exports-ok/fhir/{dataset}/{store}/{date}/{time}/{run}/"},` +
		`"incremental":true,"name":"nightly","labels":{"team":"data","env":""}}`,
	`{"fhirStore":"projects/p-1234/locations/l/datasets/d/fhirStores/s","_type":"Patient",` +
		`"bigqueryDestination":{"datasetUri":"bq://p-1234.ds","schemaConfig":{"schemaType":"ANALYTICS_V2","recursiveStructureDepth":2,` +
		`"lastUpdatedPartitionConfig":{"type":"DAY","expirationMs":"1000"}},"writeDisposition":"WRITE_APPEND","force":false},"incremental":true}`,
	`{"fhirStore":"projects/p-1234/locations/l/datasets/d/fhirStores/s","bigqueryDestination":{"datasetUri":"bq://example.com:my-proj.ds_1",` +
		`"schemaConfig":{"schemaType":"ANALYTICS","recursiveStructureDepth":null}},"gcsDestination":null,"labels":null}`,
	`{"fhirStore":"projects/p-1234/locations/l/datasets/d/fhirStores/s","gcsDestination":{"uriPrefix":"gs://b-1"},"labels":{}}`,
	`{"fhirStore":"projects/p-1234/locations/l/datasets/d/fhirStores/*","gcsDestination":{"uriPrefix":"gs://b-1/{store}/{date}"},"timeout":"6h30m"}`,
	`{"fhirStore":"projects/p-1234/locations/l/datasets/d/fhirStores/*","bigqueryDestination":{"datasetUri":"bq://p-1234.ds",` +
		`"schemaConfig":{"schemaType":"ANALYTICS"},"writeDisposition":"WRITE_APPEND"},"timeout":"90m","labels":{"team":"données"}}`,
}

// rejectedSpecs seed the fuzzer with specs one rule away from valid: the
// timeout range, fleet destinations, non-printable characters.
var rejectedSpecs = []string{
	`{"fhirStore":"projects/p-1234/locations/l/datasets/d/fhirStores/s","gcsDestination":{"uriPrefix":"gs://b-1"},"timeout":"59s"}`,
	`{"fhirStore":"projects/p-1234/locations/l/datasets/d/fhirStores/*","gcsDestination":{"uriPrefix":"gs://b-1/x"}}`,
	`{"fhirStore":"projects/p-1234/locations/l/datasets/d/fhirStores/*","bigqueryDestination":{"datasetUri":"bq://p-1234.ds",` +
		`"schemaConfig":{"schemaType":"ANALYTICS"},"writeDisposition":"WRITE_TRUNCATE"}}`,
	`{"fhirStore":"projects/p-1234/locations/l/datasets/d/fhirStores/s","gcsDestination":{"uriPrefix":"gs://b-1"},"labels":{"a":"x\u202e"}}`,
	`{"fhirStore":"projects/p-1234/locations/l/datasets/d/fhirStores/s","gcsDestination":{"uriPrefix":"gs://b-1/\u2028"},"x\u0085":1}`,
}

// FuzzParseSpec checks that ParseSpec never panics and that every answer is
// either a spec that survives a JSON round trip unchanged, or a *SpecError
// that says what was wrong about a field that exists (or the whole spec).
func FuzzParseSpec(f *testing.F) {
	for _, tc := range loadBadSpecs(f) {
		f.Add([]byte(tc.Spec))
	}
	for _, s := range append(validSpecs, rejectedSpecs...) {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		spec, err := ParseSpec(data)
		if err != nil {
			if spec != nil {
				t.Fatalf("ParseSpec returned both a spec and an error: %v", err)
			}
			var se *SpecError
			if !errors.As(err, &se) {
				t.Fatalf("ParseSpec error %v (%T) is not a *SpecError", err, err)
			}
			if se.Problem == "" {
				t.Fatalf("SpecError %+v has no Problem", se)
			}
			if !knownFieldPath(se) {
				t.Fatalf("SpecError field %q names no field of a spec (error: %v)", se.Field, err)
			}
			return
		}
		if spec == nil {
			t.Fatal("ParseSpec returned neither a spec nor an error")
		}
		if err := spec.Validate(); err != nil {
			t.Fatalf("parsed spec does not validate: %v", err)
		}
		// Re-marshal without HTML escaping: "<" as \u003c would multiply a
		// label's size by six and could push a valid spec past MaxSpecBytes.
		var buf bytes.Buffer
		enc := json.NewEncoder(&buf)
		enc.SetEscapeHTML(false)
		if err := enc.Encode(spec); err != nil {
			t.Fatalf("marshal parsed spec: %v", err)
		}
		again, err := ParseSpec(buf.Bytes())
		if err != nil {
			t.Fatalf("re-marshalled spec does not parse: %v\ninput: %q\nre-marshalled: %s", err, data, buf.Bytes())
		}
		// An empty labels object and an absent one mean the same; omitempty
		// drops the former.
		if diff := cmp.Diff(spec, again, cmpopts.EquateEmpty()); diff != "" {
			t.Fatalf("round trip changed the spec (-parsed +reparsed):\n%s", diff)
		}
	})
}

// knownFieldPath reports whether a SpecError's Field is "" (the whole spec), a
// declared field path, a label, or (for an unknown field) a key directly
// under a declared object.
func knownFieldPath(se *SpecError) bool {
	f := se.Field
	if f == "" || strings.HasPrefix(f, "labels.") {
		return true
	}
	if _, ok := specFields[f]; ok {
		return true
	}
	// A key holding a character that must not be logged is named escaped
	// (name\u0000), so its field always shows a backslash.
	if strings.HasPrefix(se.Problem, "a field name: ") {
		return strings.Contains(f, `\`)
	}
	// An unknown field: Problem quotes the key, and what precedes it in Field
	// must be the top level or a declared object.
	quoted, ok := strings.CutPrefix(se.Problem, "unknown field ")
	if !ok {
		return false
	}
	quoted, _, ok = strings.Cut(quoted, " (names are case-sensitive)")
	if !ok {
		return false
	}
	key, err := strconv.Unquote(quoted)
	if err != nil {
		return false
	}
	if f == key {
		return true
	}
	parent, ok := strings.CutSuffix(f, "."+key)
	k, declared := specFields[parent]
	return ok && declared && k == kObject
}

// FuzzNameChecks checks every hand-written name check against the regular
// expression it replaced (see regexpEquivalents) on the same input.
func FuzzNameChecks(f *testing.F) {
	for _, tc := range regexpEquivalents {
		for _, s := range tc.seeds {
			f.Add(s)
		}
	}
	res := make([]*regexp.Regexp, len(regexpEquivalents))
	for i, tc := range regexpEquivalents {
		res[i] = regexp.MustCompile(tc.re)
	}
	f.Fuzz(func(t *testing.T, s string) {
		for i, tc := range regexpEquivalents {
			m := res[i].FindStringSubmatch(s)
			want := m != nil && (tc.extra == nil || tc.extra(m))
			if got := tc.check(s); got != want {
				t.Errorf("%s check(%q) = %v, the regexp said %v", tc.name, s, got, want)
			}
		}
	})
}
