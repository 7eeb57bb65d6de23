package healthcaretest

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"google.golang.org/api/googleapi"
)

func TestAcceptedAnswerFaults(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		code  int
		admin bool // inject through POST /emulator/v1/faults
	}{
		{"answer lost", AcceptedAnswerLost, false},
		{"answer lost via admin", AcceptedAnswerLost, true},
		{"answer too late", AcceptedAnswerTooLate, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, func(o *Options) { o.ExportDuration = 10 * time.Second })
			e.srv.Seed(testStore, 1, 2)
			if tc.admin {
				if status, b := rawDo(t, "POST", e.srv.URL+"/emulator/v1/faults", `{"method":"fhirStores.export","count":1,"code":-1}`); status != 200 {
					t.Fatalf("admin faults: %d %s", status, b)
				}
				if status, b := rawDo(t, "GET", e.srv.URL+"/emulator/v1/faults", ""); status != 200 || !strings.Contains(string(b), `"code":-1`) {
					t.Fatalf("GET faults: %d %s", status, b)
				}
			} else {
				e.srv.FailNext("fhirStores.export", 1, tc.code)
			}
			ctx, cancel := context.WithTimeout(e.ctx, 20*time.Second)
			if tc.code == AcceptedAnswerTooLate {
				// The client's own deadline; the emulator answers only after it.
				ctx, cancel = context.WithTimeout(e.ctx, 300*time.Millisecond)
			}
			defer cancel()
			_, err := e.svc.Projects.Locations.Datasets.FhirStores.Export(testStore, gcsExport("gs://bucket/lost")).Context(ctx).Do()
			var gerr *googleapi.Error
			if err == nil || errors.As(err, &gerr) {
				t.Fatalf("export answered %v, want a transport error", err)
			}
			if tc.code == AcceptedAnswerTooLate && !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("export error %v, want the client's deadline", err)
			}
			// The export was accepted all the same: it has an operation that
			// runs and finishes.
			ex := e.srv.Exports()
			if len(ex) != 1 || ex[0].Store != testStore || ex[0].Destination != "gs://bucket/lost" || ex[0].CreateTime.Before(epoch) {
				t.Fatalf("exports %+v, want the lost one", ex)
			}
			ops, err := e.svc.Projects.Locations.Datasets.Operations.List(testDataset).Filter("done=false").Do()
			if err != nil || len(ops.Operations) != 1 || ops.Operations[0].Name != ex[0].Operation {
				t.Fatalf("running operations %+v %v, want %s", ops, err, ex[0].Operation)
			}
			e.clock.Advance(11 * time.Second)
			if op := e.getOp(t, ex[0].Operation); !op.Done || op.Error != nil {
				t.Errorf("lost export's operation %+v, want done", op)
			}
			if objs := e.readObjects(t, "bucket", "lost/"); len(objs) == 0 {
				t.Error("the lost export wrote nothing")
			}
			// The fault was consumed: the next export answers.
			if _, err := e.export(t, testStore, gcsExport("gs://bucket/next")); err != nil {
				t.Errorf("next export: %v", err)
			}
		})
	}
}

func TestPeakRunningOperations(t *testing.T) {
	t.Parallel()
	const other = "projects/other-project/locations/us-central1/datasets/ds"
	e := newEnv(t, func(o *Options) { o.ExportDuration = 10 * time.Second })
	if err := e.srv.CreateDataset(other); err != nil {
		t.Fatal(err)
	}
	if err := e.srv.CreateFHIRStore(other+"/fhirStores/s", "R4"); err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		advance           time.Duration
		store             string
		wantPeak, wantRun int
	}{
		{0, testStore, 1, 1},
		{time.Second, testStore, 2, 2},
		{time.Second, other + "/fhirStores/s", 3, 3},
		{9 * time.Second, testStore, 3, 2}, // the first finished at 10 s
		{20 * time.Second, testStore, 3, 1},
	}
	for i, s := range steps {
		e.clock.Advance(s.advance)
		if _, err := e.export(t, s.store, gcsExport("gs://bucket/peak")); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		st := e.srv.Stats()
		if got := e.srv.PeakRunningOperations(); got != s.wantPeak || st.PeakRunningOperations != s.wantPeak || st.RunningOperations != s.wantRun {
			t.Errorf("step %d: peak %d, stats %+v; want peak %d, running %d", i, got, st, s.wantPeak, s.wantRun)
		}
	}
	if got := e.srv.PeakRunningOperationsIn(testProject); got != 2 {
		t.Errorf("peak in %s: %d, want 2", testProject, got)
	}
	status, b := rawDo(t, "GET", e.srv.URL+"/emulator/v1/stats", "")
	var st Stats
	if err := json.Unmarshal(b, &st); status != 200 || err != nil || st.PeakRunningOperations != 3 || st.AcceptedExports != 5 ||
		st.PeakRunningOperationsByProject["projects/other-project"] != 1 {
		t.Errorf("GET stats: %d %s", status, b)
	}
	status, b = rawDo(t, "GET", e.srv.URL+"/emulator/v1/exports", "")
	if status != 200 || strings.Count(string(b), `"operation"`) != 5 {
		t.Errorf("GET exports: %d %s", status, b)
	}
	e.srv.ResetPeakRunningOperations()
	if got := e.srv.PeakRunningOperations(); got != 0 {
		t.Errorf("peak after reset: %d", got)
	}
}

func TestAdminIndexAndSettings(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	status, b := rawDo(t, "GET", e.srv.URL+"/emulator/v1/", "")
	if status != 200 || strings.Count(string(b), `"path"`) != len(AdminEndpoints) {
		t.Errorf("index: %d %s", status, b)
	}
	rawDo(t, "POST", e.srv.URL+"/emulator/v1/timing", `{"exportDuration":"30s","exportSteps":3}`)
	rawDo(t, "POST", e.srv.URL+"/emulator/v1/limits", `{"maxRunningOperations":4}`)
	status, b = rawDo(t, "GET", e.srv.URL+"/emulator/v1/timing", "")
	if status != 200 || string(b) != `{"exportDuration":"30s","exportSteps":3,"maxRunningOperations":4}` {
		t.Errorf("timing: %d %s", status, b)
	}
}

func TestIDsUniqueAcrossInstances(t *testing.T) {
	t.Parallel()
	ids := func(deterministic bool) (op, res string) {
		e := New(Options{DeterministicIDs: deterministic})
		defer e.Close()
		if err := e.CreateDataset(testDataset); err != nil {
			t.Fatal(err)
		}
		if err := e.CreateFHIRStore(testStore, "R4"); err != nil {
			t.Fatal(err)
		}
		b, err := e.PutResource(testStore, []byte(`{"resourceType":"Patient"}`))
		if err != nil {
			t.Fatal(err)
		}
		var m struct{ ID string }
		json.Unmarshal(b, &m)
		e.mu.Lock()
		defer e.mu.Unlock()
		return e.newOperation(e.datasets[testDataset], exportMethod).id, m.ID
	}
	tests := []struct {
		name          string
		deterministic bool
	}{{"random per instance", false}, {"deterministic", true}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			op1, res1 := ids(tc.deterministic)
			op2, res2 := ids(tc.deterministic)
			if same := op1 == op2 && res1 == res2; same != tc.deterministic {
				t.Errorf("ids %s %s and %s %s: same=%v, want %v", op1, res1, op2, res2, same, tc.deterministic)
			}
			if !fhirIDRE.MatchString(res1) || strings.HasPrefix(op1, "-") {
				t.Errorf("malformed ids %s %s", op1, res1)
			}
		})
	}
}
