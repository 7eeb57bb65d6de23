package export

import (
	"fmt"
	"testing"
	"time"

	healthcare "google.golang.org/api/healthcare/v1"

	"github.com/fhirexport/fhirexport/events"
)

// corruptLock overwrites a pipeline's lock with bytes that do not decode,
// keeping its metadata (as a botched edit or a partial restore would).
func (w *world) corruptLock(t *testing.T, pipeline string) (operation string) {
	t.Helper()
	obj := w.storage.Bucket("state").Object("fx/" + pendingObject(pipeline))
	attrs, err := obj.Attrs(quiet)
	if err != nil {
		t.Fatal(err)
	}
	wr := obj.NewWriter(quiet)
	wr.Metadata = attrs.Metadata
	if _, err := wr.Write([]byte("{not json")); err != nil {
		t.Fatal(err)
	}
	if err := wr.Close(); err != nil {
		t.Fatal(err)
	}
	return attrs.Metadata["operation"]
}

// TestCorruptLockWhileItsExportRuns: a pipeline lock found corrupt while its
// export runs. A new trigger used to quarantine it and start a second export
// beside the first, which was then never reported; a sweep reported it
// failed (code 13) at best. Now the lock is rebuilt from the records its
// metadata names (run and operation record): the export is followed to its
// real outcome, and the trigger waits, queued, as behind a healthy lock.
func TestCorruptLockWhileItsExportRuns(t *testing.T) {
	t.Parallel()
	for _, trigger := range []bool{true, false} {
		t.Run(fmt.Sprintf("trigger=%v", trigger), func(t *testing.T) {
			t.Parallel()
			w := newFrontedWorld(t, fronts{})
			w.emu.SetExportTiming(10*time.Minute, 1)
			store := w.store(t)
			spec := map[string]any{"fhirStore": store, "name": "p",
				"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/corrupt/{run}"}}
			w.deliver(t, w.newTrigger(t, spec))
			w.clock.Advance(3 * time.Minute)
			w.poll(t)
			op := w.corruptLock(t, PipelineKey(mustSpec(t, spec)))
			if trigger {
				w.deliver(t, w.newTrigger(t, spec))
				if n := len(w.emu.Exports()); n != 1 {
					t.Errorf("exports after a trigger found the running export's lock corrupt = %d, want 1 (it waits)", n)
				}
				if n := count(w.events(t), events.TypeQueued)[store]; n != 1 {
					t.Errorf("queued events = %d, want 1", n)
				}
			}
			w.drain(t, 5*time.Minute, 20)

			evs := w.events(t)
			var first []event
			for _, e := range evs {
				if e.data.Operation == op && e.typ != events.TypeStarted {
					first = append(first, e)
				}
				if e.typ == events.TypeFailed || e.typ == events.TypePartial {
					t.Errorf("%s event: %+v", e.typ, e.data.Error)
				}
			}
			if len(first) != 1 || first[0].typ != events.TypeSucceeded || first[0].data.Store != store || first[0].data.Trigger.ID == "" {
				t.Errorf("outcomes of the export whose lock broke = %+v; want one succeeded, with its store and trigger", first)
			}
			want := 1
			if trigger {
				want = 2
			}
			if n, s := len(w.emu.Exports()), count(evs, events.TypeSucceeded)[store]; n != want || s != want {
				t.Errorf("%d exports, %d succeeded events; want %d and %d", n, s, want, want)
			}
			if peak := w.emu.PeakRunningOperations(); peak > 1 {
				t.Errorf("peak running exports of the pipeline = %d, want 1", peak)
			}
			if left := w.objects(t, "slots"); len(left) != 0 {
				t.Errorf("slots left: %v", left)
			}
		})
	}
}

// TestCorruptLockOfAnOlderRun: as TestCorruptLockWhileItsExportRuns, but
// the operation record holds no copy of the lock (written before it kept
// one), so the lock cannot be rebuilt. The trigger still waits behind it
// instead of exporting beside it; the export is reported failed (code 13)
// when it ends, and the trigger's run starts after.
func TestCorruptLockOfAnOlderRun(t *testing.T) {
	t.Parallel()
	w := newFrontedWorld(t, fronts{})
	w.emu.SetExportTiming(10*time.Minute, 1)
	store := w.store(t)
	spec := map[string]any{"fhirStore": store, "name": "p",
		"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/corrupt/{run}"}}
	w.deliver(t, w.newTrigger(t, spec))
	pipeline := PipelineKey(mustSpec(t, spec))
	var p pendingRecord
	if _, err := w.x.state.read(quiet, pendingObject(pipeline), &p); err != nil {
		t.Fatal(err)
	}
	var own opRecord
	gen, err := w.x.state.read(quiet, opObject(p.Operation), &own)
	if err != nil {
		t.Fatal(err)
	}
	own.Lock = nil
	if _, err := w.x.state.update(quiet, opObject(p.Operation), gen, own, map[string]string{"run": own.Run}); err != nil {
		t.Fatal(err)
	}
	op := w.corruptLock(t, pipeline)
	w.deliver(t, w.newTrigger(t, spec))
	if n := len(w.emu.Exports()); n != 1 {
		t.Errorf("exports after a trigger found the running export's lock corrupt = %d, want 1 (it waits)", n)
	}
	w.drain(t, 5*time.Minute, 20)
	evs := w.events(t)
	var first []event
	for _, e := range evs {
		if e.data.Operation == op && e.typ != events.TypeStarted {
			first = append(first, e)
		}
	}
	if len(first) != 1 || first[0].typ != events.TypeFailed || first[0].data.Error == nil || first[0].data.Error.Code != codeInternal {
		t.Errorf("outcomes of the export whose lock broke = %+v; want one failed, code 13", first)
	}
	if n, s := len(w.emu.Exports()), count(evs, events.TypeSucceeded)[store]; n != 2 || s != 1 {
		t.Errorf("%d exports, %d succeeded events; want 2 and 1 (the trigger's run, after)", n, s)
	}
	if peak := w.emu.PeakRunningOperations(); peak > 1 {
		t.Errorf("peak running exports of the pipeline = %d, want 1", peak)
	}
}

// TestForeignPendingObject: objects under pending/ that name operations no
// run of this deployment owns (no operation record, no run record): one a
// real export someone else started in a dataset we export from, one an
// operation that does not exist. Each used to be reported (succeeded, and
// failed with code 5); now neither produces an event: both are logged and
// moved aside, and this deployment's own run beside them is reported as ever.
func TestForeignPendingObject(t *testing.T) {
	t.Parallel()
	w := newFrontedWorld(t, fronts{})
	w.emu.SetExportTiming(time.Minute, 1)
	store := w.store(t)
	theirs, err := w.x.hc.Projects.Locations.Datasets.FhirStores.Export(store, &healthcare.ExportResourcesRequest{
		GcsDestination: &healthcare.GoogleCloudHealthcareV1FhirGcsDestination{UriPrefix: "gs://" + exportsBkt + "/theirs"}}).Do()
	if err != nil {
		t.Fatal(err)
	}
	ours := w.store(t)
	w.deliver(t, w.newTrigger(t, map[string]any{"fhirStore": ours, "name": "p",
		"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/ours/{run}"}}))
	for i, op := range []string{theirs.Name, store[:len(store)-len("/fhirStores/s")] + "/operations/424242"} {
		p := pendingRecord{Run: fmt.Sprintf("%032x", i+1), Pipeline: fmt.Sprintf("n-foreign%d", i), Store: store,
			Destination: "gs://" + exportsBkt + "/theirs", Operation: op, Slot: 0, Started: w.clock.Now()}
		if _, err := w.x.state.create(quiet, pendingObject(p.Pipeline), p, lockMeta(p)); err != nil {
			t.Fatal(err)
		}
	}
	for range 3 {
		w.clock.Advance(2 * time.Minute)
		if _, err := w.x.Poll(quiet); err != nil {
			t.Errorf("sweep: %v", err)
		}
	}
	for _, e := range w.events(t) {
		if e.data.Store != ours {
			t.Errorf("an event for an operation no run owns: %s %s", e.typ, e.subject)
		}
	}
	if n := count(w.events(t), events.TypeSucceeded)[ours]; n != 1 {
		t.Errorf("succeeded events of our own run = %d, want 1", n)
	}
	if left := w.objects(t, "pending"); len(left) != 0 {
		t.Errorf("pending/ after the sweeps: %v, want the foreign objects moved aside", left)
	}
	if q := w.objects(t, "quarantine/pending"); len(q) != 2 {
		t.Errorf("moved aside: %v, want both foreign objects", q)
	}
}
