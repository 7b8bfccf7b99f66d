"""Helpers shared by test modules (importable because tests/ holds the root conftest.py)."""

import jax
import numpy as np
from flax import nnx

from dcr_jax.model import Decoder, ModelConfig, tiny
from dcr_jax.checkpoints import read_checkpoint


def random_model(config: ModelConfig | str = "gemma3", seed: int = 0) -> Decoder:
  """A tiny decoder with every parameter random, norms included (zero norms would hide a misplaced norm)."""
  model = Decoder(tiny(config) if isinstance(config, str) else config, rngs=nnx.Rngs(seed))
  leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [x + 0.3 * jax.random.normal(k, x.shape) if x.ndim == 1 else x for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def xla_env(devices: int, **extra) -> dict:
  """os.environ for a child process with `devices` fake CPU devices (the suite's XLA flags kept) and `extra`."""
  import os

  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
  return {**os.environ, "XLA_FLAGS": flags, **extra}


def final_stage_params(workdir, stage: str = "align") -> dict:
  """{path: array} of the trained and frozen params in a stage's last checkpoint."""
  path = workdir / "checkpoints" / stage
  step = max(int(p.name) for p in path.iterdir() if p.name.isdigit())
  restored = read_checkpoint(path / str(step) / "default")
  tree = {"params": restored["params"], "frozen": restored["frozen"]}
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_script(relative_path: str):
  """A script of the repository that is not part of the package (bench/*.py, docs/*.py), imported as a module."""
  import importlib.util
  from pathlib import Path

  path = Path(__file__).resolve().parents[1] / relative_path
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
