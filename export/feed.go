package export

// The feed: deletions recorded from the store's change notifications
// (RecordChange), and, when a Cloud Storage run ends, its HL7 Bulk Data
// manifest and deleted file (writeFeed). A standard Bulk Data client that
// applies every manifest of a pipeline in transactionTime order (upsert the
// output, then remove the deleted) holds the store after one more run: a
// deletion is listed only when the store's history says the resource was
// gone at the run's transactionTime and unchanged since (collectDeletions).
//
// Tombstones live in the state bucket:
//
//	tombstones/{digest(store)[:24]}/{recordedAt}-{key}.json
//
// recordedAt is our clock when RecordChange began, fixed width and sortable;
// key is a digest of the resource name, its lastUpdatedTime and versionId, the
// same on every redelivery. A redelivery may record a second object with
// another recordedAt: writeFeed delivers each key once.
//
// A pipeline's deletionCursor says what it has been given: every tombstone
// recorded up to Through minus tombstoneMargin, plus the keys in Recent. A
// RecordChange takes recordedAt before it writes and runs at most 540 s, so a
// listing at time T sees every tombstone recorded before T−margin; the newer
// ones it sees are named in Recent so the next run, listing from T−margin,
// skips them.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"cloud.google.com/go/storage"
	"google.golang.org/api/googleapi"
	healthcare "google.golang.org/api/healthcare/v1"
	"google.golang.org/api/iterator"

	"github.com/fhirexport/fhirexport/events"
)

const (
	// TombstoneRetention is how long tombstones are kept. deploy.sh sets a
	// lifecycle rule on the state bucket deleting tombstones/ objects older
	// than this; a pipeline that has not delivered its deletions within it
	// gets ErrDeletionsExpired instead of silently missing some.
	TombstoneRetention = 35 * 24 * time.Hour
	// tombstoneMargin covers RecordChange writers still in flight (at most
	// 540 s) and small clock differences between instances.
	tombstoneMargin = 10 * time.Minute
	// recordedLayout names tombstones so that names sort by recordedAt.
	recordedLayout = "20060102T150405.000000000Z"
)

// ErrDeletionsExpired means a pipeline's deletion cursor is older than
// TombstoneRetention: deletions it was not given may have been pruned. The run
// must not be reported as a complete increment; the operator resets the
// pipeline's watermark, and the next run is a full export.
var ErrDeletionsExpired = errors.New("deletions older than the tombstone retention may have been pruned")

// tombstoneRecord is one deletion seen in a store's change notifications.
type tombstoneRecord struct {
	Store       string    `json:"store"`
	Type        string    `json:"type"`
	ID          string    `json:"id"`
	Deleted     time.Time `json:"deleted"`     // deletionTime: what the deleted file carries
	LastUpdated time.Time `json:"lastUpdated"` // the notification's lastUpdatedTime (whole seconds)
	VersionID   string    `json:"versionId,omitempty"`
	Recorded    time.Time `json:"recorded"`
	MessageID   string    `json:"messageId,omitempty"`
}

func tombstoneDir(store string) string { return "tombstones/" + digest("store", store)[:24] }

func tombstoneKey(n events.Notification) string {
	return digest("tombstone", n.Resource, n.LastUpdated.UTC().Format(time.RFC3339Nano), n.VersionID)[:16]
}

// deletionTime orders a deletion against upserts of the same resource under
// newest-wins. lastUpdatedTime has whole seconds (RFC 1123) while an upsert's
// meta.lastUpdated has microseconds, so the deletion happened somewhere in
// [s, s+1s). Pub/Sub's publishTime (milliseconds) follows the commit by the
// publish latency; clamped into that second it is the best estimate we have.
// The start of the second would resurrect a resource written earlier in the
// same second; its end would delete one re-created later in it. With the
// estimate, both are ordered right unless the two writes were closer together
// than the publish latency.
func deletionTime(n events.Notification) time.Time {
	start := n.LastUpdated.UTC().Truncate(time.Second)
	end := start.Add(time.Second - time.Microsecond)
	t := n.PublishTime.UTC().Truncate(time.Microsecond)
	switch {
	case t.Before(start):
		return start
	case t.After(end):
		return end
	}
	return t
}

// RecordChange handles one FHIR store change notification. A DeleteResource
// of an allowed store becomes a durable tombstone; every other action returns
// at once without any state I/O (a busy store sends one notification per
// write). A store not on the allow-list, and a deletion the API cannot have
// sent (notification.go), are logged and ignored. It returns an error only
// when Pub/Sub should redeliver (the state bucket failed).
func (x *Exporter) RecordChange(ctx context.Context, n events.Notification) error {
	if n.Action != events.ActionDelete {
		return nil
	}
	log := Logger(ctx).With("store", n.Store, "fhirType", n.ResourceType, "pubsubMessage", n.MessageID)
	if !x.policy.AllowStore(n.Store) {
		log.Warn("deletion notification from a store not on FHIREXPORT_ALLOWED_STORES; ignored")
		return nil
	}
	if err := checkNotification(n); err != nil {
		log.Warn("deletion notification the Healthcare API cannot have sent; acknowledged, not recorded", "error", err.Error())
		return nil
	}
	now := x.now().UTC()
	key := tombstoneKey(n)
	deleted, believed := tombstoneTime(n, now)
	if !believed {
		log.Warn("deletion notification's lastUpdatedTime is later than its publish time or our clock; the earlier of those is recorded as the deletion time",
			"lastUpdatedTime", n.LastUpdated.UTC().Format(time.RFC3339), "publishTime", n.PublishTime.UTC().Format(time.RFC3339Nano))
	}
	rec := tombstoneRecord{Store: n.Store, Type: n.ResourceType, ID: n.ID, Deleted: deleted, LastUpdated: n.LastUpdated.UTC(),
		VersionID: n.VersionID, Recorded: now, MessageID: n.MessageID}
	name := tombstoneDir(n.Store) + "/" + now.Format(recordedLayout) + "-" + key + ".json"
	// The metadata lets writeFeed deliver tombstones from a listing alone.
	meta := map[string]string{"type": rec.Type, "id": rec.ID, "deleted": rec.Deleted.Format(time.RFC3339Nano)}
	_, err := x.state.create(ctx, name, rec, meta)
	if errors.Is(err, ErrExists) {
		return nil // this very attempt was recorded already
	}
	if err != nil {
		return fmt.Errorf("record deletion in %s: %w", n.Store, err)
	}
	log.Info("deletion recorded", "tombstone", key)
	return nil
}

// tombstone is a listed tombstone.
type tombstone struct {
	key      string
	typ, id  string
	deleted  time.Time
	recorded time.Time
}

// tombstones lists store's tombstones recorded from `from` on, in recordedAt order.
func (x *Exporter) tombstones(ctx context.Context, store string, from time.Time) ([]tombstone, error) {
	dir := x.state.object(tombstoneDir(store)) + "/"
	q := &storage.Query{Prefix: dir}
	if !from.IsZero() {
		q.StartOffset = dir + from.UTC().Format(recordedLayout)
	}
	if err := q.SetAttrSelection([]string{"Name", "Metadata"}); err != nil {
		return nil, err
	}
	var out []tombstone
	it := x.state.bkt.Objects(ctx, q)
	for {
		a, err := it.Next()
		if errors.Is(err, iterator.Done) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("list tombstones gs://%s/%s: %w", x.state.bucket, dir, err)
		}
		rel := strings.TrimSuffix(strings.TrimPrefix(a.Name, dir), ".json")
		at, key, ok := strings.Cut(rel, "-")
		recorded, err := time.Parse(recordedLayout, at)
		if !ok || err != nil || key == "" {
			Logger(ctx).Warn("ignoring a misnamed tombstone", "object", a.Name)
			continue
		}
		t := tombstone{key: key, typ: a.Metadata["type"], id: a.Metadata["id"], recorded: recorded}
		t.deleted, err = time.Parse(time.RFC3339Nano, a.Metadata["deleted"])
		if err != nil || t.typ == "" || t.id == "" {
			// Metadata lost (a copy, a manual edit): read the record itself.
			var rec tombstoneRecord
			if _, err := x.state.read(ctx, tombstoneDir(store)+"/"+rel+".json", &rec); err != nil {
				if errors.Is(err, ErrNotFound) {
					continue // pruned meanwhile
				}
				return nil, err
			}
			t.typ, t.id, t.deleted = rec.Type, rec.ID, rec.Deleted
		}
		out = append(out, t)
	}
}

// feedResult is what writeFeed wrote, for the outcome event and the
// pipeline's watermark record.
type feedResult struct {
	Manifest    string          // gs:// URL of the manifest; "" when none was written
	ManifestURL string          // the manifest's URL for a Bulk Data client (Exporter.FileURL)
	Outputs     []events.Output // the export's files as gs:// URLs, sorted by type
	Deleted     *int64          // resources in the deleted file; nil unless an incremental run succeeded
	// Cursor is the pipeline's deletion cursor after this run, to be saved
	// with its watermark; nil: leave the stored cursor as it is.
	Cursor *deletionCursor
}

// bulkManifest is an HL7 FHIR Bulk Data manifest
// (https://hl7.org/fhir/uv/bulkdata/export.html#response---complete-status).
// Every url in output, deleted and error is one a Bulk Data client can GET
// (Exporter.FileURL: "The files SHALL be accessible to the client at the URLs
// advertised"). Everything of ours is under extension, the gs:// names of the
// same files included.
type bulkManifest struct {
	TransactionTime     string            `json:"transactionTime"`
	Request             string            `json:"request"`
	RequiresAccessToken bool              `json:"requiresAccessToken"`
	Output              []events.Output   `json:"output"`
	Deleted             []events.Output   `json:"deleted"`
	Error               []events.Output   `json:"error"`
	Extension           manifestExtension `json:"extension"`
}

type manifestExtension struct {
	Operation   string   `json:"operation"`
	Pipeline    string   `json:"pipeline"`
	Name        string   `json:"name,omitempty"`
	Store       string   `json:"store"`
	Types       []string `json:"types,omitempty"`
	Since       string   `json:"since,omitempty"`
	Incremental bool     `json:"incremental,omitempty"`
	Outcome     string   `json:"outcome"` // succeeded or partial
	// Snapshot says the run is a full snapshot of its types: no _since, and
	// succeeded. Its output is everything the store held of them at
	// transactionTime, so a consumer may replace what it holds of those
	// types with it (re-baseline) instead of applying it as an increment;
	// it is the way back after deletions the feed cannot see.
	Snapshot bool              `json:"snapshot"`
	Counters events.Counters   `json:"counters"`
	LogsURL  string            `json:"logsUrl,omitempty"`
	Trigger  events.TriggerRef `json:"trigger"`
	// Destination is a BigQuery run's dataset: its output is there, not in
	// this manifest's output list.
	Destination string `json:"destination,omitempty"`
	// Deletions is the pipeline's deletion cursor once this manifest is
	// delivered: a retry after a crash returns it instead of listing again.
	Deletions *deletionCursor `json:"deletions,omitempty"`
	// GCS lists the manifest's files again as gs:// URLs, for Google-native
	// tools (BigQuery loads, gcloud storage); the events carry these.
	// Absent from manifests written before the urls became fetchable, whose
	// urls are the gs:// ones.
	GCS *gcsFiles `json:"gcs,omitempty"`
}

// gcsFiles are a manifest's files as gs:// URLs.
type gcsFiles struct {
	Manifest string          `json:"manifest"`
	Output   []events.Output `json:"output"`
	Deleted  []events.Output `json:"deleted"`
	Error    []events.Output `json:"error"`
}

// CloudStorageURL is the URL a Bulk Data client GETs for a Cloud Storage
// object with a Google OAuth bearer token (requiresAccessToken: true):
// https://storage.googleapis.com/BUCKET/OBJECT, Cloud Storage's XML API, the
// object name path-escaped segment by segment.
func CloudStorageURL(bucket, object string) string {
	segs := strings.Split(object, "/")
	for i, s := range segs {
		segs[i] = url.PathEscape(s)
	}
	return "https://storage.googleapis.com/" + url.PathEscape(bucket) + "/" + strings.Join(segs, "/")
}

// EmulatorFileURL returns the FileURL for a Cloud Storage emulator at base
// (STORAGE_EMULATOR_HOST, with or without http://): the JSON API's media
// URL, BASE/storage/v1/b/BUCKET/o/OBJECT?alt=media, the object name escaped
// whole. fake-gcs-server serves it on any host; its /BUCKET/OBJECT form it
// serves only when the request's Host is its PublicHost.
func EmulatorFileURL(base string) func(bucket, object string) string {
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	base = strings.TrimRight(base, "/")
	return func(bucket, object string) string {
		return base + "/storage/v1/b/" + url.PathEscape(bucket) + "/o/" + url.PathEscape(object) + "?alt=media"
	}
}

// fileURL is the URL the manifest gives a Bulk Data client for an object.
func (x *Exporter) fileURL(bucket, object string) string {
	if x.FileURL != nil {
		return x.FileURL(bucket, object)
	}
	return CloudStorageURL(bucket, object)
}

// deletedBundle is one line of a deleted file: a FHIR transaction Bundle with
// one DELETE entry, shaped as the Bulk Data IG's example; the deletion time is
// in meta.lastUpdated, where the IG puts it.
type deletedBundle struct {
	ResourceType string        `json:"resourceType"`
	ID           string        `json:"id"`
	Meta         bundleMeta    `json:"meta"`
	Type         string        `json:"type"`
	Entry        []bundleEntry `json:"entry"`
}

type bundleMeta struct {
	LastUpdated string `json:"lastUpdated"`
}

type bundleEntry struct {
	Request bundleRequest `json:"request"`
}

type bundleRequest struct {
	Method string `json:"method"`
	URL    string `json:"url"`
}

// writeFeed writes the feed files of a finished run: for a Cloud Storage run
// that ended succeeded or partial (outcome is events.TypeSucceeded or
// events.TypePartial), {destination}/{operationId}.manifest.json listing the
// {operationId}_{Type} objects, and for a succeeded incremental run
// {operationId}.deleted.ndjson with the pipeline's undelivered tombstones
// (cursor is the stored one; nil, for a pipeline's first run, delivers every
// tombstone kept). A partial run also gets {operationId}.error.ndjson. Failed
// runs and BigQuery runs get nothing and keep their cursor (BigQuery users get
// no deletions yet).
//
// It is idempotent: the manifest is written last and only once, and a retry
// finding it returns what it says. Call it before saving the watermark and
// the returned Cursor together. ErrDeletionsExpired: report the run as not a
// complete increment and do not move the watermark.
func (x *Exporter) writeFeed(ctx context.Context, p pendingRecord, op *healthcare.Operation, meta *healthcare.OperationMetadata, outcome string, cursor *deletionCursor) (feedResult, error) {
	if outcome != events.TypeSucceeded && outcome != events.TypePartial {
		return feedResult{}, nil
	}
	feedDir := p.Destination
	if !strings.HasPrefix(feedDir, "gs://") {
		feedDir = p.Feed // a BigQuery run's deletedUriPrefix: its manifest lists no output
	}
	rest, ok := strings.CutPrefix(feedDir, "gs://")
	if !ok {
		return feedResult{}, nil
	}
	bucket, dir, _ := strings.Cut(rest, "/")
	if dir = strings.Trim(dir, "/"); dir != "" {
		dir += "/"
	}
	opID := op.Name[strings.LastIndex(op.Name, "/")+1:]
	base := dir + opID
	gsURL := func(name string) string { return "gs://" + bucket + "/" + name }
	// fetchable turns the gs:// form of a file list into the one for clients.
	fetchable := func(files []events.Output) []events.Output {
		out := make([]events.Output, len(files))
		for i, f := range files {
			f.URL = x.fileURL(bucket, strings.TrimPrefix(f.URL, "gs://"+bucket+"/"))
			out[i] = f
		}
		return out
	}
	bkt := x.state.client.Bucket(bucket)
	delivering := p.Incremental && outcome == events.TypeSucceeded
	res := feedResult{Manifest: gsURL(base + ".manifest.json"), ManifestURL: x.fileURL(bucket, base+".manifest.json")}

	if m, err := readManifest(ctx, bkt, base+".manifest.json"); err != nil {
		return feedResult{}, err
	} else if m != nil {
		return m.result(res, delivering), nil
	}

	if delivering && cursor != nil {
		oldest := cursor.Through.Add(-tombstoneMargin)
		if age := x.now().Sub(oldest); age >= TombstoneRetention {
			return feedResult{}, fmt.Errorf("pipeline %s: its deletions were last delivered through %s, %s ago; tombstones are kept %s: %w; reset its watermark so the next run is a full export",
				p.Pipeline, cursor.Through.UTC().Format(time.RFC3339), age.Truncate(time.Hour), TombstoneRetention, ErrDeletionsExpired)
		}
	}

	outputs, err := listOutputs(ctx, bkt, base+"_", gsURL)
	if err != nil {
		return feedResult{}, err
	}
	c := meta.Counter
	if c == nil {
		c = &healthcare.ProgressCounter{}
	}
	if len(outputs) == 1 && meta.Counter != nil && c.Pending == 0 {
		// The operation counts resources, not per type: with one file, its
		// success counter is that file's count, known without reading it.
		n := c.Success
		outputs[0].Count = &n
	}
	gcs := &gcsFiles{Manifest: res.Manifest, Output: outputs, Deleted: []events.Output{}, Error: []events.Output{}}
	m := bulkManifest{
		TransactionTime: normalizeTime(meta.CreateTime), Request: exportRequestURL(p), RequiresAccessToken: true,
		Extension: manifestExtension{Operation: op.Name, Pipeline: p.Pipeline, Name: p.Name, Store: p.Store, Types: p.Types,
			Since: p.Since, Incremental: p.Incremental, Outcome: strings.TrimPrefix(outcome, events.TypePrefix),
			Snapshot: p.Since == "" && outcome == events.TypeSucceeded && feedDir == p.Destination,
			Counters: events.Counters{Success: c.Success, Failure: c.Failure, Pending: c.Pending}, LogsURL: meta.LogsUrl, Trigger: p.Trigger,
			GCS: gcs},
	}
	if feedDir != p.Destination {
		m.Extension.Destination = p.Destination
	}

	if delivering {
		// A pipeline's first success (no cursor) is a full export, but
		// manifests of its earlier partial runs may hold resources deleted
		// since: it considers every tombstone still kept.
		given := cursor
		if given == nil {
			given = &deletionCursor{}
		}
		plan, err := x.planDeletions(ctx, p, op.Name, given, parseTime(meta.CreateTime))
		if err != nil {
			return feedResult{}, err
		}
		lines, next := plan.Lines, plan.Next
		if len(lines) > 0 {
			name := base + ".deleted.ndjson"
			err := writeObject(ctx, bkt, name, lines.ndjson(), "application/fhir+ndjson", storage.Conditions{DoesNotExist: true},
				map[string]string{deletedThroughKey: next.Through.Format(time.RFC3339Nano)})
			if errors.Is(err, ErrExists) {
				// An earlier attempt wrote it (it crashed before the
				// manifest, or runs concurrently after losing its lease):
				// its lines are what this run delivers, with its cursor, so
				// the manifest that wins always matches the file.
				// Written from this very plan, unless an older fhirexport
				// wrote it (no plan then): its lines win.
				var inFile deletedLines
				var fileNext *deletionCursor
				if inFile, fileNext, err = readDeleted(ctx, bkt, name, given); err == nil && !sameLines(inFile, lines) {
					lines, next = inFile, fileNext
				}
			}
			if err != nil {
				return feedResult{}, err
			}
			n := int64(len(lines))
			gcs.Deleted = []events.Output{{Type: "Bundle", URL: gsURL(name), Count: &n}}
		}
		m.Extension.Deletions = next
	}

	if outcome == events.TypePartial {
		name := base + ".error.ndjson"
		// Created once (the poller may create, not overwrite): a retry
		// would write the same lines.
		err := writeObject(ctx, bkt, name, errorOutcome(op.Name, c.Failure, meta.LogsUrl), "application/fhir+ndjson", storage.Conditions{DoesNotExist: true}, nil)
		if err != nil && !errors.Is(err, ErrExists) {
			return feedResult{}, err
		}
		gcs.Error = []events.Output{{Type: "OperationOutcome", URL: gsURL(name)}}
	}
	m.Output, m.Deleted, m.Error = fetchable(gcs.Output), fetchable(gcs.Deleted), fetchable(gcs.Error)

	data, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return feedResult{}, fmt.Errorf("encode manifest of %s: %w", op.Name, err)
	}
	switch err := writeObject(ctx, bkt, base+".manifest.json", data, "application/json", storage.Conditions{DoesNotExist: true}, nil); {
	case errors.Is(err, ErrExists):
		// A concurrent finalizer wrote it first: what it says is what was delivered.
		prev, err := readManifest(ctx, bkt, base+".manifest.json")
		if err != nil || prev == nil {
			return feedResult{}, fmt.Errorf("manifest of %s written concurrently but unreadable: %v: %w", op.Name, err, errTransient)
		}
		return prev.result(res, delivering), nil
	case err != nil:
		return feedResult{}, err
	}
	Logger(ctx).Info("feed written", "operation", op.Name, "manifest", res.Manifest, "outputs", len(outputs), "deleted", m.deletedCount())
	return m.result(res, delivering), nil
}

// result is the feedResult a manifest describes; r names the manifest.
func (m *bulkManifest) result(r feedResult, delivering bool) feedResult {
	r.Outputs = m.Output
	if m.Extension.GCS != nil {
		r.Outputs = m.Extension.GCS.Output
	}
	if delivering {
		n := m.deletedCount()
		r.Deleted, r.Cursor = &n, m.Extension.Deletions
	}
	return r
}

func (m *bulkManifest) deletedCount() int64 {
	var n int64
	for _, d := range m.Deleted {
		if d.Count != nil {
			n += *d.Count
		}
	}
	return n
}

// deletedLines are the lines of a deleted file.
type deletedLines []deletedBundle

func (l deletedLines) ndjson() []byte {
	var buf bytes.Buffer
	for _, b := range l {
		data, _ := json.Marshal(b) // plain strings: cannot fail
		buf.Write(data)
		buf.WriteByte('\n')
	}
	return buf.Bytes()
}

// deletionPlan is what a run's deleted file delivers and the pipeline's
// cursor after it. It is decided once per operation and kept in the state
// bucket (tombstones/plans/, pruned with the tombstones), so a retry after a
// crash delivers the same deletions even when the store changed meanwhile.
type deletionPlan struct {
	Lines deletedLines    `json:"lines"`
	Next  *deletionCursor `json:"next"`
}

// planDeletions returns the run's deletion plan: the one recorded for the
// operation, or a new one (collectDeletions), recorded before any file is
// written from it.
func (x *Exporter) planDeletions(ctx context.Context, p pendingRecord, op string, given *deletionCursor, at time.Time) (deletionPlan, error) {
	name := "tombstones/plans/" + digest("plan", op)[:32] + ".json"
	var plan deletionPlan
	_, err := x.state.read(ctx, name, &plan)
	switch {
	case err == nil && plan.Next != nil:
		return plan, nil
	case err == nil:
		return deletionPlan{}, fmt.Errorf("deletion plan %s: %w: it names no cursor", name, ErrCorrupt)
	case !errors.Is(err, ErrNotFound):
		return deletionPlan{}, err
	}
	lines, next, err := x.collectDeletions(ctx, p, given, at)
	if err != nil {
		return deletionPlan{}, err
	}
	plan = deletionPlan{Lines: lines, Next: next}
	if _, err := x.state.create(ctx, name, plan, map[string]string{"operation": op}); errors.Is(err, ErrExists) {
		// A concurrent or earlier attempt decided first: its plan holds.
		var first deletionPlan
		if _, err := x.state.read(ctx, name, &first); err != nil {
			return deletionPlan{}, err
		}
		return first, nil
	} else if err != nil {
		return deletionPlan{}, err
	}
	return plan, nil
}

// collectDeletions decides the tombstones of p's store and types not yet
// given to the pipeline (and the ones it deferred) for a run whose
// transactionTime is at. A Bulk Data client applies a manifest by upserting
// its output and then removing its deleted entries, so per resource the
// store's history (what it held at `at`, and whether it changed since) says:
//
//   - deleted at `at` and unchanged since: list it, once for all its
//     tombstones. The output cannot hold it (deleted throughout the export)
//     and no consumer holds a newer version;
//   - live at `at` and unchanged since: the deletions are superseded (it was
//     re-created, and this or an earlier manifest carries the new version):
//     drop them, never list them;
//   - changed after `at` (deleted or re-created while the export ran): the
//     output may hold any version of that time, so defer its tombstones to the
//     next run, which decides them on its own transactionTime.
//
// It returns the lines and the cursor once they are delivered.
func (x *Exporter) collectDeletions(ctx context.Context, p pendingRecord, cursor *deletionCursor, at time.Time) (deletedLines, *deletionCursor, error) {
	now := x.now().UTC() // before listing: everything recorded before now−margin is visible to it
	var from time.Time   // zero: every tombstone kept
	if !cursor.Through.IsZero() {
		from = cursor.Through.Add(-tombstoneMargin)
	}
	ts, err := x.tombstones(ctx, p.Store, from)
	if err != nil {
		return nil, nil, err
	}
	next := &deletionCursor{Through: now}
	if cursor.Through.After(now) {
		next.Through = cursor.Through // never move back (a clock step)
	}
	given := map[string]bool{}
	pending := map[string][]tombstone{} // Type/id → its undecided tombstones
	for _, d := range cursor.Deferred { // given, and maybe in Recent too, but not decided
		if !given[d.Key] {
			given[d.Key] = true
			pending[d.Type+"/"+d.ID] = append(pending[d.Type+"/"+d.ID], tombstone{key: d.Key, typ: d.Type, id: d.ID, deleted: d.Deleted})
		}
	}
	for _, k := range cursor.Recent {
		given[k] = true
	}
	recent := map[string]bool{}
	for _, t := range ts {
		if len(p.Types) > 0 && !slices.Contains(p.Types, t.typ) {
			continue
		}
		if !given[t.key] {
			given[t.key] = true
			pending[t.typ+"/"+t.id] = append(pending[t.typ+"/"+t.id], t)
		}
		if t.recorded.After(next.Through.Add(-tombstoneMargin)) {
			recent[t.key] = true
		}
	}
	for k := range recent {
		next.Recent = append(next.Recent, k)
	}
	slices.Sort(next.Recent)

	// One history read per resource, PollWorkers at a time: a run may have
	// many deletions to decide within the poller's 540 s.
	keys := slices.Sorted(maps.Keys(pending))
	type verdict struct {
		held
		when time.Time
		err  error
	}
	verdicts := make([]verdict, len(keys))
	sem := make(chan struct{}, max(1, x.PollWorkers))
	var wg sync.WaitGroup
	for i, res := range keys {
		group := pending[res]
		slices.SortFunc(group, func(a, b tombstone) int {
			if c := a.deleted.Compare(b.deleted); c != 0 {
				return c
			}
			return strings.Compare(a.key, b.key)
		})
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			v := &verdicts[i]
			v.held, v.when, v.err = x.heldAt(ctx, p.Store, group[0].typ, group[0].id, at)
		}()
	}
	wg.Wait()
	var lines deletedLines
	for i, res := range keys {
		group, v := pending[res], verdicts[i]
		if v.err != nil {
			return nil, nil, v.err
		}
		switch v.held {
		case heldDeleted:
			// The newest tombstone names the line; its time is the store's
			// own for the deletion that holds at `at` (a later deletion's
			// notification may not have arrived yet), else the tombstone's.
			last, when := group[len(group)-1], v.when
			if when.IsZero() {
				when = last.deleted
			}
			lines = append(lines, deletedBundle{ResourceType: "Bundle", ID: last.key, Type: "transaction",
				Meta:  bundleMeta{LastUpdated: when.UTC().Format(time.RFC3339Nano)},
				Entry: []bundleEntry{{Request: bundleRequest{Method: "DELETE", URL: res}}}})
		case changedSince:
			for _, t := range group {
				next.Deferred = append(next.Deferred, deferredDeletion{Key: t.key, Type: t.typ, ID: t.id, Deleted: t.deleted.UTC()})
			}
		}
	}
	slices.SortFunc(lines, func(a, b deletedBundle) int {
		if c := strings.Compare(a.Meta.LastUpdated, b.Meta.LastUpdated); c != 0 {
			return c
		}
		return strings.Compare(a.Entry[0].Request.URL, b.Entry[0].Request.URL)
	})
	return lines, next, nil
}

// held is what a store held of a resource at a run's transactionTime.
type held int

const (
	heldDeleted  held = iota // absent at the time (deleted, or never there), and unchanged since
	heldLive                 // present at the time, and unchanged since
	changedSince             // written or deleted after the time
)

// heldAt reads typ/id's history (fhir.history, newest version first, deleted
// versions included) and says what the store held at `at`, with the time of
// the deletion it held (zero when the resource has no history). Versions'
// lastModified and an export's createTime are both the Healthcare API's
// clock; notification times are not, and are not used here. A resource
// without history (404, 410) is absent. A refusal (403, or another 4xx)
// defers the decision and is logged: a deletion is never listed or dropped
// without evidence.
func (x *Exporter) heldAt(ctx context.Context, store, typ, id string, at time.Time) (held, time.Time, error) {
	if at.IsZero() {
		return changedSince, time.Time{}, nil // no transactionTime: nothing can be decided
	}
	name := store + "/fhir/" + typ + "/" + id
	resp, err := x.hc.Projects.Locations.Datasets.FhirStores.Fhir.History(name).Count(10).Context(ctx).Do()
	if err != nil {
		return 0, time.Time{}, fmt.Errorf("history of %s: %w: %w", name, err, errTransient)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return 0, time.Time{}, fmt.Errorf("history of %s: %w: %w", name, err, errTransient)
	}
	switch c := resp.StatusCode; {
	case c == http.StatusNotFound || c == http.StatusGone:
		return heldDeleted, time.Time{}, nil
	case c == http.StatusTooManyRequests || c >= 500:
		return 0, time.Time{}, fmt.Errorf("history of %s: HTTP %d: %s: %w", name, c, bytes.TrimSpace(body), errTransient)
	case c != http.StatusOK:
		Logger(ctx).Warn("the store's history could not be read; its deletion is held back until it can (the poller needs healthcare.fhirResources.get)",
			"resource", name, "status", c)
		return changedSince, time.Time{}, nil
	}
	var b struct {
		Entry []struct {
			Resource *struct {
				Meta struct {
					LastUpdated string `json:"lastUpdated"`
				} `json:"meta"`
			} `json:"resource"`
			Request struct {
				Method string `json:"method"`
			} `json:"request"`
			Response struct {
				LastModified string `json:"lastModified"`
			} `json:"response"`
		} `json:"entry"`
	}
	if err := json.Unmarshal(body, &b); err != nil {
		return 0, time.Time{}, fmt.Errorf("history of %s: %v: %w", name, err, errTransient)
	}
	found, deleted := false, false
	var newest time.Time
	for _, e := range b.Entry {
		v := e.Response.LastModified
		if v == "" && e.Resource != nil {
			v = e.Resource.Meta.LastUpdated
		}
		t, err := time.Parse(time.RFC3339Nano, v)
		if err != nil {
			return 0, time.Time{}, fmt.Errorf("history of %s: a version without a time (%q): %w", name, v, errTransient)
		}
		if t.After(at) {
			return changedSince, time.Time{}, nil
		}
		if !found || t.After(newest) {
			found, newest, deleted = true, t, e.Resource == nil || e.Request.Method == http.MethodDelete
		}
	}
	if !found {
		return heldDeleted, time.Time{}, nil
	}
	if deleted {
		return heldDeleted, newest, nil
	}
	return heldLive, time.Time{}, nil
}

// sameLines reports whether two deleted files list the same lines.
func sameLines(a, b deletedLines) bool {
	return slices.EqualFunc(a, b, func(x, y deletedBundle) bool {
		return x.ID == y.ID && x.Entry[0].Request.URL == y.Entry[0].Request.URL
	})
}

// parseTime parses an RFC 3339 time; zero when it is not one.
func parseTime(v string) time.Time {
	t, _ := time.Parse(time.RFC3339Nano, v)
	return t
}

// deletedThroughKey is the deleted file's metadata naming its cursor's
// Through: with the keys of its lines, the cursor of what it delivers.
const deletedThroughKey = "fhirexport-deletions-through"

// readDeleted reads a deleted file an earlier attempt wrote and the cursor
// it delivers: its Through, and as recent keys every key given before and
// every key in it (more than collectDeletions keeps, all of them delivered,
// so none is given twice and none skipped). A file fhirexport cannot have
// written (no cursor, a line that is not a deletion) is ErrCorrupt.
func readDeleted(ctx context.Context, bkt *storage.BucketHandle, name string, given *deletionCursor) (deletedLines, *deletionCursor, error) {
	o := bkt.Object(name)
	attrs, err := o.Attrs(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("read deleted file %s: %w", name, err)
	}
	through, terr := time.Parse(time.RFC3339Nano, attrs.Metadata[deletedThroughKey])
	r, err := o.If(storage.Conditions{GenerationMatch: attrs.Generation}).NewReader(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("read deleted file %s: %w", name, err)
	}
	defer r.Close()
	var lines deletedLines
	sc := bufio.NewScanner(r)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var b deletedBundle
		if err := json.Unmarshal(sc.Bytes(), &b); err != nil || len(b.Entry) != 1 {
			return nil, nil, fmt.Errorf("deleted file gs://%s/%s: %w: a line is not a deletion Bundle (%v)", bkt.BucketName(), name, ErrCorrupt, err)
		}
		lines = append(lines, b)
	}
	if err := sc.Err(); err != nil {
		return nil, nil, fmt.Errorf("read deleted file %s: %w", name, err)
	}
	if terr != nil {
		return nil, nil, fmt.Errorf("deleted file gs://%s/%s: %w: its metadata %s is not a time", bkt.BucketName(), name, ErrCorrupt, deletedThroughKey)
	}
	next := &deletionCursor{Through: through.UTC()}
	recent := map[string]bool{}
	for _, k := range given.Recent {
		recent[k] = true
	}
	for _, b := range lines {
		recent[b.ID] = true
	}
	for k := range recent {
		next.Recent = append(next.Recent, k)
	}
	slices.Sort(next.Recent)
	return lines, next, nil
}

// listOutputs lists the objects the export wrote, {prefix}{Type}, sorted by type.
func listOutputs(ctx context.Context, bkt *storage.BucketHandle, prefix string, gsURL func(string) string) ([]events.Output, error) {
	q := &storage.Query{Prefix: prefix}
	if err := q.SetAttrSelection([]string{"Name"}); err != nil {
		return nil, err
	}
	out := []events.Output{}
	it := bkt.Objects(ctx, q)
	for {
		a, err := it.Next()
		if errors.Is(err, iterator.Done) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("list export output %s: %w", gsURL(prefix), err)
		}
		typ := strings.TrimPrefix(a.Name, prefix)
		if typ == "" || strings.Contains(typ, "/") {
			continue
		}
		out = append(out, events.Output{Type: typ, URL: gsURL(a.Name)})
	}
	slices.SortFunc(out, func(a, b events.Output) int {
		if c := strings.Compare(a.Type, b.Type); c != 0 {
			return c
		}
		return strings.Compare(a.URL, b.URL)
	})
	return out, nil
}

// exportRequestURL is the manifest's request: the IG wants the kick-off URL,
// and for a POST "this URL will not include the request parameters". Ours is
// the fhirStores.export call, a POST; its _type and _since are in extension.
func exportRequestURL(p pendingRecord) string {
	return "https://healthcare.googleapis.com/v1/" + p.Store + ":export"
}

// errorOutcome is the error file of a partial run: one OperationOutcome. The
// export's per-resource errors are in Cloud Logging, not in Cloud Storage.
func errorOutcome(op string, failures int64, logsURL string) []byte {
	diag := fmt.Sprintf("%d resources failed to export in operation %s", failures, op)
	if logsURL != "" {
		diag += "; their errors are in Cloud Logging: " + logsURL
	}
	oo := map[string]any{"resourceType": "OperationOutcome", "issue": []map[string]any{{
		"severity": "error", "code": "incomplete", "diagnostics": diag,
	}}}
	data, _ := json.Marshal(oo)
	return append(data, '\n')
}

// readManifest returns the manifest at name, or nil when there is none.
func readManifest(ctx context.Context, bkt *storage.BucketHandle, name string) (*bulkManifest, error) {
	r, err := bkt.Object(name).NewReader(ctx)
	if errors.Is(err, storage.ErrObjectNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read manifest %s: %w", name, err)
	}
	defer r.Close()
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("read manifest %s: %w", name, err)
	}
	var m bulkManifest
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("manifest gs://%s/%s: %w: %v", bkt.BucketName(), name, ErrCorrupt, err)
	}
	return &m, nil
}

// writeObject writes one feed file to a destination bucket. Like State.write
// it buffers the data so the client can retry, and uses the library's general
// retry test.
func writeObject(ctx context.Context, bkt *storage.BucketHandle, name string, data []byte, contentType string, cond storage.Conditions, metadata map[string]string) error {
	o := bkt.Object(name)
	if cond != (storage.Conditions{}) {
		o = o.If(cond)
	}
	w := o.Retryer(storage.WithErrorFunc(storage.ShouldRetry)).NewWriter(ctx)
	w.ChunkSize = len(data) + 1
	w.ContentType = contentType
	w.Metadata = metadata
	_, err := w.Write(data)
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	var ge *googleapi.Error
	if errors.As(err, &ge) && ge.Code == 412 && cond.DoesNotExist {
		return fmt.Errorf("write %s: %w", name, ErrExists)
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	return nil
}
