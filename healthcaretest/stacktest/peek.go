package stacktest

import (
	"bytes"
	"io"
	"net/http"
)

// PeekBody returns r's body and leaves it in place for the handler after,
// for fronts that decide by a request's content (which object a JSON API
// upload writes, what a state update holds).
func PeekBody(r *http.Request) []byte {
	if r.Body == nil {
		return nil
	}
	b, _ := io.ReadAll(r.Body)
	r.Body.Close()
	r.Body = io.NopCloser(bytes.NewReader(b))
	return b
}
