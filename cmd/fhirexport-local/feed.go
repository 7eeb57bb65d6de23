package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"slices"
	"strings"
	"time"

	"cloud.google.com/go/storage"

	"github.com/fhirexport/fhirexport/events"
	"github.com/fhirexport/fhirexport/healthcaretest"
	"github.com/fhirexport/fhirexport/healthcaretest/bulkdatatest"
)

// manifest is the part of a run's Bulk Data manifest the demonstration
// checks (export/feed.go writes it).
type manifest struct {
	TransactionTime     string          `json:"transactionTime"`
	Request             string          `json:"request"`
	RequiresAccessToken bool            `json:"requiresAccessToken"`
	Output              []events.Output `json:"output"`
	Deleted             []events.Output `json:"deleted"`
	Error               []events.Output `json:"error"`
	Extension           struct {
		// GCS names the same files as gs:// URLs.
		GCS struct {
			Output  []events.Output `json:"output"`
			Deleted []events.Output `json:"deleted"`
		} `json:"gcs"`
	} `json:"extension"`
}

// deletedLine is one line of a deleted file: a transaction Bundle with one
// DELETE entry.
type deletedLine struct {
	ResourceType string `json:"resourceType"`
	Type         string `json:"type"`
	Meta         struct {
		LastUpdated string `json:"lastUpdated"`
	} `json:"meta"`
	Entry []struct {
		Request struct {
			Method string `json:"method"`
			URL    string `json:"url"`
		} `json:"request"`
	} `json:"entry"`
}

// feedCheck is what verifyFeed found.
type feedCheck struct {
	manifest string          // gs:// URL
	m        manifest        // its content
	deleted  map[string]bool // Type/id → in the deleted file
	lines    map[string]string
}

// verifyFeed checks the feed of a succeeded Cloud Storage run: the event
// names {destination}/{operationId}.manifest.json, the manifest lists exactly
// the NDJSON objects found (files), and the event's outputs are the
// manifest's. wantDeleted is the Type/id the run's deleted file must list
// (empty: none); nil means the run delivers no deletions (not incremental):
// the event then carries no deleted count.
func (st *stack) verifyFeed(ctx context.Context, ev received, files []ndjsonFile, wantDeleted map[string]bool) (feedCheck, error) {
	d := ev.Data
	want := strings.TrimSuffix(d.Destination, "/") + "/" + short(d.Operation) + ".manifest.json"
	if d.Manifest != want {
		return feedCheck{}, fmt.Errorf("the %s event names manifest %q, want %q", ev.Type, d.Manifest, want)
	}
	fc := feedCheck{manifest: d.Manifest, deleted: map[string]bool{}, lines: map[string]string{}}
	data, err := st.readGCS(ctx, d.Manifest)
	if err != nil {
		return fc, fmt.Errorf("the manifest the event names: %w", err)
	}
	if err := json.Unmarshal(data, &fc.m); err != nil {
		return fc, fmt.Errorf("manifest %s is not JSON: %v", d.Manifest, err)
	}
	// As a Bulk Data client reads it: the IG's Complete Status rules, every
	// file fetched at its url.
	if errs := bulkdatatest.Check(ctx, nil, data); len(errs) > 0 {
		return fc, fmt.Errorf("manifest %s breaks the Bulk Data IG: %w", d.Manifest, errors.Join(errs...))
	}
	m := fc.m
	if m.TransactionTime == "" || !m.RequiresAccessToken {
		return fc, fmt.Errorf("manifest %s: transactionTime %q, requiresAccessToken %v; want a time and true", d.Manifest, m.TransactionTime, m.RequiresAccessToken)
	}
	got := map[string]string{}
	for _, o := range m.Extension.GCS.Output {
		got[o.Type] = o.URL
	}
	wantOut := map[string]string{}
	for _, f := range files {
		wantOut[f.typ] = strings.TrimSuffix(d.Destination, "/") + "/" + short(d.Operation) + "_" + f.typ
	}
	if len(m.Output) != len(got) || len(m.Extension.GCS.Output) != len(got) || !maps.Equal(got, wantOut) {
		return fc, fmt.Errorf("manifest %s lists outputs %v (%v), but the export wrote %v", d.Manifest, m.Output, m.Extension.GCS.Output, slices.Sorted(maps.Values(wantOut)))
	}
	if !outputsEqual(d.Outputs, m.Extension.GCS.Output) {
		return fc, fmt.Errorf("the %s event lists outputs %v, its manifest %v", ev.Type, d.Outputs, m.Extension.GCS.Output)
	}
	// A Bulk Data client fetches the manifest's urls: each serves its file.
	for i, o := range m.Output {
		web, err := fetchFHIR(ctx, o.URL)
		if err != nil {
			return fc, fmt.Errorf("manifest %s: %w", d.Manifest, err)
		}
		file, err := st.readGCS(ctx, m.Extension.GCS.Output[i].URL)
		if err != nil {
			return fc, err
		}
		if o.Type != m.Extension.GCS.Output[i].Type || !bytes.Equal(web, file) {
			return fc, fmt.Errorf("manifest %s: %s does not serve %s", d.Manifest, o.URL, m.Extension.GCS.Output[i].URL)
		}
	}

	if wantDeleted == nil {
		if d.Deleted != nil || len(m.Deleted) > 0 {
			return fc, fmt.Errorf("a run that is not incremental delivered deletions: event deleted=%v, manifest deleted %v", d.Deleted, m.Deleted)
		}
		return fc, nil
	}
	if d.Deleted == nil {
		return fc, fmt.Errorf("the %s event of an incremental run carries no deleted count", ev.Type)
	}
	if len(wantDeleted) == 0 {
		if *d.Deleted != 0 || len(m.Deleted) > 0 {
			return fc, fmt.Errorf("no deletion was due, but the event says deleted=%d and the manifest lists %v", *d.Deleted, m.Deleted)
		}
		return fc, nil
	}
	wantFile := strings.TrimSuffix(d.Destination, "/") + "/" + short(d.Operation) + ".deleted.ndjson"
	if len(m.Deleted) != 1 || m.Deleted[0].Type != "Bundle" || len(m.Extension.GCS.Deleted) != 1 || m.Extension.GCS.Deleted[0].URL != wantFile {
		return fc, fmt.Errorf("manifest %s lists deleted %v (%v), want one Bundle file %s", d.Manifest, m.Deleted, m.Extension.GCS.Deleted, wantFile)
	}
	data, err = fetchFHIR(ctx, m.Deleted[0].URL)
	if err != nil {
		return fc, fmt.Errorf("the deleted file the manifest lists: %w", err)
	}
	n := 0
	for l := range bytes.Lines(data) {
		l = bytes.TrimSpace(l)
		if len(l) == 0 {
			continue
		}
		n++
		var b deletedLine
		if err := json.Unmarshal(l, &b); err != nil || b.ResourceType != "Bundle" || b.Type != "transaction" ||
			len(b.Entry) != 1 || b.Entry[0].Request.Method != "DELETE" || b.Meta.LastUpdated == "" {
			return fc, fmt.Errorf("%s: line %d is not a transaction Bundle with one DELETE entry and meta.lastUpdated: %s", wantFile, n, l)
		}
		key := b.Entry[0].Request.URL
		if fc.deleted[key] {
			return fc, fmt.Errorf("%s: %s is deleted twice", wantFile, key)
		}
		fc.deleted[key], fc.lines[key] = true, string(l)
	}
	if c := m.Deleted[0].Count; c == nil || *c != int64(n) || *d.Deleted != int64(n) {
		return fc, fmt.Errorf("%s holds %d lines, but the manifest counts %v and the event %d", wantFile, n, m.Deleted[0].Count, *d.Deleted)
	}
	if !maps.Equal(fc.deleted, wantDeleted) {
		return fc, fmt.Errorf("%s deletes %v, want exactly the deleted resources %v", wantFile,
			slices.Sorted(maps.Keys(fc.deleted)), slices.Sorted(maps.Keys(wantDeleted)))
	}
	return fc, nil
}

func outputsEqual(a, b []events.Output) bool {
	return slices.EqualFunc(a, b, func(x, y events.Output) bool { return x.Type == y.Type && x.URL == y.URL })
}

// fetchFHIR GETs a manifest's url as a Bulk Data client does; it must be
// served as application/fhir+ndjson.
func fetchFHIR(ctx context.Context, url string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", url, err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", url, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "application/fhir+ndjson" {
		return nil, fmt.Errorf("GET %s: %s, Content-Type %q; want 200 and application/fhir+ndjson", url, resp.Status, resp.Header.Get("Content-Type"))
	}
	return data, nil
}

// readGCS reads a gs:// object through the Cloud Storage emulator.
func (st *stack) readGCS(ctx context.Context, url string) ([]byte, error) {
	bucket, name, ok := strings.Cut(strings.TrimPrefix(url, "gs://"), "/")
	if !ok || !strings.HasPrefix(url, "gs://") {
		return nil, fmt.Errorf("%q is not a gs:// object URL", url)
	}
	r, err := st.storage.Bucket(bucket).Object(name).NewReader(ctx)
	if errors.Is(err, storage.ErrObjectNotExist) {
		return nil, fmt.Errorf("%s does not exist", url)
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", url, err)
	}
	defer r.Close()
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", url, err)
	}
	return data, nil
}

// printFeed shows a run's manifest and its entries.
func (st *stack) printFeed(fc feedCheck) {
	c := st.con
	c.Printf("  manifest %s (transactionTime %s)\n", fc.manifest, fc.m.TransactionTime)
	for _, o := range fc.m.Output {
		c.Printf("    output  %-12s %s\n", o.Type, o.URL)
	}
	for _, o := range fc.m.Deleted {
		n := int64(-1)
		if o.Count != nil {
			n = *o.Count
		}
		c.Printf("    deleted %-12s %s (%d resources)\n", o.Type, o.URL, n)
	}
}

// erasure is a patient's deletion with everything that references it.
type erasure struct {
	patient string          // Patient/id
	keys    map[string]bool // Type/id of every deleted resource, the Patient's included
	order   []string        // in deletion order
}

// erase deletes a patient and, first, every resource referencing it (or
// referencing one of those: observations reference their encounter) through
// the FHIR REST API, as an application honouring an erasure request would: the
// store enforces referential integrity, so a Patient still referenced cannot be
// deleted. It picks the last patient not in changed (the incremental export
// must still hold every other change), or the last patient.
func (st *stack) erase(ctx context.Context, changed map[string]json.RawMessage) (erasure, error) {
	refs := map[string][]string{} // Type/id → what it references
	var patients []string
	for _, r := range st.emu.Resources(storeName) {
		typ, id := resourceKey(r)
		key := typ + "/" + id
		var v any
		json.Unmarshal(r, &v)
		refs[key] = references(v, nil)
		if typ == "Patient" {
			patients = append(patients, key)
		}
	}
	if len(patients) == 0 {
		return erasure{}, errors.New("the store holds no Patient")
	}
	e := erasure{patient: patients[len(patients)-1], keys: map[string]bool{}}
	for _, p := range slices.Backward(patients) {
		if _, ok := changed[p]; !ok {
			e.patient = p
			break
		}
	}
	// Everything that references the patient, directly or through another.
	e.keys[e.patient] = true
	for grew := true; grew; {
		grew = false
		for k, to := range refs {
			if e.keys[k] {
				continue
			}
			for _, t := range to {
				if e.keys[t] {
					e.keys[k], grew = true, true
					break
				}
			}
		}
	}
	// Delete a resource once nothing left in the set references it.
	left := maps.Clone(e.keys)
	for len(left) > 0 {
		var free []string
		for k := range left {
			referenced := false
			for other := range left {
				if other != k && slices.Contains(refs[other], k) {
					referenced = true
					break
				}
			}
			if !referenced {
				free = append(free, k)
			}
		}
		if len(free) == 0 {
			return e, fmt.Errorf("the resources referencing %s reference each other in a cycle: %v", e.patient, slices.Sorted(maps.Keys(left)))
		}
		slices.Sort(free)
		for _, k := range free {
			if err := st.deleteREST(ctx, k); err != nil {
				return e, err
			}
			e.order = append(e.order, k)
			delete(left, k)
		}
	}
	return e, nil
}

// references returns the relative references (Type/id) in a resource.
func references(v any, out []string) []string {
	switch x := v.(type) {
	case map[string]any:
		if r, ok := x["reference"].(string); ok && strings.Count(r, "/") == 1 {
			out = append(out, r)
		}
		for _, y := range x {
			out = references(y, out)
		}
	case []any:
		for _, y := range x {
			out = references(y, out)
		}
	}
	return out
}

// deleteREST deletes one resource with the FHIR delete interaction of the
// real Healthcare client; the emulator answers once its change notification
// is published.
func (st *stack) deleteREST(ctx context.Context, key string) error {
	resp, err := st.hc.Projects.Locations.Datasets.FhirStores.Fhir.Delete(storeName + "/fhir/" + key).Context(ctx).Do()
	if err != nil {
		return fmt.Errorf("fhir.delete %s: %w", key, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("fhir.delete %s: HTTP %d: %s", key, resp.StatusCode, bytes.TrimSpace(body))
	}
	return nil
}

// awaitTombstones waits until RecordChange has acknowledged the
// DeleteResource notification of every resource in keys: each one's
// tombstone is then recorded and an incremental export started after it
// delivers it.
func (st *stack) awaitTombstones(ctx context.Context, keys map[string]bool) (int, error) {
	ids := map[string]string{} // Type/id → message ID
	for _, n := range st.emu.Notifications() {
		key, ok := strings.CutPrefix(string(n.Data), storeName+"/fhir/")
		if n.Attributes["action"] != healthcaretest.ActionDelete || !ok || !keys[key] {
			continue
		}
		if n.Err != nil {
			return 0, fmt.Errorf("the DeleteResource notification of %s was not published on %s: %v", key, short(n.Topic), n.Err)
		}
		if n.Topic != changesTopic {
			return 0, fmt.Errorf("the DeleteResource notification of %s went to %s, want %s", key, n.Topic, changesTopic)
		}
		ids[key] = n.MessageID
	}
	if len(ids) != len(keys) {
		var missing []string
		for k := range keys {
			if ids[k] == "" {
				missing = append(missing, k)
			}
		}
		slices.Sort(missing)
		return 0, fmt.Errorf("no DeleteResource notification was published for %v; are the store's notificationConfigs set?", missing)
	}
	timeout := 10*time.Second + 10*st.o.tick
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for _, key := range slices.Sorted(maps.Keys(ids)) {
		id := ids[key]
		for {
			acked, gaveUp, changed := st.events.delivery(id)
			if acked {
				break
			}
			if gaveUp != "" {
				return 0, fmt.Errorf("RecordChange did not accept the DeleteResource notification of %s (message %s): %s", key, id, gaveUp)
			}
			select {
			case <-ctx.Done():
				return 0, ctx.Err()
			case <-deadline.C:
				return 0, fmt.Errorf("RecordChange did not acknowledge the DeleteResource notification of %s (message %s) within %s; see %s", key, id, timeout, st.o.logs)
			case <-changed:
			}
		}
	}
	return len(ids), nil
}
