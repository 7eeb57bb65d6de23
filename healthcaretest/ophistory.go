package healthcaretest

import (
	"fmt"
	"math/rand"
	"slices"
	"time"
)

// ListOrder is the order in which operations.list returns a dataset's
// operations. The service documents none (the v1 reference of
// projects.locations.datasets.operations.list names only pageSize and
// pageToken), so a client must work with either.
type ListOrder int

const (
	// OldestFirst lists operations in creation order (the default).
	OldestFirst ListOrder = iota
	// NewestFirst lists the most recently created operations first.
	NewestFirst
)

// SetListOrder sets the order of operations.list from now on.
func (e *Emulator) SetListOrder(o ListOrder) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.listOrder = o
}

// SetDatasetListOrder sets the order of operations.list for one dataset,
// over the emulator's (SetListOrder).
func (e *Emulator) SetDatasetListOrder(dataset string, o ListOrder) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	d := e.datasets[dataset]
	if d == nil {
		return fmt.Errorf("healthcaretest: dataset %q not found", dataset)
	}
	d.order = &o
	return nil
}

// History describes finished operations a dataset accumulated before a test
// began: a real dataset holds every export, import and de-identify of the
// last weeks (the service keeps finished operations about 30 days).
type History struct {
	// Count is the number of operations to add.
	Count int
	// Span is how far back they reach: creation times are spread evenly over
	// [now-Span, now-Gap). Default 30 days.
	Span time.Duration
	// Gap keeps the newest of them this long before now (default 1 hour).
	Gap time.Duration
	// Methods are the apiMethodName values, drawn at random; default
	// HistoryMethods.
	Methods []string
	// Seed makes the draw reproducible.
	Seed int64
}

// HistoryMethods are the long-running methods a dataset's history holds by
// default: FHIR exports and imports, and de-identification.
var HistoryMethods = []string{
	exportMethod,
	"google.cloud.healthcare.v1.fhir.FhirService.ImportResources",
	"google.cloud.healthcare.v1.dataset.DatasetService.DeidentifyDataset",
	"google.cloud.healthcare.v1.fhir.FhirService.DeidentifyFhirStore",
	"google.cloud.healthcare.v1.dicom.DicomService.ExportDicomData",
}

// AddHistory adds h.Count finished operations to dataset, created before
// every operation the emulator started (they are older), none of them
// fhirexport's. Some failed, as real ones do. It returns their names, oldest
// first.
func (e *Emulator) AddHistory(dataset string, h History) ([]string, error) {
	if h.Count <= 0 {
		return nil, nil
	}
	if h.Span <= 0 {
		h.Span = 30 * 24 * time.Hour
	}
	if h.Gap <= 0 {
		h.Gap = time.Hour
	}
	methods := h.Methods
	if len(methods) == 0 {
		methods = HistoryMethods
	}
	rng := rand.New(rand.NewSource(h.Seed))
	e.mu.Lock()
	defer e.mu.Unlock()
	d := e.datasets[dataset]
	if d == nil {
		return nil, fmt.Errorf("healthcaretest: dataset %q not found", dataset)
	}
	newest := e.clock.Now().UTC().Add(-h.Gap)
	step := h.Span / time.Duration(h.Count)
	old := make([]*operation, 0, h.Count)
	names := make([]string, 0, h.Count)
	for i := range h.Count {
		created := newest.Add(-h.Span + time.Duration(i)*step).Truncate(time.Microsecond)
		op := e.registerOperation(d, methods[rng.Intn(len(methods))], created)
		op.done = true
		op.endTime = created.Add(time.Duration(1+rng.Intn(50)) * time.Minute)
		if rng.Intn(10) == 0 {
			op.errCode, op.errMsg = 13, "an earlier failure of the dataset's history"
		} else {
			op.response = map[string]any{"@type": "type.googleapis.com/google.protobuf.Empty"}
			op.success = int64(rng.Intn(10000))
		}
		old = append(old, op)
		names = append(names, op.name)
	}
	d.ops = slices.Concat(old, d.ops[:len(d.ops)-len(old)])
	return names, nil
}
