"""Entry point: python -m dcr_jax.main --config=configs/gemma.py[:VARIANT] --workdir=DIR [--config.KEY=VALUE ...]."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from dcr_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pipeline config file (e.g. configs/gemma.py:gemma3-270m).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config, checkpoints, eval, report. A re-run resumes.")


def run(config, workdir: Path) -> dict:
  """Runs config.stages in order and returns the report."""
  from dcr_jax import config as config_lib
  from dcr_jax import pipeline

  stages = config_lib.validate(config)
  model, tokenizer = pipeline.build_model(config)
  pipeline.prepare_workdir(workdir, config)
  ctx = pipeline.Context(config=config, workdir=workdir, model=model, tokenizer=tokenizer)
  report = pipeline.update_report(workdir, "model", None, {"name": config.model.name,
                                                          "weights": "random-init" if config.model.random_init else (config.model.weights or "embedded"),
                                                          "params": _count_params(model)})
  for stage in stages:
    started = time.time()
    summary = _STAGE_RUNNERS[stage]()(ctx)
    summary.setdefault("seconds", round(time.time() - started, 2))
    report = pipeline.update_report(workdir, "stages", stage, summary)
  return report


def _count_params(model) -> int:
  import jax
  from flax import nnx

  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def _demo():
  from dcr_jax.demo import run_demo
  return run_demo


_STAGE_RUNNERS = {"demo": _demo}


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keep backend-probing INFO lines off the terminal
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None or not _WORKDIR.value:
    print("error: both --config=FILE[:VARIANT] and --workdir=DIR are required", file=sys.stderr)
    sys.exit(2)
  try:
    report = run(_CONFIG.value, Path(_WORKDIR.value))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"done: {Path(_WORKDIR.value) / 'report.json'} ({', '.join(report.get('stages', {}))})")


if __name__ == "__main__":
  app.run(main)
