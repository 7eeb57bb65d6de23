package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"cloud.google.com/go/pubsub/v2"
	"cloud.google.com/go/storage"
	healthcare "google.golang.org/api/healthcare/v1"
	"google.golang.org/api/iterator"
)

// pipelineName names the demonstration's incremental pipeline: its first run
// has no watermark and exports everything, its second exports the changes.
const pipelineName = "local-demo"

// stepResult is one demonstration step as the summary reports it.
type stepResult struct {
	name      string
	outcome   string
	took      time.Duration
	files     []ndjsonFile
	tables    map[string]int // BigQuery table → rows
	manifests []string       // gs:// URLs of the Bulk Data manifests the step's runs wrote
}

// ndjsonFile is one exported object as found on disk.
type ndjsonFile struct {
	path  string // under --dir
	typ   string
	lines [][]byte
	bytes int
}

// demoSteps is the number of steps of the demonstration.
const demoSteps = 5

// demo runs the steps, stopping at the first failure, and prints a
// summary either way.
func (st *stack) demo(ctx context.Context) error {
	start := time.Now()
	var steps []*stepResult
	err := st.demoSteps(ctx, &steps)
	st.summary(steps, time.Since(start))
	switch {
	case err != nil && ctx.Err() != nil:
		st.con.Printf("\ninterrupted\n")
		return err
	case err != nil:
		st.con.Printf("\nFAILED (function logs: %s, emulator logs: %s)\n", st.o.logs, filepath.Join(st.o.dir, "emulators.log"))
		return err
	}
	st.con.Printf("\nOK: every step succeeded and verified.\n")
	return nil
}

func (st *stack) demoSteps(ctx context.Context, steps *[]*stepResult) error {
	types := typeSet(st.o.types)
	gcsSpec := map[string]any{
		"fhirStore":      storeName,
		"gcsDestination": map[string]any{"uriPrefix": exportPrefix + "/{store}/{date}/{run}"},
		"incremental":    true,
		"name":           pipelineName,
		"labels":         map[string]string{"origin": "fhirexport-local"},
	}
	if st.o.types != "" {
		gcsSpec["_type"] = st.o.types
	}
	step := func(n int, name string) *stepResult {
		r := &stepResult{name: name}
		*steps = append(*steps, r)
		st.con.Printf("\n[%d/%d] %s\n", n, demoSteps, name)
		return r
	}

	// 1. Full export: the pipeline's first run.
	s := step(1, "full export to Cloud Storage")
	st.con.Printf("  the first run of incremental pipeline %q has no watermark yet, so it exports everything\n", pipelineName)
	full, err := st.export(ctx, s, gcsSpec)
	if err != nil {
		return fmt.Errorf("step 1 (%s): %w", s.name, err)
	}
	if s.files, err = st.files(ctx, full); err != nil {
		return fmt.Errorf("step 1 (%s): %w", s.name, err)
	}
	want := st.countByType(types)
	if err := verifyFull(s.files, want, full); err != nil {
		return fmt.Errorf("step 1 (%s): %w", s.name, err)
	}
	st.con.Printf("  ✓ NDJSON lines per type equal what the store holds: %s\n", formatCounts(want))
	// The pipeline's first success delivers every deletion recorded so far: none.
	fc, err := st.verifyFeed(ctx, full, s.files, map[string]bool{})
	if err != nil {
		return fmt.Errorf("step 1 (%s): %w", s.name, err)
	}
	s.manifests = append(s.manifests, fc.manifest)
	st.printFeed(fc)
	st.con.Printf("  ✓ the event names the manifest; it lists exactly the %d files written, as the event's outputs do\n", len(fc.m.Output))

	// 2. Updates and an erasure.
	s = step(2, "resource updates and a patient's erasure in the store")
	t0 := time.Now()
	changed, what, err := st.update()
	if err != nil {
		s.took = time.Since(t0)
		return fmt.Errorf("step 2 (%s): %w", s.name, err)
	}
	st.con.Printf("  %s\n", what)
	erased, err := st.erase(ctx, changed)
	if err != nil {
		s.took = time.Since(t0)
		return fmt.Errorf("step 2 (%s): %w", s.name, err)
	}
	for k := range erased.keys {
		delete(changed, k) // deleted: in no export any more
	}
	st.con.Printf("  erased %s through the FHIR REST API (fhir.delete): first what references it, as the store\n"+
		"  enforces referential integrity (%s), then the Patient\n", erased.patient, formatCounts(countTypes(erased.keys, erased.patient)))
	n, err := st.awaitTombstones(ctx, erased.keys)
	s.took = time.Since(t0)
	if err != nil {
		return fmt.Errorf("step 2 (%s): %w", s.name, err)
	}
	st.con.Printf("  ✓ RecordChange acknowledged the %d DeleteResource notifications the store published on %s: tombstones recorded\n", n, short(changesTopic))
	s.outcome = fmt.Sprintf("%d changed, %d deleted", len(changed), len(erased.keys))
	for k := range changed {
		if !types.has(k[:strings.Index(k, "/")]) {
			delete(changed, k) // outside the export's _type
		}
	}
	wantDeleted := map[string]bool{}
	for k := range erased.keys {
		if types.has(k[:strings.Index(k, "/")]) {
			wantDeleted[k] = true
		}
	}

	// 3. Incremental export.
	s = step(3, "incremental export to Cloud Storage")
	st.con.Printf("  the same pipeline again: _since becomes its watermark %s\n", full.Data.Watermark)
	inc, err := st.export(ctx, s, gcsSpec)
	if err != nil {
		return fmt.Errorf("step 3 (%s): %w", s.name, err)
	}
	if s.files, err = st.files(ctx, inc); err != nil {
		return fmt.Errorf("step 3 (%s): %w", s.name, err)
	}
	if err := verifyIncremental(s.files, changed, full.Data.Watermark, inc); err != nil {
		return fmt.Errorf("step 3 (%s): %w", s.name, err)
	}
	st.con.Printf("  ✓ the export holds exactly the %d changed resources, at their current versions\n", len(changed))
	if fc, err = st.verifyFeed(ctx, inc, s.files, wantDeleted); err != nil {
		return fmt.Errorf("step 3 (%s): %w", s.name, err)
	}
	s.manifests = append(s.manifests, fc.manifest)
	st.printFeed(fc)
	if l, ok := fc.lines[erased.patient]; ok {
		st.con.Printf("  the erased patient in the deleted file: %s\n", l)
	}
	st.con.Printf("  ✓ the event carries manifest, outputs and deleted=%d; the deleted file holds a DELETE entry for exactly\n"+
		"    the %d erased resources%s\n", *inc.Data.Deleted, len(wantDeleted), typesNote(st.o.types))

	// 4. BigQuery export.
	s = step(4, "BigQuery export (the emulator's in-memory model)")
	bqSpec := map[string]any{
		"fhirStore": storeName,
		"bigqueryDestination": map[string]any{
			"datasetUri":       bqDataset,
			"schemaConfig":     map[string]any{"schemaType": "ANALYTICS_V2"},
			"writeDisposition": "WRITE_APPEND",
		},
	}
	if st.o.types != "" {
		bqSpec["_type"] = st.o.types
	}
	if _, err := st.export(ctx, s, bqSpec); err != nil {
		return fmt.Errorf("step 4 (%s): %w", s.name, err)
	}
	s.tables = map[string]int{}
	for _, t := range st.emu.BigQueryTables(bqDataset) {
		s.tables[t] = len(st.emu.BigQueryTable(bqDataset, t))
	}
	want = st.countByType(types)
	if !maps.Equal(s.tables, want) {
		return fmt.Errorf("step 4 (%s): rows per table %s, want %s", s.name, formatCounts(s.tables), formatCounts(want))
	}
	st.con.Printf("  ✓ rows per table equal what the store holds: %s\n", formatCounts(s.tables))

	// 5. A fleet under the export budget.
	s = step(5, "fleet export of the whole dataset within the budget")
	if err := st.fleet(ctx, s); err != nil {
		return fmt.Errorf("step 5 (%s): %w", s.name, err)
	}
	return nil
}

// countTypes counts keys (Type/id) per type, leaving out one.
func countTypes(keys map[string]bool, except string) map[string]int {
	n := map[string]int{}
	for k := range keys {
		if k != except {
			n[k[:strings.Index(k, "/")]]++
		}
	}
	return n
}

func typesNote(types string) string {
	if types == "" {
		return ""
	}
	return " of the export's _type " + types
}

// export publishes spec on the requests topic, as `gcloud pubsub topics
// publish` would, and waits for the export's outcome event, showing progress.
func (st *stack) export(ctx context.Context, r *stepResult, spec map[string]any) (received, error) {
	b, err := json.Marshal(spec)
	if err != nil {
		return received{}, err
	}
	st.con.Printf("  spec %s\n", b)
	t0 := time.Now()
	defer func() { r.took = time.Since(t0) }()
	id, err := st.requests.Publish(ctx, &pubsub.Message{Data: b}).Get(ctx)
	if err != nil {
		return received{}, fmt.Errorf("publish the request: %w", err)
	}
	st.con.Printf("  ▶ published message %s on %s; Eventarc-like delivery posts it to StartExport\n", id, short(requestsTopic))
	final, err := st.await(ctx, id)
	if err != nil {
		r.outcome = "no outcome"
		return received{}, err
	}
	r.outcome = final.Type
	if final.Type != "succeeded" {
		msg := ""
		if e := final.Data.Error; e != nil {
			msg = ": " + e.Message
		}
		return final, fmt.Errorf("export.%s%s", final.Type, msg)
	}
	return final, nil
}

// await waits for the outcome event (anything but started or queued) of a trigger,
// following the operation's progress with operations.get meanwhile.
func (st *stack) await(ctx context.Context, trigger string) (received, error) {
	timeout := 2*st.o.exportDuration + 10*st.o.tick + 30*time.Second
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	every := time.NewTicker(250 * time.Millisecond)
	defer every.Stop()
	var op string
	var p progress
	for {
		evs, gaveUp, changed := st.events.snapshot(trigger)
		for _, e := range evs {
			if e.Data.Trigger.ID != trigger {
				continue
			}
			switch e.Type {
			case "started":
				op = e.Data.Operation
			case "queued": // waiting for a slot: not an outcome
			default:
				return e, nil
			}
		}
		if gaveUp != "" {
			return received{}, fmt.Errorf("trigger %s not accepted: %s", trigger, gaveUp)
		}
		select {
		case <-ctx.Done():
			return received{}, ctx.Err()
		case <-deadline.C:
			return received{}, fmt.Errorf("no outcome event for trigger %s within %s; see %s", trigger, timeout, st.o.logs)
		case <-changed:
		case <-every.C:
			if op != "" {
				st.showProgress(ctx, op, &p)
			}
		}
	}
}

// progress is what was last shown of an operation.
type progress struct {
	last string
	done bool
}

// showProgress reads the operation with operations.get through the real
// Healthcare client and prints its counters when they changed.
func (st *stack) showProgress(ctx context.Context, op string, p *progress) {
	if p.done {
		return
	}
	o, err := st.hc.Projects.Locations.Datasets.Operations.Get(op).Context(ctx).Do()
	if err != nil {
		if ctx.Err() == nil {
			st.con.Printf("  ! operations.get %s: %v\n", opShort(op), err)
		}
		return
	}
	var meta healthcare.OperationMetadata
	if len(o.Metadata) > 0 {
		json.Unmarshal(o.Metadata, &meta)
	}
	c := meta.Counter
	if c == nil {
		c = &healthcare.ProgressCounter{}
	}
	total := c.Success + c.Failure + c.Pending
	line := fmt.Sprintf("%s %d/%d exported, %d pending", bar(c.Success, total), c.Success, total, c.Pending)
	switch {
	case o.Done:
		p.done = true
		st.con.Printf("  … %s done (operations.get): success=%d failure=%d; PollExport reports it at its next tick\n", opShort(op), c.Success, c.Failure)
	case line != p.last:
		st.con.Printf("  … %s running (operations.get): %s\n", opShort(op), line)
	}
	p.last = line
}

func bar(done, total int64) string {
	const width = 20
	n := 0
	if total > 0 {
		n = int(done * width / total)
	}
	return "[" + strings.Repeat("#", n) + strings.Repeat(".", width-n) + "]"
}

// files reads the NDJSON objects an export wrote from fake-gcs-server's
// folder: the service names them {uriPrefix}/{operationId}_{ResourceType}.
func (st *stack) files(ctx context.Context, ev received) ([]ndjsonFile, error) {
	bucket, prefix, _ := strings.Cut(strings.TrimPrefix(ev.Data.Destination, "gs://"), "/")
	opID := short(ev.Data.Operation)
	var out []ndjsonFile
	it := st.storage.Bucket(bucket).Objects(ctx, &storage.Query{Prefix: strings.TrimSuffix(prefix, "/") + "/"})
	for {
		a, err := it.Next()
		if errors.Is(err, iterator.Done) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("list %s: %w", ev.Data.Destination, err)
		}
		typ, ok := strings.CutPrefix(path.Base(a.Name), opID+"_")
		if !ok {
			continue
		}
		p := filepath.Join(st.gcsRoot, bucket, filepath.FromSlash(a.Name))
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("object gs://%s/%s is not on disk: %w", bucket, a.Name, err)
		}
		f := ndjsonFile{path: p, typ: typ, bytes: len(data)}
		if len(data) > 0 {
			f.lines = bytes.Split(bytes.TrimSuffix(data, []byte("\n")), []byte("\n"))
		}
		out = append(out, f)
	}
	return out, nil
}

// countByType counts the demo store's current resources per type, within types.
func (st *stack) countByType(types typeFilter) map[string]int {
	return st.countByTypeIn(storeName, types)
}

// countByTypeIn counts a store's current resources per type, within types.
func (st *stack) countByTypeIn(store string, types typeFilter) map[string]int {
	n := map[string]int{}
	for _, r := range st.emu.Resources(store) {
		if t, _ := resourceKey(r); types.has(t) {
			n[t]++
		}
	}
	return n
}

func verifyFull(files []ndjsonFile, want map[string]int, ev received) error {
	got := map[string]int{}
	total := 0
	for _, f := range files {
		got[f.typ] = len(f.lines)
		total += len(f.lines)
	}
	if !maps.Equal(got, want) {
		return fmt.Errorf("NDJSON lines per type %s, but the store holds %s", formatCounts(got), formatCounts(want))
	}
	if c := ev.Data.Counters; c == nil || c.Success != int64(total) {
		return fmt.Errorf("the succeeded event counts %+v, but %d lines were written", c, total)
	}
	return nil
}

func verifyIncremental(files []ndjsonFile, changed map[string]json.RawMessage, watermark string, ev received) error {
	if ev.Data.Since != watermark || watermark == "" {
		return fmt.Errorf("the incremental export used since %q, want the full export's watermark %q", ev.Data.Since, watermark)
	}
	got := map[string]json.RawMessage{}
	for _, f := range files {
		for _, l := range f.lines {
			typ, id := resourceKey(l)
			if typ != f.typ {
				return fmt.Errorf("%s holds a %s", f.path, typ)
			}
			if _, dup := got[typ+"/"+id]; dup {
				return fmt.Errorf("%s/%s exported twice", typ, id)
			}
			got[typ+"/"+id] = l
		}
	}
	var missing, extra, stale []string
	for k, want := range changed {
		switch l, ok := got[k]; {
		case !ok:
			missing = append(missing, k)
		case !jsonEqual(l, want):
			stale = append(stale, k)
		}
	}
	for k := range got {
		if _, ok := changed[k]; !ok {
			extra = append(extra, k)
		}
	}
	if len(missing)+len(extra)+len(stale) > 0 {
		slices.Sort(missing)
		slices.Sort(extra)
		slices.Sort(stale)
		return fmt.Errorf("the incremental export is not exactly the changes: missing %v, unchanged resources exported %v, old versions %v", missing, extra, stale)
	}
	return nil
}

// update changes the store as an application would between two exports:
// it gives every 10th patient a phone number, amends every 20th observation
// and adds two patients with an observation each. It returns the changed
// resources as stored (Type/id → JSON) and a description.
func (st *stack) update() (map[string]json.RawMessage, string, error) {
	var patients, observations []map[string]any
	for _, r := range st.emu.Resources(storeName) {
		d := json.NewDecoder(bytes.NewReader(r))
		d.UseNumber() // keep values exactly as stored
		var m map[string]any
		if err := d.Decode(&m); err != nil {
			return nil, "", err
		}
		switch m["resourceType"] {
		case "Patient":
			patients = append(patients, m)
		case "Observation":
			observations = append(observations, m)
		}
	}
	changed := map[string]json.RawMessage{}
	put := func(m map[string]any) (string, error) {
		b, err := json.Marshal(m)
		if err != nil {
			return "", err
		}
		stored, err := st.emu.PutResource(storeName, b)
		if err != nil {
			return "", err
		}
		typ, id := resourceKey(stored)
		changed[typ+"/"+id] = stored
		return id, nil
	}
	var updatedP, updatedO int
	for i := 0; i < len(patients); i += 10 {
		patients[i]["telecom"] = []any{map[string]any{"system": "phone", "value": fmt.Sprintf("+1-555-01%02d", i%100), "use": "mobile"}}
		if _, err := put(patients[i]); err != nil {
			return nil, "", err
		}
		updatedP++
	}
	for i := 0; i < len(observations); i += 20 {
		observations[i]["status"] = "amended"
		observations[i]["note"] = []any{map[string]any{"text": "value re-checked (fhirexport-local)"}}
		if _, err := put(observations[i]); err != nil {
			return nil, "", err
		}
		updatedO++
	}
	const added = 2
	for i := range added {
		pid, err := put(map[string]any{
			"resourceType": "Patient", "active": true, "gender": "female", "birthDate": "1990-0" + fmt.Sprint(i+1) + "-15",
			"name": []any{map[string]any{"use": "official", "family": "Local", "given": []any{fmt.Sprintf("Demo%d", i+1)}}},
		})
		if err != nil {
			return nil, "", err
		}
		if _, err := put(map[string]any{
			"resourceType": "Observation", "status": "final",
			"code":              map[string]any{"coding": []any{map[string]any{"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"}}},
			"subject":           map[string]any{"reference": "Patient/" + pid},
			"effectiveDateTime": time.Now().UTC().Format(time.RFC3339),
			"valueQuantity":     map[string]any{"value": 61.5 + float64(i), "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"},
		}); err != nil {
			return nil, "", err
		}
	}
	what := fmt.Sprintf("updated %d Patient (a phone number) and %d Observation (amended, with a note); added %d Patient and %d Observation",
		updatedP, updatedO, added, added)
	return changed, what, nil
}

// summary prints each step's outcome and time, the files written and the
// BigQuery rows.
func (st *stack) summary(steps []*stepResult, total time.Duration) {
	var b bytes.Buffer
	fmt.Fprintf(&b, "\nsummary\n")
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "  step\toutcome\ttook\n")
	for i, s := range steps {
		fmt.Fprintf(tw, "  %d %s\t%s\t%s\n", i+1, s.name, s.outcome, s.took.Round(time.Millisecond))
	}
	fmt.Fprintf(tw, "  total\t\t%s\n", total.Round(time.Millisecond))
	tw.Flush()
	var any bool
	for i, s := range steps {
		if len(s.files) == 0 {
			continue
		}
		if !any {
			fmt.Fprintf(&b, "\nfiles written (NDJSON: one resource per line)\n")
			tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
			fmt.Fprintf(tw, "  step\tlines\ttype\tbytes\tpath\n")
			any = true
		}
		for _, f := range s.files {
			fmt.Fprintf(tw, "  %d\t%d\t%s\t%d\t%s\n", i+1, len(f.lines), f.typ, f.bytes, f.path)
		}
	}
	if any {
		tw.Flush()
	}
	any = false
	for i, s := range steps {
		for _, m := range s.manifests {
			if !any {
				fmt.Fprintf(&b, "\nBulk Data manifests written (the feed: outputs, and deleted files for incremental runs)\n")
				any = true
			}
			fmt.Fprintf(&b, "  %d  %s\n", i+1, m)
		}
	}
	for _, s := range steps {
		if len(s.tables) > 0 {
			fmt.Fprintf(&b, "\nBigQuery %s (in the emulator's memory): %s rows\n", bqDataset, formatCounts(s.tables))
		}
	}
	st.con.Printf("%s", b.String())
}

// typeFilter is the set of resource types an export covers; nil is all.
type typeFilter map[string]bool

func typeSet(types string) typeFilter {
	if strings.TrimSpace(types) == "" {
		return nil
	}
	s := typeFilter{}
	for _, t := range strings.Split(types, ",") {
		s[strings.TrimSpace(t)] = true
	}
	return s
}

func (f typeFilter) has(t string) bool { return f == nil || f[t] }

func resourceKey(r []byte) (typ, id string) {
	var v struct {
		ResourceType string `json:"resourceType"`
		ID           string `json:"id"`
	}
	json.Unmarshal(r, &v)
	return v.ResourceType, v.ID
}

func jsonEqual(a, b []byte) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	return reflect.DeepEqual(x, y)
}

// formatCounts renders counts as "Encounter 98, Patient 50", sorted by type.
func formatCounts(n map[string]int) string {
	if len(n) == 0 {
		return "(nothing)"
	}
	var parts []string
	for _, t := range slices.Sorted(maps.Keys(n)) {
		parts = append(parts, fmt.Sprintf("%s %d", t, n[t]))
	}
	return strings.Join(parts, ", ")
}
