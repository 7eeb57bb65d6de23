package export

import (
	"testing"
	"time"

	"github.com/fhirexport/fhirexport/events"
)

// TestWatchdog: a run still running past its spec's timeout is cancelled
// with operations.cancel (once) and reported export.failed with code 4
// DEADLINE_EXCEEDED (once); its pipeline is then free. The clock is the
// emulator's fake clock, on both sides.
func TestWatchdog(t *testing.T) {
	t.Parallel()
	w := newFrontedWorld(t, fronts{})
	w.emu.SetExportTiming(time.Hour, 10)
	_, stores := w.fleet(t, 1)
	spec := map[string]any{"fhirStore": stores[0], "timeout": "5m", "name": "wd",
		"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/wd/{run}"}}
	w.deliver(t, w.newTrigger(t, spec))
	cancels := func() int {
		n := 0
		for _, r := range w.emu.Requests() {
			if r.APIMethod == "operations.cancel" {
				n++
			}
		}
		return n
	}

	w.clock.Advance(4 * time.Minute)
	w.poll(t)
	if n := cancels(); n != 0 {
		t.Fatalf("cancel calls within the timeout = %d, want 0", n)
	}
	w.clock.Advance(2 * time.Minute)
	for range 3 {
		w.poll(t)
		w.clock.Advance(time.Minute)
	}
	if n := cancels(); n != 1 {
		t.Errorf("cancel calls past the timeout = %d, want 1", n)
	}
	var failed []event
	for _, e := range w.events(t) {
		if e.typ == events.TypeFailed {
			failed = append(failed, e)
		}
		if e.typ == events.TypeSucceeded {
			t.Errorf("a cancelled run was reported succeeded: %+v", e.data)
		}
	}
	if len(failed) != 1 || failed[0].data.Error == nil || failed[0].data.Error.Code != 4 {
		t.Fatalf("failed events = %+v, want one with code 4", failed)
	}
	if got := w.objects(t, "pending"); len(got) != 0 {
		t.Errorf("pending after the watchdog = %v, want none", got)
	}
	// The pipeline is free: the next trigger starts at once.
	before := len(w.emu.ExportRequests())
	w.deliver(t, w.newTrigger(t, spec))
	if got := len(w.emu.ExportRequests()) - before; got != 1 {
		t.Errorf("exports after the watchdog freed the pipeline = %d, want 1", got)
	}
}
