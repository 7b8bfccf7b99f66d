"""What bfloat16 decode weights change in an evaluation: refusal verdicts and texts on the built-in suites.

Evaluates the embedded model (or, with --workdir, the last trained checkpoint of a finished run: a model that refuses,
e.g. the default run's STL baseline DIR/baseline-stl) on demo-over-refusal and demo-harmful twice through the evaluate
stage, once with float32 weights and once with `evaluate.decode_weights=bfloat16`, and writes per suite: rows, identical
generations, identical refusal verdicts, and each side's refusal rate, to bench/results/decode_verdicts.json.

    .venv/bin/python bench/decode_verdicts.py [--model gemma3-270m] [--workdir DIR] [--n 0] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_average, machine_info, write_json  # noqa: E402

SUITES = ("demo-over-refusal", "demo-harmful")


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="gemma3-270m")
  p.add_argument("--workdir", default=None, help="a finished run whose last trained checkpoint is evaluated")
  p.add_argument("--n", type=int, default=0, help="prompts per suite (0 = all)")
  p.add_argument("--max-new-tokens", type=int, default=48)
  p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "decode_verdicts.json"))
  args = p.parse_args(argv)

  from dcr_jax.config import base_config
  from dcr_jax.evaluate import stage
  from dcr_jax.pipeline import build_model, restore_trained
  from dcr_jax.spec import resolve

  started = time.perf_counter()
  config = base_config()
  config.model.name = args.model
  config.evaluate.suites, config.evaluate.n = ",".join(SUITES), args.n
  config.evaluate.max_new_tokens = args.max_new_tokens
  config.evaluate.refusal_prob = False  # teacher-forced, float32 either way: not what this compares
  model, tokenizer = build_model(resolve(config))
  model_id = args.model
  if args.workdir:
    from dcr_jax import checkpoints
    from dcr_jax.workdir_io import check_workdir

    workdir = check_workdir(args.workdir)
    last = checkpoints.last_trained(workdir)
    if last is None:
      raise SystemExit(f"error: --workdir {args.workdir} holds no trained checkpoint; give a finished run")
    trained = json.loads((workdir / "config.json").read_text())
    for key in ("model", "refine", "align"):  # the architecture and the LoRA layout of the checkpoint
      config[key].update(trained[key])
    model = restore_trained(resolve(config).bind(model.config), model, workdir)
    model_id = f"{args.model}:{last[0]}-{last[1]}"
  rows, seconds = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for weights in ("float32", "bfloat16"):
      config.evaluate.decode_weights = weights
      spec = resolve(config)
      data = stage.load_data(spec)
      t0 = time.perf_counter()
      rows[weights] = {name: stage.evaluate_suite(spec, model, tokenizer, Path(tmp) / weights, name, records,
                                                  data.judge, model_id=model_id)
                       for name, records in data.suites.items()}
      seconds[weights] = time.perf_counter() - t0
  suites = {}
  for name in SUITES:
    full = {r["prompt"]: r for r in rows["float32"][name]}
    half = {r["prompt"]: r for r in rows["bfloat16"][name]}
    suites[name] = {"rows": len(full),
                    "identical_generations": sum(full[q]["generation"] == half[q]["generation"] for q in full),
                    "identical_verdicts": sum(full[q]["refused"] == half[q]["refused"] for q in full),
                    "refusal_rate_float32": sum(r["refused"] for r in full.values()) / len(full),
                    "refusal_rate_bfloat16": sum(r["refused"] for r in half.values()) / len(half)}
    print(f"{name}: {suites[name]}")
  report = {"bench": "decode_verdicts", "config": vars(args), "model_id": model_id, "machine": machine_info(),
            "load_average_end": load_average(), "suites": suites, "seconds": seconds,
            "bf16_over_float32_time": seconds["bfloat16"] / seconds["float32"],
            "total_s": time.perf_counter() - started}
  print(f"wrote {write_json(args.out, report)}")
  return report


if __name__ == "__main__":
  main()
