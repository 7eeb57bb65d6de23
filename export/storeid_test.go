package export

import (
	"testing"
	"time"

	"github.com/fhirexport/fhirexport/events"
)

// TestStoreIDsTheAPIAccepts: store IDs are [\p{L}\p{N}_\-.]{1,256} in the
// Healthcare API, so süd-klinik and 病院-7 are stores a fleet lists and
// exports. A single-store spec naming one of them, allowed by an exact
// pattern, exports it as well (it was rejected as "not a FHIR store resource
// name" while the fleet exported the very same store).
func TestStoreIDsTheAPIAccepts(t *testing.T) {
	t.Parallel()
	w := newFrontedWorld(t, fronts{})
	w.emu.SetExportTiming(time.Minute, 1)
	dataset := testLocation + "/datasets/kliniken"
	if err := w.emu.CreateDataset(dataset); err != nil {
		t.Fatal(err)
	}
	stores := []string{dataset + "/fhirStores/süd-klinik", dataset + "/fhirStores/病院-7"}
	for _, s := range stores {
		if err := w.emu.CreateFHIRStore(s, "R4"); err != nil {
			t.Fatal(err)
		}
	}
	policy, err := ParsePolicy(stores[0]+","+stores[1], "gs://"+exportsBkt)
	if err != nil {
		t.Fatal(err)
	}
	w.x.policy = policy

	for _, s := range stores {
		w.deliver(t, w.newTrigger(t, map[string]any{"fhirStore": s, "name": "single",
			"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/single/{store}"}}))
	}
	w.deliver(t, w.newTrigger(t, map[string]any{"fhirStore": dataset + "/fhirStores/*", "name": "fleet",
		"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportsBkt + "/fleet/{store}"}}))
	w.drain(t, 2*time.Minute, 10)

	evs := w.events(t)
	if rejected := count(evs, events.TypeRejected); len(rejected) != 0 {
		for _, e := range evs {
			if e.typ == events.TypeRejected {
				t.Errorf("rejected %s: %s", e.data.Store, e.data.Error.Message)
			}
		}
	}
	got, succeeded := exportsByStore(w.emu), count(evs, events.TypeSucceeded)
	for _, s := range stores {
		if got[s] != 2 || succeeded[s] != 2 {
			t.Errorf("store %s: %d exports, %d succeeded; want 2 and 2 (its single-store spec and the fleet)", s, got[s], succeeded[s])
		}
	}
}
