package healthcaretest

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
)

type bundleEntry struct {
	method, typ, id string
	fullURL         string
	res             map[string]any
	err             *fhirError
	ifMatch         string // request.ifMatch
	ifNoneMatch     string // request.ifNoneMatch
}

// executeBundle runs a batch or transaction bundle. A transaction is
// validated completely before any entry takes effect; a failing transaction
// returns an error and changes nothing. The caller holds e.mu.
func (e *Emulator) executeBundle(st *fhirStore, body []byte) (json.RawMessage, *fhirError) {
	m, err := decodeJSONObject(body)
	if err != nil {
		return nil, fhirErr(400, "structure", "invalid JSON: %v", err)
	}
	if rt, _ := m["resourceType"].(string); rt != "Bundle" {
		return nil, fhirErr(400, "value", "resourceType: want Bundle, got %q", rt)
	}
	btype, _ := m["type"].(string)
	if btype != "batch" && btype != "transaction" {
		return nil, fhirErr(400, "value", "Bundle.type: want batch or transaction, got %q", btype)
	}
	rawEntries, ok := m["entry"].([]any)
	if !ok && m["entry"] != nil {
		return nil, fhirErr(400, "structure", "Bundle.entry: must be an array")
	}
	entries := make([]*bundleEntry, len(rawEntries))
	refs := map[string]string{} // fullUrl (urn:uuid:...) → Type/id
	for i, raw := range rawEntries {
		be := &bundleEntry{}
		entries[i] = be
		be.err = parseEntry(st, raw, be, i)
		if be.err == nil && be.method == http.MethodPost {
			be.id = e.newID()
			be.res["id"] = be.id
			if strings.HasPrefix(be.fullURL, "urn:uuid:") {
				refs[be.fullURL] = be.typ + "/" + be.id
			}
		}
	}
	for _, be := range entries {
		if be.err == nil && be.res != nil {
			rewriteRefs(be.res, refs)
			if be.method != http.MethodGet {
				be.err = validateResource(st, be.typ, be.id, be.res)
			}
		}
	}
	if btype == "transaction" {
		for i, be := range entries {
			if be.err != nil {
				return nil, fhirErr(be.err.status, be.err.code, "transaction failed at entry %d: %s", i, be.err.msg)
			}
		}
		if i, ferr := checkTransaction(st, entries); ferr != nil {
			return nil, fhirErr(ferr.status, ferr.code, "transaction failed at entry %d: %s", i, ferr.msg)
		}
	}
	out := make([]any, len(entries))
	for i, be := range entries {
		out[i] = e.applyEntry(st, be, btype == "transaction")
	}
	resp := map[string]any{"resourceType": "Bundle", "type": btype + "-response", "entry": out}
	b, _ := json.Marshal(resp)
	return b, nil
}

func parseEntry(st *fhirStore, raw any, be *bundleEntry, i int) *fhirError {
	em, ok := raw.(map[string]any)
	if !ok {
		return fhirErr(400, "structure", "Bundle.entry[%d]: must be an object", i)
	}
	be.fullURL, _ = em["fullUrl"].(string)
	req, _ := em["request"].(map[string]any)
	if req == nil {
		return fhirErr(400, "required", "Bundle.entry[%d].request: required", i)
	}
	be.method, _ = req["method"].(string)
	be.ifMatch, _ = req["ifMatch"].(string)
	be.ifNoneMatch, _ = req["ifNoneMatch"].(string)
	u, _ := req["url"].(string)
	if strings.ContainsAny(u, "?") {
		return fhirErr(400, "not-supported", "Bundle.entry[%d].request.url: conditional interactions are not supported by the emulator", i)
	}
	parts := strings.Split(strings.Trim(u, "/"), "/")
	be.typ = parts[0]
	if !resourceTypes[st.version][be.typ] {
		return fhirErr(400, "value", "Bundle.entry[%d].request.url: unknown resource type in %q", i, u)
	}
	switch be.method {
	case http.MethodPost:
		if len(parts) != 1 {
			return fhirErr(400, "value", "Bundle.entry[%d].request.url: want {type} for POST, got %q", i, u)
		}
	case http.MethodPut, http.MethodDelete, http.MethodGet:
		if len(parts) != 2 {
			return fhirErr(400, "value", "Bundle.entry[%d].request.url: want {type}/{id} for %s, got %q", i, be.method, u)
		}
		be.id = parts[1]
	default:
		return fhirErr(400, "not-supported", "Bundle.entry[%d].request.method: %q not supported", i, be.method)
	}
	if be.method == http.MethodPost || be.method == http.MethodPut {
		res, ok := em["resource"].(map[string]any)
		if !ok {
			return fhirErr(400, "required", "Bundle.entry[%d].resource: required for %s", i, be.method)
		}
		if be.method == http.MethodPut {
			if id, _ := res["id"].(string); id != be.id {
				return fhirErr(400, "value", "Bundle.entry[%d].resource.id: %q does not match request.url %q", i, id, u)
			}
		}
		be.res = res
	}
	return nil
}

// rewriteRefs replaces references to urn:uuid fullUrls of the bundle with the
// assigned Type/id.
func rewriteRefs(v any, refs map[string]string) {
	switch x := v.(type) {
	case map[string]any:
		for k, c := range x {
			if s, ok := c.(string); ok && k == "reference" {
				if to, ok := refs[s]; ok {
					x[k] = to
				}
				continue
			}
			rewriteRefs(c, refs)
		}
	case []any:
		for _, c := range x {
			rewriteRefs(c, refs)
		}
	}
}

func statusLine(code int) string { return fmt.Sprintf("%d %s", code, http.StatusText(code)) }

// checkTransaction checks the store's rules for a whole transaction before
// any entry takes effect: preconditions and enableUpdateCreate against the
// store, references against the store as the transaction leaves it. It
// returns the index of the first failing entry.
func checkTransaction(st *fhirStore, entries []*bundleEntry) (int, *fhirError) {
	pending := map[string]bool{} // Type/id → exists after the transaction
	deleted := map[string]bool{}
	for _, be := range entries {
		switch be.method {
		case http.MethodPost, http.MethodPut:
			pending[be.typ+"/"+be.id] = true
		case http.MethodDelete:
			pending[be.typ+"/"+be.id] = false
			deleted[be.typ+"/"+be.id] = true
		}
	}
	for i, be := range entries {
		key := be.typ + "/" + be.id
		r := st.res[key]
		live := r != nil && !r.deleted
		switch be.method {
		case http.MethodPut:
			if ferr := checkPreconditions(r, live, be.ifMatch, be.ifNoneMatch); ferr != nil {
				return i, ferr
			}
			if !live && !st.updateCreate {
				return i, fhirErr(404, "not-found", "resource %s not found, and the FHIR store does not have enableUpdateCreate set", key)
			}
			fallthrough
		case http.MethodPost:
			if !st.noRefIntegrity {
				if ferr := checkReferences(st, be.res, pending); ferr != nil {
					return i, ferr
				}
			}
		case http.MethodDelete:
			if ferr := checkPreconditions(r, live, be.ifMatch, ""); ferr != nil {
				return i, ferr
			}
			if live && !st.noRefIntegrity {
				if by := referrer(st, key, deleted); by != "" {
					return i, fhirErr(409, "conflict", "cannot delete %s: it is referenced by %s (the FHIR store enforces referential integrity)", key, by)
				}
			}
		}
	}
	return 0, nil
}

// applyEntry runs one entry; checked says checkTransaction already applied
// the store's rules to it.
func (e *Emulator) applyEntry(st *fhirStore, be *bundleEntry, checked bool) map[string]any {
	fail := func(fe *fhirError) map[string]any {
		return map[string]any{"response": map[string]any{
			"status":  statusLine(fe.status),
			"outcome": operationOutcome("error", fe.code, fe.msg),
		}}
	}
	if be.err != nil {
		return fail(be.err)
	}
	resEntry := func(r *resource, status int) map[string]any {
		return map[string]any{
			"resource": json.RawMessage(r.data),
			"response": map[string]any{
				"status":       statusLine(status),
				"location":     r.typ + "/" + r.id + "/_history/" + r.versionID,
				"etag":         `W/"` + r.versionID + `"`,
				"lastModified": fhirInstant(r.updated),
			},
		}
	}
	switch be.method {
	case http.MethodGet:
		r := st.res[be.typ+"/"+be.id]
		if r == nil || r.deleted {
			return fail(fhirErr(404, "not-found", "resource not found: %s/%s", be.typ, be.id))
		}
		return resEntry(r, 200)
	case http.MethodDelete:
		if checked {
			e.commitDelete(st, be.typ, be.id)
		} else if fe := e.deleteResource(st, be.typ, be.id, be.ifMatch, true); fe != nil {
			return fail(fe)
		}
		return map[string]any{"response": map[string]any{"status": statusLine(200)}}
	}
	action := ActionCreate
	if be.method == http.MethodPut {
		action = ActionUpdate
	}
	var r *resource
	var created bool
	if checked {
		old := st.res[be.typ+"/"+be.id]
		created = old == nil || old.deleted
		e.commitResource(st, be.typ, be.id, be.res, action)
		r = st.res[be.typ+"/"+be.id]
	} else {
		var fe *fhirError
		r, created, fe = e.writeResource(st, be.typ, be.id, be.res, write{action: action,
			allowCreate: be.method == http.MethodPost || st.updateCreate, ifMatch: be.ifMatch, ifNoneMatch: be.ifNoneMatch})
		if fe != nil {
			return fail(fe)
		}
	}
	status := 200
	if created {
		status = 201
	}
	return resEntry(r, status)
}
