package export

// A pipeline's feed as its consumer finds it: the finished Cloud Storage runs
// in the state bucket and the manifest each wrote (feed.go). cmd/fhirexport's
// feed pull reads them; package mirror applies them.

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"cloud.google.com/go/storage"
)

// ErrNoManifest means a finished run has no manifest where it should: it
// ended before fhirexport wrote manifests, or the file was removed.
var ErrNoManifest = errors.New("no manifest")

// FeedRun is a finished Cloud Storage run of a pipeline.
type FeedRun struct {
	Run         string    `json:"run"`
	Operation   string    `json:"operation"`
	Outcome     string    `json:"outcome"` // succeeded, partial or failed
	Ended       time.Time `json:"ended"`
	Store       string    `json:"store,omitempty"`
	Destination string    `json:"destination"`
	// Manifest is the gs:// URL of the run's Bulk Data manifest; empty for a
	// failed run, which has none.
	Manifest string `json:"manifest,omitempty"`
}

// FeedRuns returns pipeline's runs that exported to Cloud Storage and ended,
// whose record was written at or after since (zero: all), in the order they
// ended. Runs that never got an operation, and BigQuery runs, are not in it.
func (in *Inspector) FeedRuns(ctx context.Context, pipeline string, since time.Time) ([]FeedRun, error) {
	runs, err := in.runs(ctx, since)
	if err != nil {
		return nil, err
	}
	var out []FeedRun
	for _, r := range runs {
		if r.Pipeline != pipeline || r.Status != RunDone || r.Operation == "" || !strings.HasPrefix(r.Destination, "gs://") {
			continue
		}
		f := FeedRun{Run: r.ID, Operation: r.Operation, Outcome: r.Outcome, Ended: r.EndedAt(), Store: r.Store, Destination: r.Destination}
		if f.Outcome != "failed" {
			f.Manifest = manifestURL(r.Destination, r.Operation)
		}
		out = append(out, f)
	}
	slices.SortFunc(out, func(a, b FeedRun) int {
		return cmp.Or(a.Ended.Compare(b.Ended), cmp.Compare(a.Operation, b.Operation))
	})
	return out, nil
}

// manifestURL is where writeFeed puts a run's manifest:
// {destination}/{operationId}.manifest.json.
func manifestURL(destination, operation string) string {
	bucket, dir, _ := strings.Cut(strings.TrimPrefix(destination, "gs://"), "/")
	if dir = strings.Trim(dir, "/"); dir != "" {
		dir += "/"
	}
	return "gs://" + bucket + "/" + dir + operation[strings.LastIndex(operation, "/")+1:] + ".manifest.json"
}

// ReadManifest reads a run's manifest with the state bucket's client.
func (in *Inspector) ReadManifest(ctx context.Context, r FeedRun) ([]byte, error) {
	if r.Manifest == "" {
		return nil, fmt.Errorf("run %s ended %s: %w", r.Run, r.Outcome, ErrNoManifest)
	}
	bucket, name, _ := strings.Cut(strings.TrimPrefix(r.Manifest, "gs://"), "/")
	rd, err := in.state.client.Bucket(bucket).Object(name).NewReader(ctx)
	if errors.Is(err, storage.ErrObjectNotExist) {
		return nil, fmt.Errorf("run %s (operation %s) ended %s, and %s does not exist: %w", r.Run, r.Operation, r.Outcome, r.Manifest, ErrNoManifest)
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", r.Manifest, err)
	}
	defer rd.Close()
	data, err := io.ReadAll(rd)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", r.Manifest, err)
	}
	return data, nil
}
