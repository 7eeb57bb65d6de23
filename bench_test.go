package fhirexport

// Benchmarks of StartExport through the functions framework against the local
// emulators of TestMain, each beside a baseline doing only the three calls a
// start cannot do without, with the raw clients against the same emulators.
// Run both in one invocation and compare (see BENCHMARKS.md):
//
//	go test -run '^$' -bench 'StartExport' -benchtime 3s .

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"cloud.google.com/go/pubsub/v2"
	"cloud.google.com/go/storage"
	"google.golang.org/api/healthcare/v1"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/fhirexport/fhirexport/events"
)

var benchSeq atomic.Int64

// benchStore creates a dataset with one small R4 store for a benchmark.
func benchStore(b *testing.B) string {
	b.Helper()
	dataset := fmt.Sprintf("%s/datasets/bench%d", location, storeSeq.Add(1))
	if err := env.emu.CreateDataset(dataset); err != nil {
		b.Fatal(err)
	}
	store := dataset + "/fhirStores/ehr"
	if err := env.emu.CreateFHIRStore(store, "R4"); err != nil {
		b.Fatal(err)
	}
	if _, err := env.emu.Seed(store, 1, 1); err != nil {
		b.Fatal(err)
	}
	return store
}

// pubsubBody is the Eventarc body of a Pub/Sub message carrying data.
func pubsubBody(id string, data []byte) []byte {
	body, _ := json.Marshal(map[string]any{
		"message": map[string]any{
			"data": base64.StdEncoding.EncodeToString(data), "messageId": id, "publishTime": "2026-11-26T01:02:03.456Z",
		},
		"subscription": "projects/test-project/subscriptions/eventarc-sub", "deliveryAttempt": 1,
	})
	return body
}

// deliver posts a binary-mode Pub/Sub CloudEvent and returns the status code.
func deliver(client *http.Client, fn, id string, data []byte) (int, error) {
	req, err := http.NewRequest(http.MethodPost, env.baseURL+"/"+fn, bytes.NewReader(pubsubBody(id, data)))
	if err != nil {
		return 0, err
	}
	for k, v := range map[string]string{
		"ce-specversion": "1.0", "ce-type": events.MessagePublishedType, "ce-source": requestTopic,
		"ce-id": id, "ce-time": "2026-11-26T01:02:03.456Z", "Content-Type": "application/json",
	} {
		req.Header.Set(k, v)
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, nil
}

// exportsOf counts the fhirStores.export requests the emulator got for store.
func exportsOf(store string) int {
	n := 0
	for _, r := range env.emu.ExportRequests() {
		if r.Path == "/v1/"+store+":export" {
			n++
		}
	}
	return n
}

// emptyStateBucket deletes every object of the state bucket, straight in
// fake-gcs-server's backend. Its in-memory backend finds an object by a
// linear scan of the bucket, so every write costs time in proportion to the
// objects already there; each round starts from an empty bucket so the
// figures do not depend on what ran before.
func emptyStateBucket(b *testing.B) {
	b.Helper()
	objs, _, err := env.gcs.ListObjects(stateBucket, "", "", false)
	if err != nil {
		b.Fatal(err)
	}
	for _, o := range objs {
		if err := env.gcs.Backend().DeleteObject(stateBucket, o.Name); err != nil {
			b.Fatal(err)
		}
	}
}

// quietExports makes the emulator's exports run for an hour of its fake
// clock while b runs. With the default (done at the first observation) every
// export call would first finish all earlier ones, writing their NDJSON into
// fake-gcs-server: the emulator's work, growing with what ran before, not the
// function's.
func quietExports(b *testing.B) {
	env.emu.SetExportTiming(time.Hour, 1)
	b.Cleanup(func() { env.emu.SetExportTiming(0, 1) })
}

// benchModes runs body sequentially and with b.RunParallel (4 goroutines per
// CPU: the work is I/O-bound).
func benchModes(b *testing.B, op func(b *testing.B, client *http.Client)) {
	b.Run("sequential", func(b *testing.B) {
		client := &http.Client{}
		emptyStateBucket(b)
		b.ResetTimer()
		for range b.N {
			op(b, client)
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.SetParallelism(4)
		emptyStateBucket(b)
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			client := &http.Client{}
			for pb.Next() {
				op(b, client)
			}
		})
	})
}

// BenchmarkStartExport measures StartExport events per second, each a new
// trigger for a new pipeline (so every one starts an export): HTTP into the
// functions framework, decode, parse, policy, claim, pipeline lock, export,
// record the operation, publish the started event.
func BenchmarkStartExport(b *testing.B) {
	store := benchStore(b)
	quietExports(b)
	before := exportsOf(store)
	var calls atomic.Int64
	benchModes(b, func(b *testing.B, client *http.Client) {
		n := benchSeq.Add(1)
		spec, _ := json.Marshal(map[string]any{
			"fhirStore": store, "name": fmt.Sprintf("bench-%d", n),
			"gcsDestination": map[string]any{"uriPrefix": "gs://" + exportBucket + "/fhir/bench/{run}"},
		})
		code, err := deliver(client, "StartExport", fmt.Sprintf("bench-start-%d", n), spec)
		if err != nil || code != http.StatusOK {
			b.Fatalf("StartExport answered %d, %v", code, err)
		}
		calls.Add(1)
	})
	if got, want := exportsOf(store)-before, int(calls.Load()); got != want {
		b.Fatalf("%d events started %d exports", want, got)
	}
}

// BenchmarkStartExportBaseline does only what any start must: claim the
// trigger with a DoesNotExist write to the state bucket, call
// fhirStores.export, publish one event (with the publish settings of
// events.NewPublisher) — with the raw clients against the same emulators
// and the same Cloud Storage front the function uses.
func BenchmarkStartExportBaseline(b *testing.B) { benchBaseline(b, false) }

// BenchmarkStartExportBaselineAllWrites is the baseline plus the two state
// writes StartExport adds (the pipeline lock, DoesNotExist, and recording the
// operation in it, GenerationMatch): it shows how much of the gap between
// StartExport and the baseline those writes are.
func BenchmarkStartExportBaselineAllWrites(b *testing.B) { benchBaseline(b, true) }

func benchBaseline(b *testing.B, allWrites bool) {
	ctx := context.Background()
	store := benchStore(b)
	quietExports(b)
	gcsHost, _ := instance.lookup("STORAGE_EMULATOR_HOST")
	st, err := storage.NewClient(ctx, option.WithEndpoint(strings.TrimRight(gcsHost, "/")+"/storage/v1/"),
		option.WithoutAuthentication(), storage.WithJSONReads())
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	hc, err := healthcare.NewService(ctx, option.WithEndpoint(env.emu.URL), option.WithoutAuthentication())
	if err != nil {
		b.Fatal(err)
	}
	ps, err := pubsub.NewClient(ctx, project, option.WithEndpoint(env.psAddr), option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())))
	if err != nil {
		b.Fatal(err)
	}
	defer ps.Close()
	pub := ps.Publisher(eventsTopic)
	pub.PublishSettings.DelayThreshold = time.Millisecond // as events.NewPublisher sets it
	defer pub.Stop()
	bkt := st.Bucket(stateBucket)
	write := func(name string, cond storage.Conditions, body string) int64 {
		w := bkt.Object(name).If(cond).NewWriter(ctx)
		w.ChunkSize = 0 // one request, as export.State writes
		w.ContentType = "application/json"
		io.WriteString(w, body)
		if err := w.Close(); err != nil {
			b.Fatal(err)
		}
		return w.Attrs().Generation
	}

	benchModes(b, func(b *testing.B, _ *http.Client) {
		n := benchSeq.Add(1)
		write(fmt.Sprintf("state/bench/runs/%d.json", n), storage.Conditions{DoesNotExist: true},
			`{"trigger":{"source":"bench","id":"`+fmt.Sprint(n)+`"},"status":"claimed"}`)
		var lock int64
		if allWrites {
			lock = write(fmt.Sprintf("state/bench/pending/%d.json", n), storage.Conditions{DoesNotExist: true}, `{"run":"`+fmt.Sprint(n)+`"}`)
		}
		req := &healthcare.ExportResourcesRequest{GcsDestination: &healthcare.GoogleCloudHealthcareV1FhirGcsDestination{
			UriPrefix: fmt.Sprintf("gs://%s/fhir/bench/%d", exportBucket, n)}}
		op, err := hc.Projects.Locations.Datasets.FhirStores.Export(store, req).Context(ctx).Do()
		if err != nil {
			b.Fatal(err)
		}
		if allWrites {
			write(fmt.Sprintf("state/bench/pending/%d.json", n), storage.Conditions{GenerationMatch: lock},
				`{"run":"`+fmt.Sprint(n)+`","operation":"`+op.Name+`"}`)
		}
		// The same started event StartExport publishes, so both publish equal payloads.
		msg, err := events.Message(events.Event{ID: fmt.Sprint(n), Type: events.TypeStarted, Source: "//healthcare.googleapis.com/" + store,
			Subject: op.Name, Time: time.Now(), Data: events.Data{Store: store, Operation: op.Name, Destination: req.GcsDestination.UriPrefix,
				Trigger: events.TriggerRef{Source: "bench", ID: fmt.Sprint(n)}}})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := pub.Publish(ctx, msg).Get(ctx); err != nil {
			b.Fatal(err)
		}
	})
}
