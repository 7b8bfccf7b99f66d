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

# SWEEP_DIR: put each evaluated point committed under $RESULTS/<name>/ back into SWEEP_DIR (no checkpoints), so that a
# study resumed on a machine without runs/ does not run it again; and its sweep.json, so that the resumed sweep adds
# to the recorded invocations.
restore_sweep() {
  local point record
  record=$RESULTS/$(basename "$1")/sweep.json
  if [[ -f $record && ! -f $1/sweep.json ]]; then
    mkdir -p "$1" && cp "$record" "$1/sweep.json"
  fi
  for point in "$RESULTS/$(basename "$1")"/*/; do
    [[ -d $point ]] && $PY docs/collect_run.py --restore "$point" "$1/$(basename "$point")" >/dev/null
  done
  return 0
}

finished() {  # RUN_DIR [KEY]: whether RUN_DIR's report.json shows an evaluation (and KEY, e.g. capability)
  $PY -c 'import json, sys
r = json.load(open(sys.argv[1])) if __import__("os").path.isfile(sys.argv[1]) else {}
sys.exit(0 if "eval_summary" in r and all(k in r for k in sys.argv[2:]) else 1)' "$1/report.json" "${@:2}"
}

ensure_checkpoints() {  # RUN_DIR TRAINING_STAGES MAIN_ARGS...: a run restored without checkpoints is trained again
  # in RUN_DIR.retrain (the same config and seed), its final validation checked against the committed run's, and
  # its checkpoints moved into RUN_DIR
  local dir=$1 stages=$2
  [[ -d $dir/checkpoints ]] && return 0
  run $PY -m dcr_jax.main --workdir="$dir.retrain" "${@:3}" --config.stages="$stages"
  $PY -c 'import json, sys
def last_val(path):
  rows = [json.loads(line) for line in open(path)]
  return {k: v for r in rows if "val_refusal_prob_toxic" in r for k, v in r.items() if k.startswith("val_")}
old, new = last_val(sys.argv[1]), last_val(sys.argv[2])
if not old or any(abs(old[k] - new.get(k, float("inf"))) > 1e-5 for k in old):
  sys.exit(f"error: retraining {sys.argv[2]} gave validation {new}, not the committed {old}; its checkpoints are "
           "not those of the evaluated model (a different machine or library version?)")
print(f"retrained: final validation matches the committed run ({old})")' "$dir/metrics.jsonl" \
    "$dir.retrain/metrics.jsonl" | tee -a "$LOG"
  mv "$dir.retrain/checkpoints" "$dir/checkpoints"
}
