"""The steer stage end to end on the tiny config (every method, then evaluation under its steering), its selection
helpers, and its bad input."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from dcr_jax import main
from dcr_jax.errors import UserError
from dcr_jax.steer.scans import best_threshold, layer_sets

ROOT = Path(__file__).resolve().parents[2]

SMALL = {"evaluate.n": 4, "evaluate.max_new_tokens": 4, "evaluate.batch_size": 4, "steer.n_val": 4,
         "steer.n_train": 6, "steer.batch_size": 4, "steer.layers": "2", "steer.positions": 2}


def config(method: str, **overrides):
  """configs/tiny.py with the steer stage and a small search."""
  spec = importlib.util.spec_from_file_location("tiny_config", ROOT / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.stages = "steer,evaluate"
  c.steer.method = method
  for key, value in {**SMALL, **overrides}.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


@pytest.mark.parametrize("method", ["refusal_direction", "surgical", "scans", "self_cd"])
def test_each_method_selects_on_validation_and_steers_the_evaluation(tmp_path, method):
  report = main.run(config(method), tmp_path)
  steer = json.loads((tmp_path / "steer" / "steer.json").read_text())
  assert steer["method"] == method and report["steer"]["chosen"] == steer["chosen"]
  label = report["eval_summary"]["model"]
  assert label.startswith(f"base+{method}:")
  rows = [json.loads(l) for l in (tmp_path / "eval" / "demo-harmful.jsonl").read_text().splitlines()]
  assert len(rows) == 4 and all(0 <= r["refusal_prob"] <= 1 for r in rows)
  assert json.loads((tmp_path / "eval" / "demo-harmful.settings.json").read_text())["model"] == label
  table = next(iter(steer["table"].values()))
  assert table and all(np.isfinite([v for v in row.values() if isinstance(v, float)]).all() for row in table)
  assert f"## Steering: {method}" in (tmp_path / "report.md").read_text()
  before = (tmp_path / "steer" / "steer.json").read_text()
  main.run(config(method), tmp_path)  # the same settings: the choice is reused, not redone
  assert (tmp_path / "steer" / "steer.json").read_text() == before
