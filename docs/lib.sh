# shellcheck shell=bash
# Helpers shared by the study scripts (docs/reproduce.sh, sweep_default.sh, steer_on_stl.sh, capability_default.sh),
# which source this file and set PY (the Python to run), LOG (their command log) and RESULTS (where result files
# are copied).

run() {  # COMMAND...: log it, run it, log its wall time
  echo "[$(date +%T)] $*" | tee -a "$LOG"
  local start=$SECONDS
  "$@"
  echo "[$(date +%T)] finished in $((SECONDS - start)) s" | tee -a "$LOG"
}

collect_sweep() {  # SWEEP_DIR: copy sweep.json/.md and every finished point's result files to $RESULTS/<name>/
  local dest point
  dest=$RESULTS/$(basename "$1")
  mkdir -p "$dest"
  cp "$1/sweep.json" "$1/sweep.md" "$dest/"
  for point in "$1"/*/; do
    if [[ -f "$point/report.json" ]]; then
      $PY docs/collect_run.py "$point" "$dest/$(basename "$point")" >/dev/null
    fi
  done
  cp "$LOG" "$RESULTS/"
}

best() {  # SWEEP_JSON KEY: the best-ranked point's value of KEY
  $PY -c 'import json, sys; print(json.load(open(sys.argv[1]))["points"][0]["overrides"][sys.argv[2]])' "$1" "$2"
}

best_dir() {  # SWEEP_JSON: the best-ranked point's workdir
  $PY -c 'import json, sys; print(json.load(open(sys.argv[1]))["points"][0]["workdir"])' "$1"
}
