#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice through a queued resource; optionally wait until it is ACTIVE.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu/create.sh --name=NAME --zone=ZONE --accelerator-type=TYPE [options] [-- GCLOUD_FLAGS...]

Creates a TPU VM (v5litepod-8) or pod slice (v5p-32) through a queued resource whose node has the same NAME:
  gcloud compute tpus queued-resources create NAME --node-id=NAME --zone=ZONE --accelerator-type=TYPE
         --runtime-version=VERSION [--project=PROJECT] [--spot|--reserved] [--valid-until-duration=D] [GCLOUD_FLAGS]
If a queued resource NAME already exists it is left alone (ACTIVE or still queued), or, with --recreate, deleted
and created again when a preemption or failure left it SUSPENDED or FAILED.

Flags (environment variable defaults in brackets):
  --name=NAME                  queued resource and node name [DCR_TPU_NAME] (required)
  --zone=ZONE                  e.g. us-west4-a (v5e), us-east5-a (v5p) [DCR_ZONE] (required)
  --project=PROJECT            GCP project; omitted = gcloud's configured project [DCR_PROJECT]
  --accelerator-type=TYPE      e.g. v5litepod-8, v5p-32, v6e-8 [DCR_ACCELERATOR_TYPE] (required)
  --runtime-version=VERSION    TPU software version [DCR_RUNTIME_VERSION]; default from the type:
                               v5litepod-* v2-alpha-tpuv5-lite, v5p-* v2-alpha-tpuv5, v6e-* v2-alpha-tpuv6e,
                               v2/v3/v4 tpu-ubuntu2204-base
  --spot                       Spot capacity: cheaper, can be preempted at any time [DCR_SPOT=1]
  --reserved                   use your project's reservation [DCR_RESERVED=1]
  --valid-until-duration=D     give up the queued request if not provisioned within D, e.g. 6h
                               [DCR_VALID_UNTIL_DURATION]
  --recreate                   delete a SUSPENDED/FAILED queued resource NAME first, then create it again
  --wait                       poll until the queued resource is ACTIVE [DCR_WAIT=1]
  --wait-timeout=SECONDS       give up waiting after this long (default 3600) [DCR_WAIT_TIMEOUT]
  --poll-interval=SECONDS      seconds between polls (default 30) [DCR_POLL_INTERVAL]
  --dry-run                    print the gcloud commands instead of running them [DCR_DRY_RUN=1]
  -h, --help                   this help
  -- GCLOUD_FLAGS...           passed to `queued-resources create` as they are (e.g. --data-disk=..., --network=...)

Example:
  launch/tpu/create.sh --name=dcr-v5e --zone=us-west4-a --accelerator-type=v5litepod-8 --spot --wait
EOF
}

NAME=${DCR_TPU_NAME:-}
ZONE=${DCR_ZONE:-}
PROJECT=${DCR_PROJECT:-}
ACCELERATOR_TYPE=${DCR_ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${DCR_RUNTIME_VERSION:-}
SPOT=${DCR_SPOT:-0}
RESERVED=${DCR_RESERVED:-0}
VALID_UNTIL=${DCR_VALID_UNTIL_DURATION:-}
WAIT=${DCR_WAIT:-0}
WAIT_TIMEOUT=${DCR_WAIT_TIMEOUT:-3600}
POLL_INTERVAL=${DCR_POLL_INTERVAL:-30}
RECREATE=0
GCLOUD_EXTRA=()

while (($#)); do
  SHIFT=1
  case $1 in
    --name | --name=*) take_value "$@" && NAME=$VALUE ;;
    --zone | --zone=*) take_value "$@" && ZONE=$VALUE ;;
    --project | --project=*) take_value "$@" && PROJECT=$VALUE ;;
    --accelerator-type | --accelerator-type=*) take_value "$@" && ACCELERATOR_TYPE=$VALUE ;;
    --runtime-version | --runtime-version=*) take_value "$@" && RUNTIME_VERSION=$VALUE ;;
    --valid-until-duration | --valid-until-duration=*) take_value "$@" && VALID_UNTIL=$VALUE ;;
    --wait-timeout | --wait-timeout=*) take_value "$@" && WAIT_TIMEOUT=$VALUE ;;
    --poll-interval | --poll-interval=*) take_value "$@" && POLL_INTERVAL=$VALUE ;;
    --spot) SPOT=1 ;;
    --reserved) RESERVED=1 ;;
    --recreate) RECREATE=1 ;;
    --wait) WAIT=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage && exit 0 ;;
    --) shift && GCLOUD_EXTRA=("$@") && break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift "$SHIFT"
done

require "$NAME" --name DCR_TPU_NAME
check_name "$NAME"
require "$ZONE" --zone DCR_ZONE
require "$ACCELERATOR_TYPE" --accelerator-type DCR_ACCELERATOR_TYPE
[[ $ACCELERATOR_TYPE =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
  die "--accelerator-type=$ACCELERATOR_TYPE is not a TPU type such as v5litepod-8 or v5p-32"
if [[ $SPOT == 1 && $RESERVED == 1 ]]; then
  die "--spot and --reserved exclude each other; pick one"
fi
check_int "$WAIT_TIMEOUT" --wait-timeout
check_int "$POLL_INTERVAL" --poll-interval
if [[ -z $RUNTIME_VERSION ]]; then
  case $ACCELERATOR_TYPE in
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    *) die "no default runtime version for --accelerator-type=$ACCELERATOR_TYPE; pass --runtime-version" ;;
  esac
fi
location_flags

DESCRIBE=(gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}" "--format=value(state.state)")
CREATE=(gcloud compute tpus queued-resources create "$NAME" "--node-id=$NAME" "${LOCATION[@]}"
  "--accelerator-type=$ACCELERATOR_TYPE" "--runtime-version=$RUNTIME_VERSION")
if [[ $SPOT == 1 ]]; then CREATE+=(--spot); fi
if [[ $RESERVED == 1 ]]; then CREATE+=(--reserved); fi
if [[ -n $VALID_UNTIL ]]; then CREATE+=("--valid-until-duration=$VALID_UNTIL"); fi
CREATE+=(${GCLOUD_EXTRA[@]+"${GCLOUD_EXTRA[@]}"})  # empty-array safe on bash 3.2 (macOS)
DELETE=(gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet)

create() {
  if [[ $DRY_RUN == 1 ]]; then
    if [[ $RECREATE == 1 ]]; then
      printf '# with --recreate, if the describe below says SUSPENDED or FAILED, first:\n'
      run_or_print "${DELETE[@]}"
    fi
    run_or_print "${CREATE[@]}"
    return
  fi
  local state
  state=$("${DESCRIBE[@]}" 2>/dev/null) || state=""
  case $state in
    "") run_or_print "${CREATE[@]}" ;;
    SUSPENDED | SUSPENDING | FAILED)
      [[ $RECREATE == 1 ]] ||
        fail "queued resource $NAME exists in state $state (preempted or failed); re-run with --recreate or run delete.sh first"
      run_or_print "${DELETE[@]}"
      run_or_print "${CREATE[@]}"
      ;;
    *) note "queued resource $NAME already exists (state $state); not creating it again" ;;
  esac
}

wait_active() {
  if [[ $DRY_RUN == 1 ]]; then
    run_or_print "${DESCRIBE[@]}"
    printf '# polled every %ss until ACTIVE, for at most %ss\n' "$POLL_INTERVAL" "$WAIT_TIMEOUT"
    return
  fi
  local waited=0 state
  while true; do
    state=$("${DESCRIBE[@]}") || fail "could not describe queued resource $NAME"
    case $state in
      ACTIVE)
        note "queued resource $NAME is ACTIVE"
        return
        ;;
      FAILED | SUSPENDING | SUSPENDED)
        fail "queued resource $NAME is $state; see: gcloud compute tpus queued-resources describe $NAME --zone=$ZONE"
        ;;
    esac
    if ((waited >= WAIT_TIMEOUT)); then
      fail "queued resource $NAME is still ${state:-UNKNOWN} after ${WAIT_TIMEOUT}s; check again later (create.sh --wait) or delete it (delete.sh)"
    fi
    note "queued resource $NAME: ${state:-UNKNOWN} (${waited}s)"
    sleep "$POLL_INTERVAL"
    waited=$((waited + POLL_INTERVAL))
  done
}

if [[ $DRY_RUN == 1 ]]; then
  # What real mode runs first, to decide between create / leave alone / --recreate.
  run_or_print "${DESCRIBE[@]}"
fi
create
if [[ $WAIT == 1 ]]; then
  wait_active
fi
