package export

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
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
	// Timeout is how long a run may take, as a Go duration ("90m", "6h");
	// "" means DefaultTimeout. See TimeoutDuration.
	Timeout string `json:"timeout,omitempty"`
	// DeletedURIPrefix (incremental BigQuery pipelines only) is where each
	// successful run's Bulk Data manifest and deleted file are written, as a
	// Cloud Storage run writes them beside its export: BigQuery gets the
	// upserts, the feed there the deletions. Placeholders as in uriPrefix.
	DeletedURIPrefix string `json:"deletedUriPrefix,omitempty"`
}

// DefaultTimeout is how long a run may take when its spec sets no timeout.
// Exports of large stores, and BigQuery exports in particular, take hours; a
// day leaves them room while still ending, within a day, a run whose
// operation is stuck.
const DefaultTimeout = 24 * time.Hour

// The timeouts a spec may set. Below a minute a run would be cancelled before
// one poll (every minute) could see it finish; finished operations stay
// readable for about 30 days, and nothing legitimate runs for a week.
const (
	minTimeout = time.Minute
	maxTimeout = 7 * 24 * time.Hour
)

// TimeoutDuration returns the spec's timeout, or DefaultTimeout when it sets
// none (or, in a spec that did not validate, an unparsable one).
func (s *Spec) TimeoutDuration() time.Duration {
	if s.Timeout == "" {
		return DefaultTimeout
	}
	d, err := parseTimeout(s.Timeout)
	if err != nil {
		return DefaultTimeout
	}
	return d
}

func parseTimeout(v string) (time.Duration, error) {
	const accepted = "a Go duration from 1m to 168h (7 days), such as 90m or 6h"
	if err := checkPrintable("timeout", v); err != nil {
		return 0, err
	}
	d, err := time.ParseDuration(v)
	switch {
	case err != nil:
		return 0, specErr("timeout", accepted, "%q is not a duration", v)
	case d < minTimeout:
		return 0, specErr("timeout", accepted, "%s is shorter than a minute", d)
	case d > maxTimeout:
		return 0, specErr("timeout", accepted, "%s is longer than 7 days", d)
	}
	return d, nil
}

// fleetSuffix ends a fleet spec's fhirStore: every store of the dataset.
const fleetSuffix = "/fhirStores/*"

// IsFleet reports whether the spec names every store of a dataset
// (projects/P/locations/L/datasets/D/fhirStores/*) rather than one store.
// A fleet is run as one spec per store (ForStore), each store checked against
// the allow-list on its own.
func (s *Spec) IsFleet() bool { return strings.HasSuffix(s.FHIRStore, fleetSuffix) }

// Dataset returns the dataset of the spec's store or fleet,
// projects/P/locations/L/datasets/D, or "" when fhirStore names none.
func (s *Spec) Dataset() string {
	i := strings.LastIndex(s.FHIRStore, "/fhirStores/")
	if i < 0 {
		return ""
	}
	return s.FHIRStore[:i]
}

// ForStore returns a deep copy of s for one concrete store (for a fleet: one
// of its dataset's stores). It does not check store: the caller validates the
// copy and checks the store against the allow-list.
func (s *Spec) ForStore(store string) *Spec {
	c := *s
	c.FHIRStore = store
	if s.GCSDestination != nil {
		g := *s.GCSDestination
		c.GCSDestination = &g
	}
	if s.BigQueryDestination != nil {
		b := *s.BigQueryDestination
		if b.SchemaConfig != nil {
			sc := *b.SchemaConfig
			if sc.LastUpdatedPartitionConfig != nil {
				pc := *sc.LastUpdatedPartitionConfig
				sc.LastUpdatedPartitionConfig = &pc
			}
			b.SchemaConfig = &sc
		}
		c.BigQueryDestination = &b
	}
	c.Labels = maps.Clone(s.Labels)
	return &c
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
	Code     int32 // the google.rpc.Code the rejection reports; 0: INVALID_ARGUMENT
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

// deniedErr is a SpecError for a value outside an allow-list: PERMISSION_DENIED.
func deniedErr(field, accepted, format string, args ...any) *SpecError {
	e := specErr(field, accepted, format, args...)
	e.Code = codePermissionDenied
	return e
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
	"timeout":                                                                  kString,
	"deletedUriPrefix":                                                         kString,
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
		if err := checkPrintable(path, key); err != nil {
			// Name the key escaped (name\u0000), never raw: the key itself
			// must not reach logs and events, yet the user must see which
			// field is at fault.
			err.Field = printableName(field)
			err.Problem = "a field name: " + err.Problem
			return err
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

// printableAccepted says what checkPrintable accepts.
const printableAccepted = "printable UTF-8: no control (Cc), format (Cf, such as U+200B or U+202E) or line and paragraph separator (U+2028, U+2029) characters"

// checkPrintable rejects a value that is not valid UTF-8 or holds a character
// that could hide or reorder text in the logs and events it is copied into:
// controls (Cc, including U+0085 NEL), format characters (Cf: bidi overrides,
// zero-width characters) and line or paragraph separators (Zl, Zp). The
// error names the code point, never the value.
func checkPrintable(field, v string) *SpecError {
	for i := 0; i < len(v); {
		if c := v[i]; c < utf8.RuneSelf {
			if c < 0x20 || c == 0x7f {
				return specErr(field, printableAccepted, "%U at byte %d is a control character", rune(c), i)
			}
			i++
			continue
		}
		r, w := utf8.DecodeRuneInString(v[i:])
		if r == utf8.RuneError && w == 1 {
			return specErr(field, printableAccepted, "not valid UTF-8 at byte %d", i)
		}
		if unicode.In(r, unicode.Cc, unicode.Cf, unicode.Zl, unicode.Zp) {
			return specErr(field, printableAccepted, "%U at byte %d is a control, format or separator character", r, i)
		}
		i += w
	}
	return nil
}

// printableName writes a field name so that it can be logged: every
// character checkPrintable refuses is escaped as in JSON (NUL is \u0000,
// U+202E is \u202e), a byte that is not UTF-8 as \xNN, and a backslash as
// \\ so an escape cannot be forged; names longer than 100 characters are
// cut with "…".
func printableName(s string) string {
	var b strings.Builder
	n := 0
	for i := 0; i < len(s); n++ {
		if n == 100 {
			b.WriteString("…")
			break
		}
		r, w := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && w == 1:
			fmt.Fprintf(&b, `\x%02x`, s[i])
		case r == '\\':
			b.WriteString(`\\`)
		case r < 0x20 || r == 0x7f || unicode.In(r, unicode.Cc, unicode.Cf, unicode.Zl, unicode.Zp):
			if r > 0xffff {
				fmt.Fprintf(&b, `\U%08x`, r)
			} else {
				fmt.Fprintf(&b, `\u%04x`, r)
			}
		default:
			b.WriteRune(r)
		}
		i += w
	}
	return b.String()
}

// Names are checked by hand rather than with regular expressions: the
// bounded repeats the rules need ({1,256}, {2,254}) compile into large
// programs, milliseconds of a cold start (issue 13). spec_test.go checks each
// against the regular expression it replaced.

func isLowerOrDigit(c byte) bool { return 'a' <= c && c <= 'z' || '0' <= c && c <= '9' }

func isDigit(c byte) bool { return '0' <= c && c <= '9' }

func isLetter(c byte) bool { return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' }

// every reports whether ok holds for every byte of s.
func every(s string, ok func(byte) bool) bool {
	for i := 0; i < len(s); i++ {
		if !ok(s[i]) {
			return false
		}
	}
	return true
}

// validProjectID: [a-z0-9][a-z0-9.:-]{0,62}[a-z0-9] (domain-scoped IDs hold
// '.' and ':').
func validProjectID(s string) bool {
	return len(s) >= 2 && len(s) <= 64 && isLowerOrDigit(s[0]) && isLowerOrDigit(s[len(s)-1]) &&
		every(s, func(c byte) bool { return isLowerOrDigit(c) || c == '.' || c == ':' || c == '-' })
}

// validLocation: [a-z0-9][a-z0-9-]{0,62}.
func validLocation(s string) bool {
	return len(s) >= 1 && len(s) <= 63 && isLowerOrDigit(s[0]) &&
		every(s, func(c byte) bool { return isLowerOrDigit(c) || c == '-' })
}

// validResourceID is a dataset or store ID as the Healthcare API accepts it:
// [\p{L}\p{N}_\-.]{1,256} (letters and digits of any script, so süd-klinik
// and 病院-7 are store IDs), but not "." or "..", which would change the
// meaning of a path. A fleet lists such stores; a single-store spec must
// accept them too.
func validResourceID(s string) bool {
	if s == "" || s == "." || s == ".." || !utf8.ValidString(s) || utf8.RuneCountInString(s) > 256 {
		return false
	}
	for _, r := range s {
		if !(unicode.IsLetter(r) || unicode.IsNumber(r) || r == '_' || r == '.' || r == '-') {
			return false
		}
	}
	return true
}

// validStoreName reports whether s is projects/P/locations/L/datasets/D/fhirStores/S,
// or, with fleet, projects/P/locations/L/datasets/D/fhirStores/*.
func validStoreName(s string, fleet bool) bool {
	segs := strings.Split(s, "/")
	if len(segs) != 8 || segs[0] != "projects" || segs[2] != "locations" || segs[4] != "datasets" || segs[6] != "fhirStores" {
		return false
	}
	return validProjectID(segs[1]) && validLocation(segs[3]) && validResourceID(segs[5]) &&
		(validResourceID(segs[7]) || fleet && segs[7] == "*")
}

// validSinceShape: YYYY-MM-DDThh:mm:ss, optional .fraction of 1-9 digits, then
// Z or ±hh:mm. Whether the date exists is time.Parse's job.
func validSinceShape(v string) bool {
	if len(v) < 20 {
		return false
	}
	for i := range 19 {
		c := v[i]
		switch i {
		case 4, 7:
			if c != '-' {
				return false
			}
		case 10:
			if c != 'T' {
				return false
			}
		case 13, 16:
			if c != ':' {
				return false
			}
		default:
			if !isDigit(c) {
				return false
			}
		}
	}
	rest := v[19:]
	if rest[0] == '.' {
		n := 1
		for n < len(rest) && isDigit(rest[n]) {
			n++
		}
		if n < 2 || n > 10 {
			return false
		}
		rest = rest[n:]
	}
	if rest == "Z" {
		return true
	}
	return len(rest) == 6 && (rest[0] == '+' || rest[0] == '-') && isDigit(rest[1]) && isDigit(rest[2]) &&
		rest[3] == ':' && isDigit(rest[4]) && isDigit(rest[5])
}

// validBucket: [a-z0-9][a-z0-9._-]{1,220}[a-z0-9].
func validBucket(s string) bool {
	return len(s) >= 3 && len(s) <= 222 && isLowerOrDigit(s[0]) && isLowerOrDigit(s[len(s)-1]) &&
		every(s, func(c byte) bool { return isLowerOrDigit(c) || c == '.' || c == '_' || c == '-' })
}

// validDatasetURI: bq://[DOMAIN:]PROJECT.DATASET, where PROJECT is
// [a-z][a-z0-9-]{4,28}[a-z0-9], DOMAIN [a-z0-9.-]+ and DATASET
// [A-Za-z0-9_]{1,1000}. Only the domain may hold '.', and nothing but the
// domain's end holds ':', so the last '.' and the first ':' split it.
func validDatasetURI(s string) bool {
	rest, ok := strings.CutPrefix(s, "bq://")
	i := strings.LastIndexByte(rest, '.')
	if !ok || i < 0 {
		return false
	}
	project, dataset := rest[:i], rest[i+1:]
	if j := strings.IndexByte(project, ':'); j >= 0 {
		domain := project[:j]
		project = project[j+1:]
		if domain == "" || !every(domain, func(c byte) bool { return isLowerOrDigit(c) || c == '.' || c == '-' }) {
			return false
		}
	}
	return len(project) >= 6 && len(project) <= 30 && 'a' <= project[0] && project[0] <= 'z' &&
		isLowerOrDigit(project[len(project)-1]) &&
		every(project, func(c byte) bool { return isLowerOrDigit(c) || c == '-' }) &&
		len(dataset) >= 1 && len(dataset) <= 1000 &&
		every(dataset, func(c byte) bool { return isLetter(c) || isDigit(c) || c == '_' })
}

// validName is a pipeline name: [a-z0-9][a-z0-9._-]{0,62}.
func validName(s string) bool {
	return len(s) >= 1 && len(s) <= 63 && isLowerOrDigit(s[0]) &&
		every(s, func(c byte) bool { return isLowerOrDigit(c) || c == '.' || c == '_' || c == '-' })
}

// validLabelKey: [a-z][a-z0-9_-]{0,62}.
func validLabelKey(s string) bool {
	return len(s) >= 1 && len(s) <= 63 && 'a' <= s[0] && s[0] <= 'z' &&
		every(s, func(c byte) bool { return isLowerOrDigit(c) || c == '_' || c == '-' })
}

// validTypeName has the shape of a resource type: [A-Z][A-Za-z]{1,63}.
func validTypeName(s string) bool {
	return len(s) >= 2 && len(s) <= 64 && 'A' <= s[0] && s[0] <= 'Z' && every(s, isLetter)
}

// Validate checks every field, returning the first problem as a *SpecError.
func (s *Spec) Validate() error {
	const storeAccepted = "projects/P/locations/L/datasets/D/fhirStores/S with IDs of 1-256 letters and digits (any script), '_', '-', '.', or a fleet: projects/P/locations/L/datasets/D/fhirStores/*"
	if s.FHIRStore == "" {
		return specErr("fhirStore", storeAccepted, "required")
	}
	if err := checkPrintable("fhirStore", s.FHIRStore); err != nil {
		return err
	}
	if !validStoreName(s.FHIRStore, true) {
		return specErr("fhirStore", storeAccepted, "%q is not a FHIR store resource name", s.FHIRStore)
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
		if err := validateURIPrefix("gcsDestination.uriPrefix", s.GCSDestination.URIPrefix); err != nil {
			return err
		}
		if s.IsFleet() && !strings.Contains(s.GCSDestination.URIPrefix, "{store}") {
			return specErr("gcsDestination.uriPrefix", "for a fleet (fhirStores/*), a uriPrefix with {store}, such as gs://BUCKET/PATH/{store}/{date}",
				"a fleet runs one export per store; without {store} every store's files land under the same prefix, where they cannot be told apart")
		}
	default:
		if err := s.validateBigQuery(); err != nil {
			return err
		}
	}
	if s.DeletedURIPrefix != "" {
		if s.BigQueryDestination == nil || !s.Incremental {
			return specErr("deletedUriPrefix", "only with bigqueryDestination and incremental: true",
				"a Cloud Storage run writes its deleted file beside its export, and a full export has no deletions to deliver")
		}
		if err := validateURIPrefix("deletedUriPrefix", s.DeletedURIPrefix); err != nil {
			return err
		}
	}
	if s.Name != "" {
		if err := checkPrintable("name", s.Name); err != nil {
			return err
		}
		if !validName(s.Name) {
			return specErr("name", "1-63 of a-z, 0-9, '.', '_', '-', starting with a letter or digit", "%q is not a pipeline name", s.Name)
		}
	}
	if s.Timeout != "" {
		if _, err := parseTimeout(s.Timeout); err != nil {
			return err
		}
	}
	if len(s.Labels) > 64 {
		return specErr("labels", "at most 64 labels", "%d labels", len(s.Labels))
	}
	for k, v := range s.Labels {
		if err := checkPrintable("labels", k); err != nil {
			err.Field = printableName("labels." + k)
			err.Problem = "a label key: " + err.Problem
			return err
		}
		if !validLabelKey(k) {
			return specErr("labels."+k, "keys of 1-63 of a-z, 0-9, '_', '-', starting with a letter", "%q is not a label key", k)
		}
		if err := checkPrintable("labels."+k, v); err != nil {
			err.Accepted = "values of at most 256 bytes of " + printableAccepted
			return err
		}
		if len(v) > 256 {
			return specErr("labels."+k, "values of at most 256 bytes of "+printableAccepted, "the value is %d bytes", len(v))
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
	if err := checkPrintable("_type", s.Type); err != nil {
		return nil, err
	}
	parts := strings.Split(s.Type, ",")
	seen := map[string]bool{}
	for _, p := range parts {
		switch {
		case p == "":
			return nil, specErr("_type", accepted, "%q has an empty entry", s.Type)
		case !validTypeName(p) || !knownTypes[p]:
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
	if err := checkPrintable("_since", v); err != nil {
		return time.Time{}, err
	}
	if !validSinceShape(v) {
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

func validateURIPrefix(field, p string) error {
	const accepted = "gs://BUCKET/PATH with optional placeholders {store}, {dataset}, {date}, {time}, {run}"
	if err := checkPrintable(field, p); err != nil {
		return err
	}
	rest, ok := strings.CutPrefix(p, "gs://")
	if !ok {
		return specErr(field, accepted, "%q does not start with gs://", p)
	}
	bucket, path, _ := strings.Cut(rest, "/")
	if !validBucket(bucket) || strings.Contains(bucket, "..") {
		return specErr(field, accepted, "%q is not a valid bucket name", bucket)
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
		return specErr(field, accepted, "%q has an unknown placeholder", p)
	}
	// '%' is legal in object names, but a percent-encoded path means two
	// things to two readers; no export needs it.
	if strings.ContainsFunc(path, func(r rune) bool { return r < 0x20 || r == 0x7f || r == '\\' || r == '%' }) {
		return specErr(field, accepted+", without '%', '\\' or control characters", "%q has a percent sign, a backslash or a control character", p)
	}
	for _, seg := range strings.Split(path, "/") {
		if seg == "" || seg == "." || seg == ".." {
			return specErr(field, accepted, "%q has an empty, '.' or '..' path segment", p)
		}
	}
	if len(p) > 900 {
		return specErr(field, accepted, "longer than 900 characters")
	}
	return nil
}

func (s *Spec) validateBigQuery() error {
	bq := s.BigQueryDestination
	if err := checkPrintable("bigqueryDestination.datasetUri", bq.DatasetURI); err != nil {
		return err
	}
	if !validDatasetURI(bq.DatasetURI) {
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
	if s.IsFleet() {
		// Every store of a fleet exports into the same dataset, one table per
		// resource type.
		if bq.WriteDisposition != "WRITE_APPEND" {
			return specErr("bigqueryDestination.writeDisposition", "WRITE_APPEND for a fleet (fhirStores/*)",
				"a fleet's stores all write into the same tables: WRITE_TRUNCATE would let each store erase the rows of the stores before it, and WRITE_EMPTY (the default) fails for every store after the first, whose rows are already there")
		}
		if bq.Force {
			return specErr("bigqueryDestination.force", "false (or absent) for a fleet (fhirStores/*)", "force deletes every table before writing, erasing the rows of the fleet's other stores")
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
