#!/usr/bin/env bash
# Deploys fhirexport to a Google Cloud project with gcloud: APIs, Pub/Sub topics,
# one service account and one custom role per function, least-privilege IAM,
# both Cloud Run functions (2nd gen) and the Cloud Scheduler jobs.
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

  --dry-run   print every command instead of running it (needs no gcloud account)
  --help      print this help

Resources: topics NAME_PREFIX-requests, -poll, -events; functions NAME_PREFIX-start
(StartExport) and NAME_PREFIX-poll (PollExport); service accounts NAME_PREFIX-start,
-poll (runtime) and NAME_PREFIX-start-trigger, -poll-trigger (Eventarc invokers);
custom roles NAME_PREFIX_starter, NAME_PREFIX_poller; scheduler jobs NAME_PREFIX-poll,
-nightly, -hourly.
EOF
}

die_usage() {
  printf 'deploy.sh: %s\n' "$1" >&2
  printf 'Run deploy/deploy.sh --help for the variables.\n' >&2
  exit 2
}

DRY_RUN=0
while (($#)); do
  arg=$1
  shift
  case $arg in
    --help | -h)
      usage
      exit 0
      ;;
    --dry-run) DRY_RUN=1 ;;
    --*=*)
      flag=${arg%%=*}
      value=${arg#*=}
      ;;
    --*)
      flag=$arg
      (($#)) || die_usage "$flag needs a value"
      value=$1
      shift
      ;;
    *) die_usage "unexpected argument: $arg" ;;
  esac
  case $arg in --help | -h | --dry-run) continue ;; esac
  case $flag in
    --project) PROJECT_ID=$value ;;
    --region) REGION=$value ;;
    --state) STATE=$value ;;
    --export-bucket) EXPORT_BUCKET=$value ;;
    --allowed-stores) ALLOWED_STORES=$value ;;
    --allowed-destinations) ALLOWED_DESTINATIONS=$value ;;
    --bq-dataset) BQ_DATASET=$value ;;
    --name-prefix) NAME_PREFIX=$value ;;
    --scheduler-timezone) SCHEDULER_TIMEZONE=$value ;;
    --nightly-spec) NIGHTLY_SPEC=$value ;;
    --nightly-schedule) NIGHTLY_SCHEDULE=$value ;;
    --hourly-spec) HOURLY_SPEC=$value ;;
    --hourly-schedule) HOURLY_SCHEDULE=$value ;;
    --start-max-instances) START_MAX_INSTANCES=$value ;;
    --build-service-account) BUILD_SERVICE_ACCOUNT=$value ;;
    *) die_usage "unknown flag: $flag" ;;
  esac
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
re_segment='^(\*|[A-Za-z0-9._-]+)$'
re_prefix='^[a-z]([a-z0-9-]{0,14}[a-z0-9])?$'
re_tz='^[A-Za-z_]+(/[A-Za-z0-9_+-]+)*$'
re_cron='^[^[:space:]]+( [^[:space:]]+){4}$'
re_sa_email='^[a-z0-9-]+@[a-z0-9.-]+\.gserviceaccount\.com$'

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
    [[ $seg =~ $re_segment ]] || bad "ALLOWED_STORES entry '$s': segment '$seg' must be a name or exactly '*'"
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
  local var=$1 file=$2 store gcs bq
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
  if [[ -z $gcs && -z $bq ]]; then
    bad "$var '$file' has neither gcsDestination.uriPrefix nor bigqueryDestination.datasetUri"
  fi
}
[[ -z $NIGHTLY_SPEC ]] || check_spec NIGHTLY_SPEC "$NIGHTLY_SPEC"
[[ -z $HOURLY_SPEC ]] || check_spec HOURLY_SPEC "$HOURLY_SPEC"

if ((${#errors[@]})); then
  for e in "${errors[@]}"; do printf 'deploy.sh: %s\n' "$e" >&2; done
  die_usage "${#errors[@]} invalid value(s)"
fi

# --- Names. ---------------------------------------------------------------------
P=$PROJECT_ID
REQUESTS_TOPIC=$NAME_PREFIX-requests
POLL_TOPIC=$NAME_PREFIX-poll
EVENTS_TOPIC=$NAME_PREFIX-events
START_FN=$NAME_PREFIX-start
POLL_FN=$NAME_PREFIX-poll
START_SA=$NAME_PREFIX-start@$P.iam.gserviceaccount.com
POLL_SA=$NAME_PREFIX-poll@$P.iam.gserviceaccount.com
START_TRIGGER_SA=$NAME_PREFIX-start-trigger@$P.iam.gserviceaccount.com
POLL_TRIGGER_SA=$NAME_PREFIX-poll-trigger@$P.iam.gserviceaccount.com
START_ROLE=${NAME_PREFIX//-/_}_starter
POLL_ROLE=${NAME_PREFIX//-/_}_poller
# Starting an export is all StartExport does with the Healthcare API; following
# it is PollExport's job, which reads operations by name (its state lists them,
# so operations.list is not needed).
START_PERMISSIONS=healthcare.fhirStores.export
POLL_PERMISSIONS=healthcare.operations.get

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
  iam.googleapis.com logging.googleapis.com)
[[ -z $BQ_DATASET ]] || apis+=(bigquery.googleapis.com)
run gcloud services enable "${apis[@]}" --project="$P"
# Service agents are created lazily; IAM bindings to them fail until they exist.
run gcloud beta services identity create --service=healthcare.googleapis.com --project="$P"
run gcloud beta services identity create --service=pubsub.googleapis.com --project="$P"

# --- 3. Topics. -----------------------------------------------------------------
step "Pub/Sub topics"
for t in "$REQUESTS_TOPIC" "$POLL_TOPIC" "$EVENTS_TOPIC"; do
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
sa_create "$START_TRIGGER_SA" "fhirexport StartExport Eventarc trigger"
sa_create "$POLL_TRIGGER_SA" "fhirexport PollExport Eventarc trigger"

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
role_apply "$START_ROLE" "fhirexport starter" "Start FHIR store exports (StartExport)" "$START_PERMISSIONS"
role_apply "$POLL_ROLE" "fhirexport poller" "Follow FHIR export operations (PollExport)" "$POLL_PERMISSIONS"

# --- 7. Healthcare API: each role on the narrowest resource the patterns allow. -
# StartExport exports stores; PollExport reads the operations, which belong to
# the dataset. A '*' widens the grant to the dataset or, failing that, the project.
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
  healthcare_grant "serviceAccount:$START_SA" "$START_ROLE" store "$s"
  healthcare_grant "serviceAccount:$POLL_SA" "$POLL_ROLE" dataset "$s"
done

# --- 8. Events topic and state bucket: the only other things the functions touch.
step "Events topic and state bucket access"
for sa in "$START_SA" "$POLL_SA"; do
  grant gcloud pubsub topics add-iam-policy-binding "$EVENTS_TOPIC" --project="$P" \
    --member="serviceAccount:$sa" --role=roles/pubsub.publisher
  # objectUser: create, get, update, delete and list objects; no IAM changes.
  grant gcloud storage buckets add-iam-policy-binding "gs://$STATE_BUCKET" --project="$P" \
    --member="serviceAccount:$sa" --role=roles/storage.objectUser
done

# --- 9. The Healthcare service agent writes the exports. ------------------------
step "Healthcare service agent access to the destinations"
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
for sa in "$START_TRIGGER_SA" "$POLL_TRIGGER_SA"; do
  grant gcloud iam service-accounts add-iam-policy-binding "$sa" --project="$P" \
    --member="serviceAccount:$PUBSUB_AGENT" --role=roles/iam.serviceAccountTokenCreator
done

# --- 11. Functions. --------------------------------------------------------------
step "Functions"
ENV_FILE=$WORK_DIR/env.yaml
yaml_quote() { printf "'%s'" "${1//\'/\'\'}"; }
{
  printf 'FHIREXPORT_EVENTS_TOPIC: %s\n' "$(yaml_quote "projects/$P/topics/$EVENTS_TOPIC")"
  printf 'FHIREXPORT_STATE: %s\n' "$(yaml_quote "$STATE")"
  printf 'FHIREXPORT_ALLOWED_STORES: %s\n' "$(yaml_quote "$ALLOWED_STORES")"
  printf 'FHIREXPORT_ALLOWED_DESTINATIONS: %s\n' "$(yaml_quote "$ALLOWED_DESTINATIONS")"
} >"$ENV_FILE"
if ((DRY_RUN)); then
  printf '# --env-vars-file (a temporary file, removed on exit) holds:\n'
  sed 's/^/#   /' "$ENV_FILE"
fi
build_flags=()
[[ -z $BUILD_SERVICE_ACCOUNT ]] ||
  build_flags=(--build-service-account="projects/$P/serviceAccounts/$BUILD_SERVICE_ACCOUNT")

deploy_fn() {
  local name=$1 entry=$2 topic=$3 sa=$4 trigger_sa=$5 timeout=$6 max=$7
  # Cloud Functions builds the module root; .gcloudignore keeps the upload small.
  ((DRY_RUN == 0)) || printf '# from %s:\n' "$REPO_ROOT"
  (cd "$REPO_ROOT" && run gcloud functions deploy "$name" --gen2 --runtime=go126 \
    --region="$REGION" --project="$P" --source=. --entry-point="$entry" \
    --trigger-topic="$topic" --retry --service-account="$sa" \
    --trigger-service-account="$trigger_sa" --ingress-settings=internal-only \
    --env-vars-file="$ENV_FILE" --timeout="$timeout" --max-instances="$max" \
    ${build_flags[@]+"${build_flags[@]}"})
  # Grants roles/run.invoker on the function's Cloud Run service only.
  grant gcloud functions add-invoker-policy-binding "$name" --region="$REGION" --project="$P" \
    --member="serviceAccount:$trigger_sa"
}
deploy_fn "$START_FN" StartExport "$REQUESTS_TOPIC" "$START_SA" "$START_TRIGGER_SA" 60s "$START_MAX_INSTANCES"
# One poller at a time, running up to the 540 s an event-driven function may take.
deploy_fn "$POLL_FN" PollExport "$POLL_TOPIC" "$POLL_SA" "$POLL_TRIGGER_SA" 540s 1

# --- 12. Scheduler jobs. ----------------------------------------------------------
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

step "Done"
if ((DRY_RUN)); then
  printf '# dry run: nothing was changed\n'
else
  printf '# deployed %s and %s in %s\n' "$START_FN" "$POLL_FN" "$P"
fi
