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
//	fhirexport feed pull PIPELINE --dir DIR
//	fhirexport completion bash|zsh|fish|powershell
//
// It uses Application Default Credentials, or the local stack's emulators
// through STORAGE_EMULATOR_HOST, PUBSUB_EMULATOR_HOST and an http://
// FHIREXPORT_HEALTHCARE_ENDPOINT, as the functions do. Exit codes: 0 ok,
// 1 failure, 2 usage.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"time"

	"cloud.google.com/go/pubsub/v2"
	"cloud.google.com/go/storage"
	"github.com/spf13/cobra"
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
	// healthcareOptions come first in the Healthcare client's options
	// (tests: credentials that cannot be had).
	healthcareOptions []option.ClientOption
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
	defer inv.close()
	root := inv.command()
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	cmd, err := root.ExecuteContextC(ctx)
	if cmd == nil {
		cmd = root
	}
	var ue usageError
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "fhirexport: %v\n", err)
		fmt.Fprintf(stderr, "Run '%s --help' for usage.\n", cmd.CommandPath())
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

	state    string
	project  string
	endpoint string
	json     bool

	storage *storage.Client
	hc      *healthcare.Service
	hcErr   error // why there is no Healthcare client for progress
	ps      *pubsub.Client
}

const mainLong = `fhirexport operates a fhirexport deployment through its state bucket and the
Healthcare and Pub/Sub APIs.

Against the local stack (cmd/fhirexport-local --serve) set STORAGE_EMULATOR_HOST,
PUBSUB_EMULATOR_HOST and FHIREXPORT_HEALTHCARE_ENDPOINT as it prints; otherwise
Application Default Credentials are used.

Exit codes: 0 ok, 1 failure, 2 usage.`

// command builds the command tree. A verb is a method returning its
// *cobra.Command, in a file of its own, added to the list below.
//
// cobra rather than flag: it parses flags anywhere on the line, prints help
// for every level (VERB --help, help VERB) once, answers an unknown flag with
// one line, and gives shell completion (fhirexport completion bash|zsh|fish|
// powershell), which the hand-written parser did not.
func (inv *invocation) command() *cobra.Command {
	root := &cobra.Command{
		Use:   "fhirexport",
		Short: "Operate a fhirexport deployment",
		Long:  mainLong,
		// Bare "fhirexport" and an unknown verb are usage errors, not help
		// with exit 0.
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return usagef("no verb given")
			}
			return usagef("unknown verb %q%s", args[0], suggest(cmd, args[0]))
		},
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			inv.defaults(cmd)
			return nil
		},
		SilenceErrors: true,
		SilenceUsage:  true,
	}
	root.SuggestionsMinimumDistance = 2
	// Verbs, as gcloud calls them; a verb with verbs under it (root,
	// watermark) runs only to report a missing or unknown one, so its usage
	// shows just "VERB".
	root.SetUsageTemplate(strings.NewReplacer("Available Commands:", "Verbs:", "[command]", "VERB [ARGS] [flags]",
		"{{if .Runnable}}", "{{if and .Runnable (not .HasAvailableSubCommands)}}").Replace(root.UsageTemplate()))
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err.Error()} })
	pf := root.PersistentFlags()
	// Defaults from the environment are filled in after parsing (defaults),
	// so help shows each default once, by its variable's name.
	pf.StringVar(&inv.state, "state", "", "state location `gs://BUCKET/PREFIX` (default $FHIREXPORT_STATE)")
	pf.StringVar(&inv.project, "project", "", "Google Cloud `PROJECT` for a --topic given by its short name (default $GOOGLE_CLOUD_PROJECT)")
	pf.StringVar(&inv.endpoint, "healthcare-endpoint", "", "Healthcare API base `URL`; http://… is an emulator, without auth (default $FHIREXPORT_HEALTHCARE_ENDPOINT)")
	pf.BoolVar(&inv.json, "json", false, "print JSON for scripts instead of a table")
	root.AddCommand(
		inv.statusCmd(),
		inv.runsCmd(),
		inv.showCmd(),
		inv.cancelCmd(),
		inv.rerunCmd(),
		inv.watermarkCmd(),
		inv.feedCmd(),
	)
	return root
}

// defaults fills the global options not given on the command line from the
// environment.
func (inv *invocation) defaults(cmd *cobra.Command) {
	for name, env := range map[string]string{"state": "FHIREXPORT_STATE", "project": "GOOGLE_CLOUD_PROJECT", "healthcare-endpoint": "FHIREXPORT_HEALTHCARE_ENDPOINT"} {
		if f := cmd.Flags().Lookup(name); f != nil && !f.Changed {
			_ = f.Value.Set(inv.getenv(env))
		}
	}
}

// suggest names the verbs close to a mistyped one.
func suggest(cmd *cobra.Command, verb string) string {
	if s := cmd.SuggestionsFor(verb); len(s) > 0 {
		return "; did you mean " + strings.Join(s, " or ") + "?"
	}
	return ""
}

// noArgs is cobra.NoArgs as a usage error naming the verb.
func noArgs(hint string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) > 0 {
			return usagef("%s takes no arguments, got %q%s", cmd.Name(), args, hint)
		}
		return nil
	}
}

// oneArg is cobra.ExactArgs(1) as a usage error saying what the argument is.
func oneArg(what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != 1 {
			return usagef("%s takes one argument, %s; got %d", cmd.Name(), what, len(args))
		}
		return nil
	}
}

// hcUse is how much a verb needs the Healthcare API.
type hcUse int

const (
	hcNone     hcUse = iota
	hcProgress       // for live progress only: without credentials, the state bucket alone
	hcRequired       // cancel
)

// inspector returns the state bucket's operator view with the Healthcare
// client the verb uses. Without one for progress, inv.hcErr says why.
func (inv *invocation) inspector(ctx context.Context, use hcUse) (*export.Inspector, *export.State, error) {
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
	switch use {
	case hcRequired:
		if hc, err = inv.healthcare(ctx); err != nil {
			return nil, nil, err
		}
	case hcProgress:
		var ue usageError
		if hc, err = inv.healthcare(ctx); errors.As(err, &ue) {
			return nil, nil, err
		} else if err != nil {
			inv.hcErr = err
		}
	}
	return export.NewInspector(st, hc, inv.now), st, nil
}

func (inv *invocation) healthcare(ctx context.Context) (*healthcare.Service, error) {
	if inv.hc != nil {
		return inv.hc, nil
	}
	opts := slices.Clone(inv.healthcareOptions)
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
