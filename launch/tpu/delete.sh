#!/usr/bin/env bash
# Delete a queued resource and its TPU node(s).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu/delete.sh --name=NAME --zone=ZONE [options]

Deletes the queued resource NAME and, with --force, the TPU node(s) it holds:
  gcloud compute tpus queued-resources delete NAME --zone=ZONE [--project=PROJECT] --force [--async] [--quiet]
The workdir (gs://...) is not touched. Billing for the TPU stops once the node is gone.

Flags (environment variable defaults in brackets):
  --name=NAME          queued resource name [DCR_TPU_NAME] (required)
  --zone=ZONE          [DCR_ZONE] (required)
  --project=PROJECT    omitted = gcloud's configured project [DCR_PROJECT]
  --async              return without waiting for the deletion to finish
  --yes                do not ask for confirmation (passes --quiet to gcloud) [DCR_YES=1]
  --dry-run            print the gcloud command instead of running it [DCR_DRY_RUN=1]
  -h, --help           this help

Example:
  launch/tpu/delete.sh --name=dcr-v5e --zone=us-west4-a --yes
EOF
}

NAME=${DCR_TPU_NAME:-}
ZONE=${DCR_ZONE:-}
PROJECT=${DCR_PROJECT:-}
ASYNC=0
YES=${DCR_YES:-0}

while (($#)); do
  SHIFT=1
  case $1 in
    --name | --name=*) take_value "$@" && NAME=$VALUE ;;
    --zone | --zone=*) take_value "$@" && ZONE=$VALUE ;;
    --project | --project=*) take_value "$@" && PROJECT=$VALUE ;;
    --async) ASYNC=1 ;;
    --yes) YES=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage && exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift "$SHIFT"
done

require "$NAME" --name DCR_TPU_NAME
check_name "$NAME"
require "$ZONE" --zone DCR_ZONE
location_flags

DELETE=(gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force)
if [[ $ASYNC == 1 ]]; then DELETE+=(--async); fi
if [[ $YES == 1 ]]; then DELETE+=(--quiet); fi
run_or_print "${DELETE[@]}"
