// Command fhirexport-local runs fhirexport end to end on one machine, in one
// process, on loopback: the Cloud Healthcare API emulator (healthcaretest) with
// a seeded synthetic FHIR store, fake-gcs-server on a local folder, pstest with
// the requests, poll, events and fhir-changes topics (the store's change
// notifications), the three functions under the functions framework,
// Eventarc-like push delivery from the topics to the functions, and a
// scheduler tick on the poll topic. FHIREXPORT_MAX_RUNNING is 2.
//
// By default it runs a demonstration: a full Cloud Storage export with its
// Bulk Data manifest, resource updates and a patient's erasure (recorded by
// RecordChange), an incremental export that must contain exactly those updates
// and list exactly those deletions in its deleted file, a BigQuery export, and
// a fleet export of every store of the dataset that must never run more than
// two exports at once; it verifies the output and exits non-zero when a step
// did not succeed. With --serve it keeps everything running and
// prints how to trigger an export.
//
// Everything it writes goes under --dir; the functions' JSON logs go to
// --dir/functions.log so they do not drown the demonstration's output.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, os.Args[1:], os.Stdout)
	stop()
	os.Exit(exitCode(err, os.Stderr))
}

// exitCode is the one place that turns an error into an exit status; it
// reports the error on stderr.
func exitCode(err error, stderr io.Writer) int {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 2
	}
	fmt.Fprintln(stderr, "fhirexport-local:", err)
	var ue usageError
	switch {
	case errors.As(err, &ue):
		fmt.Fprintln(stderr, "Run 'go run ./cmd/fhirexport-local --help' for usage.")
		return 2
	case errors.Is(err, context.Canceled):
		return 130 // interrupted, as a shell reports SIGINT
	}
	return 1
}

// usageError marks a problem with the command line.
type usageError struct{ error }

func (u usageError) Unwrap() error { return u.error }

// options are the parsed command line.
type options struct {
	dir            string
	logs           string // function log file; "-" keeps them on stdout
	patients       int
	seed           int64
	types          string
	tick           time.Duration
	exportDuration time.Duration
	exportSteps    int
	serve          bool
	port           int // functions framework
	healthcarePort int
	pubsubPort     int
	gcsPort        int
}

func parseFlags(args []string, out io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("fhirexport-local", flag.ContinueOnError)
	// The usage only for --help; a mistake is said in two lines (exitCode).
	fs.SetOutput(io.Discard)
	usage := func() {
		fmt.Fprintf(out, "usage: go run ./cmd/fhirexport-local [flags]\n\n"+
			"Runs fhirexport with local emulators: a demonstration (full, incremental, BigQuery and\n"+
			"fleet exports and the feed of manifests and deletions, verified), or with --serve, a\n"+
			"local stack to trigger exports yourself.\n\nflags:\n")
		fs.SetOutput(out)
		fs.PrintDefaults()
	}
	fs.Usage = func() {}
	fs.StringVar(&o.dir, "dir", ".fhirexport-local", "folder for everything written (emptied at start)")
	fs.StringVar(&o.logs, "logs", "", `file for the functions' JSON logs (default DIR/functions.log; "-": stdout)`)
	fs.IntVar(&o.patients, "patients", 50, "synthetic patients to seed (each with encounters, observations, conditions)")
	fs.Int64Var(&o.seed, "seed", 1, "seed of the synthetic data")
	fs.StringVar(&o.types, "types", "", "the demonstration exports' _type, e.g. Patient,Observation (default: all types)")
	fs.DurationVar(&o.tick, "tick", 2*time.Second, "scheduler interval: how often PollExport is triggered")
	fs.DurationVar(&o.exportDuration, "export-duration", 3*time.Second, "how long each emulated export runs")
	fs.IntVar(&o.exportSteps, "export-steps", 3, "progress steps of each emulated export")
	fs.BoolVar(&o.serve, "serve", false, "keep serving instead of running the demonstration")
	// The demonstration must not need a fixed port (8080 is often taken);
	// --serve keeps 8080, so the printed curl command stays the same.
	fs.IntVar(&o.port, "port", 0, "functions framework port (default: 8080 with --serve, a free port for the demonstration; 0: a free port)")
	fs.IntVar(&o.healthcarePort, "healthcare-port", 0, "Healthcare API emulator port (0: random)")
	fs.IntVar(&o.pubsubPort, "pubsub-port", 0, "Pub/Sub emulator (pstest) port (0: random)")
	fs.IntVar(&o.gcsPort, "gcs-port", 0, "Cloud Storage emulator (fake-gcs-server) port (0: random)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			usage()
		}
		return o, err
	}
	portSet := false
	fs.Visit(func(f *flag.Flag) { portSet = portSet || f.Name == "port" })
	if o.serve && !portSet {
		o.port = defaultServePort
	}
	switch {
	case fs.NArg() > 0:
		return o, usageError{fmt.Errorf("unexpected arguments: %v", fs.Args())}
	case o.patients < 1:
		return o, usageError{fmt.Errorf("--patients must be at least 1")}
	case o.tick <= 0:
		return o, usageError{fmt.Errorf("--tick must be positive")}
	case o.exportDuration < 0 || o.exportSteps < 1:
		return o, usageError{fmt.Errorf("--export-duration must not be negative and --export-steps must be at least 1")}
	case strings.TrimSpace(o.dir) == "":
		return o, usageError{fmt.Errorf("--dir must not be empty")}
	}
	for _, p := range []int{o.port, o.healthcarePort, o.pubsubPort, o.gcsPort} {
		if p < 0 || p > 65535 {
			return o, usageError{fmt.Errorf("port %d out of range", p)}
		}
	}
	if o.logs == "" {
		o.logs = filepath.Join(o.dir, "functions.log")
	}
	return o, nil
}

// defaultServePort is the functions' port with --serve, the functions
// framework's usual one.
const defaultServePort = 8080

// run starts the local stack and runs the demonstration, or serves until ctx
// is done with --serve. Demonstration output goes to stdout.
func run(ctx context.Context, args []string, stdout io.Writer) error {
	o, err := parseFlags(args, stdout)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		var ue usageError
		if !errors.As(err, &ue) {
			err = usageError{err}
		}
		return err
	}
	if err := cleanDir(o.dir); err != nil {
		return err
	}
	if o.logs != "-" {
		// The functions and the functions framework write to os.Stdout as it
		// is when they write, so pointing it at the log file moves their
		// output there and keeps the demonstration readable.
		f, err := os.OpenFile(o.logs, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return fmt.Errorf("function log: %w", err)
		}
		defer f.Close()
		orig := os.Stdout
		os.Stdout = f
		defer func() { os.Stdout = orig }()
	}
	con := &console{w: stdout}

	st, err := startStack(ctx, o, con)
	if err != nil {
		return err
	}
	defer st.close()
	st.describe()
	if o.serve {
		return st.serve(ctx)
	}
	return st.demo(ctx)
}

// marker names the file that marks a folder as fhirexport-local's own, so
// cleaning it at start can never delete a folder the user pointed at by
// mistake.
const marker = ".fhirexport-local"

// cleanDir empties dir if it is ours (or creates it).
func cleanDir(dir string) error {
	entries, err := os.ReadDir(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return fmt.Errorf("--dir: %w", err)
	case len(entries) > 0:
		if _, err := os.Stat(filepath.Join(dir, marker)); err != nil {
			return usageError{fmt.Errorf("--dir %s is not empty and was not created by fhirexport-local; remove it or choose another folder", dir)}
		}
		if err := os.RemoveAll(dir); err != nil {
			return fmt.Errorf("clean --dir: %w", err)
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("--dir: %w", err)
	}
	return os.WriteFile(filepath.Join(dir, marker), []byte("written by go run ./cmd/fhirexport-local; emptied at its start\n"), 0o644)
}
