package export

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// MaxSpecBytes is the largest spec accepted. Real specs are a few hundred
// bytes; anything near this is a mistake or an attack.
const MaxSpecBytes = 64 << 10

// Spec is an export request: the API's own ExportResourcesRequest
// (https://cloud.google.com/healthcare-api/docs/reference/rest/v1/projects.locations.datasets.fhirStores/export)
// plus the store and fhirexport's pipeline fields.
type Spec struct {
	FHIRStore           string               `json:"fhirStore"`
	Type                string               `json:"_type,omitempty"`
	Since               string               `json:"_since,omitempty"`
	GCSDestination      *GCSDestination      `json:"gcsDestination,omitempty"`
	BigQueryDestination *BigQueryDestination `json:"bigqueryDestination,omitempty"`
	Incremental         bool                 `json:"incremental,omitempty"`
	Name                string               `json:"name,omitempty"`
	Labels              map[string]string    `json:"labels,omitempty"`
}

// GCSDestination is GoogleCloudHealthcareV1FhirGcsDestination; UriPrefix may
// hold placeholders.
type GCSDestination struct {
	URIPrefix string `json:"uriPrefix"`
}

// BigQueryDestination is GoogleCloudHealthcareV1FhirBigQueryDestination.
type BigQueryDestination struct {
	DatasetURI       string        `json:"datasetUri"`
	SchemaConfig     *SchemaConfig `json:"schemaConfig,omitempty"`
	WriteDisposition string        `json:"writeDisposition,omitempty"`
	Force            bool          `json:"force,omitempty"`
}

// SchemaConfig is the API's SchemaConfig.
type SchemaConfig struct {
	SchemaType                 string            `json:"schemaType"`
	RecursiveStructureDepth    Int64             `json:"recursiveStructureDepth,omitempty"`
	LastUpdatedPartitionConfig *TimePartitioning `json:"lastUpdatedPartitionConfig,omitempty"`
}

// TimePartitioning is the API's TimePartitioning.
type TimePartitioning struct {
	Type         string `json:"type"`
	ExpirationMs Int64  `json:"expirationMs,omitempty"`
}

// Int64 is an int64 that, like protobuf JSON, reads from a number or a decimal
// string and is written as a string.
type Int64 int64

// UnmarshalJSON implements json.Unmarshaler.
func (n *Int64) UnmarshalJSON(b []byte) error {
	s := string(b)
	if s == "null" {
		return nil
	}
	if uq, err := strconv.Unquote(s); err == nil {
		s = uq
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return fmt.Errorf("%s is not a whole number", b)
	}
	*n = Int64(v)
	return nil
}

// MarshalJSON implements json.Marshaler.
func (n Int64) MarshalJSON() ([]byte, error) {
	return []byte(strconv.Quote(strconv.FormatInt(int64(n), 10))), nil
}

// SpecError is a spec that can never be exported. It names the field, what was
// wrong and what is accepted.
type SpecError struct {
	Field    string // JSON path of the field at fault, "" for the whole spec
	Problem  string
	Accepted string
}

func (e *SpecError) Error() string {
	var b strings.Builder
	b.WriteString("spec")
	if e.Field != "" {
		b.WriteString(" field ")
		b.WriteString(e.Field)
	}
	b.WriteString(": ")
	b.WriteString(e.Problem)
	if e.Accepted != "" {
		b.WriteString("; accepted: ")
		b.WriteString(e.Accepted)
	}
	return b.String()
}

func specErr(field, accepted, format string, args ...any) *SpecError {
	return &SpecError{Field: field, Problem: fmt.Sprintf(format, args...), Accepted: accepted}
}

// The JSON kinds a spec field may have.
type kind int

const (
	kObject kind = iota
	kString
	kBool
	kInt      // a JSON number or a decimal string, as protobuf JSON allows for int64
	kLabelMap // an object of string values with free keys
)

// specFields lists every accepted field by JSON path. Keys are matched exactly
// (encoding/json alone would match them case-insensitively and accept
// duplicates, letting a crafted spec say two things at once).
var specFields = map[string]kind{
	"fhirStore":                        kString,
	"_type":                            kString,
	"_since":                           kString,
	"gcsDestination":                   kObject,
	"gcsDestination.uriPrefix":         kString,
	"bigqueryDestination":              kObject,
	"bigqueryDestination.datasetUri":   kString,
	"bigqueryDestination.schemaConfig": kObject,
	"bigqueryDestination.schemaConfig.schemaType":                              kString,
	"bigqueryDestination.schemaConfig.recursiveStructureDepth":                 kInt,
	"bigqueryDestination.schemaConfig.lastUpdatedPartitionConfig":              kObject,
	"bigqueryDestination.schemaConfig.lastUpdatedPartitionConfig.type":         kString,
	"bigqueryDestination.schemaConfig.lastUpdatedPartitionConfig.expirationMs": kInt,
	"bigqueryDestination.writeDisposition":                                     kString,
	"bigqueryDestination.force":                                                kBool,
	"incremental":                                                              kBool,
	"name":                                                                     kString,
	"labels":                                                                   kLabelMap,
}

// fieldsUnder lists the accepted fields directly under an object path, for
// error messages.
func fieldsUnder(path string) string {
	var names []string
	for p := range specFields {
		parent, name := "", p
		if i := strings.LastIndex(p, "."); i >= 0 {
			parent, name = p[:i], p[i+1:]
		}
		if parent == path {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}

// ParseSpec decodes and validates a spec. Any error is a *SpecError.
func ParseSpec(data []byte) (*Spec, error) {
	if len(data) > MaxSpecBytes {
		return nil, specErr("", fmt.Sprintf("at most %d bytes", MaxSpecBytes), "the spec is %d bytes, too large", len(data))
	}
	if err := checkShape(data); err != nil {
		return nil, err
	}
	var s Spec
	if err := json.Unmarshal(data, &s); err != nil {
		// checkShape has vetted every field, so this is unexpected; still a
		// spec problem, never a panic or a retry.
		return nil, specErr("", "a JSON object", "cannot decode: %v", err)
	}
	if err := s.Validate(); err != nil {
		return nil, err
	}
	return &s, nil
}

// checkShape walks the JSON tokens, rejecting syntax errors, trailing data,
// unknown or duplicate fields and wrong JSON types, each with the field named.
func checkShape(data []byte) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil {
		return specErr("", "a JSON object", "not valid JSON: %v", syntaxProblem(err, data))
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return specErr("", "a JSON object", "the spec must be a JSON object, got %s", describe(tok))
	}
	if err := walkObject(dec, data, ""); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return specErr("", "exactly one JSON object", "unexpected data after the spec object")
	}
	return nil
}

func walkObject(dec *json.Decoder, data []byte, path string) error {
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return specErr(path, "a JSON object", "not valid JSON: %v", syntaxProblem(err, data))
		}
		key := tok.(string) // inside an object, a token in key position is a string
		field := key
		if path != "" {
			field = path + "." + key
		}
		if seen[key] {
			return specErr(field, "each field once", "the field appears more than once")
		}
		seen[key] = true
		want, ok := specFields[field]
		if path == "labels" {
			want, ok = kString, true
		}
		if !ok {
			return specErr(field, fieldsUnder(path), "unknown field %q (names are case-sensitive)", key)
		}
		if err := walkValue(dec, data, field, want); err != nil {
			return err
		}
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return specErr(path, "a JSON object", "not valid JSON: %v", syntaxProblem(err, data))
	}
	return nil
}

func walkValue(dec *json.Decoder, data []byte, field string, want kind) error {
	tok, err := dec.Token()
	if err != nil {
		return specErr(field, "", "not valid JSON: %v", syntaxProblem(err, data))
	}
	if tok == nil {
		return nil // null means "not set", as in protobuf JSON
	}
	switch want {
	case kObject, kLabelMap:
		if d, ok := tok.(json.Delim); ok && d == '{' {
			if want == kLabelMap {
				return walkObject(dec, data, "labels")
			}
			return walkObject(dec, data, field)
		}
		return wrongType(field, "a JSON object", tok)
	case kString:
		if _, ok := tok.(string); ok {
			return nil
		}
		return wrongType(field, "a JSON string", tok)
	case kBool:
		if _, ok := tok.(bool); ok {
			return nil
		}
		return wrongType(field, "true or false", tok)
	case kInt:
		var s string
		switch v := tok.(type) {
		case json.Number:
			s = v.String()
		case string:
			s = v
		default:
			return wrongType(field, "a whole number", tok)
		}
		if _, err := strconv.ParseInt(s, 10, 64); err != nil {
			return specErr(field, "a whole number (a JSON number or a decimal string)", "%q is not a whole number", s)
		}
		return nil
	}
	return nil
}

// wrongType reports a value of the wrong JSON type.
func wrongType(field, accepted string, tok any) error {
	return specErr(field, accepted, "wrong type: got %s", describe(tok))
}

func describe(tok any) string {
	switch v := tok.(type) {
	case json.Delim:
		if v == '{' {
			return "an object"
		}
		if v == '[' {
			return "an array"
		}
		return string(v)
	case string:
		return "a string"
	case bool:
		return "a boolean"
	case json.Number:
		return "a number"
	case nil:
		return "null"
	}
	return fmt.Sprintf("%T", tok)
}

func syntaxProblem(err error, data []byte) string {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Sprintf("%v (at byte %d)", se, se.Offset)
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return "unexpected end of input"
	}
	return err.Error()
}

// The patterns compile at first use, not at init: cold starts stay short.
var (
	storeRE   = lazyRegexp(`^projects/([a-z0-9][a-z0-9.:-]{0,62}[a-z0-9])/locations/([a-z0-9][a-z0-9-]{0,62})/datasets/([A-Za-z0-9_.-]{1,256})/fhirStores/([A-Za-z0-9_.-]{1,256})$`)
	sinceRE   = lazyRegexp(`^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$`)
	bucketRE  = lazyRegexp(`^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$`)
	datasetRE = lazyRegexp(`^bq://((?:[a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9])\.([A-Za-z0-9_]{1,1000})$`)
	nameRE    = lazyRegexp(`^[a-z0-9][a-z0-9._-]{0,62}$`)
	labelKey  = lazyRegexp(`^[a-z][a-z0-9_-]{0,62}$`)
	typeRE    = lazyRegexp(`^[A-Z][A-Za-z]{1,63}$`)
)

func lazyRegexp(expr string) func() *regexp.Regexp {
	return sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(expr) })
}

// Validate checks every field, returning the first problem as a *SpecError.
func (s *Spec) Validate() error {
	if s.FHIRStore == "" {
		return specErr("fhirStore", "projects/P/locations/L/datasets/D/fhirStores/S", "required")
	}
	m := storeRE().FindStringSubmatch(s.FHIRStore)
	if m == nil || m[3] == "." || m[3] == ".." || m[4] == "." || m[4] == ".." {
		return specErr("fhirStore", "projects/P/locations/L/datasets/D/fhirStores/S with IDs of letters, digits, '_', '-', '.'", "%q is not a FHIR store resource name", s.FHIRStore)
	}
	if _, err := s.Types(); err != nil {
		return err
	}
	if s.Since != "" {
		if _, err := ParseSince(s.Since); err != nil {
			return err
		}
	}
	switch {
	case s.GCSDestination == nil && s.BigQueryDestination == nil:
		return specErr("gcsDestination", "exactly one of gcsDestination or bigqueryDestination", "no destination given")
	case s.GCSDestination != nil && s.BigQueryDestination != nil:
		return specErr("bigqueryDestination", "exactly one of gcsDestination or bigqueryDestination", "both destinations given")
	case s.GCSDestination != nil:
		if err := validateURIPrefix(s.GCSDestination.URIPrefix); err != nil {
			return err
		}
	default:
		if err := s.validateBigQuery(); err != nil {
			return err
		}
	}
	if s.Name != "" && !nameRE().MatchString(s.Name) {
		return specErr("name", "1-63 of a-z, 0-9, '.', '_', '-', starting with a letter or digit", "%q is not a pipeline name", s.Name)
	}
	if len(s.Labels) > 64 {
		return specErr("labels", "at most 64 labels", "%d labels", len(s.Labels))
	}
	for k, v := range s.Labels {
		if !labelKey().MatchString(k) {
			return specErr("labels."+k, "keys of 1-63 of a-z, 0-9, '_', '-', starting with a letter", "%q is not a label key", k)
		}
		if len(v) > 256 || strings.ContainsFunc(v, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
			return specErr("labels."+k, "values of at most 256 printable characters", "invalid label value")
		}
	}
	return nil
}

// Types returns the _type list, checked: resource type names, no blanks, no
// repeats. nil means every type.
func (s *Spec) Types() ([]string, error) {
	if s.Type == "" {
		return nil, nil
	}
	const accepted = "comma-separated FHIR resource types such as Patient,Observation"
	parts := strings.Split(s.Type, ",")
	seen := map[string]bool{}
	for _, p := range parts {
		switch {
		case p == "":
			return nil, specErr("_type", accepted, "%q has an empty entry", s.Type)
		case !typeRE().MatchString(p) || !knownTypes[p]:
			return nil, specErr("_type", accepted, "%q is not a FHIR resource type", p)
		case seen[p]:
			return nil, specErr("_type", accepted, "%q is listed twice", p)
		}
		seen[p] = true
	}
	return parts, nil
}

// ParseSince parses a _since value: RFC 3339 to the second with a time zone,
// fractional seconds allowed, as the API requires.
func ParseSince(v string) (time.Time, error) {
	const accepted = "RFC 3339 to the second with a time zone, e.g. 2026-01-01T00:00:00Z or 2026-01-01T02:00:00.5+02:00"
	if !sinceRE().MatchString(v) {
		return time.Time{}, specErr("_since", accepted, "%q is not a timestamp", v)
	}
	t, err := time.Parse(time.RFC3339Nano, v)
	if err != nil {
		return time.Time{}, specErr("_since", accepted, "%q is not a valid time", v)
	}
	return t, nil
}

// placeholders are the uriPrefix template names.
var placeholders = []string{"{store}", "{dataset}", "{date}", "{time}", "{run}"}

func validateURIPrefix(p string) error {
	const accepted = "gs://BUCKET/PATH with optional placeholders {store}, {dataset}, {date}, {time}, {run}"
	rest, ok := strings.CutPrefix(p, "gs://")
	if !ok {
		return specErr("gcsDestination.uriPrefix", accepted, "%q does not start with gs://", p)
	}
	bucket, path, _ := strings.Cut(rest, "/")
	if !bucketRE().MatchString(bucket) || strings.Contains(bucket, "..") {
		return specErr("gcsDestination.uriPrefix", accepted, "%q is not a valid bucket name", bucket)
	}
	path = strings.TrimSuffix(path, "/")
	if path == "" {
		return nil
	}
	stripped := path
	for _, ph := range placeholders {
		stripped = strings.ReplaceAll(stripped, ph, "x")
	}
	if strings.ContainsAny(stripped, "{}") {
		return specErr("gcsDestination.uriPrefix", accepted, "%q has an unknown placeholder", p)
	}
	// '%' is legal in object names, but a percent-encoded path means two
	// things to two readers; no export needs it.
	if strings.ContainsFunc(path, func(r rune) bool { return r < 0x20 || r == 0x7f || r == '\\' || r == '%' }) {
		return specErr("gcsDestination.uriPrefix", accepted+", without '%', '\\' or control characters", "%q has a percent sign, a backslash or a control character", p)
	}
	for _, seg := range strings.Split(path, "/") {
		if seg == "" || seg == "." || seg == ".." {
			return specErr("gcsDestination.uriPrefix", accepted, "%q has an empty, '.' or '..' path segment", p)
		}
	}
	if len(p) > 900 {
		return specErr("gcsDestination.uriPrefix", accepted, "longer than 900 characters")
	}
	return nil
}

func (s *Spec) validateBigQuery() error {
	bq := s.BigQueryDestination
	if !datasetRE().MatchString(bq.DatasetURI) {
		return specErr("bigqueryDestination.datasetUri", "bq://PROJECT_ID.DATASET_ID", "%q is not a BigQuery dataset URI", bq.DatasetURI)
	}
	sc := bq.SchemaConfig
	if sc == nil {
		return specErr("bigqueryDestination.schemaConfig", `{"schemaType": "ANALYTICS" or "ANALYTICS_V2"}`, "required")
	}
	if !slices.Contains([]string{"ANALYTICS", "ANALYTICS_V2"}, sc.SchemaType) {
		return specErr("bigqueryDestination.schemaConfig.schemaType", "ANALYTICS, ANALYTICS_V2", "%q is not a schema type", sc.SchemaType)
	}
	if sc.RecursiveStructureDepth < 0 || sc.RecursiveStructureDepth > 5 {
		return specErr("bigqueryDestination.schemaConfig.recursiveStructureDepth", "0 to 5", "%d is out of range", sc.RecursiveStructureDepth)
	}
	if pc := sc.LastUpdatedPartitionConfig; pc != nil {
		if !slices.Contains([]string{"HOUR", "DAY", "MONTH", "YEAR"}, pc.Type) {
			return specErr("bigqueryDestination.schemaConfig.lastUpdatedPartitionConfig.type", "HOUR, DAY, MONTH, YEAR", "%q is not a partition type", pc.Type)
		}
		if pc.ExpirationMs < 0 {
			return specErr("bigqueryDestination.schemaConfig.lastUpdatedPartitionConfig.expirationMs", "0 or more milliseconds", "%d is negative", pc.ExpirationMs)
		}
	}
	dispositions := []string{"", "WRITE_DISPOSITION_UNSPECIFIED", "WRITE_EMPTY", "WRITE_TRUNCATE", "WRITE_APPEND"}
	if !slices.Contains(dispositions, bq.WriteDisposition) {
		return specErr("bigqueryDestination.writeDisposition", "WRITE_EMPTY, WRITE_TRUNCATE, WRITE_APPEND", "%q is not a write disposition", bq.WriteDisposition)
	}
	if s.Incremental {
		if bq.WriteDisposition != "WRITE_APPEND" {
			return specErr("bigqueryDestination.writeDisposition", "WRITE_APPEND for incremental exports",
				"incremental exports must append: WRITE_TRUNCATE would erase earlier increments and WRITE_EMPTY (the default) refuses to write once the first increment exists")
		}
		if bq.Force {
			return specErr("bigqueryDestination.force", "false (or absent) for incremental exports", "force deletes every table before writing, erasing earlier increments")
		}
	}
	return nil
}

// Destination returns the destination template: the uriPrefix as written or
// the dataset URI.
func (s *Spec) Destination() string {
	if s.GCSDestination != nil {
		return s.GCSDestination.URIPrefix
	}
	if s.BigQueryDestination != nil {
		return s.BigQueryDestination.DatasetURI
	}
	return ""
}

// ExpandURIPrefix expands the uriPrefix placeholders for one run. at is the
// trigger time, so redeliveries of the same trigger expand identically.
func ExpandURIPrefix(prefix, store, run string, at time.Time) string {
	at = at.UTC()
	parts := strings.Split(store, "/")
	dataset, storeID := "", ""
	if len(parts) == 8 {
		dataset, storeID = parts[5], parts[7]
	}
	return strings.NewReplacer(
		"{store}", storeID,
		"{dataset}", dataset,
		"{date}", at.Format("2006-01-02"),
		"{time}", at.Format("150405"),
		"{run}", run,
	).Replace(prefix)
}
