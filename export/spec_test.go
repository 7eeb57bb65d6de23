package export

import (
	"bytes"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode"

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

// regexpEquivalents are the regular expressions the hand-written name checks
// replaced (issue 13), with seeds near their edges. Each check must answer as
// its expression did.
var regexpEquivalents = []struct {
	name  string
	re    string
	extra func(m []string) bool // further conditions the old code applied to the match
	check func(string) bool
	seeds []string
}{
	{
		name:  "store",
		re:    `^projects/([a-z0-9][a-z0-9.:-]{0,62}[a-z0-9])/locations/([a-z0-9][a-z0-9-]{0,62})/datasets/([\p{L}\p{N}_\-.]{1,256})/fhirStores/([\p{L}\p{N}_\-.]{1,256})$`,
		extra: func(m []string) bool { return m[3] != "." && m[3] != ".." && m[4] != "." && m[4] != ".." },
		check: func(s string) bool { return validStoreName(s, false) },
		seeds: []string{"projects/p-1/locations/us/datasets/d.s/fhirStores/e_h-r", "projects/p-1/locations/us/datasets/病院/fhirStores/süd-klinik", "projects/p-1/locations/us/datasets/d/fhirStores/" + strings.Repeat("ü", 256), "projects/p-1/locations/us/datasets/d/fhirStores/" + strings.Repeat("ü", 257), "projects/p-1/locations/us/datasets/d/fhirStores/a²½", "projects/example.com:p/locations/l/datasets/../fhirStores/.",
			"projects/pp/locations/a/datasets/" + strings.Repeat("D", 256) + "/fhirStores/" + strings.Repeat("s", 257), "projects/p/locations/l/datasets/d/fhirStores/*"},
	},
	{
		name:  "since",
		re:    `^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$`,
		check: validSinceShape,
		seeds: []string{"2026-01-01T00:00:00Z", "2026-01-01T02:00:00.123456789+02:00", "2026-01-01T00:00:00.1234567890Z", "2026-01-01T00:00:00.Z", "2026-01-01T00:00:00-0100"},
	},
	{
		name:  "bucket",
		re:    `^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$`,
		check: validBucket,
		seeds: []string{"b-1", "ab", "a.b_c-d", strings.Repeat("a", 222), strings.Repeat("a", 223), "-ab", "ab-"},
	},
	{
		name:  "dataset uri",
		re:    `^bq://((?:[a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9])\.([A-Za-z0-9_]{1,1000})$`,
		check: validDatasetURI,
		seeds: []string{"bq://p-1234.ds", "bq://example.com:my-proj.ds_1", "bq://a:b:my-proj.ds", "bq://:my-proj.ds", "bq://my-proj.ds.t",
			"bq://my-proj." + strings.Repeat("x", 1000), "bq://abcde.x", "bq://" + strings.Repeat("a", 30) + ".x", "bq://my-proj."},
	},
	{
		name:  "name",
		re:    `^[a-z0-9][a-z0-9._-]{0,62}$`,
		check: validName,
		seeds: []string{"a", "nightly-analytics", "0.x_y", strings.Repeat("a", 63), strings.Repeat("a", 64), "_a", "A"},
	},
	{
		name:  "label key",
		re:    `^[a-z][a-z0-9_-]{0,62}$`,
		check: validLabelKey,
		seeds: []string{"a", "team", "a-b_c0", strings.Repeat("a", 63), strings.Repeat("a", 64), "0a", "a.b"},
	},
	{
		name:  "type",
		re:    `^[A-Z][A-Za-z]{1,63}$`,
		check: validTypeName,
		seeds: []string{"Patient", "Ab", "A", "aB", "P" + strings.Repeat("a", 63), "P" + strings.Repeat("a", 64), "Pat1ent"},
	},
	{
		name:  "topic",
		re:    `^projects/[a-z0-9][a-z0-9.:-]{0,62}[a-z0-9]/topics/[A-Za-z][A-Za-z0-9._~%+-]{2,254}$`,
		check: validTopic,
		seeds: []string{"projects/p-1/topics/fhirexport-events", "projects/example.com:p/topics/a%2B~.+-", "projects/p/topics/t", "projects/pp/topics/abc",
			"projects/pp/topics/T" + strings.Repeat("x", 254), "projects/pp/topics/T" + strings.Repeat("x", 253), "projects/pp/topics/1ab", "projects/pp/topics/a/b"},
	},
}

// TestNameChecksMatchRegexps compares each hand-written check with the
// regular expression it replaced, on its seeds and on many random mutations
// of them (a fixed random seed, so a failure reproduces).
func TestNameChecksMatchRegexps(t *testing.T) {
	t.Parallel()
	const alphabet = "aAzZ09._-:/*%~+{}TZ bq"
	for _, tc := range regexpEquivalents {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			re := regexp.MustCompile(tc.re)
			old := func(s string) bool {
				m := re.FindStringSubmatch(s)
				return m != nil && (tc.extra == nil || tc.extra(m))
			}
			compare := func(s string) {
				t.Helper()
				if got, want := tc.check(s), old(s); got != want {
					t.Fatalf("check(%q) = %v, the regexp said %v", s, got, want)
				}
			}
			rng := rand.New(rand.NewPCG(1, uint64(len(tc.name))))
			extras := []string{"", "é", "\u202e", "\n", "//"}
			for _, s := range tc.seeds {
				compare(s)
			}
			for range 20000 {
				b := []byte(tc.seeds[rng.IntN(len(tc.seeds))])
				for range 1 + rng.IntN(4) {
					pos := 0
					if len(b) > 0 {
						pos = rng.IntN(len(b))
					}
					switch rng.IntN(5) {
					case 0: // replace a byte
						if len(b) > 0 {
							b[pos] = alphabet[rng.IntN(len(alphabet))]
						}
					case 1: // insert a byte
						b = slices.Insert(b, pos, alphabet[rng.IntN(len(alphabet))])
					case 2: // delete a run
						b = slices.Delete(b, pos, min(len(b), pos+1+rng.IntN(3)))
					case 3: // repeat a byte, to cross the length bounds
						if len(b) > 0 {
							b = slices.Insert(b, pos, bytes.Repeat(b[pos:pos+1], rng.IntN(300))...)
						}
					case 4: // insert a multi-byte or separator string
						b = slices.Insert(b, pos, []byte(extras[rng.IntN(len(extras))])...)
					}
				}
				compare(string(b))
			}
		})
	}
}

// TestSpecRules covers the timeout, fleet and printable-character rules: each
// spec is rejected naming the field, or accepted.
func TestSpecRules(t *testing.T) {
	t.Parallel()
	const (
		store = `"fhirStore":"projects/p-1234/locations/l/datasets/d/fhirStores/s"`
		fleet = `"fhirStore":"projects/p-1234/locations/l/datasets/d/fhirStores/*"`
		gcs   = `"gcsDestination":{"uriPrefix":"gs://b-1/x/{date}"}`
		valid = "(valid)"
	)
	bq := func(extra string) string {
		return `"bigqueryDestination":{"datasetUri":"bq://p-1234.ds","schemaConfig":{"schemaType":"ANALYTICS_V2"}` + extra + `}`
	}
	tests := []struct {
		name      string
		spec      string
		wantField string // valid when the spec is accepted
	}{
		{"timeout minutes", `{` + store + `,` + gcs + `,"timeout":"90m"}`, valid},
		{"timeout hours and minutes", `{` + store + `,` + gcs + `,"timeout":"6h30m"}`, valid},
		{"timeout exactly a minute", `{` + store + `,` + gcs + `,"timeout":"1m"}`, valid},
		{"timeout exactly 7 days", `{` + store + `,` + gcs + `,"timeout":"168h"}`, valid},
		{"timeout null", `{` + store + `,` + gcs + `,"timeout":null}`, valid},
		{"timeout under a minute", `{` + store + `,` + gcs + `,"timeout":"59s"}`, "timeout"},
		{"timeout zero", `{` + store + `,` + gcs + `,"timeout":"0s"}`, "timeout"},
		{"timeout negative", `{` + store + `,` + gcs + `,"timeout":"-1h"}`, "timeout"},
		{"timeout over 7 days", `{` + store + `,` + gcs + `,"timeout":"168h1s"}`, "timeout"},
		{"timeout without unit", `{` + store + `,` + gcs + `,"timeout":"90"}`, "timeout"},
		{"timeout in days", `{` + store + `,` + gcs + `,"timeout":"1d"}`, "timeout"},
		{"timeout a number", `{` + store + `,` + gcs + `,"timeout":5400}`, "timeout"},
		{"timeout with a bidi override", `{` + store + `,` + gcs + `,"timeout":"6h\u202e"}`, "timeout"},

		{"fleet gcs with store", `{` + fleet + `,"gcsDestination":{"uriPrefix":"gs://b-1/x/{store}/{date}"}}`, valid},
		{"fleet gcs without store", `{` + fleet + `,` + gcs + `}`, "gcsDestination.uriPrefix"},
		{"fleet gcs with dataset only", `{` + fleet + `,"gcsDestination":{"uriPrefix":"gs://b-1/{dataset}"}}`, "gcsDestination.uriPrefix"},
		{"fleet bq append", `{` + fleet + `,` + bq(`,"writeDisposition":"WRITE_APPEND"`) + `}`, valid},
		{"fleet bq default disposition", `{` + fleet + `,` + bq(``) + `}`, "bigqueryDestination.writeDisposition"},
		{"fleet bq empty", `{` + fleet + `,` + bq(`,"writeDisposition":"WRITE_EMPTY"`) + `}`, "bigqueryDestination.writeDisposition"},
		{"fleet bq truncate", `{` + fleet + `,` + bq(`,"writeDisposition":"WRITE_TRUNCATE"`) + `}`, "bigqueryDestination.writeDisposition"},
		{"fleet bq append with force", `{` + fleet + `,` + bq(`,"writeDisposition":"WRITE_APPEND","force":true`) + `}`, "bigqueryDestination.force"},
		{"single store bq truncate", `{` + store + `,` + bq(`,"writeDisposition":"WRITE_TRUNCATE","force":true`) + `}`, valid},
		{"wildcard dataset", `{"fhirStore":"projects/p-1234/locations/l/datasets/*/fhirStores/*",` + gcs + `}`, "fhirStore"},
		{"wildcard inside a store id", `{"fhirStore":"projects/p-1234/locations/l/datasets/d/fhirStores/s*",` + gcs + `}`, "fhirStore"},

		{"label with bidi override", `{` + store + `,` + gcs + `,"labels":{"team":"data\u202etxt"}}`, "labels.team"},
		{"label with zero-width space", `{` + store + `,` + gcs + `,"labels":{"team":"da\u200bta"}}`, "labels.team"},
		{"label with line separator", `{` + store + `,` + gcs + `,"labels":{"team":"a\u2028b"}}`, "labels.team"},
		{"label with paragraph separator", `{` + store + `,` + gcs + `,"labels":{"team":"a\u2029b"}}`, "labels.team"},
		{"label with NEL", `{` + store + `,` + gcs + `,"labels":{"team":"a\u0085b"}}`, "labels.team"},
		{"label with BOM", `{` + store + `,` + gcs + `,"labels":{"team":"\ufeffa"}}`, "labels.team"},
		{"label with C1 control", `{` + store + `,` + gcs + `,"labels":{"team":"a\u009bb"}}`, "labels.team"},
		{"label with DEL", `{` + store + `,` + gcs + `,"labels":{"team":"a\u007fb"}}`, "labels.team"},
		{"label with tab", `{` + store + `,` + gcs + `,"labels":{"team":"a\tb"}}`, "labels.team"},
		{"label with accents and emoji", `{` + store + `,` + gcs + `,"labels":{"team":"équipe données 🚀"}}`, valid},
		{"label key with bidi override", `{` + store + `,` + gcs + `,"labels":{"te\u202eam":"x"}}`, `labels.te\u202eam`},
		{"unknown field with bidi override", `{` + store + `,` + gcs + `,"x\u202e":1}`, `x\u202e`},
		{"unknown nested field with NEL", `{` + store + `,"gcsDestination":{"uriPrefix":"gs://b-1/x","\u0085":1}}`, `gcsDestination.\u0085`},
		{"key name followed by NUL", `{` + store + `,` + gcs + `,"name\u0000":"x"}`, `name\u0000`},
		{"key with a backslash and a control", `{` + store + `,` + gcs + `,"a\\u0000\u0001":"x"}`, `a\\u0000\u0001`},
		{"store id in another script", `{"fhirStore":"projects/p-1234/locations/l/datasets/d/fhirStores/süd-klinik",` + gcs + `}`, valid},
		{"store id in CJK", `{"fhirStore":"projects/p-1234/locations/l/datasets/病院/fhirStores/病院-7",` + gcs + `}`, valid},
		{"store id of 256 characters", `{"fhirStore":"projects/p-1234/locations/l/datasets/d/fhirStores/` + strings.Repeat("ü", 256) + `",` + gcs + `}`, valid},
		{"store id of 257 characters", `{"fhirStore":"projects/p-1234/locations/l/datasets/d/fhirStores/` + strings.Repeat("ü", 257) + `",` + gcs + `}`, "fhirStore"},
		{"store id with a symbol", `{"fhirStore":"projects/p-1234/locations/l/datasets/d/fhirStores/a+b",` + gcs + `}`, "fhirStore"},
		{"store id with a space", `{"fhirStore":"projects/p-1234/locations/l/datasets/d/fhirStores/a b",` + gcs + `}`, "fhirStore"},
		{"name with bidi override", `{` + store + `,` + gcs + `,"name":"night\u202ely"}`, "name"},
		{"uriPrefix with bidi override", `{` + store + `,"gcsDestination":{"uriPrefix":"gs://b-1/x\u202e/y"}}`, "gcsDestination.uriPrefix"},
		{"uriPrefix with zero-width space", `{` + store + `,"gcsDestination":{"uriPrefix":"gs://b-1/x\u200by"}}`, "gcsDestination.uriPrefix"},
		{"uriPrefix with line separator", `{` + store + `,"gcsDestination":{"uriPrefix":"gs://b-1/x\u2028y"}}`, "gcsDestination.uriPrefix"},
		{"uriPrefix with accents", `{` + store + `,"gcsDestination":{"uriPrefix":"gs://b-1/données"}}`, valid},
		{"datasetUri with bidi override", `{` + store + `,"bigqueryDestination":{"datasetUri":"bq://p-1234.d\u202es","schemaConfig":{"schemaType":"ANALYTICS"}}}`, "bigqueryDestination.datasetUri"},
		{"type with zero-width space", `{` + store + `,` + gcs + `,"_type":"Patient\u200b"}`, "_type"},
		{"store with bidi override", `{"fhirStore":"projects/p-1234/locations/l/datasets/d/fhirStores/s\u202e",` + gcs + `}`, "fhirStore"},
		{"since with NEL", `{` + store + `,` + gcs + `,"_since":"2026-01-01T00:00:00Z\u0085"}`, "_since"},

		{"deleted prefix on incremental bq", `{` + store + `,` + bq(`,"writeDisposition":"WRITE_APPEND"`) + `,"incremental":true,"deletedUriPrefix":"gs://b-1/deleted/{store}"}`, valid},
		{"deleted prefix on a bq fleet", `{` + fleet + `,` + bq(`,"writeDisposition":"WRITE_APPEND"`) + `,"incremental":true,"deletedUriPrefix":"gs://b-1/deleted"}`, valid},
		{"deleted prefix on full bq", `{` + store + `,` + bq(`,"writeDisposition":"WRITE_APPEND"`) + `,"deletedUriPrefix":"gs://b-1/deleted"}`, "deletedUriPrefix"},
		{"deleted prefix on gcs", `{` + store + `,` + gcs + `,"incremental":true,"deletedUriPrefix":"gs://b-1/deleted"}`, "deletedUriPrefix"},
		{"deleted prefix not gs", `{` + store + `,` + bq(`,"writeDisposition":"WRITE_APPEND"`) + `,"incremental":true,"deletedUriPrefix":"s3://b-1/deleted"}`, "deletedUriPrefix"},
		{"deleted prefix with dot-dot", `{` + store + `,` + bq(`,"writeDisposition":"WRITE_APPEND"`) + `,"incremental":true,"deletedUriPrefix":"gs://b-1/a/../b"}`, "deletedUriPrefix"},
		{"deleted prefix with bidi override", `{` + store + `,` + bq(`,"writeDisposition":"WRITE_APPEND"`) + `,"incremental":true,"deletedUriPrefix":"gs://b-1/x\u202e"}`, "deletedUriPrefix"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := ParseSpec([]byte(tc.spec))
			if tc.wantField == valid {
				if err != nil {
					t.Fatalf("ParseSpec(%s) = %v, want it accepted", tc.spec, err)
				}
				return
			}
			var se *SpecError
			if !errors.As(err, &se) {
				t.Fatalf("ParseSpec(%s) = %v, want a *SpecError", tc.spec, err)
			}
			if se.Field != tc.wantField {
				t.Errorf("field = %q, want %q (error: %v)", se.Field, tc.wantField, err)
			}
			if se.Accepted == "" {
				t.Errorf("error %q does not say what is accepted", err)
			}
			// Nothing that could hide or reorder text reaches the message.
			if msg := err.Error(); strings.ContainsFunc(msg, func(r rune) bool { return r >= 0x80 && !unicode.IsPrint(r) || r < 0x20 }) {
				t.Errorf("error message carries a non-printable character: %q", msg)
			}
		})
	}
}

// TestCheckPrintable pins the characters the printable rule refuses,
// including invalid UTF-8, which JSON decoding would have replaced.
func TestCheckPrintable(t *testing.T) {
	t.Parallel()
	tests := []struct {
		value string
		ok    bool
	}{
		{"plain ASCII text", true},
		{"é ü 中文 🚀 \ufffd", true},
		{"\x00", false},
		{"a\x1fb", false},
		{"\x7f", false},
		{"\u0085", false},
		{"\u009f", false},
		{"\u00ad", false}, // soft hyphen, Cf
		{"\u200b", false},
		{"\u200e", false},
		{"\u202a", false},
		{"\u202e", false},
		{"\u2066", false},
		{"\ufeff", false},
		{"\u2028", false},
		{"\u2029", false},
		{"\xff", false},
		{"a\xe2\x80", false}, // truncated
	}
	for _, tc := range tests {
		t.Run(strconv.QuoteToASCII(tc.value), func(t *testing.T) {
			t.Parallel()
			err := checkPrintable("labels.x", tc.value)
			if (err == nil) != tc.ok {
				t.Fatalf("checkPrintable(%q) = %v, want ok=%v", tc.value, err, tc.ok)
			}
			if err != nil && (err.Field != "labels.x" || err.Accepted == "") {
				t.Errorf("error %+v does not name the field and what is accepted", err)
			}
		})
	}
}

func TestTimeoutDuration(t *testing.T) {
	t.Parallel()
	tests := []struct {
		timeout string
		want    time.Duration
	}{
		{"", DefaultTimeout},
		{"90m", 90 * time.Minute},
		{"6h", 6 * time.Hour},
		{"168h", 7 * 24 * time.Hour},
		{"oops", DefaultTimeout},
	}
	for _, tc := range tests {
		t.Run(tc.timeout, func(t *testing.T) {
			t.Parallel()
			s := &Spec{Timeout: tc.timeout}
			if got := s.TimeoutDuration(); got != tc.want {
				t.Errorf("Spec{Timeout: %q}.TimeoutDuration() = %v, want %v", tc.timeout, got, tc.want)
			}
		})
	}
	if DefaultTimeout < 6*time.Hour {
		t.Errorf("DefaultTimeout = %v: multi-hour exports would be cancelled", DefaultTimeout)
	}
}

func TestFleet(t *testing.T) {
	t.Parallel()
	const dataset = "projects/p-1234/locations/l/datasets/d"
	tests := []struct {
		store       string
		wantFleet   bool
		wantDataset string
	}{
		{dataset + "/fhirStores/*", true, dataset},
		{dataset + "/fhirStores/s", false, dataset},
		{"", false, ""},
	}
	for _, tc := range tests {
		t.Run(tc.store, func(t *testing.T) {
			t.Parallel()
			s := &Spec{FHIRStore: tc.store}
			if got := s.IsFleet(); got != tc.wantFleet {
				t.Errorf("IsFleet() = %v, want %v", got, tc.wantFleet)
			}
			if got := s.Dataset(); got != tc.wantDataset {
				t.Errorf("Dataset() = %q, want %q", got, tc.wantDataset)
			}
		})
	}
}

// TestForStore checks that ForStore copies deeply: every pointer and map of
// the copy is new, so changing one store's spec cannot change another's.
func TestForStore(t *testing.T) {
	t.Parallel()
	fleet, err := ParseSpec([]byte(`{"fhirStore":"projects/p-1234/locations/l/datasets/d/fhirStores/*","_type":"Patient",
		"bigqueryDestination":{"datasetUri":"bq://p-1234.ds","schemaConfig":{"schemaType":"ANALYTICS_V2",
		"lastUpdatedPartitionConfig":{"type":"DAY"}},"writeDisposition":"WRITE_APPEND"},"labels":{"team":"data"},"timeout":"2h"}`))
	if err != nil {
		t.Fatal(err)
	}
	// A GCS destination too, which no valid spec has beside a BigQuery one,
	// so that both pointers are checked.
	fleet.GCSDestination = &GCSDestination{URIPrefix: "gs://b-1/{store}"}
	before := fleet.ForStore(fleet.FHIRStore) // a reference copy

	const store = "projects/p-1234/locations/l/datasets/d/fhirStores/ehr"
	got := fleet.ForStore(store)
	if got.FHIRStore != store || got.IsFleet() {
		t.Fatalf("ForStore(%q).FHIRStore = %q", store, got.FHIRStore)
	}
	want := *before
	want.FHIRStore = store
	if diff := cmp.Diff(&want, got); diff != "" {
		t.Errorf("ForStore changed more than the store (-want +got):\n%s", diff)
	}
	if shared := sharedReferences(reflect.ValueOf(fleet).Elem(), reflect.ValueOf(got).Elem(), "Spec"); len(shared) > 0 {
		t.Errorf("ForStore shares %v with the original", shared)
	}
	// Writing through the copy leaves the fleet spec as it was.
	got.Labels["team"] = "other"
	got.BigQueryDestination.SchemaConfig.LastUpdatedPartitionConfig.Type = "HOUR"
	got.GCSDestination.URIPrefix = "gs://evil"
	if diff := cmp.Diff(before, fleet.ForStore(fleet.FHIRStore)); diff != "" {
		t.Errorf("writing through ForStore's copy changed the original (-before +after):\n%s", diff)
	}
}

// sharedReferences lists the paths at which a and b hold the same non-nil
// pointer or map.
func sharedReferences(a, b reflect.Value, path string) []string {
	switch a.Kind() {
	case reflect.Pointer:
		if a.IsNil() || b.IsNil() {
			return nil
		}
		if a.Pointer() == b.Pointer() {
			return []string{path}
		}
		return sharedReferences(a.Elem(), b.Elem(), path)
	case reflect.Map:
		if !a.IsNil() && a.Pointer() == b.Pointer() {
			return []string{path}
		}
	case reflect.Struct:
		var out []string
		for i := range a.NumField() {
			out = append(out, sharedReferences(a.Field(i), b.Field(i), path+"."+a.Type().Field(i).Name)...)
		}
		return out
	}
	return nil
}

// BenchmarkFirstNameChecks compares what the first configuration load and the
// first spec cost in the name checks: compiling and running the regular
// expressions they once used (regexp) against the hand-written checks
// (checks). Both run each check once on a valid input, as a cold instance's
// first event does.
func BenchmarkFirstNameChecks(b *testing.B) {
	inputs := make([]string, len(regexpEquivalents))
	for i, tc := range regexpEquivalents {
		inputs[i] = tc.seeds[0]
	}
	b.Run("regexp", func(b *testing.B) {
		for b.Loop() {
			for i, tc := range regexpEquivalents {
				regexp.MustCompile(tc.re).MatchString(inputs[i])
			}
		}
	})
	b.Run("checks", func(b *testing.B) {
		for b.Loop() {
			for i, tc := range regexpEquivalents {
				tc.check(inputs[i])
			}
		}
	})
}
