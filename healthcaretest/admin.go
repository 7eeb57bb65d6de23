package healthcaretest

import (
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// AdminEndpoints lists the emulator's own JSON API under /emulator/v1/, one
// line per endpoint with an example; GET /emulator/v1/ answers it.
var AdminEndpoints = []struct{ Method, Path, Body, Doc string }{
	{"GET", "/emulator/v1/", "", "this index"},
	{"GET", "/emulator/v1/clock", "", `the emulator's time: {"now"}`},
	{"POST", "/emulator/v1/clock", `{"advance":"90s"}`, `move a fake clock: "set" (RFC 3339) and/or "advance" (Go duration)`},
	{"GET", "/emulator/v1/faults", "", "the pending injected faults"},
	{"POST", "/emulator/v1/faults", `{"method":"fhirStores.export","count":1,"code":-1}`,
		`fail the next count calls of method ("*": any) with an HTTP status, 0 (drop before acting), -1 (act, lose the answer) or -2 (act, answer after the client gave up); or {"method","rate","seed","codes"} for a random fraction (rate 0 removes)`},
	{"POST", "/emulator/v1/outcomes", `{"errorCode":13,"errorMessage":"boom"}`, `force how the next export ends (or a running one, with "operation"); "failureCount" for partial success`},
	{"GET", "/emulator/v1/timing", "", "export duration, steps and the running-operations limit"},
	{"POST", "/emulator/v1/timing", `{"exportDuration":"30s","exportSteps":3}`, "set how long exports accepted from now on run"},
	{"POST", "/emulator/v1/limits", `{"maxRunningOperations":5}`, "running exports allowed per project (0: unlimited; beyond: 429)"},
	{"GET", "/emulator/v1/stats", "", "running and peak running export operations, accepted exports, requests, notifications"},
	{"GET", "/emulator/v1/exports", "", "accepted exports: operation, store, createTime, destination, _since, _type"},
	{"GET", "/emulator/v1/notifications", "", "change notifications published, with their publish results"},
	{"GET", "/emulator/v1/requests", "", "every API request received"},
	{"GET", "/emulator/v1/bigquery/bq://p.ds/Patient", "", "rows of a table of the in-memory BigQuery model"},
}

// Fault is a pending injected fault, as GET /emulator/v1/faults shows it.
type Fault struct {
	Method string  `json:"method"`
	Count  int     `json:"count,omitempty"` // calls left; 0 for a rate fault
	Code   int     `json:"code"`
	Rate   float64 `json:"rate,omitempty"`
	Codes  []int   `json:"codes,omitempty"`
}

// Faults returns the pending injected faults, by method.
func (e *Emulator) Faults() []Fault {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := []Fault{}
	for _, m := range sortedKeys(e.faults) {
		for _, f := range e.faults[m] {
			if f.remaining > 0 {
				out = append(out, Fault{Method: m, Count: f.remaining, Code: f.code})
			} else {
				out = append(out, Fault{Method: m, Rate: f.rate, Codes: f.codes})
			}
		}
	}
	return out
}

// Stats are counters of the emulator, as GET /emulator/v1/stats shows them.
type Stats struct {
	RunningOperations              int            `json:"runningOperations"`
	PeakRunningOperations          int            `json:"peakRunningOperations"`
	PeakRunningOperationsByProject map[string]int `json:"peakRunningOperationsByProject"`
	AcceptedExports                int            `json:"acceptedExports"`
	Requests                       int            `json:"requests"`
	Notifications                  int            `json:"notifications"`
	NotificationFailures           int            `json:"notificationFailures"`
}

// Stats returns the emulator's counters. Export operations whose time is
// up are settled first, so RunningOperations is the count at the clock's now.
func (e *Emulator) Stats() Stats {
	e.mu.Lock()
	var running []*operation
	for _, op := range e.ops {
		if op.export != nil && !op.done {
			running = append(running, op)
		}
	}
	e.mu.Unlock()
	e.settle(running)
	ns := e.Notifications()
	e.mu.Lock()
	defer e.mu.Unlock()
	s := Stats{PeakRunningOperations: e.peakRunning, PeakRunningOperationsByProject: map[string]int{},
		AcceptedExports: len(e.exports), Requests: len(e.requests), Notifications: len(ns)}
	for k, v := range e.peakByProject {
		s.PeakRunningOperationsByProject[k] = v
	}
	for _, op := range running {
		if !op.done {
			s.RunningOperations++
		}
	}
	for _, n := range ns {
		if n.Err != nil {
			s.NotificationFailures++
		}
	}
	return s
}

// serveAdmin answers the emulator's own JSON API under /emulator/v1/
// (AdminEndpoints):
//
//	GET  /emulator/v1/clock                     {"now"}
//	POST /emulator/v1/clock  {"set"?: RFC 3339, "advance"?: Go duration}   (FakeClock only)
//	POST /emulator/v1/faults {"method","count","code"} or {"method","rate","seed","codes"}
//	POST /emulator/v1/outcomes {"operation"?, "errorCode", "errorMessage", "failureCount"}
//	POST /emulator/v1/timing {"exportDuration": Go duration, "exportSteps"}
//	GET  /emulator/v1/requests
//	GET  /emulator/v1/bigquery/{datasetURI}/{table}   e.g. /emulator/v1/bigquery/bq://p.ds/Patient
func (e *Emulator) serveAdmin(w http.ResponseWriter, r *http.Request) {
	path, ok := strings.CutPrefix(r.URL.Path, "/emulator/v1/")
	if !ok {
		writeAPIError(w, notFound("unknown emulator path %s", r.URL.Path))
		return
	}
	decode := func(v any) bool {
		d := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
		d.DisallowUnknownFields()
		if err := d.Decode(v); err != nil {
			writeAPIError(w, invalidArg("invalid JSON body: %v", err))
			return false
		}
		return true
	}
	switch {
	case path == "" && r.Method == http.MethodGet:
		var out []map[string]string
		for _, ep := range AdminEndpoints {
			out = append(out, map[string]string{"method": ep.Method, "path": ep.Path, "example": ep.Body, "doc": ep.Doc})
		}
		writeJSON(w, 200, map[string]any{"endpoints": out})
	case path == "faults" && r.Method == http.MethodGet:
		writeJSON(w, 200, map[string]any{"faults": e.Faults()})
	case path == "timing" && r.Method == http.MethodGet:
		e.mu.Lock()
		out := map[string]any{"exportDuration": e.exportDuration.String(), "exportSteps": e.exportSteps, "maxRunningOperations": e.maxRunning}
		e.mu.Unlock()
		writeJSON(w, 200, out)
	case path == "limits" && r.Method == http.MethodPost:
		var l struct {
			MaxRunningOperations int `json:"maxRunningOperations"`
		}
		if !decode(&l) {
			return
		}
		e.SetMaxRunningOperations(l.MaxRunningOperations)
		writeJSON(w, 200, map[string]any{"maxRunningOperations": l.MaxRunningOperations})
	case path == "stats" && r.Method == http.MethodGet:
		writeJSON(w, 200, e.Stats())
	case path == "exports" && r.Method == http.MethodGet:
		out := []map[string]any{}
		for _, x := range e.Exports() {
			out = append(out, map[string]any{"operation": x.Operation, "store": x.Store, "createTime": formatTime(x.CreateTime),
				"destination": x.Destination, "since": x.Since, "types": x.Types})
		}
		writeJSON(w, 200, map[string]any{"exports": out})
	case path == "notifications" && r.Method == http.MethodGet:
		out := []map[string]any{}
		for _, n := range e.Notifications() {
			m := map[string]any{"topic": n.Topic, "data": string(n.Data), "attributes": n.Attributes, "messageId": n.MessageID}
			if n.Err != nil {
				m["error"] = n.Err.Error()
			}
			out = append(out, m)
		}
		writeJSON(w, 200, map[string]any{"notifications": out})
	case path == "clock" && r.Method == http.MethodGet:
		writeJSON(w, 200, map[string]any{"now": formatTime(e.clock.Now())})
	case path == "clock" && r.Method == http.MethodPost:
		fc, ok := e.clock.(*FakeClock)
		if !ok {
			writeAPIError(w, errorf(codeFailedPrecondition, "the emulator runs on real time (start it with a fake clock)"))
			return
		}
		var body struct{ Set, Advance string }
		if !decode(&body) {
			return
		}
		if body.Set != "" {
			t, err := time.Parse(time.RFC3339Nano, body.Set)
			if err != nil {
				writeAPIError(w, invalidArg("invalid set: %v", err))
				return
			}
			fc.Set(t)
		}
		if body.Advance != "" {
			d, err := time.ParseDuration(body.Advance)
			if err != nil {
				writeAPIError(w, invalidArg("invalid advance: %v", err))
				return
			}
			fc.Advance(d)
		}
		writeJSON(w, 200, map[string]any{"now": formatTime(fc.Now())})
	case path == "faults" && r.Method == http.MethodPost:
		var f struct {
			Method string  `json:"method"`
			Count  int     `json:"count"`
			Code   int     `json:"code"`
			Rate   float64 `json:"rate"`
			Seed   int64   `json:"seed"`
			Codes  []int   `json:"codes"`
		}
		if !decode(&f) {
			return
		}
		if f.Method == "" {
			writeAPIError(w, invalidArg("method is required (e.g. fhirStores.export, operations.get, *)"))
			return
		}
		if f.Count > 0 {
			e.FailNext(f.Method, f.Count, f.Code)
		} else {
			e.FailRate(f.Method, f.Rate, f.Seed, f.Codes...)
		}
		writeJSON(w, 200, map[string]any{})
	case path == "outcomes" && r.Method == http.MethodPost:
		var o struct {
			Operation    string `json:"operation"`
			ErrorCode    int32  `json:"errorCode"`
			ErrorMessage string `json:"errorMessage"`
			FailureCount int64  `json:"failureCount"`
		}
		if !decode(&o) {
			return
		}
		out := Outcome{ErrorCode: o.ErrorCode, ErrorMessage: o.ErrorMessage, FailureCount: o.FailureCount}
		if o.Operation == "" {
			e.ForceNextOutcomes(out)
		} else if err := e.ForceOutcome(o.Operation, out); err != nil {
			writeAPIError(w, errorf(codeFailedPrecondition, "%v", err))
			return
		}
		writeJSON(w, 200, map[string]any{})
	case path == "timing" && r.Method == http.MethodPost:
		var t struct {
			ExportDuration string `json:"exportDuration"`
			ExportSteps    int    `json:"exportSteps"`
		}
		if !decode(&t) {
			return
		}
		d, err := time.ParseDuration(t.ExportDuration)
		if err != nil {
			writeAPIError(w, invalidArg("invalid exportDuration: %v", err))
			return
		}
		e.SetExportTiming(d, t.ExportSteps)
		writeJSON(w, 200, map[string]any{})
	case path == "requests" && r.Method == http.MethodGet:
		type req struct {
			Method    string     `json:"method"`
			Path      string     `json:"path"`
			Query     url.Values `json:"query,omitempty"`
			Body      string     `json:"body,omitempty"`
			APIMethod string     `json:"apiMethod"`
		}
		out := []req{}
		for _, q := range e.Requests() {
			out = append(out, req{q.Method, q.Path, q.Query, string(q.Body), q.APIMethod})
		}
		writeJSON(w, 200, map[string]any{"requests": out})
	case strings.HasPrefix(path, "bigquery/") && r.Method == http.MethodGet:
		rest := strings.TrimPrefix(path, "bigquery/")
		i := strings.LastIndex(rest, "/")
		if i < 0 {
			writeAPIError(w, invalidArg("want /emulator/v1/bigquery/{datasetURI}/{table}"))
			return
		}
		uri, table := rest[:i], rest[i+1:]
		// Paths collapse "bq://" to "bq:/"; accept both.
		if s, ok := strings.CutPrefix(uri, "bq:/"); ok && !strings.HasPrefix(s, "/") {
			uri = "bq://" + s
		}
		rows := e.BigQueryTable(uri, table)
		if rows == nil {
			rows = []json.RawMessage{}
		}
		writeJSON(w, 200, map[string]any{"rows": rows})
	default:
		writeAPIError(w, notFound("unknown emulator method %s %s", r.Method, r.URL.Path))
	}
}
