"""python -m dcr_jax.kernels --config=FILE[:VARIANT] --workdir=DIR [--checkpoints=all|STEP,...] [--compare=DIR,...]

Writes DIR/kernels/similarity.json (one entry per checkpoint, the base model first), a heatmap PNG per checkpoint
and DIR/kernels/tracking.png (cross-group similarity and refusal probability against the step, overlaying the
--compare workdirs, e.g. STL vs DCR). Re-running skips checkpoints already measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from dcr_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config (as given to dcr_jax.main).")
_WORKDIR = flags.DEFINE_string("workdir", None, "A dcr_jax.main workdir.")
_CHECKPOINTS = flags.DEFINE_string("checkpoints", "all", "all, or a comma-separated list of checkpoint steps.")
_COMPARE = flags.DEFINE_string("compare", "", "Other workdirs (comma-separated) whose similarity.json to overlay.")


def track(config, workdir: Path, which: str, compare: list[Path]) -> dict:
  """Measures every selected checkpoint not yet in DIR/kernels/similarity.json; returns the file's content."""
  from flax import nnx

  from dcr_jax import parallel, pipeline
  from dcr_jax.config import validate
  from dcr_jax.kernels import plots
  from dcr_jax.kernels.track import build_probe, checkpoints, load_into, measure
  from dcr_jax.model import unstack_layers
  from dcr_jax.model.lora import attach_lora

  validate(config)
  if not (workdir / "config.json").is_file():
    raise UserError(f"{workdir}: no config.json; point --workdir at a dcr_jax.main run")
  for other in compare:
    if not (other / "kernels" / "similarity.json").is_file():
      raise UserError(f"--compare: {other}/kernels/similarity.json not found; run python -m dcr_jax.kernels there")
  parallel.initialize(config.distributed)
  selected = checkpoints(workdir, which)
  model, tokenizer = pipeline.build_model(config, parallel.make_mesh(config.mesh.data, config.mesh.fsdp,
                                                                     config.mesh.tensor))
  out_dir = workdir / "kernels"
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / "similarity.json"
  result = json.loads(path.read_text()) if path.is_file() else {"entries": []}
  done = {e["label"] for e in result["entries"]}
  probe = build_probe(model, tokenizer, config)
  result.update(prompts=len(probe.prompts), token_set=probe.ids.tolist(), params=config.kernels.params,
                method=config.kernels.method)
  for stage, step in [("base", 0)] + selected:
    label = "base" if stage == "base" else f"{stage}-{step}"
    if label in done:
      continue
    if stage == "align" and config.align.lora_rank > 0 and not _has_lora(model):
      attach_lora(model, rank=config.align.lora_rank, alpha=config.align.lora_alpha,
                  targets=[t for t in config.align.lora_targets.split(",") if t], rngs=nnx.Rngs(0))
    if stage != "base":
      load_into(model, workdir, stage, step)
    entry = {"label": label, "stage": stage, "step": step,
             **measure(unstack_layers(model), tokenizer, probe, config)}  # layer subsets need one Block per layer
    result["entries"].append(entry)
    pipeline.write_json(path, result)
    plots.heatmap(entry, out_dir / f"heatmap-{label}.png")
  runs = {workdir.name: result["entries"]}
  runs.update({o.name: json.loads((o / "kernels" / "similarity.json").read_text())["entries"] for o in compare})
  plots.curves(runs, out_dir / "tracking.png")
  first, last = result["entries"][0], result["entries"][-1]
  pipeline.update_report(workdir, "kernels", None, {
      "entries": len(result["entries"]), "groups": first["groups"], "base_ratio": first["ratio"],
      "final_ratio": last["ratio"], "final_label": last["label"], "file": "kernels/similarity.json"})
  return result


def _has_lora(model) -> bool:
  from flax import nnx

  from dcr_jax.model.layers import LoRAParam
  return bool(nnx.state(model, LoRAParam))


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1 or _CONFIG.value is None or not _WORKDIR.value:
    print("error: give --config=FILE[:VARIANT] and --workdir=DIR (and no other arguments)", file=sys.stderr)
    sys.exit(2)
  try:
    result = track(_CONFIG.value, Path(_WORKDIR.value), _CHECKPOINTS.value,
                   [Path(p) for p in _COMPARE.value.split(",") if p.strip()])
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"done: {len(result['entries'])} checkpoints in {Path(_WORKDIR.value) / 'kernels' / 'similarity.json'}")


if __name__ == "__main__":
  app.run(main)
