#!/usr/bin/env bash
# The reproduction study of docs/reproduction.md (configs/study.py), end to end; every step resumes, so it can be
# run in several sittings (measured on 2 CPU cores: 3.9 h for gemma-3-270m, in three sittings with two retrains,
# and 2.2 h for SmolLM2-135M in one; resumed later on a fresh machine, retraining the three seed-0 models of each
# for export took another 0.6 h and 0.5 h; the "Wall time" tables of docs/reproduction.md).
#
#   bash docs/reproduce.sh [OUT_DIR]        (default runs/study; MODELS="gemma3-270m smollm2-135m" by default)
#
# Per model, in OUT_DIR/<model>/, each choice made on the validation split alone (the largest validation margin,
# val_refusal_prob_toxic - val_refusal_prob_seemingly_toxic at the last save; nothing evaluated is ranked by):
#   1. stl-sweep   STL (stage 2 alone), seed 0, at safety weights 0.1, 0.25, 0.5 (shares 0.09, 0.2, 0.33)
#   2. dcr-sweep   DCR, seed 0, at those weights x stage-1 lengths of 10 and 30 contrastive steps
#   3. stl-seeds, dcr-seeds   each method's chosen setting again at seeds 1 and 2
#   4. stl-aug     STL-aug at STL's chosen weight, seed 0
#   5. steer/<method>   the four training-free steering baselines on the chosen STL model (seed 0)
#   6. general capability (100 seeded questions per task) of the chosen seed-0 STL, STL-aug and DCR models
#   7. export/<method>  those models as Hugging Face directories (not committed)
# Each finished step's result files are copied to docs/results/study/<model>/ (docs/collect_run.py), with
# commands.log (every command and its wall time); docs/render_study.py renders docs/reproduction.md's tables from them.
# On a machine without OUT_DIR, every run committed there as evaluated is put back (docs/collect_run.py --restore)
# and not run again; a restored run whose checkpoints a later step needs (steering, capability, export) is trained
# again with its seed and checked to reach the committed run's validation figures.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/study}
PY=${PY:-.venv/bin/python}
read -r -a MODELS <<<"${MODELS:-gemma3-270m smollm2-135m}"
WEIGHTS=0.5,0.25,0.1  # the largest first: the points nearest a useful Safety finish first
REFINE_STEPS=10,30
STEER_METHODS=(refusal_direction surgical scans self_cd)
CAPABILITY=mmlu,arc_easy,arc_challenge,openbookqa,piqa

# shellcheck source=docs/lib.sh
source docs/lib.sh

for MODEL in "${MODELS[@]}"; do
  D=$OUT/$MODEL
  RESULTS=docs/results/study/$MODEL
  LOG=$D/commands.log
  mkdir -p "$D" "$RESULTS"
  if [[ ! -f $LOG && -f $RESULTS/commands.log ]]; then  # resumed without runs/: the committed log goes on
    cp "$RESULTS/commands.log" "$LOG"
    echo "[$(date +%T)] (resumed on a machine without $D: evaluated runs restored from $RESULTS, not run again)" >>"$LOG"
  fi
  case $MODEL in
    gemma3-270m) LAYERS=3,6,9,12 ;;  # steering candidates: every third layer below the last 20%, four of them
    smollm2-135m) LAYERS=5,10,15,20 ;;
    *) echo "error: MODELS names $MODEL; choose gemma3-270m and/or smollm2-135m" >&2; exit 2 ;;
  esac
  STUDY=configs/study.py:$MODEL

  # 1-2. The sweeps.
  restore_sweep "$D/stl-sweep"
  run $PY -m dcr_jax.sweep --config="$STUDY/stl" --workdir="$D/stl-sweep" --grid=align.safety_weight=$WEIGHTS --seeds=0
  collect_sweep "$D/stl-sweep"
  W=$(best "$D/stl-sweep/sweep.json" align.safety_weight)
  echo "$MODEL: STL's chosen align.safety_weight: $W" | tee -a "$LOG"
  restore_sweep "$D/dcr-sweep"
  run $PY -m dcr_jax.sweep --config="$STUDY/dcr" --workdir="$D/dcr-sweep" --grid=align.safety_weight=$WEIGHTS \
    --grid=refine.steps=$REFINE_STEPS --seeds=0
  collect_sweep "$D/dcr-sweep"
  DW=$(best "$D/dcr-sweep/sweep.json" align.safety_weight)
  DS=$(best "$D/dcr-sweep/sweep.json" refine.steps)
  echo "$MODEL: DCR's chosen align.safety_weight: $DW, refine.steps: $DS" | tee -a "$LOG"

  # 3. More seeds at the chosen settings.
  restore_sweep "$D/stl-seeds"
  restore_sweep "$D/dcr-seeds"
  run $PY -m dcr_jax.sweep --config="$STUDY/stl" --workdir="$D/stl-seeds" --grid=align.safety_weight="$W" --seeds=1,2
  collect_sweep "$D/stl-seeds"
  run $PY -m dcr_jax.sweep --config="$STUDY/dcr" --workdir="$D/dcr-seeds" --grid=align.safety_weight="$DW" \
    --grid=refine.steps="$DS" --seeds=1,2
  collect_sweep "$D/dcr-seeds"

  # 4. STL-aug.
  $PY docs/collect_run.py --restore "$RESULTS/stl-aug" "$D/stl-aug" >/dev/null
  if ! finished "$D/stl-aug"; then
    run $PY -m dcr_jax.main --config="$STUDY/stl-aug" --workdir="$D/stl-aug" --config.align.safety_weight="$W"
    $PY docs/collect_run.py "$D/stl-aug" "$RESULTS/stl-aug" >/dev/null
  fi

  # 5. Steering on the chosen STL model: each method in a copy of its workdir.
  STL=$(best_dir "$D/stl-sweep/sweep.json")
  for METHOD in "${STEER_METHODS[@]}"; do
    S=$D/steer/$METHOD
    $PY docs/collect_run.py --restore "$RESULTS/steer/$METHOD" "$S" >/dev/null
    finished "$S" && continue
    ensure_checkpoints "$STL" align --config="$STUDY/stl" --config.align.safety_weight="$W" --config.seed=0
    if [[ ! -d "$S/checkpoints" ]]; then
      mkdir -p "$S"
      cp "$STL/config.json" "$S/"
      cp -r "$STL/checkpoints" "$S/"
    fi
    run $PY -m dcr_jax.main --config="$STUDY/stl" --workdir="$S" --config.align.safety_weight="$W" \
      --config.stages=steer,evaluate --config.steer.method="$METHOD" --config.steer.layers=$LAYERS
    $PY docs/collect_run.py "$S" "$RESULTS/steer/$METHOD" >/dev/null
  done
  cp "$LOG" "$RESULTS/"

  # 6-7. Capability and export of the chosen seed-0 models.
  DCR=$(best_dir "$D/dcr-sweep/sweep.json")
  for PAIR in "stl:$STL:$W" "stl-aug:$D/stl-aug:$W" "dcr:$DCR:$DW"; do
    IFS=: read -r METHOD DIR WEIGHT <<<"$PAIR"
    ARGS=(--config="$STUDY/$METHOD" --config.align.safety_weight="$WEIGHT" --config.seed=0)
    TRAINING=align
    [[ $METHOD == dcr ]] && ARGS+=(--config.refine.steps="$DS") && TRAINING=refine,align
    if ! finished "$DIR" capability; then
      ensure_checkpoints "$DIR" $TRAINING "${ARGS[@]}"
      run $PY -m dcr_jax.main --workdir="$DIR" "${ARGS[@]}" --config.stages=evaluate \
        --config.evaluate.capability=$CAPABILITY
      case $METHOD in
        stl-aug) $PY docs/collect_run.py "$DIR" "$RESULTS/stl-aug" >/dev/null ;;
        *) $PY docs/collect_run.py "$DIR" "$RESULTS/$METHOD-sweep/$(basename "$DIR")" >/dev/null ;;
      esac
    fi
    if [[ ! -f "$D/export/$METHOD/config.json" ]]; then
      ensure_checkpoints "$DIR" $TRAINING "${ARGS[@]}"
      run $PY -m dcr_jax.export --workdir="$DIR" --out="$D/export/$METHOD" --format=hf --overwrite
    fi
  done
  cp "$LOG" "$RESULTS/"
done
$PY docs/render_study.py
