#!/usr/bin/env bash
# Planner figures for launch/README.md: each model family's paper-sized variant on a v5e-8 (8 chips, one host) and a
# v5p-32 (16 chips, 4 hosts), with the variant's own config (bf16, remat, scan, FSDP over every chip). Writes
# launch/plans/<variant>__<slice>[__accum<N>].json; `python launch/plans.py` renders them as the README's table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
run() {  # config variant slice devices [grad_accum]
  local accum=${5:-1} suffix="" stages="refine,align"
  if [[ $accum -gt 1 ]]; then suffix="__accum$accum" stages="align"; fi
  "$PY" -m dcr_jax.plan --config="configs/$1.py:$2" --devices="$4" --config.align.grad_accum="$accum" \
    --config.stages="$stages" --out="launch/plans/$2__$3$suffix.json" >/dev/null
}
for variant in qwen2.5-1.5b qwen2.5-7b; do
  run qwen "$variant" v5e-8 8
  run qwen "$variant" v5p-32 16
done
run llama llama3.1-8b v5e-8 8
run llama llama3.1-8b v5p-32 16
# stage 2 of the 7-8B models does not fit a v5e chip at batch 128 x 512 in one pass: 4 microbatches
run qwen qwen2.5-7b v5e-8 8 4
run llama llama3.1-8b v5e-8 8 4
