package healthcaretest

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"encoding/binary"
	"encoding/json"
	"io"
	"math/rand"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"cloud.google.com/go/pubsub/v2"
	"cloud.google.com/go/storage"
)

// Options configure an Emulator.
type Options struct {
	// Clock supplies every server timestamp; nil means real time.
	Clock Clock
	// Storage writes Cloud Storage exports. When nil, a client is built at the
	// first Cloud Storage export from STORAGE_EMULATOR_HOST (with
	// storage.WithJSONReads); if that is unset or fails, Cloud Storage
	// exports are rejected with 400 FAILED_PRECONDITION.
	Storage *storage.Client
	// ExportDuration is how long an export runs, measured on Clock from the
	// operation's createTime. Zero: done at the first observation.
	ExportDuration time.Duration
	// ExportSteps is the number of progress steps of an export (default 1).
	ExportSteps int
	// MaxRunningOperations limits running exports per project; 0 means
	// unlimited. An export beyond the limit answers 429 RESOURCE_EXHAUSTED.
	MaxRunningOperations int
	// PubSub publishes FHIR store change notifications. When nil, a client is
	// built at the first notification from PUBSUB_EMULATOR_HOST; if that is
	// unset or fails, notifications are logged and dropped (the FHIR write
	// still succeeds, as on the service).
	PubSub *pubsub.Client
	// ListOrder is the order of operations.list (default OldestFirst).
	ListOrder ListOrder
	// DeterministicIDs makes operation ids and server-assigned resource ids
	// the same in every run (for golden files). By default they start from a
	// random base per emulator, so ids from a restarted emulator never collide
	// with ones a client recorded before, as on the real service.
	DeterministicIDs bool
	// Logf, when set, receives one line per request and per operation event.
	Logf func(format string, args ...any)
}

// Request is one HTTP request the emulator received.
type Request struct {
	Method string
	Path   string // URL path, e.g. /v1/projects/p/locations/l/datasets/d/fhirStores/s:export
	Query  url.Values
	Body   []byte
	// APIMethod is the short discovery method id, e.g. "fhirStores.export",
	// "operations.get", "fhir.create"; empty when the path matched no method.
	APIMethod string
}

// Emulator is an in-memory Cloud Healthcare API v1 (the part fhirexport uses)
// and an http.Handler. Create one with New. It is safe for concurrent use.
type Emulator struct {
	clock Clock
	logf  func(format string, args ...any)

	bg       context.Context // cancelled by Close; parent of export writes
	bgCancel context.CancelFunc
	wg       sync.WaitGroup

	storageOnce sync.Once
	storageErr  error

	// publishMu serializes Flush, so notifications leave in commit order,
	// and guards the Pub/Sub client and publishers.
	publishMu  sync.Mutex
	pubsub     *pubsub.Client
	ownPubsub  bool
	pubsubErr  error
	publishers map[string]*pubsub.Publisher

	mu             sync.Mutex
	lastStamp      time.Time
	exportDuration time.Duration
	exportSteps    int
	maxRunning     int
	storage        *storage.Client
	datasets       map[string]*dataset
	stores         map[string]*fhirStore
	ops            map[string]*operation
	exportOps      []*operation // export operations, at least every running one (runningExports)
	opSeq          uint64
	idSeq          uint64
	idSalt         uint64                                  // mixed into server-assigned ids; 0 with DeterministicIDs
	opBase         uint64                                  // first operation id, less one step
	bq             map[string]map[string][]json.RawMessage // dataset URI → table → rows
	requests       []Request
	faults         map[string][]*fault
	forced         []Outcome
	exports        []Export
	listOrder      ListOrder
	peakRunning    int
	peakByProject  map[string]int
	outbox         []Notification // committed, not yet published
	published      []Notification
}

type dataset struct {
	name     string
	timeZone string
	ops      []*operation // in creation order
	order    *ListOrder   // how operations.list lists them; nil: the emulator's order
}

type fault struct {
	remaining int // FailNext: calls left; -1 for a rate fault
	code      int
	rate      float64
	rng       *rand.Rand
	codes     []int
}

// New returns an Emulator with no datasets.
func New(opts Options) *Emulator {
	e := &Emulator{
		clock:          opts.Clock,
		logf:           opts.Logf,
		exportDuration: opts.ExportDuration,
		exportSteps:    opts.ExportSteps,
		maxRunning:     opts.MaxRunningOperations,
		listOrder:      opts.ListOrder,
		storage:        opts.Storage,
		datasets:       map[string]*dataset{},
		stores:         map[string]*fhirStore{},
		ops:            map[string]*operation{},
		bq:             map[string]map[string][]json.RawMessage{},
		faults:         map[string][]*fault{},
		pubsub:         opts.PubSub,
		peakByProject:  map[string]int{},
		publishers:     map[string]*pubsub.Publisher{},
	}
	if e.clock == nil {
		e.clock = realClock{}
	}
	e.opBase = 1 << 62
	if !opts.DeterministicIDs {
		var b [16]byte
		crand.Read(b[:]) // never fails (crypto/rand documents it)
		e.idSalt = binary.BigEndian.Uint64(b[:8])
		// Operation ids stay positive int64 decimals, like the service's.
		e.opBase = 1<<62 + binary.BigEndian.Uint64(b[8:])%(1<<61)
	}
	if e.logf == nil {
		e.logf = func(string, ...any) {}
	}
	if e.exportSteps <= 0 {
		e.exportSteps = 1
	}
	e.bg, e.bgCancel = context.WithCancel(context.Background())
	return e
}

// Close stops running export writes and waits for them. The emulator still
// answers afterwards, but unfinished exports fail.
func (e *Emulator) Close() {
	e.Flush()
	e.bgCancel()
	e.wg.Wait()
	e.closePubSub()
}

// SetExportTiming sets the duration and number of progress steps of exports
// accepted from now on.
func (e *Emulator) SetExportTiming(duration time.Duration, steps int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if steps <= 0 {
		steps = 1
	}
	e.exportDuration, e.exportSteps = duration, steps
}

// SetMaxRunningOperations sets the per-project limit of running exports
// (0: unlimited).
func (e *Emulator) SetMaxRunningOperations(n int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.maxRunning = n
}

// Fault codes beyond HTTP statuses, for FailNext, FailRate and the admin
// faults endpoint.
const (
	// DropBeforeActing drops the connection before the call has any effect.
	DropBeforeActing = 0
	// AcceptedAnswerLost lets the call take full effect (an export is
	// accepted: its operation exists and runs) and then drops the
	// connection without answering, as when a response is lost in transit.
	AcceptedAnswerLost = -1
	// AcceptedAnswerTooLate lets the call take full effect and holds the
	// answer until the client gives up (its deadline passes or it
	// disconnects), then drops the connection.
	AcceptedAnswerTooLate = -2
)

// FailNext makes the next n calls of method fail: code is an HTTP status
// (429, 500, 503, ...) answered in the Google error model before the call has
// any effect, DropBeforeActing (0) to drop the connection without answering,
// or AcceptedAnswerLost / AcceptedAnswerTooLate to act and lose the answer. method is a short
// discovery id such as "fhirStores.export" or "operations.get"; "*" matches
// any method. Faults of a method are consumed before those of "*".
func (e *Emulator) FailNext(method string, n int, code int) {
	if n <= 0 {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.faults[method] = append(e.faults[method], &fault{remaining: n, code: code})
}

// FailRate makes a fraction of the calls of method fail with one of codes
// (chosen at random; 0 drops the connection; none given means 503), drawn
// from a random source seeded with seed so a run is reproducible. A fraction
// ≤ 0 removes the method's rate faults.
func (e *Emulator) FailRate(method string, fraction float64, seed int64, codes ...int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	var kept []*fault
	for _, f := range e.faults[method] {
		if f.remaining >= 0 {
			kept = append(kept, f)
		}
	}
	if fraction > 0 {
		if len(codes) == 0 {
			codes = []int{503}
		}
		kept = append(kept, &fault{remaining: -1, rate: fraction, rng: rand.New(rand.NewSource(seed)), codes: append([]int(nil), codes...)})
	}
	e.faults[method] = kept
}

// injected reports whether a call of method must fail, and how. The caller
// holds e.mu.
func (e *Emulator) injected(method string) (code int, fail bool) {
	for _, key := range []string{method, "*"} {
		fs := e.faults[key]
		for i, f := range fs {
			if f.remaining > 0 {
				f.remaining--
				if f.remaining == 0 {
					e.faults[key] = append(fs[:i:i], fs[i+1:]...)
				}
				return f.code, true
			}
		}
		for _, f := range fs {
			if f.remaining < 0 {
				if f.rng.Float64() < f.rate {
					return f.codes[f.rng.Intn(len(f.codes))], true
				}
			}
		}
	}
	return 0, false
}

// Requests returns every API request received, in order (admin requests under
// /emulator/ are not recorded). Requests failed by injection are included.
func (e *Emulator) Requests() []Request {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]Request(nil), e.requests...)
}

// ExportRequests returns the received fhirStores.export requests, in order,
// whether they were accepted, rejected or failed by injection.
func (e *Emulator) ExportRequests() []Request {
	var out []Request
	for _, r := range e.Requests() {
		if r.APIMethod == "fhirStores.export" {
			out = append(out, r)
		}
	}
	return out
}

const maxBody = 64 << 20

// ServeHTTP answers Cloud Healthcare API v1 requests under /v1/ and the
// emulator's admin API under /emulator/v1/.
func (e *Emulator) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if strings.HasPrefix(r.URL.Path, "/emulator/") {
		e.serveAdmin(w, r)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil {
		writeAPIError(w, invalidArg("reading request body: %v", err))
		return
	}
	if len(body) > maxBody {
		writeAPIError(w, invalidArg("request body larger than %d bytes", maxBody))
		return
	}
	rt := route(r.Method, r.URL.Path)
	query := r.URL.Query()
	e.mu.Lock()
	e.requests = append(e.requests, Request{Method: r.Method, Path: r.URL.Path, Query: query, Body: body, APIMethod: rt.method})
	code, fail := e.injected(rt.method)
	e.mu.Unlock()
	e.logf("healthcaretest: %s %s (%s)", r.Method, r.URL.Path, rt.method)
	if fail && code < 0 && rt.handler != nil {
		e.logf("healthcaretest: injected failure %d for %s: acting, then losing the answer", code, rt.method)
		rt.handler(e, &bufferedResponse{ResponseWriter: w}, r, &call{body: body, query: query, names: rt.names})
		e.Flush()
		if code == AcceptedAnswerTooLate {
			select {
			case <-r.Context().Done():
			case <-e.bg.Done():
			}
		}
		dropConnection(w)
		return
	}
	if fail {
		e.logf("healthcaretest: injected failure %d for %s", code, rt.method)
		if code <= 0 {
			dropConnection(w)
			return
		}
		writeAPIError(w, &apiError{code: httpToCode(code), message: "injected failure: " + http.StatusText(code)})
		return
	}
	if rt.handler == nil {
		if knownShape(r.URL.Path) {
			// The service answers every method it has; the emulator has
			// fewer. UNIMPLEMENTED tells a client it hit a gap of the
			// emulator, not a missing resource.
			writeAPIError(w, errorf(codeUnimplemented, "the emulator does not implement %s %s", r.Method, r.URL.Path))
			return
		}
		writeAPIError(w, notFound("the requested URL %s %s was not found on this server", r.Method, r.URL.Path))
		return
	}
	// The answer waits until the notifications of the request's writes are
	// published, so a client that saw it can pull them.
	bw := &bufferedResponse{ResponseWriter: w}
	rt.handler(e, bw, r, &call{body: body, query: query, names: rt.names})
	e.Flush()
	bw.send()
}

// dropConnection closes the connection without an HTTP answer.
func dropConnection(w http.ResponseWriter) {
	if hj, ok := w.(http.Hijacker); ok {
		if conn, _, err := hj.Hijack(); err == nil {
			conn.Close()
			return
		}
	}
	panic(http.ErrAbortHandler)
}

// call is one routed API request.
type call struct {
	body  []byte
	query url.Values
	names routeNames
}

type routeNames struct {
	project, location, dataset string // full names
	store, op                  string // full names
	resType, resID             string
	versionID                  string // fhir.vread
}

type handlerFunc func(e *Emulator, w http.ResponseWriter, r *http.Request, c *call)

type routed struct {
	method  string
	handler handlerFunc
	names   routeNames
}

// route maps a request to its API method by the paths of the v1 discovery
// document as the Go client expands them.
func route(method, path string) routed {
	p, ok := strings.CutPrefix(path, "/v1/")
	if !ok {
		return routed{}
	}
	segs := strings.Split(p, "/")
	for _, s := range segs {
		if s == "" {
			return routed{}
		}
	}
	if len(segs) < 5 || segs[0] != "projects" || segs[2] != "locations" || segs[4] != "datasets" {
		return routed{}
	}
	var n routeNames
	n.project = "projects/" + segs[1]
	n.location = n.project + "/locations/" + segs[3]
	if len(segs) == 5 {
		switch method {
		case http.MethodGet:
			return routed{"datasets.list", handleDatasetsList, n}
		case http.MethodPost:
			return routed{"datasets.create", handleDatasetsCreate, n}
		}
		return routed{}
	}
	n.dataset = n.location + "/datasets/" + segs[5]
	if len(segs) == 6 {
		if strings.Contains(segs[5], ":") {
			return routed{}
		}
		switch method {
		case http.MethodGet:
			return routed{"datasets.get", handleDatasetsGet, n}
		case http.MethodPatch:
			return routed{"datasets.patch", handleDatasetsPatch, n}
		case http.MethodDelete:
			return routed{"datasets.delete", handleDatasetsDelete, n}
		}
		return routed{}
	}
	switch segs[6] {
	case "operations":
		switch len(segs) {
		case 7:
			if method == http.MethodGet {
				return routed{"operations.list", handleOperationsList, n}
			}
		case 8:
			id, verb, hasVerb := strings.Cut(segs[7], ":")
			n.op = n.dataset + "/operations/" + id
			switch {
			case !hasVerb && method == http.MethodGet:
				return routed{"operations.get", handleOperationsGet, n}
			case verb == "cancel" && method == http.MethodPost:
				return routed{"operations.cancel", handleOperationsCancel, n}
			}
		}
		return routed{}
	case "fhirStores":
	default:
		return routed{}
	}
	if len(segs) == 7 {
		switch method {
		case http.MethodGet:
			return routed{"fhirStores.list", handleStoresList, n}
		case http.MethodPost:
			return routed{"fhirStores.create", handleStoresCreate, n}
		}
		return routed{}
	}
	id, verb, hasVerb := strings.Cut(segs[7], ":")
	n.store = n.dataset + "/fhirStores/" + id
	if len(segs) == 8 {
		switch {
		case hasVerb && verb == "export" && method == http.MethodPost:
			return routed{"fhirStores.export", handleExport, n}
		case hasVerb:
		case method == http.MethodGet:
			return routed{"fhirStores.get", handleStoresGet, n}
		case method == http.MethodPatch:
			return routed{"fhirStores.patch", handleStoresPatch, n}
		case method == http.MethodDelete:
			return routed{"fhirStores.delete", handleStoresDelete, n}
		}
		return routed{}
	}
	if hasVerb || segs[8] != "fhir" {
		return routed{}
	}
	switch len(segs) {
	case 9:
		if method == http.MethodPost {
			return routed{"fhir.executeBundle", handleBundle, n}
		}
	case 10:
		n.resType = segs[9]
		if segs[9] == "metadata" && method == http.MethodGet {
			return routed{"fhir.capabilities", handleCapabilities, n}
		}
		if method == http.MethodPost {
			return routed{"fhir.create", handleFHIRCreate, n}
		}
	case 11:
		n.resType, n.resID = segs[9], segs[10]
		switch method {
		case http.MethodGet:
			return routed{"fhir.read", handleFHIRRead, n}
		case http.MethodPut:
			return routed{"fhir.update", handleFHIRUpdate, n}
		case http.MethodPatch:
			return routed{"fhir.patch", handleFHIRPatch, n}
		case http.MethodDelete:
			return routed{"fhir.delete", handleFHIRDelete, n}
		}
	case 12:
		n.resType, n.resID = segs[9], segs[10]
		if segs[11] == "_history" && method == http.MethodGet {
			return routed{"fhir.history", handleFHIRHistory, n}
		}
	case 13:
		n.resType, n.resID, n.versionID = segs[9], segs[10], segs[12]
		if segs[11] == "_history" && method == http.MethodGet {
			return routed{"fhir.vread", handleFHIRVread, n}
		}
	}
	return routed{}
}

// apiCollections are the collection names of the Healthcare API v1 resource
// paths (discovery document).
var apiCollections = map[string]bool{
	"locations": true, "datasets": true, "fhirStores": true, "dicomStores": true, "hl7V2Stores": true,
	"consentStores": true, "operations": true, "messages": true, "attributeDefinitions": true,
	"consentArtifacts": true, "consents": true, "userDataMappings": true, "services": true, "dicomWeb": true,
	"studies": true, "series": true, "instances": true,
}

// apiVerbs are the custom methods (":verb") of the v1 discovery document.
var apiVerbs = map[string]bool{}

func init() {
	for _, v := range strings.Fields(`activate analyzeEntities applyAdminConsents applyConsents archive bulkDelete cancel
checkDataAccess deidentify deleteRevision evaluateUserConsents explainDataAccess export getDICOMStoreMetrics
getFHIRStoreMetrics getIamPolicy getSeriesMetrics getStorageInfo getStudyMetrics import ingest listRevisions
queryAccessibleData reject revoke rollback setBlobStorageSettings setIamPolicy testIamPermissions`) {
		apiVerbs[v] = true
	}
}

// knownShape reports whether path looks like a Healthcare API v1 method:
// /v1/projects/{p}/locations..., alternating known collections and ids, or
// anything under a FHIR store's /fhir (search, history, operations).
func knownShape(path string) bool {
	p, ok := strings.CutPrefix(path, "/v1/")
	if !ok {
		return false
	}
	segs := strings.Split(p, "/")
	if len(segs) < 3 || segs[0] != "projects" || segs[1] == "" {
		return false
	}
	for i, s := range segs {
		name, verb, hasVerb := strings.Cut(s, ":")
		if hasVerb && !apiVerbs[verb] {
			return false
		}
		if i%2 == 0 && i >= 2 {
			if name == "fhir" && i == 8 {
				return true
			}
			if !apiCollections[name] {
				return false
			}
		}
	}
	return true
}

// decodeJSONObject decodes a JSON object body, numbers kept as json.Number.
func decodeJSONObject(b []byte) (map[string]any, error) {
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	var m map[string]any
	if err := d.Decode(&m); err != nil {
		return nil, err
	}
	if d.More() {
		return nil, io.ErrUnexpectedEOF
	}
	if _, err := d.Token(); err != io.EOF {
		return nil, errTrailing
	}
	if m == nil {
		return nil, errNotObject
	}
	return m, nil
}

type strErr string

func (s strErr) Error() string { return string(s) }

const (
	errTrailing  = strErr("unexpected data after the JSON value")
	errNotObject = strErr("the JSON value is not an object")
)
