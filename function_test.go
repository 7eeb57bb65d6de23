package fhirexport

// End-to-end tests: the registered functions served by functions-framework-go
// over HTTP, with the real Healthcare, Pub/Sub and Cloud Storage clients
// pointed at healthcaretest, pstest and fake-gcs-server.

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"cloud.google.com/go/pubsub/v2"
	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"cloud.google.com/go/pubsub/v2/pstest"
	"cloud.google.com/go/storage"
	"github.com/fsouza/fake-gcs-server/fakestorage"
	"github.com/santhosh-tekuri/jsonschema/v6"
	"google.golang.org/api/healthcare/v1"
	"google.golang.org/api/iterator"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fhirexport/fhirexport/events"
	"github.com/fhirexport/fhirexport/export"
	"github.com/fhirexport/fhirexport/healthcaretest"
	"github.com/fhirexport/fhirexport/healthcaretest/bulkdatatest"
	"github.com/fhirexport/fhirexport/healthcaretest/stacktest"
)

const (
	project      = "test-project"
	location     = "projects/test-project/locations/us-central1"
	eventsTopic  = "projects/test-project/topics/fhirexport-events"
	requestTopic = "//pubsub.googleapis.com/projects/test-project/topics/fhirexport-requests"
	stateBucket  = "fx-state"
	exportBucket = "exports-ok"
	foreignBkt   = "exports-foreign"
)

// env is the shared test environment, built once in TestMain: the functions
// read their configuration once per instance, as in production.
var env struct {
	stack   *stacktest.Stack // Cloud Storage behind it keeps delete preconditions (RefusedDeletes)
	baseURL string
	emu     *healthcaretest.Server
	clock   *healthcaretest.RunningClock // the emulator's and the functions' clock
	gcs     *fakestorage.Server
	storage *storage.Client
	hc      *healthcare.Service
	psAddr  string        // the Pub/Sub emulator in use
	psFault *publishFault // nil with the official emulator
	gcsFail *gcsFaults
	gcsURL  string // Cloud Storage as the functions see it (STORAGE_EMULATOR_HOST)
	logs    *syncBuffer

	mu     sync.Mutex
	events []received
}

// received is an outcome event as a subscriber got it.
type received struct {
	Attrs map[string]string
	Data  events.Data
	Raw   string
}

func TestMain(m *testing.M) {
	code, err := run(m)
	if err != nil {
		fmt.Fprintln(os.Stderr, "test environment:", err)
		os.Exit(1)
	}
	os.Exit(code)
}

func run(m *testing.M) (int, error) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// The functions and the emulator share one clock, as the service's and
	// ours agree in production (in-doubt resolution relies on it); it runs
	// in real time, so leases expire, and tests may jump it ahead.
	env.clock = healthcaretest.NewRunningClock(time.Date(2026, 11, 26, 0, 0, 0, 0, time.UTC))
	instance.now = env.clock.Now
	opts := stacktest.Options{
		Project:       project,
		Buckets:       []string{stateBucket, exportBucket, foreignBkt},
		Topics:        []string{eventsTopic},
		Subscriptions: []*pb.Subscription{{Name: eventsSub, Topic: eventsTopic}},
		Healthcare:    healthcaretest.Options{Clock: env.clock},
	}
	switch *pubsubBackend {
	case "pstest":
		env.psFault = &publishFault{}
		opts.Pstest = []pstest.ServerReactorOption{{FuncName: "Publish", Reactor: env.psFault}}
	case "official":
		addr, stop, err := startOfficialPubSub(ctx)
		if err != nil {
			return 0, err
		}
		defer stop()
		opts.PubSubEmulator = addr
	default:
		return 0, fmt.Errorf("-pubsub=%q: want pstest or official", *pubsubBackend)
	}
	s, err := stacktest.Start(ctx, opts)
	if err != nil {
		return 0, err
	}
	defer s.Close()
	env.stack, env.gcs, env.storage, env.emu, env.hc, env.psAddr = s, s.GCS, s.Storage, s.Healthcare, s.HealthcareService, s.PubSubAddr

	// Cloud Storage as the functions see it goes through a fault injector.
	env.gcsFail = &gcsFaults{}
	target, _ := url.Parse(s.GCSURL)
	proxy := httputil.NewSingleHostReverseProxy(target)
	gcsFront := mustListen()
	go http.Serve(gcsFront, env.gcsFail.wrap(proxy))
	env.gcsURL = "http://" + gcsFront.Addr().String()

	go subscribeEvents(ctx, s.PubSub)

	env.logs = &syncBuffer{}
	instance.log = export.NewLogger(env.logs, slog.LevelInfo)
	vars := map[string]string{
		"FHIREXPORT_EVENTS_TOPIC":         eventsTopic,
		"FHIREXPORT_STATE":                "gs://" + stateBucket + "/state",
		"FHIREXPORT_ALLOWED_STORES":       location + "/datasets/*/fhirStores/*",
		"FHIREXPORT_ALLOWED_DESTINATIONS": "gs://" + exportBucket + "/fhir, bq://test-project.analytics",
		"FHIREXPORT_HEALTHCARE_ENDPOINT":  env.emu.URL,
		// The budget has tests of its own (budget_test.go); elsewhere it must not queue.
		"FHIREXPORT_MAX_RUNNING": "1000",
		"PUBSUB_EMULATOR_HOST":   env.psAddr,
		"STORAGE_EMULATOR_HOST":  env.gcsURL,
	}
	instance.lookup = func(k string) (string, bool) { v, ok := vars[k]; return v, ok }

	if env.baseURL, err = stacktest.ServeFunctions(ctx, 0); err != nil {
		return 0, err
	}
	code := m.Run()
	if err := checkEventSchemas(); err != nil {
		fmt.Fprintln(os.Stderr, "FAIL: published events do not match deploy/schemas:", err)
		return 1, nil
	}
	if n, err := checkManifests(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "FAIL: manifests the tests wrote break the Bulk Data IG:", err)
		return 1, nil
	} else if code == 0 && n == 0 && !testing.Short() && flag.Lookup("test.run").Value.String() == "" {
		fmt.Fprintln(os.Stderr, "FAIL: the suite wrote no manifest to check")
		return 1, nil
	}
	return code, nil
}

// checkManifests reads every manifest the suite's runs wrote and checks it
// against the Bulk Data IG's Complete Status rules as a client reads it,
// fetching each file at its advertised URL (bulkdatatest.Check). It returns
// how many it checked.
func checkManifests(ctx context.Context) (int, error) {
	env.gcsFail.disarm()
	it := env.storage.Bucket(exportBucket).Objects(ctx, nil)
	var errs []error
	n := 0
	for {
		a, err := it.Next()
		if errors.Is(err, iterator.Done) {
			break
		}
		if err != nil {
			return n, err
		}
		if !strings.HasSuffix(a.Name, ".manifest.json") {
			continue
		}
		r, err := env.storage.Bucket(exportBucket).Object(a.Name).NewReader(ctx)
		if err != nil {
			return n, err
		}
		data, err := io.ReadAll(r)
		r.Close()
		if err != nil {
			return n, err
		}
		n++
		for _, err := range bulkdatatest.Check(ctx, nil, data) {
			errs = append(errs, fmt.Errorf("gs://%s/%s: %w", exportBucket, a.Name, err))
		}
	}
	return n, errors.Join(errs...)
}

// checkEventSchemas validates the data of every event the tests saw against
// the JSON Schema of its type in deploy/schemas, the contract consumers get.
func checkEventSchemas() error {
	const base = "https://github.com/fhirexport/fhirexport/deploy/schemas/"
	c := jsonschema.NewCompiler()
	c.DefaultDraft(jsonschema.Draft2020)
	c.AssertFormat()
	files, err := filepath.Glob("deploy/schemas/*.schema.json")
	if err != nil || len(files) == 0 {
		return fmt.Errorf("no schemas: %v", err)
	}
	for _, f := range files {
		doc, err := jsonschema.UnmarshalJSON(bytes.NewReader(must(os.ReadFile(f))))
		if err != nil {
			return err
		}
		if err := c.AddResource(base+filepath.Base(f), doc); err != nil {
			return err
		}
	}
	env.mu.Lock()
	defer env.mu.Unlock()
	var errs []error
	for _, e := range env.events {
		typ := strings.TrimPrefix(e.Attrs["ce-type"], events.TypePrefix)
		sch, err := c.Compile(base + typ + ".schema.json")
		if err != nil {
			return fmt.Errorf("event type %q: %w", e.Attrs["ce-type"], err)
		}
		inst, err := jsonschema.UnmarshalJSON(strings.NewReader(e.Raw))
		if err == nil {
			err = sch.Validate(inst)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s event %s: %w\n%s", typ, e.Attrs["ce-id"], err, e.Raw))
		}
	}
	return errors.Join(errs...)
}

var pubsubBackend = flag.String("pubsub", "pstest", "Pub/Sub emulator for the end-to-end tests: pstest, or official (gcloud's emulator)")

// startOfficialPubSub starts Google's Pub/Sub emulator from the Cloud SDK on
// a free loopback port.
func startOfficialPubSub(ctx context.Context) (string, func(), error) {
	gcloud, err := exec.LookPath("gcloud")
	if err != nil {
		return "", nil, fmt.Errorf("-pubsub=official needs the Cloud SDK: %w", err)
	}
	ln := mustListen()
	addr := ln.Addr().String()
	ln.Close()
	cmd := exec.CommandContext(ctx, gcloud, "beta", "emulators", "pubsub", "start", "--host-port="+addr, "--project="+project)
	cmd.Env = append(os.Environ(), "CLOUDSDK_CORE_DISABLE_PROMPTS=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return "", nil, err
	}
	stop := func() { syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); cmd.Wait() }
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return addr, stop, nil
		}
	}
	stop()
	return "", nil, fmt.Errorf("the official Pub/Sub emulator did not start on %s:\n%s", addr, out.String())
}

// TestOfficialPubSubEmulator runs the main end-to-end tests again in a child
// process against Google's own Pub/Sub emulator, where the Cloud SDK has it.
func TestOfficialPubSubEmulator(t *testing.T) {
	if *pubsubBackend != "pstest" {
		t.Skip("already running against the official emulator")
	}
	if testing.Short() {
		t.Skip("-short")
	}
	gcloud, err := exec.LookPath("gcloud")
	if err != nil {
		t.Skip("the Cloud SDK (gcloud) is not installed: the official Pub/Sub emulator is not available, pstest only")
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(must(filepath.EvalSymlinks(gcloud))), "..", "platform", "pubsub-emulator")); err != nil {
		t.Skip("the Cloud SDK has no pubsub-emulator component: pstest only")
	}
	t.Parallel()
	cmd := exec.Command(os.Args[0], "-pubsub=official", "-test.run=^(TestGCSExportEndToEnd|TestBigQueryExportEveryField|TestTriggerForms|TestDuplicateDeliveries|TestIncrementalEndToEnd|TestPollOutcomes|TestFinalizeFailures)$")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("end-to-end tests against the official Pub/Sub emulator failed: %v\n%s", err, out)
	}
	if !bytes.Contains(out, []byte("PASS")) {
		t.Fatalf("no tests ran:\n%s", out)
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func mustListen() net.Listener {
	return must(net.Listen("tcp", "127.0.0.1:0"))
}

// eventsSub receives every outcome event for the tests.
const eventsSub = "projects/test-project/subscriptions/all-events"

// subscribeEvents collects every outcome event through a real subscription
// until ctx is done.
func subscribeEvents(ctx context.Context, client *pubsub.Client) {
	client.Subscriber(eventsSub).Receive(ctx, func(_ context.Context, m *pubsub.Message) {
		var d events.Data
		if err := json.Unmarshal(m.Data, &d); err != nil {
			panic(fmt.Sprintf("event data is not JSON: %v: %s", err, m.Data))
		}
		env.mu.Lock()
		env.events = append(env.events, received{Attrs: m.Attributes, Data: d, Raw: string(m.Data)})
		env.mu.Unlock()
		m.Ack()
	})
}

// publishFault fails Publish calls while armed, as a permission error the
// client does not retry. extra, when set, reacts to the calls it lets through
// (the reliability tests' random faults).
type publishFault struct {
	armed atomic.Int32
	extra atomic.Pointer[func(req any) (bool, any, error)]
}

func (f *publishFault) left() int32 {
	if f == nil {
		return 0
	}
	return f.armed.Load()
}

func (f *publishFault) React(req any) (bool, any, error) {
	if f.armed.Load() > 0 {
		f.armed.Add(-1)
		return true, nil, status.Error(codes.PermissionDenied, "injected publish failure")
	}
	if h := f.extra.Load(); h != nil {
		return (*h)(req)
	}
	return false, nil, nil
}

// gcsFaults answers 403 to the next Cloud Storage requests matching a rule:
// a failure the storage client does not retry, standing for a crash between
// two state steps.
type gcsFaults struct {
	mu    sync.Mutex
	rules []gcsRule
	// around, when set, sees each request first and reports whether it
	// answered it (the reliability tests' random faults and crash points).
	around atomic.Pointer[func(w http.ResponseWriter, r *http.Request, next http.Handler) bool]
}

type gcsRule struct {
	method, contains string
	left             int
}

func (g *gcsFaults) failNext(method, contains string, n int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.rules = append(g.rules, gcsRule{method, contains, n})
}

// disarm drops every fault still armed.
func (g *gcsFaults) disarm() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.rules = nil
	g.around.Store(nil)
}

// armed counts the failures not injected yet.
func (g *gcsFaults) armed() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	n := 0
	for _, r := range g.rules {
		n += r.left
	}
	return n
}

func (g *gcsFaults) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if h := g.around.Load(); h != nil && (*h)(w, r, next) {
			return
		}
		g.mu.Lock()
		hit := false
		for i := range g.rules {
			rule := &g.rules[i]
			target, _ := url.PathUnescape(r.URL.String())
			if rule.left > 0 && r.Method == rule.method && strings.Contains(target, rule.contains) {
				rule.left--
				hit = true
				break
			}
		}
		g.mu.Unlock()
		if hit {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusForbidden)
			io.WriteString(w, `{"error":{"code":403,"message":"injected failure"}}`)
			return
		}
		next.ServeHTTP(w, r)
	})
}

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// --- fixtures ---

var storeSeq atomic.Int64

// newStore creates a dataset of its own (so its operations count this test's
// exports only) with one R4 store seeded with synthetic patients.
func newStore(t *testing.T, patients int) (store string, resources int) {
	t.Helper()
	dataset := fmt.Sprintf("%s/datasets/t%d", location, storeSeq.Add(1))
	if err := env.emu.CreateDataset(dataset); err != nil {
		t.Fatal(err)
	}
	store = dataset + "/fhirStores/ehr"
	if err := env.emu.CreateFHIRStore(store, "R4"); err != nil {
		t.Fatal(err)
	}
	n, err := env.emu.Seed(store, storeSeq.Load(), patients)
	if err != nil {
		t.Fatal(err)
	}
	return store, n
}

func datasetOf(store string) string { return store[:strings.Index(store, "/fhirStores/")] }

// acceptedExports lists the export operations of the store's dataset through
// the real client, every page, leaving out a foreign history the test added
// (healthcaretest.AddHistory): only exports the emulator accepted.
func acceptedExports(t *testing.T, store string) []*healthcare.Operation {
	t.Helper()
	accepted := map[string]bool{}
	for _, e := range env.emu.Exports() {
		accepted[e.Operation] = true
	}
	var ops []*healthcare.Operation
	err := env.hc.Projects.Locations.Datasets.Operations.List(datasetOf(store)).PageSize(1000).Pages(context.Background(), func(resp *healthcare.ListOperationsResponse) error {
		for _, op := range resp.Operations {
			if strings.Contains(string(op.Metadata), "ExportResources") && accepted[op.Name] {
				ops = append(ops, op)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.SortStableFunc(ops, func(a, b *healthcare.Operation) int { return createTimeOf(a).Compare(createTimeOf(b)) })
	return ops
}

// createTimeOf is an operation's createTime.
func createTimeOf(op *healthcare.Operation) time.Time {
	var m struct{ CreateTime time.Time }
	json.Unmarshal(op.Metadata, &m)
	return m.CreateTime
}

// exportBodies returns the JSON bodies of the export requests the emulator
// received for store.
func exportBodies(store string) []map[string]any {
	var out []map[string]any
	for _, r := range env.emu.ExportRequests() {
		if r.Path == "/v1/"+store+":export" {
			var m map[string]any
			json.Unmarshal(r.Body, &m)
			out = append(out, m)
		}
	}
	return out
}

var triggerSeq atomic.Int64

func newID(prefix string) string { return fmt.Sprintf("%s-%d", prefix, triggerSeq.Add(1)) }

// deliverPubSub posts a Pub/Sub message the way Eventarc does: a binary-mode
// CloudEvent whose data is MessagePublishedData.
func deliverPubSub(t *testing.T, fn, id string, data []byte) int {
	t.Helper()
	body, _ := json.Marshal(map[string]any{
		"message": map[string]any{
			"data": base64.StdEncoding.EncodeToString(data), "attributes": map[string]string{"origin": "test"},
			"messageId": id, "message_id": id, "publishTime": "2026-11-26T01:02:03.456Z", "publish_time": "2026-11-26T01:02:03.456Z",
			"@type": "type.googleapis.com/google.pubsub.v1.PubsubMessage",
		},
		"subscription": "projects/test-project/subscriptions/eventarc-sub", "deliveryAttempt": 1,
	})
	return post(t, fn, map[string]string{
		"ce-specversion": "1.0", "ce-type": events.MessagePublishedType, "ce-source": requestTopic,
		"ce-id": id, "ce-time": "2026-11-26T01:02:03.456Z", "Content-Type": "application/json",
	}, body)
}

func post(t *testing.T, fn string, headers map[string]string, body []byte) int {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, env.baseURL+"/"+fn, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return resp.StatusCode
}

// poll delivers one scheduler tick to PollExport.
func poll(t *testing.T) {
	t.Helper()
	if code := deliverPubSub(t, "PollExport", newID("tick"), []byte("{}")); code != http.StatusOK {
		t.Fatalf("PollExport answered %d", code)
	}
}

func specJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func gcsSpec(store string, extra map[string]any) map[string]any {
	s := map[string]any{"fhirStore": store, "gcsDestination": map[string]any{"uriPrefix": "gs://" + exportBucket + "/fhir/{dataset}/{date}/{run}"}}
	for k, v := range extra {
		s[k] = v
	}
	return s
}

// eventsFor returns the events whose trigger or store matches, in arrival order.
func eventsFor(match func(received) bool) []received {
	env.mu.Lock()
	defer env.mu.Unlock()
	var out []received
	for _, e := range env.events {
		if match(e) {
			out = append(out, e)
		}
	}
	return out
}

func byStore(store string) func(received) bool {
	return func(e received) bool { return e.Data.Store == store }
}

func byTrigger(id string) func(received) bool {
	return func(e received) bool { return e.Data.Trigger.ID == id }
}

// waitEvents waits until at least n events match, then a moment longer to
// catch duplicates, and returns them all.
func waitEvents(t *testing.T, match func(received) bool, n int) []received {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for len(eventsFor(match)) < n {
		if time.Now().After(deadline) {
			logs := env.logs.String()
			t.Fatalf("timed out waiting for %d events; have %v\nlogs:\n%s", n, types(eventsFor(match)), logs[max(0, len(logs)-3000):])
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(150 * time.Millisecond)
	return eventsFor(match)
}

// types lists the events' types, started first: Pub/Sub does not promise
// delivery order.
func types(evs []received) []string {
	var out []string
	for _, e := range evs {
		out = append(out, strings.TrimPrefix(e.Attrs["ce-type"], events.TypePrefix))
	}
	slices.SortStableFunc(out, func(a, b string) int { return boolInt(b == "started") - boolInt(a == "started") })
	return out
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// outcomes returns the events that are neither started nor queued events.
func outcomes(evs []received) []received {
	return slices.DeleteFunc(slices.Clone(evs), func(e received) bool {
		return e.Attrs["ce-type"] == events.TypeStarted || e.Attrs["ce-type"] == events.TypeQueued
	})
}

// stateObjects lists the state bucket's object names under a folder.
func stateObjects(t *testing.T, dir string) []string {
	t.Helper()
	return listObjects(t, stateBucket, "state/"+dir+"/")
}

func listObjects(t *testing.T, bucket, prefix string) []string {
	t.Helper()
	var names []string
	it := env.storage.Bucket(bucket).Objects(context.Background(), &storage.Query{Prefix: prefix})
	for {
		a, err := it.Next()
		if err == iterator.Done {
			return names
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, a.Name)
	}
}

// fetchFile GETs a manifest's url as a Bulk Data client does: it must be
// served as application/fhir+ndjson.
func fetchFile(t *testing.T, u string) []byte {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	defer resp.Body.Close()
	data := must(io.ReadAll(resp.Body))
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "application/fhir+ndjson" {
		t.Fatalf("GET %s: %s, Content-Type %q; want 200 and application/fhir+ndjson", u, resp.Status, resp.Header.Get("Content-Type"))
	}
	return data
}

func readObject(t *testing.T, bucket, name string) []byte {
	t.Helper()
	r, err := env.storage.Bucket(bucket).Object(name).NewReader(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	return must(io.ReadAll(r))
}

func pendingFor(t *testing.T, spec map[string]any) []string {
	t.Helper()
	s, err := export.ParseSpec(specJSON(t, spec))
	if err != nil {
		t.Fatal(err)
	}
	want := "state/pending/" + export.PipelineKey(s) + ".json"
	return slices.DeleteFunc(stateObjects(t, "pending"), func(n string) bool { return n != want })
}

// --- tests ---

// TestGCSExportEndToEnd follows one Pub/Sub trigger from the export request
// through the started event, the poll, the NDJSON objects and the succeeded
// event, and checks the state left behind. Not parallel: another test's poll
// would finish the run before its pending marker is checked.
func TestGCSExportEndToEnd(t *testing.T) {
	store, n := newStore(t, 5)
	id := newID("gcs")
	spec := gcsSpec(store, map[string]any{"_type": "Patient,Observation", "name": "nightly", "labels": map[string]string{"team": "data"}})
	if code := deliverPubSub(t, "StartExport", id, specJSON(t, spec)); code != http.StatusOK {
		t.Fatalf("StartExport answered %d", code)
	}
	run := export.RunKey(requestTopic, id)
	dataset := datasetOf(store)[strings.LastIndex(datasetOf(store), "/")+1:]
	wantPrefix := "gs://" + exportBucket + "/fhir/" + dataset + "/2026-11-26/" + run[:16]
	bodies := exportBodies(store)
	if len(bodies) != 1 {
		t.Fatalf("export requests = %d, want 1", len(bodies))
	}
	wantBody := map[string]any{"_type": "Patient,Observation", "gcsDestination": map[string]any{"uriPrefix": wantPrefix}}
	if got, want := fmt.Sprint(bodies[0]), fmt.Sprint(wantBody); got != want {
		t.Errorf("export body = %s, want %s", got, want)
	}
	started := waitEvents(t, byTrigger(id), 1)
	op := started[0].Data.Operation
	if !strings.HasPrefix(op, datasetOf(store)+"/operations/") {
		t.Fatalf("started event operation = %q", op)
	}
	a := started[0].Attrs
	wantAttrs := map[string]string{
		"ce-specversion": "1.0", "ce-type": events.TypeStarted, "ce-source": "//healthcare.googleapis.com/" + store,
		"ce-subject": op, "content-type": "application/json",
	}
	for k, v := range wantAttrs {
		if a[k] != v {
			t.Errorf("attribute %s = %q, want %q", k, a[k], v)
		}
	}
	if a["ce-id"] == "" || a["ce-time"] == "" {
		t.Errorf("attributes lack ce-id or ce-time: %v", a)
	}
	if d := started[0].Data; d.Destination != wantPrefix || d.Name != "nightly" || d.Labels["team"] != "data" ||
		!slices.Equal(d.Types, []string{"Patient", "Observation"}) || d.Trigger.Source != requestTopic {
		t.Errorf("started data = %+v", d)
	}
	if got := pendingFor(t, spec); len(got) != 1 {
		t.Errorf("pending markers = %v, want one", got)
	}

	poll(t)
	evs := waitEvents(t, byTrigger(id), 2)
	if got := types(evs); !slices.Equal(got, []string{"started", "succeeded"}) {
		t.Fatalf("events = %v, want started, succeeded", got)
	}
	done := outcomes(evs)[0].Data
	var wantCount int64
	for _, r := range env.emu.Resources(store) {
		if t := resourceType(r); t == "Patient" || t == "Observation" {
			wantCount++
		}
	}
	if done.Counters == nil || done.Counters.Success != wantCount || done.Counters.Failure != 0 || done.Counters.Pending != 0 {
		t.Errorf("counters = %+v, want success %d of %d resources", done.Counters, wantCount, n)
	}
	if done.CreateTime == "" || done.EndTime == "" || done.Duration == "" || done.LogsURL == "" || done.Operation != op {
		t.Errorf("succeeded data lacks timing or operation: %+v", done)
	}
	// The service names objects {uriPrefix}/{operationId}_{Type}.
	opID := op[strings.LastIndex(op, "/")+1:]
	objPrefix := strings.TrimPrefix(wantPrefix, "gs://"+exportBucket+"/") + "/"
	objs := listObjects(t, exportBucket, objPrefix)
	want := []string{objPrefix + opID + ".manifest.json", objPrefix + opID + "_Observation", objPrefix + opID + "_Patient"}
	if !slices.Equal(objs, want) {
		t.Errorf("objects = %v, want %v", objs, want)
	}
	// The Bulk Data manifest lists exactly the objects the export wrote,
	// and the event names it and them.
	var manifest struct {
		TransactionTime     string `json:"transactionTime"`
		RequiresAccessToken bool   `json:"requiresAccessToken"`
		Output              []struct{ Type, URL string }
		Deleted             []any `json:"deleted"`
		Error               []any `json:"error"`
	}
	if err := json.Unmarshal(readObject(t, exportBucket, want[0]), &manifest); err != nil {
		t.Fatalf("manifest: %v", err)
	}
	// Its urls are ones a Bulk Data client GETs (here, from the storage
	// emulator the functions use); the event keeps the gs:// names.
	fileURL := export.EmulatorFileURL(env.gcsURL)
	wantOut := []struct{ Type, URL string }{{"Observation", fileURL(exportBucket, want[1])}, {"Patient", fileURL(exportBucket, want[2])}}
	if !slices.Equal(manifest.Output, wantOut) || !manifest.RequiresAccessToken || !sameTime(manifest.TransactionTime, done.CreateTime) {
		t.Errorf("manifest = %+v, want outputs %v, requiresAccessToken, transactionTime %s", manifest, wantOut, done.CreateTime)
	}
	for i, o := range manifest.Output {
		if got := fetchFile(t, o.URL); !bytes.Equal(got, readObject(t, exportBucket, want[i+1])) {
			t.Errorf("GET %s does not serve the object %s", o.URL, want[i+1])
		}
	}
	gsOut := []string{"gs://" + exportBucket + "/" + want[1], "gs://" + exportBucket + "/" + want[2]}
	if done.Manifest != "gs://"+exportBucket+"/"+want[0] || done.ManifestURL != fileURL(exportBucket, want[0]) ||
		len(done.Outputs) != 2 || done.Outputs[0].URL != gsOut[0] || done.Outputs[1].URL != gsOut[1] {
		t.Errorf("event manifest %q (%s), outputs %+v; want %s and the objects' gs:// names", done.Manifest, done.ManifestURL, done.Outputs, want[0])
	}
	objs = objs[1:]
	var lines int64
	for _, o := range objs {
		lines += int64(bytes.Count(readObject(t, exportBucket, o), []byte("\n")))
	}
	if lines != wantCount {
		t.Errorf("NDJSON lines = %d, want %d", lines, wantCount)
	}
	if got := pendingFor(t, spec); len(got) != 0 {
		t.Errorf("pending marker left after the outcome: %v", got)
	}
	var rec map[string]any
	json.Unmarshal(readObject(t, stateBucket, "state/runs/"+run+".json"), &rec)
	if rec["status"] != "done" || rec["operation"] != op {
		t.Errorf("run record = %v, want status done with the operation", rec)
	}
	// A late redelivery of the same trigger starts nothing.
	if code := deliverPubSub(t, "StartExport", id, specJSON(t, spec)); code != http.StatusOK {
		t.Fatalf("redelivery answered %d", code)
	}
	if got := len(acceptedExports(t, store)); got != 1 {
		t.Errorf("exports after a late redelivery = %d, want 1", got)
	}
}

func resourceType(r json.RawMessage) string {
	var v struct {
		ResourceType string `json:"resourceType"`
	}
	json.Unmarshal(r, &v)
	return v.ResourceType
}

// TestBigQueryExportEveryField sends a spec with every BigQuery field and
// checks the request on the wire and the rows written.
func TestBigQueryExportEveryField(t *testing.T) {
	t.Parallel()
	store, _ := newStore(t, 3)
	id := newID("bq")
	spec := map[string]any{
		"fhirStore": store, "_type": "Patient", "_since": "2020-01-01T00:00:00.25+01:00",
		"bigqueryDestination": map[string]any{
			"datasetUri": "bq://test-project.analytics",
			"schemaConfig": map[string]any{"schemaType": "ANALYTICS_V2", "recursiveStructureDepth": 3,
				"lastUpdatedPartitionConfig": map[string]any{"type": "DAY", "expirationMs": "86400000"}},
			"writeDisposition": "WRITE_TRUNCATE", "force": true,
		},
	}
	if code := deliverPubSub(t, "StartExport", id, specJSON(t, spec)); code != http.StatusOK {
		t.Fatalf("StartExport answered %d", code)
	}
	bodies := exportBodies(store)
	if len(bodies) != 1 {
		t.Fatalf("export requests = %d, want 1", len(bodies))
	}
	got := string(specJSON(t, bodies[0]))
	want := `{"_since":"2020-01-01T00:00:00.25+01:00","_type":"Patient","bigqueryDestination":{"datasetUri":"bq://test-project.analytics",` +
		`"force":true,"schemaConfig":{"lastUpdatedPartitionConfig":{"expirationMs":"86400000","type":"DAY"},"recursiveStructureDepth":"3",` +
		`"schemaType":"ANALYTICS_V2"},"writeDisposition":"WRITE_TRUNCATE"}}`
	if got != want {
		t.Errorf("export body\n got %s\nwant %s", got, want)
	}
	poll(t)
	evs := waitEvents(t, byTrigger(id), 2)
	if got := types(evs); !slices.Equal(got, []string{"started", "succeeded"}) {
		t.Fatalf("events = %v", got)
	}
	if d := outcomes(evs)[0].Data; d.Destination != "bq://test-project.analytics" || d.Since != "2020-01-01T00:00:00.25+01:00" {
		t.Errorf("succeeded data = %+v", d)
	}
}

// TestTriggerForms sends the same kind of spec as a legacy push body, a
// structured CloudEvent and a binary direct CloudEvent.
func TestTriggerForms(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		deliver func(t *testing.T, id string, spec []byte) int
	}{
		{"legacy pub/sub push", func(t *testing.T, id string, spec []byte) int {
			body := specJSON(t, map[string]any{"subscription": "projects/test-project/subscriptions/push",
				"message": map[string]any{"data": base64.StdEncoding.EncodeToString(spec), "messageId": id, "publishTime": "2026-11-26T01:02:03Z"}})
			return post(t, "StartExport", map[string]string{"Content-Type": "application/json"}, body)
		}},
		{"structured cloudevent", func(t *testing.T, id string, spec []byte) int {
			body := specJSON(t, map[string]any{"specversion": "1.0", "type": "com.example.export.requested", "source": "//example/orchestrator",
				"id": id, "datacontenttype": "application/json", "data": json.RawMessage(spec)})
			return post(t, "StartExport", map[string]string{"Content-Type": "application/cloudevents+json"}, body)
		}},
		{"binary cloudevent", func(t *testing.T, id string, spec []byte) int {
			return post(t, "StartExport", map[string]string{"ce-specversion": "1.0", "ce-type": "com.example.export.requested",
				"ce-source": "//example/orchestrator", "ce-id": id, "Content-Type": "application/json"}, spec)
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			store, _ := newStore(t, 1)
			id := newID("form")
			if code := tc.deliver(t, id, specJSON(t, gcsSpec(store, nil))); code != http.StatusOK {
				t.Fatalf("StartExport answered %d", code)
			}
			evs := waitEvents(t, byTrigger(id), 1)
			if got := types(evs); got[0] != "started" {
				t.Fatalf("events = %v, want started first (%+v)", got, evs)
			}
			if got := len(acceptedExports(t, store)); got != 1 {
				t.Errorf("exports = %d, want 1", got)
			}
		})
	}
}

// TestDuplicateDeliveries delivers one trigger three times, in sequence and
// concurrently: one export, one started event id.
func TestDuplicateDeliveries(t *testing.T) {
	t.Parallel()
	for _, concurrent := range []bool{false, true} {
		t.Run(fmt.Sprintf("concurrent=%v", concurrent), func(t *testing.T) {
			t.Parallel()
			store, _ := newStore(t, 1)
			id := newID("dup")
			spec := specJSON(t, gcsSpec(store, nil))
			codes := make([]int, 3)
			var wg sync.WaitGroup
			for i := range codes {
				deliver := func() { codes[i] = deliverPubSub(t, "StartExport", id, spec) }
				if concurrent {
					wg.Go(deliver)
				} else {
					deliver()
				}
			}
			wg.Wait()
			for i, c := range codes {
				if c != http.StatusOK && c != http.StatusInternalServerError {
					t.Errorf("delivery %d answered %d", i, c)
				}
			}
			// Pub/Sub redelivers what was not acknowledged.
			for i, c := range codes {
				if c != http.StatusOK {
					if code := deliverPubSub(t, "StartExport", id, spec); code != http.StatusOK {
						t.Errorf("redelivery of %d answered %d", i, code)
					}
				}
			}
			if got := len(acceptedExports(t, store)); got != 1 {
				t.Errorf("exports = %d, want 1", got)
			}
			// Other tests' polls may finish this run meanwhile: look at started only.
			evs := waitEvents(t, func(e received) bool { return byTrigger(id)(e) && e.Attrs["ce-type"] == events.TypeStarted }, 1)
			for _, e := range evs {
				if e.Attrs["ce-id"] != evs[0].Attrs["ce-id"] {
					t.Errorf("events differ: %v vs %v", e.Attrs, evs[0].Attrs)
				}
			}
		})
	}
}

// TestBadTriggers sends every case of the bad-spec table, plus envelope
// errors: each is acknowledged, reported once as rejected naming the field,
// and starts no export.
func TestBadTriggers(t *testing.T) {
	var cases []struct{ Name, Spec, Field string }
	if err := json.Unmarshal(must(os.ReadFile("export/testdata/bad_specs.json")), &cases); err != nil {
		t.Fatal(err)
	}
	before := len(env.emu.ExportRequests())
	for _, tc := range cases {
		t.Run(tc.Name, func(t *testing.T) {
			id := newID("bad")
			if code := deliverPubSub(t, "StartExport", id, []byte(tc.Spec)); code != http.StatusOK {
				t.Fatalf("StartExport answered %d, want 200 (acknowledged)", code)
			}
			evs := waitEvents(t, byTrigger(id), 1)
			if len(evs) != 1 || evs[0].Attrs["ce-type"] != events.TypeRejected {
				t.Fatalf("events = %v, want one rejected", types(evs))
			}
			e := evs[0].Data.Error
			if e == nil || e.Field != tc.Field || e.Code != 3 || !strings.Contains(e.Message, "spec") {
				t.Errorf("rejected error = %+v, want field %q", e, tc.Field)
			}
			if evs[0].Attrs["ce-subject"] != id {
				t.Errorf("ce-subject = %q, want the trigger id", evs[0].Attrs["ce-subject"])
			}
		})
	}
	envelopes := []struct {
		name    string
		headers map[string]string
		body    string
	}{
		{"pub/sub message without data", map[string]string{"ce-type": events.MessagePublishedType}, `{"message":{"messageId":"m"}}`},
		{"pub/sub data not base64", map[string]string{"ce-type": events.MessagePublishedType}, `{"message":{"data":"%%%"}}`},
		{"direct event that is not json", map[string]string{"ce-type": "com.example.x", "Content-Type": "text/plain"}, `hello`},
	}
	for _, tc := range envelopes {
		t.Run(tc.name, func(t *testing.T) {
			id := newID("env")
			h := map[string]string{"ce-specversion": "1.0", "ce-source": requestTopic, "ce-id": id, "Content-Type": "application/json"}
			for k, v := range tc.headers {
				h[k] = v
			}
			if code := post(t, "StartExport", h, []byte(tc.body)); code != http.StatusOK {
				t.Fatalf("StartExport answered %d, want 200", code)
			}
			evs := waitEvents(t, byTrigger(id), 1)
			if len(evs) != 1 || evs[0].Attrs["ce-type"] != events.TypeRejected {
				t.Fatalf("events = %v, want one rejected", types(evs))
			}
		})
	}
	if got := len(env.emu.ExportRequests()); got != before {
		t.Errorf("bad triggers sent %d export requests", got-before)
	}
}

// TestNotAllowed rejects stores and destinations outside the allow-lists.
func TestNotAllowed(t *testing.T) {
	t.Parallel()
	store, _ := newStore(t, 1)
	foreignStore := "projects/other-project/locations/us-central1/datasets/ds/fhirStores/ehr"
	tests := []struct {
		name  string
		spec  map[string]any
		field string
	}{
		{"store in another project", gcsSpec(foreignStore, nil), "fhirStore"},
		{"foreign bucket", gcsSpec(store, map[string]any{"gcsDestination": map[string]any{"uriPrefix": "gs://" + foreignBkt + "/fhir"}}), "gcsDestination.uriPrefix"},
		{"bucket sharing the allowed prefix", gcsSpec(store, map[string]any{"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportBucket + "-2/fhir"}}), "gcsDestination.uriPrefix"},
		{"path beside the allowed one", gcsSpec(store, map[string]any{"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportBucket + "/fhirx"}}), "gcsDestination.uriPrefix"},
		{"placeholder escaping nothing", gcsSpec(store, map[string]any{"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportBucket + "/{store}"}}), "gcsDestination.uriPrefix"},
		{"foreign dataset", map[string]any{"fhirStore": store, "bigqueryDestination": map[string]any{"datasetUri": "bq://test-project.analytics2", "schemaConfig": map[string]any{"schemaType": "ANALYTICS"}}}, "bigqueryDestination.datasetUri"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			id := newID("deny")
			if code := deliverPubSub(t, "StartExport", id, specJSON(t, tc.spec)); code != http.StatusOK {
				t.Fatalf("StartExport answered %d", code)
			}
			evs := waitEvents(t, byTrigger(id), 1)
			if len(evs) != 1 || evs[0].Attrs["ce-type"] != events.TypeRejected {
				t.Fatalf("events = %v, want rejected", types(evs))
			}
			if e := evs[0].Data.Error; e == nil || e.Field != tc.field || e.Code != 7 || !strings.Contains(e.Message, "allow-list") {
				t.Errorf("error = %+v, want code 7 on %s", e, tc.field)
			}
		})
	}
	if got := len(exportBodies(store)) + len(exportBodies(foreignStore)); got != 0 {
		t.Errorf("not-allowed specs sent %d export requests", got)
	}
}

// TestTransientAPIErrors: 503, 500 and a dropped connection before the API
// acts answer HTTP 500 (Pub/Sub redelivers); the redelivery finds no
// operation with operations.list and makes exactly one export. 429 is not
// redelivered: the run is queued with backoff and a sweep starts it.
func TestTransientAPIErrors(t *testing.T) {
	for _, code := range []int{503, 429, 500, 0} {
		t.Run(fmt.Sprint(code), func(t *testing.T) {
			store, _ := newStore(t, 1)
			id := newID("transient")
			spec := specJSON(t, gcsSpec(store, nil))
			env.emu.FailNext("fhirStores.export", 1, code)
			want := http.StatusInternalServerError
			if code == 429 {
				want = http.StatusOK
			}
			if got := deliverPubSub(t, "StartExport", id, spec); got != want {
				t.Fatalf("StartExport answered %d, want %d", got, want)
			}
			if code == 429 {
				evs := waitEvents(t, byTrigger(id), 1)
				if evs[0].Attrs["ce-type"] != events.TypeQueued || evs[0].Data.Reason != "exhausted" || evs[0].Data.NotBefore == "" {
					t.Fatalf("after 429: %+v, want queued (exhausted) with notBefore", evs[0])
				}
				return // TestBudget429 follows it to its export
			}
			if got := len(eventsFor(byTrigger(id))); got != 0 {
				t.Errorf("events after a transient failure = %d, want 0", got)
			}
			if got := deliverPubSub(t, "StartExport", id, spec); got != http.StatusOK {
				t.Fatalf("redelivery answered %d", got)
			}
			if got := len(acceptedExports(t, store)); got != 1 {
				t.Errorf("exports = %d, want 1", got)
			}
			waitEvents(t, byTrigger(id), 1)
		})
	}
}

// TestPermanentAPIError: a 404 from the API (the store is gone) is
// acknowledged and reported as failed; the pipeline is free again.
func TestPermanentAPIError(t *testing.T) {
	t.Parallel()
	store := location + "/datasets/missing/fhirStores/ehr"
	id := newID("gone")
	spec := gcsSpec(store, nil)
	if code := deliverPubSub(t, "StartExport", id, specJSON(t, spec)); code != http.StatusOK {
		t.Fatalf("StartExport answered %d", code)
	}
	// Events are published at least once: a publish whose answer was lost
	// is sent again, with the same ce-id and data, which consumers drop.
	evs := waitEvents(t, byTrigger(id), 1)
	if evs[0].Attrs["ce-type"] != events.TypeFailed || evs[0].Data.Error == nil || evs[0].Data.Error.Code != 5 {
		t.Fatalf("events = %+v, want one failed with code 5", evs)
	}
	sameEvent(t, "failed", evs)
	if got := pendingFor(t, spec); len(got) != 0 {
		t.Errorf("lock left behind: %v", got)
	}
	// A redelivery republishes the same event and exports nothing.
	deliverPubSub(t, "StartExport", id, specJSON(t, spec))
	evs = waitEvents(t, byTrigger(id), len(evs)+1)
	sameEvent(t, "republished failed", evs)
}

// TestPollOutcomes: a running export produces no event; then exactly one
// succeeded, partial or failed event with counters, error and timing.
func TestPollOutcomes(t *testing.T) {
	env.emu.SetExportTiming(10*time.Minute, 5)
	defer env.emu.SetExportTiming(0, 1)
	tests := []struct {
		name    string
		outcome *healthcaretest.Outcome
		want    string
	}{
		{"succeeded", nil, "succeeded"},
		{"partial", &healthcaretest.Outcome{FailureCount: 2}, "partial"},
		{"failed", &healthcaretest.Outcome{ErrorCode: 13, ErrorMessage: "Healthcare API doesn't have required Cloud Storage permission."}, "failed"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			store, n := newStore(t, 4)
			id := newID("poll")
			if code := deliverPubSub(t, "StartExport", id, specJSON(t, gcsSpec(store, nil))); code != http.StatusOK {
				t.Fatalf("StartExport answered %d", code)
			}
			op := waitEvents(t, byTrigger(id), 1)[0].Data.Operation
			if tc.outcome != nil {
				if err := env.emu.ForceOutcome(op, *tc.outcome); err != nil {
					t.Fatal(err)
				}
			}
			env.clock.Advance(4 * time.Minute)
			poll(t)
			if got := types(eventsFor(byTrigger(id))); !slices.Equal(got, []string{"started"}) {
				t.Fatalf("events while running = %v, want only started", got)
			}
			env.clock.Advance(7 * time.Minute)
			poll(t)
			poll(t)
			evs := waitEvents(t, byTrigger(id), 2)
			if got := types(evs); !slices.Equal(got, []string{"started", tc.want}) {
				t.Fatalf("events = %v, want started, %s", got, tc.want)
			}
			d := outcomes(evs)[0].Data
			if d.CreateTime == "" || d.EndTime == "" || d.Duration == "" || d.Counters == nil {
				t.Errorf("outcome lacks timing or counters: %+v", d)
			}
			switch tc.want {
			case "succeeded":
				if d.Counters.Success != int64(n) || d.Error != nil {
					t.Errorf("succeeded data = %+v, want %d successes", d, n)
				}
			case "partial":
				if d.Counters.Failure != 2 || d.Error != nil {
					t.Errorf("partial data = %+v, want 2 failures", d)
				}
			case "failed":
				if d.Error == nil || d.Error.Code != 13 || !strings.Contains(d.Error.Message, "permission") {
					t.Errorf("failed data = %+v", d)
				}
			}
			if dur, err := time.ParseDuration(d.Duration); err != nil || dur < 659*time.Second || dur > 680*time.Second {
				t.Errorf("duration = %q, want about 660 s on the emulator clock", d.Duration)
			}
		})
	}
}

// TestFinalizeFailures injects a failure after each finalize step; the next
// sweep repeats the work: no lost events, and duplicates are identical.
func TestFinalizeFailures(t *testing.T) {
	steps := []struct {
		name string
		fail func()
	}{
		{"watermark write", func() { env.gcsFail.failNext("POST", "state/watermarks/", 1) }},
		{"outcome publish", func() {
			if env.psFault == nil {
				t.Skip("publish faults need pstest's reactors")
			}
			env.psFault.armed.Store(1)
		}},
		{"run record update", func() { env.gcsFail.failNext("POST", "state/runs/", 1) }},
		{"pending marker delete", func() { env.gcsFail.failNext("DELETE", "state/pending/", 1) }},
	}
	for _, step := range steps {
		t.Run(step.name, func(t *testing.T) {
			store, _ := newStore(t, 2)
			id := newID("fin")
			spec := gcsSpec(store, map[string]any{"incremental": true, "name": "inc"})
			if code := deliverPubSub(t, "StartExport", id, specJSON(t, spec)); code != http.StatusOK {
				t.Fatalf("StartExport answered %d", code)
			}
			waitEvents(t, byTrigger(id), 1)
			step.fail()
			poll(t)
			poll(t)
			evs := waitEvents(t, byTrigger(id), 2)
			outs := outcomes(evs)
			for _, e := range outs {
				if e.Attrs["ce-type"] != events.TypeSucceeded || e.Attrs["ce-id"] != outs[0].Attrs["ce-id"] || e.Raw != outs[0].Raw {
					t.Errorf("outcome events differ: %s %s vs %s %s", e.Attrs["ce-id"], e.Raw, outs[0].Attrs["ce-id"], outs[0].Raw)
				}
			}
			if outs[0].Data.Watermark == "" || outs[0].Data.WatermarkAdvanced == nil || !*outs[0].Data.WatermarkAdvanced {
				t.Errorf("succeeded incremental event lacks the new watermark: %+v", outs[0].Data)
			}
			if left := env.gcsFail.armed() + int(env.psFault.left()); left != 0 {
				t.Errorf("the injected failure was never hit (%d left)", left)
			}
			if got := pendingFor(t, spec); len(got) != 0 {
				t.Errorf("pending marker left: %v", got)
			}
		})
	}
}

// TestLogsAreStructured checks the Cloud Logging shape and that no FHIR
// content reaches the logs.
func TestLogsAreStructured(t *testing.T) {
	t.Parallel()
	store, _ := newStore(t, 2)
	id := newID("logs")
	deliverPubSub(t, "StartExport", id, specJSON(t, gcsSpec(store, nil)))
	waitEvents(t, byTrigger(id), 1)
	var found bool
	for _, line := range strings.Split(strings.TrimSpace(env.logs.String()), "\n") {
		var entry map[string]any
		if err := json.Unmarshal([]byte(line), &entry); err != nil {
			t.Fatalf("log line is not JSON: %s", line)
		}
		if entry["severity"] == nil || entry["message"] == nil {
			t.Errorf("log line lacks severity or message: %s", line)
		}
		if strings.Contains(line, `"resourceType"`) || strings.Contains(line, "birthDate") {
			t.Errorf("log line carries FHIR content: %s", line)
		}
		if entry["trigger"] == id && entry["message"] == "export started" {
			found = entry["store"] == store && entry["operation"] != nil
		}
	}
	if !found {
		t.Error(`no "export started" line with trigger, store and operation`)
	}
}

// TestIncrementalEndToEnd shows the _since sent on consecutive triggers of an
// incremental pipeline, the watermark in the events, and a trigger that
// overlaps a running export being queued as the pipeline's follow-up, started
// by the sweep that ends the first run.
// Not parallel: another test's poll could end the first run before the
// overlapping trigger arrives.
func TestIncrementalEndToEnd(t *testing.T) {
	store, n := newStore(t, 3)
	spec := specJSON(t, gcsSpec(store, map[string]any{"incremental": true, "name": "hourly"}))

	first := newID("inc")
	deliverPubSub(t, "StartExport", first, spec)
	overlap := newID("inc")
	deliverPubSub(t, "StartExport", overlap, spec) // the first run is still pending
	queued := waitEvents(t, byTrigger(overlap), 1)
	if len(queued) != 1 || queued[0].Attrs["ce-type"] != events.TypeQueued || queued[0].Data.Reason != "busy" {
		t.Fatalf("overlapping trigger: events = %+v, want one queued (busy)", queued)
	}
	if got := len(exportBodies(store)); got != 1 {
		t.Fatalf("exports while the pipeline is busy = %d, want 1", got)
	}
	poll(t)
	evs := waitEvents(t, byTrigger(first), 2)
	w1 := outcomes(evs)[0].Data
	if w1.Watermark == "" || w1.Watermark != normalize(t, w1.CreateTime) || !*w1.WatermarkAdvanced || w1.Counters.Success != int64(n) || w1.Since != "" {
		t.Fatalf("first run: %+v, want a full export whose createTime became the watermark", w1)
	}
	// The same sweep started the follow-up, from the first run's watermark.
	follow := waitEvents(t, byTrigger(overlap), 2)
	if follow[1].Attrs["ce-type"] != events.TypeStarted || follow[1].Data.Since != w1.Watermark {
		t.Fatalf("follow-up: %+v, want started with since %s", follow[1], w1.Watermark)
	}
	poll(t)
	follow = waitEvents(t, byTrigger(overlap), 3)
	wf := outcomes(follow)[0].Data
	if !*wf.WatermarkAdvanced || wf.Counters.Success != 0 {
		t.Fatalf("follow-up outcome: %+v, want nothing new and an advanced watermark", wf)
	}

	patient := env.emu.Resources(store)[0]
	var m map[string]any
	json.Unmarshal(patient, &m)
	m["gender"] = "unknown"
	delete(m, "meta")
	if _, err := env.emu.PutResource(store, specJSON(t, m)); err != nil {
		t.Fatal(err)
	}
	second := newID("inc")
	deliverPubSub(t, "StartExport", second, spec)
	bodies := exportBodies(store)
	if len(bodies) != 3 || bodies[0]["_since"] != nil || bodies[1]["_since"] != w1.Watermark || bodies[2]["_since"] != wf.Watermark {
		t.Fatalf("_since sent = %v, want none, %s, %s", bodies, w1.Watermark, wf.Watermark)
	}
	poll(t)
	evs = waitEvents(t, byTrigger(second), 2)
	if s := evs[0].Data; s.Since != wf.Watermark {
		t.Errorf("started event since = %q, want %q", s.Since, wf.Watermark)
	}
	w2 := outcomes(evs)[0].Data
	if w2.Since != wf.Watermark || w2.Counters.Success != 1 || !*w2.WatermarkAdvanced || !(mustParse(t, w2.Watermark).After(mustParse(t, wf.Watermark))) {
		t.Errorf("second run: %+v, want one resource since %s and a later watermark", w2, wf.Watermark)
	}
}

func mustParse(t *testing.T, v string) time.Time {
	t.Helper()
	ts, err := time.Parse(time.RFC3339Nano, v)
	if err != nil {
		t.Fatal(err)
	}
	return ts
}

func normalize(t *testing.T, v string) string {
	return mustParse(t, v).UTC().Format(time.RFC3339Nano)
}

// TestRedeliveryRacesPoll redelivers triggers while a sweep finishes their
// runs: a run the poller has ended must never start again.
func TestRedeliveryRacesPoll(t *testing.T) {
	t.Parallel()
	for i := 0; i < 40; i++ {
		store, _ := newStore(t, 1)
		id := newID("race")
		spec := specJSON(t, gcsSpec(store, nil))
		if code := deliverPubSub(t, "StartExport", id, spec); code != http.StatusOK {
			t.Fatalf("StartExport answered %d", code)
		}
		var wg sync.WaitGroup
		wg.Go(func() { poll(t) })
		for range 3 {
			wg.Go(func() { deliverPubSub(t, "StartExport", id, spec) })
		}
		wg.Wait()
		if got := len(acceptedExports(t, store)); got != 1 {
			t.Fatalf("round %d: exports = %d, want 1", i, got)
		}
	}
}
