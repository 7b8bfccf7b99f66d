#!/usr/bin/env bash
# The four training-free steering baselines on a model that refuses: each is selected on the run's validation split
# and evaluated on the held-out suites, applied to the STL baseline that the default gemma run trains
# (DIR/baseline-stl), so that they sit beside that run's DCR and STL rows on the same data.
#
#   bash docs/steer_on_stl.sh [RUN_DIR] [OUT_DIR] [METHOD...]
#
# RUN_DIR (default runs/default) is a finished `python -m dcr_jax.main --config=configs/gemma.py --workdir=RUN_DIR`.
# Each method runs in OUT_DIR/<method> (default runs/steer-on-stl), a copy of RUN_DIR/baseline-stl's config and
# checkpoints, and its result files (report, steer.json, evaluated rows and their settings, the command log) are
# copied to docs/results/steer-on-stl/<method>/. Candidate layers are every third below the last 20% (4 of the 14
# eligible on gemma-3-270m) to keep each selection within minutes on 2 CPU cores; set LAYERS="" for all of them.
# Re-running resumes (a finished selection and finished evaluation rows are reused).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/default}
OUT=${2:-runs/steer-on-stl}
shift $(($# > 2 ? 2 : $#))
METHODS=("$@")
((${#METHODS[@]})) || METHODS=(refusal_direction surgical scans self_cd)
PY=${PY:-.venv/bin/python}
LAYERS=${LAYERS-3,6,9,12}
RESULTS=docs/results/steer-on-stl
STL="$RUN/baseline-stl"
if [[ ! -d "$STL/checkpoints/align" ]]; then
  echo "error: $STL/checkpoints/align not found; run the default job first (make run, or with --workdir=$RUN)" >&2
  exit 2
fi
mkdir -p "$OUT" "$RESULTS"
LOG=$OUT/commands.log
# shellcheck source=docs/lib.sh
source docs/lib.sh

for METHOD in "${METHODS[@]}"; do
  DIR="$OUT/$METHOD"
  if [[ ! -d "$DIR/checkpoints" ]]; then
    mkdir -p "$DIR"
    cp "$STL/config.json" "$DIR/"
    cp -r "$STL/checkpoints" "$DIR/"
  fi
  run $PY -m dcr_jax.main --config=configs/gemma.py --workdir="$DIR" --config.stages=steer,evaluate \
    --config.baseline= --config.steer.method="$METHOD" --config.steer.layers="$LAYERS"
  $PY docs/collect_run.py "$DIR" "$RESULTS/$METHOD"
done
cp "$LOG" "$RESULTS/commands.log"
