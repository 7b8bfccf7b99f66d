"""The steer stage end to end on the tiny config (every method, then evaluation under its steering), its selection
helpers, and its bad input."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from dcr_jax import main
from dcr_jax.errors import UserError
from dcr_jax.model import Decoder, tiny
from dcr_jax.steer.scans import best_threshold, layer_sets

ROOT = Path(__file__).resolve().parents[2]

SMALL = {"model.name": "tiny-llama", "evaluate.n": 4, "evaluate.max_new_tokens": 3, "evaluate.bucket": 64,
         "evaluate.batch_size": 4, "steer.n_val": 4, "steer.n_train": 6, "steer.batch_size": 4, "steer.layers": "2",
         "steer.positions": 2}  # 4 blocks, 2 candidates, one padded length: few compilations


def config(method: str, **overrides):
  """configs/tiny.py with the steer stage and a small search."""
  spec = importlib.util.spec_from_file_location("tiny_config", ROOT / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.stages = "steer,evaluate"
  c.steer.method = method
  for key, value in {**SMALL, **overrides}.items():
    *section, name = key.split(".")
    (c[section[0]] if section else c)[name] = value
  return c


@pytest.mark.parametrize("method", ["refusal_direction", "surgical", "scans", "self_cd"])
def test_each_method_selects_on_validation_and_steers_the_evaluation(tmp_path, method):
  export = {}
  if method == "surgical":  # its ablation baked into the exported weights
    export = {"export.formats": "hf", "export.ablate_direction": str(tmp_path / "steer" / "false_refusal.npy")}
  report = main.run(config(method, **export), tmp_path)
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
  if export:
    direction = np.load(tmp_path / "steer" / "false_refusal.npy")
    table = load_file(str(tmp_path / "export" / "hf" / "model.safetensors"))["model.embed_tokens.weight"]
    base = Decoder(tiny("llama"), rngs=nnx.Rngs(0)).embedding[...]  # the run's random init (seed 0)
    assert np.abs(table @ direction).max() < 1e-5 < np.abs(np.asarray(base) @ direction).max()


@pytest.mark.parametrize("overrides, needle", [
    ({"steer.method": "bogus"}, "config.steer.method='bogus' is unknown; choose from refusal_direction"),
    ({"steer.layers": "2,99"}, "config.steer.layers='2,99' is out of range; use layers 1..4"),
    ({"data.general": ""}, "config.data.general: the harmless class has 0 prompts"),
    ({"data.seemingly_toxic": "builtin:seemingly_toxic@0:1"}, "the pseudo_harmful class has 1 prompts"),
    ({"stages": "refine,steer,evaluate"}, "mixes steer with training (refine)"),
])
def test_bad_input_is_one_line_and_leaves_no_workdir(tmp_path, overrides, needle):
  workdir = tmp_path / "run"
  with pytest.raises(UserError) as error:
    main.run(config("refusal_direction", **overrides), workdir)
  assert needle in str(error.value) and "\n" not in str(error.value)
  assert not workdir.exists()


def test_threshold_and_layer_sets():
  tau, accuracy = best_threshold(np.array([0.5, 0.7]), np.array([0.1, 0.6]))
  assert (tau, accuracy) == (pytest.approx(0.3), 0.75)  # the first of the best cuts (0.3 and 0.65 tie)
  assert layer_sets(18) == (list(range(5, 14)), list(range(10, 19)))
  assert layer_sets(18, (3, 7)) == ([3, 7], list(range(10, 19)))
