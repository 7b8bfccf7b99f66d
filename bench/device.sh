#!/usr/bin/env bash
# The accelerator benchmark as one prepared run (at most 8 minutes): bf16 stage-2 MFU at the 1.5B and 1B sizes,
# stage-1 at l = L/2 vs L, generation against transformers on the same device, and the gemma-3-270m-sized eNTK.
#
#   bench/device.sh [--smoke] [extra bench/device.py flags]
#
# Run it from anywhere on a machine whose python3 has jax (with its accelerator plugin), flax, optax and, for the
# generation peer, torch and transformers; dcr_jax itself is read from this checkout (no install needed). It writes
# bench/results/device.json, and a copy to $OUT when that is set (the device tool's output folder); render it with
# bench/results.py. --smoke shrinks every shape (a CPU check of the script).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"  # torch shares the device

status=0
timeout 470 "${PY}" bench/device.py "$@" || status=$?
if [[ -n "${OUT:-}" ]]; then
  cp bench/results/device*.json "${OUT}/" 2>/dev/null || true
fi
exit "${status}"
