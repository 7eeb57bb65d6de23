package stacktest

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/GoogleCloudPlatform/functions-framework-go/funcframework"
)

// ServeFunctions serves the functions registered in this process (a blank
// import of github.com/fhirexport/fhirexport registers fhirexport's) with
// functions-framework-go on 127.0.0.1:port (0 picks a free one), each at
// /NAME, and returns their base URL once the server answers. The framework
// offers no way to stop its server (StartHostPort is http.ListenAndServe): it
// lives until the process exits, so a process serves the functions once.
// With FUNCTION_TARGET set the framework would serve one function at "/":
// leave it unset.
func ServeFunctions(ctx context.Context, port int) (string, error) {
	ln, err := net.Listen("tcp", hostPort(port))
	if err != nil {
		return "", fmt.Errorf("functions framework: %w", err)
	}
	p := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	ln.Close()
	errc := make(chan error, 1)
	go func() { errc <- funcframework.StartHostPort("127.0.0.1", p) }()
	baseURL := "http://127.0.0.1:" + p
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	deadline := time.After(10 * time.Second)
	for {
		// "/" serves no function: an answer proves the server is up without
		// invoking one.
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, baseURL+"/", nil)
		if err != nil {
			return "", err
		}
		if resp, err := http.DefaultClient.Do(req); err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			return baseURL, nil
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case err := <-errc:
			return "", fmt.Errorf("functions framework: %w", err)
		case <-deadline:
			return "", fmt.Errorf("functions framework did not answer at %s", baseURL)
		case <-t.C:
		}
	}
}
