package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestGcloud drives the standalone emulator with the real Cloud SDK, as an
// operator would: a throwaway configuration without credentials whose
// healthcare endpoint is the emulator.
func TestGcloud(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: gcloud takes a few seconds per command")
	}
	gcloud, err := exec.LookPath("gcloud")
	if err != nil {
		t.Skip("the Cloud SDK (gcloud) is not installed: skipping the gcloud end-to-end test")
	}
	t.Parallel()
	dir := t.TempDir()
	url, _ := startRun(t, "--gcs-dir", filepath.Join(dir, "gcs"), "--gcs-buckets", "exports", "--seed-patients", "2")
	env := append(os.Environ(), "CLOUDSDK_CONFIG="+filepath.Join(dir, "config"), "CLOUDSDK_CORE_DISABLE_PROMPTS=1")
	gc := func(t *testing.T, args ...string) string {
		t.Helper()
		cmd := exec.Command(gcloud, args...)
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("gcloud %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	gc(t, "config", "set", "auth/disable_credentials", "true")
	gc(t, "config", "set", "api_endpoint_overrides/healthcare", url+"/")
	gc(t, "config", "set", "core/project", "local-project")
	loc := "--location=us-central1"
	steps := []struct {
		name string
		args []string
		want []string // substrings of the output
	}{
		{"datasets create", []string{"datasets", "create", "ds1", loc}, []string{"Created dataset [ds1]"}},
		{"datasets list", []string{"datasets", "list", loc, "--format=value(ID)"}, []string{"demo", "ds1"}},
		{"datasets describe", []string{"datasets", "describe", "ds1", loc}, []string{"datasets/ds1"}},
		{"datasets update", []string{"datasets", "update", "ds1", loc, "--time-zone=Europe/Paris"}, []string{"timeZone: Europe/Paris"}},
		{"fhir-stores create", []string{"fhir-stores", "create", "fs1", "--dataset=ds1", loc, "--version=R4"}, []string{"Created fhirStore [fs1]"}},
		{"fhir-stores list", []string{"fhir-stores", "list", "--dataset=ds1", loc, "--format=value(ID)"}, []string{"fs1"}},
		{"fhir-stores describe", []string{"fhir-stores", "describe", "fs1", "--dataset=ds1", loc}, []string{"version: R4"}},
		{"fhir-stores update", []string{"fhir-stores", "update", "fs1", "--dataset=ds1", loc, "--enable-update-create", "--pubsub-topic=projects/local-project/topics/changes"},
			[]string{"enableUpdateCreate: true", "pubsubTopic: projects/local-project/topics/changes"}},
		{"export gcs", []string{"fhir-stores", "export", "gcs", "demo-store", "--dataset=demo", loc, "--gcs-uri=gs://exports/run1"}, []string{"done"}},
		{"export bq", []string{"fhir-stores", "export", "bq", "demo-store", "--dataset=demo", loc, "--bq-dataset=bq://local-project.analytics", "--schema-type=analytics"}, []string{"done"}},
		{"operations list", []string{"operations", "list", "--dataset=demo", loc, "--format=value(ID,DONE)"}, []string{"True"}},
	}
	for _, s := range steps {
		out := gc(t, append([]string{"healthcare"}, s.args...)...)
		for _, w := range s.want {
			if !strings.Contains(out, w) {
				t.Errorf("%s: output %q lacks %q", s.name, out, w)
			}
		}
	}
	ids := strings.Fields(gc(t, "healthcare", "operations", "list", "--dataset=demo", loc, "--format=value(ID)"))
	if len(ids) != 2 {
		t.Fatalf("operations %v, want the two exports", ids)
	}
	for _, id := range ids {
		out := gc(t, "healthcare", "operations", "describe", id, "--dataset=demo", loc, "--format=value(metadata.apiMethodName,done)")
		if !strings.Contains(out, "ExportResources") || !strings.Contains(out, "True") {
			t.Errorf("operations describe %s: %q", id, out)
		}
	}
	objs, _ := filepath.Glob(filepath.Join(dir, "gcs", "exports", "run1", "*_Patient"))
	if len(objs) != 1 {
		t.Errorf("Patient objects of the gcs export: %v", objs)
	}
}
