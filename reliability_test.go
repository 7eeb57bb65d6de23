package fhirexport

// Reliability tests: many triggers while every service fails about 30 % of
// the time (TestFaultInjection), and the functions killed with SIGKILL between
// any two steps (TestCrashRecovery). Both assert what users observe: exports
// made, events published, state left behind.
//
// Larger runs:
//
//	go test -run TestFaultInjection -fault.triggers=5000 -timeout 30m
//	go test -run TestCrashRecovery -crash.sweep -timeout 30m

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
	"math/rand"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"cloud.google.com/go/storage"
	"github.com/GoogleCloudPlatform/functions-framework-go/funcframework"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fhirexport/fhirexport/events"
	"github.com/fhirexport/fhirexport/export"
	"github.com/fhirexport/fhirexport/healthcaretest"
	"github.com/fhirexport/fhirexport/healthcaretest/stacktest"
)

var (
	faultTriggers  = flag.Int("fault.triggers", 500, "TestFaultInjection: number of export triggers")
	faultPipes     = flag.Int("fault.pipelines", 100, "TestFaultInjection: pipelines run concurrently; each gets triggers/pipelines triggers one after another")
	faultRate      = flag.Float64("fault.rate", 0.3, "TestFaultInjection: fraction of calls to each service that fail")
	faultSeed      = flag.Int64("fault.seed", 1, "TestFaultInjection: seed of the fault injectors")
	faultHistory   = flag.Int("fault.history", 1000, "TestFaultInjection: finished foreign operations in each pipeline's dataset before the first trigger (listed oldest first in half the datasets, newest first in the others)")
	crashSweep     = flag.Bool("crash.sweep", false, "TestCrashRecovery: also crash at every state request and API call of a run, before and after it takes effect")
	crashRealLease = flag.Bool("crash.reallease", false, "TestCrashRecovery: keep the production leases (2 min) in the child instead of shortening them")
)

// --- delivery ---

var deliverClient = &http.Client{Timeout: 3 * time.Minute}

// deliverTo posts a Pub/Sub message to fn at base the way Eventarc does and
// returns the HTTP status. Unlike deliverPubSub it may be called from any
// goroutine and returns transport errors.
func deliverTo(base, fn, id string, data []byte) (int, error) {
	body, _ := json.Marshal(map[string]any{
		"message": map[string]any{
			"data": base64.StdEncoding.EncodeToString(data), "messageId": id, "publishTime": "2026-11-26T01:02:03.456Z",
		},
		"subscription": "projects/test-project/subscriptions/eventarc-sub",
	})
	req, err := http.NewRequest(http.MethodPost, base+"/"+fn, bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	for k, v := range map[string]string{"ce-specversion": "1.0", "ce-type": events.MessagePublishedType, "ce-source": requestTopic,
		"ce-id": id, "ce-time": "2026-11-26T01:02:03.456Z", "Content-Type": "application/json"} {
		req.Header.Set(k, v)
	}
	resp, err := deliverClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, nil
}

// pipelineOf returns the pipeline key of a spec, as the state names it.
func pipelineOf(t *testing.T, spec map[string]any) string {
	t.Helper()
	s, err := export.ParseSpec(specJSON(t, spec))
	if err != nil {
		t.Fatal(err)
	}
	return export.PipelineKey(s)
}

// stateExists reports whether state/name exists, read past the fault proxy.
func stateExists(name string) (bool, error) {
	_, err := env.storage.Bucket(stateBucket).Object("state/" + name).Attrs(context.Background())
	if errors.Is(err, storage.ErrObjectNotExist) {
		return false, nil
	}
	return err == nil, err
}

// stateJSON decodes state/name into v, read past the fault proxy.
func stateJSON(name string, v any) error {
	r, err := env.storage.Bucket(stateBucket).Object("state/" + name).NewReader(context.Background())
	if err != nil {
		return err
	}
	defer r.Close()
	return json.NewDecoder(r).Decode(v)
}

// objectName is the state object a Cloud Storage JSON API request is about.
func objectName(r *http.Request) string {
	if n := r.URL.Query().Get("name"); n != "" {
		return n
	}
	_, rest, ok := strings.Cut(r.URL.EscapedPath(), "/o/")
	if !ok {
		return ""
	}
	n, _ := url.PathUnescape(rest)
	return n
}

// peekBody returns the request body and leaves it readable.
func dropConn(w http.ResponseWriter) {
	if hj, ok := w.(http.Hijacker); ok {
		if c, _, err := hj.Hijack(); err == nil {
			c.Close()
			return
		}
	}
	panic(http.ErrAbortHandler)
}

// --- random faults ---

// chaos draws faults from one seeded source and counts what it injected.
type chaos struct {
	mu     sync.Mutex
	rng    *rand.Rand
	counts map[string]int
}

func newChaos(seed int64) *chaos {
	return &chaos{rng: rand.New(rand.NewSource(seed)), counts: map[string]int{}}
}

// draw returns two uniform numbers: whether to fail, and how.
func (c *chaos) draw() (float64, float64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.rng.Float64(), c.rng.Float64()
}

func (c *chaos) count(kind string) {
	c.mu.Lock()
	c.counts[kind]++
	c.mu.Unlock()
}

func (c *chaos) summary() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	keys := make([]string, 0, len(c.counts))
	for k := range c.counts {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, " %s=%d", k, c.counts[k])
	}
	return b.String()
}

// gcsChaos fails a fraction of the state bucket's requests before they take
// effect: mostly 503, 429 and dropped connections, which the storage client
// retries itself, and a share of 403s, which it does not, so handlers fail.
//
// One write is spared the 403s: recording the operation in the pipeline lock
// right after the export was accepted. When that write fails for good, the
// export runs unrecorded and the next start after the lease makes a second
// one; the code documents that window and TestCrashRecovery measures it.
func (c *chaos) gcs(rate, hard float64) func(w http.ResponseWriter, r *http.Request, next http.Handler) bool {
	return func(w http.ResponseWriter, r *http.Request, next http.Handler) bool {
		if !strings.Contains(r.URL.Path, "/b/"+stateBucket+"/") {
			return false
		}
		c.count("requests")
		fail, how := c.draw()
		if fail >= rate {
			return false
		}
		switch {
		case how < hard && !recordsOperation(r):
			c.count("403")
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusForbidden)
			io.WriteString(w, `{"error":{"code":403,"message":"injected: permission denied burst"}}`)
		case how < hard+(1-hard)/3:
			c.count("drop")
			dropConn(w)
		default:
			code := http.StatusServiceUnavailable
			if how > 1-(1-hard)/3 {
				code = http.StatusTooManyRequests
			}
			c.count(fmt.Sprint(code))
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(code)
			fmt.Fprintf(w, `{"error":{"code":%d,"message":"injected"}}`, code)
		}
		return true
	}
}

// recordsOperation reports whether r may be the write that records an
// accepted export's operation in its pipeline lock: an update of a pending
// marker that takes no finalize lease.
func recordsOperation(r *http.Request) bool {
	if r.Method != http.MethodPost || !strings.Contains(objectName(r), "/pending/") {
		return false
	}
	if g := r.URL.Query().Get("ifGenerationMatch"); g == "" || g == "0" {
		return false
	}
	return !bytes.Contains(stacktest.PeekBody(r), []byte(`"finalizing"`))
}

// publish fails a fraction of Publish calls: mostly UNAVAILABLE, which the
// Pub/Sub client retries, and a share of PERMISSION_DENIED, which it does not.
func (c *chaos) publish(rate, hard float64) func(req any) (bool, any, error) {
	return func(req any) (bool, any, error) {
		if _, ok := req.(*pb.PublishRequest); !ok {
			return false, nil, nil
		}
		c.count("requests")
		fail, how := c.draw()
		if fail >= rate {
			return false, nil, nil
		}
		if how < hard {
			c.count("PermissionDenied")
			return true, nil, status.Error(codes.PermissionDenied, "injected publish failure")
		}
		c.count("Unavailable")
		return true, nil, status.Error(codes.Unavailable, "injected publish failure")
	}
}

// shortenLeases makes the in-process exporter's leases a few seconds, so a
// lock or finalize lease left by a failed handler expires within the test,
// and restores them at cleanup.
func shortenLeases(t *testing.T, lease time.Duration) {
	t.Helper()
	x, err := instance.exporter(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	start, final, peer, backoff, skew := x.StartLease, x.FinalizeLease, x.WaitForPeer, x.RetryBackoff, x.CallSkew
	x.StartLease, x.FinalizeLease, x.WaitForPeer, x.RetryBackoff = lease, lease, lease/4, lease/4
	// The functions and the emulator read one clock here: no skew to allow
	// for, only an export call the emulator still acts on after the client
	// gave up (the window scales with the leases).
	x.CallSkew = lease
	t.Cleanup(func() {
		x.StartLease, x.FinalizeLease, x.WaitForPeer, x.RetryBackoff, x.CallSkew = start, final, peer, backoff, skew
	})
}

// --- TestFaultInjection ---

// faultPipeline is one store with one named incremental pipeline and the
// triggers sent to it, one after another.
type faultPipeline struct {
	store, key string
	spec       []byte
	triggers   []string
	attempts   int // StartExport deliveries
	failed     int // of which were not acknowledged
}

// TestFaultInjection sends many triggers while about 30 % of the calls to the
// Healthcare API, Pub/Sub and Cloud Storage fail, redelivers every trigger
// whose handler did not acknowledge it (as Pub/Sub would), ticks PollExport
// until every run has an outcome, and then checks: one export per trigger,
// at least one outcome event per export and identical duplicates, no lock or
// marker left, and each watermark at the createTime of its pipeline's last
// successful run.
//
// Triggers to one pipeline are sent only after the previous run's outcome is
// out and its marker gone, so none is legitimately skipped: any rejected event
// is a failure.
func TestFaultInjection(t *testing.T) {
	if env.psFault == nil {
		t.Skip("Pub/Sub faults need pstest's reactors")
	}
	began := time.Now()
	// More triggers make longer chains, not more concurrent pipelines: a
	// sweep over thousands of markers outgrows two cores.
	nTrig := *faultTriggers
	nPipe := max(1, min(*faultPipes, nTrig))
	rate, seed := *faultRate, *faultSeed

	// Each pipeline's dataset holds a long history of other operations, as a
	// real one does (exports among them, none of them ours), listed in
	// either order: a lost answer must be resolved among them.
	pipes := make([]*faultPipeline, nPipe)
	for i := range pipes {
		store, _ := newStore(t, 1)
		spec := gcsSpec(store, map[string]any{"incremental": true, "name": "reliability"})
		pipes[i] = &faultPipeline{store: store, key: pipelineOf(t, spec), spec: specJSON(t, spec)}
		if _, err := env.emu.AddHistory(datasetOf(store), healthcaretest.History{Count: *faultHistory, Seed: seed + int64(i)}); err != nil {
			t.Fatal(err)
		}
		if err := env.emu.SetDatasetListOrder(datasetOf(store), healthcaretest.ListOrder(i%2)); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < nTrig; i++ {
		p := pipes[i%nPipe]
		p.triggers = append(p.triggers, newID("fault"))
	}

	// Exports run a second: the clock is the functions' too, so the suite
	// lets it run rather than jumping it past their leases.
	env.emu.SetExportTiming(time.Second, 2)
	t.Cleanup(func() { env.emu.SetExportTiming(0, 1) })
	shortenLeases(t, 2*time.Second)

	// The export call also meets "accepted, answer lost": the API starts the
	// export and the connection drops before the answer (one failure in five).
	hcCodes := []int{429, 500, 503, 0}
	env.emu.FailRate("fhirStores.export", rate, seed, append(hcCodes, healthcaretest.AcceptedAnswerLost)...)
	env.emu.FailRate("operations.get", rate, seed, hcCodes...)
	env.emu.FailRate("operations.list", rate, seed, hcCodes...)
	for _, m := range []string{"fhirStores.export", "operations.get", "operations.list"} {
		t.Cleanup(func() { env.emu.FailRate(m, 0, 0) })
	}
	gcsChaos, psChaos := newChaos(seed+1), newChaos(seed+2)
	gcsHook, refusedBefore := gcsChaos.gcs(rate, 0.2), env.stack.RefusedDeletes()
	env.gcsFail.around.Store(&gcsHook)
	psHook := psChaos.publish(rate, 0.2)
	env.psFault.extra.Store(&psHook)
	t.Cleanup(func() { env.gcsFail.around.Store(nil); env.psFault.extra.Store(nil) })

	// Schedulers tick PollExport until the workload is done; sweeps overlap,
	// as they do when one outlasts the scheduler's period.
	stopPoll := make(chan struct{})
	var ticks atomic.Int64
	var pollers sync.WaitGroup
	var pollErr atomic.Value
	for range 4 {
		pollers.Go(func() {
			for {
				select {
				case <-stopPoll:
					return
				case <-time.After(20 * time.Millisecond):
				}
				code, err := deliverTo(env.baseURL, "PollExport", newID("tick"), []byte("{}"))
				if err == nil && code != http.StatusOK {
					err = fmt.Errorf("PollExport answered %d", code)
				}
				if err != nil {
					pollErr.Store(err)
				}
				ticks.Add(1)
			}
		})
	}

	var (
		workers  sync.WaitGroup
		errMu    sync.Mutex
		errs     []string
		outcomes = map[string]string{} // forced outcome per trigger
	)
	fail := func(format string, args ...any) {
		errMu.Lock()
		errs = append(errs, fmt.Sprintf(format, args...))
		errMu.Unlock()
	}
	const maxAttempts = 60
	// Sweeps take longer with more pipelines pending.
	// A run now takes more state steps (slot, operation index, feed), and a
	// 429 queues it with backoff, so under these fault rates its chain of
	// retries is longer than before.
	outcomeWait := 4*time.Minute + time.Duration(nPipe)*100*time.Millisecond
	for pi, p := range pipes {
		workers.Go(func() {
			rng := rand.New(rand.NewSource(seed*1000 + int64(pi)))
			for _, id := range p.triggers {
				acked := false
				for attempt := 1; attempt <= maxAttempts && !acked; attempt++ {
					p.attempts++
					code, err := deliverTo(env.baseURL, "StartExport", id, p.spec)
					if acked = err == nil && code == http.StatusOK; !acked {
						p.failed++
						time.Sleep(time.Duration(min(attempt, 10)) * 20 * time.Millisecond)
					}
				}
				if !acked {
					fail("trigger %s: not acknowledged after %d deliveries", id, maxAttempts)
					return
				}
				// Make some runs fail or end partial, when the started
				// event is out while the export still runs.
				var evs []received
				for wait := time.Now().Add(2 * time.Second); len(evs) == 0 && time.Now().Before(wait); {
					time.Sleep(20 * time.Millisecond)
					evs = eventsFor(byTrigger(id))
				}
				if len(evs) > 0 && evs[0].Data.Operation != "" {
					o, name := healthcaretest.Outcome{}, "succeeded"
					switch r := rng.Float64(); {
					case r < 0.1:
						o, name = healthcaretest.Outcome{ErrorCode: 13, ErrorMessage: "injected export failure"}, "failed"
					case r < 0.2:
						o, name = healthcaretest.Outcome{FailureCount: 1}, "partial"
					}
					if name != "succeeded" && env.emu.ForceOutcome(evs[0].Data.Operation, o) == nil {
						errMu.Lock()
						outcomes[id] = name
						errMu.Unlock()
					}
				}
				// The next trigger waits until this run is reported and its
				// marker removed.
				deadline := time.Now().Add(outcomeWait)
				for {
					if len(outcomesOf(eventsFor(byTrigger(id)))) > 0 {
						if ok, err := stateExists("pending/" + p.key + ".json"); err == nil && !ok {
							break
						}
					}
					if time.Now().After(deadline) {
						fail("trigger %s: no outcome with its marker removed after %v\n%s", id, outcomeWait, diagnose(id, p.key))
						return
					}
					time.Sleep(50 * time.Millisecond)
				}
			}
		})
	}
	workers.Wait()
	close(stopPoll)
	pollers.Wait()
	env.gcsFail.around.Store(nil)
	env.psFault.extra.Store(nil)
	for _, m := range []string{"fhirStores.export", "operations.get", "operations.list"} {
		env.emu.FailRate(m, 0, 0) // the checks list operations too
	}
	time.Sleep(300 * time.Millisecond) // late duplicates
	for _, e := range errs {
		t.Error(e)
	}
	if err := pollErr.Load(); err != nil {
		t.Errorf("a poll tick failed: %v", err)
	}
	if t.Failed() {
		t.FailNow()
	}

	// Invariants.
	var st faultStats
	for _, p := range pipes {
		checkPipeline(t, p, outcomes, &st)
	}
	deliveries, unacked := 0, 0
	for _, p := range pipes {
		deliveries += p.attempts
		unacked += p.failed
	}
	exportCalls := 0
	stores := map[string]bool{}
	for _, p := range pipes {
		stores["/v1/"+p.store+":export"] = true
	}
	for _, r := range env.emu.ExportRequests() {
		if stores[r.Path] {
			exportCalls++
		}
	}
	if gcsChaos.counts["403"] == 0 || psChaos.counts["PermissionDenied"] == 0 || exportCalls == st.exports || unacked == 0 {
		t.Errorf("faults were not injected: gcs%s; pubsub%s; export calls %d for %d exports; unacknowledged deliveries %d",
			gcsChaos.summary(), psChaos.summary(), exportCalls, st.exports, unacked)
	}
	t.Logf("%d triggers on %d pipelines in %v (fault rate %.2f, seed %d)", nTrig, nPipe, time.Since(began).Round(time.Millisecond), rate, seed)
	t.Logf("StartExport deliveries %d, not acknowledged %d; poll ticks %d", deliveries, unacked, ticks.Load())
	t.Logf("exports %d (succeeded %d, partial %d, failed %d); export calls %d (%d failed by injection)",
		st.exports, st.byType["succeeded"], st.byType["partial"], st.byType["failed"], exportCalls, exportCalls-st.exports)
	t.Logf("events: started %d (%d duplicates, %d runs without one), outcomes %d (%d duplicates)",
		st.started, st.startedDup, st.noStarted, st.outcomes, st.outcomeDup)
	t.Logf("starts released unstarted after their lease (code 4): %d", st.released)
	t.Logf("cloud storage faults:%s; conditional deletes refused: %d", gcsChaos.summary(), env.stack.RefusedDeletes()-refusedBefore)
	t.Logf("pub/sub faults:%s", psChaos.summary())
}

type faultStats struct {
	exports, started, startedDup, noStarted, outcomes, outcomeDup, released int
	byType                                                                  map[string]int
}

// outcomesOf returns the events that report how a run ended.
func outcomesOf(evs []received) []received {
	return slices.DeleteFunc(slices.Clone(evs), func(e received) bool {
		t := e.Attrs["ce-type"]
		return t == events.TypeStarted || t == events.TypeRejected || t == events.TypeQueued
	})
}

// sameEvent checks that evs are copies of one event: one ce-id, one type and
// byte-identical data.
func sameEvent(t *testing.T, what string, evs []received) {
	t.Helper()
	for _, e := range evs[1:] {
		if e.Attrs["ce-id"] != evs[0].Attrs["ce-id"] || e.Attrs["ce-type"] != evs[0].Attrs["ce-type"] || e.Raw != evs[0].Raw {
			t.Errorf("%s: duplicate events differ:\n %s %s %s\n %s %s %s", what, e.Attrs["ce-id"], e.Attrs["ce-type"], e.Raw,
				evs[0].Attrs["ce-id"], evs[0].Attrs["ce-type"], evs[0].Raw)
			return
		}
	}
}

// checkPipeline checks one pipeline's exports, events and state.
func checkPipeline(t *testing.T, p *faultPipeline, forced map[string]string, st *faultStats) {
	t.Helper()
	if st.byType == nil {
		st.byType = map[string]int{}
	}
	ops := map[string]string{} // operation → createTime
	for _, op := range acceptedExports(t, p.store) {
		var m struct{ CreateTime string }
		json.Unmarshal(op.Metadata, &m)
		ops[op.Name] = m.CreateTime
	}
	st.exports += len(ops)
	// A start that died before calling the API and whose lease ran out
	// before a redelivery came back is released by a sweep and reported
	// failed with code 4 (issue 12: a dead-lettered trigger must not hold its
	// pipeline): such a trigger has no export, and a late redelivery starts
	// none. With 2 s leases and 30 % faults this happens a few times in 500.
	released := 0
	for _, id := range p.triggers {
		if outs := outcomesOf(eventsFor(byTrigger(id))); len(outs) > 0 && outs[0].Data.Operation == "" &&
			outs[0].Data.Error != nil && outs[0].Data.Error.Code == 4 {
			released++
		}
	}
	st.released += released
	if len(ops) != len(p.triggers)-released {
		t.Errorf("pipeline %s: %d exports for %d triggers (%d released unstarted)", p.store, len(ops), len(p.triggers), released)
	}
	reported := map[string]string{} // operation → trigger
	lastSuccess := ""               // createTime of the last succeeded run so far
	for _, id := range p.triggers {
		evs := eventsFor(byTrigger(id))
		var started []received
		for _, e := range evs {
			switch e.Attrs["ce-type"] {
			case events.TypeStarted:
				started = append(started, e)
			case events.TypeRejected:
				t.Errorf("trigger %s: rejected: %s", id, e.Raw)
			}
		}
		outs := outcomesOf(evs)
		if len(outs) == 0 {
			t.Errorf("trigger %s: no outcome event", id)
			continue
		}
		st.outcomes++
		st.outcomeDup += len(outs) - 1
		sameEvent(t, "trigger "+id+" outcome", outs)
		out := outs[0].Data
		if out.Operation == "" && out.Error != nil && out.Error.Code == 4 {
			if len(started) > 0 {
				t.Errorf("trigger %s: released unstarted, but a started event names %s", id, started[0].Data.Operation)
			}
			continue
		}
		typ := strings.TrimPrefix(outs[0].Attrs["ce-type"], events.TypePrefix)
		st.byType[typ]++
		if want, ok := forced[id]; ok && want != typ && !(want == "partial" && typ == "succeeded") {
			// A forced partial over an empty incremental export succeeds.
			t.Errorf("trigger %s: outcome %s, forced %s", id, typ, want)
		}
		if len(started) > 0 {
			st.started++
			st.startedDup += len(started) - 1
			sameEvent(t, "trigger "+id+" started", started)
			if started[0].Data.Operation != out.Operation {
				t.Errorf("trigger %s: started names %s, outcome %s", id, started[0].Data.Operation, out.Operation)
			}
		} else {
			st.noStarted++
			t.Errorf("trigger %s: no started event, although its delivery was acknowledged", id)
		}
		ct, ok := ops[out.Operation]
		switch {
		case !ok:
			t.Errorf("trigger %s: outcome names %q, not an export of its dataset (%s: %+v)", id, out.Operation, typ, out.Error)
		case reported[out.Operation] != "":
			t.Errorf("operation %s reported for triggers %s and %s", out.Operation, reported[out.Operation], id)
		case !sameTime(ct, out.CreateTime):
			t.Errorf("trigger %s: outcome createTime %s, operation says %s", id, out.CreateTime, ct)
		}
		reported[out.Operation] = id
		if !sameTime(out.Since, lastSuccess) {
			t.Errorf("trigger %s: exported since %q, want the last success's createTime %q", id, out.Since, lastSuccess)
		}
		if typ == "succeeded" {
			lastSuccess = out.CreateTime
		}
		if typ == "succeeded" || typ == "partial" {
			checkManifest(t, id, out)
		}
		var rec struct{ Status, Operation string }
		if err := stateJSON("runs/"+export.RunKey(requestTopic, id)+".json", &rec); err != nil || rec.Status != "done" || rec.Operation != out.Operation {
			t.Errorf("trigger %s: run record %+v (%v), want done with %s", id, rec, err, out.Operation)
		}
	}
	for op := range ops {
		if reported[op] == "" {
			t.Errorf("pipeline %s: export %s has no outcome event", p.store, op)
		}
	}
	if ok, err := stateExists("pending/" + p.key + ".json"); ok || err != nil {
		t.Errorf("pipeline %s: pending marker left (%v)", p.store, err)
	}
	var wm struct{ Watermark string }
	err := stateJSON("watermarks/"+p.key+".json", &wm)
	switch {
	case lastSuccess == "" && !errors.Is(err, storage.ErrObjectNotExist):
		t.Errorf("pipeline %s: watermark %q (%v) without a successful run", p.store, wm.Watermark, err)
	case lastSuccess != "" && (err != nil || !sameTime(wm.Watermark, lastSuccess)):
		t.Errorf("pipeline %s: watermark %q (%v), want the last success's createTime %s", p.store, wm.Watermark, err, lastSuccess)
	}
}

// checkManifest asserts a finished run's feed: the event names the manifest
// beside the export's objects, and the manifest says what the event says.
func checkManifest(t *testing.T, id string, out events.Data) {
	t.Helper()
	want := out.Destination + "/" + out.Operation[strings.LastIndex(out.Operation, "/")+1:] + ".manifest.json"
	if out.Manifest != want {
		t.Errorf("trigger %s: event names manifest %q, want %s", id, out.Manifest, want)
		return
	}
	bucket, name, _ := strings.Cut(strings.TrimPrefix(want, "gs://"), "/")
	r, err := env.storage.Bucket(bucket).Object(name).NewReader(context.Background())
	if err != nil {
		t.Errorf("trigger %s: manifest %s: %v", id, want, err)
		return
	}
	defer r.Close()
	var m struct {
		TransactionTime string `json:"transactionTime"`
		Extension       struct {
			GCS struct {
				Output []events.Output `json:"output"`
			} `json:"gcs"`
		} `json:"extension"`
	}
	if err := json.NewDecoder(r).Decode(&m); err != nil {
		t.Errorf("trigger %s: manifest %s: %v", id, want, err)
		return
	}
	// The event's outputs are the gs:// names of the manifest's.
	sameOutputs := slices.EqualFunc(m.Extension.GCS.Output, out.Outputs, func(a, b events.Output) bool { return a.Type == b.Type && a.URL == b.URL })
	if !sameTime(m.TransactionTime, out.CreateTime) || !sameOutputs {
		t.Errorf("trigger %s: manifest %s has transactionTime %s and outputs %v; the event says %s and %v",
			id, want, m.TransactionTime, m.Extension.GCS.Output, out.CreateTime, out.Outputs)
	}
}

// sameTime compares two RFC 3339 timestamps as instants; "" equals only "".
func sameTime(a, b string) bool {
	if a == "" || b == "" {
		return a == b
	}
	ta, err1 := time.Parse(time.RFC3339Nano, a)
	tb, err2 := time.Parse(time.RFC3339Nano, b)
	return err1 == nil && err2 == nil && ta.Equal(tb)
}

// --- TestCrashRecovery ---

// Environment of the child process serving the functions.
const (
	childPortEnv  = "FHIREXPORT_TEST_CHILD_PORT"
	childLeaseEnv = "FHIREXPORT_TEST_CHILD_LEASE"
	childClockEnv = "FHIREXPORT_TEST_CHILD_CLOCK" // the emulator's clock ahead of real time, a Go duration

)

// TestHelperFunctionProcess is not a test: it serves the functions in a child
// process of TestCrashRecovery, configured from the environment like a
// deployed instance, until it is killed.
func TestHelperFunctionProcess(t *testing.T) {
	port := os.Getenv(childPortEnv)
	if port == "" {
		t.Skip("the child process of TestCrashRecovery")
	}
	if instance.x != nil || instance.err != nil {
		t.Fatal("the function instance was configured before the helper")
	}
	instance.lookup = os.LookupEnv
	instance.log = export.NewLogger(os.Stderr, slog.LevelInfo)
	if d, err := time.ParseDuration(os.Getenv(childClockEnv)); err == nil {
		instance.now = func() time.Time { return time.Now().Add(d) }
	}
	x, err := instance.exporter(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	// The production leases are 2 minutes; exported fields let a test
	// binary shorten them without a production knob.
	if d, err := time.ParseDuration(os.Getenv(childLeaseEnv)); err == nil {
		x.StartLease, x.FinalizeLease, x.WaitForPeer, x.RetryBackoff = d, d, d/4, d/4
	}
	t.Fatal(funcframework.StartHostPort("127.0.0.1", port))
}

// child is the functions running in a child process.
type child struct {
	cmd  *exec.Cmd
	url  string
	out  *syncBuffer
	done chan struct{}
}

// startChild runs the functions in a child process pointed at this process's
// emulators, through proxies that can hold a request.
func startChild(t *testing.T, hcURL string) *child {
	t.Helper()
	for attempt := 1; ; attempt++ {
		// The free port we picked may be taken before the child binds it
		// (tests in this process listen too): pick another, a few times.
		if c := tryChild(t, hcURL, attempt == 5); c != nil {
			return c
		}
	}
}

// tryChild starts the child on a free port; nil when the port was taken
// meanwhile (a test failure instead when last).
func tryChild(t *testing.T, hcURL string, last bool) *child {
	t.Helper()
	ln := mustListen()
	port := fmt.Sprint(ln.Addr().(*net.TCPAddr).Port)
	ln.Close()
	gcsHost, _ := instance.lookup("STORAGE_EMULATOR_HOST")
	vars := map[string]string{
		"FHIREXPORT_EVENTS_TOPIC":         eventsTopic,
		"FHIREXPORT_STATE":                "gs://" + stateBucket + "/state",
		"FHIREXPORT_ALLOWED_STORES":       location + "/datasets/*/fhirStores/*",
		"FHIREXPORT_ALLOWED_DESTINATIONS": "gs://" + exportBucket + "/fhir",
		"FHIREXPORT_HEALTHCARE_ENDPOINT":  hcURL,
		"FHIREXPORT_MAX_RUNNING":          "1000",
		"PUBSUB_EMULATOR_HOST":            env.psAddr,
		"STORAGE_EMULATOR_HOST":           gcsHost,
		childPortEnv:                      port,
		childClockEnv:                     time.Until(env.clock.Now()).String(),
	}
	if !*crashRealLease {
		vars[childLeaseEnv] = "2s"
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperFunctionProcess$", "-test.count=1", "-test.timeout=0")
	cmd.Env = os.Environ()
	for k, v := range vars {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	c := &child{cmd: cmd, url: "http://127.0.0.1:" + port, out: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = c.out, c.out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { cmd.Wait(); close(c.done) }()
	t.Cleanup(c.kill)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if resp, err := http.Get(c.url + "/PollExport"); err == nil {
			resp.Body.Close()
			return c
		}
		select {
		case <-c.done:
			if !last && strings.Contains(c.out.String(), "address already in use") {
				return nil
			}
			t.Fatalf("child exited: %s", c.out.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("child did not start: %s", c.out.String())
		}
	}
}

// kill sends SIGKILL and waits for the process to be gone.
func (c *child) kill() {
	c.cmd.Process.Kill()
	<-c.done
}

// holdPoint holds the first request it matches, before or after passing it
// on, until released: the process that sent it can be killed exactly between
// two steps.
type holdPoint struct {
	name    string
	match   func(r *http.Request) bool
	after   bool // pass the request on first: the step took effect
	fired   atomic.Bool
	hit     chan struct{}
	release chan struct{}
}

func (h *holdPoint) serve(w http.ResponseWriter, r *http.Request, next http.Handler) bool {
	if h.fired.Load() || !h.match(r) || !h.fired.CompareAndSwap(false, true) {
		return false
	}
	if h.after {
		next.ServeHTTP(httptest.NewRecorder(), r)
	}
	close(h.hit)
	<-h.release
	dropConn(w) // its sender is dead by now
	return true
}

// holder routes requests through the armed hold point, if any.
type holder struct{ cur atomic.Pointer[holdPoint] }

func (hd *holder) around(w http.ResponseWriter, r *http.Request, next http.Handler) bool {
	if h := hd.cur.Load(); h != nil {
		return h.serve(w, r, next)
	}
	return false
}

func (hd *holder) arm(h *holdPoint) *holdPoint {
	h.hit, h.release = make(chan struct{}), make(chan struct{})
	hd.cur.Store(h)
	return h
}

// crashCase is one crash point.
type crashCase struct {
	name string
	poll bool // crash during the poll; otherwise during StartExport
	// hold returns the request to hold for a trigger run and pipeline.
	hold    func(k runKeys) *holdPoint
	exports int // exports the trigger ends up with
}

// runKeys name what belongs to the run under test.
type runKeys struct{ run, pipeline, store string }

func stateReq(method, obj string, after bool, pred func(*http.Request) bool) func(k runKeys) *holdPoint {
	return func(k runKeys) *holdPoint {
		name := strings.NewReplacer("{run}", k.run, "{pipeline}", k.pipeline).Replace(obj)
		return &holdPoint{after: after, match: func(r *http.Request) bool {
			return r.Method == method && objectName(r) == "state/"+name && (pred == nil || pred(r))
		}}
	}
}

// exportObject holds the upload of an object of the export bucket whose
// name ends with suffix (the run's feed files).
func exportObject(suffix string, after bool) func(k runKeys) *holdPoint {
	return func(runKeys) *holdPoint {
		return &holdPoint{after: after, match: func(r *http.Request) bool {
			return r.Method == http.MethodPost && strings.Contains(r.URL.Path, "/b/"+exportBucket+"/") && strings.HasSuffix(objectName(r), suffix)
		}}
	}
}

func withBody(s string) func(*http.Request) bool {
	return func(r *http.Request) bool { return bytes.Contains(stacktest.PeekBody(r), []byte(s)) }
}

func creates(r *http.Request) bool { return r.URL.Query().Get("ifGenerationMatch") == "0" }

func updates(r *http.Request) bool { return !creates(r) }

// crashCases are the named crash points: after each step of StartExport and
// of finalizing a run in PollExport.
func crashCases() []crashCase {
	exportCall := func(runKeys) *holdPoint {
		return &holdPoint{after: true, match: func(r *http.Request) bool {
			return r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, ":export")
		}}
	}
	return []crashCase{
		{name: "start/after claim", hold: stateReq("POST", "runs/{run}.json", true, creates), exports: 1},
		{name: "start/after lock", hold: stateReq("POST", "pending/{pipeline}.json", true, creates), exports: 1},
		{name: "start/after watermark read", hold: stateReq("GET", "watermarks/{pipeline}.json", true, nil), exports: 1},
		// The export runs but is not recorded. After the start lease the
		// redelivery finds it with operations.list and adopts it: one export
		// (this case made two before the in-doubt resolution).
		{name: "start/after export accepted", hold: exportCall, exports: 1},
		{name: "start/after operation owned", hold: func(runKeys) *holdPoint {
			return &holdPoint{after: true, match: func(r *http.Request) bool {
				return r.Method == http.MethodPost && strings.HasPrefix(objectName(r), "state/operations/") && creates(r)
			}}
		}, exports: 1},
		{name: "start/after operation recorded", hold: stateReq("POST", "pending/{pipeline}.json", true, updates), exports: 1},
		// The event is out; the acknowledgement is lost with the process.
		{name: "start/after started event", exports: 1},
		{name: "poll/after lease", poll: true, hold: stateReq("POST", "pending/{pipeline}.json", true, withBody(`"finalizing"`)), exports: 1},
		// The Bulk Data manifest comes before the watermark moves: a crash
		// on either side of it writes it again, the same.
		{name: "poll/before manifest", poll: true, hold: exportObject(".manifest.json", false), exports: 1},
		{name: "poll/after manifest", poll: true, hold: exportObject(".manifest.json", true), exports: 1},
		{name: "poll/after watermark", poll: true, hold: stateReq("POST", "watermarks/{pipeline}.json", true, nil), exports: 1},
		{name: "poll/after event", poll: true, hold: stateReq("GET", "runs/{run}.json", false, nil), exports: 1},
		{name: "poll/after run record", poll: true, hold: stateReq("POST", "runs/{run}.json", true, nil), exports: 1},
		{name: "poll/after marker removed", poll: true, hold: stateReq("DELETE", "pending/{pipeline}.json", true, nil), exports: 1},
	}
}

// TestCrashRecovery kills the functions' process with SIGKILL between two
// steps of a run, restarts it, redelivers as Pub/Sub would and ticks the
// poller; the run must end like an uninterrupted one: its exports, one
// outcome (duplicates identical), the watermark at its createTime, no lock or
// marker left, the run record done.
func TestCrashRecovery(t *testing.T) {
	if testing.Short() {
		t.Skip("starts child processes")
	}
	hold := &holder{}
	around := hold.around
	env.gcsFail.around.Store(&around)
	t.Cleanup(func() { env.gcsFail.around.Store(nil) })
	emuProxy := httputil.NewSingleHostReverseProxy(must(url.Parse(env.emu.URL)))
	hcFront := mustListen()
	go http.Serve(hcFront, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !hold.around(w, r, emuProxy) {
			emuProxy.ServeHTTP(w, r)
		}
	}))
	t.Cleanup(func() { hcFront.Close() })
	hcURL := "http://" + hcFront.Addr().String()

	cases := crashCases()
	if *crashSweep {
		cases = append(cases, sweepCases(t, hcURL, hold)...)
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) { crashRun(t, tc, hcURL, hold) })
	}
}

// crashRun runs one trigger through a crash at tc's point.
func crashRun(t *testing.T, tc crashCase, hcURL string, hold *holder) {
	store, _ := newStore(t, 1)
	spec := gcsSpec(store, map[string]any{"incremental": true, "name": "crash"})
	body := specJSON(t, spec)
	pipeline := pipelineOf(t, spec)
	id := newID("crash")
	run := export.RunKey(requestTopic, id)

	c := startChild(t, hcURL)
	crash := func(deliver func() (int, error)) {
		t.Helper()
		h := hold.arm(tc.hold(runKeys{run, pipeline, store}))
		defer hold.cur.Store(nil)
		res := make(chan error, 1)
		go func() { _, err := deliver(); res <- err }()
		select {
		case <-h.hit:
		case err := <-res:
			t.Fatalf("the run never reached the crash point (delivery: %v)\nchild:\n%s", err, tail(c.out.String()))
		case <-time.After(30 * time.Second):
			t.Fatalf("the run never reached the crash point\nchild:\n%s", tail(c.out.String()))
		}
		c.kill()
		close(h.release)
		if err := <-res; err == nil {
			t.Errorf("the killed process answered")
		}
		c = startChild(t, hcURL)
	}
	start := func() (int, error) { return deliverTo(c.url, "StartExport", id, body) }
	tick := func() (int, error) { return deliverTo(c.url, "PollExport", newID("tick"), []byte("{}")) }

	switch {
	case tc.hold == nil: // after the last step: the acknowledgement is lost
		if code, err := start(); err != nil || code != http.StatusOK {
			t.Fatalf("StartExport answered %d, %v", code, err)
		}
		waitEvents(t, byTrigger(id), 1)
		c.kill()
		c = startChild(t, hcURL)
	case !tc.poll:
		crash(start)
	}
	// Pub/Sub redelivers until the trigger is acknowledged.
	deadline := time.Now().Add(leaseWait())
	for {
		code, err := start()
		if err == nil && code == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("StartExport still answers %d, %v\nchild:\n%s", code, err, tail(c.out.String()))
		}
		time.Sleep(200 * time.Millisecond)
	}
	if tc.poll {
		waitEvents(t, byTrigger(id), 1)
		crash(tick)
	}
	// The scheduler ticks until the outcome is out and the marker gone.
	deadline = time.Now().Add(leaseWait())
	for {
		if code, err := tick(); err != nil || code != http.StatusOK {
			t.Fatalf("PollExport answered %d, %v", code, err)
		}
		if len(outcomesOf(eventsFor(byTrigger(id)))) > 0 {
			if ok, err := stateExists("pending/" + pipeline + ".json"); err == nil && !ok {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no outcome with the marker removed; events %v\nchild:\n%s", types(eventsFor(byTrigger(id))), tail(c.out.String()))
		}
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(150 * time.Millisecond)
	c.kill()

	p := &faultPipeline{store: store, key: pipeline, triggers: []string{id}}
	ops := acceptedExports(t, store)
	if len(ops) != tc.exports {
		t.Errorf("exports = %d, want %d", len(ops), tc.exports)
	}
	if tc.exports == 1 {
		checkPipeline(t, p, nil, &faultStats{})
		return
	}
	// Duplicate exports: the last one is the run's; the others ran
	// unrecorded and are never reported.
	evs := eventsFor(byTrigger(id))
	outs := outcomesOf(evs)
	if len(outs) == 0 {
		t.Fatalf("no outcome event")
	}
	sameEvent(t, "outcome", outs)
	if last := ops[len(ops)-1].Name; outs[0].Data.Operation != last {
		t.Errorf("outcome names %s, want the last export %s", outs[0].Data.Operation, last)
	}
	for _, e := range evs {
		if e.Data.Operation != outs[0].Data.Operation {
			t.Errorf("event %s names the unrecorded export %s", e.Attrs["ce-type"], e.Data.Operation)
		}
	}
	var wm struct{ Watermark string }
	if err := stateJSON("watermarks/"+pipeline+".json", &wm); err != nil || !sameTime(wm.Watermark, outs[0].Data.CreateTime) {
		t.Errorf("watermark %q (%v), want %s", wm.Watermark, err, outs[0].Data.CreateTime)
	}
	t.Logf("a crash after the export was accepted made %d exports; the first ran unrecorded and unreported", len(ops))
}

// leaseWait bounds how long recovery may take: past the start or finalize
// lease the child runs with.
func leaseWait() time.Duration {
	if *crashRealLease {
		return 3 * time.Minute
	}
	return 30 * time.Second
}

func tail(s string) string { return s[max(0, len(s)-4000):] }

// step names a request of the run under test ("POST pending"), or "" for
// requests about other runs.
func (k runKeys) step(r *http.Request) string {
	var what string
	switch name := objectName(r); {
	case name == "state/runs/"+k.run+".json":
		what = "runs"
	case name == "state/pending/"+k.pipeline+".json":
		what = "pending"
	case name == "state/watermarks/"+k.pipeline+".json":
		what = "watermarks"
	case r.URL.Path == "/v1/"+k.store+":export":
		what = "fhirStores.export"
	case strings.HasPrefix(r.URL.Path, "/v1/"+datasetOf(k.store)+"/operations/"):
		what = "operations.get"
	default:
		return ""
	}
	return r.Method + " " + what
}

// nthStep holds the n-th request of the run under test.
func nthStep(n int, after bool) func(k runKeys) *holdPoint {
	return func(k runKeys) *holdPoint {
		var seen atomic.Int32
		return &holdPoint{after: after, match: func(r *http.Request) bool {
			return k.step(r) != "" && int(seen.Add(1)) == n
		}}
	}
}

// sweepCases records the requests of one uninterrupted run, then returns a
// crash before and after each of them, in StartExport and in PollExport.
func sweepCases(t *testing.T, hcURL string, hold *holder) []crashCase {
	t.Helper()
	store, _ := newStore(t, 1)
	spec := gcsSpec(store, map[string]any{"incremental": true, "name": "crash"})
	id := newID("dry")
	k := runKeys{export.RunKey(requestTopic, id), pipelineOf(t, spec), store}
	var mu sync.Mutex
	var steps []string
	record := func(runKeys) *holdPoint {
		return &holdPoint{match: func(r *http.Request) bool {
			if s := k.step(r); s != "" {
				mu.Lock()
				steps = append(steps, s)
				mu.Unlock()
			}
			return false
		}}
	}
	c := startChild(t, hcURL)
	defer c.kill()
	phase := func() []string {
		mu.Lock()
		defer mu.Unlock()
		out := steps
		steps = nil
		return out
	}
	hold.arm(record(k))
	if code, err := deliverTo(c.url, "StartExport", id, specJSON(t, spec)); err != nil || code != http.StatusOK {
		t.Fatalf("dry run: StartExport answered %d, %v", code, err)
	}
	startSteps := phase()
	waitEvents(t, byTrigger(id), 1)
	if code, err := deliverTo(c.url, "PollExport", newID("tick"), []byte("{}")); err != nil || code != http.StatusOK {
		t.Fatalf("dry run: PollExport answered %d, %v", code, err)
	}
	pollSteps := phase()
	hold.cur.Store(nil)
	if got := types(waitEvents(t, byTrigger(id), 2)); !slices.Equal(got, []string{"started", "succeeded"}) {
		t.Fatalf("dry run: events %v, want started, succeeded", got)
	}
	t.Logf("a run's steps: start %v; poll %v", startSteps, pollSteps)

	var cases []crashCase
	for i, s := range startSteps {
		for _, after := range []bool{false, true} {
			exports := 1
			// Between the accepted export and the write recording it.
			if (s == "POST fhirStores.export" && after) || (i > 0 && startSteps[i-1] == "POST fhirStores.export" && !after) {
				exports = 2
			}
			cases = append(cases, crashCase{name: fmt.Sprintf("sweep/start/%s %d %s", when(after), i+1, s), hold: nthStep(i+1, after), exports: exports})
		}
	}
	for i, s := range pollSteps {
		for _, after := range []bool{false, true} {
			cases = append(cases, crashCase{name: fmt.Sprintf("sweep/poll/%s %d %s", when(after), i+1, s), poll: true, hold: nthStep(i+1, after), exports: 1})
		}
	}
	return cases
}

func when(after bool) string {
	if after {
		return "after"
	}
	return "before"
}

// TestStateWritesRetried: a 503 or a dropped connection on a state write is
// retried by the storage client (state writes are conditional, hence
// idempotent), so the handler succeeds at the first delivery. The write
// that records the operation matters most: when it fails, the export runs
// unrecorded and a redelivery after the start lease exports again.
func TestStateWritesRetried(t *testing.T) {
	for _, code := range []int{503, 429, 0} {
		t.Run(fmt.Sprint(code), func(t *testing.T) {
			store, _ := newStore(t, 1)
			spec := gcsSpec(store, nil)
			pipeline := pipelineOf(t, spec)
			var hits atomic.Int32
			hook := func(w http.ResponseWriter, r *http.Request, next http.Handler) bool {
				if r.Method != http.MethodPost || objectName(r) != "state/pending/"+pipeline+".json" || !updates(r) || hits.Add(1) > 1 {
					return false
				}
				if code == 0 {
					dropConn(w)
					return true
				}
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(code)
				fmt.Fprintf(w, `{"error":{"code":%d,"message":"injected"}}`, code)
				return true
			}
			env.gcsFail.around.Store(&hook)
			defer env.gcsFail.around.Store(nil)
			id := newID("retried")
			if got := deliverPubSub(t, "StartExport", id, specJSON(t, spec)); got != http.StatusOK {
				t.Fatalf("StartExport answered %d, want 200: the storage client should retry the write", got)
			}
			if hits.Load() < 2 {
				t.Errorf("the operation was written %d times, want a retry", hits.Load())
			}
			waitEvents(t, byTrigger(id), 1)
			if got := len(acceptedExports(t, store)); got != 1 {
				t.Errorf("exports = %d, want 1", got)
			}
		})
	}
}

// diagnose describes a run's events, state and log lines.
func diagnose(id, pipeline string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "events: %v\n", types(eventsFor(byTrigger(id))))
	for _, name := range []string{"pending/" + pipeline + ".json", "queue/" + pipeline + ".json", "runs/" + export.RunKey(requestTopic, id) + ".json", "watermarks/" + pipeline + ".json"} {
		var v any
		err := stateJSON(name, &v)
		fmt.Fprintf(&b, "%s: %v %v\n", name, v, err)
	}
	run := export.RunKey(requestTopic, id)
	var logs strings.Builder
	for _, line := range strings.Split(env.logs.String(), "\n") {
		if strings.Contains(line, id) || strings.Contains(line, pipeline) || strings.Contains(line, run) {
			fmt.Fprintln(&logs, line)
		}
	}
	return b.String() + tail(logs.String())
}
