package export

import (
	"context"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/fhirexport/fhirexport/events"
	"github.com/fhirexport/fhirexport/healthcaretest"
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
	w.emu.FailNext("operations.list", 4, http.StatusServiceUnavailable)
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
