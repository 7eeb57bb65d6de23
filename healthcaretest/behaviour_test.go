package healthcaretest

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/api/googleapi"
	healthcare "google.golang.org/api/healthcare/v1"
)

func bqExport(uri, disposition string, force bool) *healthcare.ExportResourcesRequest {
	return &healthcare.ExportResourcesRequest{BigqueryDestination: &healthcare.GoogleCloudHealthcareV1FhirBigQueryDestination{
		DatasetUri:       uri,
		SchemaConfig:     &healthcare.SchemaConfig{SchemaType: "ANALYTICS_V2"},
		WriteDisposition: disposition,
		Force:            force,
	}}
}

func opError(op *healthcare.Operation) string {
	if op.Error == nil {
		return ""
	}
	return fmt.Sprintf("%d %s", op.Error.Code, op.Error.Message)
}

func TestBigQueryDispositions(t *testing.T) {
	t.Parallel()
	old := json.RawMessage(`{"resourceType":"Patient","id":"old"}`)
	other := json.RawMessage(`{"resourceType":"Device","id":"dev"}`)
	tests := []struct {
		name        string
		disposition string
		force       bool
		wantErr     string // substring of the operation error
		wantOld     bool   // the old Patient row survives
		wantOther   bool   // the unrelated Device table survives
	}{
		{name: "unspecified is WRITE_EMPTY", wantErr: "9 BigQuery table bq://proj-1.ds.Patient is not empty", wantOld: true, wantOther: true},
		{name: "WRITE_EMPTY", disposition: "WRITE_EMPTY", wantErr: "WRITE_EMPTY", wantOld: true, wantOther: true},
		{name: "WRITE_TRUNCATE", disposition: "WRITE_TRUNCATE", wantOther: true},
		{name: "WRITE_APPEND", disposition: "WRITE_APPEND", wantOld: true, wantOther: true},
		{name: "force deletes all tables", force: true},
		{name: "disposition wins over force", disposition: "WRITE_APPEND", force: true, wantOld: true, wantOther: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, nil)
			e.srv.Seed(testStore, 5, 3)
			const uri = "bq://proj-1.ds"
			e.srv.PutBigQueryRows(uri, "Patient", old)
			e.srv.PutBigQueryRows(uri, "Device", other)
			op := e.getOp(t, e.mustExport(t, bqExport(uri, tc.disposition, tc.force)).Name)
			if got := opError(op); !strings.Contains(got, tc.wantErr) || (tc.wantErr == "") != (got == "") {
				t.Fatalf("operation error %q, want %q", got, tc.wantErr)
			}
			want := map[string][]json.RawMessage{}
			if tc.wantOld {
				want["Patient"] = append(want["Patient"], old)
			}
			if tc.wantOther {
				want["Device"] = []json.RawMessage{other}
			}
			if tc.wantErr == "" {
				for _, r := range e.srv.Resources(testStore) {
					var m struct{ ResourceType string }
					json.Unmarshal(r, &m)
					want[m.ResourceType] = append(want[m.ResourceType], r)
				}
			}
			got := map[string][]json.RawMessage{}
			for _, table := range e.srv.BigQueryTables(uri) {
				got[table] = e.srv.BigQueryTable(uri, table)
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("tables (-want +got):\n%s", diff)
			}
		})
	}
	t.Run("empty dataset then append twice", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, nil)
		e.srv.Seed(testStore, 5, 1)
		n := len(e.srv.Resources(testStore))
		for i, d := range []string{"", "WRITE_APPEND"} {
			if op := e.getOp(t, e.mustExport(t, bqExport("bq://proj-1.fresh", d, false)).Name); op.Error != nil {
				t.Fatalf("export %d: %s", i, opError(op))
			}
		}
		total := 0
		for _, table := range e.srv.BigQueryTables("bq://proj-1.fresh") {
			total += len(e.srv.BigQueryTable("bq://proj-1.fresh", table))
		}
		if total != 2*n {
			t.Errorf("%d rows, want %d", total, 2*n)
		}
	})
}

func TestFailureInjection(t *testing.T) {
	t.Parallel()
	for _, code := range []int{429, 500, 503} {
		t.Run(fmt.Sprint(code), func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, nil)
			e.srv.FailNext("fhirStores.export", 2, code)
			for i := 0; i < 2; i++ {
				_, err := e.export(t, testStore, gcsExport("gs://bucket/f"))
				apiErr(t, err, code, "injected")
			}
			if len(e.srv.ExportRequests()) != 2 {
				t.Errorf("recorded %d export requests, want 2", len(e.srv.ExportRequests()))
			}
			// The failures had no effect: no operation exists yet.
			ops, err := e.svc.Projects.Locations.Datasets.Operations.List(testDataset).Do()
			if err != nil || len(ops.Operations) != 0 {
				t.Fatalf("operations after injected failures: %v %v", ops, err)
			}
			e.mustExport(t, gcsExport("gs://bucket/f"))
		})
	}
	t.Run("drop connection", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, nil)
		e.srv.FailNext("*", 1, 0)
		_, err := e.export(t, testStore, gcsExport("gs://bucket/f"))
		var gerr *googleapi.Error
		if err == nil || errors.As(err, &gerr) {
			t.Fatalf("got %v, want a transport error", err)
		}
		e.mustExport(t, gcsExport("gs://bucket/f"))
	})
	t.Run("rate is reproducible", func(t *testing.T) {
		t.Parallel()
		pattern := func() string {
			e := newEnv(t, nil)
			op := e.mustExport(t, gcsExport("gs://bucket/r"))
			e.srv.FailRate("operations.get", 0.5, 42, 500, 503)
			var b strings.Builder
			for i := 0; i < 40; i++ {
				_, err := e.svc.Projects.Locations.Datasets.Operations.Get(op.Name).Do()
				var gerr *googleapi.Error
				switch {
				case err == nil:
					b.WriteByte('.')
				case errors.As(err, &gerr):
					fmt.Fprintf(&b, "%d", gerr.Code/100)
				default:
					t.Fatalf("unexpected error %v", err)
				}
			}
			return b.String()
		}
		a, b := pattern(), pattern()
		if a != b {
			t.Errorf("same seed, different failures:\n%s\n%s", a, b)
		}
		if !strings.Contains(a, ".") || !strings.Contains(a, "5") {
			t.Errorf("pattern %s: want both successes and failures", a)
		}
	})
}

func TestMaxRunningOperations(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(o *Options) { o.MaxRunningOperations, o.ExportDuration = 2, time.Minute })
	first := e.mustExport(t, gcsExport("gs://bucket/m"))
	e.clock.Advance(30 * time.Second)
	e.mustExport(t, gcsExport("gs://bucket/m"))
	_, err := e.export(t, testStore, gcsExport("gs://bucket/m"))
	apiErr(t, err, 429, "MaxRunningOperations")
	var gerr *googleapi.Error
	errors.As(err, &gerr)
	// Another project is not limited.
	other := "projects/other/locations/us-central1/datasets/ds"
	e.srv.CreateDataset(other)
	e.srv.CreateFHIRStore(other+"/fhirStores/s", "R4")
	if _, err := e.export(t, other+"/fhirStores/s", gcsExport("gs://bucket/m")); err != nil {
		t.Fatalf("other project: %v", err)
	}
	e.clock.Advance(31 * time.Second) // the first is due; the export call notices it
	if _, err := e.export(t, testStore, gcsExport("gs://bucket/m")); err != nil {
		t.Fatalf("after the first finished: %v", err)
	}
	if op := e.getOp(t, first.Name); !op.Done {
		t.Errorf("first operation not done")
	}
	e.srv.SetMaxRunningOperations(0)
	e.mustExport(t, gcsExport("gs://bucket/m"))
}

func counter(t *testing.T, op *healthcare.Operation) map[string]string {
	t.Helper()
	var md healthcare.OperationMetadata
	if err := json.Unmarshal(op.Metadata, &md); err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	if c := md.Counter; c != nil {
		for k, v := range map[string]int64{"success": c.Success, "failure": c.Failure, "pending": c.Pending} {
			if v != 0 {
				out[k] = fmt.Sprint(v)
			}
		}
	}
	return out
}

func TestProgressCounters(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(o *Options) { o.ExportDuration, o.ExportSteps = 100*time.Second, 4 })
	for i := 0; i < 10; i++ {
		e.srv.PutResource(testStore, []byte(`{"resourceType":"Patient"}`))
	}
	e.clock.Advance(time.Second) // createTime on the clock, not ahead of it
	op := e.mustExport(t, gcsExport("gs://bucket/p"))
	steps := []struct {
		advance time.Duration
		want    map[string]string
		done    bool
	}{
		{0, map[string]string{"pending": "10"}, false},
		{24 * time.Second, map[string]string{"pending": "10"}, false},
		{1 * time.Second, map[string]string{"success": "2", "pending": "8"}, false}, // 25 s: 1 of 4 steps
		{25 * time.Second, map[string]string{"success": "5", "pending": "5"}, false},
		{49 * time.Second, map[string]string{"success": "7", "pending": "3"}, false}, // 99 s: 3 steps
		{time.Second, map[string]string{"success": "10"}, true},
		{time.Hour, map[string]string{"success": "10"}, true},
	}
	var endTime string
	for i, s := range steps {
		e.clock.Advance(s.advance)
		got := e.getOp(t, op.Name)
		if diff := cmp.Diff(s.want, counter(t, got)); diff != "" || got.Done != s.done {
			t.Errorf("step %d: done %v (want %v), counter (-want +got):\n%s", i, got.Done, s.done, diff)
		}
		var md healthcare.OperationMetadata
		json.Unmarshal(got.Metadata, &md)
		if s.done {
			if endTime == "" {
				endTime = md.EndTime
			}
			if md.EndTime != endTime {
				t.Errorf("endTime changed from %s to %s", endTime, md.EndTime)
			}
		}
	}
	if endTime != "2025-03-01T12:01:41Z" {
		t.Errorf("endTime %s, want the first observation at which it was done", endTime)
	}
}

func lastUpdated(t *testing.T, raw []byte) time.Time {
	t.Helper()
	var m struct{ Meta struct{ LastUpdated string } }
	json.Unmarshal(raw, &m)
	lu, err := time.Parse(time.RFC3339Nano, m.Meta.LastUpdated)
	if err != nil {
		t.Fatalf("lastUpdated of %s: %v", raw, err)
	}
	return lu
}

func createTime(t *testing.T, op *healthcare.Operation) string {
	var md healthcare.OperationMetadata
	json.Unmarshal(op.Metadata, &md)
	return md.CreateTime
}

func TestSnapshotAndIncrementalSince(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(o *Options) { o.ExportDuration = 10 * time.Second })
	p := e.fhirCreate(t, "Patient", `{"resourceType":"Patient","gender":"female"}`)
	o := e.fhirCreate(t, "Observation", `{"resourceType":"Observation","status":"final","code":{"text":"x"}}`)
	first := e.mustExport(t, gcsExport("gs://bucket/inc"))
	// Changes after the export call are not in its snapshot.
	_, upd := e.fhirUpdate(t, "Patient", p["id"].(string), `{"resourceType":"Patient","id":"`+p["id"].(string)+`","gender":"male"}`)
	late := e.fhirCreate(t, "Condition", `{"resourceType":"Condition","subject":{"reference":"Patient/`+p["id"].(string)+`"}}`)
	delResp, err := e.svc.Projects.Locations.Datasets.FhirStores.Fhir.Delete(testStore + "/fhir/Observation/" + o["id"].(string)).Do()
	fhirDo(t, delResp, err)
	e.clock.Advance(11 * time.Second)
	done := e.getOp(t, first.Name)
	objs := e.readObjects(t, "bucket", "inc/"+opID(first.Name))
	if len(objs) != 2 || !strings.Contains(objs["inc/"+opID(first.Name)+"_Patient"], `"female"`) || !strings.Contains(objs["inc/"+opID(first.Name)+"_Observation"], `"final"`) {
		t.Fatalf("first export %v: want the snapshot at the export call", objs)
	}
	// The next export from the first's createTime has exactly the later changes.
	req := gcsExport("gs://bucket/inc2")
	req.Since = createTime(t, done)
	second := e.mustExport(t, req)
	e.clock.Advance(11 * time.Second)
	if op := e.getOp(t, second.Name); !op.Done || op.Error != nil {
		t.Fatalf("second export: done=%v %s", op.Done, opError(op))
	}
	objs = e.readObjects(t, "bucket", "inc2/")
	b, _ := json.Marshal(upd)
	c, _ := json.Marshal(late)
	want := map[string]string{
		"inc2/" + opID(second.Name) + "_Patient":   string(b) + "\n",
		"inc2/" + opID(second.Name) + "_Condition": string(c) + "\n",
	}
	if diff := cmp.Diff(want, objs); diff != "" {
		t.Errorf("second export (-want +got):\n%s", diff)
	}
}

func TestTimestampsStrictlyIncreasingOnFrozenClock(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil) // the FakeClock never moves in this test
	var stamps []time.Time
	for i := 0; i < 5; i++ {
		r := e.fhirCreate(t, "Patient", `{"resourceType":"Patient"}`)
		b, _ := json.Marshal(r)
		stamps = append(stamps, lastUpdated(t, b))
		op := e.getOp(t, e.mustExport(t, gcsExport("gs://bucket/ts")).Name)
		var md healthcare.OperationMetadata
		json.Unmarshal(op.Metadata, &md)
		for _, s := range []string{md.CreateTime, md.EndTime} {
			ts, err := time.Parse(time.RFC3339Nano, s)
			if err != nil {
				t.Fatal(err)
			}
			stamps = append(stamps, ts)
		}
	}
	for i := 1; i < len(stamps); i++ {
		if !stamps[i].After(stamps[i-1]) {
			t.Fatalf("timestamp %d %v not after %v", i, stamps[i], stamps[i-1])
		}
		if stamps[i].Sub(stamps[i-1]) != time.Microsecond {
			t.Errorf("timestamp %d: step %v, want 1µs on a frozen clock", i, stamps[i].Sub(stamps[i-1]))
		}
	}
	if !stamps[0].After(epoch) && !stamps[0].Equal(epoch) {
		t.Errorf("first stamp %v before the clock", stamps[0])
	}
}

func TestExportErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		prefix  string
		mod     func(*Options)
		wantErr string
	}{
		{"missing bucket", "gs://no-such-bucket/x", nil, `5 Cloud Storage bucket "no-such-bucket"`},
	}
	t.Run("no storage client", func(t *testing.T) {
		t.Parallel()
		if os.Getenv("STORAGE_EMULATOR_HOST") != "" {
			t.Skip("STORAGE_EMULATOR_HOST is set")
		}
		e := newEnv(t, func(o *Options) { o.Storage = nil })
		_, err := e.export(t, testStore, gcsExport("gs://bucket/x"))
		gerr := apiErr(t, err, 400, "no Cloud Storage")
		if !strings.Contains(string(gerr.Body), `"FAILED_PRECONDITION"`) || len(e.srv.Exports()) != 0 {
			t.Errorf("%s; %d exports accepted", gerr.Body, len(e.srv.Exports()))
		}
	})
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if tc.mod != nil && os.Getenv("STORAGE_EMULATOR_HOST") != "" {
				t.Skip("STORAGE_EMULATOR_HOST is set")
			}
			e := newEnv(t, tc.mod)
			e.srv.PutResource(testStore, []byte(`{"resourceType":"Patient"}`))
			op := e.getOp(t, e.mustExport(t, gcsExport(tc.prefix)).Name)
			if !op.Done || !strings.HasPrefix(opError(op), tc.wantErr) {
				t.Errorf("got done=%v error %q, want %q", op.Done, opError(op), tc.wantErr)
			}
			if c := counter(t, op); c["failure"] != "1" {
				t.Errorf("counter %v, want failure 1", c)
			}
		})
	}
	t.Run("forced next outcomes apply in order", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, nil)
		e.srv.Seed(testStore, 9, 2)
		e.srv.ForceNextOutcomes(Outcome{ErrorCode: 14, ErrorMessage: "backend unavailable"}, Outcome{FailureCount: 2})
		a := e.getOp(t, e.mustExport(t, gcsExport("gs://bucket/a")).Name)
		b := e.getOp(t, e.mustExport(t, gcsExport("gs://bucket/b")).Name)
		c := e.getOp(t, e.mustExport(t, gcsExport("gs://bucket/c")).Name)
		if opError(a) != "14 backend unavailable" || len(e.readObjects(t, "bucket", "a/")) != 0 {
			t.Errorf("first: %q, want the forced error and no objects", opError(a))
		}
		n := len(e.srv.Resources(testStore))
		lines := 0
		for _, v := range e.readObjects(t, "bucket", "b/") {
			lines += strings.Count(v, "\n")
		}
		if cb := counter(t, b); b.Error != nil || cb["failure"] != "2" || cb["success"] != fmt.Sprint(n-2) || lines != n-2 {
			t.Errorf("second: %v %v, %d lines; want failure 2, success %d", opError(b), cb, lines, n-2)
		}
		if c.Error != nil || counter(t, c)["failure"] != "" {
			t.Errorf("third: %v %v, want a plain success", opError(c), counter(t, c))
		}
	})
	t.Run("force outcome of finished operation", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, nil)
		op := e.getOp(t, e.mustExport(t, gcsExport("gs://bucket/a")).Name)
		if err := e.srv.ForceOutcome(op.Name, Outcome{ErrorCode: 13}); err == nil {
			t.Error("ForceOutcome on a done operation: want an error")
		}
		if err := e.srv.ForceOutcome(testDataset+"/operations/1", Outcome{ErrorCode: 13}); err == nil {
			t.Error("ForceOutcome on an unknown operation: want an error")
		}
	})
}
