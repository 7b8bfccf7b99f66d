"""Entry point: python -m dcr_jax.main --config=configs/gemma.py[:VARIANT] --workdir=DIR [--config.KEY=VALUE ...]."""

from __future__ import annotations

import sys
import time

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from dcr_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pipeline config file (e.g. configs/gemma.py:gemma3-270m).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://bucket/run): config, checkpoints, "
                                "eval, report. A re-run resumes.")


def run(config, workdir: epath.Path) -> dict:
  """Runs config.stages in order and returns the report. Everything that can fail on bad input is checked before
  the workdir is touched."""
  from dcr_jax import config as config_lib
  from dcr_jax import parallel, pipeline
  from dcr_jax.train.loop import MetricsWriter

  stages = config_lib.validate(config)
  parallel.initialize(config.distributed)
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  config_lib.check_batches(config, stages, mesh)
  model, tokenizer = pipeline.build_model(config, mesh)
  if config.mesh.constrain_activations:
    model.constrain_activations = parallel.activation_constraint(mesh)
  prepared = {stage: _STAGES[stage][0]()(config, tokenizer, model.config) for stage in stages}
  pipeline.prepare_workdir(workdir, config)
  ctx = pipeline.Context(config=config, workdir=workdir, model=model, tokenizer=tokenizer, mesh=mesh,
                         writer=MetricsWriter(workdir, enabled=pipeline.is_main_process()))
  weights = "random-init" if config.model.random_init else (config.model.weights or "embedded")
  report = pipeline.update_report(workdir, "model", None, {"name": config.model.name, "weights": weights,
                                                          "params": _count_params(model)})
  if not pipeline.training_stages(config.stages):
    _restore_trained(ctx)
  for stage in stages:
    started = time.time()
    summary = _STAGES[stage][1]()(ctx, prepared[stage])
    summary["seconds"] = round(time.time() - started, 2)
    summary = _add_earlier_invocations(report.get("stages", {}).get(stage), summary)
    report = pipeline.update_report(workdir, "stages", stage, summary)
  if pipeline.is_main_process():
    from dcr_jax.report import write_report_md
    write_report_md(workdir)
  return report


RESUMED_TOTALS = ("seconds", "train_seconds", "tokens")


def _add_earlier_invocations(earlier: dict | None, summary: dict) -> dict:
  """A stage that resumes work an earlier invocation had finished (a re-run of a finished stage, or evaluation with
  prompts already done) reports the totals over both: time and tokens add up instead of being overwritten."""
  resumed = summary.get("resumed_from", 0) > 0 or "resumed_from" not in summary  # evaluate always resumes
  if not earlier or not resumed:
    return summary
  return {**summary, **{k: round(earlier[k] + summary[k], 2) for k in RESUMED_TOTALS if k in earlier and k in summary}}


def _restore_trained(ctx) -> None:
  """Evaluation alone on a trained workdir: load what its training stages left (align, else refine)."""
  from dcr_jax.train import align, refine

  align.restore_aligned(ctx) or refine.restore_refined(ctx)


def _count_params(model) -> int:
  import jax
  from flax import nnx

  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def _refine():
  from dcr_jax.train import refine
  return refine.prepare_refine, refine.run_refine


def _align():
  from dcr_jax.train import align
  return align.prepare_align, align.run_align


def _evaluate():
  from dcr_jax.evaluate import stage
  return stage.prepare_evaluate, stage.run_evaluate


def _demo():
  from dcr_jax import demo
  return demo.prepare_demo, demo.run_demo


# stage -> (lazy prepare(config, tokenizer, model_config), lazy run(ctx, prepared))
_STAGES = {
    "demo": (lambda: _demo()[0], lambda: _demo()[1]),
    "refine": (lambda: _refine()[0], lambda: _refine()[1]),
    "align": (lambda: _align()[0], lambda: _align()[1]),
    "evaluate": (lambda: _evaluate()[0], lambda: _evaluate()[1]),
}


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keep backend-probing INFO lines off the terminal
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None or not _WORKDIR.value:
    print("error: both --config=FILE[:VARIANT] and --workdir=DIR are required", file=sys.stderr)
    sys.exit(2)
  try:
    from dcr_jax.workdir_io import check_workdir
    report = run(_CONFIG.value, check_workdir(_WORKDIR.value))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"done: {epath.Path(_WORKDIR.value) / 'report.json'} ({', '.join(report.get('stages', {}))})")


if __name__ == "__main__":
  app.run(main)
