package healthcaretest

import (
	"encoding/json"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	healthcare "google.golang.org/api/healthcare/v1"
)

const exportMethod = "google.cloud.healthcare.v1.fhir.FhirService.ExportResources"

type operation struct {
	name, id        string
	project         string
	ds              *dataset
	apiMethod       string
	createTime      time.Time
	endTime         time.Time
	done            bool
	cancelRequested bool
	errCode         int32
	errMsg          string
	response        map[string]any
	success         int64
	failure         int64
	export          *exportJob
}

// newOperation registers an operation of dataset d created now. The caller
// holds e.mu.
func (e *Emulator) newOperation(d *dataset, apiMethod string) *operation {
	return e.registerOperation(d, apiMethod, e.stamp())
}

// registerOperation adds an operation of dataset d created at createTime.
// The caller holds e.mu.
func (e *Emulator) registerOperation(d *dataset, apiMethod string, createTime time.Time) *operation {
	e.opSeq++
	id := strconv.FormatUint(e.opBase+e.opSeq*1_000_003, 10)
	op := &operation{
		name:       d.name + "/operations/" + id,
		id:         id,
		project:    strings.Join(strings.Split(d.name, "/")[:2], "/"),
		ds:         d,
		apiMethod:  apiMethod,
		createTime: createTime,
	}
	e.ops[op.name] = op
	d.ops = append(d.ops, op)
	return op
}

func logsURL(op *operation) string {
	project := strings.TrimPrefix(op.project, "projects/")
	q := "resource.type=\"healthcare_dataset\"\nlogName=\"" + op.project +
		"/logs/healthcare.googleapis.com%2Ffhir_export\"\noperation.id=\"" + op.id + "\""
	return "https://console.cloud.google.com/logs/query/query=" + url.PathEscape(q) + "?project=" + project
}

// operationJSON renders op as the API does. The caller holds e.mu.
func (e *Emulator) operationJSON(op *operation) map[string]any {
	meta := map[string]any{
		"@type":         "type.googleapis.com/google.cloud.healthcare.v1.OperationMetadata",
		"apiMethodName": op.apiMethod,
		"createTime":    formatTime(op.createTime),
		"logsUrl":       logsURL(op),
	}
	counter := map[string]any{}
	success, failure, pending := op.success, op.failure, int64(0)
	if !op.done && op.export != nil {
		success, pending = op.export.progress(op.createTime, e.now())
	}
	for k, v := range map[string]int64{"success": success, "failure": failure, "pending": pending} {
		if v != 0 { // protobuf JSON omits zero int64 fields and writes others as strings
			counter[k] = strconv.FormatInt(v, 10)
		}
	}
	meta["counter"] = counter
	if op.cancelRequested {
		meta["cancelRequested"] = true
	}
	out := map[string]any{"name": op.name, "metadata": meta}
	if op.done {
		meta["endTime"] = formatTime(op.endTime)
		out["done"] = true
		if op.errCode != 0 {
			out["error"] = map[string]any{"code": op.errCode, "message": op.errMsg}
		} else {
			out["response"] = op.response
		}
	}
	return out
}

// Operation returns the operation named name as the API's operations.get
// would (completing it first if its time is up), decoded into the real
// client's type, and whether it exists.
func (e *Emulator) Operation(name string) (*healthcare.Operation, bool) {
	e.mu.Lock()
	op := e.ops[name]
	e.mu.Unlock()
	if op == nil {
		return nil, false
	}
	e.settle([]*operation{op})
	e.mu.Lock()
	b, err := json.Marshal(e.operationJSON(op))
	e.mu.Unlock()
	if err != nil {
		return nil, false
	}
	var out healthcare.Operation
	if err := json.Unmarshal(b, &out); err != nil {
		return nil, false
	}
	return &out, true
}

func (e *Emulator) datasetOrNotFound(w http.ResponseWriter, name string) *dataset {
	d := e.datasets[name]
	if d == nil {
		writeAPIError(w, notFound("dataset %q not found", name))
	}
	return d
}

func handleOperationsGet(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	e.mu.Lock()
	op := e.ops[c.names.op]
	e.mu.Unlock()
	if op == nil {
		writeAPIError(w, notFound("operation %q not found", c.names.op))
		return
	}
	e.settle([]*operation{op})
	e.mu.Lock()
	defer e.mu.Unlock()
	writeJSON(w, 200, e.operationJSON(op))
}

// handleOperationsList lists a dataset's operations in pages, in creation
// order or newest first (SetListOrder). The service documents no filter fields: the v1 REST reference of
// projects.locations.datasets.operations.list shows only pageSize and
// pageToken, and the discovery document calls filter "The standard list
// filter". The emulator accepts done=true and done=false (the AIP-160 form
// other Google LRO services document) and rejects any other filter with 400
// rather than ignoring it. The service documents no order either.
func handleOperationsList(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	var want *bool
	switch f := strings.Join(strings.Fields(c.query.Get("filter")), ""); f {
	case "":
	case "done=true", "done=false":
		b := f == "done=true"
		want = &b
	default:
		writeAPIError(w, invalidArg("invalid filter %q: the emulator supports done=true and done=false", c.query.Get("filter")))
		return
	}
	e.mu.Lock()
	d := e.datasetOrNotFound(w, c.names.dataset)
	var ops []*operation
	if d != nil {
		ops = append(ops, d.ops...)
		order := e.listOrder
		if d.order != nil {
			order = *d.order
		}
		if order == NewestFirst {
			slices.Reverse(ops)
		}
	}
	e.mu.Unlock()
	if d == nil {
		return
	}
	e.settle(ops)
	e.mu.Lock()
	defer e.mu.Unlock()
	var match []*operation
	for _, op := range ops {
		if want == nil || op.done == *want {
			match = append(match, op)
		}
	}
	writePage(w, c, "operations", len(match), func(i int) any { return e.operationJSON(match[i]) })
}

func handleOperationsCancel(e *Emulator, w http.ResponseWriter, r *http.Request, c *call) {
	e.mu.Lock()
	op := e.ops[c.names.op]
	if op != nil && !op.done && op.export != nil {
		op.cancelRequested = true
	}
	e.mu.Unlock()
	if op == nil {
		writeAPIError(w, notFound("operation %q not found", c.names.op))
		return
	}
	e.settle([]*operation{op})
	writeJSON(w, 200, map[string]any{})
}
