// Command fhirexport-bench measures what Go benchmarks cannot: the cold start
// of a process serving the fhirexport functions, and a PollExport sweep over
// many pending runs, each beside a baseline measured in the same run.
//
// Run it from the module root (it builds three small mains inside the module):
//
//	go run ./cmd/fhirexport-bench -coldstarts 20 -runs 1000
//	go run ./cmd/fhirexport-bench -coldstarts 0 -runs 10000
//
// Cold start: three mains are generated and built — one importing the
// fhirexport package (registering StartExport and PollExport), one
// registering a trivial CloudEvent function, and one ("libs") registering a
// trivial function in a program that imports the same client libraries as
// fhirexport (storage, pubsub/v2, healthcare/v1, the functions framework,
// cloudevents) and, on its first event, builds the same three clients and
// lists the state bucket: the floor for this dependency set. Each is started
// -coldstarts times, interleaved. For each start it records the time from
// exec until the port accepts connections, checks that the process has made
// no request to the emulators by then (no network I/O at init), then the time
// until a PollExport scheduler tick (for the bare main: an event to its
// trivial function) is answered 200. fhirexport's first tick builds the
// configuration and the three clients and lists the (empty) state bucket in
// the in-process emulators, as a real instance's first tick does.
//
// Sweep: -runs exports are started through export.Exporter.Start with the real
// clients (the path StartExport takes), with a budget as large as -runs, their
// operations kept running on the emulator's fake clock, started -age ago. A
// child process built as above (FHIREXPORT_POLL_WORKERS=-poll-workers) then
// gets PollExport ticks: one over all runs still running, then, after the
// clock moves past their end, one finalizing all of them. It reports
// operations.get calls per run (from the emulator's Requests), Cloud Storage
// requests, wall time against a baseline of the same number of raw
// operations.get calls at the same concurrency and, with -latency (20 ms per
// Cloud Storage request, 150 ms per Healthcare call, added by delaying
// proxies in front of the fakes), against the floor
// ceil(runs/workers) × 150 ms + ceil(runs/1000) × 20 ms, and the child's peak
// resident memory (VmHWM) against its own after client setup.
//
// Expansion (-fleet-expand N): one fleet trigger over N stores delivered to
// an Exporter whose requests go through the delaying fronts (20 ms per Cloud
// Storage request, 150 ms per Healthcare call), redelivered while it asks,
// against a raw claim and the one-worker (sequential) expansion of
// -fleet-expand-seq stores measured in the same run: the time per store.
//
// Fleet (-fleet N): one fleet trigger over N stores with
// FHIREXPORT_MAX_RUNNING=-budget, the emulator refusing more running exports,
// each export taking -export-duration of emulator time and a sweep every
// -tick: the emulator time until every outcome is reported against the
// ideal ceil(N/budget) × export duration.
package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"cloud.google.com/go/pubsub/v2"
	"cloud.google.com/go/storage"
	healthcare "google.golang.org/api/healthcare/v1"
	"google.golang.org/api/iterator"
	"google.golang.org/api/option"

	"github.com/fhirexport/fhirexport/events"
	"github.com/fhirexport/fhirexport/export"
	"github.com/fhirexport/fhirexport/healthcaretest"
	"github.com/fhirexport/fhirexport/healthcaretest/stacktest"
)

func main() {
	if err := run(context.Background(), os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "fhirexport-bench:", err)
		os.Exit(1)
	}
}

const (
	project     = "bench-project"
	eventsTopic = "projects/bench-project/topics/fhirexport-events"
	dataset     = "projects/bench-project/locations/us-central1/datasets/bench"
	store       = dataset + "/fhirStores/ehr"
	stateBucket = "fx-state"
	exportBkt   = "exports"
)

func run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("fhirexport-bench", flag.ContinueOnError)
	coldstarts := fs.Int("coldstarts", 20, "cold starts of each main (0: skip the cold-start benchmark)")
	runs := fs.Int("runs", 1000, "pending runs to sweep (0: skip the sweep benchmark); the issue's figure is 10000")
	fillWorkers := fs.Int("fill-workers", 8, "concurrent Exporter.Start calls while creating the pending runs")
	keep := fs.Bool("keep", false, "keep the build directory (for debugging)")
	pollWorkers := fs.Int("poll-workers", 16, "FHIREXPORT_POLL_WORKERS of the sweeping child (1 to 256)")
	age := fs.Duration("age", time.Hour, "how long the swept runs have been running: past the 2-minute start lease (1h, as in production) or within it (e.g. -2m), below the 24-hour watchdog")
	latency := fs.Bool("latency", false, "sweep through delaying proxies: 20 ms per Cloud Storage request, 150 ms per Healthcare call")
	fleet := fs.Int("fleet", 0, "stores of a fleet trigger to run under the budget (0: skip the makespan benchmark); the issue's figure is 100")
	budget := fs.Int("budget", 5, "FHIREXPORT_MAX_RUNNING for the fleet benchmark; the emulator refuses more running exports")
	exportDuration := fs.Duration("export-duration", 10*time.Minute, "emulator time one export of the fleet runs")
	tick := fs.Duration("tick", time.Minute, "emulator time between PollExport sweeps in the fleet benchmark (the scheduler's period)")
	expandN := fs.Int("fleet-expand", 0, "stores of a fleet trigger to expand under the latency model (20 ms per Cloud Storage request, 150 ms per Healthcare call), in real time (0: skip); the issue's figure is 5000")
	expandSeq := fs.Int("fleet-expand-seq", 100, "stores of the sequential baseline (one worker: the expansion before issue 16) in the same run")
	if err := fs.Parse(args); err != nil {
		return err
	}
	bins, cleanup, err := build(ctx, *keep)
	if err != nil {
		return err
	}
	defer cleanup()
	fmt.Printf("machine: %d CPUs, %s\n", cpus(), goVersion(ctx))

	if *coldstarts > 0 {
		emu, err := startEmulators(ctx)
		if err != nil {
			return err
		}
		err = coldStart(ctx, bins, emu, *coldstarts)
		emu.close()
		if err != nil {
			return err
		}
	}
	if *fleet > 0 {
		emu, err := startEmulators(ctx)
		if err != nil {
			return err
		}
		err = makespan(ctx, emu, *fleet, *budget, *exportDuration, *tick)
		emu.close()
		if err != nil {
			return err
		}
	}
	if *expandN > 0 {
		emu, err := startEmulators(ctx)
		if err != nil {
			return err
		}
		err = expansion(ctx, emu, *expandN, *expandSeq)
		emu.close()
		if err != nil {
			return err
		}
	}
	if *runs > 0 {
		emu, err := startEmulators(ctx)
		if err != nil {
			return err
		}
		defer emu.close()
		lat := latencies{}
		if *latency {
			lat = latencies{gcs: 20 * time.Millisecond, hc: 150 * time.Millisecond}
		}
		if err := sweep(ctx, bins, emu, *runs, *fillWorkers, *pollWorkers, *age, lat); err != nil {
			return err
		}
	}
	return nil
}

// --- building the two mains ---

const fxMain = `// Generated by cmd/fhirexport-bench: the fhirexport functions under the
// functions framework, as a deployed instance serves them.
package main

import (
	"fmt"
	"os"

	"github.com/GoogleCloudPlatform/functions-framework-go/funcframework"

	_ "github.com/fhirexport/fhirexport"
)

func main() {
	if err := funcframework.StartHostPort("127.0.0.1", os.Getenv("PORT")); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
`

const bareMain = `// Generated by cmd/fhirexport-bench: a trivial CloudEvent function, the
// cold-start baseline.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/GoogleCloudPlatform/functions-framework-go/funcframework"
	"github.com/GoogleCloudPlatform/functions-framework-go/functions"
	cloudevents "github.com/cloudevents/sdk-go/v2"
)

func init() {
	functions.CloudEvent("Bare", func(ctx context.Context, e cloudevents.Event) error { return nil })
}

func main() {
	if err := funcframework.StartHostPort("127.0.0.1", os.Getenv("PORT")); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
`

// libsMain links the client libraries fhirexport links and, on its first
// event, does what fhirexport's first PollExport tick does with them (three
// clients, configured as function.go configures them for emulators, and one
// list of the state bucket), with none of fhirexport's own code.
const libsMain = `// Generated by cmd/fhirexport-bench: fhirexport's client libraries without
// fhirexport, the cold-start floor for this dependency set.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"

	"cloud.google.com/go/pubsub/v2"
	"cloud.google.com/go/storage"
	"github.com/GoogleCloudPlatform/functions-framework-go/funcframework"
	"github.com/GoogleCloudPlatform/functions-framework-go/functions"
	cloudevents "github.com/cloudevents/sdk-go/v2"
	healthcare "google.golang.org/api/healthcare/v1"
	"google.golang.org/api/iterator"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

type clients struct {
	hc *healthcare.Service
	st *storage.Client
	ps *pubsub.Client
}

var lazy = sync.OnceValues(func() (*clients, error) {
	ctx := context.Background()
	hc, err := healthcare.NewService(ctx, option.WithEndpoint(os.Getenv("FHIREXPORT_HEALTHCARE_ENDPOINT")), option.WithoutAuthentication())
	if err != nil {
		return nil, err
	}
	st, err := storage.NewClient(ctx, storage.WithJSONReads(), option.WithoutAuthentication(),
		option.WithEndpoint(strings.TrimRight(os.Getenv("STORAGE_EMULATOR_HOST"), "/")+"/storage/v1/"))
	if err != nil {
		return nil, err
	}
	ps, err := pubsub.NewClient(ctx, "bench-project", option.WithEndpoint(os.Getenv("PUBSUB_EMULATOR_HOST")), option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())))
	if err != nil {
		return nil, err
	}
	return &clients{hc, st, ps}, nil
})

func init() {
	functions.CloudEvent("Libs", func(ctx context.Context, e cloudevents.Event) error {
		c, err := lazy()
		if err != nil {
			return err
		}
		it := c.st.Bucket("` + stateBucket + `").Objects(ctx, &storage.Query{Prefix: "state/"})
		if _, err := it.Next(); err != nil && !errors.Is(err, iterator.Done) {
			return err
		}
		return nil
	})
}

func main() {
	if err := funcframework.StartHostPort("127.0.0.1", os.Getenv("PORT")); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
`

type binaries struct{ fx, bare, libs string }

// build writes the two mains into a directory under the module root (so the
// module's imports resolve; a leading underscore keeps it out of ./...),
// builds them into a temporary directory, and removes the sources.
func build(ctx context.Context, keep bool) (binaries, func(), error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	gomod := strings.TrimSpace(string(out))
	if err != nil || gomod == "" || gomod == os.DevNull {
		return binaries{}, nil, fmt.Errorf("run me inside the fhirexport module (go env GOMOD: %q, %v)", gomod, err)
	}
	root := filepath.Dir(gomod)
	src, err := os.MkdirTemp(root, "_fhirexport-bench-")
	if err != nil {
		return binaries{}, nil, err
	}
	binDir, err := os.MkdirTemp("", "fhirexport-bench-bin-")
	if err != nil {
		os.RemoveAll(src)
		return binaries{}, nil, err
	}
	cleanup := func() {
		if !keep {
			os.RemoveAll(binDir)
		}
	}
	defer func() {
		if !keep {
			os.RemoveAll(src)
		}
	}()
	bins := binaries{fx: filepath.Join(binDir, "fx"), bare: filepath.Join(binDir, "bare"), libs: filepath.Join(binDir, "libs")}
	for name, text := range map[string]string{"fx": fxMain, "bare": bareMain, "libs": libsMain} {
		dir := filepath.Join(src, name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			cleanup()
			return binaries{}, nil, err
		}
		if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte(text), 0o644); err != nil {
			cleanup()
			return binaries{}, nil, err
		}
		cmd := exec.CommandContext(ctx, "go", "build", "-o", filepath.Join(binDir, name), "./"+filepath.Base(src)+"/"+name)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			cleanup()
			return binaries{}, nil, fmt.Errorf("go build %s: %v\n%s", name, err, out)
		}
	}
	for _, b := range []string{bins.fx, bins.bare, bins.libs} {
		if fi, err := os.Stat(b); err == nil {
			fmt.Printf("built %s: %.1f MB\n", filepath.Base(b), float64(fi.Size())/1e6)
		}
	}
	return bins, cleanup, nil
}

// --- emulators ---

// emulators are the in-process doubles the child processes talk to, each
// behind a request counter.
type emulators struct {
	s        *stacktest.Stack
	clock    *healthcaretest.FakeClock
	hc       *healthcaretest.Server // s.Healthcare
	storage  *storage.Client        // s.Storage
	psClient *pubsub.Client         // s.PubSub
	gcsCount atomic.Int64
	root     string
	// gcsHandler is fake-gcs-server behind the request counter; the child
	// reaches it (and the Healthcare emulator) through childGCS and childHC,
	// the delaying fronts, when they are set.
	gcsHandler        http.Handler
	childGCS, childHC string
	fronts            []*http.Server
}

func startEmulators(ctx context.Context) (*emulators, error) {
	e := &emulators{}
	var err error
	// A folder backend: the in-memory one finds objects by a linear scan,
	// which at 20,000 state objects would measure fake-gcs-server, not us.
	// On tmpfs when there is one: the folder backend fsyncs every write
	// under a global lock.
	dir := ""
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		dir = "/dev/shm"
	}
	if e.root, err = os.MkdirTemp(dir, "fhirexport-bench-gcs-"); err != nil {
		return nil, err
	}
	e.clock = healthcaretest.NewFakeClock(time.Date(2026, 11, 26, 0, 0, 0, 0, time.UTC))
	e.s, err = stacktest.Start(ctx, stacktest.Options{
		Project:     project,
		Buckets:     []string{stateBucket, exportBkt},
		StorageRoot: e.root,
		WrapGCS: func(next http.Handler) http.Handler {
			e.gcsHandler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				e.gcsCount.Add(1)
				next.ServeHTTP(w, r)
			})
			return e.gcsHandler
		},
		Topics:     []string{eventsTopic},
		Healthcare: healthcaretest.Options{Clock: e.clock},
	})
	if err != nil {
		os.RemoveAll(e.root)
		return nil, err
	}
	e.hc, e.storage, e.psClient = e.s.Healthcare, e.s.Storage, e.s.PubSub
	if err := e.hc.CreateDataset(dataset); err != nil {
		e.close()
		return nil, err
	}
	if err := e.hc.CreateFHIRStore(store, "R4"); err != nil {
		e.close()
		return nil, err
	}
	return e, nil
}

// latencies is the latency model of the sweep: a delay added to every
// request before the fake answers it.
type latencies struct{ gcs, hc time.Duration }

// delayed serves next on loopback, each request held d first.
func (e *emulators) delayed(d time.Duration, next http.Handler) (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-r.Context().Done():
			return
		case <-t.C:
		}
		next.ServeHTTP(w, r)
	})}
	e.fronts = append(e.fronts, srv)
	go srv.Serve(ln)
	return "http://" + ln.Addr().String(), nil
}

// withLatency puts the delaying fronts between the child and the fakes.
func (e *emulators) withLatency(lat latencies) error {
	if lat == (latencies{}) {
		return nil
	}
	var err error
	if e.childGCS, err = e.delayed(lat.gcs, e.gcsHandler); err != nil {
		return err
	}
	e.childHC, err = e.delayed(lat.hc, e.hc.Emulator)
	return err
}

func (e *emulators) close() {
	for _, f := range e.fronts {
		f.Close()
	}
	e.s.Close()
	os.RemoveAll(e.root)
}

// childEnv is the environment of an fhirexport process pointed at e.
func (e *emulators) childEnv(port string, extra ...string) []string {
	gcsURL, hcURL := e.s.GCSURL, e.hc.URL
	if e.childGCS != "" {
		gcsURL, hcURL = e.childGCS, e.childHC
	}
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool {
		return strings.HasPrefix(kv, "FHIREXPORT_") || strings.HasPrefix(kv, "PUBSUB_EMULATOR_HOST=") ||
			strings.HasPrefix(kv, "STORAGE_EMULATOR_HOST=") || strings.HasPrefix(kv, "PORT=")
	})
	return append(append(env,
		"PORT="+port,
		"FHIREXPORT_EVENTS_TOPIC="+eventsTopic,
		"FHIREXPORT_STATE=gs://"+stateBucket+"/state",
		"FHIREXPORT_ALLOWED_STORES="+dataset+"/fhirStores/*",
		"FHIREXPORT_ALLOWED_DESTINATIONS=gs://"+exportBkt+"/fhir",
		"FHIREXPORT_HEALTHCARE_ENDPOINT="+hcURL,
		"PUBSUB_EMULATOR_HOST="+e.s.PubSubAddr,
		"STORAGE_EMULATOR_HOST="+gcsURL,
	), extra...)
}

// requests counts the requests the emulators with HTTP fronts have received.
func (e *emulators) requests() int64 { return int64(len(e.hc.Requests())) + e.gcsCount.Load() }

// --- child processes ---

type child struct {
	cmd  *exec.Cmd
	base string
	out  bytes.Buffer
}

func freePort() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return strconv.Itoa(ln.Addr().(*net.TCPAddr).Port), nil
}

// startChild execs bin and returns once its port accepts connections, with
// the time that took.
func startChild(bin string, env []string, port string) (*child, time.Duration, error) {
	c := &child{base: "http://127.0.0.1:" + port}
	c.cmd = exec.Command(bin)
	c.cmd.Env = env
	c.cmd.Stdout, c.cmd.Stderr = &c.out, &c.out
	t0 := time.Now()
	if err := c.cmd.Start(); err != nil {
		return nil, 0, err
	}
	for deadline := t0.Add(20 * time.Second); ; {
		conn, err := net.DialTimeout("tcp", "127.0.0.1:"+port, time.Second)
		if err == nil {
			conn.Close()
			return c, time.Since(t0), nil
		}
		if time.Now().After(deadline) {
			c.stop()
			return nil, 0, fmt.Errorf("%s did not listen within 20 s: %v\n%s", bin, err, c.out.String())
		}
		time.Sleep(200 * time.Microsecond)
	}
}

func (c *child) stop() {
	c.cmd.Process.Kill()
	c.cmd.Wait()
}

var tickSeq atomic.Int64

// deliver posts a Pub/Sub CloudEvent in binary mode, as Eventarc does.
func (c *child) deliver(fn string, data []byte) error {
	id := fmt.Sprintf("bench-%d", tickSeq.Add(1))
	body, _ := json.Marshal(map[string]any{
		"message":      map[string]any{"data": base64.StdEncoding.EncodeToString(data), "messageId": id, "publishTime": "2026-11-26T01:02:03Z"},
		"subscription": "projects/bench-project/subscriptions/eventarc",
	})
	req, err := http.NewRequest(http.MethodPost, c.base+"/"+fn, bytes.NewReader(body))
	if err != nil {
		return err
	}
	for k, v := range map[string]string{"ce-specversion": "1.0", "ce-type": events.MessagePublishedType,
		"ce-source": "//pubsub.googleapis.com/projects/bench-project/topics/ticks", "ce-id": id,
		"ce-time": "2026-11-26T01:02:03Z", "Content-Type": "application/json"} {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s answered %d: %s\n%s", fn, resp.StatusCode, b, c.out.String())
	}
	return nil
}

// vmHWM is the child's peak resident set size in kB.
func (c *child) vmHWM() (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", c.cmd.Process.Pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			return strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
		}
	}
	return 0, errors.New("no VmHWM in /proc status")
}

// --- cold start ---

func coldStart(ctx context.Context, bins binaries, emu *emulators, n int) error {
	// cpu is the child's user+system time from exec to being killed right
	// after its first event: far less sensitive than wall time to other
	// load on the machine.
	type sample struct{ listen, first, cpu time.Duration }
	mains := []struct {
		name, bin, fn string
		samples       []sample
	}{
		{"fhirexport", bins.fx, "PollExport", nil},
		{"libs", bins.libs, "Libs", nil},
		{"bare", bins.bare, "Bare", nil},
	}
	// Round-robin, rotating which main goes first in each round, so drift in
	// the machine's load falls on all three alike.
	for i := range n {
		for j := range mains {
			m := &mains[(i+j)%len(mains)]
			port, err := freePort()
			if err != nil {
				return err
			}
			before := emu.requests()
			c, listen, err := startChild(m.bin, emu.childEnv(port), port)
			if err != nil {
				return err
			}
			t0 := time.Now()
			if got := emu.requests(); got != before {
				c.stop()
				return fmt.Errorf("%s made %d requests to the emulators before its first event: network I/O at init", m.name, got-before)
			}
			err = c.deliver(m.fn, []byte("{}"))
			first := listen + time.Since(t0)
			c.stop()
			if err != nil {
				return err
			}
			cpu := c.cmd.ProcessState.UserTime() + c.cmd.ProcessState.SystemTime()
			m.samples = append(m.samples, sample{listen, first, cpu})
		}
	}
	med := func(s []sample, f func(sample) time.Duration) time.Duration {
		d := make([]time.Duration, len(s))
		for i := range s {
			d[i] = f(s[i])
		}
		slices.Sort(d)
		return d[len(d)/2]
	}
	fx, libs, bare := mains[0].samples, mains[1].samples, mains[2].samples
	listenOf := func(s sample) time.Duration { return s.listen }
	firstOf := func(s sample) time.Duration { return s.first }
	fmt.Printf("\ncold start (%d starts each, interleaved; medians)\n", n)
	fmt.Printf("  %-44s %10s %10s %10s %9s %9s\n", "", "fhirexport", "libs", "bare", "fx/libs", "fx/bare")
	for _, row := range []struct {
		name string
		of   func(sample) time.Duration
	}{
		{"exec → listening (init; no emulator requests)", listenOf},
		{"exec → first event answered 200", firstOf},
		{"CPU (user+sys) to first event answered", func(s sample) time.Duration { return s.cpu }},
	} {
		f, l, b := med(fx, row.of), med(libs, row.of), med(bare, row.of)
		fmt.Printf("  %-44s %10s %10s %10s %8.2fx %8.2fx\n", row.name, ms(f), ms(l), ms(b), ratio(f, l), ratio(f, b))
	}
	fmt.Printf("  (first events: fhirexport a PollExport tick — config, three clients, one state-bucket list;\n")
	fmt.Printf("   libs the same three clients and one list; bare nothing)\n")
	return nil
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000) }

func ratio(a, b time.Duration) float64 { return float64(a) / float64(b) }

// --- sweep ---

func sweep(ctx context.Context, bins binaries, emu *emulators, runs, workers, pollWorkers int, age time.Duration, lat latencies) error {
	fmt.Printf("\nPollExport sweep over %d pending runs running for %s, %d poll workers, latency %s per Cloud Storage request and %s per Healthcare call\n",
		runs, age, pollWorkers, lat.gcs, lat.hc)
	// The child runs on the real clock: the runs start age ago on it, so the
	// first sweep sees them as a production sweep sees exports running for
	// age (past their start lease, before their watchdog), and they end when
	// the emulator's clock moves past age+1h.
	emu.clock.Set(time.Now().Add(-age))
	emu.hc.SetExportTiming(age+time.Hour, 1)
	policy, err := export.ParsePolicy(dataset+"/fhirStores/*", "gs://"+exportBkt+"/fhir")
	if err != nil {
		return err
	}
	hc, err := emu.hc.Service(ctx)
	if err != nil {
		return err
	}
	pub := events.NewPublisher(emu.psClient, eventsTopic)
	defer pub.Stop()
	x := export.New(hc, export.NewState(emu.storage, stateBucket, "state"), pub, policy, emu.clock.Now)
	x.MaxRunning = runs // every run starts: this measures the sweep, not the budget
	ctx = export.WithLogger(ctx, export.NewLogger(io.Discard, nil))

	t0 := time.Now()
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1)
				if i > int64(runs) {
					return
				}
				spec := fmt.Sprintf(`{"fhirStore":%q,"name":"p-%d","gcsDestination":{"uriPrefix":"gs://%s/fhir/{run}"}}`, store, i, exportBkt)
				trig := events.Trigger{Source: "//bench/fill", ID: strconv.FormatInt(i, 10), Time: emu.clock.Now(), Spec: []byte(spec)}
				if err := x.Start(ctx, trig, nil); err != nil {
					errs <- fmt.Errorf("start run %d: %w", i, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return err
	}
	fill := time.Since(t0)
	fmt.Printf("  created through Exporter.Start (no latency): %d runs in %s (%.0f starts/s, %d workers)\n", runs, fill.Round(time.Millisecond),
		float64(runs)/fill.Seconds(), workers)
	ops, err := pendingOperations(ctx, emu.storage)
	if err != nil {
		return err
	}
	if len(ops) != runs {
		return fmt.Errorf("%d starts made %d operations", runs, len(ops))
	}

	// From here on the child and the baseline see the latency model.
	if err := emu.withLatency(lat); err != nil {
		return err
	}
	if emu.childHC != "" {
		if hc, err = healthcare.NewService(ctx, option.WithEndpoint(emu.childHC), option.WithoutAuthentication()); err != nil {
			return err
		}
	}
	// Baseline: the same number of raw operations.get calls, pollWorkers at a
	// time, through the same fronts.
	getsBefore := countGets(emu.hc.Requests())
	t0 = time.Now()
	sem := make(chan struct{}, pollWorkers)
	gerr := make(chan error, 1) // the first error; atomic.Value panics on a second concrete type
	for _, op := range ops {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if _, err := hc.Projects.Locations.Datasets.Operations.Get(op).Context(ctx).Do(); err != nil {
				select {
				case gerr <- err:
				default:
				}
			}
		}()
	}
	wg.Wait()
	raw := time.Since(t0)
	select {
	case err := <-gerr:
		return err
	default:
	}
	if got := countGets(emu.hc.Requests()) - getsBefore; got != runs {
		return fmt.Errorf("baseline made %d gets for %d operations", got, runs)
	}

	port, err := freePort()
	if err != nil {
		return err
	}
	c, _, err := startChild(bins.fx, emu.childEnv(port,
		"FHIREXPORT_MAX_RUNNING="+strconv.Itoa(min(runs, 1000)), "FHIREXPORT_POLL_WORKERS="+strconv.Itoa(pollWorkers)), port)
	if err != nil {
		return err
	}
	defer c.stop()
	// A malformed StartExport builds the clients without a sweep: the memory
	// of an instance ready to work.
	if err := c.deliver("StartExport", []byte("not json")); err != nil {
		return err
	}
	idle, err := c.vmHWM()
	if err != nil {
		return err
	}

	type result struct {
		name      string
		gets      int
		gcs       int64
		wall      time.Duration
		hwm       int64
		remaining int
	}
	var results []result
	for _, phase := range []string{"all running", "all finished (finalize)"} {
		if phase != "all running" {
			emu.clock.Set(time.Now().Add(2 * time.Hour))
		}
		before, gcsBefore := countGets(emu.hc.Requests()), emu.gcsCount.Load()
		t0 := time.Now()
		if err := c.deliver("PollExport", []byte("{}")); err != nil {
			return err
		}
		wall := time.Since(t0)
		gcsReqs := emu.gcsCount.Load() - gcsBefore
		hwm, err := c.vmHWM()
		if err != nil {
			return err
		}
		left, err := pendingLeft(ctx, emu.storage)
		if err != nil {
			return err
		}
		results = append(results, result{phase, countGets(emu.hc.Requests()) - before, gcsReqs, wall, hwm, left})
	}
	fmt.Printf("  baseline: %d raw operations.get, %d at a time: %s\n", runs, pollWorkers, raw.Round(time.Millisecond))
	// The floor of a sweep over running exports: its gets, pollWorkers at a
	// time, plus one listing request per 1,000 markers.
	floor := time.Duration((runs+pollWorkers-1)/pollWorkers)*lat.hc + time.Duration((runs+999)/1000)*lat.gcs
	if lat != (latencies{}) {
		fmt.Printf("  floor: ceil(%d/%d) × %s + ceil(%d/1000) × %s = %s\n", runs, pollWorkers, lat.hc, runs, lat.gcs, floor.Round(time.Millisecond))
	}
	fmt.Printf("  child process VmHWM after client setup (no sweep yet): %.1f MB\n", float64(idle)/1024)
	fmt.Printf("  %-26s %9s %9s %10s %12s %9s %12s %9s %8s\n", "sweep", "gets/run", "GCS reqs", "wall", "vs raw gets", "vs floor", "VmHWM", "vs idle", "left")
	for _, r := range results {
		vsFloor := "-"
		if floor > 0 {
			vsFloor = fmt.Sprintf("%.2fx", ratio(r.wall, floor))
		}
		fmt.Printf("  %-26s %9.3f %9d %10s %11.2fx %9s %9.1f MB %8.2fx %8d\n", r.name, float64(r.gets)/float64(runs), r.gcs, r.wall.Round(time.Millisecond),
			ratio(r.wall, raw), vsFloor, float64(r.hwm)/1024, float64(r.hwm)/float64(idle), r.remaining)
	}
	if results[1].remaining != 0 {
		return fmt.Errorf("%d pending markers left after the finalizing sweep", results[1].remaining)
	}
	return nil
}

// --- fleet makespan ---

// makespan runs one fleet trigger over n stores with FHIREXPORT_MAX_RUNNING
// = budget, the emulator refusing more running exports than that and each
// export taking d of emulator time, with a PollExport sweep every tick. It
// compares the emulator time until every outcome was reported with the ideal
// ceil(n / budget) × d.
func makespan(ctx context.Context, emu *emulators, n, budget int, d, tick time.Duration) error {
	fmt.Printf("\nfleet of %d stores, FHIREXPORT_MAX_RUNNING=%d, exports of %s, a sweep every %s (emulator time)\n", n, budget, d, tick)
	emu.hc.SetExportTiming(d, 1)
	emu.hc.SetMaxRunningOperations(budget)
	fleet := "projects/" + project + "/locations/us-central1/datasets/fleet"
	if err := emu.hc.CreateDataset(fleet); err != nil {
		return err
	}
	for i := range n {
		if err := emu.hc.CreateFHIRStore(fmt.Sprintf("%s/fhirStores/s%04d", fleet, i), "R4"); err != nil {
			return err
		}
	}
	policy, err := export.ParsePolicy(fleet+"/fhirStores/*", "gs://"+exportBkt+"/fhir")
	if err != nil {
		return err
	}
	hc, err := emu.hc.Service(ctx)
	if err != nil {
		return err
	}
	pub := events.NewPublisher(emu.psClient, eventsTopic)
	defer pub.Stop()
	x := export.New(hc, export.NewState(emu.storage, stateBucket, "state"), pub, policy, emu.clock.Now)
	x.MaxRunning = budget
	ctx = export.WithLogger(ctx, export.NewLogger(io.Discard, nil))

	spec := fmt.Sprintf(`{"fhirStore":%q,"name":"nightly","gcsDestination":{"uriPrefix":"gs://%s/fhir/{store}/{date}"}}`, fleet+"/fhirStores/*", exportBkt)
	begin, wall0 := emu.clock.Now(), time.Now()
	trig := events.Trigger{Source: "//bench/fleet", ID: "1", Time: begin, Spec: []byte(spec)}
	for attempt := 0; ; attempt++ {
		err := x.Start(ctx, trig, nil)
		if err == nil {
			break
		}
		if attempt == 10 {
			return fmt.Errorf("fleet trigger: %w", err)
		}
	}
	sweeps := 0
	for {
		emu.clock.Advance(tick)
		sweeps++
		if _, err := x.Poll(ctx); err != nil {
			fmt.Printf("  sweep %d: %v\n", sweeps, err)
		}
		pending, err := pendingLeft(ctx, emu.storage)
		if err != nil {
			return err
		}
		queued, err := countObjects(ctx, emu.storage, "state/queue/")
		if err != nil {
			return err
		}
		if pending == 0 && queued == 0 {
			break
		}
		if sweeps > 100*n {
			return fmt.Errorf("%d pending and %d queued after %d sweeps", pending, queued, sweeps)
		}
	}
	reported := emu.clock.Now().Sub(begin)
	exps := emu.hc.Exports()
	var lastEnd time.Time
	perStore := map[string]int{}
	for _, e := range exps {
		perStore[e.Store]++
		if op, ok := emu.hc.Operation(e.Operation); ok {
			var meta struct {
				EndTime time.Time `json:"endTime"`
			}
			if json.Unmarshal(op.Metadata, &meta) == nil && meta.EndTime.After(lastEnd) {
				lastEnd = meta.EndTime
			}
		}
	}
	if len(perStore) != n || len(exps) != n {
		return fmt.Errorf("%d exports of %d stores, want one per store (%d)", len(exps), len(perStore), n)
	}
	refused := len(emu.hc.ExportRequests()) - len(exps)
	waves := (n + budget - 1) / budget
	ideal := time.Duration(waves) * d
	// With a sweep every tick, a wave is reported (and the next one started)
	// at the first tick after its exports end, which is strictly after d:
	// their createTime is the call's, an instant after the tick.
	tickIdeal := time.Duration(waves) * (d/tick + 1) * tick
	fmt.Printf("  ideal ceil(%d/%d) × %s = %s; with a sweep every %s, at best %s\n", n, budget, d, ideal, tick, tickIdeal)
	fmt.Printf("  last export ended after %s: %.3fx the ideal\n", lastEnd.Sub(begin).Round(time.Second), ratio(lastEnd.Sub(begin), ideal))
	fmt.Printf("  every outcome reported after %s (%d sweeps): %.3fx the ideal, %.3fx the tick-bound ideal\n", reported, sweeps, ratio(reported, ideal), ratio(reported, tickIdeal))
	fmt.Printf("  peak running %d (budget %d), fhirStores.export refused (429) %d, wall %s\n", emu.hc.PeakRunningOperations(), budget, refused,
		time.Since(wall0).Round(time.Millisecond))
	return nil
}

// countObjects counts the objects of the state bucket under prefix.
func countObjects(ctx context.Context, st *storage.Client, prefix string) (int, error) {
	n := 0
	it := st.Bucket(stateBucket).Objects(ctx, &storage.Query{Prefix: prefix})
	for {
		_, err := it.Next()
		if errors.Is(err, iterator.Done) {
			return n, nil
		}
		if err != nil {
			return 0, err
		}
		n++
	}
}

// pendingOperations lists the operations recorded on the pending markers.
func pendingOperations(ctx context.Context, st *storage.Client) ([]string, error) {
	var ops []string
	it := st.Bucket(stateBucket).Objects(ctx, &storage.Query{Prefix: "state/pending/"})
	for {
		a, err := it.Next()
		if errors.Is(err, iterator.Done) {
			return ops, nil
		}
		if err != nil {
			return nil, err
		}
		if op := a.Metadata["operation"]; op != "" {
			ops = append(ops, op)
		}
	}
}

func countGets(reqs []healthcaretest.Request) int {
	n := 0
	for _, r := range reqs {
		if r.APIMethod == "operations.get" {
			n++
		}
	}
	return n
}

// pendingLeft counts the pending markers in the state bucket.
func pendingLeft(ctx context.Context, st *storage.Client) (int, error) {
	ops, err := pendingOperations(ctx, st)
	return len(ops), err
}

func cpus() int { return runtime.NumCPU() }

func goVersion(ctx context.Context) string {
	out, _ := exec.CommandContext(ctx, "go", "env", "GOVERSION").Output()
	return strings.TrimSpace(string(out))
}

// --- fleet expansion under the latency model ---

// expansion delivers one fleet trigger over n stores to an Exporter whose
// Cloud Storage and Healthcare requests go through the delaying fronts (20 ms
// and 150 ms), on the real clock, with the default budget of 5 (so all but
// five runs are queued), redelivering while it asks, as Pub/Sub does. Two
// baselines in the same run, through the same fronts: a raw claim (one
// DoesNotExist create) and the expansion with one worker (the sequential
// expansion before issue 16) over seq stores.
func expansion(ctx context.Context, emu *emulators, n, seq int) error {
	lat := latencies{gcs: 20 * time.Millisecond, hc: 150 * time.Millisecond}
	fmt.Printf("\nfleet expansion of %d stores, latency %s per Cloud Storage request and %s per Healthcare call, FHIREXPORT_MAX_RUNNING=%d\n",
		n, lat.gcs, lat.hc, export.DefaultMaxRunning)
	emu.clock.Set(time.Now())
	emu.hc.SetExportTiming(time.Hour, 1)
	if err := emu.withLatency(lat); err != nil {
		return err
	}
	st, err := storage.NewClient(ctx, option.WithEndpoint(emu.childGCS+"/storage/v1/"), option.WithoutAuthentication(), storage.WithJSONReads())
	if err != nil {
		return err
	}
	defer st.Close()
	hc, err := healthcare.NewService(ctx, option.WithEndpoint(emu.childHC), option.WithoutAuthentication())
	if err != nil {
		return err
	}
	pub := events.NewPublisher(emu.psClient, eventsTopic)
	defer pub.Stop()
	ctx = export.WithLogger(ctx, export.NewLogger(io.Discard, nil))

	// Raw claims: DoesNotExist creates, one after the other.
	const claims = 50
	t0 := time.Now()
	for i := range claims {
		w := st.Bucket(stateBucket).Object(fmt.Sprintf("bench/claims/%d.json", i)).If(storage.Conditions{DoesNotExist: true}).NewWriter(ctx)
		w.ChunkSize = 0
		io.WriteString(w, `{"status":"claimed"}`)
		if err := w.Close(); err != nil {
			return err
		}
	}
	raw := time.Since(t0) / claims

	run := func(name string, stores, workers int) (perStore time.Duration, deliveries int, reqs int64, err error) {
		ds := "projects/" + project + "/locations/us-central1/datasets/" + name
		if err := emu.hc.CreateDataset(ds); err != nil {
			return 0, 0, 0, err
		}
		for i := range stores {
			if err := emu.hc.CreateFHIRStore(fmt.Sprintf("%s/fhirStores/s%05d", ds, i), "R4"); err != nil {
				return 0, 0, 0, err
			}
		}
		policy, err := export.ParsePolicy(ds+"/fhirStores/*", "gs://"+exportBkt+"/fhir")
		if err != nil {
			return 0, 0, 0, err
		}
		x := export.New(hc, export.NewState(st, stateBucket, "state"), pub, policy, nil)
		x.FleetWorkers = workers
		spec := fmt.Sprintf(`{"fhirStore":%q,"name":"nightly","gcsDestination":{"uriPrefix":"gs://%s/fhir/{store}/{date}"}}`, ds+"/fhirStores/*", exportBkt)
		trig := events.Trigger{Source: "//bench/expand", ID: name, Time: time.Now(), Spec: []byte(spec)}
		before := emu.gcsCount.Load()
		t0 := time.Now()
		for err = errors.New("not yet"); err != nil; deliveries++ {
			if deliveries == 20 {
				return 0, 0, 0, fmt.Errorf("%s: 20 deliveries did not expand the fleet: %w", name, err)
			}
			err = x.Start(ctx, trig, nil)
		}
		return time.Since(t0) / time.Duration(stores), deliveries, emu.gcsCount.Load() - before, nil
	}
	seqPer, _, seqReqs, err := run("sequential", seq, 1)
	if err != nil {
		return err
	}
	per, deliveries, reqs, err := run("fleet", n, export.DefaultFleetWorkers)
	if err != nil {
		return err
	}
	fmt.Printf("  raw claim (one DoesNotExist create): %s\n", ms(raw))
	fmt.Printf("  %-34s %8s %12s %12s %12s %14s %10s\n", "expansion", "stores", "per store", "vs raw claim", "vs one worker", "GCS reqs/store", "deliveries")
	fmt.Printf("  %-34s %8d %12s %11.2fx %12s %14.1f %10d\n", "one worker (before issue 16)", seq, ms(seqPer), ratio(seqPer, raw), "1.00x",
		float64(seqReqs)/float64(seq), 1)
	fmt.Printf("  %-34s %8d %12s %11.2fx %11.3fx %14.1f %10d\n", fmt.Sprintf("%d workers, %s slice", export.DefaultFleetWorkers, export.DefaultFleetSlice), n, ms(per),
		ratio(per, raw), ratio(per, seqPer), float64(reqs)/float64(n), deliveries)
	fmt.Printf("  the whole fleet: %s (StartExport's deadline: 60 s a delivery)\n", (per * time.Duration(n)).Round(time.Millisecond))
	return nil
}
