package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fhirexport/fhirexport/healthcaretest"
)

// The functions read their configuration (emulator addresses included) once
// per process, so every run in this test binary uses the same emulator ports.
var emulatorPorts = sync.OnceValue(func() []string {
	var args []string
	for _, flag := range []string{"--healthcare-port", "--pubsub-port", "--gcs-port"} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			panic(err)
		}
		args = append(args, flag, strconv.Itoa(ln.Addr().(*net.TCPAddr).Port))
		ln.Close()
	}
	return args
})

// runDemo runs the demonstration in-process with small, fast settings and
// returns its output, its --dir and its error.
func runDemo(t *testing.T, extra ...string) (out, dir string, err error) {
	t.Helper()
	dir = filepath.Join(t.TempDir(), "local")
	args := append([]string{"--dir", dir, "--patients", "3", "--seed", "7",
		"--export-duration", "300ms", "--export-steps", "2", "--tick", "100ms"}, emulatorPorts()...)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var buf bytes.Buffer
	err = run(ctx, append(args, extra...), &buf)
	return buf.String(), dir, err
}

// TestDemo runs the whole demonstration and checks, independently of the
// runner's own verification, what it left on disk and what it printed.
func TestDemo(t *testing.T) {
	// The demonstration picks free ports: hold 8080 (if someone else
	// holds it, it is taken all the same).
	if ln, err := net.Listen("tcp", "127.0.0.1:8080"); err == nil {
		t.Cleanup(func() { ln.Close() })
	}
	out, dir, err := runDemo(t)
	if err != nil {
		t.Fatalf("run: %v\noutput:\n%s", err, out)
	}

	// The synthetic data is deterministic: count what the store was seeded with.
	seeded := map[string]int{}
	var patients, observations int
	for _, r := range healthcaretest.Synthetic(7, 3) {
		typ, _ := resourceKey(r)
		seeded[typ]++
		switch typ {
		case "Patient":
			patients++
		case "Observation":
			observations++
		}
	}
	// The updates: every 10th patient, every 20th observation, two new of
	// each; then the erasure of the last patient not updated, with everything
	// that references it.
	erased := erasedBySynthetic(7, 3)
	wantIncremental := map[string]int{"Patient": 2, "Observation": 2}
	var pi, oi int
	for _, r := range healthcaretest.Synthetic(7, 3) {
		typ, id := resourceKey(r)
		switch {
		case typ == "Patient":
			if pi%10 == 0 && !erased[typ+"/"+id] {
				wantIncremental[typ]++
			}
			pi++
		case typ == "Observation":
			if oi%20 == 0 && !erased[typ+"/"+id] {
				wantIncremental[typ]++
			}
			oi++
		}
	}
	if pi != patients || oi != observations {
		t.Fatalf("synthetic data is not deterministic")
	}

	runs := exportedFiles(t, filepath.Join(dir, "gcs", exportBucket, "fhir", "ehr"))
	if len(runs) != 2 {
		t.Fatalf("export runs on disk = %d, want 2 (full, incremental): %v", len(runs), runs)
	}
	if got := runs[0]; fmt.Sprint(got) != fmt.Sprint(seeded) {
		t.Errorf("full export NDJSON lines per type = %v, want what the store was seeded with: %v", got, seeded)
	}
	if got := runs[1]; fmt.Sprint(got) != fmt.Sprint(wantIncremental) {
		t.Errorf("incremental export NDJSON lines per type = %v, want the changes: %v", got, wantIncremental)
	}

	// The feed: both runs have a manifest listing their files; only the
	// incremental one has a deleted file, deleting exactly the erased resources.
	feeds := feedsOnDisk(t, filepath.Join(dir, "gcs"), filepath.Join(dir, "gcs", exportBucket, "fhir", "ehr"))
	if len(feeds) != 2 {
		t.Fatalf("manifests under fhir/ehr = %d, want 2", len(feeds))
	}
	if len(feeds[0].deleted) != 0 {
		t.Errorf("the full export's manifest lists deletions %v", feeds[0].deleted)
	}
	if got, want := fmt.Sprint(feeds[1].deleted), fmt.Sprint(sortedKeys(erased)); got != want {
		t.Errorf("the incremental export's deleted file deletes %s, want the erased resources %s", got, want)
	}

	// The fleet: one run per store of the dataset, each in its own folder
	// with a manifest; the added stores hold their synthetic patients.
	fleetRoot := filepath.Join(dir, "gcs", exportBucket, "fhir", "fleet")
	for i, store := range append([]string{"ehr"}, fleetStores...) {
		runs := exportedFiles(t, filepath.Join(fleetRoot, store))
		if len(runs) != 1 {
			t.Errorf("fleet runs of %s on disk = %d, want 1", store, len(runs))
			continue
		}
		if len(feedsOnDisk(t, filepath.Join(dir, "gcs"), filepath.Join(fleetRoot, store))) != 1 {
			t.Errorf("fleet run of %s has no manifest", store)
		}
		if i == 0 {
			continue
		}
		want := map[string]int{}
		for _, r := range healthcaretest.Synthetic(7+int64(i), fleetPatients) {
			typ, _ := resourceKey(r)
			want[typ]++
		}
		if fmt.Sprint(runs[0]) != fmt.Sprint(want) {
			t.Errorf("fleet export of %s NDJSON lines per type = %v, want %v", store, runs[0], want)
		}
	}

	for _, want := range []string{
		"export.started", "export.succeeded",
		"[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]",
		"running (operations.get)",
		"watermark", "(advanced)",
		".manifest.json", ".deleted.ndjson", "deleted=" + strconv.Itoa(len(erased)),
		`"method":"DELETE","url":"Patient/`,
		"RecordChange acknowledged the " + strconv.Itoa(len(erased)) + " DeleteResource notifications",
		"the event carries manifest, outputs and deleted=",
		"BigQuery " + bqDataset,
		"sequence (events as they arrived",
		"✓ at most 2 exports ran at once",
		"OK: every step succeeded",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	stores := 1 + len(fleetStores)
	if n := strings.Count(out, "◀ event export.started"); n != 3+stores {
		t.Errorf("started events printed = %d, want %d", n, 3+stores)
	}
	if n := strings.Count(out, "◀ event export.succeeded"); n != 3+stores {
		t.Errorf("succeeded events printed = %d, want %d", n, 3+stores)
	}
	// Two fleet runs start at once; the others wait for a slot.
	if n := strings.Count(out, "◀ event export.queued"); n != stores-maxRunning {
		t.Errorf("queued events printed = %d, want %d", n, stores-maxRunning)
	}
	if strings.Contains(out, `"severity"`) {
		t.Errorf("function logs leaked into the demonstration output")
	}
	logs, err := os.ReadFile(filepath.Join(dir, "functions.log"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(logs, []byte(`"message":"export started"`)) {
		t.Errorf("functions.log lacks the functions' JSON logs:\n%s", logs)
	}
	if t.Failed() {
		t.Logf("output:\n%s", out)
	}
}

// exportedFiles returns, for each export run folder under root (in operation
// order), the NDJSON lines per resource type.
func exportedFiles(t *testing.T, root string) []map[string]int {
	t.Helper()
	type run struct {
		op    uint64
		lines map[string]int
	}
	byDir := map[string]*run{}
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		opID, typ, ok := strings.Cut(d.Name(), "_")
		if !ok {
			return nil
		}
		op, err := strconv.ParseUint(opID, 10, 64)
		if err != nil {
			return fmt.Errorf("%s: not named {operationId}_{Type}", p)
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		r := byDir[filepath.Dir(p)]
		if r == nil {
			r = &run{op: op, lines: map[string]int{}}
			byDir[filepath.Dir(p)] = r
		}
		for _, l := range bytes.Split(bytes.TrimSuffix(data, []byte("\n")), []byte("\n")) {
			if !json.Valid(l) {
				return fmt.Errorf("%s: a line is not JSON: %s", p, l)
			}
			if got, _ := resourceKey(l); got != typ {
				return fmt.Errorf("%s holds a %s", p, got)
			}
			r.lines[typ]++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var runs []*run
	for _, r := range byDir {
		runs = append(runs, r)
	}
	slices.SortFunc(runs, func(a, b *run) int { return cmp.Compare(a.op, b.op) })
	var out []map[string]int
	for _, r := range runs {
		out = append(out, r.lines)
	}
	return out
}

// erasedBySynthetic returns what the demonstration erases from a store seeded
// with Synthetic(seed, patients): the last patient not updated (every 10th
// is) and every resource referencing it, directly or not.
func erasedBySynthetic(seed int64, patients int) map[string]bool {
	var ps []string
	refs := map[string][]string{}
	for _, r := range healthcaretest.Synthetic(seed, patients) {
		typ, id := resourceKey(r)
		var v struct {
			Subject   struct{ Reference string } `json:"subject"`
			Encounter struct{ Reference string } `json:"encounter"`
		}
		json.Unmarshal(r, &v)
		refs[typ+"/"+id] = []string{v.Subject.Reference, v.Encounter.Reference}
		if typ == "Patient" {
			ps = append(ps, typ+"/"+id)
		}
	}
	p := ps[len(ps)-1]
	for i := len(ps) - 1; i >= 0; i-- {
		if i%10 != 0 {
			p = ps[i]
			break
		}
	}
	erased := map[string]bool{p: true}
	for grew := true; grew; {
		grew = false
		for k, to := range refs {
			if !erased[k] && (erased[to[0]] || erased[to[1]]) {
				erased[k], grew = true, true
			}
		}
	}
	return erased
}

func sortedKeys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// feed is what a run's manifest on disk says.
type feed struct {
	op      uint64
	deleted []string // Type/id in its deleted file, sorted
}

// feedsOnDisk reads the manifests under root (in operation order), checks
// that each lists exactly the NDJSON objects of its run, and returns what
// their deleted files delete. gcsRoot is fake-gcs-server's folder.
func feedsOnDisk(t *testing.T, gcsRoot, root string) []feed {
	t.Helper()
	var out []feed
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		opID, ok := strings.CutSuffix(d.Name(), ".manifest.json")
		if !ok {
			return nil
		}
		op, err := strconv.ParseUint(opID, 10, 64)
		if err != nil {
			return fmt.Errorf("%s: not named {operationId}.manifest.json", p)
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		// The stack is gone: read the files by their gs:// names.
		var manifest struct {
			Extension struct {
				GCS struct {
					Output, Deleted []struct{ Type, URL string }
				}
			}
		}
		if err := json.Unmarshal(data, &manifest); err != nil {
			return fmt.Errorf("%s: %v", p, err)
		}
		m := manifest.Extension.GCS
		onDisk := func(url string) string {
			return filepath.Join(gcsRoot, filepath.FromSlash(strings.TrimPrefix(url, "gs://")))
		}
		var listed, written []string
		for _, o := range m.Output {
			listed = append(listed, onDisk(o.URL))
		}
		written, _ = filepath.Glob(filepath.Join(filepath.Dir(p), opID+"_*"))
		slices.Sort(listed)
		if fmt.Sprint(listed) != fmt.Sprint(written) {
			return fmt.Errorf("%s lists outputs %v, but the run wrote %v", p, listed, written)
		}
		f := feed{op: op}
		for _, del := range m.Deleted {
			data, err := os.ReadFile(onDisk(del.URL))
			if err != nil {
				return fmt.Errorf("%s: its deleted file: %v", p, err)
			}
			for _, l := range bytes.Split(bytes.TrimSpace(data), []byte("\n")) {
				var b struct {
					Entry []struct{ Request struct{ Method, URL string } }
				}
				if err := json.Unmarshal(l, &b); err != nil || len(b.Entry) != 1 || b.Entry[0].Request.Method != "DELETE" {
					return fmt.Errorf("%s: not a Bundle with one DELETE: %s", del.URL, l)
				}
				f.deleted = append(f.deleted, b.Entry[0].Request.URL)
			}
		}
		slices.Sort(f.deleted)
		out = append(out, f)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(out, func(a, b feed) int { return cmp.Compare(a.op, b.op) })
	return out
}

// TestBrokenStep: an export the function rejects fails the demonstration
// with a non-nil error naming the step, after printing the rejected event.
func TestBrokenStep(t *testing.T) {
	out, _, err := runDemo(t, "--types", "Patient,NotAType")
	if err == nil {
		t.Fatalf("run succeeded with an invalid _type; output:\n%s", out)
	}
	if !strings.Contains(err.Error(), "step 1") || !strings.Contains(err.Error(), "rejected") {
		t.Errorf("error = %v, want step 1 rejected", err)
	}
	if !strings.Contains(out, "◀ event export.rejected") || !strings.Contains(out, "FAILED") {
		t.Errorf("output lacks the rejected event or FAILED:\n%s", out)
	}
	if got := exitCode(err, io.Discard); got != 1 {
		t.Errorf("exit code = %d, want 1", got)
	}
}

// TestUsage: bad flags and a foreign --dir fail before anything starts.
func TestUsage(t *testing.T) {
	foreign := t.TempDir()
	if err := os.WriteFile(filepath.Join(foreign, "precious.txt"), []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no patients", []string{"--patients", "0"}, "--patients"},
		{"stray argument", []string{"demo"}, "unexpected arguments"},
		{"unknown flag", []string{"--nope"}, "not defined"},
		{"foreign dir", []string{"--dir", foreign}, "not created by fhirexport-local"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			err := run(context.Background(), tc.args, &out)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("run(%v) = %v, want an error mentioning %q", tc.args, err, tc.want)
			}
			if got := exitCode(err, io.Discard); got != 2 {
				t.Errorf("exit code = %d, want 2", got)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(foreign, "precious.txt")); err != nil {
		t.Errorf("a foreign --dir was touched: %v", err)
	}
}

// TestPortDefaults: the demonstration takes a free port for the functions;
// --serve keeps 8080 unless told otherwise.
func TestPortDefaults(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		args []string
		want int
	}{
		{nil, 0},
		{[]string{"--serve"}, 8080},
		{[]string{"--serve", "--port", "9090"}, 9090},
		{[]string{"--serve", "--port", "0"}, 0},
		{[]string{"--port", "8080"}, 8080},
	} {
		o, err := parseFlags(tc.args, io.Discard)
		if err != nil || o.port != tc.want {
			t.Errorf("parseFlags(%q): port %d, %v; want %d", tc.args, o.port, err, tc.want)
		}
	}
}

// TestHelpOnce: --help prints the usage once, each default once; a mistake
// prints the error and a one-line hint, not the usage.
func TestHelpOnce(t *testing.T) {
	t.Parallel()
	var out bytes.Buffer
	if err := run(context.Background(), []string{"--help"}, &out); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(out.String(), "usage:"); n != 1 {
		t.Errorf("--help printed the usage %d times:\n%s", n, out.String())
	}
	for _, line := range strings.Split(out.String(), "\n") {
		if strings.Count(line, "default") > 1 {
			t.Errorf("--help shows a default twice: %s", line)
		}
	}
	out.Reset()
	var errOut bytes.Buffer
	err := run(context.Background(), []string{"--nope"}, &out)
	code := exitCode(err, &errOut)
	want := "fhirexport-local: flag provided but not defined: -nope\nRun 'go run ./cmd/fhirexport-local --help' for usage.\n"
	if code != 2 || out.Len() != 0 || errOut.String() != want {
		t.Errorf("--nope: exit %d, stdout %q, stderr %q; want 2, nothing, %q", code, out.String(), errOut.String(), want)
	}
}

// TestServeInstructions runs --serve, executes the curl command it prints
// and waits for that export's outcome event; where the Cloud SDK is installed
// it also has gcloud parse the printed publish command (offline: a
// well-formed command fails only for want of an account).
func TestServeInstructions(t *testing.T) {
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("curl is not installed")
	}
	dir := filepath.Join(t.TempDir(), "local")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out := &syncBuffer{}
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, append([]string{"--serve", "--dir", dir, "--port", "0", "--patients", "2",
			"--export-duration", "200ms", "--export-steps", "2", "--tick", "100ms"}, emulatorPorts()...), out)
	}()
	stopped := false
	stop := func() error {
		if stopped {
			return nil
		}
		stopped = true
		cancel()
		return <-done
	}
	defer stop()
	waitFor := func(s string) string {
		t.Helper()
		for !strings.Contains(out.String(), s) {
			select {
			case err := <-done:
				stopped = true
				t.Fatalf("run ended early: %v\n%s", err, out.String())
			case <-ctx.Done():
				t.Fatalf("no %q in the output:\n%s", s, out.String())
			case <-time.After(20 * time.Millisecond):
			}
		}
		return out.String()
	}
	printed := waitFor("Outcome events appear below")
	for _, want := range []string{"FHIREXPORT_ALLOWED_STORES=" + allowedStores + "\n", "FHIREXPORT_ALLOWED_DESTINATIONS=" + allowedDestinations + "\n",
		"gs://local-exports/fhir", "--port N"} {
		if !strings.Contains(printed, want) {
			t.Errorf("the --serve banner does not print %q:\n%s", want, printed)
		}
	}
	curl := command(t, printed, "  curl ")
	gcloud := command(t, printed, "  gcloud ")

	cmd := exec.CommandContext(ctx, "bash", "-euo", "pipefail", "-c", curl)
	res, err := cmd.CombinedOutput()
	if err != nil || !bytes.Contains(res, []byte("200 OK")) {
		t.Fatalf("the printed curl command: %v\n%s\n%s", err, curl, res)
	}
	printed = waitFor("◀ event export.succeeded")
	succeeded := printed[strings.Index(printed, "◀ event export.succeeded"):]
	succeeded, _, _ = strings.Cut(succeeded, "\n")
	if !regexp.MustCompile(` manifest (https?|gs)://\S+\.manifest\.json`).MatchString(succeeded) {
		t.Errorf("the succeeded line carries no manifest URL:\n%s", succeeded)
	}
	if err := stop(); err != nil {
		t.Errorf("run after Ctrl-C = %v, want nil", err)
	}
	files := exportedFiles(t, filepath.Join(dir, "gcs", exportBucket, "fhir", "ehr"))
	if len(files) != 1 {
		t.Errorf("export runs on disk = %v, want one", files)
	}

	if _, err := exec.LookPath("gcloud"); err != nil {
		t.Log("gcloud is not installed: the printed gcloud command is not checked")
		return
	}
	gctx, gcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer gcancel()
	cmd = exec.CommandContext(gctx, "bash", "-euo", "pipefail", "-c", gcloud)
	cmd.Env = append(os.Environ(), "CLOUDSDK_CONFIG="+t.TempDir(), "CLOUDSDK_CORE_DISABLE_PROMPTS=1")
	res, _ = cmd.CombinedOutput()
	if !bytes.Contains(res, []byte("active account")) {
		t.Errorf("gcloud did not accept the printed command's arguments:\n%s\n%s", gcloud, res)
	}
}

// command returns the shell command printed from the line starting with
// prefix to the next blank line.
func command(t *testing.T, out, prefix string) string {
	t.Helper()
	i := strings.Index(out, "\n"+prefix)
	if i < 0 {
		t.Fatalf("no %q command in:\n%s", prefix, out)
	}
	cmd, _, _ := strings.Cut(out[i+1:], "\n\n")
	return cmd
}

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
