package healthcaretest

import (
	"encoding/json"
	"net/http"
	"net/url"
	"strconv"
	"time"
)

// version is one version of a resource, kept for fhir.history and
// fhir.vread: what the store held from t until the next version.
type version struct {
	vid     string
	t       time.Time
	data    []byte // nil for a deletion
	deleted bool
	method  string // the interaction that wrote it: POST, PUT, PATCH or DELETE
}

// keepVersion records r's current version in its history. A store with
// disableResourceVersioning keeps only the current one, as the service does
// ("history and vread of past versions are unavailable"). The caller holds
// e.mu.
func (st *fhirStore) keepVersion(r *resource, action string) {
	method := map[string]string{ActionCreate: http.MethodPost, ActionUpdate: http.MethodPut, ActionPatch: http.MethodPatch,
		ActionDelete: http.MethodDelete}[action]
	if method == "" {
		method = http.MethodPut
	}
	v := version{vid: r.versionID, t: r.updated, deleted: r.deleted, method: method}
	if !r.deleted {
		v.data = r.data
	}
	if st.noVersioning {
		r.history = r.history[:0]
	}
	r.history = append(r.history, v)
}

// historyEntry is a history Bundle's entry for v, shaped as FHIR's history
// interaction returns it: the resource (none for a deletion), the request
// that made the version, and the response with its ETag and time.
func historyEntry(base string, r *resource, v version) map[string]any {
	e := map[string]any{
		"fullUrl": base + "/" + r.typ + "/" + r.id,
		"request": map[string]any{"method": v.method, "url": r.typ + "/" + r.id},
		"response": map[string]any{
			"etag":         `W/"` + v.vid + `"`,
			"lastModified": fhirInstant(v.t),
		},
	}
	status := 200
	switch {
	case v.deleted:
		status = http.StatusNoContent
	case v.method == http.MethodPost:
		status = http.StatusCreated
	}
	e["response"].(map[string]any)["status"] = statusLine(status)
	if !v.deleted {
		e["resource"] = json.RawMessage(v.data)
	}
	return e
}

// handleFHIRHistory answers fhir.history: the resource's versions, newest
// first, deleted ones included, as a Bundle of type history. _since keeps
// versions written at or after an instant; _count (default 100, at most
// 1000) pages with _page_token, linked as "next". _at is not served: ask
// without it and read the times.
func handleFHIRHistory(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.typedStoreFor(w, c)
	if st == nil {
		return
	}
	if c.query.Get("_at") != "" {
		writeOutcome(w, 501, "not-supported", "the emulator does not serve _at; read the versions' times instead")
		return
	}
	res := st.res[c.names.resType+"/"+c.names.resID]
	if res == nil || len(res.history) == 0 {
		writeOutcome(w, 404, "not-found", "resource not found: "+c.names.resType+"/"+c.names.resID)
		return
	}
	var since time.Time
	if v := c.query.Get("_since"); v != "" {
		t, err := time.Parse(time.RFC3339Nano, v)
		if err != nil {
			writeOutcome(w, 400, "invalid", "invalid _since "+strconv.Quote(v)+": the time must be specified to the second and include a time zone")
			return
		}
		since = t
	}
	var versions []version // newest first
	for i := len(res.history) - 1; i >= 0; i-- {
		if v := res.history[i]; !v.t.Before(since) {
			versions = append(versions, v)
		}
	}
	count := 100
	if v := c.query.Get("_count"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 1000 {
			writeOutcome(w, 400, "invalid", "invalid _count "+strconv.Quote(v)+": from 1 to 1000")
			return
		}
		count = n
	}
	start := 0
	if tok := c.query.Get("_page_token"); tok != "" {
		n, err := strconv.Atoi(tok)
		if err != nil || n < 0 || n > len(versions) {
			writeOutcome(w, 400, "invalid", "invalid _page_token")
			return
		}
		start = n
	}
	end := min(start+count, len(versions))
	base := baseURL(r) + "/v1/" + st.name + "/fhir"
	entries := []any{}
	for _, v := range versions[start:end] {
		entries = append(entries, historyEntry(base, res, v))
	}
	b := map[string]any{"resourceType": "Bundle", "type": "history", "total": len(versions), "entry": entries}
	self := base + "/" + res.typ + "/" + res.id + "/_history"
	links := []any{map[string]any{"relation": "self", "url": self + "?" + r.URL.RawQuery}}
	if end < len(versions) {
		q := url.Values{}
		for k, v := range c.query {
			q[k] = v
		}
		q.Set("_page_token", strconv.Itoa(end))
		links = append(links, map[string]any{"relation": "next", "url": self + "?" + q.Encode()})
	}
	b["link"] = links
	data, _ := json.Marshal(b)
	writeFHIR(w, 200, data)
}

// handleFHIRVread answers fhir.vread: one version of a resource; a deleted
// version is 410 Gone, an unknown one 404.
func handleFHIRVread(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.typedStoreFor(w, c)
	if st == nil {
		return
	}
	key := c.names.resType + "/" + c.names.resID
	if res := st.res[key]; res != nil {
		for _, v := range res.history {
			if v.vid != c.names.versionID {
				continue
			}
			if v.deleted {
				writeOutcome(w, 410, "deleted", "resource version deleted: "+key+"/_history/"+v.vid)
				return
			}
			w.Header().Set("ETag", `W/"`+v.vid+`"`)
			w.Header().Set("Last-Modified", v.t.UTC().Format(http.TimeFormat))
			writeFHIR(w, 200, v.data)
			return
		}
	}
	writeOutcome(w, 404, "not-found", "resource version not found: "+key+"/_history/"+c.names.versionID)
}
