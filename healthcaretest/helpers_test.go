package healthcaretest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"cloud.google.com/go/storage"
	"github.com/fsouza/fake-gcs-server/fakestorage"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/api/googleapi"
	healthcare "google.golang.org/api/healthcare/v1"
	"google.golang.org/api/iterator"
	"google.golang.org/api/option"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

var epoch = time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)

const (
	testProject = "projects/test-project"
	testDataset = "projects/test-project/locations/us-central1/datasets/ds"
	testStore   = testDataset + "/fhirStores/store"
)

// env is one emulator with a FakeClock, a fake GCS server with bucket
// "bucket", a dataset and an R4 store, and real clients for both.
type env struct {
	clock *FakeClock
	srv   *Server
	svc   *healthcare.Service
	gcs   *storage.Client
	ctx   context.Context
}

func newEnv(t testing.TB, mod func(*Options)) *env {
	t.Helper()
	ctx := context.Background()
	gsrv, err := fakestorage.NewServerWithOptions(fakestorage.Options{Scheme: "http", Host: "127.0.0.1", Port: 0, NoListener: false, Writer: io.Discard})
	if err != nil {
		t.Fatalf("fake GCS server: %v", err)
	}
	t.Cleanup(gsrv.Stop)
	gsrv.CreateBucket("bucket")
	gcs, err := storage.NewClient(ctx, option.WithEndpoint(gsrv.URL()+"/storage/v1/"), option.WithoutAuthentication(), storage.WithJSONReads())
	if err != nil {
		t.Fatalf("storage client: %v", err)
	}
	t.Cleanup(func() { gcs.Close() })
	clock := NewFakeClock(epoch)
	opts := Options{Clock: clock, Storage: gcs, Logf: func(string, ...any) {}}
	if mod != nil {
		mod(&opts)
	}
	srv := NewServer(t, opts)
	svc, err := srv.Service(ctx)
	if err != nil {
		t.Fatalf("healthcare client: %v", err)
	}
	if err := srv.CreateDataset(testDataset); err != nil {
		t.Fatal(err)
	}
	if err := srv.CreateFHIRStore(testStore, "R4"); err != nil {
		t.Fatal(err)
	}
	return &env{clock: clock, srv: srv, svc: svc, gcs: gcs, ctx: ctx}
}

func (e *env) export(t testing.TB, store string, req *healthcare.ExportResourcesRequest) (*healthcare.Operation, error) {
	t.Helper()
	return e.svc.Projects.Locations.Datasets.FhirStores.Export(store, req).Context(e.ctx).Do()
}

func (e *env) mustExport(t testing.TB, req *healthcare.ExportResourcesRequest) *healthcare.Operation {
	t.Helper()
	op, err := e.export(t, testStore, req)
	if err != nil {
		t.Fatalf("export: %v", err)
	}
	return op
}

func (e *env) getOp(t testing.TB, name string) *healthcare.Operation {
	t.Helper()
	op, err := e.svc.Projects.Locations.Datasets.Operations.Get(name).Context(e.ctx).Do()
	if err != nil {
		t.Fatalf("operations.get: %v", err)
	}
	return op
}

func gcsExport(prefix string) *healthcare.ExportResourcesRequest {
	return &healthcare.ExportResourcesRequest{GcsDestination: &healthcare.GoogleCloudHealthcareV1FhirGcsDestination{UriPrefix: prefix}}
}

// fhirCall sends a FHIR interaction through the real client and returns the
// status and body.
func fhirDo(t testing.TB, resp *http.Response, err error) (int, []byte) {
	t.Helper()
	if err != nil {
		t.Fatalf("FHIR call: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, b
}

func (e *env) fhirCreate(t testing.TB, typ string, body string) map[string]any {
	t.Helper()
	call := e.svc.Projects.Locations.Datasets.FhirStores.Fhir.Create(testStore, typ, strings.NewReader(body))
	call.Header().Set("Content-Type", "application/fhir+json")
	resp, err := call.Context(e.ctx).Do()
	status, b := fhirDo(t, resp, err)
	if status != http.StatusCreated {
		t.Fatalf("create %s: %d %s", typ, status, b)
	}
	return decodeMap(t, b)
}

func (e *env) fhirUpdate(t testing.TB, typ, id, body string) (int, map[string]any) {
	t.Helper()
	call := e.svc.Projects.Locations.Datasets.FhirStores.Fhir.Update(testStore+"/fhir/"+typ+"/"+id, strings.NewReader(body))
	call.Header().Set("Content-Type", "application/fhir+json")
	resp, err := call.Context(e.ctx).Do()
	status, b := fhirDo(t, resp, err)
	return status, decodeMap(t, b)
}

func decodeMap(t testing.TB, b []byte) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("decoding %s: %v", b, err)
	}
	return m
}

// readObjects returns the objects under prefix in bucket, by name.
func (e *env) readObjects(t testing.TB, bucket, prefix string) map[string]string {
	t.Helper()
	out := map[string]string{}
	it := e.gcs.Bucket(bucket).Objects(e.ctx, &storage.Query{Prefix: prefix})
	for {
		a, err := it.Next()
		if errors.Is(err, iterator.Done) {
			break
		}
		if err != nil {
			t.Fatalf("listing objects: %v", err)
		}
		r, err := e.gcs.Bucket(bucket).Object(a.Name).NewReader(e.ctx)
		if err != nil {
			t.Fatalf("reading %s: %v", a.Name, err)
		}
		b, err := io.ReadAll(r)
		r.Close()
		if err != nil {
			t.Fatal(err)
		}
		out[a.Name] = string(b)
	}
	return out
}

// wantNDJSON builds the expected objects of an export from the store's
// current resources, filtered by keep.
func wantNDJSON(res []json.RawMessage, objPrefix string, keep func(typ string, m map[string]any) bool) map[string]string {
	out := map[string]string{}
	for _, r := range res {
		var m map[string]any
		json.Unmarshal(r, &m)
		typ := m["resourceType"].(string)
		if keep != nil && !keep(typ, m) {
			continue
		}
		out[objPrefix+typ] += string(r) + "\n"
	}
	return out
}

func opID(name string) string { return name[strings.LastIndex(name, "/")+1:] }

// apiErr asserts err is a *googleapi.Error with code and a message
// containing substr.
func apiErr(t testing.TB, err error, code int, substr string) *googleapi.Error {
	t.Helper()
	var gerr *googleapi.Error
	if !errors.As(err, &gerr) {
		t.Fatalf("got error %v (%T), want *googleapi.Error %d", err, err, code)
	}
	if gerr.Code != code || !strings.Contains(gerr.Message, substr) {
		t.Fatalf("got %d %q, want %d containing %q", gerr.Code, gerr.Message, code, substr)
	}
	return gerr
}

// golden compares got (JSON) with testdata/name, rewriting it with -update.
func golden(t testing.TB, name string, got []byte) {
	t.Helper()
	var v any
	if err := json.Unmarshal(got, &v); err != nil {
		t.Fatalf("golden %s: invalid JSON %s: %v", name, got, err)
	}
	pretty, _ := json.MarshalIndent(v, "", "  ")
	pretty = append(pretty, '\n')
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, pretty, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("golden %s: %v (run go test -update)", name, err)
	}
	if diff := cmp.Diff(string(want), string(pretty)); diff != "" {
		t.Errorf("golden %s mismatch (-want +got):\n%s", name, diff)
	}
}

// rawGet fetches a path of the emulator over plain HTTP, as the client would
// with ?alt=json&prettyPrint=false, and returns the status and body.
func rawDo(t testing.TB, method, url, body string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, bytes.NewReader([]byte(body)))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}
