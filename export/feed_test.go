package export

// Tests of the feed (feed.go): tombstones from change notifications, Bulk
// Data manifests and deleted files, against fake-gcs-server through the real
// Cloud Storage client.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"cloud.google.com/go/storage"
	"github.com/google/go-cmp/cmp"
	"github.com/googleapis/gax-go/v2"
	healthcare "google.golang.org/api/healthcare/v1"
	"google.golang.org/api/iterator"
	"google.golang.org/api/option"

	"github.com/fhirexport/fhirexport/events"
	"github.com/fhirexport/fhirexport/healthcaretest"
	"github.com/fhirexport/fhirexport/healthcaretest/bulkdatatest"
	"github.com/fhirexport/fhirexport/healthcaretest/stacktest"
)

const feedStore = testLocation + "/datasets/d/fhirStores/s"

// testClock is a settable clock for the Exporter.
type testClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *testClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *testClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// feedWorld is fake-gcs-server, a storage client, the Healthcare emulator on
// the same clock (the Exporter reads resource history from it) and an
// Exporter that needs no Pub/Sub.
type feedWorld struct {
	x      *Exporter
	st     *storage.Client
	hc     *healthcare.Service
	emu    *healthcaretest.Server
	clock  *testClock
	gcsURL string // the stack's Cloud Storage
	again  int    // calls made again after a failure (feedWorld.retry)
}

func newFeedWorld(t *testing.T) *feedWorld {
	t.Helper()
	clock := &testClock{t: time.Date(2026, 11, 26, 10, 0, 0, 0, time.UTC)}
	s := stacktest.New(t, stacktest.Options{Buckets: []string{"state", exportsBkt}, Healthcare: healthcaretest.Options{Clock: clock}})
	x := newFeedExporter(t, s.Storage, s.HealthcareService, clock)
	x.FileURL = EmulatorFileURL(s.GCSURL)
	return &feedWorld{x: x, st: s.Storage, hc: s.HealthcareService, emu: s.Healthcare, clock: clock, gcsURL: s.GCSURL}
}

// newFeedWorldFronted is newFeedWorld with the Exporter's Cloud Storage
// requests going through front (the test's own go directly). The client
// retries with short waits: the faults are many, the clock is ours.
func newFeedWorldFronted(t *testing.T, front func(http.Handler) http.Handler) *feedWorld {
	t.Helper()
	w := newFeedWorld(t)
	srv := httptest.NewServer(front(proxyTo(t, w.gcsURL)))
	t.Cleanup(srv.Close)
	st, err := storage.NewClient(context.Background(), option.WithEndpoint(srv.URL+"/storage/v1/"), option.WithoutAuthentication(), storage.WithJSONReads())
	if err != nil {
		t.Fatal(err)
	}
	st.SetRetry(storage.WithBackoff(gax.Backoff{Initial: time.Millisecond, Max: 20 * time.Millisecond}))
	t.Cleanup(func() { st.Close() })
	w.x = newFeedExporter(t, st, w.hc, w.clock)
	w.x.FileURL = EmulatorFileURL(w.gcsURL) // a client fetches from the storage itself
	return w
}

func newFeedExporter(t *testing.T, st *storage.Client, hc *healthcare.Service, clock *testClock) *Exporter {
	t.Helper()
	policy, err := ParsePolicy(testLocation+"/datasets/*/fhirStores/*", "gs://"+exportsBkt)
	if err != nil {
		t.Fatal(err)
	}
	return New(hc, NewState(st, "state", "fx"), nil, policy, clock.Now)
}

// deletion is a DeleteResource notification of store/fhir/typ/id at `at`,
// published `latency` later.
func deletion(typ, id string, at time.Time, latency time.Duration, msg string) events.Notification {
	return events.Notification{Resource: feedStore + "/fhir/" + typ + "/" + id, ResourceType: typ, ID: id, Action: events.ActionDelete,
		Store: feedStore, PayloadType: events.PayloadNameOnly, VersionID: "v" + msg, LastUpdated: at.Truncate(time.Second),
		MessageID: msg, PublishTime: at.Add(latency).Truncate(time.Millisecond)}
}

func (w *feedWorld) objects(t *testing.T, bucket, prefix string) []string {
	t.Helper()
	var out []string
	it := w.st.Bucket(bucket).Objects(context.Background(), &storage.Query{Prefix: prefix})
	for {
		a, err := it.Next()
		if errors.Is(err, iterator.Done) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, a.Name)
	}
}

// read returns an object's content: a gs:// URL through the storage client,
// any other URL as a Bulk Data client fetches a manifest's url, with GET,
// and then it must be served as application/fhir+ndjson (or
// application/json, for a manifest).
func (w *feedWorld) read(t *testing.T, gsURL string) []byte {
	t.Helper()
	if !strings.HasPrefix(gsURL, "gs://") {
		return fetch(t, gsURL)
	}
	bucket, name, _ := strings.Cut(strings.TrimPrefix(gsURL, "gs://"), "/")
	r, err := w.st.Bucket(bucket).Object(name).NewReader(context.Background())
	if err != nil {
		t.Fatalf("read %s: %v", gsURL, err)
	}
	defer r.Close()
	data, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// fetch GETs a manifest's url as a Bulk Data client does.
func fetch(t *testing.T, u string) []byte {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	want := "application/fhir+ndjson"
	if strings.Contains(u, ".manifest.json") {
		want = "application/json"
	}
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != want {
		t.Fatalf("GET %s: %s, Content-Type %q; want 200 and %s: %s", u, resp.Status, resp.Header.Get("Content-Type"), want, data)
	}
	return data
}

func (w *feedWorld) put(t *testing.T, bucket, name, data string) {
	t.Helper()
	wr := w.st.Bucket(bucket).Object(name).NewWriter(context.Background())
	wr.ContentType = "application/fhir+ndjson" // as the export writes its files
	if _, err := io.WriteString(wr, data); err != nil {
		t.Fatal(err)
	}
	if err := wr.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestRecordChange(t *testing.T) {
	t.Parallel()
	w := newFeedWorld(t)
	ctx := context.Background()
	at := w.clock.Now().Add(-time.Minute)
	n := deletion("Patient", "p-1", at.Add(300*time.Millisecond), 20*time.Millisecond, "m-1")
	if err := w.x.RecordChange(ctx, n); err != nil {
		t.Fatal(err)
	}
	dir := "fx/" + tombstoneDir(feedStore) + "/"
	objs := w.objects(t, "state", dir)
	if len(objs) != 1 {
		t.Fatalf("tombstones after one deletion: %q", objs)
	}
	wantName := dir + "20261126T100000.000000000Z-" + tombstoneKey(n) + ".json"
	if objs[0] != wantName {
		t.Errorf("tombstone %s, want %s", objs[0], wantName)
	}
	var rec tombstoneRecord
	if err := json.Unmarshal(w.read(t, "gs://state/"+objs[0]), &rec); err != nil {
		t.Fatal(err)
	}
	want := tombstoneRecord{Store: feedStore, Type: "Patient", ID: "p-1", Deleted: at.Add(320 * time.Millisecond),
		LastUpdated: at, VersionID: "vm-1", Recorded: w.clock.Now(), MessageID: "m-1"}
	if diff := cmp.Diff(want, rec); diff != "" {
		t.Errorf("tombstone (-want +got):\n%s", diff)
	}

	// A redelivery at the same instant writes nothing new; a later one writes
	// a second object with the same key (writeFeed delivers the key once).
	if err := w.x.RecordChange(ctx, n); err != nil {
		t.Fatal(err)
	}
	if objs := w.objects(t, "state", dir); len(objs) != 1 {
		t.Errorf("tombstones after an immediate redelivery: %q", objs)
	}
	w.clock.Advance(time.Second)
	if err := w.x.RecordChange(ctx, n); err != nil {
		t.Fatal(err)
	}
	objs = w.objects(t, "state", dir)
	if len(objs) != 2 || !strings.HasSuffix(objs[1], "-"+tombstoneKey(n)+".json") {
		t.Errorf("tombstones after a later redelivery: %q", objs)
	}
}

// TestRecordChangeCheapPaths: every action but a deletion, and a deletion of
// a store off the allow-list, are answered without a single request to the
// state bucket; a deletion whose write fails returns an error (redelivery).
func TestRecordChangeCheapPaths(t *testing.T) {
	t.Parallel()
	var requests atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		http.Error(w, `{"error":{"code":503,"message":"unavailable"}}`, http.StatusServiceUnavailable)
	}))
	t.Cleanup(srv.Close)
	st, err := storage.NewClient(context.Background(), option.WithEndpoint(srv.URL+"/storage/v1/"), option.WithoutAuthentication(), storage.WithJSONReads())
	if err != nil {
		t.Fatal(err)
	}
	x := newFeedExporter(t, st, nil, &testClock{t: time.Date(2026, 11, 26, 10, 0, 0, 0, time.UTC)})
	at := time.Date(2026, 11, 26, 9, 0, 0, 0, time.UTC)
	for _, action := range []string{events.ActionCreate, events.ActionUpdate, events.ActionPatch} {
		n := deletion("Patient", "p-1", at, 0, "m")
		n.Action = action
		if err := x.RecordChange(context.Background(), n); err != nil {
			t.Errorf("%s: %v", action, err)
		}
	}
	foreign := deletion("Patient", "p-1", at, 0, "m")
	foreign.Store = "projects/other/locations/us/datasets/d/fhirStores/s"
	if err := x.RecordChange(context.Background(), foreign); err != nil {
		t.Errorf("foreign store: %v", err)
	}
	if n := requests.Load(); n != 0 {
		t.Fatalf("%d requests to the state bucket for notifications that must write nothing", n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := x.RecordChange(ctx, deletion("Patient", "p-1", at, 0, "m")); err == nil {
		t.Error("a deletion whose tombstone could not be written was acknowledged")
	}
	if requests.Load() == 0 {
		t.Error("a deletion wrote nothing")
	}
}

// feedRun is a finished run to pass to writeFeed.
func feedRun(dest, op string, createTime time.Time, types []string, incremental bool, failures int64) (pendingRecord, *healthcare.Operation, *healthcare.OperationMetadata) {
	p := pendingRecord{Run: "r-" + op, Trigger: events.TriggerRef{Source: "//test", ID: "t-" + op}, Pipeline: "n-pipe", Store: feedStore,
		Name: "pipe", Destination: dest, Types: types, Incremental: incremental, Operation: testLocation + "/datasets/d/operations/" + op}
	meta := &healthcare.OperationMetadata{CreateTime: createTime.Format(time.RFC3339Nano), EndTime: createTime.Add(time.Minute).Format(time.RFC3339Nano),
		LogsUrl: "https://console.cloud.google.com/logs/query/x", Counter: &healthcare.ProgressCounter{Success: 10, Failure: failures}}
	return p, &healthcare.Operation{Name: p.Operation, Done: true}, meta
}

func TestWriteFeedManifest(t *testing.T) {
	t.Parallel()
	w := newFeedWorld(t)
	ctx := context.Background()
	for _, name := range []string{"m/op-1_Patient", "m/op-1_Observation", "m/op-10_Patient", "m/op-1.other", "m/sub/op-1_Patient"} {
		w.put(t, exportsBkt, name, `{"resourceType":"X","id":"1"}`+"\n")
	}
	ct := time.Date(2026, 11, 26, 9, 0, 0, 123456000, time.UTC)
	p, op, meta := feedRun("gs://"+exportsBkt+"/m/", "op-1", ct, []string{"Patient", "Observation"}, false, 2)
	p.Since = "2026-11-25T00:00:00Z"
	res, err := w.x.writeFeed(ctx, p, op, meta, events.TypePartial, nil)
	if err != nil {
		t.Fatal(err)
	}
	base := "gs://" + exportsBkt + "/m/op-1"
	web := w.gcsURL + "/storage/v1/b/" + exportsBkt + "/o/m%2Fop-1"
	wantRes := feedResult{Manifest: base + ".manifest.json", ManifestURL: web + ".manifest.json?alt=media", Outputs: []events.Output{
		{Type: "Observation", URL: base + "_Observation"}, {Type: "Patient", URL: base + "_Patient"}}}
	if diff := cmp.Diff(wantRes, res, cmp.AllowUnexported(deletionCursor{})); diff != "" {
		t.Errorf("result (-want +got):\n%s", diff)
	}
	var got map[string]any
	if err := json.Unmarshal(w.read(t, res.ManifestURL), &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"transactionTime":     "2026-11-26T09:00:00.123456Z",
		"request":             "https://healthcare.googleapis.com/v1/" + feedStore + ":export",
		"requiresAccessToken": true,
		"output": []any{
			map[string]any{"type": "Observation", "url": web + "_Observation?alt=media"},
			map[string]any{"type": "Patient", "url": web + "_Patient?alt=media"},
		},
		"deleted": []any{},
		"error":   []any{map[string]any{"type": "OperationOutcome", "url": web + ".error.ndjson?alt=media"}},
		"extension": map[string]any{
			"operation": op.Name, "pipeline": "n-pipe", "name": "pipe", "store": feedStore,
			"types": []any{"Patient", "Observation"}, "since": "2026-11-25T00:00:00Z", "outcome": "partial", "snapshot": false,
			"counters": map[string]any{"success": 10.0, "failure": 2.0, "pending": 0.0},
			"logsUrl":  meta.LogsUrl, "trigger": map[string]any{"source": "//test", "id": "t-op-1"},
			"gcs": map[string]any{
				"manifest": base + ".manifest.json",
				"output": []any{
					map[string]any{"type": "Observation", "url": base + "_Observation"},
					map[string]any{"type": "Patient", "url": base + "_Patient"},
				},
				"deleted": []any{},
				"error":   []any{map[string]any{"type": "OperationOutcome", "url": base + ".error.ndjson"}},
			},
		},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("manifest (-want +got):\n%s", diff)
	}
	var oo struct {
		ResourceType string `json:"resourceType"`
		Issue        []struct{ Severity, Code, Diagnostics string }
	}
	if err := json.Unmarshal(w.read(t, web+".error.ndjson?alt=media"), &oo); err != nil {
		t.Fatal(err)
	}
	if oo.ResourceType != "OperationOutcome" || len(oo.Issue) != 1 || !strings.Contains(oo.Issue[0].Diagnostics, "2 resources failed") ||
		!strings.Contains(oo.Issue[0].Diagnostics, meta.LogsUrl) {
		t.Errorf("error file: %+v", oo)
	}

	// A retry (after a crash) finds the manifest and answers the same,
	// even when more output appeared meanwhile.
	w.put(t, exportsBkt, "m/op-1_Encounter", "{}\n")
	again, err := w.x.writeFeed(ctx, p, op, meta, events.TypePartial, nil)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(res, again, cmp.AllowUnexported(deletionCursor{})); diff != "" {
		t.Errorf("retry (-first +retry):\n%s", diff)
	}

	// Failed runs and BigQuery runs get no feed files.
	for _, tc := range []struct{ dest, outcome string }{{"gs://" + exportsBkt + "/f", events.TypeFailed}, {"bq://p.ds", events.TypeSucceeded}} {
		p, op, meta := feedRun(tc.dest, "op-2", ct, nil, true, 0)
		res, err := w.x.writeFeed(ctx, p, op, meta, tc.outcome, &deletionCursor{Through: ct})
		if err != nil || res.Manifest != "" || res.Cursor != nil {
			t.Errorf("%s %s: %+v, %v; want no feed", tc.dest, tc.outcome, res, err)
		}
	}
	if objs := w.objects(t, exportsBkt, "f"); len(objs) != 0 {
		t.Errorf("a failed run wrote %q", objs)
	}
}

func TestWriteFeedDeletions(t *testing.T) {
	t.Parallel()
	w := newFeedWorld(t)
	ctx := context.Background()
	dest := "gs://" + exportsBkt + "/d"
	types := []string{"Patient", "Observation"}
	record := func(n events.Notification) {
		t.Helper()
		if err := w.x.RecordChange(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	deletedIn := func(res feedResult) []string { return w.deletedIn(t, res) }

	// First run: a full export, no deleted file; the cursor starts at its createTime.
	ct1 := w.clock.Now()
	p, op, meta := feedRun(dest, "op-1", ct1, types, true, 0)
	res, err := w.x.writeFeed(ctx, p, op, meta, events.TypeSucceeded, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.Deleted == nil || *res.Deleted != 0 || res.Cursor == nil || !res.Cursor.Through.Equal(ct1) || len(res.Cursor.Recent) != 0 {
		t.Fatalf("first run: deleted %v, cursor %+v; want 0 and a cursor at %s", res.Deleted, res.Cursor, ct1)
	}
	cursor := res.Cursor

	// Deletions: two of the pipeline's types (one delivered twice), one not.
	w.clock.Advance(time.Minute)
	d1 := deletion("Patient", "a", w.clock.Now().Add(-30*time.Second), 5*time.Millisecond, "1")
	record(d1)
	record(deletion("Encounter", "e", w.clock.Now().Add(-20*time.Second), 5*time.Millisecond, "2"))
	w.clock.Advance(time.Second)
	record(d1) // redelivered: a second object, the same key
	record(deletion("Observation", "o", w.clock.Now().Add(-10*time.Second), 5*time.Millisecond, "3"))
	w.clock.Advance(time.Minute)

	ct2 := w.clock.Now()
	p, op, meta = feedRun(dest, "op-2", ct2, types, true, 0)
	res, err = w.x.writeFeed(ctx, p, op, meta, events.TypeSucceeded, cursor)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"Patient/a@" + deletionTime(d1).Format(time.RFC3339Nano),
		"Observation/o@" + ct2.Add(-time.Minute-10*time.Second+5*time.Millisecond).Format(time.RFC3339Nano),
	}
	if diff := cmp.Diff(want, deletedIn(res)); diff != "" {
		t.Errorf("deleted file (-want +got):\n%s", diff)
	}
	if res.Deleted == nil || *res.Deleted != 2 {
		t.Errorf("deleted count %v, want 2", res.Deleted)
	}
	m := w.manifest(t, res.Manifest)
	if len(m.Deleted) != 1 || m.Deleted[0].Type != "Bundle" || m.Deleted[0].URL != w.x.fileURL(exportsBkt, "d/op-2.deleted.ndjson") ||
		len(m.Extension.GCS.Deleted) != 1 || m.Extension.GCS.Deleted[0].URL != dest+"/op-2.deleted.ndjson" {
		t.Fatalf("manifest deleted = %+v, extension.gcs.deleted %+v", m.Deleted, m.Extension.GCS.Deleted)
	}
	firstLine, _, _ := strings.Cut(string(w.read(t, m.Deleted[0].URL)), "\n")
	wantLine := `{"resourceType":"Bundle","id":"` + tombstoneKey(d1) + `","meta":{"lastUpdated":"` + deletionTime(d1).Format(time.RFC3339Nano) +
		`"},"type":"transaction","entry":[{"request":{"method":"DELETE","url":"Patient/a"}}]}`
	if firstLine != wantLine {
		t.Errorf("deleted file line\n got %s\nwant %s", firstLine, wantLine)
	}
	if res.Cursor == nil || !res.Cursor.Through.Equal(ct2) || len(res.Cursor.Recent) != 2 {
		t.Fatalf("cursor after run 2: %+v; want through %s with both keys recent", res.Cursor, ct2)
	}
	cursor = res.Cursor

	// A late notification for a deletion before run 2's snapshot reaches run 3,
	// and nothing run 2 delivered is delivered again, though run 3 lists
	// from inside the margin.
	w.clock.Advance(time.Minute)
	late := deletion("Patient", "b", ct2.Add(-5*time.Minute), 5*time.Millisecond, "4")
	record(late)
	// A writer that began before run 2 listed, and finished after: its
	// recordedAt is before run 2's cursor.
	slow := newFeedExporter(t, w.st, w.hc, &testClock{t: ct2.Add(-3 * time.Minute)})
	inFlight := deletion("Observation", "slow", ct2.Add(-4*time.Minute), 5*time.Millisecond, "7")
	if err := slow.RecordChange(ctx, inFlight); err != nil {
		t.Fatal(err)
	}
	w.clock.Advance(time.Minute)
	p, op, meta = feedRun(dest, "op-3", w.clock.Now(), types, true, 0)
	res3, err := w.x.writeFeed(ctx, p, op, meta, events.TypeSucceeded, cursor)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"Patient/b@" + deletionTime(late).Format(time.RFC3339Nano),
		"Observation/slow@" + deletionTime(inFlight).Format(time.RFC3339Nano)}, deletedIn(res3)); diff != "" {
		t.Errorf("run 3 deleted file (-want +got):\n%s", diff)
	}

	// A crash after the deleted file but before the manifest (or a second
	// finalizer after the first lost its lease): the retry delivers the file
	// the first attempt wrote, with that attempt's cursor, even though more
	// has arrived since; the next run delivers the rest. Rewriting the file
	// could leave a manifest of the other attempt naming a file it did not
	// write, with a cursor past deletions it does not hold.
	if err := w.st.Bucket(exportsBkt).Object("d/op-3.manifest.json").Delete(ctx); err != nil {
		t.Fatal(err)
	}
	more := deletion("Observation", "o2", w.clock.Now(), 5*time.Millisecond, "5")
	record(more)
	w.clock.Advance(time.Minute)
	retry, err := w.x.writeFeed(ctx, p, op, meta, events.TypeSucceeded, cursor)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(deletedIn(res3), deletedIn(retry)); diff != "" || *retry.Deleted != 2 {
		t.Errorf("retry after a crash delivered (-first attempt +retry, count %v):\n%s", *retry.Deleted, diff)
	}
	if !retry.Cursor.Through.Equal(res3.Cursor.Through) {
		t.Errorf("retry's cursor is through %s, the file it delivers through %s", retry.Cursor.Through, res3.Cursor.Through)
	}
	for _, k := range res3.Cursor.Recent {
		if !slices.Contains(retry.Cursor.Recent, k) {
			t.Errorf("retry's cursor %+v lost the recent key %s of the first attempt's", retry.Cursor, k)
		}
	}
	w.clock.Advance(time.Minute)
	p4, op4, meta4 := feedRun(dest, "op-4", w.clock.Now(), types, true, 0)
	next, err := w.x.writeFeed(ctx, p4, op4, meta4, events.TypeSucceeded, retry.Cursor)
	if err != nil {
		t.Fatal(err)
	}
	if got := deletedIn(next); len(got) != 1 || !strings.HasPrefix(got[0], "Observation/o2@") {
		t.Errorf("the run after the retry delivered %q, want o2 alone", got)
	}
	// With the manifest in place, a further retry answers exactly the same.
	record(deletion("Patient", "c", w.clock.Now(), 5*time.Millisecond, "6"))
	again, err := w.x.writeFeed(ctx, p, op, meta, events.TypeSucceeded, cursor)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(retry, again, cmp.AllowUnexported(deletionCursor{})); diff != "" {
		t.Errorf("retry with the manifest in place (-before +after):\n%s", diff)
	}
}

func TestWriteFeedDeletionsExpired(t *testing.T) {
	t.Parallel()
	w := newFeedWorld(t)
	now := w.clock.Now()
	for _, tc := range []struct {
		age     time.Duration
		expired bool
	}{
		{TombstoneRetention - tombstoneMargin - time.Hour, false},
		{TombstoneRetention - tombstoneMargin, true},
		{TombstoneRetention + 24*time.Hour, true},
	} {
		op := fmt.Sprintf("op-%d", tc.age/time.Hour)
		p, o, meta := feedRun("gs://"+exportsBkt+"/x", op, now, nil, true, 0)
		_, err := w.x.writeFeed(context.Background(), p, o, meta, events.TypeSucceeded, &deletionCursor{Through: now.Add(-tc.age)})
		if got := errors.Is(err, ErrDeletionsExpired); got != tc.expired {
			t.Errorf("cursor %s old: error %v, want expired=%v", tc.age, err, tc.expired)
		}
		if tc.expired && !strings.Contains(fmt.Sprint(err), "reset its watermark") {
			t.Errorf("the error does not tell the operator what to do: %v", err)
		}
	}
}

func (w *feedWorld) manifest(t *testing.T, gsURL string) bulkManifest {
	t.Helper()
	var m bulkManifest
	if err := json.Unmarshal(w.read(t, gsURL), &m); err != nil {
		t.Fatalf("manifest %s: %v", gsURL, err)
	}
	return m
}

func (w *feedWorld) bundles(t *testing.T, gsURL string) []deletedBundle {
	t.Helper()
	var out []deletedBundle
	sc := bufio.NewScanner(strings.NewReader(string(w.read(t, gsURL))))
	for sc.Scan() {
		var b deletedBundle
		if err := json.Unmarshal(sc.Bytes(), &b); err != nil {
			t.Fatalf("%s: %v", gsURL, err)
		}
		if b.ResourceType != "Bundle" || b.Type != "transaction" || len(b.Entry) != 1 || b.Entry[0].Request.Method != "DELETE" {
			t.Fatalf("%s: line %s is not a transaction Bundle with one DELETE", gsURL, sc.Bytes())
		}
		out = append(out, b)
	}
	return out
}

// TestDeletionTime: lastUpdatedTime has whole seconds; the publish time
// orders a deletion against writes earlier and later in the same second.
func TestDeletionTime(t *testing.T) {
	t.Parallel()
	s := time.Date(2026, 11, 26, 10, 0, 0, 0, time.UTC)
	ms := time.Millisecond
	tests := []struct {
		name          string
		deleted       time.Time
		latency       time.Duration
		after, before time.Time // the deletion time must be strictly between
		want          time.Time // when not zero, exactly
	}{
		{name: "written earlier in the second", deleted: s.Add(700 * ms), latency: 5 * ms, after: s.Add(300 * ms), before: s.Add(time.Second)},
		{name: "re-created later in the second", deleted: s.Add(200 * ms), latency: 5 * ms, after: s.Add(-time.Second), before: s.Add(600 * ms)},
		{name: "published next second", deleted: s.Add(999 * ms), latency: 30 * ms, want: s.Add(time.Second - time.Microsecond)},
		{name: "publish time before the second (skew)", deleted: s, latency: -2 * time.Second, want: s},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			n := deletion("Patient", "p", tc.deleted, tc.latency, "m")
			got := deletionTime(n)
			if !tc.want.IsZero() {
				if !got.Equal(tc.want) {
					t.Errorf("deletionTime = %s, want %s", got.Format(time.RFC3339Nano), tc.want.Format(time.RFC3339Nano))
				}
				return
			}
			if !got.After(tc.after) || !got.Before(tc.before) {
				t.Errorf("deletionTime = %s, want between %s and %s", got.Format(time.RFC3339Nano), tc.after.Format(time.RFC3339Nano), tc.before.Format(time.RFC3339Nano))
			}
		})
	}
}

// TestWriteFeedBigQueryDeletedPrefix: an incremental BigQuery run with
// deletedUriPrefix gets the feed a Cloud Storage run has beside its export:
// a manifest (no output: the rows are in BigQuery, named in its extension)
// and the deleted file, and its deletion cursor moves. Without the prefix a
// BigQuery run writes no feed.
func TestWriteFeedBigQueryDeletedPrefix(t *testing.T) {
	t.Parallel()
	w := newFeedWorld(t)
	ctx := context.Background()
	gone := deletion("Patient", "gone", w.clock.Now().Add(-time.Minute), 5*time.Millisecond, "1")
	if err := w.x.RecordChange(ctx, gone); err != nil {
		t.Fatal(err)
	}
	w.clock.Advance(time.Hour)

	p, op, meta := feedRun("bq://p-1234.analytics", "op-bq", w.clock.Now(), nil, true, 0)
	if res, err := w.x.writeFeed(ctx, p, op, meta, events.TypeSucceeded, nil); err != nil || res.Manifest != "" || res.Cursor != nil {
		t.Fatalf("without deletedUriPrefix: %+v, %v; want no feed", res, err)
	}
	p.Feed = "gs://" + exportsBkt + "/bq-feed/s"
	res, err := w.x.writeFeed(ctx, p, op, meta, events.TypeSucceeded, nil)
	if err != nil {
		t.Fatal(err)
	}
	if want := p.Feed + "/op-bq.manifest.json"; res.Manifest != want {
		t.Errorf("manifest %q, want %q", res.Manifest, want)
	}
	m := w.manifest(t, res.Manifest)
	if len(m.Output) != 0 || m.Extension.Destination != "bq://p-1234.analytics" || len(m.Deleted) != 1 || m.Deleted[0].URL != w.x.fileURL(exportsBkt, "bq-feed/s/op-bq.deleted.ndjson") {
		t.Errorf("manifest output %v, extension destination %q, deleted %v; want no output, the BigQuery dataset, the deleted file",
			m.Output, m.Extension.Destination, m.Deleted)
	}
	if got := w.deletedIn(t, res); len(got) != 1 || !strings.HasPrefix(got[0], "Patient/gone@") {
		t.Errorf("deleted %q, want Patient/gone", got)
	}
	if res.Cursor == nil {
		t.Errorf("no deletion cursor: the next run would deliver the same deletions again")
	}
}

// TestDeletedPrefixAllowList: deletedUriPrefix is a destination like any
// other: expanded per run and refused, naming the field, outside
// FHIREXPORT_ALLOWED_DESTINATIONS.
func TestDeletedPrefixAllowList(t *testing.T) {
	t.Parallel()
	policy, err := ParsePolicy(testLocation+"/datasets/*/fhirStores/*", "bq://p-1234.analytics,gs://"+exportsBkt+"/ok")
	if err != nil {
		t.Fatal(err)
	}
	x := New(nil, nil, nil, policy, nil)
	for _, tc := range []struct{ prefix, want string }{
		{"gs://" + exportsBkt + "/ok/{store}", "gs://" + exportsBkt + "/ok/s"},
		{"gs://" + exportsBkt + "/elsewhere", ""},
		{"gs://other-bucket/ok", ""},
	} {
		spec, err := ParseSpec([]byte(`{"fhirStore":"` + feedStore + `","incremental":true,"deletedUriPrefix":"` + tc.prefix + `",
			"bigqueryDestination":{"datasetUri":"bq://p-1234.analytics","schemaConfig":{"schemaType":"ANALYTICS_V2"},"writeDisposition":"WRITE_APPEND"}}`))
		if err != nil {
			t.Fatal(err)
		}
		trig := events.Trigger{Source: "//test", ID: "t"}
		r, err := x.newRun(trig, spec, RunKey(trig.Source, trig.ID), Logger(context.Background()))
		var se *SpecError
		switch {
		case tc.want == "" && (!errors.As(err, &se) || se.Field != "deletedUriPrefix" || se.Code != codePermissionDenied):
			t.Errorf("%s: %v, want refused as PERMISSION_DENIED naming deletedUriPrefix", tc.prefix, err)
		case tc.want != "" && (err != nil || r.pending(time.Now()).Feed != tc.want):
			t.Errorf("%s: %v, feed %q; want %s", tc.prefix, err, r.feed, tc.want)
		}
	}
}

// deletedIn lists "Type/id@deletionTime" of the deleted files a run's
// manifest names.
func (w *feedWorld) deletedIn(t *testing.T, res feedResult) []string {
	t.Helper()
	var out []string
	m := w.manifest(t, res.Manifest)
	for _, d := range m.Deleted {
		for _, b := range w.bundles(t, d.URL) {
			out = append(out, b.Entry[0].Request.URL+"@"+b.Meta.LastUpdated)
		}
	}
	return out
}

// TestWriteFeedUnusableFiles: a manifest or deleted file under the run's
// names that fhirexport cannot have written is ErrCorrupt, naming the object
// (the poller reports the run without a feed instead of retrying forever).
func TestWriteFeedUnusableFiles(t *testing.T) {
	t.Parallel()
	w := newFeedWorld(t)
	ctx := context.Background()
	if err := w.x.RecordChange(ctx, deletion("Patient", "gone", w.clock.Now(), 5*time.Millisecond, "1")); err != nil {
		t.Fatal(err)
	}
	w.clock.Advance(time.Hour)
	for _, tc := range []struct{ object, content string }{
		{"bad/op-m.manifest.json", "not json"},
		{"bad/op-d.deleted.ndjson", `{"resourceType":"Bundle"}` + "\n"},
	} {
		w.put(t, exportsBkt, tc.object, tc.content)
		op := strings.TrimSuffix(strings.TrimPrefix(tc.object, "bad/"), tc.object[strings.Index(tc.object, "."):])
		p, o, meta := feedRun("gs://"+exportsBkt+"/bad", op, w.clock.Now(), nil, true, 0)
		_, err := w.x.writeFeed(ctx, p, o, meta, events.TypeSucceeded, nil)
		if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "gs://"+exportsBkt+"/"+tc.object) {
			t.Errorf("%s: %v; want ErrCorrupt naming the object", tc.object, err)
		}
	}
}

// TestFileURLs: a manifest's urls are ones a Bulk Data client GETs: Cloud
// Storage's XML API URL, the object name escaped per segment, and the
// emulator's JSON API media URL, which serves the object whatever its name.
func TestFileURLs(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ object, want string }{
		{"fhir/ehr/2026-11-26/123_Patient", "https://storage.googleapis.com/b-1/fhir/ehr/2026-11-26/123_Patient"},
		{"a b/c#d?e%f/g+h", "https://storage.googleapis.com/b-1/a%20b/c%23d%3Fe%25f/g+h"},
	} {
		if got := CloudStorageURL("b-1", tc.object); got != tc.want {
			t.Errorf("CloudStorageURL(b-1, %q) = %s, want %s", tc.object, got, tc.want)
		}
	}
	w := newFeedWorld(t)
	name := "odd dir/a#b?c%d/op-1_Patient"
	w.put(t, exportsBkt, name, `{"resourceType":"Patient","id":"1"}`+"\n")
	for _, base := range []string{w.gcsURL, strings.TrimPrefix(w.gcsURL, "http://"), w.gcsURL + "/"} {
		u := EmulatorFileURL(base)(exportsBkt, name)
		if got := string(fetch(t, u)); got != `{"resourceType":"Patient","id":"1"}`+"\n" {
			t.Errorf("GET %s = %q", u, got)
		}
	}
}

// TestWriteFeedDeletionsFollowHistory: a run's deleted file follows what the
// store held at its transactionTime (fhir.history), not notification times:
// a resource deleted and re-created before the run is not deleted beside its
// new version (and never later, however late its notification); one deleted
// while the export ran is deferred to the next run; one deleted before the
// run and gone since is listed, at the store's own deletion time.
func TestWriteFeedDeletionsFollowHistory(t *testing.T) {
	t.Parallel()
	w := newFeedWorld(t)
	ctx := context.Background()
	if err := w.emu.CreateDataset(testLocation + "/datasets/d"); err != nil {
		t.Fatal(err)
	}
	if err := w.emu.CreateFHIRStore(feedStore, "R4"); err != nil {
		t.Fatal(err)
	}
	put := func(id string) {
		if _, err := w.emu.PutResource(feedStore, []byte(`{"resourceType":"Patient","id":"`+id+`"}`)); err != nil {
			t.Fatal(err)
		}
		w.clock.Advance(time.Second)
	}
	del := func(id string) events.Notification {
		if err := w.emu.DeleteResource(feedStore, "Patient", id); err != nil {
			t.Fatal(err)
		}
		n := deletion("Patient", id, w.lastModified(t, feedStore, "Patient/"+id), 3*time.Millisecond, "m-"+id+w.clock.Now().Format("150405"))
		w.clock.Advance(time.Second)
		return n
	}
	record := func(n events.Notification) {
		if err := w.x.RecordChange(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	put("recreated")
	put("during")
	put("gone")
	lateRecreated := del("recreated")
	put("recreated")
	goneDeletion := del("gone")
	record(goneDeletion)

	dest := "gs://" + exportsBkt + "/hist"
	t1 := w.clock.Now()
	w.clock.Advance(time.Second)
	duringDeletion := del("during") // while the export runs
	record(duringDeletion)
	w.clock.Advance(time.Minute)
	p, op, meta := feedRun(dest, "op-h1", t1, nil, true, 0)
	p.Store = feedStore
	res, err := w.x.writeFeed(ctx, p, op, meta, events.TypeSucceeded, nil)
	if err != nil {
		t.Fatal(err)
	}
	goneAt := w.lastModified(t, feedStore, "Patient/gone").Format(time.RFC3339Nano)
	if diff := cmp.Diff([]string{"Patient/gone@" + goneAt}, w.deletedIn(t, res)); diff != "" {
		t.Errorf("first run's deletions (-want +got):\n%s", diff)
	}
	if res.Cursor == nil || len(res.Cursor.Deferred) != 1 || res.Cursor.Deferred[0].ID != "during" {
		t.Fatalf("cursor %+v; want Patient/during deferred", res.Cursor)
	}

	// The re-created resource's deletion arrives late; the next run lists
	// the deletion made during the first export, and never that one.
	w.clock.Advance(time.Hour)
	record(lateRecreated)
	t2 := w.clock.Now()
	w.clock.Advance(time.Minute)
	p2, op2, meta2 := feedRun(dest, "op-h2", t2, nil, true, 0)
	p2.Store, p2.Since = feedStore, t1.Format(time.RFC3339Nano)
	res2, err := w.x.writeFeed(ctx, p2, op2, meta2, events.TypeSucceeded, res.Cursor)
	if err != nil {
		t.Fatal(err)
	}
	duringAt := w.lastModified(t, feedStore, "Patient/during").Format(time.RFC3339Nano)
	if diff := cmp.Diff([]string{"Patient/during@" + duringAt}, w.deletedIn(t, res2)); diff != "" {
		t.Errorf("second run's deletions (-want +got):\n%s", diff)
	}
	if res2.Cursor == nil || len(res2.Cursor.Deferred) != 0 {
		t.Errorf("cursor %+v; want nothing deferred", res2.Cursor)
	}
	// The first run had no _since: a full snapshot a consumer may
	// re-baseline on; the second is an increment.
	if s1, s2 := w.manifest(t, res.ManifestURL).Extension.Snapshot, w.manifest(t, res2.ManifestURL).Extension.Snapshot; !s1 || s2 {
		t.Errorf("extension.snapshot %v then %v; want true for the run without _since, false after", s1, s2)
	}
}

// TestWriteFeedOutputCount: an output item has count when it is known
// without reading the file: a run with one output file, whose operation's
// success counter counts exactly its resources.
func TestWriteFeedOutputCount(t *testing.T) {
	t.Parallel()
	w := newFeedWorld(t)
	ctx := context.Background()
	w.put(t, exportsBkt, "c/op-c_Patient", strings.Repeat(`{"resourceType":"Patient","id":"1"}`+"\n", 10))
	p, op, meta := feedRun("gs://"+exportsBkt+"/c", "op-c", w.clock.Now(), []string{"Patient"}, false, 0)
	res, err := w.x.writeFeed(ctx, p, op, meta, events.TypeSucceeded, nil)
	if err != nil {
		t.Fatal(err)
	}
	m := w.manifest(t, res.ManifestURL)
	if len(m.Output) != 1 || m.Output[0].Count == nil || *m.Output[0].Count != 10 {
		t.Fatalf("output %+v; want one item with count 10", m.Output)
	}
	for _, err := range bulkdatatest.Check(ctx, nil, w.read(t, res.ManifestURL)) {
		t.Error(err)
	}
}
