package deploy

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// fakeCLI stands in for gcloud and bq. It appends each invocation to $FAKE_LOG
// (program and arguments tab-separated, one invocation per line), keeps a copy
// of the --env-vars-file it is given, prints a project number, and answers
// every describe "not found" the first time it sees those exact arguments and
// "found" afterwards, as a project would after the first deployment.
const fakeCLI = `#!/usr/bin/env bash
set -u
{ printf '%s' "$(basename "$0")"; for a in "$@"; do printf '\t%s' "$a"; done; printf '\n'; } >>"$FAKE_LOG"
for a in "$@"; do
  case $a in --env-vars-file=*) cp "${a#--env-vars-file=}" "$FAKE_LOG.env.yaml" ;; esac
done
if [[ ${1:-} == projects && ${2:-} == describe ]]; then echo 123456789012; exit 0; fi
for a in "$@"; do
  if [[ $a == describe ]]; then
    key=$FAKE_STATE/$(printf '%s\n' "$@" | cksum | cut -d' ' -f1)
    if [[ -e $key ]]; then echo "name: found"; exit 0; fi
    : >"$key"
    echo "ERROR: (gcloud) NOT_FOUND: fake" >&2
    exit 1
  fi
done
exit 0
`

// fake is a directory holding the fake gcloud and bq, with its log and state.
type fake struct{ dir, log, state string }

func newFake(t *testing.T) *fake {
	t.Helper()
	f := &fake{dir: t.TempDir()}
	f.log = filepath.Join(f.dir, "calls.log")
	f.state = filepath.Join(f.dir, "state")
	if err := os.Mkdir(f.state, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(f.dir, "bin")
	if err := os.Mkdir(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"gcloud", "bq"} {
		if err := os.WriteFile(filepath.Join(bin, name), []byte(fakeCLI), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

// calls returns the recorded invocations and clears the log.
func (f *fake) calls(t *testing.T) [][]string {
	t.Helper()
	b, err := os.ReadFile(f.log)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(f.log); err != nil {
		t.Fatal(err)
	}
	var out [][]string
	for _, line := range strings.Split(strings.TrimSuffix(string(b), "\n"), "\n") {
		out = append(out, strings.Split(line, "\t"))
	}
	return out
}

// result is what one run of deploy.sh produced.
type result struct {
	stdout, stderr string
	code           int
}

// baseEnv is a valid configuration matching the example specs.
func baseEnv() map[string]string {
	return map[string]string{
		"PROJECT_ID":           "my-project",
		"REGION":               "us-central1",
		"STATE":                "gs://my-project-fhirexport-state/state",
		"EXPORT_BUCKET":        "my-project-fhir-exports",
		"ALLOWED_STORES":       "projects/my-project/locations/us-central1/datasets/clinical/fhirStores/*",
		"ALLOWED_DESTINATIONS": "gs://my-project-fhir-exports/nightly, bq://my-project.fhir_analytics",
		"BQ_DATASET":           "my-project.fhir_analytics",
	}
}

func with(env map[string]string, kv ...string) map[string]string {
	out := map[string]string{}
	for k, v := range env {
		out[k] = v
	}
	for i := 0; i < len(kv); i += 2 {
		out[kv[i]] = kv[i+1]
	}
	return out
}

func without(env map[string]string, keys ...string) map[string]string {
	out := with(env)
	for _, k := range keys {
		delete(out, k)
	}
	return out
}

// runScript runs deploy.sh with only env (plus PATH, HOME, TMPDIR and the fake's
// variables) so that the developer's own environment cannot leak in. The fake
// gcloud comes first on PATH.
func runScript(t *testing.T, f *fake, env map[string]string, args ...string) result {
	t.Helper()
	script, err := filepath.Abs("deploy.sh")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("bash", append([]string{script}, args...)...)
	cmd.Dir = t.TempDir()
	cmd.Env = []string{
		"PATH=" + filepath.Join(f.dir, "bin") + ":/usr/local/bin:/usr/bin:/bin",
		"HOME=" + t.TempDir(),
		"TMPDIR=" + t.TempDir(),
		"LC_ALL=C",
		"FAKE_LOG=" + f.log,
		"FAKE_STATE=" + f.state,
	}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	var exit *exec.ExitError
	code := 0
	if errors.As(err, &exit) {
		code = exit.ExitCode()
	} else if err != nil {
		t.Fatalf("run deploy.sh: %v", err)
	}
	return result{stdout.String(), stderr.String(), code}
}

// printed is one command from a dry run: its text, its arguments as the shell
// parses them, and when it would run ("", "absent" or "present").
type printed struct {
	line string
	argv []string
	when string
}

// dryRun runs deploy.sh --dry-run, checks that it ran nothing, and parses the
// printed commands by running them through bash against the fake.
func dryRun(t *testing.T, env map[string]string, args ...string) []printed {
	t.Helper()
	f := newFake(t)
	r := runScript(t, f, env, append([]string{"--dry-run"}, args...)...)
	if r.code != 0 {
		t.Fatalf("dry run exited %d:\n%s", r.code, r.stderr)
	}
	if calls := f.calls(t); len(calls) > 0 {
		t.Fatalf("dry run executed %q", calls)
	}
	var out []printed
	var script strings.Builder
	for _, line := range strings.Split(r.stdout, "\n") {
		if !strings.HasPrefix(line, "gcloud ") && !strings.HasPrefix(line, "bq ") {
			continue
		}
		p := printed{line: line}
		switch {
		case strings.HasSuffix(line, "  # if absent"):
			p.when = "absent"
		case strings.HasSuffix(line, "  # if present"):
			p.when = "present"
		}
		out = append(out, p)
		script.WriteString(line + "\n")
	}
	cmd := exec.Command("bash", "-c", script.String())
	cmd.Env = []string{"PATH=" + filepath.Join(f.dir, "bin") + ":/usr/bin:/bin", "FAKE_LOG=" + f.log, "FAKE_STATE=" + f.state}
	if b, err := cmd.CombinedOutput(); err != nil && !strings.Contains(string(b), "NOT_FOUND") {
		t.Fatalf("parse printed commands: %v\n%s", err, b)
	}
	calls := f.calls(t)
	if len(calls) != len(out) {
		t.Fatalf("parsed %d commands from %d printed lines", len(calls), len(out))
	}
	for i := range out {
		out[i].argv = calls[i]
	}
	return out
}

// normalize replaces the per-run temporary env file path so runs compare equal.
func normalize(argv []string) []string {
	out := slices.Clone(argv)
	for i, a := range out {
		if strings.HasPrefix(a, "--env-vars-file=") {
			out[i] = "--env-vars-file=ENV_FILE"
		}
	}
	return out
}

func argvs(ps []printed, skip string) [][]string {
	var out [][]string
	for _, p := range ps {
		if p.when != skip || skip == "" {
			out = append(out, normalize(p.argv))
		}
	}
	return out
}

func specPath(t *testing.T, name string) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join("specs", name))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// expected is every command deploy.sh runs for baseEnv, in order, with when it
// runs. It is written out in full on purpose: this is the deployment's contract.
func expected(t *testing.T, projectNumber string) []printed {
	const (
		p         = "--project=my-project"
		startSA   = "fhirexport-start@my-project.iam.gserviceaccount.com"
		pollSA    = "fhirexport-poll@my-project.iam.gserviceaccount.com"
		startTrig = "fhirexport-start-trigger@my-project.iam.gserviceaccount.com"
		pollTrig  = "fhirexport-poll-trigger@my-project.iam.gserviceaccount.com"
	)
	agent := "serviceAccount:service-" + projectNumber + "@gcp-sa-healthcare.iam.gserviceaccount.com"
	pubsubAgent := "serviceAccount:service-" + projectNumber + "@gcp-sa-pubsub.iam.gserviceaccount.com"
	var out []printed
	add := func(when string, argv ...string) { out = append(out, printed{argv: argv, when: when}) }
	add("", "gcloud", "projects", "describe", "my-project", "--format=value(projectNumber)")
	add("", "gcloud", "services", "enable", "cloudfunctions.googleapis.com", "run.googleapis.com",
		"cloudbuild.googleapis.com", "artifactregistry.googleapis.com", "eventarc.googleapis.com",
		"pubsub.googleapis.com", "cloudscheduler.googleapis.com", "healthcare.googleapis.com",
		"storage.googleapis.com", "iam.googleapis.com", "logging.googleapis.com", "bigquery.googleapis.com", p)
	add("", "gcloud", "beta", "services", "identity", "create", "--service=healthcare.googleapis.com", p)
	add("", "gcloud", "beta", "services", "identity", "create", "--service=pubsub.googleapis.com", p)
	for _, topic := range []string{"fhirexport-requests", "fhirexport-poll", "fhirexport-events"} {
		add("", "gcloud", "pubsub", "topics", "describe", topic, p)
		add("absent", "gcloud", "pubsub", "topics", "create", topic, p)
	}
	for _, b := range []string{"gs://my-project-fhirexport-state", "gs://my-project-fhir-exports"} {
		add("", "gcloud", "storage", "buckets", "describe", b, p)
		add("absent", "gcloud", "storage", "buckets", "create", b, p, "--location=us-central1",
			"--uniform-bucket-level-access", "--public-access-prevention")
	}
	for _, sa := range [][2]string{
		{startSA, "fhirexport StartExport runtime"},
		{pollSA, "fhirexport PollExport runtime"},
		{startTrig, "fhirexport StartExport Eventarc trigger"},
		{pollTrig, "fhirexport PollExport Eventarc trigger"},
	} {
		add("", "gcloud", "iam", "service-accounts", "describe", sa[0], p)
		add("absent", "gcloud", "iam", "service-accounts", "create", strings.Split(sa[0], "@")[0], p,
			"--display-name="+sa[1])
	}
	for _, r := range [][4]string{
		{"fhirexport_starter", "fhirexport starter", "Start FHIR store exports (StartExport)", "healthcare.fhirStores.export"},
		{"fhirexport_poller", "fhirexport poller", "Follow FHIR export operations (PollExport)", "healthcare.operations.get"},
	} {
		add("", "gcloud", "iam", "roles", "describe", r[0], p)
		for _, verb := range []string{"create", "update"} {
			when := map[string]string{"create": "absent", "update": "present"}[verb]
			add(when, "gcloud", "iam", "roles", verb, r[0], p, "--title="+r[1], "--description="+r[2],
				"--permissions="+r[3], "--stage=GA")
		}
	}
	add("", "gcloud", "healthcare", "datasets", "add-iam-policy-binding", "clinical", "--location=us-central1", p,
		"--member=serviceAccount:"+startSA, "--role=projects/my-project/roles/fhirexport_starter")
	add("", "gcloud", "healthcare", "datasets", "add-iam-policy-binding", "clinical", "--location=us-central1", p,
		"--member=serviceAccount:"+pollSA, "--role=projects/my-project/roles/fhirexport_poller")
	for _, sa := range []string{startSA, pollSA} {
		add("", "gcloud", "pubsub", "topics", "add-iam-policy-binding", "fhirexport-events", p,
			"--member=serviceAccount:"+sa, "--role=roles/pubsub.publisher")
		add("", "gcloud", "storage", "buckets", "add-iam-policy-binding", "gs://my-project-fhirexport-state", p,
			"--member=serviceAccount:"+sa, "--role=roles/storage.objectUser")
	}
	add("", "gcloud", "storage", "buckets", "add-iam-policy-binding", "gs://my-project-fhir-exports", p,
		"--member="+agent, "--role=roles/storage.objectAdmin")
	add("", "bq", "query", "--project_id=my-project", "--use_legacy_sql=false",
		"GRANT `roles/bigquery.dataEditor` ON SCHEMA `my-project.fhir_analytics` TO \""+agent+"\"")
	add("", "gcloud", "projects", "add-iam-policy-binding", "my-project", "--member="+agent,
		"--role=roles/bigquery.jobUser", "--condition=None")
	for _, sa := range []string{startTrig, pollTrig} {
		add("", "gcloud", "iam", "service-accounts", "add-iam-policy-binding", sa, p,
			"--member="+pubsubAgent, "--role=roles/iam.serviceAccountTokenCreator")
	}
	for _, fn := range [][7]string{
		{"fhirexport-start", "StartExport", "fhirexport-requests", startSA, startTrig, "60s", "5"},
		{"fhirexport-poll", "PollExport", "fhirexport-poll", pollSA, pollTrig, "540s", "1"},
	} {
		add("", "gcloud", "functions", "deploy", fn[0], "--gen2", "--runtime=go126", "--region=us-central1", p,
			"--source=.", "--entry-point="+fn[1], "--trigger-topic="+fn[2], "--retry",
			"--service-account="+fn[3], "--trigger-service-account="+fn[4], "--ingress-settings=internal-only",
			"--env-vars-file=ENV_FILE", "--timeout="+fn[5], "--max-instances="+fn[6])
		add("", "gcloud", "functions", "add-invoker-policy-binding", fn[0], "--region=us-central1", p,
			"--member=serviceAccount:"+fn[4])
	}
	for _, j := range [][5]string{
		{"fhirexport-poll", "* * * * *", "fhirexport-poll", "--message-body={}", "fhirexport: poll pending exports"},
		{"fhirexport-nightly", "0 2 * * *", "fhirexport-requests",
			"--message-body-from-file=" + specPath(t, "nightly-full-gcs.json"), "fhirexport: nightly-full-gcs.json"},
		{"fhirexport-hourly", "15 * * * *", "fhirexport-requests",
			"--message-body-from-file=" + specPath(t, "hourly-incremental-bq.json"), "fhirexport: hourly-incremental-bq.json"},
	} {
		add("", "gcloud", "scheduler", "jobs", "describe", j[0], "--location=us-central1", p)
		for _, verb := range []string{"create", "update"} {
			when := map[string]string{"create": "absent", "update": "present"}[verb]
			add(when, "gcloud", "scheduler", "jobs", verb, "pubsub", j[0], "--location=us-central1", p,
				"--schedule="+j[1], "--time-zone=Etc/UTC", "--topic=projects/my-project/topics/"+j[2], j[3],
				"--description="+j[4])
		}
	}
	return out
}

const wantEnvFile = `FHIREXPORT_EVENTS_TOPIC: 'projects/my-project/topics/fhirexport-events'
FHIREXPORT_STATE: 'gs://my-project-fhirexport-state/state'
FHIREXPORT_ALLOWED_STORES: 'projects/my-project/locations/us-central1/datasets/clinical/fhirStores/*'
FHIREXPORT_ALLOWED_DESTINATIONS: 'gs://my-project-fhir-exports/nightly,bq://my-project.fhir_analytics'
`

func TestDryRunPrintsEveryCommand(t *testing.T) {
	t.Parallel()
	got := dryRun(t, baseEnv())
	want := expected(t, "PROJECT_NUMBER")
	if diff := cmp.Diff(argvs(want, ""), argvs(got, "")); diff != "" {
		t.Errorf("dry-run commands differ (-want +got):\n%s", diff)
	}
	for i := range min(len(got), len(want)) {
		if got[i].when != want[i].when {
			t.Errorf("%q: printed as %q, want %q", got[i].line, got[i].when, want[i].when)
		}
	}
}

func TestDryRunShowsEnvFileAndNeedsNoAccount(t *testing.T) {
	t.Parallel()
	f := newFake(t)
	r := runScript(t, f, baseEnv(), "--dry-run")
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	for _, line := range strings.Split(strings.TrimSuffix(wantEnvFile, "\n"), "\n") {
		if !strings.Contains(r.stdout, "#   "+line+"\n") {
			t.Errorf("dry run does not show env file line %q", line)
		}
	}
	if !strings.Contains(r.stdout, "service-PROJECT_NUMBER@gcp-sa-healthcare.iam.gserviceaccount.com") {
		t.Error("dry run does not use the PROJECT_NUMBER placeholder")
	}
}

// TestDeployWithFakeGcloud runs the script for real against the fake gcloud:
// first on an empty project (create paths), then again (update paths).
func TestDeployWithFakeGcloud(t *testing.T) {
	t.Parallel()
	f := newFake(t)
	want := expected(t, "123456789012")

	first := runScript(t, f, baseEnv())
	if first.code != 0 {
		t.Fatalf("first run exited %d:\n%s", first.code, first.stderr)
	}
	calls := f.calls(t)
	normalized := make([][]string, len(calls))
	for i, c := range calls {
		normalized[i] = normalize(c)
	}
	if diff := cmp.Diff(argvs(want, "present"), normalized); diff != "" {
		t.Errorf("first run: commands differ (-want +got):\n%s", diff)
	}
	env, err := os.ReadFile(f.log + ".env.yaml")
	if err != nil {
		t.Fatalf("no --env-vars-file was passed: %v", err)
	}
	if diff := cmp.Diff(wantEnvFile, string(env)); diff != "" {
		t.Errorf("env vars file differs (-want +got):\n%s", diff)
	}
	checkLeastPrivilege(t, calls)
	checkOrder(t, calls)

	second := runScript(t, f, baseEnv())
	if second.code != 0 {
		t.Fatalf("second run exited %d:\n%s", second.code, second.stderr)
	}
	calls = f.calls(t)
	normalized = make([][]string, len(calls))
	for i, c := range calls {
		normalized[i] = normalize(c)
	}
	if diff := cmp.Diff(argvs(want, "absent"), normalized); diff != "" {
		t.Errorf("second run: commands differ (-want +got):\n%s", diff)
	}
	for _, c := range calls {
		if slices.Contains(c, "create") && !slices.Contains(c, "identity") {
			t.Errorf("second run created something: %q", c)
		}
	}
}

// checkLeastPrivilege asserts every IAM grant: who gets which role on what.
func checkLeastPrivilege(t *testing.T, calls [][]string) {
	t.Helper()
	type grant struct{ resource, member, role string }
	var got []grant
	for _, c := range calls {
		joined := strings.Join(c, " ")
		switch {
		case strings.Contains(joined, "add-iam-policy-binding"):
			i := slices.Index(c, "add-iam-policy-binding")
			got = append(got, grant{strings.Join(c[1:i], " ") + " " + c[i+1], flag(c, "--member"), flag(c, "--role")})
		case strings.Contains(joined, "add-invoker-policy-binding"):
			got = append(got, grant{"functions " + c[3], flag(c, "--member"), "roles/run.invoker"})
		case c[0] == "bq":
			got = append(got, grant{"bq dataset my-project.fhir_analytics", "sql", c[len(c)-1]})
		}
	}
	sa := func(name string) string { return "serviceAccount:" + name + "@my-project.iam.gserviceaccount.com" }
	agent := "serviceAccount:service-123456789012@gcp-sa-healthcare.iam.gserviceaccount.com"
	want := []grant{
		{"healthcare datasets clinical", sa("fhirexport-start"), "projects/my-project/roles/fhirexport_starter"},
		{"healthcare datasets clinical", sa("fhirexport-poll"), "projects/my-project/roles/fhirexport_poller"},
		{"pubsub topics fhirexport-events", sa("fhirexport-start"), "roles/pubsub.publisher"},
		{"storage buckets gs://my-project-fhirexport-state", sa("fhirexport-start"), "roles/storage.objectUser"},
		{"pubsub topics fhirexport-events", sa("fhirexport-poll"), "roles/pubsub.publisher"},
		{"storage buckets gs://my-project-fhirexport-state", sa("fhirexport-poll"), "roles/storage.objectUser"},
		{"storage buckets gs://my-project-fhir-exports", agent, "roles/storage.objectAdmin"},
		{"bq dataset my-project.fhir_analytics", "sql", "GRANT `roles/bigquery.dataEditor` ON SCHEMA `my-project.fhir_analytics` TO \"" + agent + "\""},
		{"projects my-project", agent, "roles/bigquery.jobUser"},
		{"iam service-accounts " + sa("fhirexport-start-trigger")[len("serviceAccount:"):], "serviceAccount:service-123456789012@gcp-sa-pubsub.iam.gserviceaccount.com", "roles/iam.serviceAccountTokenCreator"},
		{"iam service-accounts " + sa("fhirexport-poll-trigger")[len("serviceAccount:"):], "serviceAccount:service-123456789012@gcp-sa-pubsub.iam.gserviceaccount.com", "roles/iam.serviceAccountTokenCreator"},
		{"functions fhirexport-start", sa("fhirexport-start-trigger"), "roles/run.invoker"},
		{"functions fhirexport-poll", sa("fhirexport-poll-trigger"), "roles/run.invoker"},
	}
	if diff := cmp.Diff(want, got, cmp.AllowUnexported(grant{})); diff != "" {
		t.Errorf("IAM grants differ (-want +got):\n%s", diff)
	}
}

// checkOrder asserts the dependencies between steps.
func checkOrder(t *testing.T, calls [][]string) {
	t.Helper()
	index := func(words ...string) int {
		for i, c := range calls {
			if containsAll(c, words...) {
				return i
			}
		}
		t.Fatalf("no call with %q", words)
		return -1
	}
	before := [][2][]string{
		{{"service-accounts", "create", "fhirexport-start"}, {"healthcare", "add-iam-policy-binding"}},
		{{"roles", "create", "fhirexport_starter"}, {"healthcare", "add-iam-policy-binding"}},
		{{"topics", "create", "fhirexport-events"}, {"topics", "add-iam-policy-binding"}},
		{{"identity", "create", "--service=healthcare.googleapis.com"}, {"gs://my-project-fhir-exports", "add-iam-policy-binding"}},
		{{"topics", "create", "fhirexport-requests"}, {"functions", "deploy", "fhirexport-start"}},
		{{"functions", "deploy", "fhirexport-start"}, {"add-invoker-policy-binding", "fhirexport-start"}},
		{{"functions", "deploy", "fhirexport-poll"}, {"add-invoker-policy-binding", "fhirexport-poll"}},
		{{"functions", "deploy", "fhirexport-poll"}, {"scheduler", "create", "fhirexport-poll"}},
	}
	for _, b := range before {
		if i, j := index(b[0]...), index(b[1]...); i > j {
			t.Errorf("%q runs after %q", b[0], b[1])
		}
	}
}

func containsAll(c []string, words ...string) bool {
	for _, w := range words {
		if !slices.Contains(c, w) && !slices.ContainsFunc(c, func(a string) bool { return strings.HasPrefix(a, w) && strings.HasPrefix(w, "--") }) {
			return false
		}
	}
	return true
}

// flag returns the value of --name=value in c.
func flag(c []string, name string) string {
	for _, a := range c {
		if v, ok := strings.CutPrefix(a, name+"="); ok {
			return v
		}
	}
	return ""
}

// find returns the printed commands whose arguments include all words.
func find(ps []printed, words ...string) [][]string {
	var out [][]string
	for _, p := range ps {
		if containsAll(p.argv, words...) {
			out = append(out, p.argv)
		}
	}
	return out
}

func TestDryRunVariants(t *testing.T) {
	t.Parallel()
	t.Run("without BigQuery", func(t *testing.T) {
		t.Parallel()
		ps := dryRun(t, with(without(baseEnv(), "BQ_DATASET"), "ALLOWED_DESTINATIONS", "gs://my-project-fhir-exports/nightly"))
		for _, p := range ps {
			if strings.Contains(p.line, "bigquery") || p.argv[0] == "bq" {
				t.Errorf("BigQuery step without BQ_DATASET: %s", p.line)
			}
		}
		if n := len(find(ps, "scheduler", "describe", "fhirexport-hourly")); n != 0 {
			t.Error("hourly BigQuery job scheduled without BQ_DATASET")
		}
		if n := len(find(ps, "scheduler", "describe", "fhirexport-nightly")); n != 1 {
			t.Error("nightly job missing")
		}
	})
	t.Run("jobs skipped when their spec is empty", func(t *testing.T) {
		t.Parallel()
		ps := dryRun(t, with(baseEnv(), "NIGHTLY_SPEC", "", "HOURLY_SPEC", ""))
		jobs := find(ps, "scheduler", "describe")
		if len(jobs) != 1 || jobs[0][4] != "fhirexport-poll" {
			t.Errorf("want only the poll job, got %q", jobs)
		}
	})
	t.Run("custom prefix, instances, timezone and build account", func(t *testing.T) {
		t.Parallel()
		ps := dryRun(t, with(baseEnv(), "NAME_PREFIX", "fx-dev", "START_MAX_INSTANCES", "3",
			"SCHEDULER_TIMEZONE", "Europe/Berlin", "BUILD_SERVICE_ACCOUNT", "builder@my-project.iam.gserviceaccount.com"))
		start := find(ps, "functions", "deploy", "fx-dev-start")
		if len(start) != 1 || flag(start[0], "--max-instances") != "3" || flag(start[0], "--trigger-topic") != "fx-dev-requests" ||
			flag(start[0], "--build-service-account") != "projects/my-project/serviceAccounts/builder@my-project.iam.gserviceaccount.com" {
			t.Errorf("start deploy = %q", start)
		}
		if poll := find(ps, "functions", "deploy", "fx-dev-poll"); len(poll) != 1 || flag(poll[0], "--max-instances") != "1" {
			t.Errorf("poll deploy = %q", poll)
		}
		if roles := find(ps, "roles", "create", "fx_dev_starter"); len(roles) != 1 {
			t.Errorf("role IDs must not contain hyphens: %q", find(ps, "roles", "create"))
		}
		for _, j := range find(ps, "scheduler", "pubsub") {
			if flag(j, "--time-zone") != "Europe/Berlin" {
				t.Errorf("job without the time zone: %q", j)
			}
		}
	})
	t.Run("store-level and project-level grants", func(t *testing.T) {
		t.Parallel()
		ps := dryRun(t, with(baseEnv(), "ALLOWED_STORES",
			"projects/my-project/locations/us-central1/datasets/clinical/fhirStores/main,projects/my-project/locations/*/datasets/*/fhirStores/*"))
		store := find(ps, "fhir-stores", "add-iam-policy-binding", "main")
		if len(store) != 1 || flag(store[0], "--role") != "projects/my-project/roles/fhirexport_starter" ||
			flag(store[0], "--dataset") != "clinical" || flag(store[0], "--location") != "us-central1" {
			t.Errorf("starter store grant = %q", store)
		}
		ds := find(ps, "datasets", "add-iam-policy-binding", "clinical")
		if len(ds) != 1 || flag(ds[0], "--role") != "projects/my-project/roles/fhirexport_poller" {
			t.Errorf("poller dataset grant = %q", ds)
		}
		var custom [][]string
		for _, c := range find(ps, "projects", "add-iam-policy-binding", "--condition=None") {
			if strings.HasPrefix(flag(c, "--role"), "projects/") {
				custom = append(custom, c)
			}
		}
		if len(custom) != 2 {
			t.Errorf("a '*' dataset needs a project-level grant per function, got %q", custom)
		}
	})
	t.Run("flags override variables", func(t *testing.T) {
		t.Parallel()
		fromEnv := dryRun(t, baseEnv())
		fromFlags := dryRun(t, map[string]string{"PROJECT_ID": "other-project", "REGION": "europe-west4"},
			"--project=my-project", "--region", "us-central1",
			"--state=gs://my-project-fhirexport-state/state", "--export-bucket=my-project-fhir-exports",
			"--allowed-stores=projects/my-project/locations/us-central1/datasets/clinical/fhirStores/*",
			"--allowed-destinations=gs://my-project-fhir-exports/nightly,bq://my-project.fhir_analytics",
			"--bq-dataset=my-project.fhir_analytics")
		if diff := cmp.Diff(argvs(fromEnv, ""), argvs(fromFlags, "")); diff != "" {
			t.Errorf("flags and variables differ (-env +flags):\n%s", diff)
		}
	})
}

func TestHelp(t *testing.T) {
	t.Parallel()
	r := runScript(t, newFake(t), nil, "--help")
	if r.code != 0 {
		t.Fatalf("--help exited %d", r.code)
	}
	for _, v := range []string{"PROJECT_ID", "REGION", "STATE", "EXPORT_BUCKET", "ALLOWED_STORES", "ALLOWED_DESTINATIONS",
		"BQ_DATASET", "NAME_PREFIX", "SCHEDULER_TIMEZONE", "NIGHTLY_SPEC", "HOURLY_SPEC", "START_MAX_INSTANCES", "--dry-run"} {
		if !strings.Contains(r.stdout, v) {
			t.Errorf("--help does not mention %s", v)
		}
	}
}

func TestMissingVariables(t *testing.T) {
	t.Parallel()
	required := []string{"PROJECT_ID", "REGION", "STATE", "EXPORT_BUCKET", "ALLOWED_STORES", "ALLOWED_DESTINATIONS"}
	t.Run("all", func(t *testing.T) {
		t.Parallel()
		f := newFake(t)
		r := runScript(t, f, nil, "--dry-run")
		if r.code != 2 {
			t.Errorf("exit %d, want 2", r.code)
		}
		for _, v := range required {
			if !strings.Contains(r.stderr, "missing required variable "+v) {
				t.Errorf("stderr does not name %s:\n%s", v, r.stderr)
			}
		}
		if calls := f.calls(t); calls != nil {
			t.Errorf("ran %q", calls)
		}
	})
	for _, v := range required {
		t.Run(v, func(t *testing.T) {
			t.Parallel()
			f := newFake(t)
			r := runScript(t, f, with(baseEnv(), v, ""))
			if r.code != 2 || !strings.Contains(r.stderr, "missing required variable "+v) {
				t.Errorf("exit %d, stderr:\n%s", r.code, r.stderr)
			}
			if strings.Count(r.stderr, "missing required variable") != 1 {
				t.Errorf("names more than %s:\n%s", v, r.stderr)
			}
			if calls := f.calls(t); calls != nil {
				t.Errorf("ran %q", calls)
			}
		})
	}
}

func TestBadValues(t *testing.T) {
	t.Parallel()
	spec := func(t *testing.T, body string) string {
		p := filepath.Join(t.TempDir(), "spec.json")
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	cases := []struct {
		name string
		env  map[string]string
		args []string
		want string
	}{
		{"project uppercase", with(baseEnv(), "PROJECT_ID", "My_Project"), nil, "PROJECT_ID 'My_Project' is not a project ID"},
		{"project short", with(baseEnv(), "PROJECT_ID", "abc"), nil, "PROJECT_ID 'abc' is not a project ID"},
		{"region", with(baseEnv(), "REGION", "us central"), nil, "REGION 'us central' is not a region"},
		{"state without gs", with(baseEnv(), "STATE", "my-bucket/state"), nil, "STATE 'my-bucket/state' must start with gs://"},
		{"state bad bucket", with(baseEnv(), "STATE", "gs://My_Bucket/state"), nil, "does not name a valid bucket"},
		{"state in export bucket", with(baseEnv(), "STATE", "gs://my-project-fhir-exports/state"), nil, "STATE must be in another bucket than EXPORT_BUCKET"},
		{"export bucket with path", with(baseEnv(), "EXPORT_BUCKET", "gs://my-project-fhir-exports/x"), nil, "EXPORT_BUCKET"},
		{"store not a store", with(baseEnv(), "ALLOWED_STORES", "projects/my-project/locations/l/datasets/d"), nil, "is not projects/P/locations/L/datasets/D/fhirStores/S"},
		{"store partial wildcard", with(baseEnv(), "ALLOWED_STORES", "projects/my-project/locations/l/datasets/d/fhirStores/main*"), nil, "must be a name or exactly '*'"},
		{"store in another project", with(baseEnv(), "ALLOWED_STORES", "projects/other-project/locations/l/datasets/d/fhirStores/*"), nil, "is outside PROJECT_ID my-project"},
		{"store any project", with(baseEnv(), "ALLOWED_STORES", "projects/*/locations/l/datasets/d/fhirStores/*"), nil, "is outside PROJECT_ID"},
		{"stores empty list", with(baseEnv(), "ALLOWED_STORES", " , "), nil, "ALLOWED_STORES lists no store pattern"},
		{"destination foreign bucket", with(baseEnv(), "ALLOWED_DESTINATIONS", "gs://someone-else/x"), nil, "is outside EXPORT_BUCKET"},
		{"destination scheme", with(baseEnv(), "ALLOWED_DESTINATIONS", "s3://b/x"), nil, "must start with gs:// or bq://"},
		{"destination other dataset", with(baseEnv(), "ALLOWED_DESTINATIONS", "gs://my-project-fhir-exports/nightly,bq://my-project.other"), nil, "is not bq://my-project.fhir_analytics"},
		{"destination bq without dataset", with(without(baseEnv(), "BQ_DATASET"), "HOURLY_SPEC", ""), nil, "needs BQ_DATASET to be set"},
		{"bq dataset with scheme", with(baseEnv(), "BQ_DATASET", "bq://my-project.fhir_analytics"), nil, "BQ_DATASET 'bq://my-project.fhir_analytics' must be project.dataset"},
		{"name prefix too long", with(baseEnv(), "NAME_PREFIX", "fhirexport-production"), nil, "NAME_PREFIX 'fhirexport-production' must be 1-16"},
		{"name prefix uppercase", with(baseEnv(), "NAME_PREFIX", "FhirExport"), nil, "NAME_PREFIX"},
		{"max instances zero", with(baseEnv(), "START_MAX_INSTANCES", "0"), nil, "START_MAX_INSTANCES '0' must be a positive integer"},
		{"max instances word", with(baseEnv(), "START_MAX_INSTANCES", "five"), nil, "START_MAX_INSTANCES"},
		{"timezone", with(baseEnv(), "SCHEDULER_TIMEZONE", "UTC+1 hour"), nil, "SCHEDULER_TIMEZONE"},
		{"schedule", with(baseEnv(), "NIGHTLY_SCHEDULE", "nightly"), nil, "NIGHTLY_SCHEDULE 'nightly' is not a five-field cron schedule"},
		{"build account", with(baseEnv(), "BUILD_SERVICE_ACCOUNT", "builder"), nil, "BUILD_SERVICE_ACCOUNT"},
		{"spec missing", with(baseEnv(), "NIGHTLY_SPEC", "/nonexistent/spec.json"), nil, "NIGHTLY_SPEC '/nonexistent/spec.json' is not a readable file"},
		{"spec store not allowed", with(baseEnv(), "ALLOWED_STORES", "projects/my-project/locations/us-central1/datasets/other/fhirStores/*"), nil, "fhirStore projects/my-project/locations/us-central1/datasets/clinical/fhirStores/main is not in ALLOWED_STORES"},
		{"spec destination not allowed", with(baseEnv(), "ALLOWED_DESTINATIONS", "gs://my-project-fhir-exports/elsewhere,bq://my-project.fhir_analytics"), nil, "destination gs://my-project-fhir-exports/nightly/{dataset}/{store}/{date} is not in ALLOWED_DESTINATIONS"},
		{"hourly spec without dataset", with(without(baseEnv(), "BQ_DATASET"), "ALLOWED_DESTINATIONS", "gs://my-project-fhir-exports/nightly", "HOURLY_SPEC", "specs/hourly-incremental-bq.json"), nil, "exports to BigQuery but BQ_DATASET is not set"},
		{"unknown flag", baseEnv(), []string{"--projekt=x"}, "unknown flag: --projekt"},
		{"flag without value", baseEnv(), []string{"--project"}, "--project needs a value"},
		{"stray argument", baseEnv(), []string{"deploy"}, "unexpected argument: deploy"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFake(t)
			env := tc.env
			if v, ok := env["HOURLY_SPEC"]; ok && strings.HasPrefix(v, "specs/") {
				abs, _ := filepath.Abs(v)
				env = with(env, "HOURLY_SPEC", abs)
			}
			r := runScript(t, f, env, append([]string{"--dry-run"}, tc.args...)...)
			if r.code != 2 {
				t.Errorf("exit %d, want 2; stderr:\n%s", r.code, r.stderr)
			}
			if !strings.Contains(r.stderr, tc.want) {
				t.Errorf("stderr does not say %q:\n%s", tc.want, r.stderr)
			}
			if calls := f.calls(t); calls != nil {
				t.Errorf("ran %q", calls)
			}
		})
	}
	t.Run("spec without store", func(t *testing.T) {
		t.Parallel()
		r := runScript(t, newFake(t), with(baseEnv(), "NIGHTLY_SPEC", spec(t, `{"gcsDestination":{"uriPrefix":"gs://my-project-fhir-exports/nightly"}}`)), "--dry-run")
		if r.code != 2 || !strings.Contains(r.stderr, "has no fhirStore") {
			t.Errorf("exit %d, stderr:\n%s", r.code, r.stderr)
		}
	})
	t.Run("all problems reported at once", func(t *testing.T) {
		t.Parallel()
		r := runScript(t, newFake(t), with(baseEnv(), "PROJECT_ID", "X", "REGION", "x", "START_MAX_INSTANCES", "-1"), "--dry-run")
		for _, v := range []string{"PROJECT_ID", "REGION", "START_MAX_INSTANCES"} {
			if !strings.Contains(r.stderr, v) {
				t.Errorf("stderr does not name %s:\n%s", v, r.stderr)
			}
		}
	})
}

func TestShellcheck(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("shellcheck"); err != nil {
		t.Skip("shellcheck is not installed (apt-get install shellcheck); CI installs it")
	}
	out, err := exec.Command("shellcheck", "deploy.sh").CombinedOutput()
	if err != nil {
		t.Errorf("shellcheck deploy.sh: %v\n%s", err, out)
	}
}

// signature is a command's first four words and its sorted flag names.
func signature(argv []string) string {
	var words, flags []string
	for _, a := range argv {
		if name, ok := strings.CutPrefix(a, "--"); ok {
			name, _, _ = strings.Cut(name, "=")
			flags = append(flags, name)
		} else if len(words) < 4 {
			words = append(words, a)
		}
	}
	slices.Sort(flags)
	return strings.Join(words, " ") + " --" + strings.Join(flags, " --")
}

// gcloudSlots bounds concurrent real gcloud processes: each takes a second or
// two of CPU to start.
var gcloudSlots = make(chan struct{}, 2)

// TestCommandsParseWithRealGcloud runs every gcloud command of the dry run with
// the real CLI and no account. gcloud checks commands, flags and values before
// it needs credentials, so a misspelt flag fails with "unrecognized arguments"
// or "argument --…", while a well-formed command fails for want of an account.
// That proves each flag exists. (Server-side values such as the runtime name
// are not checked; bq lines are not run.)
func TestCommandsParseWithRealGcloud(t *testing.T) {
	t.Parallel()
	gcloud, err := exec.LookPath("gcloud")
	if err != nil {
		t.Skip("gcloud is not installed; skipping the check of flags against the real CLI")
	}
	if testing.Short() {
		t.Skip("-short: skipping the real gcloud check (15-30 s)")
	}
	envFile := filepath.Join(t.TempDir(), "env.yaml")
	if err := os.WriteFile(envFile, []byte(wantEnvFile), 0o644); err != nil {
		t.Fatal(err)
	}
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	envFlag := regexp.MustCompile(`--env-vars-file=\S+`)
	seen := map[string]bool{}
	var lines []string
	// A concrete store and a '*' dataset add the store- and project-level grants.
	env := with(baseEnv(), "BUILD_SERVICE_ACCOUNT", "builder@my-project.iam.gserviceaccount.com", "ALLOWED_STORES",
		"projects/my-project/locations/us-central1/datasets/clinical/fhirStores/main,projects/my-project/locations/*/datasets/*/fhirStores/*")
	for _, p := range dryRun(t, env) {
		if p.argv[0] != "gcloud" {
			continue
		}
		// Commands that differ only in values (three topics, two functions)
		// are run once: the command path and flag names are what gcloud checks.
		if sig := signature(p.argv); !seen[sig] {
			seen[sig] = true
			lines = append(lines, envFlag.ReplaceAllString(p.line, "--env-vars-file="+envFile))
		}
	}
	for _, line := range lines {
		name := strings.Join(strings.Fields(line)[1:5], " ")
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			checkGcloudParses(t, gcloud, root, line)
		})
	}
}

var (
	gcloudAuthError  = regexp.MustCompile(`You do not currently have an active account selected`)
	gcloudParseError = regexp.MustCompile(`unrecognized arguments|argument --|Invalid choice|Invalid value|Failed to load|must be specified|is required`)
)

// checkGcloudParses runs a gcloud command line with no account and no
// network: a well-formed command fails only for want of an account, a
// malformed one at argument parsing.
func checkGcloudParses(t *testing.T, gcloud, dir, line string) {
	t.Helper()
	gcloudSlots <- struct{}{}
	defer func() { <-gcloudSlots }()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "-c", line)
	cmd.Dir = dir
	cmd.Env = []string{
		"PATH=" + filepath.Dir(gcloud) + ":/usr/bin:/bin",
		"HOME=" + t.TempDir(),
		"CLOUDSDK_CONFIG=" + t.TempDir(),
		"CLOUDSDK_CORE_DISABLE_PROMPTS=1",
		"CLOUDSDK_CORE_PROJECT=my-project",
		"CLOUDSDK_CORE_CHECK_GCE_METADATA=false",
		"CLOUDSDK_CORE_DISABLE_USAGE_REPORTING=true",
		"CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK=true",
		// Should anything try the network anyway, it meets a closed port.
		"CLOUDSDK_PROXY_TYPE=http", "CLOUDSDK_PROXY_ADDRESS=127.0.0.1", "CLOUDSDK_PROXY_PORT=9",
		"HTTPS_PROXY=http://127.0.0.1:9", "HTTP_PROXY=http://127.0.0.1:9",
	}
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("%s\nsucceeded without an account:\n%s", line, out)
	}
	if gcloudParseError.Match(out) || !gcloudAuthError.Match(out) {
		t.Errorf("%s\ndid not get past argument parsing:\n%s", line, out)
	}
}
