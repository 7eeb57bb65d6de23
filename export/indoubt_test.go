package export

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"cloud.google.com/go/storage"
	healthcare "google.golang.org/api/healthcare/v1"
	"google.golang.org/api/option"

	"github.com/fhirexport/fhirexport/events"
	"github.com/fhirexport/fhirexport/healthcaretest"
	"github.com/fhirexport/fhirexport/healthcaretest/stacktest"
)

// TestLostAnswerAmongALongHistory: the export's answer is lost in a dataset
// that holds 2,500 earlier finished operations (exports, imports,
// de-identify…), listed newest or oldest first (the service documents no
// order). Before issue 16 the redelivery either waited an hour among the
// foreign exports ("several unowned … candidates") and then failed, or, with
// this deployment's own history past the 20-page cap and the oldest listed
// first, found nothing and exported a second time. The redelivery must adopt
// the one export the service started, at once, and the next sweeps report it.
func TestLostAnswerAmongALongHistory(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		order healthcaretest.ListOrder
		owned bool // the history's exports are this deployment's (operations/{op} names other runs)
	}{
		{"foreign history newest first", healthcaretest.NewestFirst, false},
		{"foreign history oldest first", healthcaretest.OldestFirst, false},
		{"own history oldest first", healthcaretest.OldestFirst, true},
		{"own history newest first", healthcaretest.NewestFirst, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var opReads atomic.Int64
			counting := func(next http.Handler) http.Handler {
				return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/fx/operations/") {
						opReads.Add(1)
					}
					next.ServeHTTP(w, r)
				})
			}
			var w *world
			slowExport := func(next http.Handler) http.Handler { // the call takes a second
				return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
					if strings.HasSuffix(r.URL.Path, ":export") {
						w.clock.Advance(time.Second)
					}
					next.ServeHTTP(rw, r)
				})
			}
			w = newFrontedWorld(t, fronts{gcs: counting, hc: slowExport})
			store := w.store(t)
			dataset := store[:strings.Index(store, "/fhirStores/")]
			history, err := w.emu.AddHistory(dataset, healthcaretest.History{Count: 2500, Seed: 16})
			if err != nil {
				t.Fatal(err)
			}
			if err := w.emu.SetDatasetListOrder(dataset, tc.order); err != nil {
				t.Fatal(err)
			}
			if tc.owned {
				w.ownHistory(t, history)
			}
			trig := w.newTrigger(t, map[string]any{"fhirStore": store, "gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/h/{store}"}})

			w.emu.FailNext("fhirStores.export", 1, healthcaretest.AcceptedAnswerLost)
			if err := w.x.Start(quiet, trig, nil); err == nil {
				t.Fatal("Start with the answer lost returned nil; want an error (redeliver)")
			}
			w.clock.Advance(10 * time.Second) // Pub/Sub's first redelivery
			lists, reads := countOf(w.emu, "operations.list"), opReads.Load()
			if err := w.x.Start(quiet, trig, nil); err != nil {
				t.Fatalf("the redelivery was not acknowledged: %v", err)
			}
			lists, reads = countOf(w.emu, "operations.list")-lists, opReads.Load()-reads
			if got := countOf(w.emu, "fhirStores.export"); got != 1 {
				t.Errorf("fhirStores.export requests = %d, want exactly 1", got)
			}
			accepted := w.emu.Exports()
			if len(accepted) != 1 {
				t.Fatalf("accepted exports = %d, want 1", len(accepted))
			}
			op := accepted[0].Operation
			if want := (len(history) + 1 + listPageSize - 1) / listPageSize; lists != want {
				t.Errorf("operations.list requests = %d, want %d (every page, once)", lists, want)
			}
			if reads != 1 {
				t.Errorf("ownership records read = %d, want 1 (only candidates inside the call's window)", reads)
			}
			w.drain(t, time.Minute, 5)
			var started, outcomes []event
			for _, e := range w.events(t) {
				switch e.typ {
				case events.TypeStarted:
					started = append(started, e)
				case events.TypeSucceeded, events.TypePartial, events.TypeFailed, events.TypeRejected:
					outcomes = append(outcomes, e)
				}
			}
			if len(started) != 1 || started[0].data.Operation != op {
				t.Errorf("started events %+v, want one naming %s", started, op)
			}
			if len(outcomes) != 1 || outcomes[0].typ != events.TypeSucceeded || outcomes[0].data.Operation != op {
				t.Errorf("outcome events %+v, want one succeeded for %s", outcomes, op)
			}
		})
	}
}

// ownHistory records the exports among ops as this deployment's, each owned
// by an earlier run, as a month of nightly runs leaves them.
func (w *world) ownHistory(t *testing.T, ops []string) {
	t.Helper()
	for i, name := range ops {
		op, ok := w.emu.Operation(name)
		if !ok {
			t.Fatalf("operation %s not found", name)
		}
		if !strings.Contains(string(op.Metadata), "ExportResources") {
			continue
		}
		own := opRecord{Operation: name, Run: "earlier-" + name[strings.LastIndex(name, "/")+1:], Pipeline: "earlier", Recorded: w.clock.Now().Add(-time.Duration(len(ops)-i) * time.Minute)}
		if _, err := w.x.state.create(context.Background(), opObject(name), own, nil); err != nil {
			t.Fatal(err)
		}
	}
}

// countOf counts the requests of an API method the emulator received.
func countOf(emu *healthcaretest.Server, method string) int {
	n := 0
	for _, r := range emu.Requests() {
		if r.APIMethod == method {
			n++
		}
	}
	return n
}

// TestFailedResolutionGivesItsLeaseBack: the redelivery resolving a lost
// answer fails to read the operations (every retry of a page answers 503).
// Before issue 16 it kept the lease it had taken, so every delivery of the
// next two minutes was refused ("another delivery is starting this run")
// while nobody worked on the run; in the fault suite, where each
// resolution's reads failed more often the longer the pipeline's history,
// triggers stayed refused for good. The next delivery must resolve at once.
func TestFailedResolutionGivesItsLeaseBack(t *testing.T) {
	t.Parallel()
	var w *world
	w = newFrontedWorld(t, fronts{hc: func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
			if strings.HasSuffix(r.URL.Path, ":export") {
				w.clock.Advance(time.Second) // the call takes a second
			}
			next.ServeHTTP(rw, r)
		})
	}})
	store := w.store(t)
	trig := w.newTrigger(t, map[string]any{"fhirStore": store, "gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/y/{store}"}})
	w.emu.FailNext("fhirStores.export", 1, healthcaretest.AcceptedAnswerLost)
	if err := w.x.Start(quiet, trig, nil); err == nil {
		t.Fatal("Start with the answer lost returned nil; want an error (redeliver)")
	}
	w.clock.Advance(10 * time.Second)
	w.emu.FailNext("operations.list", listAttempts, http.StatusServiceUnavailable)
	if err := w.x.Start(quiet, trig, nil); err == nil {
		t.Fatal("the resolution succeeded although operations.list failed")
	}
	w.clock.Advance(10 * time.Second) // far less than the start lease
	if err := w.x.Start(quiet, trig, nil); err != nil {
		t.Fatalf("the next delivery was not acknowledged: %v", err)
	}
	if got := countOf(w.emu, "fhirStores.export"); got != 1 {
		t.Errorf("fhirStores.export requests = %d, want exactly 1", got)
	}
	w.drain(t, time.Minute, 5)
	n := 0
	for _, e := range w.events(t) {
		if e.typ == events.TypeSucceeded {
			n++
		}
	}
	if n != 1 {
		t.Errorf("succeeded events = %d, want 1", n)
	}
}

// BenchmarkInDoubtResolution measures the redelivery that resolves a lost
// export answer in a dataset of 10,000 finished operations (a few weeks of a
// busy dataset), against a baseline measured in the same run: one plain
// operations.list pass over the same dataset, every page, with the same
// client. BENCHMARKS.md §6.
//
//	go test ./export -run '^$' -bench InDoubtResolution -benchtime 10x
func BenchmarkInDoubtResolution(b *testing.B) {
	for _, order := range []healthcaretest.ListOrder{healthcaretest.NewestFirst, healthcaretest.OldestFirst} {
		name := map[healthcaretest.ListOrder]string{healthcaretest.NewestFirst: "newest-first", healthcaretest.OldestFirst: "oldest-first"}[order]
		b.Run(name, func(b *testing.B) { benchInDoubt(b, order, 10000) })
	}
}

func benchInDoubt(b *testing.B, order healthcaretest.ListOrder, history int) {
	var gcsRequests, opReads atomic.Int64
	counting := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			gcsRequests.Add(1)
			if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/fx/operations/") {
				opReads.Add(1)
			}
			next.ServeHTTP(w, r)
		})
	}
	var w *world
	slowExport := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
			if strings.HasSuffix(r.URL.Path, ":export") {
				w.clock.Advance(time.Second)
			}
			next.ServeHTTP(rw, r)
		})
	}
	w = benchWorld(b, counting, slowExport)
	store := testLocation + "/datasets/bench/fhirStores/s"
	if err := w.emu.CreateDataset(store[:strings.Index(store, "/fhirStores/")]); err != nil {
		b.Fatal(err)
	}
	if err := w.emu.CreateFHIRStore(store, "R4"); err != nil {
		b.Fatal(err)
	}
	dataset := store[:strings.Index(store, "/fhirStores/")]
	if _, err := w.emu.AddHistory(dataset, healthcaretest.History{Count: history, Seed: 10}); err != nil {
		b.Fatal(err)
	}
	if err := w.emu.SetDatasetListOrder(dataset, order); err != nil {
		b.Fatal(err)
	}
	ops := w.x.hc.Projects.Locations.Datasets.Operations
	var resolve, baseline time.Duration
	var lists, reads, state int64
	b.ResetTimer()
	for i := range b.N {
		// Baseline: one plain pass over every page.
		t0 := time.Now()
		pages := 0
		err := ops.List(dataset).PageSize(listPageSize).Pages(context.Background(), func(*healthcare.ListOperationsResponse) error { pages++; return nil })
		baseline += time.Since(t0)
		if err != nil {
			b.Fatal(err)
		}
		// A new pipeline's run loses its answer; its redelivery resolves it.
		trig := events.Trigger{Source: "//bench", ID: fmt.Sprintf("b%d", i), Spec: []byte(fmt.Sprintf(
			`{"fhirStore":%q,"name":"p%d","gcsDestination":{"uriPrefix":"gs://%s/b/{store}"}}`, store, i, exportsBkt))}
		w.emu.FailNext("fhirStores.export", 1, healthcaretest.AcceptedAnswerLost)
		if err := w.x.Start(quiet, trig, nil); err == nil {
			b.Fatal("Start with the answer lost returned nil")
		}
		w.clock.Advance(10 * time.Second)
		l0, r0, s0 := countOf(w.emu, "operations.list"), opReads.Load(), gcsRequests.Load()
		t0 = time.Now()
		if err := w.x.Start(quiet, trig, nil); err != nil {
			b.Fatalf("redelivery: %v", err)
		}
		resolve += time.Since(t0)
		lists += int64(countOf(w.emu, "operations.list") - l0)
		reads += opReads.Load() - r0
		state += gcsRequests.Load() - s0
		w.clock.Advance(10 * time.Minute) // the next run's window holds none of these
	}
	b.StopTimer()
	if n := countOf(w.emu, "fhirStores.export"); n != b.N {
		b.Fatalf("%d fhirStores.export requests for %d triggers", n, b.N)
	}
	n := float64(b.N)
	b.ReportMetric(float64(resolve.Milliseconds())/n, "ms/resolution")
	b.ReportMetric(float64(baseline.Milliseconds())/n, "ms/list-pass")
	b.ReportMetric(float64(resolve)/float64(baseline), "resolution/list-pass")
	b.ReportMetric(float64(lists)/n, "lists/resolution")
	b.ReportMetric(float64(reads)/n, "ownership-reads/resolution")
	b.ReportMetric(float64(state)/n, "state-requests/resolution")
}

// benchWorld is newFrontedWorld for a benchmark: the Exporter's Cloud
// Storage and Healthcare traffic through gcs and hc.
func benchWorld(b *testing.B, gcs, hc func(http.Handler) http.Handler) *world {
	b.Helper()
	ctx := context.Background()
	clock := healthcaretest.NewFakeClock(time.Date(2026, 11, 26, 0, 0, 0, 0, time.UTC))
	s := stacktest.New(b, stacktest.Options{Buckets: []string{"state", exportsBkt}, Topics: []string{eventsTopic},
		Healthcare: healthcaretest.Options{Clock: clock, Logf: func(string, ...any) {}}})
	front := func(h func(http.Handler) http.Handler, base string) string {
		u, err := url.Parse(base)
		if err != nil {
			b.Fatal(err)
		}
		srv := httptest.NewServer(h(httputil.NewSingleHostReverseProxy(u)))
		b.Cleanup(srv.Close)
		return srv.URL
	}
	st, err := storage.NewClient(ctx, option.WithEndpoint(front(gcs, s.GCSURL)+"/storage/v1/"), option.WithoutAuthentication(), storage.WithJSONReads())
	if err != nil {
		b.Fatal(err)
	}
	hcs, err := healthcare.NewService(ctx, option.WithEndpoint(front(hc, s.Healthcare.URL)), option.WithoutAuthentication())
	if err != nil {
		b.Fatal(err)
	}
	pub := events.NewPublisher(s.PubSub, eventsTopic)
	b.Cleanup(pub.Stop)
	policy, err := ParsePolicy(testLocation+"/datasets/*/fhirStores/*", "gs://"+exportsBkt)
	if err != nil {
		b.Fatal(err)
	}
	return &world{x: New(hcs, NewState(st, "state", "fx"), pub, policy, clock.Now), emu: s.Healthcare, clock: clock, storage: s.Storage, ps: s.Pstest}
}

// TestLateOperationOfATimedOutCall: the export call times out, and the
// request takes effect at the service later, after the first redelivery
// listed the dataset and found nothing. Exporting again at that first look
// made two exports; after a timeout, "none" is an answer only once the
// call's window (Called + CallSkew) has passed.
func TestLateOperationOfATimedOutCall(t *testing.T) {
	t.Parallel()
	var w *world
	var calls atomic.Int64
	w = newFrontedWorld(t, fronts{hc: func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
			if strings.HasSuffix(r.URL.Path, ":export") && r.Header.Get("X-Late") == "" {
				calls.Add(1)
				io.Copy(io.Discard, r.Body) // the server notices a client that gave up only then
				<-r.Context().Done()        // held until the client gives up
				w.clock.Advance(time.Second)
				return
			}
			next.ServeHTTP(rw, r)
		})
	}})
	w.x.StartLease = 2 * time.Second // the call's deadline: 1.5 s
	store := w.store(t)
	dest := "gs://" + exportsBkt + "/late/" + store[strings.LastIndex(store, "/")+1:]
	trig := w.newTrigger(t, map[string]any{"fhirStore": store, "gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/late/{store}"}})
	if err := w.x.Start(quiet, trig, nil); err == nil {
		t.Fatal("Start with the export call timing out returned nil")
	}
	w.clock.Advance(10 * time.Second)
	if err := w.x.Start(quiet, trig, nil); err == nil {
		t.Fatal("the first redelivery concluded there was no export while the call could still take effect")
	}
	if n := calls.Load(); n != 1 {
		t.Fatalf("export calls before the call's window passed = %d, want 1", n)
	}
	// The delayed request reaches the service now.
	w.clock.Advance(20 * time.Second)
	late := w.x.hc.Projects.Locations.Datasets.FhirStores.Export(store, &healthcare.ExportResourcesRequest{
		GcsDestination: &healthcare.GoogleCloudHealthcareV1FhirGcsDestination{UriPrefix: dest}})
	late.Header().Set("X-Late", "1")
	if _, err := late.Do(); err != nil {
		t.Fatal(err)
	}
	w.clock.Advance(2 * time.Minute)
	if err := w.x.Start(quiet, trig, nil); err != nil {
		t.Fatalf("the redelivery after the call's window was not acknowledged: %v", err)
	}
	if got := len(w.emu.Exports()); got != 1 {
		t.Errorf("accepted exports = %d, want 1 (the late one, adopted)", got)
	}
	w.drain(t, time.Minute, 5)
	n := 0
	for _, e := range w.events(t) {
		if e.typ == events.TypeSucceeded && e.data.Operation == w.emu.Exports()[0].Operation {
			n++
		}
	}
	if n != 1 {
		t.Errorf("succeeded events for the adopted export = %d, want 1", n)
	}
}

// TestLostAnswerBesideAStartingSibling: two stores of one dataset (a fleet's
// stores share it) start side by side. A's instance dies after the service
// accepted A's export and before A recorded the operation; B's call is lost
// before the service acts. B's resolution then finds one unowned export in
// its window: A's. Adopting it, as a lone unowned candidate used to be, gave
// B A's export and made A export again. The lone candidate is B's only once
// no sibling that may have started it is still starting; until then the
// output under each run's destination tells (A confirms its own, B sees it
// ended elsewhere): each store gets exactly one export and one outcome.
func TestLostAnswerBesideAStartingSibling(t *testing.T) {
	t.Parallel()
	var dead, crashAfterExport atomic.Bool
	gcs := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
			if dead.Load() && isWrite(r) {
				rw.Header().Set("Content-Type", "application/json")
				rw.WriteHeader(http.StatusForbidden)
				io.WriteString(rw, `{"error":{"code":403,"message":"injected: the instance crashed"}}`)
				return
			}
			next.ServeHTTP(rw, r)
		})
	}
	hc := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
			next.ServeHTTP(rw, r)
			if strings.HasSuffix(r.URL.Path, ":export") && crashAfterExport.Load() {
				dead.Store(true)
			}
		})
	}
	w := newFrontedWorld(t, fronts{gcs: gcs, hc: hc})
	w.emu.SetExportTiming(time.Minute, 1)
	_, stores := w.fleet(t, 2)
	for _, s := range stores { // exports that write output: what tells them apart
		if _, err := w.emu.Seed(s, 1, 2); err != nil {
			t.Fatal(err)
		}
	}
	spec := func(s string) map[string]any {
		return map[string]any{"fhirStore": s, "gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/sibling/{store}"}}
	}
	a, b := w.newTrigger(t, spec(stores[0])), w.newTrigger(t, spec(stores[1]))

	crashAfterExport.Store(true)
	if err := w.x.Start(quiet, a, nil); err == nil {
		t.Fatal("A's Start returned nil although its instance died; want an error (redeliver)")
	}
	crashAfterExport.Store(false)
	dead.Store(false)
	w.emu.FailNext("fhirStores.export", 1, healthcaretest.DropBeforeActing)
	if err := w.x.Start(quiet, b, nil); err == nil {
		t.Fatal("B's Start with its call lost returned nil; want an error (redeliver)")
	}
	for i := 0; ; i++ { // Pub/Sub redelivers both until acknowledged; B first
		if i == 30 {
			t.Fatal("redeliveries kept failing")
		}
		w.clock.Advance(30 * time.Second)
		eb, ea := w.x.Start(quiet, b, nil), w.x.Start(quiet, a, nil)
		if ea == nil && eb == nil {
			break
		}
	}
	w.drain(t, 3*time.Minute, 30)
	got, succeeded := exportsByStore(w.emu), count(w.events(t), events.TypeSucceeded)
	for _, s := range stores {
		if got[s] != 1 || succeeded[s] != 1 {
			t.Errorf("store %s: %d exports, %d succeeded events; want 1 and 1", s, got[s], succeeded[s])
		}
	}
}

// TestLostAnswerBesideOtherDatasetsStarts: a lost answer is resolved while
// another pipeline, in another dataset, is starting and its lock cannot be
// read (a 403 burst, an object being rewritten). Before, the sibling check
// read every starting lock of the deployment, so one unreadable lock
// anywhere failed every resolution: under faults, runs in doubt waited far
// beyond their sweeps. The locks' metadata names their dataset now; only a
// lock written without it (an earlier version's) is read, and one of the
// same dataset still holds the adoption back.
func TestLostAnswerBesideOtherDatasetsStarts(t *testing.T) {
	t.Parallel()
	var unreadable atomic.Value // object name whose reads answer 403
	unreadable.Store("")
	gcs := refuse(func(r *http.Request) bool {
		name := unreadable.Load().(string)
		return name != "" && r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/"+name)
	})
	w := newFrontedWorld(t, fronts{gcs: gcs})
	w.emu.SetExportTiming(time.Minute, 1) // the export writes nothing before the resolution
	_, stores := w.fleet(t, 2)
	other := w.store(t) // another dataset
	spec := func(s string) map[string]any {
		return map[string]any{"fhirStore": s, "gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/other/{store}"}}
	}
	elsewhere := w.startingLock(t, w.newTrigger(t, spec(other)), lockMeta)
	unreadable.Store(w.x.state.object(pendingObject(elsewhere.Pipeline)))
	legacy := w.startingLock(t, w.newTrigger(t, spec(stores[1])), func(p pendingRecord) map[string]string {
		m := lockMeta(p)
		delete(m, "dataset") // as written before locks named their dataset
		return m
	})

	trig := w.newTrigger(t, spec(stores[0]))
	w.emu.FailNext("fhirStores.export", 1, healthcaretest.AcceptedAnswerLost)
	if err := w.x.Start(quiet, trig, nil); err == nil {
		t.Fatal("Start with the answer lost returned nil; want an error (redeliver)")
	}
	w.clock.Advance(3 * time.Minute) // past the start lease
	// A lock of the same dataset without the metadata is read, and its run
	// could have started the export: no adoption yet.
	if err := w.x.Start(quiet, trig, nil); err == nil {
		t.Fatal("the redelivery adopted the export while a sibling of its dataset was starting")
	}
	if err := w.x.state.bkt.Object(w.x.state.object(pendingObject(legacy.Pipeline))).Delete(quiet); err != nil {
		t.Fatal(err)
	}
	w.clock.Advance(3 * time.Minute) // past the start lease
	if err := w.x.Start(quiet, trig, nil); err != nil {
		t.Fatalf("the redelivery failed beside another dataset's unreadable lock: %v", err)
	}
	accepted := w.emu.Exports()
	if len(accepted) != 1 || accepted[0].Store != stores[0] {
		t.Fatalf("accepted exports %+v, want one of %s", accepted, stores[0])
	}
	var started []event
	for _, e := range w.events(t) {
		if e.typ == events.TypeStarted {
			started = append(started, e)
		}
	}
	if len(started) != 1 || started[0].data.Operation != accepted[0].Operation {
		t.Errorf("started events %+v, want one naming %s", started, accepted[0].Operation)
	}
}
