package bulkdatatest

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// TestCheck: a conforming manifest passes; each rule, broken alone, is
// reported.
func TestCheck(t *testing.T) {
	t.Parallel()
	files := map[string]string{
		"/Patient":  `{"resourceType":"Patient","id":"a","type":["not the Bundle field"]}` + "\n" + `{"resourceType":"Patient","id":"b"}` + "\n",
		"/Mixed":    `{"resourceType":"Observation","id":"o","type":["x"]}` + "\n",
		"/deleted":  `{"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"DELETE","url":"Patient/z"}}]}` + "\n",
		"/deletedA": `{"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"DELETE","url":"Patient/a"}}]}` + "\n",
		"/error":    `{"resourceType":"OperationOutcome","issue":[]}` + "\n",
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, ok := files[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		ct := "application/fhir+ndjson"
		if r.URL.Query().Get("ct") != "" {
			ct = r.URL.Query().Get("ct")
		}
		w.Header().Set("Content-Type", ct)
		w.Write([]byte(body))
	}))
	t.Cleanup(srv.Close)
	u := srv.URL
	good := `{"transactionTime":"2026-11-26T10:00:00.123456Z","request":"https://healthcare.googleapis.com/v1/s:export","requiresAccessToken":true,
		"output":[{"type":"Patient","url":"` + u + `/Patient","count":2}],"deleted":[{"type":"Bundle","url":"` + u + `/deleted","count":1}],
		"error":[{"type":"OperationOutcome","url":"` + u + `/error"}],"extension":{"ours":1}}`
	if errs := Check(context.Background(), srv.Client(), []byte(good)); len(errs) != 0 {
		t.Fatalf("a conforming manifest: %v", errs)
	}
	for _, tc := range []struct{ name, from, to, want string }{
		{"field outside the IG", `"extension":{"ours":1}`, `"ours":1`, `"ours" is not in the IG`},
		{"transactionTime not an instant", `2026-11-26T10:00:00.123456Z`, `2026-11-26 10:00`, "not a FHIR instant"},
		{"no transactionTime", `"transactionTime":"2026-11-26T10:00:00.123456Z",`, ``, "transactionTime is required"},
		{"request with a query", `s:export"`, `s:export?_since=x"`, "without the POST's parameters"},
		{"no requiresAccessToken", `"requiresAccessToken":true,`, ``, "requiresAccessToken is required"},
		{"gs:// url", `"url":"` + u + `/Patient"`, `"url":"gs://b/o"`, "client can GET"},
		{"item field outside the IG", `"count":2}`, `"count":2,"size":3}`, `"size" is not one of`},
		{"wrong count", `"count":2}`, `"count":3}`, "count 3, but"},
		{"deleted item not a Bundle", `{"type":"Bundle","url"`, `{"type":"Patient","url"`, "want Bundle"},
		{"file missing", `/error"`, `/nope"`, "404"},
		{"wrong content type", `/Patient"`, `/Patient?ct=application/octet-stream"`, "want application/fhir+ndjson"},
		{"resource of another type", `/Patient"`, `/Mixed"`, `a "Observation" in a file of type Patient`},
		{"deleted beside output", `/deleted"`, `/deletedA"`, "Patient/a is in both output and deleted"},
		{"no error array", `"error":[{"type":"OperationOutcome","url":"` + u + `/error"}],`, ``, "error is required"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := strings.Replace(good, tc.from, tc.to, 1)
			if m == good {
				t.Fatalf("the case changes nothing: %q not in the manifest", tc.from)
			}
			errs := Check(context.Background(), srv.Client(), []byte(m))
			found := false
			for _, err := range errs {
				found = found || strings.Contains(err.Error(), tc.want)
			}
			if !found {
				t.Errorf("errors %v; want one saying %q", errs, tc.want)
			}
		})
	}
}
