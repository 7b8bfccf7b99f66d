"""Entry point: python -m dcr_jax.main --config=configs/gemma.py[:VARIANT] --workdir=DIR [--config.KEY=VALUE ...]."""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import app, flags
from etils import epath
from flax import nnx
from ml_collections import config_flags

from dcr_jax import spec as spec_lib
from dcr_jax import checkpoints, export, parallel, pipeline
from dcr_jax.spec import Spec, Stage
from dcr_jax.errors import UserError, run_command
from dcr_jax.evaluate import stage as evaluate
from dcr_jax.model import Decoder
from dcr_jax.model.interventions import orthogonalize
from dcr_jax.report import write_report_md
from dcr_jax.steer import stage as steer
from dcr_jax.train import align, refine
from dcr_jax.train.loop import MetricsWriter, TrainContext
from dcr_jax.weights.gguf_writer import check_expressible
from dcr_jax.workdir_io import check_workdir, is_main_process, update_report

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pipeline config file (e.g. configs/gemma.py:gemma3-270m).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://bucket/run): config, checkpoints, "
                                "eval, report. A re-run resumes.")


@dataclasses.dataclass(frozen=True)
class Session:
  """What a stage may use beyond the spec and the model: the tokenizer, the workdir, and where training saves."""

  tokenizer: Any
  workdir: epath.Path
  train: TrainContext


@dataclasses.dataclass(frozen=True)
class StageEntry:
  """A stage of the pipeline: `prepare(spec, tokenizer)` loads and checks its inputs before the workdir is touched;
  `run(spec, prepared, model, session)` returns (the model for the next stage, the stage summary)."""

  prepare: Callable[[Spec, Any], Any]
  run: Callable[[Spec, Any, Decoder, Session], tuple[Decoder, dict]]


def _training(module) -> StageEntry:
  """A training stage: its data, its program (built once from them), and its run."""

  def prepare(spec, tokenizer):
    data = module.load_data(spec, tokenizer)
    return module.program(spec, spec.model.architecture, data), data

  return StageEntry(prepare, lambda spec, prepared, model, session: module.run(spec, *prepared, model,
                                                                                 session.train))


STAGES = {
    Stage.DEMO: StageEntry(lambda spec, tokenizer: None, lambda spec, _, model, session: (
        model, evaluate.run_demo(spec, model, session.tokenizer, session.workdir))),
    Stage.REFINE: _training(refine),
    Stage.ALIGN: _training(align),
    Stage.STEER: StageEntry(steer.load_data, lambda spec, data, model, session: (
        model, steer.run(spec, data, model, session.tokenizer, session.workdir))),
    Stage.EVALUATE: StageEntry(evaluate.load_data, lambda spec, data, model, session: (
        model, evaluate.run(spec, data, model, session.tokenizer, session.workdir,
                            model_id=_checkpoint_label(session.workdir),
                            steering=steer.load_steering(session.workdir, model, session.tokenizer)))),
}


def run(config, workdir: epath.Path, models: pipeline.ModelCache | None = None) -> dict:
  """Runs config.stages in order and returns the report. Everything that can fail on bad input is checked before
  the workdir is touched. `models` (a sweep's) supplies the base model and tokenizer instead of a fresh build."""
  spec = spec_lib.resolve(config)
  baseline = baseline_config(config) if spec.baseline else None
  if baseline is not None:
    spec_lib.resolve(baseline)  # its checks too, before anything is written
    models = models or pipeline.ModelCache()  # the baseline starts from the same loaded weights
  parallel.initialize(spec.distributed)
  mesh = parallel.make_mesh(spec.mesh.data, spec.mesh.fsdp, spec.mesh.tensor)
  spec_lib.check_batches(spec, mesh)
  model, tokenizer = pipeline.build_model(spec, mesh) if models is None else models.get(spec, mesh)
  spec = spec.bind(model.config)
  prepared = {stage: STAGES[stage].prepare(spec, tokenizer) for stage in spec.stages}
  if "gguf" in spec.export.formats:
    check_expressible(model.config)  # before anything is trained or written
  max_shard = export.parse_size(spec.export.max_shard_size) if spec.export.formats else None
  validate = evaluate.validator(evaluate.load_validation(spec), tokenizer) if spec.training_stages else None
  pipeline.prepare_workdir(workdir, config)
  session = Session(tokenizer=tokenizer, workdir=workdir, train=TrainContext(
      workdir=workdir, mesh=mesh, writer=MetricsWriter(workdir, enabled=is_main_process()), seed=spec.seed,
      save_every=spec.checkpoint_every, keep=spec.checkpoint_keep, validate=validate))
  weights = "random-init" if spec.model.random_init else (spec.model.weights or "embedded")
  report = update_report(workdir, "model", None, {"name": spec.model.name, "weights": weights,
                                                  "params": _count_params(model)})
  if not spec.training_stages:
    model = pipeline.restore_trained(spec, model, workdir)
  for stage in spec.stages:
    started = time.time()
    model, summary = STAGES[stage].run(spec, prepared[stage], model, session)
    summary["seconds"] = round(time.time() - started, 2)
    summary = _add_earlier_invocations(report.get("stages", {}).get(stage), summary)
    report = update_report(workdir, "stages", stage, summary)
  if spec.export.formats:
    label = _checkpoint_label(workdir).replace("-", " step ")
    exported = _with_ablation(model, spec.export.ablate_direction)
    for fmt in spec.export.formats:
      out = export.export_model(spec, exported, tokenizer, workdir / "export" / fmt, fmt, workdir=workdir,
                                checkpoint=label, dtype=spec.export.dtype, quant=spec.export.quant,
                                max_shard_size=max_shard)
      report = update_report(workdir, "export", fmt, str(out))
  if baseline is not None:
    base_dir = workdir / BASELINE_DIR
    base = run(baseline, base_dir, models)
    report = update_report(workdir, "baseline", spec.baseline, {
        "workdir": str(base_dir), "eval": base.get("eval", {}), "eval_summary": base.get("eval_summary", {}),
        "capability": base.get("capability", {}), "align": base.get("stages", {}).get("align", {})})
  if is_main_process():
    write_report_md(workdir)
  return report


BASELINE_DIR = "baseline-stl"


def baseline_config(config):
  """The STL baseline of a DCR config: the same stage-2 data, settings and evaluation, from the base weights (no
  stage 1, no export, no baseline of its own)."""
  base = copy.deepcopy(config)
  base.stages = ",".join(s for s in (x.strip() for x in str(config.stages).split(",")) if s and s != "refine")
  base.baseline = ""
  base.export.formats = ""
  return base


def _with_ablation(model: Decoder, direction_file: str) -> Decoder:
  """`model`, orthogonalised against the direction saved in `direction_file` when one is given (export)."""
  if not direction_file:
    return model
  path = epath.Path(direction_file)
  if not path.is_file():
    raise UserError(f"config.export.ablate_direction={direction_file!r} was not written; give a .npy direction")
  with path.open("rb") as f:
    return orthogonalize(model, np.load(f))


def _checkpoint_label(workdir: epath.Path) -> str:
  """The checkpoint the pipeline's model comes from at this point: `align-N`, else `refine-N`, else `base`."""
  last = checkpoints.last_trained(workdir)
  return "base" if last is None else f"{last[0]}-{last[1]}"


RESUMED_TOTALS = ("seconds", "train_seconds", "tokens")


def _add_earlier_invocations(earlier: dict | None, summary: dict) -> dict:
  """A stage that resumes work an earlier invocation had finished (a re-run of a finished stage, or evaluation with
  prompts already done) reports the totals over both: time and tokens add up instead of being overwritten."""
  resumed = summary.get("resumed_from", 0) > 0 or "resumed_from" not in summary  # evaluate always resumes
  if not earlier or not resumed:
    return summary
  return {**summary, **{k: round(earlier[k] + summary[k], 2) for k in RESUMED_TOTALS if k in earlier and k in summary}}


def _count_params(model) -> int:
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None or not _WORKDIR.value:
    print("error: both --config=FILE[:VARIANT] and --workdir=DIR are required", file=sys.stderr)
    sys.exit(2)

  def body() -> str:
    report = run(_CONFIG.value, check_workdir(_WORKDIR.value))
    return f"done: {epath.Path(_WORKDIR.value) / 'report.json'} ({', '.join(report.get('stages', {}))})"

  run_command(body)


if __name__ == "__main__":
  app.run(main)
