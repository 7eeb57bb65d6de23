// Command fhirexport is the operator's command for a fhirexport deployment:
// it shows what every pipeline is doing, lists and explains runs, cancels or
// re-runs one, and shows or moves a pipeline's watermark, so nobody edits the
// state bucket by hand.
//
//	fhirexport status
//	fhirexport runs --pipeline n-… --since 24h
//	fhirexport show RUN|TRIGGER|OPERATION
//	fhirexport cancel RUN|OPERATION
//	fhirexport rerun RUN --topic projects/P/topics/fhirexport-requests
//	fhirexport watermark show|set|reset PIPELINE
//
// It uses Application Default Credentials, or the local stack's emulators
// through STORAGE_EMULATOR_HOST, PUBSUB_EMULATOR_HOST and an http://
// FHIREXPORT_HEALTHCARE_ENDPOINT, as the functions do. Exit codes: 0 ok,
// 1 failure, 2 usage.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"time"

	"cloud.google.com/go/pubsub/v2"
	"cloud.google.com/go/storage"
	healthcare "google.golang.org/api/healthcare/v1"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/fhirexport/fhirexport/export"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// run runs one command line and returns its exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return config{getenv: os.Getenv, now: time.Now}.run(ctx, args, stdout, stderr)
}

// config is what a command line runs with besides its arguments: the
// environment and the clock, injected so tests need neither os.Setenv nor
// sleeps.
type config struct {
	getenv func(string) string
	now    func() time.Time
}

// usageError is a mistake on the command line: exit code 2.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return usageError{fmt.Sprintf(format, args...)} }

const (
	exitOK      = 0
	exitFailure = 1
	exitUsage   = 2
)

func (c config) run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	inv := &invocation{config: c, stdout: stdout, stderr: stderr}
	err := inv.main(ctx, args)
	defer inv.close()
	var ue usageError
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, flag.ErrHelp):
		return exitOK
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "fhirexport: %v\n", err)
		fmt.Fprintf(stderr, "Run 'fhirexport %s--help' for usage.\n", inv.path)
		return exitUsage
	default:
		fmt.Fprintf(stderr, "fhirexport: %v\n", err)
		return exitFailure
	}
}

// invocation is one command line being run: its global options and the
// clients it built (each at most once).
type invocation struct {
	config
	stdout, stderr io.Writer
	path           string // the verbs so far, for help hints: "watermark set "

	state    string
	project  string
	endpoint string
	json     bool

	storage *storage.Client
	hc      *healthcare.Service
	ps      *pubsub.Client
}

// globalFlags registers the global options on fs; every level has them, so
// they may come before or after the verb.
func (inv *invocation) globalFlags(fs *flag.FlagSet) {
	fs.StringVar(&inv.state, "state", inv.state, "state location `gs://BUCKET/PREFIX` (default $FHIREXPORT_STATE)")
	fs.StringVar(&inv.project, "project", inv.project, "Google Cloud `PROJECT` for a --topic given by its short name")
	fs.StringVar(&inv.endpoint, "healthcare-endpoint", inv.endpoint, "Healthcare API base `URL`; http://… is an emulator, without auth (default $FHIREXPORT_HEALTHCARE_ENDPOINT)")
	fs.BoolVar(&inv.json, "json", inv.json, "print JSON for scripts instead of a table")
}

// flagSet returns a flag set for a verb with the global options, printing
// help to stdout.
func (inv *invocation) flagSet(name, usage string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	inv.globalFlags(fs)
	fs.Usage = func() {
		fmt.Fprint(inv.stdout, strings.TrimLeft(usage, "\n"))
		if hasFlags(fs) {
			fmt.Fprintln(inv.stdout, "\nFlags:")
			fs.SetOutput(inv.stdout)
			fs.PrintDefaults()
			fs.SetOutput(io.Discard)
		}
	}
	return fs
}

func hasFlags(fs *flag.FlagSet) bool {
	n := 0
	fs.VisitAll(func(*flag.Flag) { n++ })
	return n > 0
}

// parse parses flags anywhere among args (gcloud style) and returns the
// positional arguments. --help prints the usage and returns flag.ErrHelp.
func parse(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				fs.Usage()
				return nil, err
			}
			return nil, usageError{err.Error()}
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		// fs.Parse stops at the first positional argument, or after "--".
		if len(args) > len(rest) && args[len(args)-len(rest)-1] == "--" {
			return append(pos, rest...), nil
		}
		pos, args = append(pos, rest[0]), rest[1:]
	}
}

const mainUsage = `
fhirexport operates a fhirexport deployment through its state bucket and the
Healthcare and Pub/Sub APIs.

Usage:
  fhirexport VERB [ARGS] [--flags]

Verbs:
  status                      every pipeline: watermark, last outcome, running operation, queue
  runs                        recent runs (--pipeline, --status, --since, --limit)
  show RUN|TRIGGER|OPERATION  everything known about one run
  cancel RUN|OPERATION        cancel a running export (operations.cancel)
  rerun RUN                   publish a run's spec again as a new trigger
  watermark show|set|reset    a pipeline's incremental watermark

Against the local stack (cmd/fhirexport-local --serve) set STORAGE_EMULATOR_HOST,
PUBSUB_EMULATOR_HOST and FHIREXPORT_HEALTHCARE_ENDPOINT as it prints; otherwise
Application Default Credentials are used.

Exit codes: 0 ok, 1 failure, 2 usage.
Run 'fhirexport VERB --help' for a verb's flags.
`

func (inv *invocation) main(ctx context.Context, args []string) error {
	inv.state = inv.getenv("FHIREXPORT_STATE")
	inv.endpoint = inv.getenv("FHIREXPORT_HEALTHCARE_ENDPOINT")
	inv.project = inv.getenv("GOOGLE_CLOUD_PROJECT")
	fs := inv.flagSet("fhirexport", mainUsage)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.Usage()
			return err
		}
		return usageError{err.Error()}
	}
	args = fs.Args()
	if len(args) == 0 {
		return usagef("no verb given")
	}
	verb, rest := args[0], args[1:]
	if verb == "help" {
		if len(rest) == 0 {
			fs.Usage()
			return nil
		}
		verb, rest = rest[0], append(rest[1:], "--help")
	}
	verbs := map[string]func(context.Context, []string) error{
		"status":    inv.status,
		"runs":      inv.runs,
		"show":      inv.show,
		"cancel":    inv.cancel,
		"rerun":     inv.rerun,
		"watermark": inv.watermark,
	}
	f, ok := verbs[verb]
	if !ok {
		return usagef("unknown verb %q", verb)
	}
	inv.path = verb + " "
	return f(ctx, rest)
}

// inspector returns the state bucket's operator view; withHC adds the
// Healthcare client (progress, cancel).
func (inv *invocation) inspector(ctx context.Context, withHC bool) (*export.Inspector, *export.State, error) {
	if inv.state == "" {
		return nil, nil, usagef("no state location: give --state gs://BUCKET/PREFIX or set FHIREXPORT_STATE (the functions' FHIREXPORT_STATE)")
	}
	bucket, prefix, err := export.ParseStateLocation(inv.state)
	if err != nil {
		return nil, nil, usagef("--state (or $FHIREXPORT_STATE): %v", err)
	}
	if inv.storage == nil {
		opts := []option.ClientOption{storage.WithJSONReads()}
		if h := inv.getenv("STORAGE_EMULATOR_HOST"); h != "" {
			if !strings.Contains(h, "://") {
				h = "http://" + h
			}
			opts = append(opts, option.WithEndpoint(strings.TrimRight(h, "/")+"/storage/v1/"), option.WithoutAuthentication())
		}
		if inv.storage, err = storage.NewClient(ctx, opts...); err != nil {
			return nil, nil, fmt.Errorf("storage client: %w", err)
		}
	}
	st := export.NewState(inv.storage, bucket, prefix)
	var hc *healthcare.Service
	if withHC {
		if hc, err = inv.healthcare(ctx); err != nil {
			return nil, nil, err
		}
	}
	return export.NewInspector(st, hc, inv.now), st, nil
}

func (inv *invocation) healthcare(ctx context.Context) (*healthcare.Service, error) {
	if inv.hc != nil {
		return inv.hc, nil
	}
	var opts []option.ClientOption
	if ep := inv.endpoint; ep != "" {
		if !strings.HasPrefix(ep, "http://") && !strings.HasPrefix(ep, "https://") {
			return nil, usagef("--healthcare-endpoint (or $FHIREXPORT_HEALTHCARE_ENDPOINT): %q is not a base URL such as http://127.0.0.1:8089", ep)
		}
		opts = append(opts, option.WithEndpoint(ep))
		if strings.HasPrefix(ep, "http://") {
			opts = append(opts, option.WithoutAuthentication())
		}
	}
	hc, err := healthcare.NewService(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("healthcare client: %w", err)
	}
	inv.hc = hc
	return hc, nil
}

func (inv *invocation) pubsub(ctx context.Context, project string) (*pubsub.Client, error) {
	if inv.ps != nil {
		return inv.ps, nil
	}
	var opts []option.ClientOption
	if h := inv.getenv("PUBSUB_EMULATOR_HOST"); h != "" {
		opts = append(opts, option.WithEndpoint(h), option.WithoutAuthentication(),
			option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())))
	}
	ps, err := pubsub.NewClient(ctx, project, opts...)
	if err != nil {
		return nil, fmt.Errorf("pubsub client: %w", err)
	}
	inv.ps = ps
	return ps, nil
}

func (inv *invocation) close() {
	if inv.storage != nil {
		inv.storage.Close()
	}
	if inv.ps != nil {
		inv.ps.Close()
	}
}
