package mirror

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// files serves a feed's files over HTTP, as the storage emulator does.
type files struct {
	mu    sync.Mutex
	data  map[string]string
	fail  map[string]int // path → status to answer instead
	srv   *httptest.Server
	gets  []string
	token []string // Authorization headers seen
}

func newFiles(t *testing.T) *files {
	f := &files{data: map[string]string{}, fail: map[string]int{}}
	f.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		defer f.mu.Unlock()
		f.gets = append(f.gets, r.URL.Path)
		f.token = append(f.token, r.Header.Get("Authorization"))
		if code := f.fail[r.URL.Path]; code != 0 {
			http.Error(w, "injected", code)
			return
		}
		d, ok := f.data[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		io.WriteString(w, d)
	}))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *files) put(path string, lines ...string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var b strings.Builder
	for _, l := range lines {
		b.WriteString(l + "\n")
	}
	f.data[path] = b.String()
	return f.srv.URL + path
}

func (f *files) fetcher() *Fetcher {
	return &Fetcher{Emulator: strings.TrimPrefix(f.srv.URL, "http://")}
}

func pat(id, v string) string {
	return fmt.Sprintf(`{"id":%q,"meta":{"lastUpdated":"2026-11-26T00:00:0%s.000000+00:00","versionId":"v%s"},"resourceType":"Patient"}`, id, v, v)
}

func obs(id, v string) string {
	return fmt.Sprintf(`{"id":%q,"meta":{"versionId":"v%s"},"resourceType":"Observation"}`, id, v)
}

func del(typ, id string) string {
	return fmt.Sprintf(`{"resourceType":"Bundle","id":"b-%s","type":"transaction","entry":[{"request":{"method":"DELETE","url":"%s/%s"}}]}`, id, typ, id)
}

// feed is a test feed: manifests in transactionTime order.
type feed struct {
	f    *files
	runs []feedRun
}

type feedRun struct {
	run Run
	man *Manifest
}

// add adds a manifest at second sec: since "" is a full export. outputs
// and deleted map a type ("Bundle" for deleted) to its lines.
func (fd *feed) add(t *testing.T, sec int, since string, errs bool, outputs map[string][]string, deleted []string) {
	t.Helper()
	op := fmt.Sprintf("op%d", sec)
	m := map[string]any{
		"transactionTime":     fmt.Sprintf("2026-11-26T00:00:%02dZ", sec),
		"request":             "https://healthcare.googleapis.com/v1/projects/p/locations/l/datasets/d/fhirStores/s:export",
		"requiresAccessToken": true, "deleted": []any{}, "error": []any{},
		"extension": map[string]any{"since": since},
	}
	var out []map[string]any
	for _, typ := range slices.Sorted(mapsKeys(outputs)) {
		n := int64(len(outputs[typ]))
		out = append(out, map[string]any{"type": typ, "url": fd.f.put("/b/"+op+"_"+typ, outputs[typ]...), "count": n})
	}
	m["output"] = out
	if len(deleted) > 0 {
		m["deleted"] = []map[string]any{{"type": "Bundle", "url": fd.f.put("/b/"+op+".deleted.ndjson", deleted...), "count": len(deleted)}}
	}
	if errs {
		m["error"] = []map[string]any{{"type": "OperationOutcome", "url": fd.f.put("/b/"+op+".error.ndjson", `{"resourceType":"OperationOutcome"}`)}}
	}
	data, _ := json.Marshal(m)
	man, err := ParseManifest(data)
	if err != nil {
		t.Fatal(err)
	}
	fd.runs = append(fd.runs, feedRun{Run{ID: "run-" + op, Operation: op, Manifest: "gs://b/" + op + ".manifest.json", Pipeline: "n-p", Store: "s"}, man})
}

func mapsKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

var clock = func() time.Time { return time.Date(2026, 11, 26, 1, 0, 0, 0, time.UTC) }

// pull applies every run of fd newer than dir's cursor.
func (fd *feed) pull(t *testing.T, dir string) error {
	t.Helper()
	m, err := Open(dir, clock)
	if err != nil {
		return err
	}
	defer m.Close()
	for _, r := range fd.runs {
		if c := m.Cursor(); c != nil && !r.man.Time().After(mustTime(t, c.TransactionTime)) {
			continue
		}
		if _, err := m.Apply(context.Background(), r.run, r.man, fd.f.fetcher(), Options{Changes: true}); err != nil {
			return err
		}
	}
	return nil
}

func mustTime(t *testing.T, v string) time.Time {
	t.Helper()
	tt, err := time.Parse(time.RFC3339Nano, v)
	if err != nil {
		t.Fatal(err)
	}
	return tt
}

// folder reads every file of dir but the lock.
func folder(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Name() == lockFile {
			continue
		}
		if e.IsDir() {
			out[e.Name()+"/"] = ""
			continue
		}
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = string(data)
	}
	return out
}

func nd(ls ...string) string { return strings.Join(ls, "\n") + "\n" }

// threeRuns: a full export, an increment with updates, creations and a
// deletion, and an increment re-creating the deleted id.
func threeRuns(t *testing.T) *feed {
	fd := &feed{f: newFiles(t)}
	fd.add(t, 1, "", false, map[string][]string{"Patient": {pat("b", "1"), pat("a", "1"), pat("c", "1")}, "Observation": {obs("o1", "1")}}, nil)
	fd.add(t, 2, "2026-11-26T00:00:01Z", false, map[string][]string{"Patient": {pat("d", "2"), pat("a", "2")}}, []string{del("Patient", "b"), del("Observation", "o1")})
	fd.add(t, 3, "2026-11-26T00:00:02Z", false, map[string][]string{"Patient": {pat("b", "3")}}, nil)
	return fd
}

func TestApplyFollowsTheClientRule(t *testing.T) {
	t.Parallel()
	fd := threeRuns(t)
	dir := t.TempDir()
	if err := fd.pull(t, dir); err != nil {
		t.Fatal(err)
	}
	got := folder(t, dir)
	if want := nd(pat("a", "2"), pat("b", "3"), pat("c", "1"), pat("d", "2")); got["Patient.ndjson"] != want {
		t.Errorf("Patient.ndjson:\n%s\nwant\n%s", got["Patient.ndjson"], want)
	}
	if _, ok := got["Observation.ndjson"]; ok {
		t.Errorf("Observation.ndjson is left, its only resource deleted: %q", got["Observation.ndjson"])
	}
	var c Cursor
	if err := json.Unmarshal([]byte(got[CursorFile]), &c); err != nil {
		t.Fatal(err)
	}
	want := Cursor{Pipeline: "n-p", Store: "s", Run: "run-op3", Operation: "op3", TransactionTime: "2026-11-26T00:00:03Z",
		Manifest: "gs://b/op3.manifest.json", Applied: 3, Resources: map[string]int{"Patient": 4}, Updated: clock()}
	if d := cmp.Diff(want, c); d != "" {
		t.Errorf("cursor (-want +got):\n%s", d)
	}
	var log []string
	for _, l := range strings.Split(strings.TrimSpace(got[ChangesFile]), "\n") {
		var ch Change
		if err := json.Unmarshal([]byte(l), &ch); err != nil {
			t.Fatal(err)
		}
		log = append(log, fmt.Sprintf("%s %s %s/%s %s %s", ch.Operation, ch.Action, ch.Type, ch.ID, ch.VersionID, ch.Reason))
	}
	wantLog := []string{
		"op1 upsert Observation/o1 v1 ", "op1 upsert Patient/a v1 ", "op1 upsert Patient/b v1 ", "op1 upsert Patient/c v1 ",
		"op2 remove Observation/o1 v1 deleted", "op2 upsert Patient/a v2 ", "op2 remove Patient/b v1 deleted", "op2 upsert Patient/d v2 ",
		"op3 upsert Patient/b v3 ",
	}
	if d := cmp.Diff(wantLog, log); d != "" {
		t.Errorf("changes (-want +got):\n%s", d)
	}

	// Pulling again fetches nothing; applying a manifest twice is refused.
	before := len(fd.f.gets)
	if err := fd.pull(t, dir); err != nil {
		t.Fatal(err)
	}
	if n := len(fd.f.gets) - before; n != 0 {
		t.Errorf("a second pull made %d GETs; want none", n)
	}
	m, err := Open(dir, clock)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	r := fd.runs[2]
	if _, err := m.Apply(context.Background(), r.run, r.man, fd.f.fetcher(), Options{}); !errors.Is(err, ErrNotNewer) {
		t.Errorf("applying the last manifest again: %v; want ErrNotNewer", err)
	}
}

func TestSnapshot(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		since string
		types string // the request's _type
		errs  bool
		// snapshot is extension.snapshot: "true", "false" or "" (absent)
		snapshot string
		patient  string
		obs      string
	}{
		// b was deleted unseen (no notification): the full run heals it.
		{name: "full run heals", patient: nd(pat("a", "2")), obs: ""},
		{name: "full run of one type keeps the others", types: "Patient", patient: nd(pat("a", "2")), obs: nd(obs("o1", "1"))},
		{name: "increment only upserts", since: "2026-11-26T00:00:01Z", patient: nd(pat("a", "2"), pat("b", "1")), obs: nd(obs("o1", "1"))},
		{name: "partial full run only upserts", errs: true, patient: nd(pat("a", "2"), pat("b", "1")), obs: nd(obs("o1", "1"))},
		{name: "extension says snapshot", since: "2026-11-26T00:00:01Z", snapshot: "true", patient: nd(pat("a", "2")), obs: ""},
		{name: "extension says no snapshot", snapshot: "false", patient: nd(pat("a", "2"), pat("b", "1")), obs: nd(obs("o1", "1"))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			fd := &feed{f: newFiles(t)}
			fd.add(t, 1, "", false, map[string][]string{"Patient": {pat("a", "1"), pat("b", "1")}, "Observation": {obs("o1", "1")}}, nil)
			fd.add(t, 2, tc.since, tc.errs, map[string][]string{"Patient": {pat("a", "2")}}, nil)
			if tc.types != "" {
				fd.runs[1].man.Request += "?_type=" + tc.types
			}
			if tc.snapshot != "" {
				b := tc.snapshot == "true"
				fd.runs[1].man.Extension.Snapshot = &b
			}
			dir := t.TempDir()
			if err := fd.pull(t, dir); err != nil {
				t.Fatal(err)
			}
			got := folder(t, dir)
			if got["Patient.ndjson"] != tc.patient || got["Observation.ndjson"] != tc.obs {
				t.Errorf("Patient.ndjson:\n%s\nObservation.ndjson:\n%s\nwant\n%s\n%s", got["Patient.ndjson"], got["Observation.ndjson"], tc.patient, tc.obs)
			}
		})
	}
}

// TestInterrupted stops a pull at every step of applying the second manifest,
// as a crash or Ctrl-C would, and pulls again: the folder ends byte for byte
// as an uninterrupted pull leaves it, the changes log included.
func TestInterrupted(t *testing.T) {
	t.Parallel()
	fd := threeRuns(t)
	want := t.TempDir()
	if err := fd.pull(t, want); err != nil {
		t.Fatal(err)
	}
	errCrash := errors.New("crash")
	for _, step := range []string{"downloaded", "committed", "replaced", "logged"} {
		t.Run(step, func(t *testing.T) {
			dir := t.TempDir()
			m, err := Open(dir, clock)
			if err != nil {
				t.Fatal(err)
			}
			r := fd.runs[0]
			if _, err := m.Apply(context.Background(), r.run, r.man, fd.f.fetcher(), Options{Changes: true}); err != nil {
				t.Fatal(err)
			}
			m.crash = func(s string) error {
				if s == step {
					return errCrash
				}
				return nil
			}
			r = fd.runs[1]
			if _, err := m.Apply(context.Background(), r.run, r.man, fd.f.fetcher(), Options{Changes: true}); !errors.Is(err, errCrash) {
				t.Fatalf("Apply: %v; want the crash", err)
			}
			m.Close()
			m, err = Open(dir, clock)
			if err != nil {
				t.Fatal(err)
			}
			committed := step != "downloaded"
			if got := m.Recovered != nil; got != committed {
				t.Errorf("Recovered %v; want %v (committed)", m.Recovered, committed)
			}
			if c := m.Cursor(); c.Operation != map[bool]string{false: "op1", true: "op2"}[committed] {
				t.Errorf("cursor at %s after reopening", c.Operation)
			}
			m.Close()
			if err := fd.pull(t, dir); err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(folder(t, want), folder(t, dir)); d != "" {
				t.Errorf("folder (-uninterrupted +interrupted):\n%s", d)
			}
		})
	}
}

func TestFailedDownloadChangesNothing(t *testing.T) {
	t.Parallel()
	fd := threeRuns(t)
	dir := t.TempDir()
	fd.f.fail["/b/op2.deleted.ndjson"] = http.StatusServiceUnavailable
	err := fd.pull(t, dir)
	if err == nil || !strings.Contains(err.Error(), "503") {
		t.Fatalf("pull: %v; want the 503", err)
	}
	after1 := folder(t, dir)
	var c Cursor
	json.Unmarshal([]byte(after1[CursorFile]), &c)
	if c.Operation != "op1" || after1["Patient.ndjson"] != nd(pat("a", "1"), pat("b", "1"), pat("c", "1")) {
		t.Errorf("after the failed download: cursor %s, Patient.ndjson\n%s", c.Operation, after1["Patient.ndjson"])
	}
	delete(fd.f.fail, "/b/op2.deleted.ndjson")
	if err := fd.pull(t, dir); err != nil {
		t.Fatal(err)
	}
	want := t.TempDir()
	if err := fd.pull(t, want); err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(folder(t, want), folder(t, dir)); d != "" {
		t.Errorf("folder (-uninterrupted +resumed):\n%s", d)
	}
}

func TestApplyRefuses(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		output map[string][]string
		count  int64 // overrides the Patient count when non-zero
		want   string
	}{
		{name: "resource in another type's file", output: map[string][]string{"Patient": {obs("o", "1")}}, want: "Observation/o in the Patient file"},
		{name: "count differs", output: map[string][]string{"Patient": {pat("a", "1")}}, count: 2, want: "1 resources where the manifest counts 2"},
		{name: "not a resource", output: map[string][]string{"Patient": {`{"id":"x"}`}}, want: "not a FHIR resource"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			fd := &feed{f: newFiles(t)}
			fd.add(t, 1, "", false, tc.output, nil)
			if tc.count != 0 {
				fd.runs[0].man.Output[0].Count = &tc.count
			}
			dir := t.TempDir()
			err := fd.pull(t, dir)
			if !errors.Is(err, ErrManifest) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("pull: %v; want ErrManifest saying %q", err, tc.want)
			}
			if got := folder(t, dir); len(got) != 0 {
				t.Errorf("folder after a refused manifest: %v", got)
			}
		})
	}
	for _, bad := range []string{
		`{"transactionTime":"2026-11-26T00:00:00Z","output":[{"type":"../x","url":"http://h/x"}]}`,
		`{"transactionTime":"yesterday","output":[]}`,
		`{"transactionTime":"2026-11-26T00:00:00Z","deleted":[{"type":"Patient","url":"http://h/x"}]}`,
		`{"transactionTime":"2026-11-26T00:00:00Z","request":"https://h/x:export?_type=../p"}`,
	} {
		if _, err := ParseManifest([]byte(bad)); !errors.Is(err, ErrManifest) {
			t.Errorf("ParseManifest(%s): %v; want ErrManifest", bad, err)
		}
	}
}

func TestOpen(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "notes.txt"), []byte("mine"), 0o644)
	if _, err := Open(dir, clock); !errors.Is(err, ErrNotMirror) {
		t.Errorf("Open of a folder with other files: %v; want ErrNotMirror", err)
	}
	dir = filepath.Join(t.TempDir(), "new")
	m, err := Open(dir, clock)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if _, err := Open(dir, clock); !errors.Is(err, ErrBusy) {
		t.Errorf("a second Open: %v; want ErrBusy", err)
	}
}

// roundTrip records requests instead of sending them.
type roundTrip struct{ reqs []*http.Request }

func (rt *roundTrip) RoundTrip(r *http.Request) (*http.Response, error) {
	rt.reqs = append(rt.reqs, r)
	return &http.Response{StatusCode: 200, Body: io.NopCloser(bytes.NewReader(nil)), Request: r}, nil
}

func TestFetcherSendsTokensOnlyToCloudStorage(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		url      string
		token    bool // requiresAccessToken
		noCreds  bool
		wantAuth string
		wantErr  string
	}{
		{url: "https://storage.googleapis.com/b/o_Patient", token: true, wantAuth: "Bearer tok"},
		{url: "https://storage.googleapis.com/b/o_Patient", token: false, wantAuth: ""},
		{url: "https://storage.googleapis.com/b/o_Patient", token: true, noCreds: true, wantErr: "no credentials"},
		{url: "http://127.0.0.1:4443/storage/v1/b/b/o/o_Patient?alt=media", token: true, wantAuth: ""},
		{url: "https://evil.example/b/o_Patient", token: true, wantErr: "sends Google tokens only to https://storage.googleapis.com"},
		{url: "http://storage.googleapis.com/b/o_Patient", token: true, wantErr: "sends Google tokens only"},
		{url: "https://evil.example/b/o_Patient", token: false, wantAuth: ""},
		{url: "gs://b/o_Patient", token: true, wantErr: "not an http(s) URL"},
	} {
		rt := &roundTrip{}
		f := &Fetcher{Client: &http.Client{Transport: rt}, Emulator: "http://127.0.0.1:4443",
			Token: func(context.Context) (string, error) { return "tok", nil }}
		if tc.noCreds {
			f.Token = nil
		}
		body, err := f.Get(context.Background(), tc.url, tc.token)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) || len(rt.reqs) != 0 {
				t.Errorf("Get(%s, token %v): %v after %d requests; want %q before any", tc.url, tc.token, err, len(rt.reqs), tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("Get(%s): %v", tc.url, err)
			continue
		}
		body.Close()
		if got := rt.reqs[0].Header.Get("Authorization"); got != tc.wantAuth {
			t.Errorf("Get(%s, token %v): Authorization %q; want %q", tc.url, tc.token, got, tc.wantAuth)
		}
	}
}
