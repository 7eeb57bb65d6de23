package healthcaretest

import (
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// serveAdmin answers the emulator's own JSON API under /emulator/v1/:
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
