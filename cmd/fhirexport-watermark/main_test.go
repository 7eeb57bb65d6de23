package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"strings"
	"testing"

	"github.com/fsouza/fake-gcs-server/fakestorage"
)

// TestWatermarkCommand sets, shows, guards and resets a watermark in a state
// bucket on fake-gcs-server, as an operator would.
func TestWatermarkCommand(t *testing.T) {
	gcs, err := fakestorage.NewServerWithOptions(fakestorage.Options{Scheme: "http", Host: "127.0.0.1", Writer: io.Discard})
	if err != nil {
		t.Fatal(err)
	}
	defer gcs.Stop()
	gcs.CreateBucketWithOpts(fakestorage.CreateBucketOpts{Name: "state-b"})
	t.Setenv("STORAGE_EMULATOR_HOST", strings.TrimPrefix(gcs.URL(), "http://"))
	env := func(string) string { return "" }
	const store = "projects/p-1234/locations/us/datasets/d/fhirStores/s"
	base := []string{"--state", "gs://state-b/fx", "--store", store, "--name", "hourly"}
	cmd := func(extra ...string) (map[string]any, error) {
		var out bytes.Buffer
		err := run(context.Background(), append(append([]string{}, base...), extra...), &out, env)
		var m map[string]any
		if err == nil {
			if jerr := json.Unmarshal(out.Bytes(), &m); jerr != nil {
				t.Fatalf("output is not JSON: %s", out.Bytes())
			}
		}
		return m, err
	}

	got, err := cmd()
	if err != nil || got["watermark"] != nil || got["store"] != store {
		t.Fatalf("show on a new pipeline = %v, %v; want no watermark", got, err)
	}
	got, err = cmd("--set", "2026-01-01T02:00:00.5+02:00")
	if err != nil || got["watermark"] != "2026-01-01T00:00:00.5Z" {
		t.Fatalf("set = %v, %v; want the instant in UTC", got, err)
	}
	if _, err := cmd("--set", "yesterday"); err == nil || !strings.Contains(err.Error(), "--set") {
		t.Errorf("a bad --set value gave %v, want an error naming --set", err)
	}

	// A run in progress (its pending marker) blocks changes unless forced.
	pipeline := got["pipeline"].(string)
	w := gcs.Client().Bucket("state-b").Object("fx/pending/" + pipeline + ".json").NewWriter(context.Background())
	w.Write([]byte(`{"run":"r","operation":"projects/p/locations/us/datasets/d/operations/1"}`))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := cmd("--reset"); err == nil || !strings.Contains(err.Error(), "in progress") {
		t.Errorf("reset during a run gave %v, want a refusal", err)
	}
	got, err = cmd("--reset", "--force")
	if err != nil || got["watermark"] != nil || got["running"] == nil {
		t.Errorf("forced reset = %v, %v; want no watermark and the running operation shown", got, err)
	}

	for _, args := range [][]string{{"--store", store}, {"--spec", "x.json", "--name", "n"}, {"--state", "/tmp", "--store", store, "--name", "n"}} {
		if err := run(context.Background(), args, io.Discard, env); err == nil {
			t.Errorf("run(%q) succeeded, want a usage error", args)
		}
	}
}
