package export

import (
	"bytes"
	"context"
	"fmt"
	"strings"
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

// TestWatchdogCancelRefused: operations.cancel answers 500 twice. The lock
// was marked cancelled before the first call, and every later sweep skipped
// the run: it was never ended. Now each sweep asks again until the service
// has the cancel, and the run ends export.failed code 4 exactly once.
func TestWatchdogCancelRefused(t *testing.T) {
	t.Parallel()
	w := newFrontedWorld(t, fronts{})
	w.emu.SetExportTiming(time.Hour, 10)
	store := w.store(t)
	spec := map[string]any{"fhirStore": store, "timeout": "1m", "name": "wd",
		"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/wd/{run}"}}
	w.deliver(t, w.newTrigger(t, spec))
	w.emu.FailNext("operations.cancel", 2, 500)
	for range 6 {
		w.clock.Advance(time.Minute + time.Second)
		w.poll(t)
	}
	if n := apiCalls(w, "operations.cancel"); n != 3 {
		t.Errorf("operations.cancel calls = %d, want 3 (two refused, then asked again until it went through)", n)
	}
	var failed []event
	for _, e := range w.events(t) {
		switch e.typ {
		case events.TypeFailed:
			failed = append(failed, e)
		case events.TypeSucceeded, events.TypePartial:
			t.Errorf("a run past its timeout was reported %s", e.typ)
		}
	}
	if len(failed) != 1 || failed[0].data.Error == nil || failed[0].data.Error.Code != codeDeadlineExceeded {
		t.Fatalf("failed events = %+v, want one with code 4", failed)
	}
	if n := len(w.ps.Messages()) - len(w.events(t)); n != 0 {
		t.Errorf("%d events published more than once", n)
	}
	if got := w.objects(t, "pending"); len(got) != 0 {
		t.Errorf("pending after the watchdog = %v, want none", got)
	}
}

// TestWatchdogRunFinishingAtItsTimeout: a run that finishes in the sweep
// its timeout passes is reported succeeded, and nothing is cancelled.
func TestWatchdogRunFinishingAtItsTimeout(t *testing.T) {
	t.Parallel()
	w := newFrontedWorld(t, fronts{})
	w.emu.SetExportTiming(90*time.Second, 1)
	store := w.store(t)
	w.deliver(t, w.newTrigger(t, map[string]any{"fhirStore": store, "timeout": "1m", "name": "wd",
		"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/wd/{run}"}}))
	w.clock.Advance(2 * time.Minute)
	w.poll(t)
	if n := apiCalls(w, "operations.cancel"); n != 0 {
		t.Errorf("operations.cancel calls = %d, want 0", n)
	}
	if got := count(w.events(t), events.TypeSucceeded)[store]; got != 1 {
		t.Errorf("succeeded events = %d, want 1", got)
	}
}

// apiCalls counts the Healthcare API requests of one method the emulator
// received, refused ones included.
func apiCalls(w *world, method string) int {
	n := 0
	for _, r := range w.emu.Requests() {
		if r.APIMethod == method {
			n++
		}
	}
	return n
}

// TestSweepLogsWatermarkAges: every sweep logs each incremental pipeline's
// watermark age (now minus its last success's createTime), the line
// deploy.sh's watermark-age metric and stale-pipeline alert read.
func TestSweepLogsWatermarkAges(t *testing.T) {
	t.Parallel()
	w := newFrontedWorld(t, fronts{}) // the Exporter on the emulator's clock
	store := w.store(t)
	spec := map[string]any{"fhirStore": store, "name": "aged", "incremental": true,
		"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/aged"}}
	w.start(t, spec)
	for range 10 {
		w.clock.Advance(time.Minute)
		w.poll(t)
	}
	if w.busy(t, spec) {
		t.Fatal("the run did not finish")
	}
	wm, err := w.x.state.GetWatermark(context.Background(), PipelineKey(mustSpec(t, spec)))
	if err != nil || wm.Watermark == "" {
		t.Fatalf("watermark %+v, %v", wm, err)
	}
	at, _ := time.Parse(time.RFC3339Nano, wm.Watermark)
	w.clock.Advance(time.Hour)
	var buf bytes.Buffer
	if _, err := w.x.Poll(WithLogger(context.Background(), NewLogger(&buf, nil))); err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf(`"watermarkAgeSeconds":%d`, int64(w.clock.Now().Sub(at).Seconds()))
	for _, line := range strings.Split(buf.String(), "\n") {
		if strings.Contains(line, `"message":"watermark age"`) && strings.Contains(line, `"pipeline":"`+PipelineKey(mustSpec(t, spec))+`"`) {
			if !strings.Contains(line, want) {
				t.Errorf("logged %s, want %s", line, want)
			}
			return
		}
	}
	t.Errorf("no watermark age line for the pipeline in:\n%s", buf.String())
}
