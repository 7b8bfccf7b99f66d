#!/usr/bin/env bash
# General-capability scores of the default run's DCR model and its STL baseline (the paper's MMLU, ARC-Easy,
# ARC-Challenge, OpenBookQA, PIQA; lm-evaluation-harness conventions; a seeded subsample of N questions per task),
# added to the runs' reports and copied to docs/results/default-gemma/ for docs/render_results.py.
#
#   bash docs/capability_default.sh [RUN_DIR] [N]      (default runs/default, 100; re-running resumes)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/default}
N=${2:-100}
PY=${PY:-.venv/bin/python}
TASKS=${TASKS:-mmlu,arc_easy,arc_challenge,openbookqa,piqa}
LOG=$RUN/capability_commands.log
for DIR in "$RUN" "$RUN/baseline-stl"; do
  if [[ ! -f "$DIR/report.json" ]]; then
    echo "error: $DIR/report.json not found; run the default job first (make run, or with --workdir=$RUN)" >&2
    exit 2
  fi
done
# shellcheck source=docs/lib.sh
source docs/lib.sh
for DIR in "$RUN" "$RUN/baseline-stl"; do
  run $PY -m dcr_jax.main --config=configs/gemma.py --workdir="$DIR" --config.stages=evaluate --config.baseline= \
    --config.evaluate.capability="$TASKS" --config.evaluate.capability_n="$N"
done
$PY docs/collect_run.py "$RUN" docs/results/default-gemma --log "$LOG"
$PY docs/render_results.py
