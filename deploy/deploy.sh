#!/usr/bin/env bash
# Deploys fhirexport to a Google Cloud project with gcloud: APIs, Pub/Sub topics,
# one service account per function, custom roles, least-privilege IAM, the three
# Cloud Run functions (2nd gen), the Cloud Scheduler jobs, FHIR store change
# notifications, log-based metrics and alert policies.
# Safe to re-run: existing resources are updated, IAM bindings are idempotent.
# Run with --help for the variables, --dry-run to print every command instead.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

usage() {
  cat <<'EOF'
Usage: deploy/deploy.sh [--dry-run] [--help] [--flag=value ...]

Every setting is an environment variable; each has an optional flag that wins.

Required:
  PROJECT_ID            --project               project to deploy to (FHIR stores must live here too)
  REGION                --region                region of the functions and scheduler jobs, e.g. us-central1
  STATE                 --state                 gs://bucket/prefix for run state (FHIREXPORT_STATE)
  EXPORT_BUCKET         --export-bucket         bucket the Healthcare API writes exports to
  ALLOWED_STORES        --allowed-stores        comma-separated store patterns, '*' = one segment,
                                                e.g. projects/P/locations/L/datasets/D/fhirStores/*
  ALLOWED_DESTINATIONS  --allowed-destinations  comma-separated gs://EXPORT_BUCKET/prefix and
                                                bq://BQ_DATASET prefixes exports may go to
Optional:
  BQ_DATASET            --bq-dataset            project.dataset for BigQuery exports (default: none)
  NAME_PREFIX           --name-prefix           prefix of every resource name (default: fhirexport)
  SCHEDULER_TIMEZONE    --scheduler-timezone    time zone of the schedules (default: Etc/UTC)
  NIGHTLY_SPEC          --nightly-spec          spec file of the nightly job
                                                (default: deploy/specs/nightly-full-gcs.json; empty: no job)
  NIGHTLY_SCHEDULE      --nightly-schedule      cron schedule (default: "0 2 * * *")
  HOURLY_SPEC           --hourly-spec           spec file of the hourly job (default, when BQ_DATASET
                                                is set: deploy/specs/hourly-incremental-bq.json; empty: no job)
  HOURLY_SCHEDULE       --hourly-schedule       cron schedule (default: "15 * * * *")
  START_MAX_INSTANCES   --start-max-instances   max instances of StartExport (default: 5, Google's
                                                advice for concurrent export operations per project)
  BUILD_SERVICE_ACCOUNT --build-service-account email of the service account Cloud Build uses
                                                (default: the project's default build account)
  MAX_RUNNING           --max-running           exports running at once for the deployment
                                                (FHIREXPORT_MAX_RUNNING; default: 5)
  POLL_WORKERS          --poll-workers          concurrent operations.get calls in a sweep
                                                (FHIREXPORT_POLL_WORKERS; default: the function's)
  NOTIFY_STORES         --notify-stores         comma-separated full store names whose change
                                                notifications feed RecordChange (deletion
                                                tombstones); each must match ALLOWED_STORES. The
                                                store's own notification configs are kept; needs
                                                jq and curl (default: none)
  NOTIFICATION_CHANNEL  --notification-channel  projects/P/notificationChannels/ID to alert on
                                                (default: none, and then no alert policies)
  ALERT_WATERMARK_AGE   --alert-watermark-age   alert when an incremental pipeline's watermark is
                                                older than this: N followed by s, m, h or d
                                                (default: 26h)

  DRY_RUN     --dry-run   DRY_RUN=1 or --dry-run: print every command instead of running it
                          (needs no gcloud account)
  --help      print this help

Resources: topics NAME_PREFIX-requests, -poll, -events, -changes; functions
NAME_PREFIX-start (StartExport), NAME_PREFIX-poll (PollExport) and
NAME_PREFIX-record (RecordChange); runtime service accounts NAME_PREFIX-start,
-poll, -record; invoker service accounts NAME_PREFIX-start-trigger, -poll-trigger
(Eventarc) and NAME_PREFIX-record-push (Pub/Sub push); subscription
NAME_PREFIX-record (deletions only, pushed to RecordChange); custom roles
NAME_PREFIX_exporter, NAME_PREFIX_starter, NAME_PREFIX_poller,
NAME_PREFIX_recorder, NAME_PREFIX_feed_writer and NAME_PREFIX_output_lister
(hyphens in NAME_PREFIX become underscores); scheduler jobs NAME_PREFIX-poll,
-nightly, -hourly; log-based metrics NAME_PREFIX_outcomes,
NAME_PREFIX_watermark_age; alert policies
"NAME_PREFIX: failed or partial export" and "NAME_PREFIX: stale incremental
watermark" (only with NOTIFICATION_CHANNEL; made with 'gcloud alpha', the only
track that has 'monitoring policies'). Re-runs update what exists.
EOF
}

die_usage() {
  printf 'deploy.sh: %s\n' "$1" >&2
  printf 'Run deploy/deploy.sh --help for the variables.\n' >&2
  exit 2
}

# DRY_RUN=1 in the environment is the same as --dry-run; anything but 0, 1
# or empty is refused rather than guessed (it decides whether gcloud runs).
case ${DRY_RUN:-0} in
  0 | 1) DRY_RUN=${DRY_RUN:-0} ;;
  *) die_usage "DRY_RUN='$DRY_RUN' must be 1 (print every command, run none) or 0" ;;
esac

# flag_var prints the variable a --flag sets, or fails for an unknown flag.
flag_var() {
  case $1 in
    --project) echo PROJECT_ID ;;
    --region) echo REGION ;;
    --state) echo STATE ;;
    --export-bucket) echo EXPORT_BUCKET ;;
    --allowed-stores) echo ALLOWED_STORES ;;
    --allowed-destinations) echo ALLOWED_DESTINATIONS ;;
    --bq-dataset) echo BQ_DATASET ;;
    --name-prefix) echo NAME_PREFIX ;;
    --scheduler-timezone) echo SCHEDULER_TIMEZONE ;;
    --nightly-spec) echo NIGHTLY_SPEC ;;
    --nightly-schedule) echo NIGHTLY_SCHEDULE ;;
    --hourly-spec) echo HOURLY_SPEC ;;
    --hourly-schedule) echo HOURLY_SCHEDULE ;;
    --start-max-instances) echo START_MAX_INSTANCES ;;
    --build-service-account) echo BUILD_SERVICE_ACCOUNT ;;
    --max-running) echo MAX_RUNNING ;;
    --poll-workers) echo POLL_WORKERS ;;
    --notify-stores) echo NOTIFY_STORES ;;
    --notification-channel) echo NOTIFICATION_CHANNEL ;;
    --alert-watermark-age) echo ALERT_WATERMARK_AGE ;;
    *) return 1 ;;
  esac
}

while (($#)); do
  arg=$1
  shift
  case $arg in
    --help | -h)
      usage
      exit 0
      ;;
    --dry-run)
      DRY_RUN=1
      continue
      ;;
    --*=*)
      flag=${arg%%=*}
      value=${arg#*=}
      ;;
    --*)
      flag=$arg
      # Known before its value is taken: a mistyped --dry-run is an unknown
      # flag, not one that "needs a value".
      flag_var "$flag" >/dev/null || die_usage "unknown flag: $flag"
      (($#)) || die_usage "$flag needs a value"
      value=$1
      shift
      ;;
    *) die_usage "unexpected argument: $arg" ;;
  esac
  var=$(flag_var "$flag") || die_usage "unknown flag: $flag"
  printf -v "$var" '%s' "$value"
done

# --- Required variables first, all reported at once. ---------------------------
missing=()
for v in PROJECT_ID REGION STATE EXPORT_BUCKET ALLOWED_STORES ALLOWED_DESTINATIONS; do
  [[ -n ${!v:-} ]] || missing+=("$v")
done
if ((${#missing[@]})); then
  for v in "${missing[@]}"; do
    flag=$(tr 'A-Z_' 'a-z-' <<<"$v")
    case $v in PROJECT_ID) flag=project ;; esac
    printf 'deploy.sh: missing required variable %s (or --%s)\n' "$v" "$flag" >&2
  done
  die_usage "${#missing[@]} required variable(s) missing: ${missing[*]}"
fi

BQ_DATASET=${BQ_DATASET:-}
NAME_PREFIX=${NAME_PREFIX:-fhirexport}
SCHEDULER_TIMEZONE=${SCHEDULER_TIMEZONE:-Etc/UTC}
NIGHTLY_SCHEDULE=${NIGHTLY_SCHEDULE:-0 2 * * *}
HOURLY_SCHEDULE=${HOURLY_SCHEDULE:-15 * * * *}
START_MAX_INSTANCES=${START_MAX_INSTANCES:-5}
BUILD_SERVICE_ACCOUNT=${BUILD_SERVICE_ACCOUNT:-}
MAX_RUNNING=${MAX_RUNNING:-5}
POLL_WORKERS=${POLL_WORKERS:-}
NOTIFY_STORES=${NOTIFY_STORES:-}
NOTIFICATION_CHANNEL=${NOTIFICATION_CHANNEL:-}
ALERT_WATERMARK_AGE=${ALERT_WATERMARK_AGE:-26h}
# Unset means the default file; set but empty means no job.
NIGHTLY_SPEC=${NIGHTLY_SPEC-$SCRIPT_DIR/specs/nightly-full-gcs.json}
if [[ -z ${HOURLY_SPEC+set} ]]; then
  HOURLY_SPEC=""
  [[ -z $BQ_DATASET ]] || HOURLY_SPEC=$SCRIPT_DIR/specs/hourly-incremental-bq.json
fi

# Spec paths are printed and handed to gcloud: make them absolute.
case $NIGHTLY_SPEC in "" | /*) ;; *) NIGHTLY_SPEC=$PWD/$NIGHTLY_SPEC ;; esac
case $HOURLY_SPEC in "" | /*) ;; *) HOURLY_SPEC=$PWD/$HOURLY_SPEC ;; esac

# --- Validate every value locally, reporting all problems at once. -------------
errors=()
bad() { errors+=("$1"); }

re_project='^[a-z][a-z0-9-]{4,28}[a-z0-9]$'
re_region='^[a-z]+-[a-z]+[0-9]+$'
re_bucket='^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$'
re_object_path='^[^[:space:],'\''"]*$'
re_bq='^([a-z][a-z0-9-]{4,28}[a-z0-9])\.([A-Za-z0-9_]+)$'
re_store='^projects/([^/]+)/locations/([^/]+)/datasets/([^/]+)/fhirStores/([^/]+)$'
re_prefix='^[a-z]([a-z0-9-]{0,14}[a-z0-9])?$'
re_tz='^[A-Za-z_]+(/[A-Za-z0-9_+-]+)*$'
re_cron='^[^[:space:]]+( [^[:space:]]+){4}$'
re_sa_email='^[a-z0-9-]+@[a-z0-9.-]+\.gserviceaccount\.com$'
re_channel='^projects/[a-z][a-z0-9-]{4,28}[a-z0-9]/notificationChannels/[A-Za-z0-9_-]+$'
re_age='^([1-9][0-9]{0,6})([smhd])$'

# segment_ok SEG: SEG is '*' or a resource ID as the Healthcare API accepts
# it, [\p{L}\p{N}_.-]{1,256}: letters and digits of any script (süd-klinik,
# 病院-7). Every ASCII character but [A-Za-z0-9._-] is refused; non-ASCII
# characters are left to the functions' own check, which follows the API's.
segment_ok() {
  local seg=$1 rest LC_ALL=C
  [[ $seg == '*' ]] && return 0
  [[ -n $seg && $seg != . && $seg != .. ]] || return 1
  rest=${seg//[A-Za-z0-9._-]/}
  [[ ! $rest =~ [[:print:][:space:][:cntrl:]] ]]
}

# split_list VALUE: the comma-separated items of VALUE, trimmed, one per line.
split_list() {
  local item
  local -a items
  IFS=',' read -r -a items <<<"$1"
  for item in "${items[@]}"; do
    item=${item#"${item%%[![:space:]]*}"}
    item=${item%"${item##*[![:space:]]}"}
    [[ -z $item ]] || printf '%s\n' "$item"
  done
}

[[ $PROJECT_ID =~ $re_project ]] ||
  bad "PROJECT_ID '$PROJECT_ID' is not a project ID (6-30 characters: lowercase letters, digits, hyphens; starts with a letter)"
[[ $REGION =~ $re_region ]] || bad "REGION '$REGION' is not a region name like us-central1"

STATE_BUCKET=""
if [[ $STATE != gs://* ]]; then
  bad "STATE '$STATE' must start with gs:// (gs://bucket/prefix)"
else
  state_rest=${STATE#gs://}
  STATE_BUCKET=${state_rest%%/*}
  state_path=${state_rest#"$STATE_BUCKET"}
  [[ $STATE_BUCKET =~ $re_bucket ]] || bad "STATE '$STATE' does not name a valid bucket ('$STATE_BUCKET')"
  [[ $state_path =~ $re_object_path ]] || bad "STATE '$STATE' has spaces, commas or quotes in its prefix"
  [[ $state_path != *//* ]] || bad "STATE '$STATE' has an empty path segment ('//'); the functions refuse it"
fi

EXPORT_BUCKET=${EXPORT_BUCKET#gs://}
EXPORT_BUCKET=${EXPORT_BUCKET%/}
[[ $EXPORT_BUCKET =~ $re_bucket ]] || bad "EXPORT_BUCKET '$EXPORT_BUCKET' is not a bucket name (give the name, no path)"
if [[ -n $STATE_BUCKET && $STATE_BUCKET == "$EXPORT_BUCKET" ]]; then
  bad "STATE must be in another bucket than EXPORT_BUCKET: the Healthcare service agent gets write access to the export bucket"
fi

BQ_PROJECT="" BQ_NAME=""
if [[ -n $BQ_DATASET ]]; then
  if [[ $BQ_DATASET =~ $re_bq ]]; then
    BQ_PROJECT=${BASH_REMATCH[1]} BQ_NAME=${BASH_REMATCH[2]}
  else
    bad "BQ_DATASET '$BQ_DATASET' must be project.dataset (no bq:// prefix)"
  fi
fi

[[ $NAME_PREFIX =~ $re_prefix ]] ||
  bad "NAME_PREFIX '$NAME_PREFIX' must be 1-16 lowercase letters, digits or hyphens, starting with a letter (service account IDs are at most 30 characters)"
[[ $SCHEDULER_TIMEZONE =~ $re_tz ]] || bad "SCHEDULER_TIMEZONE '$SCHEDULER_TIMEZONE' is not a tz database name like Etc/UTC or Europe/Berlin"
[[ $NIGHTLY_SCHEDULE =~ $re_cron ]] || bad "NIGHTLY_SCHEDULE '$NIGHTLY_SCHEDULE' is not a five-field cron schedule"
[[ $HOURLY_SCHEDULE =~ $re_cron ]] || bad "HOURLY_SCHEDULE '$HOURLY_SCHEDULE' is not a five-field cron schedule"
if [[ ! $START_MAX_INSTANCES =~ ^[1-9][0-9]{0,3}$ ]]; then
  bad "START_MAX_INSTANCES '$START_MAX_INSTANCES' must be a positive integer"
fi
if [[ -n $BUILD_SERVICE_ACCOUNT && ! $BUILD_SERVICE_ACCOUNT =~ $re_sa_email ]]; then
  bad "BUILD_SERVICE_ACCOUNT '$BUILD_SERVICE_ACCOUNT' is not a service account email"
fi
# The functions' own bounds (export/config.go): a value they refuse would fail every event.
if [[ ! $MAX_RUNNING =~ ^[1-9][0-9]{0,3}$ ]] || ((10#$MAX_RUNNING > 1000)); then
  bad "MAX_RUNNING '$MAX_RUNNING' must be an integer from 1 to 1000"
fi
if [[ -n $POLL_WORKERS ]] && { [[ ! $POLL_WORKERS =~ ^[1-9][0-9]{0,3}$ ]] || ((10#$POLL_WORKERS > 256)); }; then
  bad "POLL_WORKERS '$POLL_WORKERS' must be an integer from 1 to 256"
fi
if [[ -n $NOTIFICATION_CHANNEL && ! $NOTIFICATION_CHANNEL =~ $re_channel ]]; then
  bad "NOTIFICATION_CHANNEL '$NOTIFICATION_CHANNEL' is not projects/P/notificationChannels/ID (the channel's full resource name)"
fi
WATERMARK_AGE_SECONDS=0
if [[ $ALERT_WATERMARK_AGE =~ $re_age ]]; then
  case ${BASH_REMATCH[2]} in s) unit=1 ;; m) unit=60 ;; h) unit=3600 ;; d) unit=86400 ;; esac
  WATERMARK_AGE_SECONDS=$((BASH_REMATCH[1] * unit))
else
  bad "ALERT_WATERMARK_AGE '$ALERT_WATERMARK_AGE' must be a number followed by s, m, h or d, e.g. 26h"
fi

# Stores: the custom roles live in PROJECT_ID, so they can only be granted there.
stores=()
while IFS= read -r s; do stores+=("$s"); done < <(split_list "$ALLOWED_STORES")
((${#stores[@]})) || bad "ALLOWED_STORES lists no store pattern"
for s in ${stores[@]+"${stores[@]}"}; do
  if [[ ! $s =~ $re_store ]]; then
    bad "ALLOWED_STORES entry '$s' is not projects/P/locations/L/datasets/D/fhirStores/S"
    continue
  fi
  store_project=${BASH_REMATCH[1]}
  for seg in "${BASH_REMATCH[@]:1}"; do
    segment_ok "$seg" || bad "ALLOWED_STORES entry '$s': segment '$seg' must be a name or exactly '*'"
  done
  [[ $store_project == "$PROJECT_ID" ]] ||
    bad "ALLOWED_STORES entry '$s' is outside PROJECT_ID $PROJECT_ID (the functions' roles are granted in PROJECT_ID only)"
done
ALLOWED_STORES=$(IFS=,; printf '%s' "${stores[*]-}")

# Destinations: exactly what the Healthcare service agent is given access to.
dests=()
while IFS= read -r d; do dests+=("$d"); done < <(split_list "$ALLOWED_DESTINATIONS")
((${#dests[@]})) || bad "ALLOWED_DESTINATIONS lists no destination"
for d in ${dests[@]+"${dests[@]}"}; do
  case $d in
    gs://*)
      rest=${d#gs://}
      b=${rest%%/*}
      [[ $b =~ $re_bucket && ${rest#"$b"} =~ $re_object_path ]] ||
        bad "ALLOWED_DESTINATIONS entry '$d' is not gs://bucket/prefix"
      [[ $b == "$EXPORT_BUCKET" ]] ||
        bad "ALLOWED_DESTINATIONS entry '$d' is outside EXPORT_BUCKET $EXPORT_BUCKET (the Healthcare service agent could not write there)"
      ;;
    bq://*)
      if [[ -z $BQ_DATASET ]]; then
        bad "ALLOWED_DESTINATIONS entry '$d' needs BQ_DATASET to be set"
      elif [[ $d != "bq://$BQ_DATASET" ]]; then
        bad "ALLOWED_DESTINATIONS entry '$d' is not bq://$BQ_DATASET (BQ_DATASET)"
      fi
      ;;
    *) bad "ALLOWED_DESTINATIONS entry '$d' must start with gs:// or bq://" ;;
  esac
done
ALLOWED_DESTINATIONS=$(IFS=,; printf '%s' "${dests[*]-}")

# store_allowed NAME: whether a store matches one ALLOWED_STORES pattern.
store_allowed() {
  local -a want got
  local p i ok
  IFS=/ read -r -a got <<<"$1"
  for p in ${stores[@]+"${stores[@]}"}; do
    IFS=/ read -r -a want <<<"$p"
    ((${#want[@]} == ${#got[@]})) || continue
    ok=1
    for i in "${!want[@]}"; do
      [[ ${want[i]} == '*' || ${want[i]} == "${got[i]}" ]] || ok=0
    done
    ((ok)) && return 0
  done
  return 1
}

# dest_allowed URI: whether the fixed part of a destination (before the first
# placeholder) is under one ALLOWED_DESTINATIONS prefix. The function checks the
# expanded URI; this catches an unedited example spec before it is scheduled.
dest_allowed() {
  local fixed=${1%%\{*} p
  for p in ${dests[@]+"${dests[@]}"}; do
    [[ $fixed == "$p" || $fixed == "${p%/}/"* ]] && return 0
  done
  return 1
}

# json_string FILE KEY: the first "KEY": "value" in FILE (specs are flat enough).
json_string() {
  grep -o "\"$2\"[[:space:]]*:[[:space:]]*\"[^\"]*\"" "$1" | head -n 1 | sed 's/.*:[[:space:]]*"\(.*\)"$/\1/' || true
}

check_spec() {
  local var=$1 file=$2 store gcs bq deleted
  if [[ ! -f $file || ! -r $file ]]; then
    bad "$var '$file' is not a readable file (set $var= to skip this job)"
    return
  fi
  if (($(wc -c <"$file") > 65536)); then
    bad "$var '$file' is over 64 KiB; the function rejects it"
  fi
  store=$(json_string "$file" fhirStore)
  gcs=$(json_string "$file" uriPrefix)
  bq=$(json_string "$file" datasetUri)
  deleted=$(json_string "$file" deletedUriPrefix)
  if [[ -z $store ]]; then
    bad "$var '$file' has no fhirStore"
  elif ! store_allowed "$store"; then
    bad "$var '$file': fhirStore $store is not in ALLOWED_STORES (edit the example spec, or set $var= to skip)"
  fi
  if [[ -n $gcs ]] && ! dest_allowed "$gcs"; then
    bad "$var '$file': destination $gcs is not in ALLOWED_DESTINATIONS"
  fi
  if [[ -n $bq ]]; then
    if [[ -z $BQ_DATASET ]]; then
      bad "$var '$file' exports to BigQuery but BQ_DATASET is not set (set BQ_DATASET, or $var= to skip)"
    elif ! dest_allowed "$bq"; then
      bad "$var '$file': destination $bq is not in ALLOWED_DESTINATIONS"
    fi
  fi
  if [[ -n $deleted ]] && ! dest_allowed "$deleted"; then
    bad "$var '$file': deletedUriPrefix $deleted is not in ALLOWED_DESTINATIONS"
  fi
  if [[ -z $gcs && -z $bq ]]; then
    bad "$var '$file' has neither gcsDestination.uriPrefix nor bigqueryDestination.datasetUri"
  fi
}
[[ -z $NIGHTLY_SPEC ]] || check_spec NIGHTLY_SPEC "$NIGHTLY_SPEC"
[[ -z $HOURLY_SPEC ]] || check_spec HOURLY_SPEC "$HOURLY_SPEC"

# Stores whose changes feed RecordChange: concrete stores of PROJECT_ID (its
# Healthcare service agent is the one granted publish on the changes topic) that
# the functions may export (tombstones of any other store would never be read).
notify=()
while IFS= read -r s; do notify+=("$s"); done < <(split_list "$NOTIFY_STORES")
for s in ${notify[@]+"${notify[@]}"}; do
  if [[ ! $s =~ $re_store || $s == *'*'* ]]; then
    bad "NOTIFY_STORES entry '$s' is not projects/P/locations/L/datasets/D/fhirStores/S (no '*')"
  elif [[ ${BASH_REMATCH[1]} != "$PROJECT_ID" ]]; then
    bad "NOTIFY_STORES entry '$s' is outside PROJECT_ID $PROJECT_ID"
  elif ! store_allowed "$s"; then
    bad "NOTIFY_STORES entry '$s' is not in ALLOWED_STORES"
  fi
done
if ((${#notify[@]} && DRY_RUN == 0)); then
  for tool in jq curl; do
    command -v "$tool" >/dev/null || bad "NOTIFY_STORES needs $tool to merge and write the stores' notification configs (install it, or leave NOTIFY_STORES empty)"
  done
fi

if ((${#errors[@]})); then
  for e in "${errors[@]}"; do printf 'deploy.sh: %s\n' "$e" >&2; done
  die_usage "${#errors[@]} invalid value(s)"
fi

# --- Names. ---------------------------------------------------------------------
P=$PROJECT_ID
REQUESTS_TOPIC=$NAME_PREFIX-requests
POLL_TOPIC=$NAME_PREFIX-poll
EVENTS_TOPIC=$NAME_PREFIX-events
CHANGES_TOPIC=$NAME_PREFIX-changes
START_FN=$NAME_PREFIX-start
POLL_FN=$NAME_PREFIX-poll
RECORD_FN=$NAME_PREFIX-record
RECORD_SUB=$NAME_PREFIX-record
START_SA=$NAME_PREFIX-start@$P.iam.gserviceaccount.com
POLL_SA=$NAME_PREFIX-poll@$P.iam.gserviceaccount.com
RECORD_SA=$NAME_PREFIX-record@$P.iam.gserviceaccount.com
START_TRIGGER_SA=$NAME_PREFIX-start-trigger@$P.iam.gserviceaccount.com
POLL_TRIGGER_SA=$NAME_PREFIX-poll-trigger@$P.iam.gserviceaccount.com
# Not -record-trigger: with a 16-character NAME_PREFIX that is 31 characters,
# one more than a service account ID may have.
RECORD_PUSH_SA=$NAME_PREFIX-record-push@$P.iam.gserviceaccount.com
ID_PREFIX=${NAME_PREFIX//-/_}
EXPORT_ROLE=${ID_PREFIX}_exporter
START_ROLE=${ID_PREFIX}_starter
POLL_ROLE=${ID_PREFIX}_poller
RECORD_ROLE=${ID_PREFIX}_recorder
FEED_ROLE=${ID_PREFIX}_feed_writer
LIST_ROLE=${ID_PREFIX}_output_lister
OUTCOMES_METRIC=${ID_PREFIX}_outcomes
WATERMARK_METRIC=${ID_PREFIX}_watermark_age
# Permissions are split by the resource they are checked on, so that each role
# is granted on the narrowest one: fhirStores.export on the store; listing
# stores and every operations.* on the dataset (operations belong to it).
# Both functions start exports (PollExport starts queued ones as slots free).
EXPORT_PERMISSIONS=healthcare.fhirStores.export
# StartExport lists a fleet's stores (fhirStores/*) and lists and reads the
# dataset's operations to find an export whose answer was lost.
START_PERMISSIONS=healthcare.fhirStores.list,healthcare.operations.get,healthcare.operations.list
# PollExport reads the operations it recorded, by name, cancels overdue ones
# (the spec's timeout) and those an operator cancels, and lists the dataset's
# operations to resolve a start whose answer was lost or whose attempt died. It
# reads the history of each deleted resource (fhir.history) to decide whether
# a run's deleted file may list it.
POLL_PERMISSIONS=healthcare.fhirResources.get,healthcare.operations.cancel,healthcare.operations.get,healthcare.operations.list
# RecordChange only adds tombstones, reading what is there to stay idempotent:
# no update, no delete.
RECORD_PERMISSIONS=storage.objects.create,storage.objects.get,storage.objects.list
# PollExport writes each run's feed files beside its export (manifest, deleted
# and error files, each created once) and lists the export's objects: on the
# export bucket, no update, no delete.
FEED_PERMISSIONS=storage.objects.create,storage.objects.get,storage.objects.list
# StartExport tells candidate operations of a lost answer apart by their
# output: it only lists the export bucket, never reads an export.
LIST_PERMISSIONS=storage.objects.list

# --- Running or printing commands. ----------------------------------------------
quote() {
  local out="" a
  for a in "$@"; do out+=$(printf '%q' "$a")" "; done
  printf '%s' "${out% }"
}

step() { printf '\n# %s\n' "$*"; }

# run CMD...: runs CMD, or prints it in a dry run.
run() {
  if ((DRY_RUN)); then quote "$@"; printf '\n'; else "$@"; fi
}

# run_if WHEN CMD...: like run, but a dry run notes when it would run.
run_if() {
  local when=$1
  shift
  if ((DRY_RUN)); then printf '%s  # if %s\n' "$(quote "$@")" "$when"; else "$@"; fi
}

# grant CMD...: an IAM binding; retried because a new service account takes a
# few seconds to be visible to IAM.
grant() {
  if ((DRY_RUN)); then run "$@"; return; fi
  local i
  for i in 1 2 3 4 5; do
    if "$@" >/dev/null; then return 0; fi
    ((i < 5)) || break
    printf 'deploy.sh: retrying in %ss\n' $((i * 5)) >&2
    sleep $((i * 5))
  done
  printf 'deploy.sh: failed: %s\n' "$(quote "$@")" >&2
  return 1
}

# probe CMD...: a describe; returns 0 if the resource exists, 1 if not, and 2 in
# a dry run (which prints both the create and the update path).
probe() {
  if ((DRY_RUN)); then
    run "$@"
    return 2
  fi
  "$@" >/dev/null 2>&1
}

# Never wait for an answer: a prompt would hang an unattended deployment.
export CLOUDSDK_CORE_DISABLE_PROMPTS=1

WORK_DIR=$(mktemp -d "${TMPDIR:-/tmp}/fhirexport-deploy.XXXXXX")
trap 'rm -rf "$WORK_DIR"' EXIT

# --- 1. Project number (for the Google service agents). -------------------------
step "Project number"
if ((DRY_RUN)); then
  run gcloud projects describe "$P" --format='value(projectNumber)'
  PROJECT_NUMBER=PROJECT_NUMBER
else
  PROJECT_NUMBER=$(gcloud projects describe "$P" --format='value(projectNumber)')
  [[ $PROJECT_NUMBER =~ ^[0-9]+$ ]] || { printf 'deploy.sh: no project number for %s\n' "$P" >&2; exit 1; }
fi
HEALTHCARE_AGENT=service-$PROJECT_NUMBER@gcp-sa-healthcare.iam.gserviceaccount.com
PUBSUB_AGENT=service-$PROJECT_NUMBER@gcp-sa-pubsub.iam.gserviceaccount.com

# --- 2. APIs and service agents. ------------------------------------------------
step "APIs"
apis=(cloudfunctions.googleapis.com run.googleapis.com cloudbuild.googleapis.com
  artifactregistry.googleapis.com eventarc.googleapis.com pubsub.googleapis.com
  cloudscheduler.googleapis.com healthcare.googleapis.com storage.googleapis.com
  iam.googleapis.com logging.googleapis.com monitoring.googleapis.com)
[[ -z $BQ_DATASET ]] || apis+=(bigquery.googleapis.com)
run gcloud services enable "${apis[@]}" --project="$P"
# Service agents are created lazily; IAM bindings to them fail until they exist.
run gcloud beta services identity create --service=healthcare.googleapis.com --project="$P"
run gcloud beta services identity create --service=pubsub.googleapis.com --project="$P"

# --- 3. Topics. -----------------------------------------------------------------
step "Pub/Sub topics"
for t in "$REQUESTS_TOPIC" "$POLL_TOPIC" "$EVENTS_TOPIC" "$CHANGES_TOPIC"; do
  st=0
  probe gcloud pubsub topics describe "$t" --project="$P" || st=$?
  ((st == 0)) || run_if absent gcloud pubsub topics create "$t" --project="$P"
done

# --- 4. Buckets (created private if missing; existing ones are left as they are). -
step "Cloud Storage buckets"
for b in "$STATE_BUCKET" "$EXPORT_BUCKET"; do
  st=0
  probe gcloud storage buckets describe "gs://$b" --project="$P" || st=$?
  ((st == 0)) || run_if absent gcloud storage buckets create "gs://$b" --project="$P" \
    --location="$REGION" --uniform-bucket-level-access --public-access-prevention
done

# Deletion tombstones (RecordChange) are kept 35 days (export.TombstoneRetention):
# a lifecycle rule on the state bucket deletes older ones. Rules the bucket has
# are kept (merged with jq; without jq the rule is printed for you to add).
state_prefix=${state_path#/}
state_prefix=${state_prefix%/}
TOMBSTONES=${state_prefix:+$state_prefix/}tombstones/
LIFECYCLE=$WORK_DIR/state-lifecycle.json
printf '{"rule": [{"action": {"type": "Delete"}, "condition": {"age": 35, "matchesPrefix": ["%s"]}}]}\n' \
  "$TOMBSTONES" >"$LIFECYCLE"
lifecycle_update=(gcloud storage buckets update "gs://$STATE_BUCKET" --project="$P" --lifecycle-file="$LIFECYCLE")
if ((DRY_RUN)); then
  run gcloud storage buckets describe "gs://$STATE_BUCKET" --project="$P" --format='json(lifecycle_config)'
  printf '# %s: the bucket'"'"'s lifecycle rules plus deleting %s* after 35 days\n' \
    "$(basename "$LIFECYCLE")" "$TOMBSTONES"
  run_if absent "${lifecycle_update[@]}"
else
  current=$(gcloud storage buckets describe "gs://$STATE_BUCKET" --project="$P" --format='json(lifecycle_config)')
  if [[ $current == *"\"$TOMBSTONES\""* ]]; then
    printf '# gs://%s already deletes %s* after a while\n' "$STATE_BUCKET" "$TOMBSTONES"
  elif [[ $current != *'"rule"'* ]]; then
    "${lifecycle_update[@]}" >/dev/null
    printf '# gs://%s now deletes %s* after 35 days\n' "$STATE_BUCKET" "$TOMBSTONES"
  elif command -v jq >/dev/null; then
    jq --slurpfile ours "$LIFECYCLE" '{rule: ((.lifecycle_config.rule // []) + $ours[0].rule)}' \
      <<<"$current" >"$LIFECYCLE.merged"
    mv "$LIFECYCLE.merged" "$LIFECYCLE"
    "${lifecycle_update[@]}" >/dev/null
    printf '# gs://%s now also deletes %s* after 35 days\n' "$STATE_BUCKET" "$TOMBSTONES"
  else
    printf 'WARNING: gs://%s has lifecycle rules of its own and jq is not installed to merge ours; add this rule yourself, or deletion tombstones are never deleted:\n%s\n' \
      "$STATE_BUCKET" "$(cat "$LIFECYCLE")" >&2
  fi
fi

# --- 5. Service accounts: a runtime and a trigger identity per function. -------
step "Service accounts"
sa_create() {
  local email=$1 name=$2 st=0
  probe gcloud iam service-accounts describe "$email" --project="$P" || st=$?
  ((st == 0)) || run_if absent gcloud iam service-accounts create "${email%%@*}" --project="$P" \
    --display-name="$name"
}
sa_create "$START_SA" "fhirexport StartExport runtime"
sa_create "$POLL_SA" "fhirexport PollExport runtime"
sa_create "$RECORD_SA" "fhirexport RecordChange runtime"
sa_create "$START_TRIGGER_SA" "fhirexport StartExport Eventarc trigger"
sa_create "$POLL_TRIGGER_SA" "fhirexport PollExport Eventarc trigger"
sa_create "$RECORD_PUSH_SA" "fhirexport RecordChange Pub/Sub push"

# --- 6. Custom roles. -----------------------------------------------------------
step "Custom IAM roles"
role_apply() {
  local id=$1 title=$2 desc=$3 perms=$4 st=0
  probe gcloud iam roles describe "$id" --project="$P" || st=$?
  ((st == 0)) || run_if absent gcloud iam roles create "$id" --project="$P" \
    --title="$title" --description="$desc" --permissions="$perms" --stage=GA
  ((st == 1)) || run_if present gcloud iam roles update "$id" --project="$P" \
    --title="$title" --description="$desc" --permissions="$perms" --stage=GA
}
role_apply "$EXPORT_ROLE" "fhirexport exporter" "Export FHIR stores (StartExport, PollExport)" "$EXPORT_PERMISSIONS"
role_apply "$START_ROLE" "fhirexport starter" "List stores and export operations (StartExport)" "$START_PERMISSIONS"
role_apply "$POLL_ROLE" "fhirexport poller" "Follow and cancel FHIR export operations (PollExport)" "$POLL_PERMISSIONS"
role_apply "$RECORD_ROLE" "fhirexport recorder" "Add deletion tombstones to the state bucket (RecordChange)" "$RECORD_PERMISSIONS"
role_apply "$FEED_ROLE" "fhirexport feed writer" "Write manifests and deleted files beside exports (PollExport)" "$FEED_PERMISSIONS"
role_apply "$LIST_ROLE" "fhirexport output lister" "List export objects to resolve a lost export answer (StartExport)" "$LIST_PERMISSIONS"

# --- 7. Healthcare API: each role on the narrowest resource the patterns allow. -
# Exporting is granted on the store; listing stores and operations, which belong
# to the dataset, on the dataset. A '*' widens the grant to the dataset or,
# failing that, the project.
step "Healthcare API access (custom roles on the allowed stores)"
granted=" "
healthcare_grant() {
  local member=$1 role=projects/$P/roles/$2 level=$3 pattern=$4 loc ds fs key
  [[ $pattern =~ $re_store ]]
  loc=${BASH_REMATCH[2]} ds=${BASH_REMATCH[3]} fs=${BASH_REMATCH[4]}
  if [[ $level == store && $loc != '*' && $ds != '*' && $fs != '*' ]]; then
    key="$member|$role|$loc/$ds/$fs"
    [[ $granted == *" $key "* ]] && return 0
    granted+="$key "
    grant gcloud healthcare fhir-stores add-iam-policy-binding "$fs" --dataset="$ds" \
      --location="$loc" --project="$P" --member="$member" --role="$role"
  elif [[ $loc != '*' && $ds != '*' ]]; then
    key="$member|$role|$loc/$ds"
    [[ $granted == *" $key "* ]] && return 0
    granted+="$key "
    grant gcloud healthcare datasets add-iam-policy-binding "$ds" --location="$loc" \
      --project="$P" --member="$member" --role="$role"
  else
    key="$member|$role|project"
    [[ $granted == *" $key "* ]] && return 0
    granted+="$key "
    grant gcloud projects add-iam-policy-binding "$P" --member="$member" --role="$role" \
      --condition=None
  fi
}
for s in ${stores[@]+"${stores[@]}"}; do
  healthcare_grant "serviceAccount:$START_SA" "$EXPORT_ROLE" store "$s"
  healthcare_grant "serviceAccount:$START_SA" "$START_ROLE" dataset "$s"
  healthcare_grant "serviceAccount:$POLL_SA" "$EXPORT_ROLE" store "$s"
  healthcare_grant "serviceAccount:$POLL_SA" "$POLL_ROLE" dataset "$s"
done

# --- 8. Events topic, state and export buckets: the only other things the functions touch.
step "Events topic, state and export bucket access"
for sa in "$START_SA" "$POLL_SA"; do
  grant gcloud pubsub topics add-iam-policy-binding "$EVENTS_TOPIC" --project="$P" \
    --member="serviceAccount:$sa" --role=roles/pubsub.publisher
  # objectUser: create, get, update, delete and list objects; no IAM changes.
  grant gcloud storage buckets add-iam-policy-binding "gs://$STATE_BUCKET" --project="$P" \
    --member="serviceAccount:$sa" --role=roles/storage.objectUser
done
# RecordChange writes tombstones only; it publishes no events. Its stdout logs
# reach Cloud Logging through Cloud Run and need no role (as for the others).
grant gcloud storage buckets add-iam-policy-binding "gs://$STATE_BUCKET" --project="$P" \
  --member="serviceAccount:$RECORD_SA" --role="projects/$P/roles/$RECORD_ROLE"
# A deletedUriPrefix or destination in another bucket needs the same grants there.
grant gcloud storage buckets add-iam-policy-binding "gs://$EXPORT_BUCKET" --project="$P" \
  --member="serviceAccount:$POLL_SA" --role="projects/$P/roles/$FEED_ROLE"
grant gcloud storage buckets add-iam-policy-binding "gs://$EXPORT_BUCKET" --project="$P" \
  --member="serviceAccount:$START_SA" --role="projects/$P/roles/$LIST_ROLE"

# --- 9. The Healthcare service agent writes the exports and the notifications. -
step "Healthcare service agent access to the destinations and the changes topic"
grant gcloud pubsub topics add-iam-policy-binding "$CHANGES_TOPIC" --project="$P" \
  --member="serviceAccount:$HEALTHCARE_AGENT" --role=roles/pubsub.publisher
# objectAdmin, not objectCreator: re-running an export overwrites objects.
grant gcloud storage buckets add-iam-policy-binding "gs://$EXPORT_BUCKET" --project="$P" \
  --member="serviceAccount:$HEALTHCARE_AGENT" --role=roles/storage.objectAdmin
if [[ -n $BQ_DATASET ]]; then
  # dataEditor on the dataset only (gcloud has no dataset IAM command; bq's SQL
  # GRANT is the documented way); jobUser exists only at project level.
  grant bq query --project_id="$BQ_PROJECT" --use_legacy_sql=false \
    "GRANT \`roles/bigquery.dataEditor\` ON SCHEMA \`$BQ_PROJECT.$BQ_NAME\` TO \"serviceAccount:$HEALTHCARE_AGENT\""
  grant gcloud projects add-iam-policy-binding "$BQ_PROJECT" \
    --member="serviceAccount:$HEALTHCARE_AGENT" --role=roles/bigquery.jobUser --condition=None
fi

# --- 10. Trigger identities. -----------------------------------------------------
# Without --trigger-service-account, gcloud makes the runtime account the trigger
# identity, which would then need run.invoker on itself. A separate identity per
# function keeps invoking and exporting apart. Pub/Sub mints its OIDC tokens,
# which needs Token Creator for projects whose Pub/Sub agent predates 2021-04-08.
step "Trigger identities"
for sa in "$START_TRIGGER_SA" "$POLL_TRIGGER_SA" "$RECORD_PUSH_SA"; do
  grant gcloud iam service-accounts add-iam-policy-binding "$sa" --project="$P" \
    --member="serviceAccount:$PUBSUB_AGENT" --role=roles/iam.serviceAccountTokenCreator
done

# --- 11. Functions. --------------------------------------------------------------
step "Functions"
yaml_quote() { printf "'%s'" "${1//\'/\'\'}"; }
# env_file NAME [VAR VALUE]...: writes the common variables and the extra ones
# to $WORK_DIR/NAME and shows them in a dry run.
env_file() {
  local file=$WORK_DIR/$1
  shift
  {
    printf 'FHIREXPORT_EVENTS_TOPIC: %s\n' "$(yaml_quote "projects/$P/topics/$EVENTS_TOPIC")"
    printf 'FHIREXPORT_STATE: %s\n' "$(yaml_quote "$STATE")"
    printf 'FHIREXPORT_ALLOWED_STORES: %s\n' "$(yaml_quote "$ALLOWED_STORES")"
    printf 'FHIREXPORT_ALLOWED_DESTINATIONS: %s\n' "$(yaml_quote "$ALLOWED_DESTINATIONS")"
    while (($#)); do
      printf '%s: %s\n' "$1" "$(yaml_quote "$2")"
      shift 2
    done
  } >"$file"
  show_file "$file"
}
# show_file FILE: a dry run prints a generated file, which is removed on exit.
show_file() {
  ((DRY_RUN)) || return 0
  printf '# %s (a temporary file, removed on exit) holds:\n' "$(basename "$1")"
  sed 's/^/#   /' "$1"
}
env_file env-start.yaml FHIREXPORT_MAX_RUNNING "$MAX_RUNNING"
poll_env=(FHIREXPORT_MAX_RUNNING "$MAX_RUNNING")
[[ -z $POLL_WORKERS ]] || poll_env+=(FHIREXPORT_POLL_WORKERS "$POLL_WORKERS")
env_file env-poll.yaml "${poll_env[@]}"
env_file env-record.yaml
build_flags=()
[[ -z $BUILD_SERVICE_ACCOUNT ]] ||
  build_flags=(--build-service-account="projects/$P/serviceAccounts/$BUILD_SERVICE_ACCOUNT")

# deploy_fn NAME ENTRY SA INVOKER TIMEOUT MAX ENV TRIGGER-FLAG...
deploy_fn() {
  local name=$1 entry=$2 sa=$3 invoker=$4 timeout=$5 max=$6 env=$7
  shift 7
  # Cloud Functions builds the module root; .gcloudignore keeps the upload small.
  # Concurrency 1 (the default) is explicit: the functions framework's CloudEvent
  # handler can stall under concurrent requests (cloudevents/sdk-go #1224, #1332).
  ((DRY_RUN == 0)) || printf '# from %s:\n' "$REPO_ROOT"
  (cd "$REPO_ROOT" && run gcloud functions deploy "$name" --gen2 --runtime=go126 \
    --region="$REGION" --project="$P" --source=. --entry-point="$entry" "$@" \
    --service-account="$sa" --ingress-settings=internal-only \
    --env-vars-file="$WORK_DIR/$env" --timeout="$timeout" --max-instances="$max" --concurrency=1 \
    ${build_flags[@]+"${build_flags[@]}"})
  # Grants roles/run.invoker on the function's Cloud Run service only.
  grant gcloud functions add-invoker-policy-binding "$name" --region="$REGION" --project="$P" \
    --member="serviceAccount:$invoker"
}
deploy_fn "$START_FN" StartExport "$START_SA" "$START_TRIGGER_SA" 60s "$START_MAX_INSTANCES" env-start.yaml \
  --trigger-topic="$REQUESTS_TOPIC" --retry --trigger-service-account="$START_TRIGGER_SA"
# One poller at a time, running up to the 540 s an event-driven function may take.
deploy_fn "$POLL_FN" PollExport "$POLL_SA" "$POLL_TRIGGER_SA" 540s 1 env-poll.yaml \
  --trigger-topic="$POLL_TOPIC" --retry --trigger-service-account="$POLL_TRIGGER_SA"
# RecordChange wants deletions only, but a store notifies every create, update
# and patch too, and an Eventarc Pub/Sub trigger (--trigger-topic) cannot filter
# on message attributes: every write to a busy store would start an instance.
# So it is an HTTP function fed by our own push subscription whose filter
# delivers DeleteResource only (the functions framework turns a Pub/Sub push
# body into the same CloudEvent Eventarc would send). Only the push identity may
# invoke it; Pub/Sub in the same project passes internal-only ingress.
deploy_fn "$RECORD_FN" RecordChange "$RECORD_SA" "$RECORD_PUSH_SA" 60s 5 env-record.yaml \
  --trigger-http --no-allow-unauthenticated

# --- 12. Change notifications: store → changes topic → deletions → RecordChange. -
step "FHIR store change notifications"
if ((DRY_RUN)); then
  run gcloud functions describe "$RECORD_FN" --gen2 --region="$REGION" --project="$P" \
    --format='value(serviceConfig.uri)'
  RECORD_URL=https://RECORD_FUNCTION_URL
else
  RECORD_URL=$(gcloud functions describe "$RECORD_FN" --gen2 --region="$REGION" --project="$P" \
    --format='value(serviceConfig.uri)')
  [[ $RECORD_URL == https://* ]] || { printf 'deploy.sh: no URL for function %s\n' "$RECORD_FN" >&2; exit 1; }
fi
# The topic in the path lets the functions framework name the event's source;
# the token's audience is the service URL itself, as Cloud Run expects. A
# message is retried with backoff for the subscription's 7-day retention, and the
# subscription never expires: a store may go a month without a deletion.
push_flags=(--push-endpoint="$RECORD_URL/projects/$P/topics/$CHANGES_TOPIC"
  --push-auth-service-account="$RECORD_PUSH_SA" --push-auth-token-audience="$RECORD_URL"
  --ack-deadline=60 --min-retry-delay=10s --max-retry-delay=600s --expiration-period=never)
st=0
probe gcloud pubsub subscriptions describe "$RECORD_SUB" --project="$P" || st=$?
# A filter is fixed when the subscription is created; re-runs update the rest.
((st == 0)) || run_if absent gcloud pubsub subscriptions create "$RECORD_SUB" --project="$P" \
  --topic="$CHANGES_TOPIC" --message-filter='attributes.action = "DeleteResource"' "${push_flags[@]}"
((st == 1)) || run_if present gcloud pubsub subscriptions update "$RECORD_SUB" --project="$P" \
  "${push_flags[@]}"

# gcloud healthcare fhir-stores update --pubsub-topic sets only the deprecated
# single notificationConfig, so the list is read with gcloud and written with a
# REST PATCH (updateMask=notificationConfigs), keeping every existing config.
# A concurrent edit of the same store's configs between the read and the write
# would be lost: the FhirStore has no etag to guard it.
CHANGES_TOPIC_NAME=projects/$P/topics/$CHANGES_TOPIC
AUTH_HEADER=$WORK_DIR/auth-header
# url_path PATH: PATH percent-encoded byte by byte, but for RFC 3986's
# unreserved characters and '/': store and dataset ids may be letters of any
# script (süd-klinik, 病院-7), which a URL carries encoded.
url_path() {
  local LC_ALL=C s=$1 out='' c i
  for ((i = 0; i < ${#s}; i++)); do
    c=${s:i:1}
    case $c in
      [A-Za-z0-9._~/-]) out+=$c ;;
      *) printf -v c '%%%02X' "'$c" && out+=$c ;;
    esac
  done
  printf '%s' "$out"
}
for s in ${notify[@]+"${notify[@]}"}; do
  [[ $s =~ $re_store ]]
  loc=${BASH_REMATCH[2]} ds=${BASH_REMATCH[3]} fs=${BASH_REMATCH[4]}
  body=$WORK_DIR/notify-$ds-$fs.json
  patch=(curl --silent --show-error --fail-with-body -X PATCH -H "@$AUTH_HEADER"
    -H 'Content-Type: application/json' --data-binary "@$body"
    "https://healthcare.googleapis.com/v1/$(url_path "$s")?updateMask=notificationConfigs")
  if ((DRY_RUN)); then
    run gcloud healthcare fhir-stores describe "$fs" --dataset="$ds" --location="$loc" --project="$P" --format=json
    run_if absent gcloud auth print-access-token
    printf '# %s: its notificationConfigs plus {"pubsubTopic": "%s", "sendFullResource": false};\n' \
      "$(basename "$body")" "$CHANGES_TOPIC_NAME"
    printf '# %s: "Authorization: Bearer" and the token\n' "$(basename "$AUTH_HEADER")"
    run_if absent "${patch[@]}"
    continue
  fi
  current=$(gcloud healthcare fhir-stores describe "$fs" --dataset="$ds" --location="$loc" --project="$P" --format=json)
  if jq -e --arg t "$CHANGES_TOPIC_NAME" 'any(.notificationConfigs[]?; .pubsubTopic == $t)' <<<"$current" >/dev/null; then
    printf '# %s already notifies %s\n' "$s" "$CHANGES_TOPIC_NAME"
    continue
  fi
  jq --arg t "$CHANGES_TOPIC_NAME" \
    '{notificationConfigs: ((.notificationConfigs // []) + [{pubsubTopic: $t, sendFullResource: false}])}' \
    <<<"$current" >"$body"
  token=$(gcloud auth print-access-token)
  [[ -n $token ]] || { printf 'deploy.sh: gcloud auth print-access-token printed nothing\n' >&2; exit 1; }
  (umask 077 && printf 'Authorization: Bearer %s\n' "$token" >"$AUTH_HEADER")
  if ! "${patch[@]}" >"$WORK_DIR/patch-answer.json"; then
    rm -f "$AUTH_HEADER"
    printf 'deploy.sh: adding the notification config to %s failed; the API answered:\n%s\n' \
      "$s" "$(cat "$WORK_DIR/patch-answer.json")" >&2
    exit 1
  fi
  rm -f "$AUTH_HEADER"
  printf '# %s now also notifies %s\n' "$s" "$CHANGES_TOPIC_NAME"
done

# --- 13. Scheduler jobs. ----------------------------------------------------------
step "Cloud Scheduler jobs"
# job NAME SCHEDULE TOPIC DESCRIPTION BODY-FLAG
job() {
  local name=$1 schedule=$2 topic=$3 desc=$4 body=$5 st=0
  probe gcloud scheduler jobs describe "$name" --location="$REGION" --project="$P" || st=$?
  ((st == 0)) || run_if absent gcloud scheduler jobs create pubsub "$name" --location="$REGION" \
    --project="$P" --schedule="$schedule" --time-zone="$SCHEDULER_TIMEZONE" \
    --topic="projects/$P/topics/$topic" "$body" --description="$desc"
  ((st == 1)) || run_if present gcloud scheduler jobs update pubsub "$name" --location="$REGION" \
    --project="$P" --schedule="$schedule" --time-zone="$SCHEDULER_TIMEZONE" \
    --topic="projects/$P/topics/$topic" "$body" --description="$desc"
}
job "$NAME_PREFIX-poll" "* * * * *" "$POLL_TOPIC" "fhirexport: poll pending exports" --message-body='{}'
if [[ -n $NIGHTLY_SPEC ]]; then
  job "$NAME_PREFIX-nightly" "$NIGHTLY_SCHEDULE" "$REQUESTS_TOPIC" "fhirexport: $(basename "$NIGHTLY_SPEC")" \
    --message-body-from-file="$NIGHTLY_SPEC"
fi
if [[ -n $HOURLY_SPEC ]]; then
  job "$NAME_PREFIX-hourly" "$HOURLY_SCHEDULE" "$REQUESTS_TOPIC" "fhirexport: $(basename "$HOURLY_SPEC")" \
    --message-body-from-file="$HOURLY_SPEC"
fi

# --- 14. Log-based metrics and alert policies. -----------------------------------
# The functions log one JSON line per outcome ("export outcome": event, pipeline,
# store, operation) and, per sweep, one per incremental pipeline ("watermark
# age": pipeline, watermarkAgeSeconds). Gen2 functions log as their Cloud Run
# service, so the metrics' series carry the cloud_run_revision resource.
step "Log-based metrics"
metric_apply() {
  local name=$1 file=$2 st=0
  show_file "$file"
  probe gcloud logging metrics describe "$name" --project="$P" || st=$?
  ((st == 0)) || run_if absent gcloud logging metrics create "$name" --project="$P" --config-from-file="$file"
  ((st == 1)) || run_if present gcloud logging metrics update "$name" --project="$P" --config-from-file="$file"
}
run_filter="resource.type=\\\"cloud_run_revision\\\""
cat >"$WORK_DIR/outcomes-metric.json" <<EOF
{
  "description": "fhirexport export outcomes by event and pipeline",
  "filter": "$run_filter AND resource.labels.service_name=(\"$START_FN\" OR \"$POLL_FN\") AND jsonPayload.message=\"export outcome\"",
  "metricDescriptor": {
    "metricKind": "DELTA",
    "valueType": "INT64",
    "unit": "1",
    "labels": [
      {"key": "event", "valueType": "STRING", "description": "succeeded, partial, failed, rejected, queued or started"},
      {"key": "pipeline", "valueType": "STRING", "description": "the export's pipeline"}
    ]
  },
  "labelExtractors": {
    "event": "EXTRACT(jsonPayload.event)",
    "pipeline": "EXTRACT(jsonPayload.pipeline)"
  }
}
EOF
# Bucket bounds every hour up to 2 days, then every 6 hours up to 7 days, then
# every day up to 31: an alert threshold of whole hours (days beyond 2) is a
# bound, so a percentile of ages below it can never read above it.
bounds="60, 300, 600, 900, 1800, 2700"
for ((b = 3600; b <= 172800; b += 3600)); do bounds+=", $b"; done
for ((b = 194400; b <= 604800; b += 21600)); do bounds+=", $b"; done
for ((b = 691200; b <= 2678400; b += 86400)); do bounds+=", $b"; done
cat >"$WORK_DIR/watermark-age-metric.json" <<EOF
{
  "description": "fhirexport age of each incremental pipeline's watermark, per poll sweep",
  "filter": "$run_filter AND resource.labels.service_name=\"$POLL_FN\" AND jsonPayload.message=\"watermark age\"",
  "valueExtractor": "EXTRACT(jsonPayload.watermarkAgeSeconds)",
  "metricDescriptor": {
    "metricKind": "DELTA",
    "valueType": "DISTRIBUTION",
    "unit": "s",
    "labels": [
      {"key": "pipeline", "valueType": "STRING", "description": "the incremental pipeline"}
    ]
  },
  "labelExtractors": {
    "pipeline": "EXTRACT(jsonPayload.pipeline)"
  },
  "bucketOptions": {"explicitBuckets": {"bounds": [$bounds]}}
}
EOF
metric_apply "$OUTCOMES_METRIC" "$WORK_DIR/outcomes-metric.json"
metric_apply "$WATERMARK_METRIC" "$WORK_DIR/watermark-age-metric.json"

step "Alert policies"
# Policy IDs are chosen by the server, so a policy is found by its display name:
# updated (replaced by the file) when present, created when absent.
policy_apply() {
  local display=$1 file=$2 names name
  show_file "$file"
  local list=(gcloud alpha monitoring policies list --project="$P" --filter="displayName=\"$display\""
    --format='value(name)')
  if ((DRY_RUN)); then
    run "${list[@]}"
    run_if absent gcloud alpha monitoring policies create --project="$P" --policy-from-file="$file"
    run_if present gcloud alpha monitoring policies update "projects/$P/alertPolicies/POLICY_ID" \
      --project="$P" --policy-from-file="$file"
    return
  fi
  names=$("${list[@]}")
  if [[ -z $names ]]; then
    gcloud alpha monitoring policies create --project="$P" --policy-from-file="$file"
    return
  fi
  for name in $names; do
    gcloud alpha monitoring policies update "$name" --project="$P" --policy-from-file="$file"
  done
}
if [[ -z $NOTIFICATION_CHANNEL ]]; then
  printf '# NOTIFICATION_CHANNEL is not set: no alert policies were created or updated (the metrics are there to chart)\n'
else
  metric_filter() { printf 'resource.type = \\"cloud_run_revision\\" AND metric.type = \\"logging.googleapis.com/user/%s\\"' "$1"; }
  cat >"$WORK_DIR/policy-outcomes.json" <<EOF
{
  "displayName": "$NAME_PREFIX: failed or partial export",
  "documentation": {
    "content": "An export of $NAME_PREFIX ended failed or partial. Its outcome event and the function's log line (jsonPayload.message=\"export outcome\") name the store and the operation.",
    "mimeType": "text/markdown"
  },
  "combiner": "OR",
  "conditions": [
    {
      "displayName": "an export outcome is failed or partial",
      "conditionThreshold": {
        "filter": "$(metric_filter "$OUTCOMES_METRIC") AND metric.label.event = one_of(\"failed\", \"partial\")",
        "aggregations": [
          {
            "alignmentPeriod": "300s",
            "perSeriesAligner": "ALIGN_SUM",
            "crossSeriesReducer": "REDUCE_SUM",
            "groupByFields": ["metric.label.pipeline", "metric.label.event"]
          }
        ],
        "comparison": "COMPARISON_GT",
        "thresholdValue": 0,
        "duration": "0s",
        "trigger": {"count": 1}
      }
    }
  ],
  "alertStrategy": {"autoClose": "86400s"},
  "notificationChannels": ["$NOTIFICATION_CHANNEL"],
  "enabled": true
}
EOF
  cat >"$WORK_DIR/policy-watermark.json" <<EOF
{
  "displayName": "$NAME_PREFIX: stale incremental watermark",
  "documentation": {
    "content": "An incremental pipeline of $NAME_PREFIX has not completed a fully successful export for more than $ALERT_WATERMARK_AGE ($WATERMARK_AGE_SECONDS s).",
    "mimeType": "text/markdown"
  },
  "combiner": "OR",
  "conditions": [
    {
      "displayName": "watermark older than $ALERT_WATERMARK_AGE",
      "conditionThreshold": {
        "filter": "$(metric_filter "$WATERMARK_METRIC")",
        "aggregations": [
          {
            "alignmentPeriod": "600s",
            "perSeriesAligner": "ALIGN_PERCENTILE_99",
            "crossSeriesReducer": "REDUCE_MAX",
            "groupByFields": ["metric.label.pipeline"]
          }
        ],
        "comparison": "COMPARISON_GT",
        "thresholdValue": $WATERMARK_AGE_SECONDS,
        "duration": "0s",
        "trigger": {"count": 1}
      }
    }
  ],
  "alertStrategy": {"autoClose": "86400s"},
  "notificationChannels": ["$NOTIFICATION_CHANNEL"],
  "enabled": true
}
EOF
  policy_apply "$NAME_PREFIX: failed or partial export" "$WORK_DIR/policy-outcomes.json"
  policy_apply "$NAME_PREFIX: stale incremental watermark" "$WORK_DIR/policy-watermark.json"
fi

step "Done"
if ((DRY_RUN)); then
  printf '# dry run: nothing was changed\n'
else
  printf '# deployed %s, %s and %s in %s\n' "$START_FN" "$POLL_FN" "$RECORD_FN" "$P"
fi
