package deploy

import (
	"bytes"
	"context"
	"encoding/json"
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
	logging "google.golang.org/api/logging/v2"
	monitoring "google.golang.org/api/monitoring/v3"
)

// fakeCLI stands in for gcloud, bq and curl. It appends each invocation to
// $FAKE_LOG (program and arguments tab-separated, one invocation per line),
// keeps a copy of every file it is given (--env-vars-file, --config-from-file,
// --policy-from-file, curl's @files) as $FAKE_LOG.BASENAME, prints a project
// number, a function URL and a token, and answers every describe (and every
// alert policy list) "not found" the first time it sees those exact arguments
// and "found" afterwards, as a project would after the first deployment. A FHIR
// store is described from store.json beside the log, which curl's PATCH
// replaces with the body it sends, as the API would.
const fakeCLI = `#!/usr/bin/env bash
set -u
{ printf '%s' "$(basename "$0")"; for a in "$@"; do printf '\t%s' "$a"; done; printf '\n'; } >>"$FAKE_LOG"
store=$(dirname "$FAKE_LOG")/store.json
for a in "$@"; do
  case $a in
    --env-vars-file=* | --config-from-file=* | --policy-from-file=* | --lifecycle-file=*)
      f=${a#*=}
      cp "$f" "$FAKE_LOG.$(basename "$f")" 2>/dev/null ;;
    @*)
      cp "${a#@}" "$FAKE_LOG.$(basename "${a#@}")" 2>/dev/null ;;
  esac
done
if [[ $(basename "$0") == curl ]]; then
  prev=""
  for a in "$@"; do
    if [[ $prev == --data-binary ]]; then cp "${a#@}" "$store" 2>/dev/null; fi
    prev=$a
  done
  echo '{}'
  exit 0
fi
if [[ ${1:-} == projects && ${2:-} == describe ]]; then echo 123456789012; exit 0; fi
if [[ ${1:-} == functions && ${2:-} == describe ]]; then echo "https://$3-fake-uc.a.run.app"; exit 0; fi
if [[ ${1:-} == auth && ${2:-} == print-access-token ]]; then echo fake-token; exit 0; fi
if [[ ${1:-} == healthcare && ${2:-} == fhir-stores && ${3:-} == describe ]]; then
  if [[ -e $store ]]; then cat "$store"; else echo '{"name": "fake"}'; fi
  exit 0
fi
if [[ ${1:-} == storage && ${3:-} == describe && $* == *lifecycle_config* ]]; then
  if [[ -e $FAKE_LOG.state-lifecycle.json ]]; then printf '{"lifecycle_config": %s}\n' "$(cat "$FAKE_LOG.state-lifecycle.json")"; else echo '{}'; fi
  exit 0
fi
if [[ ${2:-} == monitoring && ${3:-} == policies && ${4:-} == list ]]; then
  key=$FAKE_STATE/$(printf '%s\n' "$@" | cksum | cut -d' ' -f1)
  if [[ -e $key ]]; then echo projects/my-project/alertPolicies/POLICY_ID; else : >"$key"; fi
  exit 0
fi
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
	for _, name := range []string{"gcloud", "bq", "curl"} {
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
		"NOTIFY_STORES":        mainStore,
		"NOTIFICATION_CHANNEL": "projects/my-project/notificationChannels/123",
	}
}

const mainStore = "projects/my-project/locations/us-central1/datasets/clinical/fhirStores/main"

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
		if !strings.HasPrefix(line, "gcloud ") && !strings.HasPrefix(line, "bq ") && !strings.HasPrefix(line, "curl ") {
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

// workDir matches the script's per-run temporary directory in a path.
var workDir = regexp.MustCompile(`[^\s=@]*/fhirexport-deploy\.[^/]+/`)

// normalize replaces the per-run temporary directory with WORK_DIR/ so runs
// compare equal.
func normalize(argv []string) []string {
	out := slices.Clone(argv)
	for i, a := range out {
		out[i] = workDir.ReplaceAllString(a, "WORK_DIR/")
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
// recordURL is what describing the RecordChange function answers.
func expected(t *testing.T, projectNumber, recordURL string) []printed {
	const (
		p          = "--project=my-project"
		startSA    = "fhirexport-start@my-project.iam.gserviceaccount.com"
		pollSA     = "fhirexport-poll@my-project.iam.gserviceaccount.com"
		recordSA   = "fhirexport-record@my-project.iam.gserviceaccount.com"
		startTrig  = "fhirexport-start-trigger@my-project.iam.gserviceaccount.com"
		pollTrig   = "fhirexport-poll-trigger@my-project.iam.gserviceaccount.com"
		recordPush = "fhirexport-record-push@my-project.iam.gserviceaccount.com"
	)
	agent := "serviceAccount:service-" + projectNumber + "@gcp-sa-healthcare.iam.gserviceaccount.com"
	pubsubAgent := "serviceAccount:service-" + projectNumber + "@gcp-sa-pubsub.iam.gserviceaccount.com"
	var out []printed
	add := func(when string, argv ...string) { out = append(out, printed{argv: argv, when: when}) }
	add("", "gcloud", "projects", "describe", "my-project", "--format=value(projectNumber)")
	add("", "gcloud", "services", "enable", "cloudfunctions.googleapis.com", "run.googleapis.com",
		"cloudbuild.googleapis.com", "artifactregistry.googleapis.com", "eventarc.googleapis.com",
		"pubsub.googleapis.com", "cloudscheduler.googleapis.com", "healthcare.googleapis.com",
		"storage.googleapis.com", "iam.googleapis.com", "logging.googleapis.com", "monitoring.googleapis.com",
		"bigquery.googleapis.com", p)
	add("", "gcloud", "beta", "services", "identity", "create", "--service=healthcare.googleapis.com", p)
	add("", "gcloud", "beta", "services", "identity", "create", "--service=pubsub.googleapis.com", p)
	for _, topic := range []string{"fhirexport-requests", "fhirexport-poll", "fhirexport-events", "fhirexport-changes"} {
		add("", "gcloud", "pubsub", "topics", "describe", topic, p)
		add("absent", "gcloud", "pubsub", "topics", "create", topic, p)
	}
	for _, b := range []string{"gs://my-project-fhirexport-state", "gs://my-project-fhir-exports"} {
		add("", "gcloud", "storage", "buckets", "describe", b, p)
		add("absent", "gcloud", "storage", "buckets", "create", b, p, "--location=us-central1",
			"--uniform-bucket-level-access", "--public-access-prevention")
	}
	add("", "gcloud", "storage", "buckets", "describe", "gs://my-project-fhirexport-state", p, "--format=json(lifecycle_config)")
	add("absent", "gcloud", "storage", "buckets", "update", "gs://my-project-fhirexport-state", p, "--lifecycle-file=WORK_DIR/state-lifecycle.json")
	for _, sa := range [][2]string{
		{startSA, "fhirexport StartExport runtime"},
		{pollSA, "fhirexport PollExport runtime"},
		{recordSA, "fhirexport RecordChange runtime"},
		{startTrig, "fhirexport StartExport Eventarc trigger"},
		{pollTrig, "fhirexport PollExport Eventarc trigger"},
		{recordPush, "fhirexport RecordChange Pub/Sub push"},
	} {
		add("", "gcloud", "iam", "service-accounts", "describe", sa[0], p)
		add("absent", "gcloud", "iam", "service-accounts", "create", strings.Split(sa[0], "@")[0], p,
			"--display-name="+sa[1])
	}
	for _, r := range [][4]string{
		{"fhirexport_exporter", "fhirexport exporter", "Export FHIR stores (StartExport, PollExport)",
			"healthcare.fhirStores.export"},
		{"fhirexport_starter", "fhirexport starter", "List stores and export operations (StartExport)",
			"healthcare.fhirStores.list,healthcare.operations.get,healthcare.operations.list"},
		{"fhirexport_poller", "fhirexport poller", "Follow and cancel FHIR export operations (PollExport)",
			"healthcare.fhirResources.get,healthcare.operations.cancel,healthcare.operations.get,healthcare.operations.list"},
		{"fhirexport_recorder", "fhirexport recorder", "Add deletion tombstones to the state bucket (RecordChange)",
			"storage.objects.create,storage.objects.get,storage.objects.list"},
		{"fhirexport_feed_writer", "fhirexport feed writer", "Write manifests and deleted files beside exports (PollExport)",
			"storage.objects.create,storage.objects.get,storage.objects.list"},
		{"fhirexport_output_lister", "fhirexport output lister", "List export objects to resolve a lost export answer (StartExport)",
			"storage.objects.list"},
	} {
		add("", "gcloud", "iam", "roles", "describe", r[0], p)
		for _, verb := range []string{"create", "update"} {
			when := map[string]string{"create": "absent", "update": "present"}[verb]
			add(when, "gcloud", "iam", "roles", verb, r[0], p, "--title="+r[1], "--description="+r[2],
				"--permissions="+r[3], "--stage=GA")
		}
	}
	for _, g := range [][2]string{
		{startSA, "fhirexport_exporter"}, {startSA, "fhirexport_starter"},
		{pollSA, "fhirexport_exporter"}, {pollSA, "fhirexport_poller"},
	} {
		add("", "gcloud", "healthcare", "datasets", "add-iam-policy-binding", "clinical", "--location=us-central1", p,
			"--member=serviceAccount:"+g[0], "--role=projects/my-project/roles/"+g[1])
	}
	for _, sa := range []string{startSA, pollSA} {
		add("", "gcloud", "pubsub", "topics", "add-iam-policy-binding", "fhirexport-events", p,
			"--member=serviceAccount:"+sa, "--role=roles/pubsub.publisher")
		add("", "gcloud", "storage", "buckets", "add-iam-policy-binding", "gs://my-project-fhirexport-state", p,
			"--member=serviceAccount:"+sa, "--role=roles/storage.objectUser")
	}
	add("", "gcloud", "storage", "buckets", "add-iam-policy-binding", "gs://my-project-fhirexport-state", p,
		"--member=serviceAccount:"+recordSA, "--role=projects/my-project/roles/fhirexport_recorder")
	add("", "gcloud", "storage", "buckets", "add-iam-policy-binding", "gs://my-project-fhir-exports", p,
		"--member=serviceAccount:"+pollSA, "--role=projects/my-project/roles/fhirexport_feed_writer")
	add("", "gcloud", "storage", "buckets", "add-iam-policy-binding", "gs://my-project-fhir-exports", p,
		"--member=serviceAccount:"+startSA, "--role=projects/my-project/roles/fhirexport_output_lister")
	add("", "gcloud", "pubsub", "topics", "add-iam-policy-binding", "fhirexport-changes", p,
		"--member="+agent, "--role=roles/pubsub.publisher")
	add("", "gcloud", "storage", "buckets", "add-iam-policy-binding", "gs://my-project-fhir-exports", p,
		"--member="+agent, "--role=roles/storage.objectAdmin")
	add("", "bq", "query", "--project_id=my-project", "--use_legacy_sql=false",
		"GRANT `roles/bigquery.dataEditor` ON SCHEMA `my-project.fhir_analytics` TO \""+agent+"\"")
	add("", "gcloud", "projects", "add-iam-policy-binding", "my-project", "--member="+agent,
		"--role=roles/bigquery.jobUser", "--condition=None")
	for _, sa := range []string{startTrig, pollTrig, recordPush} {
		add("", "gcloud", "iam", "service-accounts", "add-iam-policy-binding", sa, p,
			"--member="+pubsubAgent, "--role=roles/iam.serviceAccountTokenCreator")
	}
	for _, fn := range []struct {
		name, entry, sa, invoker, timeout, max, env string
		trigger                                     []string
	}{
		{"fhirexport-start", "StartExport", startSA, startTrig, "60s", "5", "env-start.yaml",
			[]string{"--trigger-topic=fhirexport-requests", "--retry", "--trigger-service-account=" + startTrig}},
		{"fhirexport-poll", "PollExport", pollSA, pollTrig, "540s", "1", "env-poll.yaml",
			[]string{"--trigger-topic=fhirexport-poll", "--retry", "--trigger-service-account=" + pollTrig}},
		{"fhirexport-record", "RecordChange", recordSA, recordPush, "60s", "5", "env-record.yaml",
			[]string{"--trigger-http", "--no-allow-unauthenticated"}},
	} {
		argv := []string{"gcloud", "functions", "deploy", fn.name, "--gen2", "--runtime=go126", "--region=us-central1", p,
			"--source=.", "--entry-point=" + fn.entry}
		argv = append(argv, fn.trigger...)
		argv = append(argv, "--service-account="+fn.sa, "--ingress-settings=internal-only",
			"--env-vars-file=WORK_DIR/"+fn.env, "--timeout="+fn.timeout, "--max-instances="+fn.max, "--concurrency=1")
		add("", argv...)
		add("", "gcloud", "functions", "add-invoker-policy-binding", fn.name, "--region=us-central1", p,
			"--member=serviceAccount:"+fn.invoker)
	}
	add("", "gcloud", "functions", "describe", "fhirexport-record", "--gen2", "--region=us-central1", p,
		"--format=value(serviceConfig.uri)")
	push := []string{"--push-endpoint=" + recordURL + "/projects/my-project/topics/fhirexport-changes",
		"--push-auth-service-account=" + recordPush, "--push-auth-token-audience=" + recordURL,
		"--ack-deadline=60", "--min-retry-delay=10s", "--max-retry-delay=600s", "--expiration-period=never"}
	add("", "gcloud", "pubsub", "subscriptions", "describe", "fhirexport-record", p)
	add("absent", append([]string{"gcloud", "pubsub", "subscriptions", "create", "fhirexport-record", p,
		"--topic=fhirexport-changes", `--message-filter=attributes.action = "DeleteResource"`}, push...)...)
	add("present", append([]string{"gcloud", "pubsub", "subscriptions", "update", "fhirexport-record", p}, push...)...)
	add("", "gcloud", "healthcare", "fhir-stores", "describe", "main", "--dataset=clinical", "--location=us-central1", p,
		"--format=json")
	add("absent", "gcloud", "auth", "print-access-token")
	add("absent", "curl", "--silent", "--show-error", "--fail-with-body", "-X", "PATCH", "-H", "@WORK_DIR/auth-header",
		"-H", "Content-Type: application/json", "--data-binary", "@WORK_DIR/notify-clinical-main.json",
		"https://healthcare.googleapis.com/v1/"+mainStore+"?updateMask=notificationConfigs")
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
	for _, m := range [][2]string{{"fhirexport_outcomes", "outcomes-metric.json"}, {"fhirexport_watermark_age", "watermark-age-metric.json"}} {
		add("", "gcloud", "logging", "metrics", "describe", m[0], p)
		add("absent", "gcloud", "logging", "metrics", "create", m[0], p, "--config-from-file=WORK_DIR/"+m[1])
		add("present", "gcloud", "logging", "metrics", "update", m[0], p, "--config-from-file=WORK_DIR/"+m[1])
	}
	for _, pol := range [][2]string{{"fhirexport: failed or partial export", "policy-outcomes.json"},
		{"fhirexport: stale incremental watermark", "policy-watermark.json"}} {
		add("", "gcloud", "alpha", "monitoring", "policies", "list", p, `--filter=displayName="`+pol[0]+`"`,
			"--format=value(name)")
		add("absent", "gcloud", "alpha", "monitoring", "policies", "create", p, "--policy-from-file=WORK_DIR/"+pol[1])
		add("present", "gcloud", "alpha", "monitoring", "policies", "update", "projects/my-project/alertPolicies/POLICY_ID",
			p, "--policy-from-file=WORK_DIR/"+pol[1])
	}
	return out
}

const (
	dryRunRecordURL = "https://RECORD_FUNCTION_URL"
	fakeRecordURL   = "https://fhirexport-record-fake-uc.a.run.app"
)

const commonEnv = `FHIREXPORT_EVENTS_TOPIC: 'projects/my-project/topics/fhirexport-events'
FHIREXPORT_STATE: 'gs://my-project-fhirexport-state/state'
FHIREXPORT_ALLOWED_STORES: 'projects/my-project/locations/us-central1/datasets/clinical/fhirStores/*'
FHIREXPORT_ALLOWED_DESTINATIONS: 'gs://my-project-fhir-exports/nightly,bq://my-project.fhir_analytics'
`

// wantEnvFiles are the functions' --env-vars-file contents for baseEnv.
var wantEnvFiles = map[string]string{
	"env-start.yaml":  commonEnv + "FHIREXPORT_MAX_RUNNING: '5'\n",
	"env-poll.yaml":   commonEnv + "FHIREXPORT_MAX_RUNNING: '5'\n",
	"env-record.yaml": commonEnv,
}

func TestDryRunPrintsEveryCommand(t *testing.T) {
	t.Parallel()
	got := dryRun(t, baseEnv())
	want := expected(t, "PROJECT_NUMBER", dryRunRecordURL)
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
	for name, content := range wantEnvFiles {
		shown := "# " + name + " (a temporary file, removed on exit) holds:\n#   " +
			strings.ReplaceAll(strings.TrimSuffix(content, "\n"), "\n", "\n#   ") + "\n"
		if !strings.Contains(r.stdout, shown) {
			t.Errorf("dry run does not show %s as\n%s", name, shown)
		}
	}
	for _, name := range []string{"outcomes-metric.json", "watermark-age-metric.json", "policy-outcomes.json", "policy-watermark.json"} {
		if !strings.Contains(r.stdout, "# "+name+" (a temporary file, removed on exit) holds:\n#   {\n") {
			t.Errorf("dry run does not show %s", name)
		}
	}
	if !strings.Contains(r.stdout, `# notify-clinical-main.json: its notificationConfigs plus {"pubsubTopic": "projects/my-project/topics/fhirexport-changes", "sendFullResource": false}`) {
		t.Error("dry run does not say what the notification config PATCH sends")
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
	want := expected(t, "123456789012", fakeRecordURL)

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
	for name, content := range wantEnvFiles {
		env, err := os.ReadFile(f.log + "." + name)
		if err != nil {
			t.Fatalf("no --env-vars-file %s was passed: %v", name, err)
		}
		if diff := cmp.Diff(content, string(env)); diff != "" {
			t.Errorf("%s differs (-want +got):\n%s", name, diff)
		}
	}
	checkLeastPrivilege(t, calls)
	checkOrder(t, calls)
	lifecycle, err := os.ReadFile(f.log + ".state-lifecycle.json")
	if err != nil {
		t.Fatalf("no lifecycle rule was set on the state bucket: %v", err)
	}
	if want := `{"rule": [{"action": {"type": "Delete"}, "condition": {"age": 35, "matchesPrefix": ["state/tombstones/"]}}]}` + "\n"; string(lifecycle) != want {
		t.Errorf("state bucket lifecycle:\n%s\nwant\n%s", lifecycle, want)
	}

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

// TestLifecycleRuleKeepsTheBucketsOwn: a state bucket with lifecycle rules
// of its own keeps them; the tombstone rule is added beside them (with jq).
func TestLifecycleRuleKeepsTheBucketsOwn(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("jq"); err != nil {
		t.Skip("jq is not installed")
	}
	f := newFake(t)
	own := `{"rule": [{"action": {"type": "Delete"}, "condition": {"age": 400}}]}`
	if err := os.WriteFile(f.log+".state-lifecycle.json", []byte(own), 0o644); err != nil {
		t.Fatal(err)
	}
	if r := runScript(t, f, baseEnv()); r.code != 0 {
		t.Fatalf("run exited %d:\n%s", r.code, r.stderr)
	}
	b, err := os.ReadFile(f.log + ".state-lifecycle.json")
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Rule []struct {
			Condition struct {
				Age           int      `json:"age"`
				MatchesPrefix []string `json:"matchesPrefix"`
			} `json:"condition"`
		} `json:"rule"`
	}
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("lifecycle file %s: %v", b, err)
	}
	if len(got.Rule) != 2 || got.Rule[0].Condition.Age != 400 || got.Rule[1].Condition.Age != 35 ||
		!slices.Equal(got.Rule[1].Condition.MatchesPrefix, []string{"state/tombstones/"}) {
		t.Errorf("lifecycle rules after the run: %s; want the bucket's own rule, then the tombstone rule", b)
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
	pubsubAgent := "serviceAccount:service-123456789012@gcp-sa-pubsub.iam.gserviceaccount.com"
	want := []grant{
		{"healthcare datasets clinical", sa("fhirexport-start"), "projects/my-project/roles/fhirexport_exporter"},
		{"healthcare datasets clinical", sa("fhirexport-start"), "projects/my-project/roles/fhirexport_starter"},
		{"healthcare datasets clinical", sa("fhirexport-poll"), "projects/my-project/roles/fhirexport_exporter"},
		{"healthcare datasets clinical", sa("fhirexport-poll"), "projects/my-project/roles/fhirexport_poller"},
		{"pubsub topics fhirexport-events", sa("fhirexport-start"), "roles/pubsub.publisher"},
		{"storage buckets gs://my-project-fhirexport-state", sa("fhirexport-start"), "roles/storage.objectUser"},
		{"pubsub topics fhirexport-events", sa("fhirexport-poll"), "roles/pubsub.publisher"},
		{"storage buckets gs://my-project-fhirexport-state", sa("fhirexport-poll"), "roles/storage.objectUser"},
		{"storage buckets gs://my-project-fhirexport-state", sa("fhirexport-record"), "projects/my-project/roles/fhirexport_recorder"},
		{"storage buckets gs://my-project-fhir-exports", sa("fhirexport-poll"), "projects/my-project/roles/fhirexport_feed_writer"},
		{"storage buckets gs://my-project-fhir-exports", sa("fhirexport-start"), "projects/my-project/roles/fhirexport_output_lister"},
		{"pubsub topics fhirexport-changes", agent, "roles/pubsub.publisher"},
		{"storage buckets gs://my-project-fhir-exports", agent, "roles/storage.objectAdmin"},
		{"bq dataset my-project.fhir_analytics", "sql", "GRANT `roles/bigquery.dataEditor` ON SCHEMA `my-project.fhir_analytics` TO \"" + agent + "\""},
		{"projects my-project", agent, "roles/bigquery.jobUser"},
		{"iam service-accounts " + sa("fhirexport-start-trigger")[len("serviceAccount:"):], pubsubAgent, "roles/iam.serviceAccountTokenCreator"},
		{"iam service-accounts " + sa("fhirexport-poll-trigger")[len("serviceAccount:"):], pubsubAgent, "roles/iam.serviceAccountTokenCreator"},
		{"iam service-accounts " + sa("fhirexport-record-push")[len("serviceAccount:"):], pubsubAgent, "roles/iam.serviceAccountTokenCreator"},
		{"functions fhirexport-start", sa("fhirexport-start-trigger"), "roles/run.invoker"},
		{"functions fhirexport-poll", sa("fhirexport-poll-trigger"), "roles/run.invoker"},
		{"functions fhirexport-record", sa("fhirexport-record-push"), "roles/run.invoker"},
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
		{{"topics", "create", "fhirexport-changes"}, {"fhirexport-changes", "add-iam-policy-binding"}},
		{{"roles", "create", "fhirexport_recorder"}, {"add-iam-policy-binding", "--role=projects/my-project/roles/fhirexport_recorder"}},
		{{"functions", "deploy", "fhirexport-record"}, {"subscriptions", "create", "fhirexport-record"}},
		{{"add-invoker-policy-binding", "fhirexport-record"}, {"subscriptions", "create", "fhirexport-record"}},
		// Nothing may be published to the changes topic before the
		// subscription exists (it would be lost) or the agent may publish.
		{{"subscriptions", "create", "fhirexport-record"}, {"curl", "PATCH"}},
		{{"fhirexport-changes", "add-iam-policy-binding"}, {"curl", "PATCH"}},
		{{"metrics", "create", "fhirexport_outcomes"}, {"policies", "create"}},
		{{"metrics", "create", "fhirexport_watermark_age"}, {"policies", "create"}},
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
		// Only exporting is granted on the store; listing and operations
		// are checked on the dataset.
		var store []string
		for _, c := range find(ps, "fhir-stores", "add-iam-policy-binding", "main", "--dataset=clinical", "--location=us-central1") {
			store = append(store, flag(c, "--member")+" "+flag(c, "--role"))
		}
		wantStore := []string{
			"serviceAccount:fhirexport-start@my-project.iam.gserviceaccount.com projects/my-project/roles/fhirexport_exporter",
			"serviceAccount:fhirexport-poll@my-project.iam.gserviceaccount.com projects/my-project/roles/fhirexport_exporter",
		}
		if diff := cmp.Diff(wantStore, store); diff != "" {
			t.Errorf("store grants differ (-want +got):\n%s", diff)
		}
		var ds []string
		for _, c := range find(ps, "datasets", "add-iam-policy-binding", "clinical") {
			ds = append(ds, flag(c, "--member")+" "+flag(c, "--role"))
		}
		wantDataset := []string{
			"serviceAccount:fhirexport-start@my-project.iam.gserviceaccount.com projects/my-project/roles/fhirexport_starter",
			"serviceAccount:fhirexport-poll@my-project.iam.gserviceaccount.com projects/my-project/roles/fhirexport_poller",
		}
		if diff := cmp.Diff(wantDataset, ds); diff != "" {
			t.Errorf("dataset grants differ (-want +got):\n%s", diff)
		}
		var custom []string
		for _, c := range find(ps, "projects", "add-iam-policy-binding", "--condition=None") {
			if strings.HasPrefix(flag(c, "--role"), "projects/") {
				custom = append(custom, flag(c, "--member")+" "+flag(c, "--role"))
			}
		}
		// A '*' dataset needs every custom role at project level.
		if diff := cmp.Diff(append(wantStore[:1:1], wantDataset[0], wantStore[1], wantDataset[1]), custom); diff != "" {
			t.Errorf("project-level grants differ (-want +got):\n%s", diff)
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
			"--bq-dataset=my-project.fhir_analytics", "--notify-stores", mainStore,
			"--notification-channel=projects/my-project/notificationChannels/123")
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
		"BQ_DATASET", "NAME_PREFIX", "SCHEDULER_TIMEZONE", "NIGHTLY_SPEC", "HOURLY_SPEC", "START_MAX_INSTANCES", "--dry-run",
		"MAX_RUNNING", "--max-running", "POLL_WORKERS", "--poll-workers", "NOTIFY_STORES", "--notify-stores",
		"NOTIFICATION_CHANNEL", "--notification-channel", "ALERT_WATERMARK_AGE", "--alert-watermark-age",
		"NAME_PREFIX-record (RecordChange)", "NAME_PREFIX-record-push", "NAME_PREFIX_outcomes", "NAME_PREFIX_watermark_age",
		"-changes", "_recorder", "gcloud alpha"} {
		if !strings.Contains(r.stdout, v) {
			t.Errorf("--help does not mention %s", v)
		}
	}
}

// TestDryRunFromTheEnvironment: DRY_RUN=1 is a dry run, as the help says
// every setting is an environment variable; a value that is neither 0 nor 1
// is refused before anything runs; a mistyped --dry-run is an unknown flag;
// --help lists every custom role.
func TestDryRunFromTheEnvironment(t *testing.T) {
	t.Parallel()
	flagRun := runScript(t, newFake(t), baseEnv(), "--dry-run")
	// --help lists every custom role the dry run creates, so a new role
	// cannot be left out of it.
	help := runScript(t, newFake(t), nil, "--help").stdout
	created := regexp.MustCompile(`(?m)^gcloud iam roles create (\S+) `).FindAllStringSubmatch(flagRun.stdout, -1)
	if len(created) < 6 {
		t.Fatalf("the dry run creates %d custom roles, want at least 6:\n%s", len(created), flagRun.stdout)
	}
	for _, c := range created {
		if id := strings.Replace(c[1], "fhirexport_", "NAME_PREFIX_", 1); !strings.Contains(help, id) {
			t.Errorf("--help does not list the custom role %s (created as %s)", id, c[1])
		}
	}
	for _, tc := range []struct {
		name string
		env  map[string]string
		args []string
		code int
		want string // on stderr, for refusals
	}{
		{"DRY_RUN=1", with(baseEnv(), "DRY_RUN", "1"), nil, 0, ""},
		{"DRY_RUN=yes", with(baseEnv(), "DRY_RUN", "yes"), nil, 2, "DRY_RUN='yes' must be 1"},
		{"DRY_RUN arithmetic", with(baseEnv(), "DRY_RUN", "x[$(touch /tmp/pwned)]"), nil, 2, "must be 1"},
		{"--dryrun", baseEnv(), []string{"--dryrun"}, 2, "unknown flag: --dryrun"},
		{"--dryrun before a flag", baseEnv(), []string{"--dryrun", "--project=my-project"}, 2, "unknown flag: --dryrun"},
		{"--dry-run=1", baseEnv(), []string{"--dry-run=1"}, 2, "unknown flag: --dry-run"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFake(t)
			r := runScript(t, f, tc.env, tc.args...)
			if calls := f.calls(t); calls != nil {
				t.Fatalf("ran %d commands, e.g. %q; want none", len(calls), calls[0])
			}
			if r.code != tc.code {
				t.Fatalf("exit %d, want %d; stderr:\n%s", r.code, tc.code, r.stderr)
			}
			if tc.code != 0 {
				if !strings.Contains(r.stderr, tc.want) || strings.Contains(r.stderr, "needs a value") {
					t.Errorf("stderr does not say %q:\n%s", tc.want, r.stderr)
				}
				return
			}
			// The per-run directory is under the test's own (named) one.
			tmp := regexp.MustCompile(`\S*/fhirexport-deploy\.[^/]+/`)
			if tmp.ReplaceAllString(r.stdout, "") != tmp.ReplaceAllString(flagRun.stdout, "") {
				t.Errorf("DRY_RUN=1 printed something else than --dry-run:\n%s", r.stdout)
			}
		})
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
		{"state empty segment", with(baseEnv(), "STATE", "gs://my-bucket/a//b"), nil, "has an empty path segment"},
		{"state in export bucket", with(baseEnv(), "STATE", "gs://my-project-fhir-exports/state"), nil, "STATE must be in another bucket than EXPORT_BUCKET"},
		{"export bucket with path", with(baseEnv(), "EXPORT_BUCKET", "gs://my-project-fhir-exports/x"), nil, "EXPORT_BUCKET"},
		{"store not a store", with(baseEnv(), "ALLOWED_STORES", "projects/my-project/locations/l/datasets/d"), nil, "is not projects/P/locations/L/datasets/D/fhirStores/S"},
		{"store partial wildcard", with(baseEnv(), "ALLOWED_STORES", "projects/my-project/locations/l/datasets/d/fhirStores/main*"), nil, "must be a name or exactly '*'"},
		{"store id with a space", with(baseEnv(), "ALLOWED_STORES", "projects/my-project/locations/l/datasets/d/fhirStores/ma in"), nil, "must be a name or exactly '*'"},
		{"store id with a symbol", with(baseEnv(), "ALLOWED_STORES", "projects/my-project/locations/l/datasets/d/fhirStores/süd+klinik"), nil, "must be a name or exactly '*'"},
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
		{"max running zero", with(baseEnv(), "MAX_RUNNING", "0"), nil, "MAX_RUNNING '0' must be an integer from 1 to 1000"},
		{"max running above the functions' bound", with(baseEnv(), "MAX_RUNNING", "2000"), nil, "MAX_RUNNING '2000' must be an integer from 1 to 1000"},
		{"poll workers word", baseEnv(), []string{"--poll-workers=many"}, "POLL_WORKERS 'many' must be an integer from 1 to 256"},
		{"poll workers above the functions' bound", baseEnv(), []string{"--poll-workers=300"}, "POLL_WORKERS '300' must be an integer from 1 to 256"},
		{"channel id only", with(baseEnv(), "NOTIFICATION_CHANNEL", "123"), nil, "NOTIFICATION_CHANNEL '123' is not projects/P/notificationChannels/ID"},
		{"watermark age unit", with(baseEnv(), "ALERT_WATERMARK_AGE", "26 hours"), nil, "ALERT_WATERMARK_AGE '26 hours' must be a number followed by s, m, h or d"},
		{"watermark age zero", baseEnv(), []string{"--alert-watermark-age=0h"}, "ALERT_WATERMARK_AGE '0h'"},
		{"notify wildcard", with(baseEnv(), "NOTIFY_STORES", "projects/my-project/locations/us-central1/datasets/clinical/fhirStores/*"), nil, "NOTIFY_STORES entry 'projects/my-project/locations/us-central1/datasets/clinical/fhirStores/*' is not projects/P/locations/L/datasets/D/fhirStores/S (no '*')"},
		{"notify other project", with(baseEnv(), "NOTIFY_STORES", "projects/other-project/locations/us-central1/datasets/clinical/fhirStores/main"), nil, "NOTIFY_STORES entry 'projects/other-project/locations/us-central1/datasets/clinical/fhirStores/main' is outside PROJECT_ID"},
		{"notify not allowed", with(baseEnv(), "NOTIFY_STORES", mainStore+",projects/my-project/locations/us-central1/datasets/other/fhirStores/main"), nil, "NOTIFY_STORES entry 'projects/my-project/locations/us-central1/datasets/other/fhirStores/main' is not in ALLOWED_STORES"},
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
	t.Run("deletedUriPrefix not allowed", func(t *testing.T) {
		t.Parallel()
		body := `{"fhirStore":"projects/my-project/locations/us-central1/datasets/clinical/fhirStores/main","incremental":true,` +
			`"bigqueryDestination":{"datasetUri":"bq://my-project.fhir_analytics","schemaConfig":{"schemaType":"ANALYTICS_V2"},"writeDisposition":"WRITE_APPEND"},` +
			`"deletedUriPrefix":"gs://other-bucket/deleted"}`
		r := runScript(t, newFake(t), with(baseEnv(), "HOURLY_SPEC", spec(t, body)), "--dry-run")
		if r.code != 2 || !strings.Contains(r.stderr, "deletedUriPrefix gs://other-bucket/deleted is not in ALLOWED_DESTINATIONS") {
			t.Errorf("exit %d, stderr:\n%s", r.code, r.stderr)
		}
	})
	t.Run("store ids of any script", func(t *testing.T) {
		t.Parallel()
		// The API's store IDs are [\p{L}\p{N}_\-.]{1,256}; so are the functions'.
		stores := "projects/my-project/locations/us-central1/datasets/kliniken/fhirStores/süd-klinik," +
			"projects/my-project/locations/us-central1/datasets/病院/fhirStores/病院-7"
		r := runScript(t, newFake(t), with(baseEnv(), "ALLOWED_STORES", stores, "NOTIFY_STORES", stores, "NIGHTLY_SPEC", "", "HOURLY_SPEC", ""), "--dry-run")
		if r.code != 0 {
			t.Errorf("exit %d, stderr:\n%s", r.code, r.stderr)
		}
		// Their notification configs are written at URLs that carry them
		// percent-encoded (curl sends a path as given); the dry run prints
		// the command shell-quoted.
		for _, u := range []string{
			"https://healthcare.googleapis.com/v1/projects/my-project/locations/us-central1/datasets/kliniken/fhirStores/s%C3%BCd-klinik\\?updateMask=notificationConfigs",
			"https://healthcare.googleapis.com/v1/projects/my-project/locations/us-central1/datasets/%E7%97%85%E9%99%A2/fhirStores/%E7%97%85%E9%99%A2-7\\?updateMask=notificationConfigs",
		} {
			if !strings.Contains(r.stdout, u) {
				t.Errorf("the dry run does not PATCH %s:\n%s", u, r.stdout)
			}
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
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	var lines []string
	// A concrete store and a '*' dataset add the store- and project-level grants.
	env := with(baseEnv(), "BUILD_SERVICE_ACCOUNT", "builder@my-project.iam.gserviceaccount.com", "POLL_WORKERS", "8",
		"ALLOWED_STORES", "projects/my-project/locations/us-central1/datasets/clinical/fhirStores/main,projects/my-project/locations/*/datasets/*/fhirStores/*")
	// The files the script generates (env vars, metrics, policies) are gone
	// after a dry run: take the copies a run against the fake kept.
	f := newFake(t)
	if r := runScript(t, f, env); r.code != 0 {
		t.Fatalf("run against the fake exited %d:\n%s", r.code, r.stderr)
	}
	files := t.TempDir()
	copies, err := filepath.Glob(f.log + ".*")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range copies {
		b, err := os.ReadFile(c)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(files, strings.TrimPrefix(c, f.log+".")), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range dryRun(t, env) {
		if p.argv[0] != "gcloud" {
			continue
		}
		// Commands that differ only in values (four topics, three functions)
		// are run once: the command path and flag names are what gcloud checks.
		if sig := signature(p.argv); !seen[sig] {
			seen[sig] = true
			line := workDir.ReplaceAllString(p.line, files+"/")
			for _, m := range regexp.MustCompile(`-file=(\S+)`).FindAllStringSubmatch(line, -1) {
				if _, err := os.Stat(m[1]); err != nil {
					t.Errorf("%s: the run against the fake kept no %s", line, m[1])
				}
			}
			lines = append(lines, line)
		}
	}
	for _, line := range lines {
		words := strings.Fields(line)
		name := strings.Join(words[1:min(5, len(words))], " ")
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

// TestNotificationConfigMerge runs the script against the fake with a store
// that has notification configs of its own: the PATCH must send them all back
// (the update mask replaces the whole list) plus ours, and a second run, the
// topic now among them, must leave the store alone.
func TestNotificationConfigMerge(t *testing.T) {
	t.Parallel()
	const ours = `{"pubsubTopic": "projects/my-project/topics/fhirexport-changes", "sendFullResource": false}`
	cases := []struct {
		name, store string
		want        string // the PATCH body; "" for no PATCH
	}{
		{"keeps the user's configs",
			`{"name": "` + mainStore + `", "version": "R4", "notificationConfigs": [
				{"pubsubTopic": "projects/my-project/topics/audit", "sendFullResource": true, "sendPreviousResourceOnDelete": true},
				{"pubsubTopic": "projects/other/topics/analytics"}]}`,
			`{"notificationConfigs": [
				{"pubsubTopic": "projects/my-project/topics/audit", "sendFullResource": true, "sendPreviousResourceOnDelete": true},
				{"pubsubTopic": "projects/other/topics/analytics"}, ` + ours + `]}`},
		{"no configs yet", `{"name": "` + mainStore + `", "version": "R4"}`, `{"notificationConfigs": [` + ours + `]}`},
		{"already notifies", `{"name": "` + mainStore + `", "notificationConfigs": [` + ours + `]}`, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFake(t)
			if err := os.WriteFile(filepath.Join(f.dir, "store.json"), []byte(tc.store), 0o644); err != nil {
				t.Fatal(err)
			}
			r := runScript(t, f, baseEnv())
			if r.code != 0 {
				t.Fatalf("exit %d:\n%s", r.code, r.stderr)
			}
			calls := f.calls(t)
			patches := slices.DeleteFunc(slices.Clone(calls), func(c []string) bool { return c[0] != "curl" })
			tokens := slices.DeleteFunc(slices.Clone(calls), func(c []string) bool { return !containsAll(c, "print-access-token") })
			if tc.want == "" {
				if len(patches)+len(tokens) != 0 {
					t.Errorf("the topic is already there, yet the script ran %q", append(tokens, patches...))
				}
				if !strings.Contains(r.stdout, "# "+mainStore+" already notifies projects/my-project/topics/fhirexport-changes") {
					t.Errorf("stdout does not say the store already notifies:\n%s", r.stdout)
				}
				return
			}
			if len(patches) != 1 || len(tokens) != 1 {
				t.Fatalf("want one token and one PATCH, got %q", append(tokens, patches...))
			}
			if got := patches[0][len(patches[0])-1]; got != "https://healthcare.googleapis.com/v1/"+mainStore+"?updateMask=notificationConfigs" {
				t.Errorf("PATCH URL = %s", got)
			}
			body, err := os.ReadFile(f.log + ".notify-clinical-main.json")
			if err != nil {
				t.Fatal(err)
			}
			var got, want any
			if err := json.Unmarshal(body, &got); err != nil {
				t.Fatalf("PATCH body is not JSON: %v\n%s", err, body)
			}
			if err := json.Unmarshal([]byte(tc.want), &want); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("PATCH body differs (-want +got):\n%s", diff)
			}
			header, err := os.ReadFile(f.log + ".auth-header")
			if err != nil {
				t.Fatal(err)
			}
			if string(header) != "Authorization: Bearer fake-token\n" {
				t.Errorf("auth header = %q", header)
			}
			if slices.ContainsFunc(patches[0], func(a string) bool { return strings.Contains(a, "fake-token") }) {
				t.Error("the token is on curl's command line, where ps shows it")
			}

			// The fake store now holds what was sent: a re-run changes nothing.
			if r := runScript(t, f, baseEnv()); r.code != 0 {
				t.Fatalf("second run exited %d:\n%s", r.code, r.stderr)
			}
			for _, c := range f.calls(t) {
				if c[0] == "curl" || containsAll(c, "print-access-token") {
					t.Errorf("second run: %q", c)
				}
			}
		})
	}
}

// readStrict decodes a generated file into v, refusing unknown fields, so a
// misspelt field of the API's message fails here (gcloud reads the files
// only after it has an account).
func readStrict(t *testing.T, path string, v any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		t.Fatalf("%s: %v\n%s", filepath.Base(path), err, b)
	}
}

// TestMetricAndPolicyFiles checks the log-based metrics and alert policies the
// script hands to gcloud, field by field, as the Logging and Monitoring APIs'
// own Go types decode them.
func TestMetricAndPolicyFiles(t *testing.T) {
	t.Parallel()
	f := newFake(t)
	r := runScript(t, f, with(baseEnv(), "NAME_PREFIX", "fx-dev", "ALERT_WATERMARK_AGE", "2d",
		"NOTIFICATION_CHANNEL", "projects/my-project/notificationChannels/987"))
	if r.code != 0 {
		t.Fatalf("exit %d:\n%s", r.code, r.stderr)
	}
	calls := f.calls(t)
	for _, want := range [][]string{
		{"logging", "metrics", "create", "fx_dev_outcomes"},
		{"logging", "metrics", "create", "fx_dev_watermark_age"},
		{"policies", "list", `--filter=displayName="fx-dev: failed or partial export"`},
		{"policies", "list", `--filter=displayName="fx-dev: stale incremental watermark"`},
	} {
		if !slices.ContainsFunc(calls, func(c []string) bool { return containsAll(c, want...) }) {
			t.Errorf("no call with %q", want)
		}
	}

	var outcomes, age logging.LogMetric
	readStrict(t, f.log+".outcomes-metric.json", &outcomes)
	readStrict(t, f.log+".watermark-age-metric.json", &age)
	runRevision := `resource.type="cloud_run_revision"`
	wantOutcomes := logging.LogMetric{
		Description: "fhirexport export outcomes by event and pipeline",
		Filter: runRevision + ` AND resource.labels.service_name=("fx-dev-start" OR "fx-dev-poll")` +
			` AND jsonPayload.message="export outcome"`,
		MetricDescriptor: &logging.MetricDescriptor{MetricKind: "DELTA", ValueType: "INT64", Unit: "1",
			Labels: []*logging.LabelDescriptor{
				{Key: "event", ValueType: "STRING", Description: "succeeded, partial, failed, rejected, queued or started"},
				{Key: "pipeline", ValueType: "STRING", Description: "the export's pipeline"},
			}},
		LabelExtractors: map[string]string{"event": "EXTRACT(jsonPayload.event)", "pipeline": "EXTRACT(jsonPayload.pipeline)"},
	}
	if diff := cmp.Diff(wantOutcomes, outcomes); diff != "" {
		t.Errorf("outcomes metric differs (-want +got):\n%s", diff)
	}
	bounds := age.BucketOptions.ExplicitBuckets.Bounds
	age.BucketOptions = nil
	wantAge := logging.LogMetric{
		Description:    "fhirexport age of each incremental pipeline's watermark, per poll sweep",
		Filter:         runRevision + ` AND resource.labels.service_name="fx-dev-poll" AND jsonPayload.message="watermark age"`,
		ValueExtractor: "EXTRACT(jsonPayload.watermarkAgeSeconds)",
		MetricDescriptor: &logging.MetricDescriptor{MetricKind: "DELTA", ValueType: "DISTRIBUTION", Unit: "s",
			Labels: []*logging.LabelDescriptor{{Key: "pipeline", ValueType: "STRING", Description: "the incremental pipeline"}}},
		LabelExtractors: map[string]string{"pipeline": "EXTRACT(jsonPayload.pipeline)"},
	}
	if diff := cmp.Diff(wantAge, age); diff != "" {
		t.Errorf("watermark age metric differs (-want +got):\n%s", diff)
	}
	if !slices.IsSorted(bounds) || len(slices.Compact(slices.Clone(bounds))) != len(bounds) {
		t.Errorf("bucket bounds are not strictly increasing: %v", bounds)
	}
	for _, b := range []float64{3600, 26 * 3600, 2 * 86400, 3 * 86400, 7 * 86400, 31 * 86400} {
		if !slices.Contains(bounds, b) {
			t.Errorf("bucket bounds lack %v s, so a threshold there is not exact: %v", b, bounds)
		}
	}

	var failed, stale monitoring.AlertPolicy
	readStrict(t, f.log+".policy-outcomes.json", &failed)
	readStrict(t, f.log+".policy-watermark.json", &stale)
	for _, p := range []*monitoring.AlertPolicy{&failed, &stale} {
		if p.Documentation == nil || !strings.Contains(p.Documentation.Content, "fx-dev") || p.Documentation.MimeType != "text/markdown" {
			t.Errorf("%s: documentation = %+v", p.DisplayName, p.Documentation)
		}
		p.Documentation = nil
	}
	policy := func(display, condition, filter string, agg *monitoring.Aggregation, threshold float64) monitoring.AlertPolicy {
		return monitoring.AlertPolicy{
			DisplayName: display,
			Combiner:    "OR",
			Conditions: []*monitoring.Condition{{
				DisplayName: condition,
				ConditionThreshold: &monitoring.MetricThreshold{
					Filter:         filter,
					Aggregations:   []*monitoring.Aggregation{agg},
					Comparison:     "COMPARISON_GT",
					ThresholdValue: threshold,
					Duration:       "0s",
					Trigger:        &monitoring.Trigger{Count: 1},
				},
			}},
			AlertStrategy:        &monitoring.AlertStrategy{AutoClose: "86400s"},
			NotificationChannels: []string{"projects/my-project/notificationChannels/987"},
			Enabled:              true,
		}
	}
	wantFailed := policy("fx-dev: failed or partial export", "an export outcome is failed or partial",
		`resource.type = "cloud_run_revision" AND metric.type = "logging.googleapis.com/user/fx_dev_outcomes"`+
			` AND metric.label.event = one_of("failed", "partial")`,
		&monitoring.Aggregation{AlignmentPeriod: "300s", PerSeriesAligner: "ALIGN_SUM", CrossSeriesReducer: "REDUCE_SUM",
			GroupByFields: []string{"metric.label.pipeline", "metric.label.event"}}, 0)
	if diff := cmp.Diff(wantFailed, failed); diff != "" {
		t.Errorf("failed-or-partial policy differs (-want +got):\n%s", diff)
	}
	wantStale := policy("fx-dev: stale incremental watermark", "watermark older than 2d",
		`resource.type = "cloud_run_revision" AND metric.type = "logging.googleapis.com/user/fx_dev_watermark_age"`,
		&monitoring.Aggregation{AlignmentPeriod: "600s", PerSeriesAligner: "ALIGN_PERCENTILE_99", CrossSeriesReducer: "REDUCE_MAX",
			GroupByFields: []string{"metric.label.pipeline"}}, 172800)
	if diff := cmp.Diff(wantStale, stale); diff != "" {
		t.Errorf("stale watermark policy differs (-want +got):\n%s", diff)
	}
}

// TestDryRunOptionalFeatures covers what baseEnv turns on: without a channel no
// policy is touched (and the script says so), without stores no store is, and
// the new settings reach the functions' environment.
func TestDryRunOptionalFeatures(t *testing.T) {
	t.Parallel()
	f := newFake(t)
	r := runScript(t, f, without(baseEnv(), "NOTIFICATION_CHANNEL", "NOTIFY_STORES"), "--dry-run",
		"--max-running=3", "--poll-workers", "7")
	if r.code != 0 {
		t.Fatalf("exit %d:\n%s", r.code, r.stderr)
	}
	if !strings.Contains(r.stdout, "# NOTIFICATION_CHANNEL is not set: no alert policies were created or updated") {
		t.Errorf("the dry run does not say why there are no alert policies:\n%s", r.stdout)
	}
	for _, absent := range []string{"monitoring policies", "policy-outcomes.json", "fhir-stores describe", "curl ", "print-access-token"} {
		if strings.Contains(r.stdout, absent) {
			t.Errorf("dry run mentions %q without NOTIFICATION_CHANNEL and NOTIFY_STORES", absent)
		}
	}
	for _, present := range []string{
		"gcloud logging metrics describe fhirexport_outcomes",
		"gcloud pubsub subscriptions describe fhirexport-record",
		"# env-start.yaml (a temporary file, removed on exit) holds:\n" + indent(commonEnv) + "#   FHIREXPORT_MAX_RUNNING: '3'\n# ",
		"# env-poll.yaml (a temporary file, removed on exit) holds:\n" + indent(commonEnv) +
			"#   FHIREXPORT_MAX_RUNNING: '3'\n#   FHIREXPORT_POLL_WORKERS: '7'\n# ",
		"# env-record.yaml (a temporary file, removed on exit) holds:\n" + indent(commonEnv) + "# ",
	} {
		if !strings.Contains(r.stdout, present) {
			t.Errorf("dry run does not show\n%s", present)
		}
	}
}

func indent(s string) string {
	return "#   " + strings.ReplaceAll(strings.TrimSuffix(s, "\n"), "\n", "\n#   ") + "\n"
}
