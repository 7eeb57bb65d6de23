package main

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"cloud.google.com/go/pubsub/v2"
	healthcare "google.golang.org/api/healthcare/v1"
)

// fleetStores are the stores the fleet step adds next to the demo store, each
// seeded with fleetPatients synthetic patients.
var fleetStores = []string{"clinic-north", "clinic-south", "lab"}

const fleetPatients = 2

// fleet adds stores to the demo dataset and exports them all with one fleet
// trigger. With FHIREXPORT_MAX_RUNNING=2, two runs start at once and the
// others wait in the queue until PollExport, at a scheduler tick, finds a
// slot free. It checks that every store's run succeeded with its manifest and
// that the emulator never saw more than two exports running.
func (st *stack) fleet(ctx context.Context, r *stepResult) error {
	t0 := time.Now()
	defer func() { r.took = time.Since(t0) }()
	for i, id := range fleetStores {
		name := datasetName + "/fhirStores/" + id
		if err := st.emu.CreateFHIRStore(name, "R4"); err != nil {
			return fmt.Errorf("create store %s: %w", name, err)
		}
		if _, err := st.emu.Seed(name, st.o.seed+int64(i)+1, fleetPatients); err != nil {
			return fmt.Errorf("seed store %s: %w", name, err)
		}
	}
	var stores []string
	err := st.hc.Projects.Locations.Datasets.FhirStores.List(datasetName).Pages(ctx, func(p *healthcare.ListFhirStoresResponse) error {
		for _, s := range p.FhirStores {
			stores = append(stores, s.Name)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("list the stores of %s: %w", datasetName, err)
	}
	slices.Sort(stores)
	st.con.Printf("  added stores %s (%d synthetic patients each); dataset %s now holds %d stores\n",
		strings.Join(fleetStores, ", "), fleetPatients, short(datasetName), len(stores))
	st.con.Printf("  FHIREXPORT_MAX_RUNNING=%d: %d runs can start at once, the others wait in the queue for a free slot\n", maxRunning, maxRunning)
	st.emu.ResetPeakRunningOperations()

	spec := map[string]any{
		"fhirStore":      datasetName + "/fhirStores/*",
		"gcsDestination": map[string]any{"uriPrefix": exportPrefix + "/fleet/{store}/{date}/{run}"},
		"name":           "local-fleet",
		"labels":         map[string]string{"origin": "fhirexport-local"},
	}
	if st.o.types != "" {
		spec["_type"] = st.o.types
	}
	b, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	st.con.Printf("  spec %s\n", b)
	// Only PollExport frees slots. Holding the scheduler while StartExport
	// admits the fleet makes the queue independent of how fast exports
	// run here (in production a tick is a minute; admitting takes a second).
	if err := st.pauseTicks(ctx); err != nil {
		return err
	}
	published := time.Now()
	id, err := st.requests.Publish(ctx, &pubsub.Message{Data: b}).Get(ctx)
	if err != nil {
		st.resumeTicks()
		return fmt.Errorf("publish the request: %w", err)
	}
	st.con.Printf("  ▶ published message %s on %s: StartExport makes one run per store\n", id, short(requestsTopic))
	err = st.awaitAdmitted(ctx, id, stores)
	st.resumeTicks()
	if err != nil {
		return err
	}
	st.con.Printf("  every store's run is started or queued; the scheduler ticks PollExport every %s, which starts queued runs as slots free\n", st.o.tick)

	seq, final, err := st.awaitFleet(ctx, id, stores)
	if err != nil {
		r.outcome = "no outcome"
		return err
	}
	var failed []string
	for _, s := range stores {
		if e := final[s]; e.Type != "succeeded" {
			failed = append(failed, fmt.Sprintf("%s export.%s%s", short(s), e.Type, errorText(e)))
		}
	}
	r.outcome = fmt.Sprintf("%d of %d succeeded", len(stores)-len(failed), len(stores))
	if len(failed) > 0 {
		return fmt.Errorf("not every store's run succeeded: %s", strings.Join(failed, "; "))
	}

	st.con.Printf("  sequence (events as they arrived, since the trigger was published):\n")
	queued := 0
	for _, e := range seq {
		extra := ""
		switch e.Type {
		case "queued":
			queued++
			extra = queueReason(e.Data.Reason)
		case "started":
			extra = opShort(e.Data.Operation)
		case "succeeded":
			extra = fmt.Sprintf("%s after %s", opShort(e.Data.Operation), e.Data.Duration)
		}
		st.con.Printf("    +%-7s %-10s %-13s %s\n", e.At.Sub(published).Round(10*time.Millisecond), e.Type, short(e.Data.Store), extra)
	}

	for _, s := range stores {
		ev := final[s]
		if !strings.Contains(ev.Data.Destination, "/fleet/"+short(s)+"/") {
			return fmt.Errorf("%s was exported to %s, want its own folder .../fleet/%s/... from {store}", short(s), ev.Data.Destination, short(s))
		}
		files, err := st.files(ctx, ev)
		if err != nil {
			return err
		}
		got := map[string]int{}
		for _, f := range files {
			got[f.typ] = len(f.lines)
		}
		if want := st.countByTypeIn(s, typeSet(st.o.types)); !maps.Equal(got, want) {
			return fmt.Errorf("%s: NDJSON lines per type %s, but the store holds %s", short(s), formatCounts(got), formatCounts(want))
		}
		fc, err := st.verifyFeed(ctx, ev, files, nil)
		if err != nil {
			return fmt.Errorf("%s: %w", short(s), err)
		}
		r.manifests = append(r.manifests, fc.manifest)
		st.con.Printf("  %-13s %s (%d outputs)\n", short(s), fc.manifest, len(fc.m.Output))
	}
	st.con.Printf("  ✓ every store's run succeeded; each wrote what its store holds and a manifest listing it\n")

	peak := st.emu.PeakRunningOperations()
	if peak > maxRunning {
		return fmt.Errorf("the emulator saw %d exports running at once, but FHIREXPORT_MAX_RUNNING is %d", peak, maxRunning)
	}
	if want := max(0, len(stores)-maxRunning); queued != want {
		return fmt.Errorf("%d of %d runs were queued, want %d: FHIREXPORT_MAX_RUNNING is %d", queued, len(stores), want, maxRunning)
	}
	st.con.Printf("  ✓ at most %d exports ran at once (the emulator's peak: %d); %d of %d runs waited in the queue\n", maxRunning, peak, queued, len(stores))
	r.outcome += fmt.Sprintf(", peak %d running, %d queued", peak, queued)
	return nil
}

// awaitAdmitted waits until every store of a fleet trigger has an event:
// started, queued, or an outcome.
func (st *stack) awaitAdmitted(ctx context.Context, trigger string, stores []string) error {
	timeout := 30*time.Second + 10*st.o.tick
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		evs, gaveUp, changed := st.events.snapshot(trigger)
		seen := map[string]bool{}
		for _, e := range evs {
			if e.Data.Trigger.ID != trigger {
				continue
			}
			if e.Data.Store == "" {
				return fmt.Errorf("the fleet trigger was %s%s", e.Type, errorText(e))
			}
			seen[e.Data.Store] = true
		}
		if len(seen) >= len(stores) {
			return nil
		}
		if gaveUp != "" {
			return fmt.Errorf("trigger %s not accepted: %s", trigger, gaveUp)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-deadline.C:
			return fmt.Errorf("StartExport did not start or queue a run for every store within %s (%d of %d); see %s", timeout, len(seen), len(stores), st.o.logs)
		case <-changed:
		}
	}
}

// awaitFleet waits until every store of a fleet trigger has an outcome, and
// returns the trigger's events in arrival order and each store's outcome.
func (st *stack) awaitFleet(ctx context.Context, trigger string, stores []string) ([]received, map[string]received, error) {
	rounds := (len(stores) + maxRunning - 1) / maxRunning
	timeout := time.Duration(rounds)*(2*st.o.exportDuration+10*st.o.tick) + 30*time.Second
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		evs, gaveUp, changed := st.events.snapshot(trigger)
		var seq []received
		final := map[string]received{}
		for _, e := range evs {
			if e.Data.Trigger.ID != trigger {
				continue
			}
			seq = append(seq, e)
			switch e.Type {
			case "queued", "started":
			default:
				if e.Data.Store == "" {
					return seq, final, fmt.Errorf("the fleet trigger was %s: %v", e.Type, e.Data.Error)
				}
				final[e.Data.Store] = e
			}
		}
		if len(final) >= len(stores) {
			return seq, final, nil
		}
		if gaveUp != "" {
			return seq, final, fmt.Errorf("trigger %s not accepted: %s", trigger, gaveUp)
		}
		select {
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case <-deadline.C:
			var waiting []string
			for _, s := range stores {
				if _, ok := final[s]; !ok {
					waiting = append(waiting, short(s))
				}
			}
			return seq, final, fmt.Errorf("no outcome for %s within %s; see %s", strings.Join(waiting, ", "), timeout, st.o.logs)
		case <-changed:
		}
	}
}

// errorText is ": message" of an event's error, or "".
func errorText(e received) string {
	if e.Data.Error == nil {
		return ""
	}
	return ": " + e.Data.Error.Message
}
