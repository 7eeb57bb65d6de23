package main

import (
	"bytes"
	"context"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	pb "cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"cloud.google.com/go/pubsub/v2/pstest"
	"google.golang.org/api/googleapi"
	healthcare "google.golang.org/api/healthcare/v1"
	"google.golang.org/api/option"

	"github.com/fhirexport/fhirexport/healthcaretest"
)

const demoStore = "projects/local-project/locations/us-central1/datasets/demo/fhirStores/demo-store"

func service(t *testing.T, url string) *healthcare.Service {
	t.Helper()
	svc, err := healthcare.NewService(context.Background(), option.WithEndpoint(url), option.WithoutAuthentication())
	if err != nil {
		t.Fatal(err)
	}
	return svc
}

func TestGCSDir(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	url, lines := startRun(t, "--gcs-dir", dir, "--gcs-buckets", "exports", "--seed-patients", "2", "--fake-clock", "2025-01-01T00:00:00Z")
	if !strings.Contains(strings.Join(lines, "\n"), "Cloud Storage exports go to "+dir) {
		t.Errorf("startup lines %q do not name the folder", lines)
	}
	svc := service(t, url)
	op, err := svc.Projects.Locations.Datasets.FhirStores.Export(demoStore, &healthcare.ExportResourcesRequest{
		GcsDestination: &healthcare.GoogleCloudHealthcareV1FhirGcsDestination{UriPrefix: "gs://exports/run1"}}).Do()
	if err != nil {
		t.Fatal(err)
	}
	if got, err := svc.Projects.Locations.Datasets.Operations.Get(op.Name).Do(); err != nil || !got.Done || got.Error != nil {
		t.Fatalf("operation %+v %v", got, err)
	}
	var files []string
	filepath.WalkDir(filepath.Join(dir, "exports"), func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.Contains(p, "_Patient") {
			b, _ := os.ReadFile(p)
			if bytes.Count(b, []byte("\n")) == 2 {
				files = append(files, p)
			}
		}
		return nil
	})
	if len(files) != 1 {
		t.Errorf("Patient NDJSON with 2 lines under %s: %v", dir, files)
	}
}

func TestNoStorageWarnsAndRejects(t *testing.T) {
	t.Parallel()
	url, lines := startRun(t)
	if !strings.Contains(strings.Join(lines, "\n"), "WARNING: no Cloud Storage configured") {
		t.Errorf("startup lines %q, want a warning", lines)
	}
	_, err := service(t, url).Projects.Locations.Datasets.FhirStores.Export(demoStore, &healthcare.ExportResourcesRequest{
		GcsDestination: &healthcare.GoogleCloudHealthcareV1FhirGcsDestination{UriPrefix: "gs://exports/x"}}).Do()
	gerr, ok := err.(*googleapi.Error)
	if !ok || gerr.Code != 400 || !strings.Contains(string(gerr.Body), "FAILED_PRECONDITION") || !strings.Contains(gerr.Message, "--gcs-dir") {
		t.Errorf("export without storage: %v, want 400 FAILED_PRECONDITION naming --gcs-dir", err)
	}
}

func TestPubSubFlag(t *testing.T) {
	t.Parallel()
	ps := pstest.NewServer()
	defer ps.Close()
	const topic = "projects/local-project/topics/changes"
	if _, err := ps.GServer.CreateTopic(context.Background(), &pb.Topic{Name: topic}); err != nil {
		t.Fatal(err)
	}
	url, _ := startRun(t, "--pubsub", ps.Addr, "--notify", topic)
	req, _ := http.NewRequest("POST", url+"/v1/"+demoStore+"/fhir/Patient", strings.NewReader(`{"resourceType":"Patient"}`))
	req.Header.Set("Content-Type", "application/fhir+json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 201 {
		t.Fatalf("create: %v %v", resp, err)
	}
	resp.Body.Close()
	msgs := ps.Messages()
	if len(msgs) != 1 || msgs[0].Attributes["action"] != healthcaretest.ActionCreate ||
		!strings.HasPrefix(string(msgs[0].Data), demoStore+"/fhir/Patient/") {
		t.Errorf("published %+v, want one CreateResource notification", msgs)
	}
}

func TestHelpDocumentsAdminAPI(t *testing.T) {
	t.Parallel()
	var out bytes.Buffer
	if err := run(context.Background(), []string{"--help"}, &out, func(string) string { return "" }); err != nil {
		t.Fatal(err)
	}
	for _, ep := range healthcaretest.AdminEndpoints {
		if !strings.Contains(out.String(), ep.Method+" "+ep.Path) {
			t.Errorf("--help does not document %s %s", ep.Method, ep.Path)
		}
		if ep.Body != "" && !strings.Contains(out.String(), "-d '"+ep.Body+"'") {
			t.Errorf("--help has no example for %s %s", ep.Method, ep.Path)
		}
	}
	for _, f := range []string{"--gcs-dir", "--pubsub", "STORAGE_EMULATOR_HOST"} {
		if !strings.Contains(out.String(), strings.TrimPrefix(f, "-")) {
			t.Errorf("--help does not mention %s", f)
		}
	}
}
