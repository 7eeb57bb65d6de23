package healthcaretest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"testing"
	"time"
)

// benchPatients gives about 10k synthetic resources.
const benchPatients = 1100

func benchEnv(b *testing.B) (*env, int) {
	e := newEnv(b, nil)
	n, err := e.srv.Seed(testStore, 1, benchPatients)
	if err != nil {
		b.Fatal(err)
	}
	return e, n
}

// BenchmarkExportThroughput exports ~10k synthetic resources to NDJSON
// objects on an in-process fake-gcs-server through the real clients.
func BenchmarkExportThroughput(b *testing.B) {
	e, n := benchEnv(b)
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < b.N; i++ {
		op := e.mustExport(b, gcsExport(fmt.Sprintf("gs://bucket/bench/%d", i)))
		if got := e.getOp(b, op.Name); !got.Done || got.Error != nil {
			b.Fatalf("export: %+v", got.Error)
		}
	}
	b.ReportMetric(float64(n*b.N)/time.Since(start).Seconds(), "resources/s")
}

// exportBytes is the NDJSON an export of the store writes, per type.
func exportBytes(e *env) map[string][]byte {
	out := map[string][]byte{}
	for _, r := range e.srv.Resources(testStore) {
		var m struct{ ResourceType string }
		json.Unmarshal(r, &m)
		out[m.ResourceType] = append(append(out[m.ResourceType], r...), '\n')
	}
	return out
}

// BenchmarkExportBaselineBufferedWriter writes the same bytes with a plain
// bufio.Writer to io.Discard, resource by resource.
func BenchmarkExportBaselineBufferedWriter(b *testing.B) {
	e, n := benchEnv(b)
	res := e.srv.Resources(testStore)
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < b.N; i++ {
		w := bufio.NewWriter(io.Discard)
		for _, r := range res {
			w.Write(r)
			w.WriteByte('\n')
		}
		w.Flush()
	}
	b.ReportMetric(float64(n*b.N)/time.Since(start).Seconds(), "resources/s")
}

// BenchmarkExportBaselineStorageClient writes the same objects straight
// through the same storage client to the same fake-gcs-server: the cost of
// the GCS round trip without the emulator.
func BenchmarkExportBaselineStorageClient(b *testing.B) {
	e, n := benchEnv(b)
	objs := exportBytes(e)
	ctx := context.Background()
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < b.N; i++ {
		for typ, data := range objs {
			w := e.gcs.Bucket("bucket").Object(fmt.Sprintf("base/%d_%s", i, typ)).NewWriter(ctx)
			w.ChunkSize = 0
			if _, err := io.Copy(w, bytes.NewReader(data)); err != nil {
				b.Fatal(err)
			}
			if err := w.Close(); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.ReportMetric(float64(n*b.N)/time.Since(start).Seconds(), "resources/s")
}
