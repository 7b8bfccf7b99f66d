"""The `steer` stage: a training-free baseline chosen on a validation split of the run's own data, written to
DIR/steer/steer.json (method, settings, chosen hyper-parameters, selection table) and DIR/steer/<array>.npy; and
the `Steering` the evaluate stage applies, read back from there.

A re-run with the same settings reuses the saved choice; changed settings select again.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import TYPE_CHECKING

import numpy as np
from etils import epath

from dcr_jax.evaluate.generate import Steering
from dcr_jax.model import unstack_layers
from dcr_jax.steer import refusal_direction, scans, self_cd, surgical
from dcr_jax.steer.activations import SteerData, load_data
from dcr_jax.steer.context import Context
from dcr_jax.workdir_io import as_path, ensure_dir, is_main_process, update_report, write_json

if TYPE_CHECKING:  # the spec is read, never built, here
  from dcr_jax.spec import Spec

METHODS = {"refusal_direction": refusal_direction, "surgical": surgical, "scans": scans, "self_cd": self_cd}
STEER_DIR = "steer"

__all__ = ["load_data", "run", "load_steering", "METHODS"]


def _settings(spec: Spec, data: SteerData) -> dict:
  """What shapes the choice: the steer settings, the seed, the prompts."""
  return {"seed": spec.seed, **dataclasses.asdict(spec.steer),
          "prompts": {split: {c: len(p) for c, p in getattr(data, split).items()} for split in ("train", "val")}}


def run(spec: Spec, data: SteerData, model, tokenizer, workdir: epath.PathLike) -> dict:
  """Selects the configured method's steering on validation (or reuses an identical earlier choice), writes it to
  DIR/steer/ and report.json's `steer`, and returns the stage summary."""
  out = as_path(workdir) / STEER_DIR
  settings = json.loads(json.dumps(_settings(spec, data), default=list))
  previous = json.loads((out / "steer.json").read_text()) if (out / "steer.json").is_file() else None
  if previous and previous["settings"] == settings:
    record = previous
  else:
    started = time.time()
    module = METHODS[spec.steer.method]
    selection = module.select(Context(unstack_layers(model), tokenizer, data, spec.steer))
    record = {"method": spec.steer.method, "settings": settings, "chosen": selection.chosen,
              "arrays": sorted(selection.arrays), "table": selection.table,
              "select_seconds": round(time.time() - started, 2)}
    ensure_dir(out)
    if is_main_process():
      for name, array in selection.arrays.items():
        with (out / f"{name}.npy").open("wb") as f:
          np.save(f, np.asarray(array, np.float64))
    write_json(out / "steer.json", record)
  update_report(workdir, "steer", None, {k: record[k] for k in ("method", "chosen", "table")})
  return {"steps": 0, "final_loss": None, "method": record["method"], "chosen": record["chosen"]}


def load_steering(workdir: epath.PathLike, model, tokenizer) -> Steering | None:
  """The steering DIR/steer/steer.json describes (None without one), for the evaluate stage."""
  out = as_path(workdir) / STEER_DIR
  if not (out / "steer.json").is_file():
    return None
  record = json.loads((out / "steer.json").read_text())
  arrays = {}
  for name in record["arrays"]:
    with (out / f"{name}.npy").open("rb") as f:
      arrays[name] = np.load(f)
  return METHODS[record["method"]].steering(record["chosen"], arrays, unstack_layers(model), tokenizer)
