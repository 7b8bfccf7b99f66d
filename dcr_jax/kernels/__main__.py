"""python -m dcr_jax.kernels --config=FILE[:VARIANT] --workdir=DIR [--checkpoints=all|STEP,...] [--compare=DIR,...]

Writes DIR/kernels/similarity.json (one entry per checkpoint, the base model first), a heatmap PNG per checkpoint
and DIR/kernels/tracking.png (cross-group similarity and refusal probability against the step, overlaying the
--compare workdirs, e.g. STL vs DCR). Re-running skips checkpoints already measured. DIR may be gs://….
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from dcr_jax import config as config_lib
from dcr_jax import parallel, pipeline
from dcr_jax.errors import UserError
from dcr_jax.kernels import plots
from dcr_jax.kernels.track import build_probe, measure, selected_checkpoints
from dcr_jax.model import unstack_layers
from dcr_jax.workdir_io import as_path, check_workdir, ensure_dir, update_report, write_json

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config (as given to dcr_jax.main).")
_WORKDIR = flags.DEFINE_string("workdir", None, "A dcr_jax.main workdir (local path or gs://…).")
_CHECKPOINTS = flags.DEFINE_string("checkpoints", "all", "all, or a comma-separated list of checkpoint steps.")
_COMPARE = flags.DEFINE_string("compare", "", "Other workdirs (comma-separated) whose similarity.json to overlay.")


def track(config, workdir: epath.PathLike, which: str, compare: list[epath.PathLike]) -> dict:
  """Measures every selected checkpoint not yet in DIR/kernels/similarity.json; returns the file's content."""
  workdir, compare = as_path(workdir), [as_path(o) for o in compare]
  spec = config_lib.resolve(config)
  if not (workdir / "config.json").is_file():
    raise UserError(f"{workdir}: no config.json; point --workdir at a dcr_jax.main run")
  for other in compare:
    if not (other / "kernels" / "similarity.json").is_file():
      raise UserError(f"--compare: {other}/kernels/similarity.json not found; run python -m dcr_jax.kernels there")
  parallel.initialize(spec.distributed)
  selected = selected_checkpoints(workdir, which)
  base, tokenizer = pipeline.build_model(spec, parallel.make_mesh(spec.mesh.data, spec.mesh.fsdp, spec.mesh.tensor))
  spec = spec.bind(base.config)
  out_dir = workdir / "kernels"
  ensure_dir(out_dir)
  path = out_dir / "similarity.json"
  result = json.loads(path.read_text()) if path.is_file() else {"entries": []}
  done = {e["label"] for e in result["entries"]}
  probe = build_probe(base, tokenizer, spec)
  result.update(prompts=len(probe.prompts), token_set=probe.ids.tolist(), params=spec.kernels.params,
                method=spec.kernels.method)
  for stage, step in [("base", 0)] + selected:
    label = "base" if stage == "base" else f"{stage}-{step}"
    if label in done:
      continue
    model = base if stage == "base" else pipeline.restore_stage(spec, base, workdir, stage, step)
    entry = {"label": label, "stage": stage, "step": step,
             **measure(unstack_layers(model), tokenizer, probe, spec)}  # layer subsets need one Block per layer
    result["entries"].append(entry)
    write_json(path, result)
    plots.heatmap(entry, out_dir / f"heatmap-{label}.png")
  runs = {workdir.name: result["entries"]}
  runs.update({o.name: json.loads((o / "kernels" / "similarity.json").read_text())["entries"] for o in compare})
  plots.curves(runs, out_dir / "tracking.png")
  first, last = result["entries"][0], result["entries"][-1]
  update_report(workdir, "kernels", None, {
      "entries": len(result["entries"]), "groups": first["groups"], "base_ratio": first["ratio"],
      "final_ratio": last["ratio"], "final_label": last["label"], "file": "kernels/similarity.json"})
  return result


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1 or _CONFIG.value is None or not _WORKDIR.value:
    print("error: give --config=FILE[:VARIANT] and --workdir=DIR (and no other arguments)", file=sys.stderr)
    sys.exit(2)
  try:
    workdir = check_workdir(_WORKDIR.value)
    result = track(_CONFIG.value, workdir, _CHECKPOINTS.value,
                   [check_workdir(p.strip()) for p in _COMPARE.value.split(",") if p.strip()])
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"done: {len(result['entries'])} checkpoints in {workdir / 'kernels' / 'similarity.json'}")


if __name__ == "__main__":
  app.run(main)
