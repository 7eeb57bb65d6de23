package export

// Fleets of thousands of stores (issue 16): the expansion under a latency
// model that charges each request its latency without sleeping, and a
// delivery that runs out of its slice leaving the rest to its redelivery.

import (
	"context"
	"flag"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"sync"
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

// fleetStores is the size of TestFleetOfThousandsFitsTheDeadline. CI runs
// 300: fake-gcs-server finds objects by scanning its bucket, so its cost
// grows with the square of the stores, while the modelled time per store
// the test bounds does not grow with them (BENCHMARKS.md has the 5,000).
var fleetStores = flag.Int("fleet.stores", 300, "allowed stores of TestFleetOfThousandsFitsTheDeadline (the issue's size: 5000)")

// fleetTarget is the fleet that must fit StartExport's deadline: a delivery
// may spend startDeadline/fleetTarget per store.
const fleetTarget = 5000

// latencyModel charges every request of the Exporter a latency on a virtual
// clock instead of sleeping. A request is charged to the lane its context
// names: the logger it carries, which is the delivery's own or, inside a
// fleet, the worker's. Calls on one lane follow one another; lanes run side by
// side. So the modelled time of a delivery is its own lane plus the longest
// worker lane (compute is taken as free: the model is latency only).
type latencyModel struct {
	mu       sync.Mutex
	lanes    map[*slog.Logger]time.Duration
	requests atomic.Int64
}

func newLatencyModel() *latencyModel { return &latencyModel{lanes: map[*slog.Logger]time.Duration{}} }

func (m *latencyModel) charge(ctx context.Context, d time.Duration) {
	m.requests.Add(1)
	m.mu.Lock()
	m.lanes[Logger(ctx)] += d
	m.mu.Unlock()
}

// elapsed is the modelled time since reset of the delivery whose context
// carries main.
func (m *latencyModel) elapsed(main *slog.Logger) (total time.Duration, lanes int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var longest time.Duration
	for l, d := range m.lanes {
		if l != main {
			longest = max(longest, d)
		}
	}
	return m.lanes[main] + longest, len(m.lanes)
}

func (m *latencyModel) reset() {
	m.mu.Lock()
	clear(m.lanes)
	m.mu.Unlock()
	m.requests.Store(0)
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// client is an HTTP client whose every request is charged d.
func (m *latencyModel) client(d time.Duration) *http.Client {
	return &http.Client{Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
		m.charge(r.Context(), d)
		return http.DefaultTransport.RoundTrip(r)
	})}
}

// chargedPublisher charges every publish d.
type chargedPublisher struct {
	Publisher
	m *latencyModel
	d time.Duration
}

func (p chargedPublisher) Publish(ctx context.Context, e events.Event) error {
	p.m.charge(ctx, p.d)
	return p.Publisher.Publish(ctx, e)
}

// The latency model of BENCHMARKS.md: 20 ms per Cloud Storage request (and
// per publish), 150 ms per Healthcare call.
const (
	gcsLatency = 20 * time.Millisecond
	hcLatency  = 150 * time.Millisecond
	// startDeadline is StartExport's timeout in deploy.sh.
	startDeadline = 60 * time.Second
)

// newModelledWorld is a world whose Exporter's requests are charged by m.
func newModelledWorld(t *testing.T, m *latencyModel) *world {
	t.Helper()
	ctx := context.Background()
	s, clock := newWorldStack(t)
	if *fleetStores > 1000 {
		// fake-gcs-server's memory backend scans the bucket for every
		// object: at thousands of stores that is minutes of its own work.
		// Its folder backend (on tmpfs when there is one) opens the file.
		dir := ""
		if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
			dir = "/dev/shm"
		}
		root, err := os.MkdirTemp(dir, "fleet-test-gcs-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(root) })
		clock = healthcaretest.NewFakeClock(clock.Now())
		s = stacktest.New(t, stacktest.Options{Buckets: []string{"state", exportsBkt}, Topics: []string{eventsTopic},
			StorageRoot: root, Healthcare: healthcaretest.Options{Clock: clock}})
	}
	st, err := storage.NewClient(ctx, option.WithEndpoint(s.GCSURL+"/storage/v1/"), option.WithHTTPClient(m.client(gcsLatency)), storage.WithJSONReads())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	hc, err := healthcare.NewService(ctx, option.WithEndpoint(s.Healthcare.URL), option.WithHTTPClient(m.client(hcLatency)))
	if err != nil {
		t.Fatal(err)
	}
	w := worldOn(t, s, clock, hc, st, clock.Now)
	w.x.pub = chargedPublisher{w.x.pub, m, gcsLatency}
	w.x.WaitForPeer = 0
	return w
}

// fleetWithRefused creates a dataset of allowed+refused stores and a policy
// allowing all but the refused ones (every refused-th store), and returns the
// fleet's trigger spec.
func (w *world) fleetWithRefused(t *testing.T, allowed, every int) (spec map[string]any, ok, denied []string) {
	t.Helper()
	refused := allowed / (every - 1)
	_, names := w.fleet(t, allowed+refused)
	for i, s := range names {
		if i%every == every-1 && len(denied) < refused {
			denied = append(denied, s)
		} else {
			ok = append(ok, s)
		}
	}
	policy, err := ParsePolicy(strings.Join(ok, ","), "gs://"+exportsBkt)
	if err != nil {
		t.Fatal(err)
	}
	w.x.policy = policy
	dataset := names[0][:strings.LastIndex(names[0], "/fhirStores/")]
	return map[string]any{"fhirStore": dataset + "/fhirStores/*", "name": "nightly",
		"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/fleet/{store}/{date}"}}, ok, denied
}

// TestFleetOfThousandsFitsTheDeadline: one fleet trigger over -fleet.stores
// allowed stores (and 1 % refused) under the latency model, with the default
// budget of 5. One delivery claims every store at a pace that fits 5,000
// stores into StartExport's 60 s deadline (12 ms a store), modelled: the stores
// are claimed FleetWorkers at a time (one after the other they took about
// 200 ms each, 1,000 s for 5,000). Every allowed store gets
// exactly one run (5 exports started, the rest queued, each reported once),
// every refused store is reported once, and a redelivery starts nothing.
func TestFleetOfThousandsFitsTheDeadline(t *testing.T) {
	t.Parallel()
	m := newLatencyModel()
	w := newModelledWorld(t, m)
	w.emu.SetExportTiming(time.Hour, 1)
	spec, allowed, denied := w.fleetWithRefused(t, *fleetStores, 101)
	trig := w.newTrigger(t, spec)

	m.reset()
	if err := w.x.Start(quiet, trig, nil); err != nil {
		t.Fatalf("the first delivery did not finish the fleet: %v", err)
	}
	took, lanes := m.elapsed(Logger(quiet))
	reqs := m.requests.Load()
	t.Logf("%d stores (%d refused): %d requests, %.1f per store, modelled %s on %d lanes (%s per store; one after the other: %s)",
		len(allowed)+len(denied), len(denied), reqs, float64(reqs)/float64(len(allowed)+len(denied)), took.Round(time.Millisecond), lanes,
		(took / time.Duration(len(allowed)+len(denied))).Round(time.Microsecond), (time.Duration(reqs) * gcsLatency).Round(time.Second))
	stores := len(allowed) + len(denied)
	if budget := startDeadline * time.Duration(stores) / fleetTarget; took >= budget {
		t.Errorf("the expansion took %s under the latency model, %s per store: %d stores would take %s, past StartExport's %s deadline",
			took.Round(time.Millisecond), took/time.Duration(stores), fleetTarget, took*fleetTarget/time.Duration(stores), startDeadline)
	}

	evs := w.events(t)
	queued, rejected, started := count(evs, events.TypeQueued), count(evs, events.TypeRejected), count(evs, events.TypeStarted)
	if got := len(w.emu.Exports()); got != DefaultMaxRunning || len(started) != DefaultMaxRunning {
		t.Errorf("%d exports, %d started events; want the budget, %d", got, len(started), DefaultMaxRunning)
	}
	for _, s := range allowed {
		if queued[s]+started[s] != 1 {
			t.Fatalf("store %s: %d queued and %d started events, want one of them", s, queued[s], started[s])
		}
	}
	for _, s := range denied {
		if rejected[s] != 1 {
			t.Errorf("refused store %s: %d rejected events, want 1", s, rejected[s])
		}
	}
	if len(rejected) != len(denied) {
		t.Errorf("rejected events for %d stores, want %d", len(rejected), len(denied))
	}
	// One run record per store: the allowed ones claimed, the refused ones
	// recorded as rejected (for fhirexport show).
	if runs := len(w.objects(t, "runs")); runs != len(allowed)+len(denied) {
		t.Errorf("%d run records, want one per store (%d)", runs, len(allowed)+len(denied))
	}

	// A redelivery (the first answer lost) walks the claims side by side too.
	m.reset()
	if err := w.x.Start(quiet, trig, nil); err != nil {
		t.Fatalf("redelivery: %v", err)
	}
	again, _ := m.elapsed(Logger(quiet))
	t.Logf("redelivery with every store claimed: %d requests, modelled %s", m.requests.Load(), again.Round(time.Millisecond))
	if budget := startDeadline * time.Duration(stores) / fleetTarget; again >= budget {
		t.Errorf("a redelivery took %s under the latency model: %d stores would take %s, past the deadline", again.Round(time.Millisecond),
			fleetTarget, again*fleetTarget/time.Duration(stores))
	}
	if got := len(w.emu.Exports()); got != DefaultMaxRunning {
		t.Errorf("exports after a redelivery = %d, want still %d", got, DefaultMaxRunning)
	}
	if n := len(w.events(t)); n != len(evs) {
		t.Errorf("a redelivery published %d new events", n-len(evs))
	}
}

// TestFleetDeliveryResumesAfterItsSlice: each request moves the clock 20 ms
// (the latency model, on the Exporter's own clock) and a delivery may take new
// stores for 2 s. Every delivery of a 200-store fleet stops after its slice
// and asks for a redelivery; each redelivery resumes after the stores
// recorded as handled: it makes progress though most stores are claimed, and
// its requests are bounded by the stores it handles, not by the stores
// handled before. In the end every allowed store is exported exactly once and
// every refused store reported once.
func TestFleetDeliveryResumesAfterItsSlice(t *testing.T) {
	t.Parallel()
	var requests atomic.Int64
	var clock func(time.Duration)
	tick := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
			requests.Add(1)
			clock(gcsLatency)
			next.ServeHTTP(rw, r)
		})
	}
	w := newFrontedWorld(t, fronts{gcs: tick})
	clock = w.clock.Advance
	w.emu.SetExportTiming(time.Minute, 1)
	w.emu.SetMaxRunningOperations(DefaultMaxRunning)
	const slice, workers = 2 * time.Second, 4
	w.x.FleetSlice, w.x.FleetWorkers = slice, workers
	spec, allowed, denied := w.fleetWithRefused(t, 200, 101)
	trig := w.newTrigger(t, spec)

	// A store costs at most this many requests (claim, admit, queue or
	// start, events), whether a run is created or found claimed.
	const perStore, perDelivery = 14, 4 // the cursor read and write, the listing
	deliveries := 0
	for runs := 0; ; {
		deliveries++
		if deliveries > 60 {
			t.Fatalf("%d deliveries did not finish the fleet: %d of %d runs", deliveries, runs, len(allowed))
		}
		requests.Store(0)
		begin := w.clock.Now()
		err := w.x.Start(quiet, trig, nil)
		took, reqs := w.clock.Now().Sub(begin), requests.Load()
		now := len(w.objects(t, "runs"))
		// In flight when the slice ends: at most one store per worker, each
		// finishing its requests.
		if limit := slice + workers*perStore*gcsLatency; took > limit {
			t.Errorf("delivery %d took %s of the clock, past its slice and the stores in flight (%s)", deliveries, took, limit)
		}
		if err == nil {
			break
		}
		if now <= runs {
			t.Fatalf("delivery %d made no progress (%d runs): %v", deliveries, now, err)
		}
		if bound := int64((now-runs+workers+1)*perStore + perDelivery); reqs > bound {
			t.Errorf("delivery %d: %d requests for %d new runs, want at most %d: it walked stores an earlier delivery handled", deliveries, reqs, now-runs, bound)
		}
		runs = now
		w.clock.Advance(10 * time.Second) // Pub/Sub's redelivery backoff
	}
	t.Logf("%d stores in %d deliveries of a %s slice", len(allowed)+len(denied), deliveries, slice)
	if deliveries < 3 {
		t.Errorf("the fleet took %d deliveries; with a %s slice it needs several (the slice is not honoured)", deliveries, slice)
	}
	if left := w.objects(t, "fleets"); len(left) != 0 {
		t.Errorf("fleet cursors left after the expansion finished: %v", left)
	}

	w.drain(t, 2*time.Minute, 3*len(allowed)/DefaultMaxRunning)
	evs := w.events(t)
	got, succeeded, rejected := exportsByStore(w.emu), count(evs, events.TypeSucceeded), count(evs, events.TypeRejected)
	for _, s := range allowed {
		if got[s] != 1 || succeeded[s] != 1 {
			t.Errorf("store %s: %d exports, %d succeeded events; want 1 and 1", s, got[s], succeeded[s])
		}
	}
	for _, s := range denied {
		if got[s] != 0 || rejected[s] != 1 {
			t.Errorf("refused store %s: %d exports, %d rejected events; want 0 and 1", s, got[s], rejected[s])
		}
	}
	if len(rejected) != len(denied) {
		t.Errorf("rejected events for %d stores, want %d", len(rejected), len(denied))
	}
}
