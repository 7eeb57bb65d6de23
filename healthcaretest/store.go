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

	healthcare "google.golang.org/api/healthcare/v1"
)

type fhirStore struct {
	name    string
	version string
	config  map[string]any // the FhirStore as created or patched, with name and version
	res     map[string]*resource
	order   []*resource // creation order

	// Rules read from config by applyConfig.
	notify         []NotificationConfig
	updateCreate   bool // enableUpdateCreate
	noRefIntegrity bool // disableReferentialIntegrity
	noVersioning   bool // disableResourceVersioning
	extensionRefs  bool // complexDataTypeReferenceParsing is not DISABLED
}

// applyConfig reads the store's rules from its configuration.
func (st *fhirStore) applyConfig() *apiError {
	n, aerr := parseNotificationConfigs(st.config["notificationConfigs"])
	if aerr != nil {
		return aerr
	}
	// The deprecated single notificationConfig (gcloud's --pubsub-topic)
	// still publishes, names only.
	if old, ok := st.config["notificationConfig"].(map[string]any); ok {
		if topic, _ := old["pubsubTopic"].(string); topic != "" {
			more, aerr := parseNotificationConfigs([]any{map[string]any{"pubsubTopic": topic}})
			if aerr != nil {
				return aerr
			}
			n = append(more, n...)
		}
	}
	st.notify = n
	st.updateCreate, _ = st.config["enableUpdateCreate"].(bool)
	st.noRefIntegrity, _ = st.config["disableReferentialIntegrity"].(bool)
	st.noVersioning, _ = st.config["disableResourceVersioning"].(bool)
	// "References inside FHIR extensions are only subject to referential
	// integrity if complexDataTypeReferenceParsing is set to ENABLED. This is
	// the default value for new FHIR stores."
	// https://cloud.google.com/healthcare-api/docs/concepts/fhir-referential-integrity
	st.extensionRefs = st.config["complexDataTypeReferenceParsing"] != "DISABLED"
	return nil
}

type resource struct {
	typ, id   string
	versionID string
	updated   time.Time
	data      []byte // stored JSON with id and meta
	deleted   bool

	refList []string // references of version refsOf (see refs)
	refsOf  string

	history []version // every version, oldest first (history.go)
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
// FHIR version ("DSTU2", "STU3", "R4", "R5") in an existing dataset, with
// enableUpdateCreate set so tests can write resources with their own ids.
// Other settings keep the service's defaults (referential integrity on, no
// notifications). Use CreateFHIRStoreWithConfig, or fhirStores.create over
// REST, for a store exactly as configured.
func (e *Emulator) CreateFHIRStore(name, version string) error {
	return e.CreateFHIRStoreWithConfig(name, &healthcare.FhirStore{Version: version, EnableUpdateCreate: true})
}

// CreateFHIRStoreWithConfig creates a FHIR store from the real client's
// FhirStore (version, enableUpdateCreate, disableReferentialIntegrity,
// notificationConfigs, labels, ...), validated as fhirStores.create does.
func (e *Emulator) CreateFHIRStoreWithConfig(name string, config *healthcare.FhirStore) error {
	ds, err := parseStoreName(name)
	if err != nil {
		return err
	}
	b, err := json.Marshal(config)
	if err != nil {
		return fmt.Errorf("encoding the FHIR store config: %w", err)
	}
	m, aerr := parseBody(b, fhirStoreFields)
	if aerr != nil {
		return aerr
	}
	version, _ := m["version"].(string)
	if resourceTypes[version] == nil {
		return fmt.Errorf("invalid FHIR version %q: want DSTU2, STU3, R4 or R5", version)
	}
	st, aerr := newStore(name, version, m)
	if aerr != nil {
		return aerr
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.datasets[ds] == nil {
		return fmt.Errorf("dataset %q not found", ds)
	}
	if e.stores[name] != nil {
		return fmt.Errorf("FHIR store %q already exists", name)
	}
	e.stores[name] = st
	return nil
}

// SetNotificationConfigs replaces the notificationConfigs of a store, as
// fhirStores.patch with updateMask=notificationConfigs does.
func (e *Emulator) SetNotificationConfigs(store string, configs ...NotificationConfig) error {
	list := []any{}
	for _, c := range configs {
		list = append(list, map[string]any{"pubsubTopic": c.PubsubTopic, "sendFullResource": c.SendFullResource,
			"sendPreviousResourceOnDelete": c.SendPreviousResourceOnDelete})
	}
	if _, aerr := parseNotificationConfigs(list); aerr != nil {
		return aerr
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.stores[store]
	if st == nil {
		return fmt.Errorf("FHIR store %q not found", store)
	}
	if len(configs) == 0 {
		delete(st.config, "notificationConfigs")
	} else {
		st.config["notificationConfigs"] = list
	}
	if aerr := st.applyConfig(); aerr != nil {
		return aerr
	}
	return nil
}

func newStore(name, version string, config map[string]any) (*fhirStore, *apiError) {
	if config == nil {
		config = map[string]any{}
	}
	config["name"] = name
	config["version"] = version
	st := &fhirStore{name: name, version: version, config: config, res: map[string]*resource{}}
	if aerr := st.applyConfig(); aerr != nil {
		return nil, aerr
	}
	return st, nil
}

// PutResource creates or updates a resource by its resourceType and id (an id
// is assigned when absent), as the FHIR update interaction would (create when
// the id is absent), and returns the stored JSON with id and meta. It is the
// back door for test data: the resource is validated, but enableUpdateCreate
// and referential integrity do not apply (the REST surface keeps them).
// Change notifications are published as for fhir.update.
func (e *Emulator) PutResource(store string, res []byte) (json.RawMessage, error) {
	m, err := decodeJSONObject(res)
	if err != nil {
		return nil, fmt.Errorf("invalid resource JSON: %v", err)
	}
	defer e.Flush()
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.stores[store]
	if st == nil {
		return nil, fmt.Errorf("FHIR store %q not found", store)
	}
	typ, _ := m["resourceType"].(string)
	id, _ := m["id"].(string)
	w := write{action: ActionUpdate, allowCreate: true, skipRefs: true}
	if id == "" {
		id = e.newID()
		m["id"] = id
		w.action = ActionCreate
	}
	r, _, ferr := e.writeResource(st, typ, id, m, w)
	if ferr != nil {
		return nil, ferr
	}
	return json.RawMessage(r.data), nil
}

// DeleteResource deletes a resource; deleting an absent one is not an error,
// as in FHIR. Like PutResource it skips referential integrity.
func (e *Emulator) DeleteResource(store, resourceType, id string) error {
	defer e.Flush()
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.stores[store]
	if st == nil {
		return fmt.Errorf("FHIR store %q not found", store)
	}
	if !resourceTypes[st.version][resourceType] {
		return fmt.Errorf("invalid resource type %q for FHIR version %s", resourceType, st.version)
	}
	if ferr := e.deleteResource(st, resourceType, id, "", false); ferr != nil {
		return ferr
	}
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

// newID returns a server-assigned resource id shaped like a UUID: the
// instance's prefix (random unless Options.DeterministicIDs) mixed with a
// counter. The caller holds e.mu.
func (e *Emulator) newID() string {
	e.idSeq++
	x := e.idSeq*0x9E3779B97F4A7C15 ^ e.idSalt
	return fmt.Sprintf("%08x-%04x-4%03x-8%03x-%012x", uint32(x>>32), uint16(x>>16), (e.idSeq>>48^e.idSalt>>20)&0xfff, (e.idSeq>>36^e.idSalt>>8)&0xfff, (e.idSeq^e.idSalt>>16)&0xffffffffffff)
}

// write says how a resource is written: the notification action, whether
// an absent resource may be created, and the If-Match / If-None-Match
// preconditions (ETag values, W/"v" or "v"; "*" for If-None-Match).
type write struct {
	action      string
	allowCreate bool
	ifMatch     string
	ifNoneMatch string
	skipRefs    bool // the Go API's back door
}

// writeResource validates m as a resource of typ/id, checks the store's
// rules and stores it as the new current version. created reports whether it
// did not exist (or was deleted). The caller holds e.mu.
func (e *Emulator) writeResource(st *fhirStore, typ, id string, m map[string]any, w write) (r *resource, created bool, ferr *fhirError) {
	if ferr := validateResource(st, typ, id, m); ferr != nil {
		return nil, false, ferr
	}
	key := typ + "/" + id
	old := st.res[key]
	live := old != nil && !old.deleted
	if ferr := checkPreconditions(old, live, w.ifMatch, w.ifNoneMatch); ferr != nil {
		return nil, false, ferr
	}
	if !live && !w.allowCreate {
		return nil, false, fhirErr(404, "not-found", "resource %s not found, and the FHIR store does not have enableUpdateCreate set", key)
	}
	if !st.noRefIntegrity && !w.skipRefs {
		if ferr := checkReferences(st, m, nil); ferr != nil {
			return nil, false, ferr
		}
	}
	e.commitResource(st, typ, id, m, w.action)
	r = st.res[key]
	return r, !live, nil
}

// commitResource stores m (already checked) as the current version of
// typ/id and queues its notifications. The caller holds e.mu.
func (e *Emulator) commitResource(st *fhirStore, typ, id string, m map[string]any, action string) {
	t := e.stamp()
	vid := base64.RawStdEncoding.EncodeToString([]byte(strconv.FormatInt(t.UnixNano(), 10)))
	meta, _ := m["meta"].(map[string]any)
	if meta == nil {
		meta = map[string]any{}
	}
	meta["versionId"] = vid
	meta["lastUpdated"] = fhirInstant(t)
	m["meta"] = meta
	data, _ := json.Marshal(m) // cannot fail: decoded JSON values only
	key := typ + "/" + id
	r := st.res[key]
	if r == nil {
		r = &resource{typ: typ, id: id}
		st.res[key] = r
		st.order = append(st.order, r)
	}
	r.versionID, r.updated, r.data, r.deleted = vid, t, data, false
	st.keepVersion(r, action)
	e.notifyChange(st, action, r, nil)
}

// deleteResource deletes typ/id if it exists, unless a precondition or
// referential integrity forbids it. The caller holds e.mu.
func (e *Emulator) deleteResource(st *fhirStore, typ, id, ifMatch string, checkRefs bool) *fhirError {
	r := st.res[typ+"/"+id]
	live := r != nil && !r.deleted
	if ferr := checkPreconditions(r, live, ifMatch, ""); ferr != nil {
		return ferr
	}
	if !live {
		return nil
	}
	if checkRefs && !st.noRefIntegrity {
		if by := referrer(st, typ+"/"+id, nil); by != "" {
			return fhirErr(409, "conflict", "cannot delete %s/%s: it is referenced by %s (the FHIR store enforces referential integrity)", typ, id, by)
		}
	}
	e.commitDelete(st, typ, id)
	return nil
}

// commitDelete deletes typ/id (already checked) if it exists and queues
// its notifications. The caller holds e.mu.
func (e *Emulator) commitDelete(st *fhirStore, typ, id string) {
	r := st.res[typ+"/"+id]
	if r == nil || r.deleted {
		return
	}
	prev := r.data
	t := e.stamp()
	r.deleted, r.updated = true, t
	r.versionID = base64.RawStdEncoding.EncodeToString([]byte(strconv.FormatInt(t.UnixNano(), 10)))
	st.keepVersion(r, ActionDelete)
	e.notifyChange(st, ActionDelete, r, prev)
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
