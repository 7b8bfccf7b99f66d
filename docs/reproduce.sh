#!/usr/bin/env bash
# The CPU-scale reproduction of docs/reproduction.md, end to end (about 2 h on 2 CPU cores).
# Usage: bash docs/reproduce.sh [OUT_DIR]   (default runs/repro; re-running resumes every step)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/repro}
PY=${PY:-.venv/bin/python}
CONFIG=configs/repro_cpu.py
mkdir -p "$OUT"
run() { echo "[$(date +%T)] $*" | tee -a "$OUT/commands.log"; "$@"; }

# 1. Choose the stage-2 learning rate on the validation split: STL (stage 2 only) at each candidate; the winner has
#    the largest margin val_refusal_prob_toxic - val_refusal_prob_seemingly_toxic at the last step.
for LR in 1e-4 3e-4; do
  run $PY -m dcr_jax.main --config=$CONFIG:stl --workdir="$OUT/stl-lr$LR" --config.stages=align \
    --config.align.lr="$LR"
done
LR=$($PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
best = None
for lr in ("1e-4", "3e-4"):
  rows = [json.loads(l) for l in (Path(sys.argv[1]) / f"stl-lr{lr}" / "metrics.jsonl").read_text().splitlines()]
  last = [r for r in rows if r["stage"] == "align" and "val_refusal_prob_toxic" in r][-1]
  margin = last["val_refusal_prob_toxic"] - last["val_refusal_prob_seemingly_toxic"]
  print(f"lr {lr}: step {last['step']} val toxic {last['val_refusal_prob_toxic']:.4f} "
        f"seemingly {last['val_refusal_prob_seemingly_toxic']:.4f} margin {margin:.4f}", file=sys.stderr)
  best = max(best or (margin, lr), (margin, lr))
print(best[1])
PYEOF
)
echo "chosen stage-2 lr: $LR" | tee -a "$OUT/commands.log"

# 2. The three runs with that learning rate (STL reuses its validation run's training; evaluate is added).
run $PY -m dcr_jax.main --config=$CONFIG:stl --workdir="$OUT/stl-lr$LR" --config.stages=align,evaluate \
  --config.align.lr="$LR"
ln -sfn "stl-lr$LR" "$OUT/stl"
run $PY -m dcr_jax.main --config=$CONFIG:dcr --workdir="$OUT/dcr" --config.align.lr="$LR"
run $PY -m dcr_jax.main --config=$CONFIG:stl-aug --workdir="$OUT/stl-aug" --config.align.lr="$LR"

# 3. Kernel similarity and refusal probability over checkpoints (base, after stage 1, stage-2 checkpoints).
run $PY -m dcr_jax.kernels --config=$CONFIG:stl --workdir="$OUT/stl" --config.align.lr="$LR"
run $PY -m dcr_jax.kernels --config=$CONFIG:dcr --workdir="$OUT/dcr" --config.align.lr="$LR" --compare="$OUT/stl"

# 4. Table 1 layout and the bar chart.
run $PY -m dcr_jax.report "$OUT/stl" "$OUT/stl-aug" "$OUT/dcr" --out "$OUT/table.md" --png "$OUT/table.png"
