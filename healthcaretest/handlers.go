package healthcaretest

import (
	"encoding/base64"
	"encoding/json"
	"mime"
	"net/http"
	"strconv"
	"strings"
)

// writePage answers a list call: the page of n items that pageSize and
// pageToken select, under field, with nextPageToken when more remain.
func writePage(w http.ResponseWriter, c *call, field string, n int, item func(i int) any) {
	start, end, next, aerr := paging(c.query, n)
	if aerr != nil {
		writeAPIError(w, aerr)
		return
	}
	out := map[string]any{}
	var list []any
	for i := start; i < end; i++ {
		list = append(list, item(i))
	}
	if len(list) > 0 {
		out[field] = list
	}
	if next != "" {
		out["nextPageToken"] = next
	}
	writeJSON(w, 200, out)
}

// idParam reads and checks the ID query parameter of a create call, answering
// the error itself when it is missing or malformed.
func idParam(w http.ResponseWriter, c *call, param string) (string, bool) {
	id := c.query.Get(param)
	if id == "" {
		writeAPIError(w, invalidArg("%s is required", param))
		return "", false
	}
	if !segmentRE.MatchString(id) {
		writeAPIError(w, invalidArg("invalid %s %q: must be 1-256 letters, digits, '_', '-' or '.'", param, id))
		return "", false
	}
	return id, true
}

// paging slices names by pageSize/pageToken; the token is an opaque offset.
func paging(q map[string][]string, n int) (start, end int, next string, err *apiError) {
	get := func(k string) string {
		if v := q[k]; len(v) > 0 {
			return v[0]
		}
		return ""
	}
	size := 100
	if s := get("pageSize"); s != "" {
		v, perr := strconv.Atoi(s)
		if perr != nil || v < 0 {
			return 0, 0, "", invalidArg("Invalid value for pageSize: %q (must be a non-negative integer)", s)
		}
		if v > 0 {
			size = min(v, 1000)
		}
	}
	if t := get("pageToken"); t != "" {
		b, derr := base64.RawURLEncoding.DecodeString(t)
		off, aerr := strconv.Atoi(strings.TrimPrefix(string(b), "offset:"))
		if derr != nil || aerr != nil || !strings.HasPrefix(string(b), "offset:") || off < 0 || off > n {
			return 0, 0, "", invalidArg("Invalid pageToken: %q", t)
		}
		start = off
	}
	end = min(start+size, n)
	if end < n {
		next = base64.RawURLEncoding.EncodeToString([]byte("offset:" + strconv.Itoa(end)))
	}
	return start, end, next, nil
}

func datasetJSON(d *dataset) map[string]any {
	m := map[string]any{"name": d.name}
	if d.timeZone != "" {
		m["timeZone"] = d.timeZone
	}
	return m
}

func handleDatasetsCreate(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	id, ok := idParam(w, c, "datasetId")
	if !ok {
		return
	}
	m, aerr := parseBody(c.body, datasetFields)
	if aerr != nil {
		writeAPIError(w, aerr)
		return
	}
	name := c.names.location + "/datasets/" + id
	if _, err := parseDatasetName(name); err != nil {
		writeAPIError(w, invalidArg("parent: %v", err))
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.datasets[name] != nil {
		writeAPIError(w, errorf(codeAlreadyExists, "dataset %q already exists", name))
		return
	}
	d := &dataset{name: name}
	d.timeZone, _ = m["timeZone"].(string)
	e.datasets[name] = d
	resp := datasetJSON(d)
	resp["@type"] = "type.googleapis.com/google.cloud.healthcare.v1.dataset.Dataset"
	op := e.newOperation(d, "google.cloud.healthcare.v1.dataset.DatasetService.CreateDataset")
	op.done, op.endTime, op.response = true, e.stamp(), resp
	writeJSON(w, 200, e.operationJSON(op))
}

func handleDatasetsGet(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	e.mu.Lock()
	defer e.mu.Unlock()
	d := e.datasets[c.names.dataset]
	if d == nil {
		writeAPIError(w, notFound("dataset %q not found", c.names.dataset))
		return
	}
	writeJSON(w, 200, datasetJSON(d))
}

func handleDatasetsDelete(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.datasets[c.names.dataset] == nil {
		writeAPIError(w, notFound("dataset %q not found", c.names.dataset))
		return
	}
	delete(e.datasets, c.names.dataset)
	for name := range e.stores {
		if strings.HasPrefix(name, c.names.dataset+"/") {
			delete(e.stores, name)
		}
	}
	writeJSON(w, 200, map[string]any{})
}

func handleDatasetsList(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	e.mu.Lock()
	defer e.mu.Unlock()
	var names []string
	for _, n := range sortedKeys(e.datasets) {
		if strings.HasPrefix(n, c.names.location+"/datasets/") {
			names = append(names, n)
		}
	}
	writePage(w, c, "datasets", len(names), func(i int) any { return datasetJSON(e.datasets[names[i]]) })
}

func handleStoresCreate(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	id, ok := idParam(w, c, "fhirStoreId")
	if !ok {
		return
	}
	m, aerr := parseBody(c.body, fhirStoreFields)
	if aerr != nil {
		writeAPIError(w, aerr)
		return
	}
	version, _ := m["version"].(string)
	if resourceTypes[version] == nil {
		writeAPIError(w, invalidArg("version is required: one of DSTU2, STU3, R4, R5"))
		return
	}
	name := c.names.dataset + "/fhirStores/" + id
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.datasets[c.names.dataset] == nil {
		writeAPIError(w, notFound("dataset %q not found", c.names.dataset))
		return
	}
	if e.stores[name] != nil {
		writeAPIError(w, errorf(codeAlreadyExists, "FHIR store %q already exists", name))
		return
	}
	st, aerr := newStore(name, version, m)
	if aerr != nil {
		writeAPIError(w, aerr)
		return
	}
	e.stores[name] = st
	writeJSON(w, 200, st.config)
}

func handleStoresGet(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.stores[c.names.store]
	if st == nil {
		writeAPIError(w, notFound("FHIR store %q not found", c.names.store))
		return
	}
	writeJSON(w, 200, st.config)
}

func handleStoresDelete(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.stores[c.names.store] == nil {
		writeAPIError(w, notFound("FHIR store %q not found", c.names.store))
		return
	}
	delete(e.stores, c.names.store)
	writeJSON(w, 200, map[string]any{})
}

func handleStoresList(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	if f := c.query.Get("filter"); f != "" {
		writeAPIError(w, invalidArg("filter: the emulator does not support filtering FHIR stores (got %q)", f))
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.datasets[c.names.dataset] == nil {
		writeAPIError(w, notFound("dataset %q not found", c.names.dataset))
		return
	}
	var names []string
	for _, n := range sortedKeys(e.stores) {
		if strings.HasPrefix(n, c.names.dataset+"/fhirStores/") {
			names = append(names, n)
		}
	}
	writePage(w, c, "fhirStores", len(names), func(i int) any { return e.stores[names[i]].config })
}

// fhirStoreFor finds the store of a FHIR interaction; the caller holds e.mu.
// typedStoreFor is fhirStoreFor for a call on a resource type: an unknown
// type of the store's FHIR version is 404, as the API answers it.
func (e *Emulator) typedStoreFor(w http.ResponseWriter, c *call) *fhirStore {
	st := e.fhirStoreFor(w, c)
	if st != nil && !resourceTypes[st.version][c.names.resType] {
		writeOutcome(w, 404, "not-found", "unknown resource type "+strconv.Quote(c.names.resType))
		return nil
	}
	return st
}

func (e *Emulator) fhirStoreFor(w http.ResponseWriter, c *call) *fhirStore {
	st := e.stores[c.names.store]
	if st == nil {
		writeAPIError(w, notFound("FHIR store %q not found", c.names.store))
	}
	return st
}

func checkFHIRContentType(w http.ResponseWriter, r *http.Request) bool {
	mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || mt != "application/fhir+json" {
		writeOutcome(w, http.StatusUnsupportedMediaType, "not-supported",
			"Content-Type: want application/fhir+json, got "+strconv.Quote(r.Header.Get("Content-Type")))
		return false
	}
	return true
}

func writeResourceResponse(w http.ResponseWriter, r *http.Request, store string, res *resource, status int) {
	h := w.Header()
	h.Set("ETag", `W/"`+res.versionID+`"`)
	h.Set("Last-Modified", res.updated.UTC().Format(http.TimeFormat))
	if status == http.StatusCreated {
		h.Set("Location", baseURL(r)+"/v1/"+store+"/fhir/"+res.typ+"/"+res.id+"/_history/"+res.versionID)
	}
	writeFHIR(w, status, res.data)
}

func baseURL(r *http.Request) string {
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	return scheme + "://" + r.Host
}

func handleFHIRCreate(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	if !checkFHIRContentType(w, r) {
		return
	}
	m, err := decodeJSONObject(c.body)
	if err != nil {
		writeOutcome(w, 400, "structure", "invalid JSON: "+err.Error())
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.fhirStoreFor(w, c)
	if st == nil {
		return
	}
	id := e.newID()
	m["id"] = id // the server assigns the id of a created resource
	res, _, ferr := e.writeResource(st, c.names.resType, id, m, write{action: ActionCreate, allowCreate: true})
	if ferr != nil {
		writeOutcome(w, ferr.status, ferr.code, ferr.msg)
		return
	}
	writeResourceResponse(w, r, st.name, res, http.StatusCreated)
}

func handleFHIRUpdate(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	if !checkFHIRContentType(w, r) {
		return
	}
	m, err := decodeJSONObject(c.body)
	if err != nil {
		writeOutcome(w, 400, "structure", "invalid JSON: "+err.Error())
		return
	}
	if _, ok := m["id"].(string); !ok {
		writeOutcome(w, 400, "required", "id: the resource must contain an id equal to the id in the request path")
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.fhirStoreFor(w, c)
	if st == nil {
		return
	}
	res, created, ferr := e.writeResource(st, c.names.resType, c.names.resID, m, write{
		action:      ActionUpdate,
		allowCreate: st.updateCreate,
		ifMatch:     r.Header.Get("If-Match"),
		ifNoneMatch: r.Header.Get("If-None-Match"),
	})
	if ferr != nil {
		writeOutcome(w, ferr.status, ferr.code, ferr.msg)
		return
	}
	status := http.StatusOK
	if created {
		status = http.StatusCreated
	}
	writeResourceResponse(w, r, st.name, res, status)
}

// handleFHIRPatch applies a JSON Patch (RFC 6902), the only patch format
// fhir.patch takes ("Content-Type: application/json-patch+json").
func handleFHIRPatch(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	if mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); mt != "application/json-patch+json" {
		writeOutcome(w, http.StatusUnsupportedMediaType, "not-supported",
			"Content-Type: want application/json-patch+json, got "+strconv.Quote(r.Header.Get("Content-Type")))
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.typedStoreFor(w, c)
	if st == nil {
		return
	}
	cur := st.res[c.names.resType+"/"+c.names.resID]
	if cur == nil || cur.deleted {
		writeOutcome(w, 404, "not-found", "resource not found: "+c.names.resType+"/"+c.names.resID)
		return
	}
	m, ferr := applyJSONPatch(cur.data, c.body)
	if ferr != nil {
		writeOutcome(w, ferr.status, ferr.code, ferr.msg)
		return
	}
	res, _, ferr := e.writeResource(st, c.names.resType, c.names.resID, m, write{action: ActionPatch, ifMatch: r.Header.Get("If-Match")})
	if ferr != nil {
		writeOutcome(w, ferr.status, ferr.code, ferr.msg)
		return
	}
	writeResourceResponse(w, r, st.name, res, http.StatusOK)
}

func handleFHIRRead(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.typedStoreFor(w, c)
	if st == nil {
		return
	}
	res := st.res[c.names.resType+"/"+c.names.resID]
	switch {
	case res == nil:
		writeOutcome(w, 404, "not-found", "resource not found: "+c.names.resType+"/"+c.names.resID)
	case res.deleted:
		writeOutcome(w, 410, "deleted", "resource deleted: "+c.names.resType+"/"+c.names.resID)
	case r.Header.Get("If-None-Match") != "" && etagVersion(r.Header.Get("If-None-Match")) == res.versionID:
		// fhir.read: "If-None-Match ... 304 Not Modified" when unchanged.
		w.Header().Set("ETag", `W/"`+res.versionID+`"`)
		w.WriteHeader(http.StatusNotModified)
	default:
		writeResourceResponse(w, r, st.name, res, 200)
	}
}

func handleFHIRDelete(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.typedStoreFor(w, c)
	if st == nil {
		return
	}
	if ferr := e.deleteResource(st, c.names.resType, c.names.resID, r.Header.Get("If-Match"), true); ferr != nil {
		writeOutcome(w, ferr.status, ferr.code, ferr.msg)
		return
	}
	writeFHIR(w, 200, []byte("{}"))
}

// Bundle executes a FHIR batch or transaction bundle on a store through the
// Go API, as executeBundle does, and returns the response bundle.
func (e *Emulator) Bundle(store string, bundle []byte) (json.RawMessage, error) {
	defer e.Flush()
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.stores[store]
	if st == nil {
		return nil, notFound("FHIR store %q not found", store)
	}
	out, ferr := e.executeBundle(st, bundle)
	if ferr != nil {
		return nil, ferr
	}
	return out, nil
}

func handleBundle(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	if !checkFHIRContentType(w, r) {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.fhirStoreFor(w, c)
	if st == nil {
		return
	}
	out, ferr := e.executeBundle(st, c.body)
	if ferr != nil {
		writeOutcome(w, ferr.status, ferr.code, ferr.msg)
		return
	}
	writeFHIR(w, 200, out)
}

var fhirVersions = map[string]string{"DSTU2": "1.0.2", "STU3": "3.0.1", "R4": "4.0.1", "R5": "5.0.0"}

// handleCapabilities answers fhir.capabilities with what the emulator
// supports for the store: the interactions it implements on every resource
// type of the store's FHIR version, and the store's own rules.
func handleCapabilities(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.fhirStoreFor(w, c)
	if st == nil {
		return
	}
	interactions := []any{}
	for _, i := range []string{"read", "update", "patch", "delete", "create"} {
		interactions = append(interactions, map[string]any{"code": i})
	}
	versioning := "versioned-update"
	if st.noVersioning {
		versioning = "no-version"
	}
	var resources []any
	for _, t := range ResourceTypes(st.version) {
		resources = append(resources, map[string]any{
			"type":              t,
			"interaction":       interactions,
			"versioning":        versioning,
			"updateCreate":      st.updateCreate,
			"conditionalCreate": false,
			"conditionalUpdate": false,
			"conditionalDelete": "not-supported",
			"referencePolicy":   []any{"literal", "local", "enforced"},
		})
	}
	rt := "CapabilityStatement"
	if st.version == "DSTU2" {
		rt = "Conformance"
	}
	cs := map[string]any{
		"resourceType": rt,
		"status":       "active",
		"date":         fhirInstant(e.now()),
		"kind":         "instance",
		"publisher":    "healthcaretest",
		"software":     map[string]any{"name": "healthcaretest, an emulator of the Cloud Healthcare API v1"},
		"implementation": map[string]any{
			"description": "FHIR store " + st.name + " (emulated: no search, history or $operations)",
			"url":         baseURL(r) + "/v1/" + st.name + "/fhir",
		},
		"fhirVersion": fhirVersions[st.version],
		"format":      []any{"json"},
		"rest": []any{map[string]any{
			"mode":        "server",
			"resource":    resources,
			"interaction": []any{map[string]any{"code": "transaction"}, map[string]any{"code": "batch"}},
		}},
	}
	b, _ := json.Marshal(cs)
	writeFHIR(w, 200, b)
}
