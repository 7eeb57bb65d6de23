// Package bulkdatatest checks HL7 FHIR Bulk Data manifests the way a Bulk
// Data client reads them: against the Complete Status rules of the Bulk Data
// Access IG v2.0.0 (https://hl7.org/fhir/uv/bulkdata/STU2/export.html#response---complete-status),
// fetching every file at its advertised URL. fhirexport's end-to-end tests,
// its feed tests and the local demonstration run every manifest they write
// through Check.
package bulkdatatest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strings"
)

// instant is a FHIR instant: to the second at least, with a time zone.
var instant = regexp.MustCompile(`^([0-9]{4})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]{1,9})?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))$`)

// resourceType is the shape of a FHIR resource type name.
var resourceType = regexp.MustCompile(`^[A-Z][A-Za-z]+$`)

// manifestFields are the Complete Status body's fields in IG v2.0.0.
var manifestFields = []string{"transactionTime", "request", "requiresAccessToken", "output", "deleted", "error", "extension"}

// itemFields are the fields of an output, deleted or error item.
var itemFields = []string{"type", "url", "count", "extension"}

// Check returns every way manifest breaks the IG's Complete Status rules,
// fetching each listed file with client (nil: http.DefaultClient) as a
// client would, GET [url]. The client carries any credentials
// (requiresAccessToken); the emulators need none.
//
// It checks: only the IG's fields at the top and in items; transactionTime
// an instant; request an absolute URL without a query string (fhirexport's
// kick-off is a POST, whose parameters the IG says it does not carry);
// requiresAccessToken a boolean; output and error arrays (deleted optional)
// of items with a type and an absolute url, count a whole number when
// present and then equal to the file's lines; deleted items of type Bundle
// and error items of type OperationOutcome; every file served at its url
// with 200 and application/fhir+ndjson, one resource per line of the item's
// type (deleted files: transaction Bundles of DELETE entries); and no
// resource both in output and in deleted.
func Check(ctx context.Context, client *http.Client, manifest []byte) []error {
	if client == nil {
		client = http.DefaultClient
	}
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	var top map[string]json.RawMessage
	if err := json.Unmarshal(manifest, &top); err != nil {
		return []error{fmt.Errorf("not a JSON object: %v", err)}
	}
	for k := range top {
		if !slices.Contains(manifestFields, k) {
			bad("field %q is not in the IG's Complete Status body (anything of ours goes under extension)", k)
		}
	}
	var m struct {
		TransactionTime     *string          `json:"transactionTime"`
		Request             *string          `json:"request"`
		RequiresAccessToken *bool            `json:"requiresAccessToken"`
		Output              *json.RawMessage `json:"output"`
		Deleted             *json.RawMessage `json:"deleted"`
		Error               *json.RawMessage `json:"error"`
		Extension           *json.RawMessage `json:"extension"`
	}
	if err := json.Unmarshal(manifest, &m); err != nil {
		return append(errs, fmt.Errorf("a field has the wrong JSON type: %v", err))
	}
	switch {
	case m.TransactionTime == nil:
		bad("transactionTime is required")
	case !instant.MatchString(*m.TransactionTime):
		bad("transactionTime %q is not a FHIR instant", *m.TransactionTime)
	}
	if m.Request == nil {
		bad("request is required")
	} else if u, err := url.Parse(*m.Request); err != nil || !u.IsAbs() || u.Host == "" || u.RawQuery != "" {
		bad("request %q: want an absolute URL without the POST's parameters", *m.Request)
	}
	if m.RequiresAccessToken == nil {
		bad("requiresAccessToken is required (a boolean)")
	}
	if m.Extension != nil {
		var ext map[string]any
		if json.Unmarshal(*m.Extension, &ext) != nil {
			bad("extension is not an object")
		}
	}

	output := map[string]bool{}  // Type/id in the output files
	deleted := map[string]bool{} // Type/id in the deleted files
	for _, sec := range []struct {
		name     string
		raw      *json.RawMessage
		required bool
		typ      string // the only type allowed; "" any resource type
	}{{"output", m.Output, true, ""}, {"deleted", m.Deleted, false, "Bundle"}, {"error", m.Error, true, "OperationOutcome"}} {
		if sec.raw == nil {
			if sec.required {
				bad("%s is required (an array, empty when there is nothing)", sec.name)
			}
			continue
		}
		var items []map[string]json.RawMessage
		if err := json.Unmarshal(*sec.raw, &items); err != nil {
			bad("%s is not an array of objects: %v", sec.name, err)
			continue
		}
		for i, it := range items {
			where := fmt.Sprintf("%s[%d]", sec.name, i)
			for k := range it {
				if !slices.Contains(itemFields, k) {
					bad("%s: field %q is not one of the IG's (type, url, count)", where, k)
				}
			}
			var typ, u string
			if json.Unmarshal(it["type"], &typ) != nil || !resourceType.MatchString(typ) {
				bad("%s: type %s is not a resource type", where, it["type"])
				continue
			}
			if sec.typ != "" && typ != sec.typ {
				bad("%s: type %q, want %s", where, typ, sec.typ)
			}
			parsed, err := url.Parse(string(bytes.Trim(it["url"], `"`)))
			if json.Unmarshal(it["url"], &u) != nil || err != nil || !parsed.IsAbs() || (parsed.Scheme != "https" && parsed.Scheme != "http") {
				bad("%s: url %s is not an absolute http(s) URL a client can GET", where, it["url"])
				continue
			}
			var count *int64
			if raw, ok := it["count"]; ok {
				var n int64
				if json.Unmarshal(raw, &n) != nil || n < 0 {
					bad("%s: count %s is not a whole number", where, raw)
				} else {
					count = &n
				}
			}
			lines, err := fetch(ctx, client, u)
			if err != nil {
				bad("%s: %v", where, err)
				continue
			}
			if count != nil && *count != int64(len(lines)) {
				bad("%s: count %d, but %s has %d lines", where, *count, u, len(lines))
			}
			for n, l := range lines {
				keys, err := resources(sec.name, typ, l)
				if err != nil {
					bad("%s: %s line %d: %v", where, u, n+1, err)
					continue
				}
				for _, k := range keys {
					switch sec.name {
					case "output":
						output[k] = true
					case "deleted":
						deleted[k] = true
					}
				}
			}
		}
	}
	for k := range deleted {
		if output[k] {
			bad("%s is in both output and deleted (IG: resources in deleted SHALL NOT appear in output)", k)
		}
	}
	return errs
}

// fetch GETs a file as a client does and returns its non-empty lines.
func fetch(ctx context.Context, client *http.Client, u string) ([][]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %v", u, err)
	}
	req.Header.Set("Accept", "application/fhir+ndjson")
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %v", u, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %v", u, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s: %s", u, resp.Status, bytes.TrimSpace(body))
	}
	if mt, _, err := mime.ParseMediaType(resp.Header.Get("Content-Type")); err != nil || mt != "application/fhir+ndjson" {
		return nil, fmt.Errorf("GET %s: Content-Type %q, want application/fhir+ndjson", u, resp.Header.Get("Content-Type"))
	}
	var lines [][]byte
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(nil, 64<<20)
	for sc.Scan() {
		if l := bytes.TrimSpace(sc.Bytes()); len(l) > 0 {
			lines = append(lines, bytes.Clone(l))
		}
	}
	return lines, sc.Err()
}

// resources checks one line of a file in section sec (items of type typ)
// and returns the Type/id it outputs or deletes.
func resources(sec, typ string, line []byte) ([]string, error) {
	var r struct {
		ResourceType string `json:"resourceType"`
		ID           string `json:"id"`
	}
	if err := json.Unmarshal(line, &r); err != nil {
		return nil, fmt.Errorf("not a JSON resource: %v", err)
	}
	if r.ResourceType != typ {
		return nil, fmt.Errorf("a %q in a file of type %s", r.ResourceType, typ)
	}
	switch sec {
	case "output":
		if r.ID == "" {
			return nil, fmt.Errorf("a %s without an id", typ)
		}
		return []string{typ + "/" + r.ID}, nil
	case "deleted":
		var b struct {
			Type  string `json:"type"`
			Entry []struct {
				Request struct{ Method, URL string } `json:"request"`
			} `json:"entry"`
		}
		if err := json.Unmarshal(line, &b); err != nil || b.Type != "transaction" || len(b.Entry) == 0 {
			return nil, fmt.Errorf("a deleted file's line is a transaction Bundle with entries; got type %q, %d entries (%v)", b.Type, len(b.Entry), err)
		}
		var keys []string
		for _, e := range b.Entry {
			t, id, ok := strings.Cut(e.Request.URL, "/")
			if e.Request.Method != http.MethodDelete || !ok || !resourceType.MatchString(t) || id == "" || strings.Contains(id, "/") {
				return nil, fmt.Errorf("entry request %s %q is not DELETE Type/id", e.Request.Method, e.Request.URL)
			}
			keys = append(keys, e.Request.URL)
		}
		return keys, nil
	}
	return nil, nil
}
