#!/usr/bin/env bash
# Run every benchmark row of bench/results.md in sequence on an idle machine (each writes
# bench/results/<name>.json), then render bench/results.md.
#
#   bench/run_all.sh [--only NAME[,NAME...]] [--skip-kernels-270m]
#
# Names: forward, train_step, generate, decode_verdicts, kernels, kernels_nt (needs the neural-tangents venv,
# $NT_PYTHON or .nt-venv/bin/python; bench/README.md), kernels_270m, load_memory, parity_270m, forward_smollm2,
# generate_smollm2 (a NAME_smollm2 row is bench/NAME.py --model smollm2-135m), capability_parity (~50 min; needs
# `pip install lm-eval`). Whole-pipeline runs (pipeline_*.json, bench/record_pipeline.py) and the accelerator run
# (bench/device.sh) are recorded separately, not rerun here.
# Python is .venv/bin/python unless $PYTHON is set. A failing bench does not stop the others; the script exits
# non-zero at the end and lists the failures. results.md is rendered from whatever JSON files exist.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-.venv/bin/python}"
ALL=(forward train_step generate decode_verdicts kernels kernels_nt kernels_270m load_memory parity_270m
     forward_smollm2 generate_smollm2 capability_parity)

usage() {
  sed -n '2,13s/^# \{0,1\}//p' "$0"
}

only=""
skip_270m=0
while (($# > 0)); do
  case "$1" in
    --only)
      [[ $# -ge 2 ]] || { echo "--only needs a value" >&2; exit 2; }
      only="$2"
      shift 2
      ;;
    --only=*)
      only="${1#--only=}"
      shift
      ;;
    --skip-kernels-270m)
      skip_270m=1
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      echo "unknown argument: $1" >&2
      usage >&2
      exit 2
      ;;
  esac
done

selected=()
if [[ -n "${only}" ]]; then
  IFS=',' read -r -a wanted <<< "${only}"
  for name in "${wanted[@]}"; do
    [[ -z "${name}" ]] && continue
    if [[ " ${ALL[*]} " != *" ${name} "* ]]; then
      echo "unknown bench '${name}' (expected one of: ${ALL[*]})" >&2
      exit 2
    fi
    selected+=("${name}")
  done
else
  selected=("${ALL[@]}")
fi

failures=()
for name in "${selected[@]}"; do
  if [[ "${name}" == kernels_270m && "${skip_270m}" -eq 1 ]]; then
    echo "=== ${name}: skipped (--skip-kernels-270m)"
    continue
  fi
  now=$(date '+%H:%M:%S')
  cmd=("bench/${name}.py")
  if [[ "${name}" == *_smollm2 ]]; then
    cmd=("bench/${name%_smollm2}.py" --model smollm2-135m --out "bench/results/${name}.json")
  fi
  echo "=== ${name}: ${cmd[*]} (started ${now})"
  start=${SECONDS}
  status=0
  "${PY}" "${cmd[@]}" || status=$?
  elapsed=$((SECONDS - start))
  if [[ "${status}" -eq 0 ]]; then
    echo "=== ${name}: done in ${elapsed} s"
  else
    echo "=== ${name}: FAILED (exit ${status}) after ${elapsed} s"
    failures+=("${name} (exit ${status})")
  fi
done

echo "=== results: bench/results.py"
if ! "${PY}" bench/results.py; then
  failures+=("results.py")
fi

if ((${#failures[@]} > 0)); then
  echo "failed: ${failures[*]}" >&2
  exit 1
fi
