// Package mirror keeps a folder equal to a FHIR store by applying the HL7
// FHIR Bulk Data manifests of an export feed, oldest first, with the Bulk
// Data client's own rule: upsert every output resource, then remove every
// deleted one (https://hl7.org/fhir/uv/bulkdata/export.html). It is
// fhirexport's reference consumer of its feed, and knows nothing else of
// fhirexport: it reads the manifest fields the IG defines, and from the
// extension only what the request field may omit (_since and _type).
//
// A mirror folder holds one NDJSON file per resource type, {Type}.ndjson,
// sorted by id, so two mirrors of one store compare byte for byte; its
// cursor (feed-cursor.json, the last manifest applied); and with
// Options.Changes a log of every change applied (changes.ndjson). Each
// manifest is applied atomically: a pull interrupted at any point leaves the
// folder as it was after the last manifest applied, or finishes applying
// the one it had committed when the folder is next opened.
package mirror

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"time"
)

// Manifest is a Bulk Data export manifest (IG v2.0.0, Complete Status body).
type Manifest struct {
	TransactionTime     string `json:"transactionTime"`
	Request             string `json:"request"`
	RequiresAccessToken bool   `json:"requiresAccessToken"`
	Output              []File `json:"output"`
	Deleted             []File `json:"deleted"`
	Error               []File `json:"error"`
	// Extension is read only for the export parameters a POST kick-off's
	// request URL does not carry ("In the case of a POST request, this URL
	// will not include the request parameters").
	// fhirexport's extension.snapshot, where present, says outright whether
	// the run is a full snapshot of its types.
	Extension struct {
		Since    string   `json:"since"`
		Types    []string `json:"types"`
		Snapshot *bool    `json:"snapshot"`
	} `json:"extension"`

	transactionTime time.Time
}

// File is one entry of a manifest's output, deleted or error list.
type File struct {
	Type  string `json:"type"`
	URL   string `json:"url"`
	Count *int64 `json:"count,omitempty"`
}

// ErrManifest means a manifest or one of its files is not what the IG
// describes; applying it could not be trusted.
var ErrManifest = errors.New("not a usable Bulk Data manifest")

// typeName is a FHIR resource type: it names a file in the mirror folder, so
// nothing else may pass (no "..", no "/").
var typeName = regexp.MustCompile(`^[A-Z][A-Za-z0-9]{0,63}$`)

// ParseManifest decodes and checks a manifest.
func ParseManifest(data []byte) (*Manifest, error) {
	var m Manifest
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrManifest, err)
	}
	t, err := time.Parse(time.RFC3339Nano, m.TransactionTime)
	if err != nil {
		return nil, fmt.Errorf("%w: transactionTime %q is not an instant", ErrManifest, m.TransactionTime)
	}
	m.transactionTime = t
	for _, f := range m.Output {
		if !typeName.MatchString(f.Type) || f.URL == "" {
			return nil, fmt.Errorf("%w: output entry {type %q, url %q}: want a resource type and a url", ErrManifest, f.Type, f.URL)
		}
	}
	for _, f := range m.Deleted {
		if f.Type != "Bundle" || f.URL == "" {
			return nil, fmt.Errorf("%w: deleted entry {type %q, url %q}: want type Bundle and a url", ErrManifest, f.Type, f.URL)
		}
	}
	for _, t := range m.Types() {
		if !typeName.MatchString(t) {
			return nil, fmt.Errorf("%w: _type names %q, not a resource type", ErrManifest, t)
		}
	}
	return &m, nil
}

// Time is the manifest's transactionTime.
func (m *Manifest) Time() time.Time { return m.transactionTime }

// Since is the export's _since: from the request URL, else the extension.
// Empty for a full export.
func (m *Manifest) Since() string {
	if u, err := url.Parse(m.Request); err == nil {
		if s := u.Query().Get("_since"); s != "" {
			return s
		}
	}
	return m.Extension.Since
}

// Types is the export's _type, sorted; empty means every type.
func (m *Manifest) Types() []string {
	var types []string
	if u, err := url.Parse(m.Request); err == nil {
		if s := u.Query().Get("_type"); s != "" {
			types = strings.Split(s, ",")
		}
	}
	if len(types) == 0 {
		types = slices.Clone(m.Extension.Types)
	}
	slices.Sort(types)
	return slices.Compact(types)
}

// Snapshot reports whether the manifest lists every resource of its types:
// as extension.snapshot says, or else a full export (no _since) that
// reported no errors. Applying it leaves exactly what it lists for those
// types, healing deletions the feed could not see. A partial export's output
// is incomplete, so it only upserts.
func (m *Manifest) Snapshot() bool {
	if s := m.Extension.Snapshot; s != nil {
		return *s
	}
	return m.Since() == "" && len(m.Error) == 0
}

// covers reports whether a snapshot of m covers typ.
func (m *Manifest) covers(typ string) bool {
	types := m.Types()
	return len(types) == 0 || slices.Contains(types, typ)
}
