package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"google.golang.org/api/googleapi"
	healthcare "google.golang.org/api/healthcare/v1"
	"google.golang.org/api/option"
)

// startRun runs run in-process on a random port and returns the base URL
// and the startup lines it printed.
func startRun(t *testing.T, args ...string) (string, []string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	errc := make(chan error, 1)
	go func() {
		err := run(ctx, append([]string{"--addr", "127.0.0.1:0"}, args...), pw, func(string) string { return "" })
		pw.Close()
		errc <- err
	}()
	sc := bufio.NewScanner(pr)
	var url string
	var lines []string
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if u, ok := strings.CutPrefix(sc.Text(), "healthcare emulator listening on "); ok {
			url = u
		}
		if strings.HasPrefix(sc.Text(), "admin API:") {
			break
		}
	}
	go io.Copy(io.Discard, pr)
	if url == "" {
		cancel()
		t.Fatalf("no URL printed: %v", <-errc)
	}
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-errc:
			if err != nil {
				t.Errorf("run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("run did not stop")
		}
	})
	return url, lines
}

func TestRunServesSeededStore(t *testing.T) {
	t.Parallel()
	url, _ := startRun(t, "--seed-patients", "3", "--fake-clock", "2025-01-01T00:00:00Z", "--export-duration", "10s", "--export-steps", "2", "--max-running-operations", "1")
	ctx := context.Background()
	svc, err := healthcare.NewService(ctx, option.WithEndpoint(url), option.WithoutAuthentication())
	if err != nil {
		t.Fatal(err)
	}
	const store = "projects/local-project/locations/us-central1/datasets/demo/fhirStores/demo-store"
	st, err := svc.Projects.Locations.Datasets.FhirStores.Get(store).Do()
	if err != nil || st.Version != "R4" {
		t.Fatalf("store: %v %v", st, err)
	}
	req := &healthcare.ExportResourcesRequest{BigqueryDestination: &healthcare.GoogleCloudHealthcareV1FhirBigQueryDestination{
		DatasetUri: "bq://local-project.demo", SchemaConfig: &healthcare.SchemaConfig{SchemaType: "ANALYTICS"}}}
	op, err := svc.Projects.Locations.Datasets.FhirStores.Export(store, req).Do()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := svc.Projects.Locations.Datasets.FhirStores.Export(store, req).Do(); err == nil || err.(*googleapi.Error).Code != 429 {
		t.Errorf("second running export: %v, want 429", err)
	}
	post := func(path, body string) {
		t.Helper()
		resp, err := http.Post(url+path, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("POST %s: %d %s", path, resp.StatusCode, b)
		}
	}
	post("/emulator/v1/clock", `{"advance":"11s"}`)
	got, err := svc.Projects.Locations.Datasets.Operations.Get(op.Name).Do()
	if err != nil || !got.Done || got.Error != nil {
		t.Fatalf("operation: %+v %v", got, err)
	}
	resp, err := http.Get(url + "/emulator/v1/bigquery/bq://local-project.demo/Patient")
	if err != nil {
		t.Fatal(err)
	}
	var rows struct{ Rows []json.RawMessage }
	json.NewDecoder(resp.Body).Decode(&rows)
	resp.Body.Close()
	if len(rows.Rows) != 3 {
		t.Errorf("%d Patient rows, want 3", len(rows.Rows))
	}
	post("/emulator/v1/faults", `{"method":"fhirStores.get","count":1,"code":503}`)
	if _, err := svc.Projects.Locations.Datasets.FhirStores.Get(store).Do(); err == nil || err.(*googleapi.Error).Code != 503 {
		t.Errorf("after the fault: %v, want 503", err)
	}
	post("/emulator/v1/outcomes", `{"errorCode":13,"errorMessage":"boom"}`)
	req.BigqueryDestination.WriteDisposition = "WRITE_APPEND"
	op, err = svc.Projects.Locations.Datasets.FhirStores.Export(store, req).Do()
	if err != nil {
		t.Fatal(err)
	}
	post("/emulator/v1/clock", `{"advance":"11s"}`)
	if got, _ := svc.Projects.Locations.Datasets.Operations.Get(op.Name).Do(); got == nil || got.Error == nil || got.Error.Message != "boom" {
		t.Errorf("forced outcome: %+v", got)
	}
	resp, err = http.Get(url + "/emulator/v1/requests")
	if err != nil {
		t.Fatal(err)
	}
	var reqs struct{ Requests []struct{ APIMethod string } }
	json.NewDecoder(resp.Body).Decode(&reqs)
	resp.Body.Close()
	if len(reqs.Requests) < 6 || reqs.Requests[0].APIMethod != "fhirStores.get" {
		t.Errorf("requests %+v", reqs.Requests)
	}
}

func TestRunErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		args []string
		code int
	}{
		{"unknown flag", []string{"--bogus"}, 2},
		{"bad version", []string{"--addr", "127.0.0.1:0", "--version", "R9"}, 2},
		{"bad clock", []string{"--fake-clock", "noon"}, 2},
		{"bad address", []string{"--addr", "256.0.0.1:99999"}, 1},
		{"buckets without a folder", []string{"--gcs-buckets", "b"}, 2},
		{"notify without Pub/Sub", []string{"--addr", "127.0.0.1:0", "--notify", "projects/p/topics/t"}, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := run(context.Background(), tc.args, io.Discard, func(string) string { return "" })
			if got := exitCode(err, io.Discard); got != tc.code {
				t.Errorf("exit code %d (%v), want %d", got, err, tc.code)
			}
		})
	}
}

// TestUsageOnce: --help and -h print the usage once on stdout; a mistake
// prints the error and a one-line hint on stderr, not the usage.
func TestUsageOnce(t *testing.T) {
	t.Parallel()
	for _, arg := range []string{"--help", "-h"} {
		var out, errOut bytes.Buffer
		err := run(context.Background(), []string{arg}, &out, func(string) string { return "" })
		if code := exitCode(err, &errOut); code != 0 || strings.Count(out.String(), "Usage:") != 1 || errOut.Len() != 0 {
			t.Errorf("%s: exit %d, stderr %q, usage printed %d times", arg, code, errOut.String(), strings.Count(out.String(), "Usage:"))
		}
		for _, line := range strings.Split(out.String(), "\n") {
			if strings.Count(line, "default") > 1 {
				t.Errorf("%s shows a default twice: %s", arg, line)
			}
		}
	}
	var out, errOut bytes.Buffer
	err := run(context.Background(), []string{"--bogus"}, &out, func(string) string { return "" })
	code := exitCode(err, &errOut)
	want := "healthcare-emulator: flag provided but not defined: -bogus\nRun 'healthcare-emulator --help' for usage.\n"
	if code != 2 || out.Len() != 0 || errOut.String() != want {
		t.Errorf("--bogus: exit %d, stdout %q, stderr %q; want exit 2, nothing on stdout, stderr %q", code, out.String(), errOut.String(), want)
	}
}
