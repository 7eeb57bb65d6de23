package mirror

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
)

// CloudStorageHost is the only host a Fetcher sends a Google access token to:
// https://storage.googleapis.com/BUCKET/OBJECT is how Cloud Storage serves a
// file to a Bulk Data client.
const CloudStorageHost = "storage.googleapis.com"

// Fetcher GETs the files a manifest advertises, as any Bulk Data client does.
// Where the manifest says requiresAccessToken, it sends a bearer token, but
// only to https://storage.googleapis.com: a manifest naming another host must
// not be able to collect the user's Google token. The storage emulator's
// URLs (Emulator) are fetched without one.
type Fetcher struct {
	// Client makes the requests; nil is http.DefaultClient.
	Client *http.Client
	// Token returns a Google OAuth access token for Cloud Storage; nil when
	// there are no credentials (against the local stack).
	Token func(context.Context) (string, error)
	// Emulator is the storage emulator's host:port (STORAGE_EMULATOR_HOST):
	// its URLs need no token.
	Emulator string
}

// Get opens url's body. requiresToken is the manifest's requiresAccessToken.
func (f *Fetcher) Get(ctx context.Context, rawURL string, requiresToken bool) (io.ReadCloser, error) {
	u, err := url.Parse(rawURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("%w: url %q is not an http(s) URL a Bulk Data client can GET (manifests written before fhirexport advertised fetchable URLs name gs:// objects: pull from a later run with --since)", ErrManifest, rawURL)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/fhir+ndjson")
	if requiresToken {
		switch {
		case u.Scheme == "https" && strings.EqualFold(u.Host, CloudStorageHost):
			if f.Token == nil {
				return nil, fmt.Errorf("GET %s needs a Google access token, and there are no credentials (is STORAGE_EMULATOR_HOST set for another stack?)", rawURL)
			}
			tok, err := f.Token(ctx)
			if err != nil {
				return nil, fmt.Errorf("GET %s: access token: %w", rawURL, err)
			}
			req.Header.Set("Authorization", "Bearer "+tok)
		case f.Emulator != "" && strings.EqualFold(u.Host, hostOf(f.Emulator)):
			// The local stack: no auth.
		default:
			return nil, fmt.Errorf("%w: url %s asks for an access token, and fhirexport sends Google tokens only to https://%s", ErrManifest, rawURL, CloudStorageHost)
		}
	}
	c := f.Client
	if c == nil {
		c = http.DefaultClient
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", rawURL, err)
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, fmt.Errorf("GET %s: %s: %s", rawURL, resp.Status, strings.TrimSpace(string(body)))
	}
	return resp.Body, nil
}

// hostOf is the host:port of STORAGE_EMULATOR_HOST, given with or without a scheme.
func hostOf(emulator string) string {
	if u, err := url.Parse(emulator); err == nil && u.Host != "" {
		return u.Host
	}
	return strings.TrimRight(emulator, "/")
}
