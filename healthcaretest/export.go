package healthcaretest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"cloud.google.com/go/storage"
	"google.golang.org/api/googleapi"
)

// Outcome forces how an export operation ends.
type Outcome struct {
	// ErrorCode, when non-zero, makes the operation end done with error
	// {code: ErrorCode, message: ErrorMessage} and nothing written.
	ErrorCode    int32
	ErrorMessage string
	// FailureCount makes the operation end without error but with
	// counter.failure = FailureCount: that many resources (the last ones of
	// the snapshot) are not written.
	FailureCount int64
}

type exportRequest struct {
	Since          string `json:"_since"`
	Type           string `json:"_type"`
	GcsDestination *struct {
		URIPrefix string `json:"uriPrefix"`
	} `json:"gcsDestination"`
	BigqueryDestination *struct {
		DatasetURI       string `json:"datasetUri"`
		Force            bool   `json:"force"`
		WriteDisposition string `json:"writeDisposition"`
		SchemaConfig     *struct {
			SchemaType                 string `json:"schemaType"`
			RecursiveStructureDepth    string `json:"recursiveStructureDepth"`
			LastUpdatedPartitionConfig *struct {
				Type         string `json:"type"`
				ExpirationMs string `json:"expirationMs"`
			} `json:"lastUpdatedPartitionConfig"`
		} `json:"schemaConfig"`
	} `json:"bigqueryDestination"`
}

type snapRes struct {
	typ  string
	data []byte
}

type exportJob struct {
	snapshot  []snapRes
	total     int64
	duration  time.Duration
	steps     int
	outcome   *Outcome
	bucket    string // GCS destination
	objPrefix string
	bqURI     string // BigQuery destination
	bqMode    string // WRITE_EMPTY, WRITE_TRUNCATE, WRITE_APPEND or FORCE
	finishing chan struct{}
	endAt     time.Time
}

// progress returns success and pending while running: whole steps of the
// duration elapsed on the clock.
func (j *exportJob) progress(created, now time.Time) (success, pending int64) {
	step := int64(0)
	if elapsed := now.Sub(created); j.duration > 0 && elapsed > 0 {
		step = int64(elapsed) * int64(j.steps) / int64(j.duration)
	}
	step = min(step, int64(j.steps)-1)
	if step < 0 {
		step = 0
	}
	success = j.total * step / int64(j.steps)
	return success, j.total - success
}

// settle completes the exports among ops whose time is up (or that were
// cancelled): the first observer writes the output and finalizes the
// operation; every observer waits until it is done. Called without e.mu.
func (e *Emulator) settle(ops []*operation) {
	e.mu.Lock()
	now := e.now()
	var waits []chan struct{}
	for _, op := range ops {
		j := op.export
		if op.done || j == nil {
			continue
		}
		if !op.cancelRequested && now.Before(op.createTime.Add(j.duration)) {
			continue
		}
		if j.finishing == nil {
			j.finishing = make(chan struct{})
			j.endAt = e.stamp()
			e.wg.Add(1)
			go e.finish(op)
		}
		waits = append(waits, j.finishing)
	}
	e.mu.Unlock()
	for _, w := range waits {
		<-w
	}
}

// finish writes an export's output and completes the operation.
func (e *Emulator) finish(op *operation) {
	defer e.wg.Done()
	j := op.export
	e.mu.Lock()
	cancelled, outcome := op.cancelRequested, j.outcome
	e.mu.Unlock()

	var werr *apiError
	written := j.snapshot
	var failure int64
	if outcome != nil {
		failure = min(outcome.FailureCount, j.total)
		written = written[:j.total-failure]
	}
	switch {
	case cancelled:
	case outcome != nil && outcome.ErrorCode != 0:
	case j.bucket != "":
		werr = e.writeGCS(op, written)
	}

	e.mu.Lock()
	defer e.mu.Unlock()
	defer close(j.finishing)
	op.done, op.endTime = true, j.endAt
	switch {
	case op.cancelRequested:
		op.errCode, op.errMsg = codeCancelled, "Operation was cancelled."
		op.success, _ = j.progress(op.createTime, j.endAt)
	case outcome != nil && outcome.ErrorCode != 0:
		op.errCode, op.errMsg = outcome.ErrorCode, outcome.ErrorMessage
		op.failure = j.total
	case werr != nil:
		op.errCode, op.errMsg = werr.code, werr.message
		op.failure = j.total
	case j.bqURI != "":
		if aerr := e.writeBigQuery(j, written); aerr != nil {
			op.errCode, op.errMsg = aerr.code, aerr.message
			op.failure = j.total
			break
		}
		fallthrough
	default:
		op.success, op.failure = j.total-failure, failure
		op.response = map[string]any{"@type": "type.googleapis.com/google.cloud.healthcare.v1.fhir.rest.ExportResourcesResponse"}
	}
	j.snapshot = nil
	if op.errCode != 0 {
		e.logf("healthcaretest: operation %s failed: %d %s", op.name, op.errCode, op.errMsg)
	} else {
		e.logf("healthcaretest: operation %s done: %d exported, %d failed", op.name, op.success, op.failure)
	}
}

// groupByType splits resources per type, types in alphabetical order.
func groupByType(rs []snapRes) ([]string, map[string][][]byte) {
	groups := map[string][][]byte{}
	for _, r := range rs {
		groups[r.typ] = append(groups[r.typ], r.data)
	}
	return sortedKeys(groups), groups
}

func (e *Emulator) storageClient() (*storage.Client, error) {
	e.mu.Lock()
	c := e.storage
	e.mu.Unlock()
	if c != nil {
		return c, nil
	}
	e.storageOnce.Do(func() {
		if os.Getenv("STORAGE_EMULATOR_HOST") == "" {
			e.storageErr = errors.New("no Cloud Storage client: Options.Storage is nil and STORAGE_EMULATOR_HOST is not set")
			return
		}
		c, err := storage.NewClient(context.Background(), storage.WithJSONReads())
		if err != nil {
			e.storageErr = fmt.Errorf("creating a Cloud Storage client from STORAGE_EMULATOR_HOST: %v", err)
			return
		}
		e.mu.Lock()
		e.storage = c
		e.mu.Unlock()
	})
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.storage != nil {
		return e.storage, nil
	}
	return nil, e.storageErr
}

// writeGCS writes one NDJSON object per resource type.
func (e *Emulator) writeGCS(op *operation, rs []snapRes) *apiError {
	j := op.export
	client, err := e.storageClient()
	if err != nil {
		return errorf(codeInternal, "%v", err)
	}
	ctx := e.bg
	gcsErr := func(err error, what string) *apiError {
		var gerr *googleapi.Error
		switch {
		case errors.Is(err, storage.ErrBucketNotExist):
			return errorf(codeNotFound, "Cloud Storage bucket %q of gcsDestination.uriPrefix does not exist", j.bucket)
		case errors.As(err, &gerr) && (gerr.Code == 403 || gerr.Code == 401):
			return errorf(codePermissionDenied, "Healthcare API doesn't have required Cloud Storage permission.")
		case errors.As(err, &gerr) && gerr.Code == 404:
			return errorf(codeNotFound, "Cloud Storage bucket %q of gcsDestination.uriPrefix does not exist", j.bucket)
		}
		return errorf(codeInternal, "writing %s: %v", what, err)
	}
	bkt := client.Bucket(j.bucket)
	if _, err := bkt.Attrs(ctx); err != nil {
		return gcsErr(err, "gs://"+j.bucket)
	}
	types, groups := groupByType(rs)
	var buf bytes.Buffer
	for _, t := range types {
		name := j.objPrefix + op.id + "_" + t
		buf.Reset()
		for _, d := range groups[t] {
			buf.Write(d)
			buf.WriteByte('\n')
		}
		w := bkt.Object(name).NewWriter(ctx)
		w.ChunkSize = 0 // one request per object
		w.ContentType = "application/fhir+ndjson"
		if _, err := w.Write(buf.Bytes()); err != nil {
			w.Close()
			return gcsErr(err, "gs://"+j.bucket+"/"+name)
		}
		if err := w.Close(); err != nil {
			return gcsErr(err, "gs://"+j.bucket+"/"+name)
		}
	}
	return nil
}

// writeBigQuery applies an export to the in-memory BigQuery model. The
// caller holds e.mu.
func (e *Emulator) writeBigQuery(j *exportJob, rs []snapRes) *apiError {
	types, groups := groupByType(rs)
	ds := e.bq[j.bqURI]
	if ds == nil {
		ds = map[string][]json.RawMessage{}
		e.bq[j.bqURI] = ds
	}
	switch j.bqMode {
	case "WRITE_EMPTY":
		for _, t := range types {
			if len(ds[t]) > 0 {
				return errorf(codeFailedPrecondition, "BigQuery table %s.%s is not empty: bigqueryDestination.writeDisposition WRITE_EMPTY (the default) requires empty destination tables", j.bqURI, t)
			}
		}
	case "FORCE":
		clear(ds)
	case "WRITE_TRUNCATE":
		for _, t := range types {
			delete(ds, t)
		}
	}
	for _, t := range types {
		for _, d := range groups[t] {
			ds[t] = append(ds[t], json.RawMessage(d))
		}
	}
	return nil
}

// BigQueryTable returns the rows written to a table of the in-memory BigQuery
// model, e.g. BigQueryTable("bq://proj.ds", "Patient"): one resource JSON per
// row, in write order.
func (e *Emulator) BigQueryTable(datasetURI, table string) []json.RawMessage {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]json.RawMessage(nil), e.bq[datasetURI][table]...)
}

// BigQueryTables returns the non-empty tables of a BigQuery dataset, sorted.
func (e *Emulator) BigQueryTables(datasetURI string) []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []string
	for _, t := range sortedKeys(e.bq[datasetURI]) {
		if len(e.bq[datasetURI][t]) > 0 {
			out = append(out, t)
		}
	}
	return out
}

// PutBigQueryRows appends rows to a table of the in-memory BigQuery model
// (to set up non-empty destinations).
func (e *Emulator) PutBigQueryRows(datasetURI, table string, rows ...json.RawMessage) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.bq[datasetURI] == nil {
		e.bq[datasetURI] = map[string][]json.RawMessage{}
	}
	e.bq[datasetURI][table] = append(e.bq[datasetURI][table], rows...)
}

// Export is one export the emulator accepted (it has an operation).
type Export struct {
	Operation   string    // projects/P/locations/L/datasets/D/operations/ID
	Store       string    // the FHIR store exported
	CreateTime  time.Time // the operation's createTime
	Destination string    // gcsDestination.uriPrefix or bigqueryDestination.datasetUri
	Since       string    // _since as requested, "" for none
	Types       string    // _type as requested, "" for all
}

// Exports returns the accepted exports, in acceptance order, including those
// whose answer a fault dropped (AcceptedAnswerLost).
func (e *Emulator) Exports() []Export {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]Export(nil), e.exports...)
}

// countRunning records the running exports after an export was accepted in
// project. The caller holds e.mu and has settled the operations whose time
// is up.
func (e *Emulator) countRunning(project string) {
	all, inProject := 0, 0
	for _, op := range e.runningExports() {
		all++
		if op.project == project {
			inProject++
		}
	}
	e.peakRunning = max(e.peakRunning, all)
	e.peakByProject[project] = max(e.peakByProject[project], inProject)
}

// PeakRunningOperations returns the highest number of export operations
// running at once, over all projects, since New or the last
// ResetPeakRunningOperations. An export counts as running from its
// acceptance until its time is up (or it is cancelled), on the emulator's
// clock; the count is taken whenever an export is accepted.
func (e *Emulator) PeakRunningOperations() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.peakRunning
}

// PeakRunningOperationsIn is PeakRunningOperations for one project
// ("projects/P"), the scope of MaxRunningOperations.
func (e *Emulator) PeakRunningOperationsIn(project string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.peakByProject[project]
}

// ResetPeakRunningOperations forgets the peaks.
func (e *Emulator) ResetPeakRunningOperations() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.peakRunning = 0
	clear(e.peakByProject)
}

// ForceOutcome sets how a running export operation ends.
func (e *Emulator) ForceOutcome(operation string, o Outcome) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	op := e.ops[operation]
	switch {
	case op == nil:
		return fmt.Errorf("operation %q not found", operation)
	case op.export == nil:
		return fmt.Errorf("operation %q is not an export", operation)
	case op.done || op.export.finishing != nil:
		return fmt.Errorf("operation %q is no longer running", operation)
	}
	op.export.outcome = &o
	return nil
}

// ForceNextOutcomes queues outcomes for the next accepted exports, in order.
func (e *Emulator) ForceNextOutcomes(o ...Outcome) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.forced = append(e.forced, o...)
}

var (
	sinceRE      = regexp.MustCompile(`^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$`)
	bucketRE     = regexp.MustCompile(`^[a-z0-9][a-z0-9_.\-]{1,220}[a-z0-9]$`)
	ipRE         = regexp.MustCompile(`^\d+\.\d+\.\d+\.\d+$`)
	bqProjectRE  = regexp.MustCompile(`^[a-z][a-z0-9\-]{4,28}[a-z0-9]$`)
	bqDatasetRE  = regexp.MustCompile(`^[A-Za-z0-9_]+$`)
	acceptedTime = "accepted: YYYY-MM-DDThh:mm:ss[.sss]±hh:mm or Z, e.g. 2017-01-01T00:00:00Z"
)

func validBucket(b string) bool {
	if !bucketRE.MatchString(b) || ipRE.MatchString(b) || strings.HasPrefix(b, "goog") ||
		strings.Contains(b, "google") || strings.Contains(b, "..") {
		return false
	}
	if len(b) > 63 && !strings.Contains(b, ".") {
		return false
	}
	for _, part := range strings.Split(b, ".") {
		if len(part) == 0 || len(part) > 63 {
			return false
		}
	}
	return true
}

// validateExport checks a request against the store like the service does and
// fills the job's destination. since is zero when _since is absent.
func validateExport(req *exportRequest, st *fhirStore, j *exportJob) (since time.Time, types map[string]bool, aerr *apiError) {
	if req.Since != "" {
		if !sinceRE.MatchString(req.Since) {
			return since, nil, invalidArg("invalid _since %q: the time must be specified to the second and include a time zone (%s)", req.Since, acceptedTime)
		}
		t, err := time.Parse(time.RFC3339Nano, req.Since)
		if err != nil {
			return since, nil, invalidArg("invalid _since %q: %v (%s)", req.Since, err, acceptedTime)
		}
		since = t
	}
	if req.Type != "" {
		types = map[string]bool{}
		for _, t := range strings.Split(req.Type, ",") {
			t = strings.TrimSpace(t)
			if !resourceTypes[st.version][t] {
				return since, nil, invalidArg("invalid _type %q: %q is not a %s resource type", req.Type, t, st.version)
			}
			types[t] = true
		}
	}
	gcs, bq := req.GcsDestination != nil, req.BigqueryDestination != nil
	if gcs == bq {
		return since, nil, invalidArg("exactly one of gcsDestination or bigqueryDestination must be set")
	}
	if gcs {
		p := req.GcsDestination.URIPrefix
		rest, ok := strings.CutPrefix(p, "gs://")
		if !ok {
			return since, nil, invalidArg("invalid gcsDestination.uriPrefix %q: must have the form gs://{bucket-id}/{path/to/destination/dir}", p)
		}
		bucket, path, _ := strings.Cut(rest, "/")
		if !validBucket(bucket) {
			return since, nil, invalidArg("invalid gcsDestination.uriPrefix %q: invalid bucket name %q", p, bucket)
		}
		if path != "" && !strings.HasSuffix(path, "/") {
			path += "/"
		}
		if strings.Contains(path, "//") {
			return since, nil, invalidArg("invalid gcsDestination.uriPrefix %q: empty path segment", p)
		}
		j.bucket, j.objPrefix = bucket, path
		return since, types, nil
	}
	d := req.BigqueryDestination
	uri := d.DatasetURI
	rest, ok := strings.CutPrefix(uri, "bq://")
	proj, dsID, ok2 := strings.Cut(rest, ".")
	if !ok || !ok2 || len(uri) > 2000 || !bqProjectRE.MatchString(proj) || !bqDatasetRE.MatchString(dsID) || len(dsID) > 1024 {
		return since, nil, invalidArg("invalid bigqueryDestination.datasetUri %q: must have the form bq://projectId.bqDatasetId", uri)
	}
	sc := d.SchemaConfig
	if sc == nil || sc.SchemaType == "" || sc.SchemaType == "SCHEMA_TYPE_UNSPECIFIED" {
		return since, nil, invalidArg("bigqueryDestination.schemaConfig.schemaType is required (accepted: ANALYTICS, ANALYTICS_V2)")
	}
	if sc.RecursiveStructureDepth != "" {
		n, _ := strconv.ParseInt(sc.RecursiveStructureDepth, 10, 64)
		if n < 0 || n > 5 {
			return since, nil, invalidArg("invalid bigqueryDestination.schemaConfig.recursiveStructureDepth %d: the maximum depth allowed is 5", n)
		}
	}
	if pc := sc.LastUpdatedPartitionConfig; pc != nil {
		if pc.Type == "" || pc.Type == "PARTITION_TYPE_UNSPECIFIED" {
			return since, nil, invalidArg("bigqueryDestination.schemaConfig.lastUpdatedPartitionConfig.type is required (accepted: HOUR, DAY, MONTH, YEAR)")
		}
		if n, _ := strconv.ParseInt(pc.ExpirationMs, 10, 64); n < 0 {
			return since, nil, invalidArg("invalid bigqueryDestination.schemaConfig.lastUpdatedPartitionConfig.expirationMs %d: must not be negative", n)
		}
	}
	j.bqURI = uri
	switch d.WriteDisposition {
	case "", "WRITE_DISPOSITION_UNSPECIFIED":
		j.bqMode = "WRITE_EMPTY"
		if d.Force {
			j.bqMode = "FORCE"
		}
	default:
		j.bqMode = d.WriteDisposition
	}
	return since, types, nil
}

func handleExport(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	m, aerr := parseBody(c.body, exportRequestFields)
	if aerr != nil {
		writeAPIError(w, aerr)
		return
	}
	b, _ := json.Marshal(m)
	var req exportRequest
	if err := json.Unmarshal(b, &req); err != nil {
		writeAPIError(w, invalidArg("Invalid JSON payload received. %v", err))
		return
	}
	e.mu.Lock()
	st := e.stores[c.names.store]
	d := e.datasets[c.names.dataset]
	runningOps := e.runningExports() // all projects: the peak is counted overall
	e.mu.Unlock()
	if st == nil || d == nil {
		writeAPIError(w, notFound("FHIR store %q not found", c.names.store))
		return
	}
	j := &exportJob{}
	since, types, aerr := validateExport(&req, st, j)
	if aerr != nil {
		writeAPIError(w, aerr)
		return
	}
	if j.bucket != "" {
		// Fail now, with a cause, rather than in the operation with a Go
		// error the client cannot act on.
		if _, err := e.storageClient(); err != nil {
			writeAPIError(w, errorf(codeFailedPrecondition, "gcsDestination: the emulator has no Cloud Storage to write to (%v); start healthcare-emulator with --gcs-dir, or set STORAGE_EMULATOR_HOST or Options.Storage", err))
			return
		}
	}
	e.settle(runningOps) // exports whose time is up no longer count as running

	e.mu.Lock()
	defer e.mu.Unlock()
	if e.maxRunning > 0 {
		running := 0
		for _, op := range e.runningExports() {
			if op.project == c.names.project {
				running++
			}
		}
		if running >= e.maxRunning {
			writeAPIError(w, errorf(codeResourceExhausted, "too many running operations in %s: %d of at most %d (MaxRunningOperations); retry once one finishes", c.names.project, running, e.maxRunning))
			return
		}
	}
	if e.stores[c.names.store] != st {
		writeAPIError(w, notFound("FHIR store %q not found", c.names.store))
		return
	}
	op := e.newOperation(d, exportMethod)
	j.duration, j.steps = e.exportDuration, e.exportSteps
	if len(e.forced) > 0 {
		o := e.forced[0]
		e.forced = e.forced[1:]
		j.outcome = &o
	}
	for _, res := range st.order {
		if res.deleted || (types != nil && !types[res.typ]) || (!since.IsZero() && !res.updated.After(since)) {
			continue
		}
		j.snapshot = append(j.snapshot, snapRes{typ: res.typ, data: res.data})
	}
	j.total = int64(len(j.snapshot))
	op.export = j
	e.exportOps = append(e.exportOps, op)
	var dest string
	if req.GcsDestination != nil {
		dest = req.GcsDestination.URIPrefix
	} else {
		dest = req.BigqueryDestination.DatasetURI
	}
	e.exports = append(e.exports, Export{Operation: op.name, Store: st.name, CreateTime: op.createTime,
		Destination: dest, Since: req.Since, Types: req.Type})
	e.countRunning(c.names.project)
	e.logf("healthcaretest: export %s of %s accepted: %d resources", op.name, st.name, j.total)
	writeJSON(w, 200, map[string]any{"name": op.name})
}

// runningExports returns the export operations not done yet, dropping the
// finished ones from e.exportOps: a dataset's long history (AddHistory) does
// not slow every export call down. The caller holds e.mu.
func (e *Emulator) runningExports() []*operation {
	e.exportOps = slices.DeleteFunc(e.exportOps, func(op *operation) bool { return op.done })
	return slices.Clone(e.exportOps)
}
