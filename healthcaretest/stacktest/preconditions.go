package stacktest

import (
	"encoding/json"
	"hash/fnv"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
)

// preconditions makes fake-gcs-server keep ifGenerationMatch on deletes,
// which it ignores (FIELD-NOTES): a delete of an object whose generation has
// moved on answers 412, as Cloud Storage does. Without it, a late conditional
// delete removes an object someone else has rewritten, and tests of code
// that relies on the precondition pass for the wrong reason. Writes of one
// object are serialized so that the check and the delete are one step.
type preconditions struct {
	next    http.Handler
	stripes [64]sync.Mutex
	refused atomic.Int64
}

func (p *preconditions) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		p.next.ServeHTTP(w, r)
		return
	}
	mu := &p.stripes[stripe(objectOf(r))]
	mu.Lock()
	defer mu.Unlock()
	if g := r.URL.Query().Get("ifGenerationMatch"); r.Method == http.MethodDelete && g != "" {
		rec := httptest.NewRecorder()
		p.next.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, r.URL.Path, nil))
		var attrs struct {
			Generation string `json:"generation"`
		}
		if rec.Code == http.StatusOK && json.Unmarshal(rec.Body.Bytes(), &attrs) == nil && attrs.Generation != g {
			p.refused.Add(1)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusPreconditionFailed)
			io.WriteString(w, `{"error":{"code":412,"message":"At least one of the pre-conditions you specified did not hold.","errors":[{"reason":"conditionNotMet"}]}}`)
			return
		}
	}
	p.next.ServeHTTP(w, r)
}

// objectOf names the object a JSON API request is about ("bucket/object"),
// or "" when the request does not say (in the URL).
func objectOf(r *http.Request) string {
	rest, ok := strings.CutPrefix(r.URL.EscapedPath(), "/upload")
	if !ok {
		rest = r.URL.EscapedPath()
	}
	rest, ok = strings.CutPrefix(rest, "/storage/v1/b/")
	if !ok {
		return ""
	}
	bucket, obj, _ := strings.Cut(rest, "/o")
	obj = strings.TrimPrefix(obj, "/")
	if n := r.URL.Query().Get("name"); n != "" {
		return bucket + "/" + n
	}
	name, _ := url.PathUnescape(obj)
	return bucket + "/" + name
}

func stripe(name string) int {
	h := fnv.New32a()
	h.Write([]byte(name))
	return int(h.Sum32() % 64)
}
