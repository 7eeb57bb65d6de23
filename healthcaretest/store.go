package healthcaretest

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
)

type fhirStore struct {
	name    string
	version string
	config  map[string]any // the FhirStore as created, with name and version
	res     map[string]*resource
	order   []*resource // creation order
}

type resource struct {
	typ, id   string
	versionID string
	updated   time.Time
	data      []byte // stored JSON with id and meta
	deleted   bool
}

var (
	segmentRE  = regexp.MustCompile(`^[\p{L}\p{N}_\-.]{1,256}$`)
	projectRE  = regexp.MustCompile(`^[a-z0-9][a-z0-9.:\-]{0,62}$`)
	locationRE = regexp.MustCompile(`^[a-z0-9\-]{1,63}$`)
	fhirIDRE   = regexp.MustCompile(`^[A-Za-z0-9\-.]{1,64}$`)
)

// parseDatasetName checks "projects/P/locations/L/datasets/D".
func parseDatasetName(name string) (project string, err error) {
	s := strings.Split(name, "/")
	if len(s) != 6 || s[0] != "projects" || s[2] != "locations" || s[4] != "datasets" ||
		!projectRE.MatchString(s[1]) || !locationRE.MatchString(s[3]) || !segmentRE.MatchString(s[5]) {
		return "", fmt.Errorf("invalid dataset name %q: want projects/{project}/locations/{location}/datasets/{dataset}", name)
	}
	return "projects/" + s[1], nil
}

// parseStoreName checks ".../datasets/D/fhirStores/S" and returns the dataset.
func parseStoreName(name string) (datasetName string, err error) {
	ds, id, ok := strings.Cut(name, "/fhirStores/")
	if !ok || !segmentRE.MatchString(id) {
		return "", fmt.Errorf("invalid FHIR store name %q: want projects/{project}/locations/{location}/datasets/{dataset}/fhirStores/{fhirStore}", name)
	}
	if _, err := parseDatasetName(ds); err != nil {
		return "", fmt.Errorf("invalid FHIR store name %q: %v", name, err)
	}
	return ds, nil
}

// CreateDataset creates the dataset "projects/P/locations/L/datasets/D".
func (e *Emulator) CreateDataset(name string) error {
	if _, err := parseDatasetName(name); err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if _, ok := e.datasets[name]; ok {
		return fmt.Errorf("dataset %q already exists", name)
	}
	e.datasets[name] = &dataset{name: name}
	return nil
}

// CreateFHIRStore creates the FHIR store ".../datasets/D/fhirStores/S" of a
// FHIR version ("DSTU2", "STU3", "R4", "R5") in an existing dataset.
func (e *Emulator) CreateFHIRStore(name, version string) error {
	ds, err := parseStoreName(name)
	if err != nil {
		return err
	}
	if resourceTypes[version] == nil {
		return fmt.Errorf("invalid FHIR version %q: want DSTU2, STU3, R4 or R5", version)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.datasets[ds] == nil {
		return fmt.Errorf("dataset %q not found", ds)
	}
	if e.stores[name] != nil {
		return fmt.Errorf("FHIR store %q already exists", name)
	}
	e.stores[name] = newStore(name, version, nil)
	return nil
}

func newStore(name, version string, config map[string]any) *fhirStore {
	if config == nil {
		config = map[string]any{}
	}
	config["name"] = name
	config["version"] = version
	return &fhirStore{name: name, version: version, config: config, res: map[string]*resource{}}
}

// PutResource creates or updates a resource by its resourceType and id (an id
// is assigned when absent), as the FHIR update interaction would, and returns
// the stored JSON with id and meta.
func (e *Emulator) PutResource(store string, res []byte) (json.RawMessage, error) {
	m, err := decodeJSONObject(res)
	if err != nil {
		return nil, fmt.Errorf("invalid resource JSON: %v", err)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.stores[store]
	if st == nil {
		return nil, fmt.Errorf("FHIR store %q not found", store)
	}
	typ, _ := m["resourceType"].(string)
	id, _ := m["id"].(string)
	if id == "" {
		id = e.newID()
		m["id"] = id
	}
	r, _, ferr := e.writeResource(st, typ, id, m)
	if ferr != nil {
		return nil, ferr
	}
	return json.RawMessage(r.data), nil
}

// DeleteResource deletes a resource; deleting an absent one is not an error,
// as in FHIR.
func (e *Emulator) DeleteResource(store, resourceType, id string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.stores[store]
	if st == nil {
		return fmt.Errorf("FHIR store %q not found", store)
	}
	if resourceTypes[st.version][resourceType] == false {
		return fmt.Errorf("invalid resource type %q for FHIR version %s", resourceType, st.version)
	}
	e.deleteResource(st, resourceType, id)
	return nil
}

// Resources returns the current versions of the store's non-deleted
// resources in creation order.
func (e *Emulator) Resources(store string) []json.RawMessage {
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.stores[store]
	if st == nil {
		return nil
	}
	var out []json.RawMessage
	for _, r := range st.order {
		if !r.deleted {
			out = append(out, json.RawMessage(r.data))
		}
	}
	return out
}

// newID returns a server-assigned resource id shaped like a UUID. The caller
// holds e.mu.
func (e *Emulator) newID() string {
	e.idSeq++
	x := e.idSeq * 0x9E3779B97F4A7C15
	return fmt.Sprintf("%08x-%04x-4%03x-8%03x-%012x", uint32(x>>32), uint16(x>>16), e.idSeq>>48&0xfff, e.idSeq>>36&0xfff, e.idSeq&0xffffffffffff)
}

// writeResource validates m as a resource of typ/id and stores it as the new
// current version. created reports whether it did not exist (or was deleted).
// The caller holds e.mu.
func (e *Emulator) writeResource(st *fhirStore, typ, id string, m map[string]any) (r *resource, created bool, ferr *fhirError) {
	if ferr := validateResource(st, typ, id, m); ferr != nil {
		return nil, false, ferr
	}
	t := e.stamp()
	vid := base64.RawStdEncoding.EncodeToString([]byte(strconv.FormatInt(t.UnixNano(), 10)))
	meta, _ := m["meta"].(map[string]any)
	if meta == nil {
		meta = map[string]any{}
	}
	meta["versionId"] = vid
	meta["lastUpdated"] = fhirInstant(t)
	m["meta"] = meta
	data, err := json.Marshal(m)
	if err != nil {
		return nil, false, fhirErr(400, "invalid", "cannot encode resource: %v", err)
	}
	key := typ + "/" + id
	r = st.res[key]
	if r == nil {
		r = &resource{typ: typ, id: id}
		st.res[key] = r
		st.order = append(st.order, r)
		created = true
	} else if r.deleted {
		created = true
	}
	r.versionID, r.updated, r.data, r.deleted = vid, t, data, false
	return r, created, nil
}

func (e *Emulator) deleteResource(st *fhirStore, typ, id string) {
	r := st.res[typ+"/"+id]
	if r == nil || r.deleted {
		return
	}
	t := e.stamp()
	r.deleted, r.updated = true, t
	r.versionID = base64.RawStdEncoding.EncodeToString([]byte(strconv.FormatInt(t.UnixNano(), 10)))
}

func validateResource(st *fhirStore, typ, id string, m map[string]any) *fhirError {
	got, ok := m["resourceType"].(string)
	if !ok || got == "" {
		return fhirErr(400, "required", "resourceType: required field missing")
	}
	if !resourceTypes[st.version][got] {
		return fhirErr(400, "value", "resourceType: unknown resource type %q for FHIR version %s", got, st.version)
	}
	if typ != got {
		return fhirErr(400, "value", "resourceType: %q does not match the resource type %q of the request", got, typ)
	}
	if !fhirIDRE.MatchString(id) {
		return fhirErr(400, "value", "id: invalid resource id %q", id)
	}
	if rid, ok := m["id"].(string); ok && rid != id {
		return fhirErr(400, "value", "id: resource id %q does not match the id %q of the request", rid, id)
	}
	if meta, ok := m["meta"]; ok {
		if _, isObj := meta.(map[string]any); !isObj {
			return fhirErr(400, "structure", "meta: must be an object")
		}
	}
	return nil
}

// fhirInstant renders a FHIR instant (meta.lastUpdated) with microseconds
// and a UTC offset, as the Healthcare API does.
func fhirInstant(t time.Time) string {
	return t.UTC().Format("2006-01-02T15:04:05.000000-07:00")
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
