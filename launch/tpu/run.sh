#!/usr/bin/env bash
# Run the dcr_jax pipeline on every worker of a TPU VM or pod slice and gather each worker's log.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu/run.sh --name=NAME --zone=ZONE --config=FILE:VARIANT --workdir=DIR [options] [-- ARGS...]

Runs, on every worker at once (gcloud compute tpus tpu-vm ssh NAME --worker=all), in the install directory:
  .venv/bin/python -m dcr_jax.main --config=FILE:VARIANT --workdir=DIR ARGS... 2>&1 | tee logs/RUN_ID/worker-<i>.log
then copies each worker's log back (gcloud compute tpus tpu-vm scp --worker=<i>, i = 0..N-1) into
LOGS_DIR/RUN_ID/. Its exit status is the run's. Re-running the same command with the same --workdir resumes from
the last checkpoint there (the recovery after a spot preemption: see launch/README.md).

Flags (environment variable defaults in brackets):
  --name=NAME              TPU node name [DCR_TPU_NAME] (required)
  --zone=ZONE              [DCR_ZONE] (required)
  --project=PROJECT        omitted = gcloud's configured project [DCR_PROJECT]
  --config=FILE[:VARIANT]  e.g. configs/gemma.py:gemma-2b, relative to the install directory [DCR_CONFIG] (required)
  --workdir=DIR            run directory: a gs:// path (needed on multi-host slices and to survive preemption)
                           [DCR_WORKDIR] (required)
  --remote-dir=DIR         install directory on the workers, relative to home (default dcr_jax) [DCR_REMOTE_DIR]
  --run-id=ID              names the log folder (default: UTC time, e.g. 20250101-120000) [DCR_RUN_ID]
  --workers=N              workers to copy logs from; default: counted with `gcloud compute tpus tpu-vm describe`
                           [DCR_WORKERS]
  --logs-dir=DIR           local log folder (default launch/logs/NAME) [DCR_LOGS_DIR]
  --env=KEY=VALUE          an environment variable for the run on every worker; repeatable
  --detach                 start the run in the background on every worker (it survives a dropped ssh session)
                           and return; fetch the logs later with --logs-only and the same --run-id
  --logs-only              only copy the logs of --run-id back
  --stop                   stop a dcr_jax run still going on the workers (after a dropped ssh session or
                           --detach), before starting another one on the same TPU
  --dry-run                print the commands instead of running them [DCR_DRY_RUN=1]
  -h, --help               this help
  -- ARGS...               more arguments for dcr_jax.main, e.g. --config.mesh.fsdp=8 --config.align.batch_size=32

Example:
  launch/tpu/run.sh --name=dcr-v5e --zone=us-west4-a --config=configs/gemma.py:gemma-2b \
    --workdir=gs://my-bucket/dcr/gemma-2b -- --config.model.weights=models/gemma-2b --config.mesh.fsdp=8
EOF
}

NAME=${DCR_TPU_NAME:-}
ZONE=${DCR_ZONE:-}
PROJECT=${DCR_PROJECT:-}
CONFIG=${DCR_CONFIG:-}
WORKDIR=${DCR_WORKDIR:-}
REMOTE_DIR=${DCR_REMOTE_DIR:-dcr_jax}
RUN_ID=${DCR_RUN_ID:-}
WORKERS=${DCR_WORKERS:-}
LOGS_DIR=${DCR_LOGS_DIR:-}
ENV_VARS=(PYTHONUNBUFFERED=1)
DETACH=0
LOGS_ONLY=0
STOP=0
PY_ARGS=()

while (($#)); do
  SHIFT=1
  case $1 in
    --name | --name=*) take_value "$@" && NAME=$VALUE ;;
    --zone | --zone=*) take_value "$@" && ZONE=$VALUE ;;
    --project | --project=*) take_value "$@" && PROJECT=$VALUE ;;
    --config | --config=*) take_value "$@" && CONFIG=$VALUE ;;
    --workdir | --workdir=*) take_value "$@" && WORKDIR=$VALUE ;;
    --remote-dir | --remote-dir=*) take_value "$@" && REMOTE_DIR=$VALUE ;;
    --run-id | --run-id=*) take_value "$@" && RUN_ID=$VALUE ;;
    --workers | --workers=*) take_value "$@" && WORKERS=$VALUE ;;
    --logs-dir | --logs-dir=*) take_value "$@" && LOGS_DIR=$VALUE ;;
    --env | --env=*)
      take_value "$@"
      [[ $VALUE =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env=$VALUE must be KEY=VALUE"
      ENV_VARS+=("$VALUE")
      ;;
    --detach) DETACH=1 ;;
    --logs-only) LOGS_ONLY=1 ;;
    --stop) STOP=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage && exit 0 ;;
    --) shift && PY_ARGS=("$@") && break ;;
    *) die "unknown argument $1 (see --help; arguments for dcr_jax.main go after --)" ;;
  esac
  shift "$SHIFT"
done

require "$NAME" --name DCR_TPU_NAME
check_name "$NAME"
require "$ZONE" --zone DCR_ZONE
[[ -n $REMOTE_DIR && $REMOTE_DIR != /* && $REMOTE_DIR != *..* ]] ||
  die "--remote-dir=$REMOTE_DIR must be a path relative to the workers' home directory"
if ((DETACH + LOGS_ONLY + STOP > 1)); then
  die "--detach, --logs-only and --stop exclude each other"
fi
if [[ $LOGS_ONLY == 1 ]]; then
  require "$RUN_ID" --run-id DCR_RUN_ID
elif [[ $STOP != 1 ]]; then
  require "$CONFIG" --config DCR_CONFIG
  require "$WORKDIR" --workdir DCR_WORKDIR
  if [[ $WORKDIR != gs://* ]]; then
    note "note: --workdir=$WORKDIR is not a gs:// path: on a multi-host slice every worker must write the same" \
      "directory, and a preempted spot VM loses its disk (see launch/README.md)"
  fi
fi
if [[ -n $WORKERS ]]; then
  check_int "$WORKERS" --workers
  ((WORKERS > 0)) || die "--workers must be at least 1"
fi
RUN_ID=${RUN_ID:-$(date -u +%Y%m%d-%H%M%S)}
[[ $RUN_ID =~ ^[A-Za-z0-9._-]+$ ]] || die "--run-id=$RUN_ID may hold only letters, digits, '.', '_' and '-'"
LOGS_DIR=${LOGS_DIR:-$LAUNCH_ROOT/logs/$NAME}
location_flags

REMOTE_LOGS=$REMOTE_DIR/logs/$RUN_ID

run_command() {
  # The command line every worker runs; worker <i> is the TPU metadata's agent-worker-number (hostname if absent).
  local dir log main
  dir=$(remote_quote "$REMOTE_DIR")
  log="logs/$RUN_ID/worker-\$w.log"
  main="$(join_words remote_quote "${ENV_VARS[@]}") .venv/bin/python -m dcr_jax.main"
  main+=" $(join_words remote_quote "--config=$CONFIG" "--workdir=$WORKDIR" ${PY_ARGS[@]+"${PY_ARGS[@]}"})"
  printf '%s' "cd $dir && mkdir -p logs/$RUN_ID"
  printf '%s' " && w=\$(curl -sf -H \"Metadata-Flavor: Google\" http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)"
  if [[ $DETACH == 1 ]]; then
    printf '%s' " && (nohup setsid env $main > $log 2>&1 < /dev/null &)"
    printf '%s' " && echo \"worker \$w: started, log ~/$REMOTE_DIR/$log\""
  else
    printf '%s' " && set -o pipefail && env $main 2>&1 | tee $log"
  fi
}

copy_logs() {
  # Each worker's logs/RUN_ID/* into LOGS_DIR/RUN_ID/; best effort (a preempted worker has no disk to copy from).
  local dest=$LOGS_DIR/$RUN_ID n=$WORKERS i
  run_or_print mkdir -p "$dest"
  if [[ -z $n ]]; then
    local count=(gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" "--flatten=networkEndpoints[]"
      "--format=value(networkEndpoints.ipAddress)")
    if [[ $DRY_RUN == 1 ]]; then
      run_or_print "${count[@]}"
      printf '# it prints one line per worker; then for each worker I = 0..N-1 (--workers=N lists them):\n'
      run_or_print gcloud compute tpus tpu-vm scp "$NAME:$REMOTE_LOGS/*" "$dest/" "--worker=I" "${LOCATION[@]}"
      return 0
    fi
    n=$("${count[@]}" | grep -c .) || n=0
    if ((n == 0)); then
      note "warning: could not count the workers of $NAME; copying from worker 0 only (pass --workers=N)"
      n=1
    fi
  fi
  for ((i = 0; i < n; i++)); do
    run_or_print gcloud compute tpus tpu-vm scp "$NAME:$REMOTE_LOGS/*" "$dest/" "--worker=$i" "${LOCATION[@]}" ||
      note "warning: no logs copied from worker $i"
  done
  if [[ $DRY_RUN != 1 ]]; then
    note "logs: $dest/"
  fi
}

if [[ $LOGS_ONLY == 1 ]]; then
  copy_logs
  exit 0
fi
if [[ $STOP == 1 ]]; then
  # The brackets keep pkill from matching the shell that runs this very command line.
  run_or_print gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${LOCATION[@]}" \
    "--command=pkill -u \"\$USER\" -f \"[.]venv/bin/python -m dcr_jax[.]main\" || true"
  exit 0
fi

status=0
run_or_print gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${LOCATION[@]}" "--command=$(run_command)" || status=$?
if [[ $DETACH == 1 ]]; then
  if [[ $DRY_RUN != 1 ]]; then
    note "started run $RUN_ID on every worker of $NAME; fetch its logs with:" \
      "$0 --name=$NAME --zone=$ZONE${PROJECT:+ --project=$PROJECT} --run-id=$RUN_ID --logs-only"
  fi
  exit "$status"
fi
copy_logs
if ((status != 0)); then
  note "error: the run failed on at least one worker (exit status $status); see the logs above"
fi
exit "$status"
