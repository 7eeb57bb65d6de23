package export

// Security tests of the allow-lists: no spec, however crafted, may export a
// store or to a destination outside FHIREXPORT_ALLOWED_STORES and
// FHIREXPORT_ALLOWED_DESTINATIONS. Every spec goes through Exporter.Start, the
// path the function takes (ParseSpec, AllowStore, ExpandURIPrefix,
// AllowDestination); a spec counts as admitted when Start gets as far as
// claiming the trigger in the state bucket, which here answers 403.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"cloud.google.com/go/storage"
	"google.golang.org/api/healthcare/v1"
	"google.golang.org/api/option"

	"github.com/fhirexport/fhirexport/events"
)

const (
	secStores = "projects/p-1234/locations/us/datasets/clinical/fhirStores/ehr, " +
		"projects/p-1234/locations/us/datasets/*/fhirStores/shared"
	secDests = "gs://allowed-bucket/exports, gs://whole-bucket/, bq://p-1234.ds, bq://example.com:proj-1.ds"

	allowedStore = "projects/p-1234/locations/us/datasets/clinical/fhirStores/ehr"
)

// secTime is every trigger's time, so placeholders expand predictably.
var secTime = time.Date(2026, 11, 26, 1, 2, 3, 0, time.UTC)

// recordingPublisher keeps the published events by trigger id.
type recordingPublisher struct {
	mu     sync.Mutex
	events map[string]events.Event
}

func (p *recordingPublisher) Publish(_ context.Context, e events.Event) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.events[e.Data.Trigger.ID] = e
	return nil
}

func (p *recordingPublisher) get(id string) (events.Event, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	e, ok := p.events[id]
	return e, ok
}

// forbidden answers 403 to every request without touching the network: the
// state bucket and the Healthcare API of these tests.
type forbidden struct{}

func (forbidden) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Body != nil {
		io.Copy(io.Discard, r.Body)
		r.Body.Close()
	}
	return &http.Response{StatusCode: http.StatusForbidden, Status: "403 Forbidden", Request: r, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: http.Header{"Content-Type": {"application/json"}},
		Body:   io.NopCloser(strings.NewReader(`{"error":{"code":403,"message":"state bucket not reachable in this test"}}`))}, nil
}

// gate is an Exporter whose Start stops right after the allow-list checks.
type gate struct {
	x   *Exporter
	pub *recordingPublisher
}

func newGate(t testing.TB, stores, dests string) *gate {
	t.Helper()
	policy, err := ParsePolicy(stores, dests)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	hc := &http.Client{Transport: forbidden{}}
	st, err := storage.NewClient(ctx, option.WithHTTPClient(hc))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	svc, err := healthcare.NewService(ctx, option.WithHTTPClient(hc))
	if err != nil {
		t.Fatal(err)
	}
	pub := &recordingPublisher{events: map[string]events.Event{}}
	return &gate{x: New(svc, NewState(st, "state-bucket", "fx"), pub, policy, func() time.Time { return secTime }), pub: pub}
}

var gateSeq struct {
	sync.Mutex
	n int
}

// admits runs one spec through Exporter.Start and reports whether it passed
// the allow-lists. A rejection must be acknowledged (nil) and reported as a
// rejected event for the trigger.
func (g *gate) admits(t testing.TB, spec []byte) bool {
	t.Helper()
	gateSeq.Lock()
	gateSeq.n++
	id := fmt.Sprintf("sec-%d", gateSeq.n)
	gateSeq.Unlock()
	trig := events.Trigger{Source: "//test/security", ID: id, Time: secTime, Spec: spec}
	err := g.x.Start(context.Background(), trig, nil)
	if err != nil {
		if !strings.Contains(err.Error(), "claim trigger") {
			t.Fatalf("Start(%s) failed before the claim: %v", spec, err)
		}
		if _, published := g.pub.get(id); published {
			t.Fatalf("Start(%s) published an event and then claimed", spec)
		}
		return true
	}
	e, ok := g.pub.get(id)
	if !ok || e.Type != events.TypeRejected || e.Data.Error == nil {
		t.Fatalf("Start(%s) = nil without a rejected event (got %+v)", spec, e)
	}
	return false
}

func gcsSpecJSON(t testing.TB, store, uriPrefix string) []byte {
	t.Helper()
	b, err := json.Marshal(map[string]any{"fhirStore": store, "gcsDestination": map[string]any{"uriPrefix": uriPrefix}})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func bqSpecJSON(t testing.TB, store, datasetURI string) []byte {
	t.Helper()
	b, err := json.Marshal(map[string]any{"fhirStore": store,
		"bigqueryDestination": map[string]any{"datasetUri": datasetURI, "schemaConfig": map[string]any{"schemaType": "ANALYTICS"}}})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func destSpecJSON(t testing.TB, store, dest string) []byte {
	if strings.HasPrefix(dest, "bq://") {
		return bqSpecJSON(t, store, dest)
	}
	return gcsSpecJSON(t, store, dest)
}

func TestAllowListStores(t *testing.T) {
	t.Parallel()
	g := newGate(t, secStores, secDests)
	const dest = "gs://allowed-bucket/exports/{store}"
	tests := []struct {
		name, store string
		want        bool
	}{
		{"listed", allowedStore, true},
		{"wildcard dataset", "projects/p-1234/locations/us/datasets/other/fhirStores/shared", true},
		{"wildcard dataset with dots", "projects/p-1234/locations/us/datasets/a.b/fhirStores/shared", true},
		{"longer store id", allowedStore + "2", false},
		{"store id prefix", strings.TrimSuffix(allowedStore, "r"), false},
		{"case change", strings.Replace(allowedStore, "ehr", "EHR", 1), false},
		{"case change of collection", strings.Replace(allowedStore, "fhirStores", "FhirStores", 1), false},
		{"trailing slash", allowedStore + "/", false},
		{"double slash", strings.Replace(allowedStore, "clinical/", "clinical//", 1), false},
		{"dot-dot dataset", "projects/p-1234/locations/us/datasets/../fhirStores/shared", false},
		{"dot dataset", "projects/p-1234/locations/us/datasets/./fhirStores/shared", false},
		{"dot-dot store", "projects/p-1234/locations/us/datasets/clinical/fhirStores/..", false},
		{"traversal into listed", "projects/p-1234/locations/us/datasets/evil/../clinical/fhirStores/ehr", false},
		{"percent-encoded slash", "projects/p-1234/locations/us/datasets/evil%2F..%2Fclinical/fhirStores/ehr", false},
		{"percent-encoded dots", "projects/p-1234/locations/us/datasets/%2e%2e/fhirStores/shared", false},
		{"leading space", " " + allowedStore, false},
		{"trailing space", allowedStore + " ", false},
		{"trailing newline", allowedStore + "\n", false},
		{"null byte", allowedStore + "\x00", false},
		{"null byte inside", strings.Replace(allowedStore, "ehr", "e\x00hr", 1), false},
		{"cyrillic look-alike", strings.Replace(allowedStore, "clinical", "сlinical", 1), false},
		{"fullwidth letter", strings.Replace(allowedStore, "ehr", "ｅhr", 1), false},
		{"other project", strings.Replace(allowedStore, "p-1234", "p-12345", 1), false},
		{"domain-scoped project", strings.Replace(allowedStore, "p-1234", "example.com:p-1234", 1), false},
		{"other location", strings.Replace(allowedStore, "/us/", "/eu/", 1), false},
		{"wildcard is not a prefix", "projects/p-1234/locations/us/datasets/other/fhirStores/shared2", false},
		{"extra segment", allowedStore + "/fhir", false},
		{"query", allowedStore + "?x=1", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := g.admits(t, gcsSpecJSON(t, tc.store, dest)); got != tc.want {
				t.Errorf("store %q admitted = %v, want %v", tc.store, got, tc.want)
			}
		})
	}
}

func TestAllowListDestinations(t *testing.T) {
	t.Parallel()
	g := newGate(t, secStores, secDests)
	const sharedIn = "projects/p-1234/locations/us/datasets/%s/fhirStores/shared"
	tests := []struct {
		name, store, dest string
		want              bool
	}{
		{"listed prefix", allowedStore, "gs://allowed-bucket/exports", true},
		{"listed prefix, trailing slash", allowedStore, "gs://allowed-bucket/exports/", true},
		{"under the prefix with placeholders", allowedStore, "gs://allowed-bucket/exports/{dataset}/{store}/{date}/{time}/{run}", true},
		{"sibling with the prefix as a prefix", allowedStore, "gs://allowed-bucket/exports-other", false},
		{"inside the sibling", allowedStore, "gs://allowed-bucket/exports-other/x", false},
		{"prefix glued to a placeholder", allowedStore, "gs://allowed-bucket/exports{store}", false},
		{"prefix glued to a dot", allowedStore, "gs://allowed-bucket/exports.{store}", false},
		{"dot-dot out of the prefix", allowedStore, "gs://allowed-bucket/exports/../other", false},
		{"dot-dot at the end", allowedStore, "gs://allowed-bucket/exports/..", false},
		{"dot segment", allowedStore, "gs://allowed-bucket/exports/./x", false},
		{"dot-dot then back in", allowedStore, "gs://allowed-bucket/other/../exports", false},
		{"percent-encoded slash", allowedStore, "gs://allowed-bucket/exports%2F..%2Fother", false},
		{"percent-encoded slash, lower case", allowedStore, "gs://allowed-bucket/exports%2fx", false},
		{"percent-encoded letter", allowedStore, "gs://allowed-bucket/%65xports", false},
		{"percent-encoded bucket separator", allowedStore, "gs://allowed-bucket%2Fexports", false},
		// Cloud Storage object names are literal: this writes objects named
		// exports/%2e%2e/other/…, which are inside exports/.
		{"percent-encoded dots, even inside the allowed prefix", allowedStore, "gs://allowed-bucket/exports/%2e%2e/other", false},
		{"double slash before the path", allowedStore, "gs://allowed-bucket//exports", false},
		{"double slash inside", allowedStore, "gs://allowed-bucket/exports//x", false},
		{"double trailing slash", allowedStore, "gs://allowed-bucket/exports//", false},
		{"case change in the path", allowedStore, "gs://allowed-bucket/Exports", false},
		{"case change in the bucket", allowedStore, "gs://Allowed-Bucket/exports", false},
		{"case change in the scheme", allowedStore, "GS://allowed-bucket/exports", false},
		{"bucket with the allowed one as prefix", allowedStore, "gs://allowed-bucket-evil/exports", false},
		{"bucket with a dotted suffix", allowedStore, "gs://allowed-bucket.evil/exports", false},
		{"shorter bucket", allowedStore, "gs://allowed-bucke/exports", false},
		{"whole bucket when only a prefix is listed", allowedStore, "gs://allowed-bucket", false},
		{"null byte after the prefix", allowedStore, "gs://allowed-bucket/exports\x00/evil", false},
		{"null byte in the bucket", allowedStore, "gs://allowed-bucket\x00/exports", false},
		{"space after the prefix", allowedStore, "gs://allowed-bucket/exports /x", false},
		{"leading space", allowedStore, " gs://allowed-bucket/exports", false},
		{"space after the bucket", allowedStore, "gs://allowed-bucket /exports", false},
		{"tab in the path", allowedStore, "gs://allowed-bucket/exports\t/x", false},
		{"cyrillic a in the bucket", allowedStore, "gs://аllowed-bucket/exports", false},
		{"cyrillic s in the path", allowedStore, "gs://allowed-bucket/exportѕ", false},
		{"division slash", allowedStore, "gs://allowed-bucket/exports∕x", false},
		{"fullwidth solidus", allowedStore, "gs://allowed-bucket/exports／x", false},
		{"backslash", allowedStore, `gs://allowed-bucket/exports\..\other`, false},
		{"one slash after the scheme", allowedStore, "gs:/allowed-bucket/exports", false},
		{"three slashes after the scheme", allowedStore, "gs:///allowed-bucket/exports", false},
		{"https url of the bucket", allowedStore, "https://storage.googleapis.com/allowed-bucket/exports", false},
		{"userinfo", allowedStore, "gs://allowed-bucket@evil/exports", false},
		{"query after the prefix", allowedStore, "gs://allowed-bucket/exports?x", false},
		{"unknown placeholder", allowedStore, "gs://allowed-bucket/exports/{project}", false},
		{"placeholder in the bucket", allowedStore, "gs://{dataset}/exports", false},
		{"placeholder glued to the bucket", allowedStore, "gs://allowed-bucket{store}/exports", false},
		// Placeholders expanding into the prefix, beside it, or into dots.
		{"dataset expands to the prefix", fmt.Sprintf(sharedIn, "exports"), "gs://allowed-bucket/{dataset}", true},
		{"dataset expands to the prefix, store below", fmt.Sprintf(sharedIn, "exports"), "gs://allowed-bucket/{dataset}/{store}", true},
		{"dataset expands beside the prefix", fmt.Sprintf(sharedIn, "exports-other"), "gs://allowed-bucket/{dataset}", false},
		{"dataset with a dot expands beside the prefix", fmt.Sprintf(sharedIn, "exports.evil"), "gs://allowed-bucket/{dataset}", false},
		{"dataset and store glued", fmt.Sprintf(sharedIn, "exports"), "gs://allowed-bucket/{dataset}{store}", false},
		{"dataset of dots is a literal segment", fmt.Sprintf(sharedIn, "..."), "gs://allowed-bucket/exports/{dataset}", true},
		{"dataset of dots cannot climb", fmt.Sprintf(sharedIn, "..."), "gs://allowed-bucket/{dataset}/exports", false},
		{"dot-dot dataset is refused", fmt.Sprintf(sharedIn, ".."), "gs://allowed-bucket/exports/{dataset}/../../other", false},
		{"dot dataset is refused", fmt.Sprintf(sharedIn, "."), "gs://allowed-bucket/exports/{dataset}", false},
		{"dot plus placeholder", fmt.Sprintf(sharedIn, "x"), "gs://allowed-bucket/exports/.{store}", true},
		// A whole bucket.
		{"whole bucket", allowedStore, "gs://whole-bucket", true},
		{"whole bucket, trailing slash", allowedStore, "gs://whole-bucket/", true},
		{"whole bucket, any path", allowedStore, "gs://whole-bucket/a/{store}/{run}", true},
		{"bucket with the whole bucket as prefix", allowedStore, "gs://whole-bucket-2/x", false},
		{"bucket glued to the whole bucket", allowedStore, "gs://whole-bucketx", false},
		{"bucket split by a slash", allowedStore, "gs://whole/bucket", false},
		// BigQuery: the very same dataset only.
		{"dataset", allowedStore, "bq://p-1234.ds", true},
		{"dataset with the listed one as prefix", allowedStore, "bq://p-1234.ds2", false},
		{"dataset case change", allowedStore, "bq://p-1234.DS", false},
		{"shorter dataset", allowedStore, "bq://p-1234.d", false},
		{"project with the listed one as prefix", allowedStore, "bq://p-12345.ds", false},
		{"project case change", allowedStore, "bq://P-1234.ds", false},
		{"dataset with a trailing space", allowedStore, "bq://p-1234.ds ", false},
		{"dataset with a null byte", allowedStore, "bq://p-1234.ds\x00", false},
		{"dataset with a dotted suffix", allowedStore, "bq://p-1234.ds.evil", false},
		{"dataset with a path", allowedStore, "bq://p-1234.ds/x", false},
		{"dataset with a trailing slash", allowedStore, "bq://p-1234.ds/", false},
		{"colon instead of dot", allowedStore, "bq://p-1234:ds", false},
		{"bigquery scheme case change", allowedStore, "BQ://p-1234.ds", false},
		{"domain-scoped project", allowedStore, "bq://example.com:proj-1.ds", true},
		{"domain-scoped project without its domain", allowedStore, "bq://proj-1.ds", false},
		{"domain-scoped project, other subdomain", allowedStore, "bq://evil.example.com:proj-1.ds", false},
		{"domain-scoped project, shorter domain", allowedStore, "bq://example.co:proj-1.ds", false},
		{"domain-scoped project, other dataset", allowedStore, "bq://example.com:proj-1.ds2", false},
		{"listed project under a domain", allowedStore, "bq://example.com:p-1234.ds", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := g.admits(t, destSpecJSON(t, tc.store, tc.dest)); got != tc.want {
				t.Errorf("destination %q (store %s) admitted = %v, want %v", tc.dest, tc.store, got, tc.want)
			}
		})
	}
}

func TestAllowListDenyByDefault(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, stores, dests string }{
		{"both lists empty", "", ""},
		{"only blanks and commas", " , ,", ", , "},
		{"no stores", "", secDests},
		{"no destinations", secStores, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			g := newGate(t, tc.stores, tc.dests)
			for _, dest := range []string{"gs://allowed-bucket/exports", "gs://whole-bucket", "bq://p-1234.ds"} {
				if g.admits(t, destSpecJSON(t, allowedStore, dest)) {
					t.Errorf("stores %q, destinations %q admitted %s", tc.stores, tc.dests, dest)
				}
			}
			// The rejection names the empty variable, not the spec, as the cause.
			for _, e := range g.pub.events {
				if !strings.Contains(e.Data.Error.Message, "is empty, so nothing may be exported") {
					t.Errorf("rejection does not say the allow-list is empty: %s", e.Data.Error.Message)
				}
			}
		})
	}
}

// TestAllowListProperty mutates destinations and stores at random and checks,
// against an independent reading of the allow-lists, that whatever Start
// admits is inside them (soundness) and that valid specs inside them are
// admitted (so the test cannot pass by refusing everything).
func TestAllowListProperty(t *testing.T) {
	t.Parallel()
	g := newGate(t, secStores, secDests)
	allowedGCS := []struct {
		bucket string
		segs   []string
	}{{"allowed-bucket", []string{"exports"}}, {"whole-bucket", nil}}
	allowedBQ := []string{"bq://p-1234.ds", "bq://example.com:proj-1.ds"}
	storePatterns := [][]string{strings.Split(allowedStore, "/"), strings.Split("projects/p-1234/locations/us/datasets/*/fhirStores/shared", "/")}

	buckets := []string{"allowed-bucket", "allowed-bucket", "whole-bucket", "whole-bucket", "allowed-bucket-evil", "allowed-bucke",
		"whole-bucket-2", "allowed-bucket.evil", "Allowed-Bucket", "аllowed-bucket", "allowed-bucket ", "other-bucket", "", "allowed-bucket%2F"}
	segments := []string{"exports", "exports", "exports", "x", "exports-other", "Exports", "exports.", "exportѕ", ".", "..", "", "...",
		"%2e%2e", "%2F", "%2f..%2f", "{store}", "{dataset}", "{date}", "{time}", "{run}", ".{store}", "{dataset}{store}", "exports{store}",
		"{dataset}.", " ", "\x00", "a b", `\`, "?", "#", "∕", "{project}", "{", "exports/..", "ö"}
	datasets := []string{"clinical", "exports", "exports-other", "exports.evil", "...", "a.b", "x", "..", "."}
	bqs := []string{"bq://p-1234.ds", "bq://p-1234.ds2", "bq://p-1234.DS", "bq://p-12345.ds", "bq://example.com:proj-1.ds",
		"bq://proj-1.ds", "bq://evil.example.com:proj-1.ds", "bq://p-1234.ds ", "bq://p-1234.d", "bq://example.com:p-1234.ds", "bq://p-1234.ds/"}

	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	seed := rng.Int63()
	rng.Seed(seed)
	t.Logf("seed %d", seed)
	n := 20000
	if testing.Short() {
		n = 2000
	}
	var admitted int
	for i := 0; i < n; i++ {
		store := allowedStore
		switch rng.Intn(4) {
		case 0:
			store = fmt.Sprintf("projects/p-1234/locations/us/datasets/%s/fhirStores/shared", datasets[rng.Intn(len(datasets))])
		case 1:
			store = fmt.Sprintf("projects/p-1234/locations/us/datasets/%s/fhirStores/%s", datasets[rng.Intn(len(datasets))],
				[]string{"ehr", "shared", "shared2", "EHR", ".", "e.h.r"}[rng.Intn(6)])
		}
		var dest string
		if rng.Intn(6) == 0 {
			dest = bqs[rng.Intn(len(bqs))]
		} else {
			var parts []string
			for range rng.Intn(5) {
				parts = append(parts, segments[rng.Intn(len(segments))])
			}
			dest = "gs://" + buckets[rng.Intn(len(buckets))]
			if len(parts) > 0 || rng.Intn(3) == 0 {
				dest += "/" + strings.Join(parts, "/")
			}
			if rng.Intn(4) == 0 {
				dest += "/"
			}
			if rng.Intn(20) == 0 {
				dest = []string{"GS://", "gs:/", "gs:///", " gs://"}[rng.Intn(4)] + strings.TrimPrefix(dest, "gs://")
			}
		}
		spec := destSpecJSON(t, store, dest)
		got := g.admits(t, spec)

		storeInside := slices.ContainsFunc(storePatterns, func(p []string) bool { return segmentsMatch(p, strings.Split(store, "/")) })
		var expanded string
		var destInside bool
		if strings.HasPrefix(dest, "bq://") {
			expanded = dest
			destInside = slices.Contains(allowedBQ, dest)
		} else {
			expanded = ExpandURIPrefix(dest, store, RunKey("//test/security", "x")[:16], secTime) // run ids are hex: any will do
			bucket, segs, ok := splitGCS(expanded)
			destInside = ok && slices.ContainsFunc(allowedGCS, func(a struct {
				bucket string
				segs   []string
			}) bool {
				return bucket == a.bucket && len(segs) >= len(a.segs) && slices.Equal(segs[:len(a.segs)], a.segs)
			})
		}
		if got {
			admitted++
			if !storeInside {
				t.Fatalf("seed %d: admitted store %q outside the allow-list (spec %s)", seed, store, spec)
			}
			if !destInside {
				t.Fatalf("seed %d: admitted destination %q (expanded %q) outside the allow-list (spec %s)", seed, dest, expanded, spec)
			}
			continue
		}
		if _, err := ParseSpec(spec); err == nil && storeInside && destInside {
			t.Fatalf("seed %d: refused a valid spec inside the allow-lists: %s", seed, spec)
		}
	}
	t.Logf("%d specs, %d admitted", n, admitted)
	if admitted < n/50 {
		t.Errorf("only %d of %d generated specs were admitted: the generator no longer explores the allowed side", admitted, n)
	}
}

// segmentsMatch is the allow-list's store rule read independently: the same
// number of segments, each equal to the pattern's or matched by "*".
func segmentsMatch(pattern, segs []string) bool {
	if len(pattern) != len(segs) {
		return false
	}
	for i := range pattern {
		if pattern[i] != "*" && pattern[i] != segs[i] {
			return false
		}
	}
	return true
}

// splitGCS splits an expanded gs:// destination into its bucket and path
// segments (one trailing slash ignored). ok is false when the destination
// cannot be read as a plain object prefix: an empty, "." or ".." segment, or
// a control character, anywhere.
func splitGCS(dest string) (bucket string, segs []string, ok bool) {
	rest, found := strings.CutPrefix(dest, "gs://")
	if !found || strings.ContainsFunc(rest, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return "", nil, false
	}
	rest = strings.TrimSuffix(rest, "/")
	bucket, path, _ := strings.Cut(rest, "/")
	if bucket == "" {
		return "", nil, false
	}
	if path == "" {
		return bucket, nil, true
	}
	segs = strings.Split(path, "/")
	for _, s := range segs {
		if s == "" || s == "." || s == ".." {
			return "", nil, false
		}
	}
	return bucket, segs, true
}
