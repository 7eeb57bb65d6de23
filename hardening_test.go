package fhirexport

// End-to-end tests for issue 12 ("never two exports for one trigger, never a
// wedged pipeline"): one test per hole hostile testing found, each through the
// functions framework over HTTP. Each says why it failed before the issue.
//
// None of them is parallel: they arm emulator faults, change the in-process
// exporter's patience or leases, or write the shared state bucket, and Go
// runs parallel top-level tests only after every sequential one is done.

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"cloud.google.com/go/storage"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/fhirexport/fhirexport/events"
	"github.com/fhirexport/fhirexport/export"
	"github.com/fhirexport/fhirexport/healthcaretest"
)

// --- helpers ---

// inProcess returns the exporter the in-process functions use.
func inProcess(t *testing.T) *export.Exporter {
	t.Helper()
	x, err := instance.exporter(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return x
}

// putState writes state/name straight into the state bucket (past the fault
// proxy), as a crash or a stray writer would leave it.
func putState(t *testing.T, name string, data []byte, meta map[string]string) {
	t.Helper()
	w := env.storage.Bucket(stateBucket).Object("state/" + name).NewWriter(context.Background())
	w.ContentType = "application/json"
	w.Metadata = meta
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

// removeState deletes state/name if it exists.
func removeState(t *testing.T, name string) {
	t.Helper()
	err := env.storage.Bucket(stateBucket).Object("state/" + name).Delete(context.Background())
	if err != nil && !errors.Is(err, storage.ErrObjectNotExist) {
		t.Fatal(err)
	}
}

func mustExist(t *testing.T, name string, want bool) {
	t.Helper()
	ok, err := stateExists(name)
	if err != nil {
		t.Fatal(err)
	}
	if ok != want {
		t.Errorf("state/%s exists = %v, want %v", name, ok, want)
	}
}

// ofType keeps the events of one type (a suffix such as "failed").
func ofType(evs []received, typ string) []received {
	return slices.DeleteFunc(slices.Clone(evs), func(e received) bool { return e.Attrs["ce-type"] != events.TypePrefix+typ })
}

func isType(match func(received) bool, typ string) func(received) bool {
	return func(e received) bool { return match(e) && e.Attrs["ce-type"] == events.TypePrefix+typ }
}

// pollUntil ticks PollExport until n events match, or fails after 15 s.
func pollUntil(t *testing.T, match func(received) bool, n int) []received {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		poll(t)
		if len(eventsFor(match)) >= n {
			return waitEvents(t, match, n)
		}
		if time.Now().After(deadline) {
			logs := env.logs.String()
			t.Fatalf("after polling for 15 s: %d of %d events; have %v\nlogs:\n%s", len(eventsFor(match)), n, types(eventsFor(match)), tail(logs))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// acceptedFor returns the exports the emulator accepted for store, including
// those whose answer a fault dropped.
func acceptedFor(store string) []healthcaretest.Export {
	return slices.DeleteFunc(env.emu.Exports(), func(e healthcaretest.Export) bool { return e.Store != store })
}

// showBool prints an optional event field.
func showBool(b *bool) string {
	if b == nil {
		return "absent"
	}
	return strconv.FormatBool(*b)
}

// sameIDs fails unless every event has the same ce-id (duplicates of one).
func sameIDs(t *testing.T, what string, evs []received) {
	t.Helper()
	for _, e := range evs {
		if e.Attrs["ce-id"] != evs[0].Attrs["ce-id"] {
			t.Errorf("%s: events with different ids: %s and %s", what, e.Attrs["ce-id"], evs[0].Attrs["ce-id"])
		}
	}
}

// --- 1. a lost answer to fhirStores.export ---

// TestLostExportAnswer: the API accepts the export and the connection drops
// before the answer arrives. Before issue 12 the start path took the error
// as transient, released the claim and the lock, and the redelivery exported
// a second time (two accepted exports; the first never polled nor reported);
// without a redelivery the lock stayed until one came.
func TestLostExportAnswer(t *testing.T) {
	t.Run("redelivered", func(t *testing.T) {
		store, _ := newStore(t, 2)
		id := newID("lost")
		spec := specJSON(t, gcsSpec(store, nil))
		env.emu.FailNext("fhirStores.export", 1, healthcaretest.AcceptedAnswerLost)
		if code := deliverPubSub(t, "StartExport", id, spec); code != http.StatusInternalServerError {
			t.Fatalf("StartExport with the answer lost answered %d, want 500 (redeliver)", code)
		}
		if got := len(acceptedFor(store)); got != 1 {
			t.Fatalf("accepted exports after the lost answer = %d, want 1", got)
		}
		if code := deliverPubSub(t, "StartExport", id, spec); code != http.StatusOK {
			t.Fatalf("redelivery answered %d, want 200", code)
		}
		checkAdopted(t, store, id)
	})
	t.Run("never redelivered", func(t *testing.T) {
		shortenLeases(t, time.Second)
		store, _ := newStore(t, 2)
		id := newID("lost")
		env.emu.FailNext("fhirStores.export", 1, healthcaretest.AcceptedAnswerLost)
		if code := deliverPubSub(t, "StartExport", id, specJSON(t, gcsSpec(store, nil))); code != http.StatusInternalServerError {
			t.Fatalf("StartExport with the answer lost answered %d, want 500", code)
		}
		// The sweep adopts the operation once the start lease is over.
		pollUntil(t, isType(byTrigger(id), "started"), 1)
		checkAdopted(t, store, id)
		// A redelivery after all that starts nothing.
		if code := deliverPubSub(t, "StartExport", id, specJSON(t, gcsSpec(store, nil))); code != http.StatusOK {
			t.Fatalf("late redelivery answered %d", code)
		}
		if got := len(acceptedFor(store)); got != 1 {
			t.Errorf("accepted exports after a late redelivery = %d, want 1", got)
		}
	})
}

// checkAdopted checks that the trigger's one accepted export was adopted:
// started events name it, and polls report exactly one outcome for it.
func checkAdopted(t *testing.T, store, id string) {
	t.Helper()
	accepted := acceptedFor(store)
	if len(accepted) != 1 {
		t.Fatalf("accepted exports = %d, want 1: %+v", len(accepted), accepted)
	}
	op := accepted[0].Operation
	started := waitEvents(t, isType(byTrigger(id), "started"), 1)
	for _, e := range started {
		if e.Data.Operation != op || e.Attrs["ce-subject"] != op {
			t.Errorf("started event names %q (subject %q), want the accepted operation %s", e.Data.Operation, e.Attrs["ce-subject"], op)
		}
	}
	sameIDs(t, "started", started)
	poll(t)
	waitEvents(t, byTrigger(id), len(started)+1)
	poll(t)
	time.Sleep(200 * time.Millisecond)
	outs := outcomes(eventsFor(byTrigger(id)))
	if len(outs) != 1 {
		t.Fatalf("outcome events = %v, want exactly one", types(outs))
	}
	if d := outs[0].Data; outs[0].Attrs["ce-type"] != events.TypeSucceeded || d.Operation != op {
		t.Errorf("outcome = %s for %q, want succeeded for %s", outs[0].Attrs["ce-type"], d.Operation, op)
	}
	if got := len(acceptedFor(store)); got != 1 {
		t.Errorf("accepted exports after the polls = %d, want 1", got)
	}
}

// --- 2. a start lock whose trigger never comes back ---

// TestOrphanedStartLock: an instance crashed during the export call (before
// the API acted) and the trigger is never redelivered (dead-lettered). The
// lock is written as that instance left it, with its start three minutes
// back: past the documented 2-minute lease, no waiting. Before issue 12 only
// a redelivery of that very trigger could take the lock over: every sweep
// counted it as "starting" and every other trigger of the pipeline was
// refused as busy, forever.
func TestOrphanedStartLock(t *testing.T) {
	store, _ := newStore(t, 1)
	id := newID("orphan")
	specMap := gcsSpec(store, map[string]any{"name": "orphaned"})
	parsed, err := export.ParseSpec(specJSON(t, specMap))
	if err != nil {
		t.Fatal(err)
	}
	pipeline := export.PipelineKey(parsed)
	run := export.RunKey(requestTopic, id)
	began := env.clock.Now().Add(-3 * time.Minute).UTC()
	trigger := map[string]string{"source": requestTopic, "id": id}
	lock := map[string]any{
		"run": run, "trigger": trigger, "pipeline": pipeline, "store": store, "name": "orphaned",
		"destination": export.ExpandURIPrefix(parsed.GCSDestination.URIPrefix, store, run[:16], began),
		"spec":        json.RawMessage(specJSON(t, parsed)), "slot": -1, "started": began,
	}
	putState(t, "pending/"+pipeline+".json", specJSON(t, lock),
		map[string]string{"run": run, "started": began.Format(time.RFC3339Nano), "slot": "-1"})
	putState(t, "runs/"+run+".json", specJSON(t, map[string]any{
		"trigger": trigger, "pipeline": pipeline, "store": store, "status": "claimed", "claimed": began,
		"spec": json.RawMessage(specJSON(t, parsed)),
	}), nil)

	poll(t)
	failed := waitEvents(t, isType(byTrigger(id), "failed"), 1)
	if e := failed[0].Data.Error; e == nil || e.Code != 4 || !strings.Contains(e.Message, "not redelivered") {
		t.Errorf("failed event error = %+v, want code 4 (DEADLINE_EXCEEDED) saying the trigger was not redelivered", e)
	}
	mustExist(t, "pending/"+pipeline+".json", false)
	if got := len(acceptedFor(store)); got != 0 {
		t.Errorf("accepted exports for the orphan = %d, want 0", got)
	}

	// The next trigger of the pipeline starts at once.
	next := newID("orphan-next")
	if code := deliverPubSub(t, "StartExport", next, specJSON(t, specMap)); code != http.StatusOK {
		t.Fatalf("next trigger answered %d", code)
	}
	waitEvents(t, isType(byTrigger(next), "started"), 1)
	if got := len(acceptedFor(store)); got != 1 {
		t.Errorf("accepted exports after the next trigger = %d, want 1", got)
	}

	// A late redelivery of the orphan's trigger starts nothing and repeats
	// its failed event.
	if code := deliverPubSub(t, "StartExport", id, specJSON(t, specMap)); code != http.StatusOK {
		t.Fatalf("late redelivery of the orphan answered %d", code)
	}
	failed = waitEvents(t, isType(byTrigger(id), "failed"), 2)
	sameIDs(t, "failed", failed)
	if got := len(acceptedFor(store)); got != 1 {
		t.Errorf("accepted exports after the orphan's redelivery = %d, want 1", got)
	}
	if got := types(eventsFor(byTrigger(id))); !slices.Equal(got, []string{"failed", "failed"}) {
		t.Errorf("orphan's events = %v, want its failed event twice", got)
	}
	poll(t) // finish the next trigger's run
}

// --- 3. 401/403 from operations.get ---

// TestOperationsGet403Patience: operations.get refuses with 401/403 for a
// while. Before issue 12 the first 403 was reported as export.failed and the
// run no longer followed, though the export went on to succeed.
func TestOperationsGet403Patience(t *testing.T) {
	x := inProcess(t)
	patience := x.ObservePatience
	t.Cleanup(func() { x.ObservePatience = patience; env.emu.FailRate("operations.get", 0, 0) })
	poll(t) // report what other tests left, before operations.get is refused

	t.Run("within patience", func(t *testing.T) {
		x.ObservePatience = time.Minute // far beyond this test's few polls
		store, _ := newStore(t, 2)
		id := newID("forbidden")
		spec := gcsSpec(store, nil)
		if code := deliverPubSub(t, "StartExport", id, specJSON(t, spec)); code != http.StatusOK {
			t.Fatalf("StartExport answered %d", code)
		}
		waitEvents(t, byTrigger(id), 1)
		env.emu.FailRate("operations.get", 1, 1, http.StatusUnauthorized, http.StatusForbidden)
		logsBefore := len(env.logs.String())
		for range 3 {
			poll(t)
		}
		time.Sleep(200 * time.Millisecond)
		if got := types(eventsFor(byTrigger(id))); !slices.Equal(got, []string{"started"}) {
			t.Fatalf("events while operations.get is refused = %v, want only started", got)
		}
		if got := pendingFor(t, spec); len(got) != 1 {
			t.Errorf("pending marker = %v, want it kept while refused", got)
		}
		if n := strings.Count(env.logs.String()[logsBefore:], "PERMISSION PROBLEM"); n < 3 {
			t.Errorf("permission problem logged %d times in 3 sweeps, want every sweep", n)
		}
		env.emu.FailRate("operations.get", 0, 0)
		poll(t)
		evs := waitEvents(t, byTrigger(id), 2)
		if got := types(evs); !slices.Equal(got, []string{"started", "succeeded"}) {
			t.Fatalf("events after operations.get recovered = %v, want started, succeeded", got)
		}
		if got := pendingFor(t, spec); len(got) != 0 {
			t.Errorf("pending marker left: %v", got)
		}
	})

	t.Run("past patience", func(t *testing.T) {
		x.ObservePatience = 500 * time.Millisecond
		store, _ := newStore(t, 2)
		id := newID("forbidden")
		spec := gcsSpec(store, nil)
		if code := deliverPubSub(t, "StartExport", id, specJSON(t, spec)); code != http.StatusOK {
			t.Fatalf("StartExport answered %d", code)
		}
		waitEvents(t, byTrigger(id), 1)
		env.emu.FailRate("operations.get", 1, 1, http.StatusForbidden)
		evs := pollUntil(t, byTrigger(id), 2)
		out := outcomes(evs)
		if len(out) != 1 || out[0].Attrs["ce-type"] != events.TypeFailed {
			t.Fatalf("events = %v, want started, failed", types(evs))
		}
		if e := out[0].Data.Error; e == nil || e.Code != 7 || !strings.Contains(e.Message, "could not be observed") {
			t.Errorf("failed error = %+v, want code 7 saying the operation could not be observed", e)
		}
		if got := pendingFor(t, spec); len(got) != 0 {
			t.Errorf("pending marker left: %v", got)
		}
		env.emu.FailRate("operations.get", 0, 0)
	})
}

// --- 4. corrupt state ---

// TestCorruptState: one garbage state object must not wedge its pipeline.
// Before issue 12 decode errors were transient: a garbage lock made every
// trigger of its pipeline answer 500; a garbage watermark passed for "none"
// at the start (a full re-export) and kept a finished run from being reported
// at the poll; a garbage run record re-published the outcome on every tick,
// holding the pipeline.
func TestCorruptState(t *testing.T) {
	t.Run("garbage lock", func(t *testing.T) {
		store, _ := newStore(t, 1)
		spec := gcsSpec(store, nil)
		pipeline := pipelineOf(t, spec)
		putState(t, "pending/"+pipeline+".json", []byte("\x00\xffnot json{"),
			map[string]string{"run": "0123456789abcdef0123456789abcdef", "started": env.clock.Now().UTC().Format(time.RFC3339Nano)})
		id := newID("garbage-lock")
		if code := deliverPubSub(t, "StartExport", id, specJSON(t, spec)); code != http.StatusOK {
			t.Fatalf("trigger of a pipeline with a garbage lock answered %d, want 200", code)
		}
		if q := listObjects(t, stateBucket, "state/quarantine/pending/"+pipeline+".json."); len(q) != 1 {
			t.Errorf("quarantined objects = %v, want the garbage lock", q)
		}
		waitEvents(t, isType(byTrigger(id), "started"), 1)
		if got := len(acceptedFor(store)); got != 1 {
			t.Errorf("accepted exports = %d, want 1", got)
		}
		poll(t)
	})

	t.Run("garbage watermark at start", func(t *testing.T) {
		store, _ := newStore(t, 1)
		spec := gcsSpec(store, map[string]any{"name": "inc", "incremental": true})
		pipeline := pipelineOf(t, spec)
		object := "watermarks/" + pipeline + ".json"
		putState(t, object, []byte("garbage"), nil)
		id := newID("garbage-wm")
		if code := deliverPubSub(t, "StartExport", id, specJSON(t, spec)); code != http.StatusOK {
			t.Fatalf("trigger answered %d, want 200", code)
		}
		failed := waitEvents(t, isType(byTrigger(id), "failed"), 1)
		e := failed[0].Data.Error
		if e == nil || e.Code != 9 || !strings.Contains(e.Message, object) || !strings.Contains(e.Message, "fhirexport watermark reset") {
			t.Errorf("failed error = %+v, want code 9 naming %s and `fhirexport watermark reset`", e, object)
		}
		if got := exportBodies(store); len(got) != 0 {
			t.Errorf("export requests = %v, want none", got)
		}
		mustExist(t, object, true) // held for the operator, not silently replaced
		mustExist(t, "pending/"+pipeline+".json", false)

		// The operator's reset (fhirexport watermark reset): the next run is full.
		st := export.NewState(env.storage, stateBucket, "state")
		if err := st.SetWatermark(context.Background(), pipeline, store, "inc", "", false, time.Now()); err != nil {
			t.Fatal(err)
		}
		next := newID("garbage-wm-next")
		if code := deliverPubSub(t, "StartExport", next, specJSON(t, spec)); code != http.StatusOK {
			t.Fatalf("trigger after the reset answered %d", code)
		}
		waitEvents(t, isType(byTrigger(next), "started"), 1)
		bodies := exportBodies(store)
		if len(bodies) != 1 {
			t.Fatalf("export requests after the reset = %d, want 1", len(bodies))
		}
		if _, ok := bodies[0]["_since"]; ok {
			t.Errorf("export after the reset has _since %v, want a full export", bodies[0]["_since"])
		}
		poll(t)
	})

	t.Run("garbage watermark at finish", func(t *testing.T) {
		store, _ := newStore(t, 1)
		spec := gcsSpec(store, map[string]any{"name": "inc", "incremental": true})
		pipeline := pipelineOf(t, spec)
		id := newID("garbage-wm-finish")
		if code := deliverPubSub(t, "StartExport", id, specJSON(t, spec)); code != http.StatusOK {
			t.Fatalf("trigger answered %d", code)
		}
		waitEvents(t, byTrigger(id), 1)
		object := "watermarks/" + pipeline + ".json"
		putState(t, object, []byte("garbage"), nil)
		poll(t)
		evs := waitEvents(t, byTrigger(id), 2)
		out := outcomes(evs)
		if len(out) != 1 {
			t.Fatalf("events = %v, want started and one outcome", types(evs))
		}
		if adv := out[0].Data.WatermarkAdvanced; adv == nil || *adv || out[0].Data.Watermark != "" {
			t.Errorf("outcome says watermarkAdvanced %s, watermark %q; want false and none", showBool(adv), out[0].Data.Watermark)
		}
		mustExist(t, "pending/"+pipeline+".json", false)
		if got := string(readObject(t, stateBucket, "state/"+object)); got != "garbage" {
			t.Errorf("corrupt watermark was replaced by %s; it must wait for the operator", got)
		}
		removeState(t, object)
	})

	t.Run("garbage run record while running", func(t *testing.T) {
		store, _ := newStore(t, 1)
		spec := gcsSpec(store, nil)
		id := newID("garbage-run")
		if code := deliverPubSub(t, "StartExport", id, specJSON(t, spec)); code != http.StatusOK {
			t.Fatalf("trigger answered %d", code)
		}
		waitEvents(t, byTrigger(id), 1)
		putState(t, "runs/"+export.RunKey(requestTopic, id)+".json", []byte("{{garbage"), nil)
		poll(t)
		poll(t)
		poll(t)
		evs := waitEvents(t, byTrigger(id), 2)
		if out := outcomes(evs); len(out) != 1 || out[0].Attrs["ce-type"] != events.TypeSucceeded {
			t.Errorf("events after three polls = %v, want started and one succeeded", types(evs))
		}
		if got := pendingFor(t, spec); len(got) != 0 {
			t.Errorf("pending marker left: %v", got)
		}
		if code := deliverPubSub(t, "StartExport", id, specJSON(t, spec)); code != http.StatusOK {
			t.Errorf("redelivery answered %d, want 200", code)
		}
		if got := len(acceptedFor(store)); got != 1 {
			t.Errorf("accepted exports = %d, want 1", got)
		}
	})

	// A finished trigger whose run record turns to garbage, then redelivered.
	finished := func(t *testing.T) (store, id string, spec []byte) {
		t.Helper()
		store, _ = newStore(t, 1)
		spec = specJSON(t, gcsSpec(store, nil))
		id = newID("garbage-run-done")
		if code := deliverPubSub(t, "StartExport", id, spec); code != http.StatusOK {
			t.Fatalf("trigger answered %d", code)
		}
		waitEvents(t, byTrigger(id), 1)
		poll(t)
		waitEvents(t, byTrigger(id), 2)
		putState(t, "runs/"+export.RunKey(requestTopic, id)+".json", []byte("{{garbage"), nil)
		return store, id, spec
	}
	t.Run("garbage run record after finish is acknowledged", func(t *testing.T) {
		_, id, spec := finished(t)
		for i := range 2 {
			if code := deliverPubSub(t, "StartExport", id, spec); code != http.StatusOK {
				t.Fatalf("redelivery %d answered %d, want 200 (no loop)", i, code)
			}
		}
		poll(t)
	})
	// A corrupt claim of a finished run (no lock names it any more) ends the
	// run failed instead of replacing the claim, which would export again.
	t.Run("garbage run record after finish exports nothing again", func(t *testing.T) {
		store, id, spec := finished(t)
		if code := deliverPubSub(t, "StartExport", id, spec); code != http.StatusOK {
			t.Fatalf("redelivery answered %d, want 200", code)
		}
		poll(t)
		time.Sleep(200 * time.Millisecond)
		if got := len(acceptedFor(store)); got != 1 {
			t.Errorf("accepted exports after redelivering a finished trigger whose run record is corrupt = %d, want 1 (never two exports for one trigger)", got)
		}
	})
}

// --- 5. unusable operation metadata ---

// metadataRewriter is a proxy in front of the emulator that rewrites the
// operations.get answers of finished operations in chosen datasets.
type metadataRewriter struct {
	rewrite map[string]func(op map[string]any) // by dataset name
}

func (m *metadataRewriter) handler(t *testing.T) http.Handler {
	target, err := url.Parse(env.emu.URL)
	if err != nil {
		t.Fatal(err)
	}
	proxy := httputil.NewSingleHostReverseProxy(target)
	director := proxy.Director
	proxy.Director = func(r *http.Request) {
		director(r)
		r.Header.Del("Accept-Encoding")
	}
	proxy.ModifyResponse = func(resp *http.Response) error {
		r := resp.Request
		path := strings.TrimPrefix(r.URL.Path, "/v1/")
		i := strings.Index(path, "/operations/")
		if r.Method != http.MethodGet || i < 0 || resp.StatusCode != http.StatusOK {
			return nil
		}
		fn := m.rewrite[path[:i]]
		if fn == nil {
			return nil
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return err
		}
		var op map[string]any
		if json.Unmarshal(body, &op) == nil && op["done"] == true {
			fn(op)
			body, _ = json.Marshal(op)
		}
		resp.Body = io.NopCloser(strings.NewReader(string(body)))
		resp.ContentLength = int64(len(body))
		resp.Header.Set("Content-Length", strconv.Itoa(len(body)))
		return nil
	}
	return proxy
}

// TestUnusableOperationMetadata: a finished operation whose metadata cannot
// be used. The in-process functions talk to the emulator directly, so the
// functions run in a child process (as in TestCrashRecovery) pointed at a
// proxy that rewrites the metadata. Before issue 12 the decode error was
// transient: the run was never reported and held its pipeline forever.
func TestUnusableOperationMetadata(t *testing.T) {
	tests := []struct {
		name    string
		extra   map[string]any
		rewrite func(op map[string]any)
		want    string // in the error message
	}{
		{"counter beyond int64", nil, func(op map[string]any) {
			op["metadata"].(map[string]any)["counter"] = map[string]any{"success": "99999999999999999999"}
		}, "metadata is unusable"},
		{"metadata not an object", nil, func(op map[string]any) { op["metadata"] = "unusable" }, "metadata is unusable"},
		{"incremental without createTime", map[string]any{"name": "inc", "incremental": true}, func(op map[string]any) {
			delete(op["metadata"].(map[string]any), "createTime")
		}, "no createTime"},
	}
	rw := &metadataRewriter{rewrite: map[string]func(map[string]any){}}
	front := httptest.NewServer(rw.handler(t))
	t.Cleanup(front.Close)
	stores := make([]string, len(tests))
	for i, tc := range tests {
		stores[i], _ = newStore(t, 2)
		rw.rewrite[datasetOf(stores[i])] = tc.rewrite
	}
	c := startChild(t, front.URL)
	deliver := func(t *testing.T, fn, id string, data []byte) {
		t.Helper()
		code, err := deliverTo(c.url, fn, id, data)
		if err != nil || code != http.StatusOK {
			t.Fatalf("%s answered %d, %v\nchild:\n%s", fn, code, err, tail(c.out.String()))
		}
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			store := stores[i]
			spec := gcsSpec(store, tc.extra)
			id := newID("meta")
			deliver(t, "StartExport", id, specJSON(t, spec))
			waitEvents(t, byTrigger(id), 1)
			deliver(t, "PollExport", newID("tick"), []byte("{}"))
			evs := waitEvents(t, byTrigger(id), 2)
			deliver(t, "PollExport", newID("tick"), []byte("{}")) // never loops
			time.Sleep(200 * time.Millisecond)
			evs = eventsFor(byTrigger(id))
			out := outcomes(evs)
			if len(out) != 1 || out[0].Attrs["ce-type"] != events.TypeFailed {
				t.Fatalf("events = %v, want started and one failed\nchild:\n%s", types(evs), tail(c.out.String()))
			}
			if e := out[0].Data.Error; e == nil || e.Code != 13 || !strings.Contains(e.Message, tc.want) {
				t.Errorf("failed error = %+v, want code 13 mentioning %q", e, tc.want)
			}
			pipeline := pipelineOf(t, spec)
			mustExist(t, "pending/"+pipeline+".json", false)
			mustExist(t, "watermarks/"+pipeline+".json", false)
			next := newID("meta-next")
			deliver(t, "StartExport", next, specJSON(t, spec))
			waitEvents(t, isType(byTrigger(next), "started"), 1)
		})
	}
}

// --- 6. long trigger ids and sources ---

// TestLongTriggerID sends a direct CloudEvent whose id and source are 3,000
// bytes. Pub/Sub refuses attribute values over 1,024 bytes; pstest does not,
// so a reactor refuses them here as the service would. Before issue 12 the id
// and source were copied into ce-subject / ce-source of the rejected event:
// the publish was refused and the trigger redelivered forever. (A started
// event's attributes name the store and operation; that case guards that the
// data keeps the whole trigger.)
func TestLongTriggerID(t *testing.T) {
	if env.psFault == nil {
		t.Skip("needs pstest's reactors to enforce Pub/Sub's attribute limit")
	}
	prev := env.psFault.extra.Load()
	limit := func(req any) (bool, any, error) {
		if r, ok := req.(*pb.PublishRequest); ok {
			for _, m := range r.Messages {
				if len(m.Attributes) > events.MaxAttributes {
					return true, nil, status.Errorf(codes.InvalidArgument, "%d attributes", len(m.Attributes))
				}
				for k, v := range m.Attributes {
					if len(k) > events.MaxAttributeKeyBytes || len(v) > events.MaxAttributeValueBytes {
						return true, nil, status.Errorf(codes.InvalidArgument, "attribute %.40s: value of %d bytes is over the limit", k, len(v))
					}
				}
			}
		}
		if prev != nil {
			return (*prev)(req)
		}
		return false, nil, nil
	}
	env.psFault.extra.Store(&limit)
	t.Cleanup(func() { env.psFault.extra.Store(prev) })

	store, _ := newStore(t, 1)
	tests := []struct {
		name, typ string
		spec      []byte
	}{
		{"started", "started", specJSON(t, gcsSpec(store, nil))},
		{"rejected", "rejected", []byte(`{"fhirStore":"` + store + `","unknownField":1}`)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			id := newID("long") + strings.Repeat("i", 2990)
			source := "//example/" + strings.Repeat("s", 2990)
			code := post(t, "StartExport", map[string]string{"ce-specversion": "1.0", "ce-type": "com.example.export.requested",
				"ce-source": source, "ce-id": id, "Content-Type": "application/json"}, tc.spec)
			if code != http.StatusOK {
				t.Fatalf("StartExport answered %d, want 200\nlogs:\n%s", code, tail(env.logs.String()))
			}
			evs := waitEvents(t, byTrigger(id), 1)
			if got := types(evs); got[0] != tc.typ {
				t.Fatalf("events = %v, want %s", got, tc.typ)
			}
			for _, e := range evs {
				for k, v := range e.Attrs {
					if len(v) > events.MaxAttributeValueBytes {
						t.Errorf("attribute %s is %d bytes", k, len(v))
					}
				}
				if e.Data.Trigger.ID != id || e.Data.Trigger.Source != source {
					t.Errorf("event data trigger = %d-byte id, %d-byte source; want the whole %d and %d bytes",
						len(e.Data.Trigger.ID), len(e.Data.Trigger.Source), len(id), len(source))
				}
			}
		})
	}
	if got := len(acceptedFor(store)); got != 1 {
		t.Errorf("accepted exports = %d, want 1", got)
	}
	poll(t)
}

// --- 7. labels that spoof logs and UIs ---

// TestLabelSpoofing: label values with a next-line control, a right-to-left
// override or a line separator are rejected naming the field. Before issue 12
// they were accepted and copied into every event and log line. (A name with
// them was already refused by the pipeline name's pattern; the case guards it.)
func TestLabelSpoofing(t *testing.T) {
	tests := []struct {
		name  string
		extra map[string]any
		field string
	}{
		{"U+0085 next line", map[string]any{"labels": map[string]string{"team": "data\u0085severity: ERROR"}}, "labels.team"},
		{"U+202E right-to-left override", map[string]any{"labels": map[string]string{"owner": "evil\u202Etxt.exe"}}, "labels.owner"},
		{"U+2028 line separator", map[string]any{"labels": map[string]string{"env": "prod\u2028fake line"}}, "labels.env"},
		{"U+202E in name", map[string]any{"name": "nightly\u202E"}, "name"},
	}
	store, _ := newStore(t, 1)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			id := newID("spoof")
			if code := deliverPubSub(t, "StartExport", id, specJSON(t, gcsSpec(store, tc.extra))); code != http.StatusOK {
				t.Fatalf("StartExport answered %d", code)
			}
			evs := waitEvents(t, byTrigger(id), 1)
			if got := types(evs); !slices.Equal(got, []string{"rejected"}) {
				t.Fatalf("events = %v, want rejected", got)
			}
			if e := evs[0].Data.Error; e == nil || e.Field != tc.field {
				t.Errorf("rejected error = %+v, want field %s", e, tc.field)
			}
		})
	}
	if got := exportBodies(store); len(got) != 0 {
		t.Errorf("export requests = %d, want none", len(got))
	}
}

// --- garbage under pending/ and watermarkAdvanced ---

// TestGarbageUnderPending: an object under pending/ that fhirexport did not
// write is named once in the sweep's log and otherwise ignored. Before issue
// 12 it was counted as "starting" forever and mostly never named.
func TestGarbageUnderPending(t *testing.T) {
	name := "pending/notjson-" + newID("g") + ".txt"
	putState(t, name, []byte("hello"), nil)
	t.Cleanup(func() { removeState(t, name) })
	before := len(env.logs.String())
	poll(t)
	logs := env.logs.String()[before:]
	base := strings.TrimPrefix(name, "pending/")
	if n := strings.Count(logs, base); n != 1 {
		t.Errorf("garbage named %d times in the sweep's log, want once:\n%s", n, logs)
	}
	var sweep struct{ Garbage int }
	for _, line := range strings.Split(logs, "\n") {
		if strings.Contains(line, `"message":"poll sweep"`) {
			if err := json.Unmarshal([]byte(line), &sweep); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Other tests' locks may be starting too: only the garbage count is ours.
	if sweep.Garbage < 1 {
		t.Errorf("sweep counted garbage %d; want the object as garbage, not as a starting lock", sweep.Garbage)
	}
	mustExist(t, name, true)
}

// TestWatermarkAdvancedExact: watermarkAdvanced says whether this run moved
// the watermark. Before issue 12 it said true even when the compare-and-swap
// found a later watermark (here an operator's, set while the run ran) and
// kept it.
func TestWatermarkAdvancedExact(t *testing.T) {
	store, _ := newStore(t, 1)
	spec := gcsSpec(store, map[string]any{"name": "inc", "incremental": true})
	pipeline := pipelineOf(t, spec)
	st := export.NewState(env.storage, stateBucket, "state")
	start := func(t *testing.T) (id string) {
		t.Helper()
		id = newID("wm")
		if code := deliverPubSub(t, "StartExport", id, specJSON(t, spec)); code != http.StatusOK {
			t.Fatalf("StartExport answered %d", code)
		}
		waitEvents(t, byTrigger(id), 1)
		return id
	}
	finish := func(t *testing.T, id string) events.Data {
		t.Helper()
		poll(t)
		out := outcomes(waitEvents(t, byTrigger(id), 2))
		if len(out) != 1 || out[0].Attrs["ce-type"] != events.TypeSucceeded {
			t.Fatalf("outcomes = %v, want succeeded", types(out))
		}
		return out[0].Data
	}

	d := finish(t, start(t))
	if d.WatermarkAdvanced == nil || !*d.WatermarkAdvanced || d.Watermark == "" {
		t.Errorf("first run: watermarkAdvanced %s, watermark %q; want true with the watermark", showBool(d.WatermarkAdvanced), d.Watermark)
	}

	id := start(t)
	later := "2030-01-01T00:00:00Z"
	if err := st.SetWatermark(context.Background(), pipeline, store, "inc", later, true, time.Now()); err != nil {
		t.Fatal(err)
	}
	d = finish(t, id)
	if d.WatermarkAdvanced == nil || *d.WatermarkAdvanced || d.Watermark != "" {
		t.Errorf("run behind a later watermark: watermarkAdvanced %s, watermark %q; want false and none", showBool(d.WatermarkAdvanced), d.Watermark)
	}
	w, err := st.GetWatermark(context.Background(), pipeline)
	if err != nil {
		t.Fatal(err)
	}
	if !sameTime(w.Watermark, later) {
		t.Errorf("watermark = %s, want the later %s kept", w.Watermark, later)
	}
}
