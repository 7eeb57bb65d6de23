package export

// Fleets: a trigger whose fhirStore ends in /fhirStores/* makes one run per
// store of the dataset that the allow-list permits ("expand" in lifecycle.go).
//
// Each store's run is claimed and admitted exactly as a single-store trigger's
// (its own claim, keyed by the trigger and the store), so runs of different
// stores never contend and can be handled side by side: FleetWorkers at a
// time. Under 20 ms per Cloud Storage request a store costs about 200 ms; one
// after the other, about 300 stores filled StartExport's 60 s deadline, and a
// redelivery walking 1,270 claimed stores could not reach a new one.
//
// A delivery takes no new store after FleetSlice (well inside the deadline).
// It then records in fleets/{trigger} how far it got, the last store of the
// sorted listing up to which every store is claimed and admitted (or refused
// and reported), and asks Pub/Sub to redeliver; the redelivery resumes after
// that store instead of walking the claims again. A store whose start failed
// transiently holds the cursor before it, so it is tried again.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	healthcare "google.golang.org/api/healthcare/v1"

	"github.com/fhirexport/fhirexport/events"
)

// Defaults of Exporter.FleetWorkers and Exporter.FleetSlice.
const (
	// DefaultFleetWorkers stores of a fleet are started at a time: 5,000
	// stores in about 31 s at 200 ms a store, far below Cloud Storage's
	// write rates and the budget's own bound on running exports.
	DefaultFleetWorkers = 32
	// DefaultFleetSlice is how long a delivery takes new stores: StartExport
	// runs under a 60 s deadline (deploy.sh), and the stores in hand when the
	// slice ends still have to finish.
	DefaultFleetSlice = 40 * time.Second
)

// fleetRecord is a fleet trigger's expansion cursor, fleets/{digest}.json.
// It exists only from a delivery that stopped before the end of the listing
// to the one that reached it.
type fleetRecord struct {
	Trigger events.TriggerRef `json:"trigger"`
	Dataset string            `json:"dataset"`
	// Through is the last store name (of the listing in byte order) up to
	// which every store was handled: its run claimed and admitted, or the
	// store refused and reported.
	Through string    `json:"through"`
	Stores  int       `json:"stores"` // stores listed by the delivery that wrote it
	Updated time.Time `json:"updated"`
}

// fleetObject names a fleet trigger's cursor.
func fleetObject(trig events.Trigger) string {
	return "fleets/" + digest("fleet", trig.Source, trig.ID)[:32] + ".json"
}

// startFleet makes one run per listed store the allow-list permits,
// FleetWorkers at a time, resuming after the stores an earlier delivery of
// the same trigger recorded as handled.
func (x *Exporter) startFleet(ctx context.Context, trig events.Trigger, spec *Spec, log *slog.Logger) error {
	begin := x.now()
	dataset := spec.Dataset()
	if !x.policy.AllowFleet(dataset) {
		return x.reject(ctx, log, trig, spec, "", deniedErr("fhirStore", "a fleet whose stores FHIREXPORT_ALLOWED_STORES may match", "no store of %s is on the allow-list%s", dataset, emptyHint(x.policy.stores, "FHIREXPORT_ALLOWED_STORES")))
	}
	var stores []string
	call := x.hc.Projects.Locations.Datasets.FhirStores.List(dataset).PageSize(1000)
	err := call.Pages(ctx, func(page *healthcare.ListFhirStoresResponse) error {
		for _, s := range page.FhirStores {
			stores = append(stores, s.Name)
		}
		return nil
	})
	if err != nil {
		if Permanent(err) {
			code, msg := statusOf(err)
			return x.reject(ctx, log, trig, spec, "", &SpecError{Field: "fhirStore", Problem: fmt.Sprintf("listing the stores of %s failed (%d): %s", dataset, code, msg), Accepted: "a dataset fhirexport may list", Code: code})
		}
		return fmt.Errorf("list stores of %s: %w", dataset, err)
	}
	slices.Sort(stores)
	stores = slices.Compact(stores)

	var cur fleetRecord
	gen, err := x.state.read(ctx, fleetObject(trig), &cur)
	switch {
	case errors.Is(err, ErrNotFound):
		gen = 0
	case errors.Is(err, ErrCorrupt):
		log.Warn("fleet cursor is corrupt; expanding from the first store (claimed stores are recognised)", "object", fleetObject(trig), "error", err.Error())
		cur = fleetRecord{}
	case err != nil:
		return fmt.Errorf("read the fleet cursor of trigger %s: %w", trig.ID, err)
	}
	todo := stores
	if cur.Through != "" {
		i := sort.SearchStrings(stores, cur.Through)
		if i < len(stores) && stores[i] == cur.Through {
			i++
		}
		todo = stores[i:]
	}
	log.Info("fleet trigger", "dataset", dataset, "stores", len(stores), "handledBefore", len(stores)-len(todo))

	handled, errs := x.expand(ctx, trig, spec, todo, begin, log)
	k := 0 // todo[:k] all handled
	for k < len(todo) && handled[k] && errs[k] == nil {
		k++
	}
	if k == len(todo) {
		// Every store is handled: the cursor has served. A delivery after
		// this one walks the claims again, which only costs it time.
		if gen != 0 {
			if err := x.state.remove(ctx, fleetObject(trig), gen); err != nil {
				log.Warn("could not remove the finished fleet's cursor; it is only read again by this trigger's redeliveries", "object", fleetObject(trig), "error", err.Error())
			}
		}
		return nil
	}
	if k > 0 {
		rec := fleetRecord{Trigger: events.TriggerRef{Source: trig.Source, ID: trig.ID}, Dataset: dataset, Through: todo[k-1], Stores: len(stores), Updated: x.now()}
		var werr error
		if gen == 0 {
			_, werr = x.state.create(ctx, fleetObject(trig), rec, nil)
		} else {
			_, werr = x.state.update(ctx, fleetObject(trig), gen, rec, nil)
		}
		if werr != nil { // a concurrent delivery moved it, or the bucket failed: the next one walks a little more
			log.Warn("could not record the fleet cursor; the redelivery resumes from the one before", "error", werr.Error())
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	n := 0
	for _, h := range handled {
		if h {
			n++
		}
	}
	log.Info("fleet delivery ran out of its slice; Pub/Sub redelivers it to continue", "handled", n, "left", len(todo)-k, "slice", x.FleetSlice.String())
	return fmt.Errorf("fleet trigger %s: %d of %d stores left after this delivery's %s; its redelivery continues: %w", trig.ID, len(todo)-k, len(stores), x.FleetSlice, errTransient)
}

// expand starts the run of each store of todo, FleetWorkers at a time, until
// the stores are done or FleetSlice has passed since begin. handled[i] tells
// whether todo[i] was tried, errs[i] what went wrong.
func (x *Exporter) expand(ctx context.Context, trig events.Trigger, spec *Spec, todo []string, begin time.Time, log *slog.Logger) (handled []bool, errs []error) {
	handled, errs = make([]bool, len(todo)), make([]error, len(todo))
	workers := max(1, min(x.FleetWorkers, len(todo)))
	var next atomic.Int64
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Each worker's calls carry its own logger: its log lines say
			// which worker made them.
			wctx := WithLogger(ctx, Logger(ctx).With("fleetWorker", w))
			for ctx.Err() == nil && (x.FleetSlice <= 0 || x.now().Sub(begin) < x.FleetSlice) {
				i := int(next.Add(1)) - 1
				if i >= len(todo) {
					return
				}
				errs[i], handled[i] = x.startFleetStore(wctx, trig, spec, todo[i], log), true
			}
		}()
	}
	wg.Wait()
	return handled, errs
}

// startFleetStore starts (or resumes) one store's run of a fleet trigger, or
// reports the store refused.
func (x *Exporter) startFleetStore(ctx context.Context, trig events.Trigger, spec *Spec, store string, log *slog.Logger) error {
	one := spec.ForStore(store)
	slog := log.With("store", store)
	if !x.policy.AllowStore(store) {
		return x.reject(ctx, slog, trig, one, store, deniedErr("fhirStore", "a store matching FHIREXPORT_ALLOWED_STORES", "%q is not on the allow-list%s; the fleet's other stores are exported", store, emptyHint(x.policy.stores, "FHIREXPORT_ALLOWED_STORES")))
	}
	r, err := x.newRun(trig, one, FleetRunKey(trig.Source, trig.ID, store), slog)
	if err != nil {
		return x.reject(ctx, slog, trig, one, store, err)
	}
	return x.startRun(ctx, r)
}
