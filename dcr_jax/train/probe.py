"""Layer-ℓ representations of prompt sets, and a linear probe's held-out accuracy on them."""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from dcr_jax.data.batching import PromptSet
from dcr_jax.train.steps import pool


@functools.partial(jax.jit, static_argnames=("graphdef", "layer", "pooling"))
def _pooled(graphdef, state, tokens, mask, *, layer: int, pooling: str):
  model = nnx.merge(graphdef, state)
  return pool(model(tokens, mask=mask, stop_at_layer=layer).hidden[layer], mask, pooling)


def embed_prompts(model, prompts: PromptSet, *, layer: int, pooling: str, batch_size: int = 16) -> np.ndarray:
  """[N D] L2-normalised pooled residual stream at `layer` for every prompt (computes nothing above it)."""
  graphdef, state = nnx.split(model)
  out = []
  for start in range(0, len(prompts), batch_size):
    index = np.arange(start, min(start + batch_size, len(prompts)))
    index = np.pad(index, (0, batch_size - len(index)), mode="edge")  # one compiled shape
    batch = prompts.take(index)
    out.append(np.asarray(_pooled(graphdef, state, batch["tokens"], batch["mask"], layer=layer, pooling=pooling)))
  return np.concatenate(out)[:len(prompts)]


def probe_accuracy(train_x, train_y, test_x, test_y, ridge: float = 1e-2) -> float:
  """Held-out accuracy of a ridge-regression linear classifier (closed form) separating class 0 from the rest."""
  def design(x):
    return np.concatenate([x, np.ones((len(x), 1))], axis=1)

  x = design(np.asarray(train_x, np.float64))
  y = np.where(np.asarray(train_y) == 0, 1.0, -1.0)
  w = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ y)
  predicted = design(np.asarray(test_x, np.float64)) @ w > 0
  return float(np.mean(predicted == (np.asarray(test_y) == 0)))


def mean_similarities(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
  """Mean cosine similarity within classes and across classes 0 and 1 (rows already normalised)."""
  s = x @ x.T
  same = (y[:, None] == y[None, :]) & ~np.eye(len(y), dtype=bool)
  cross = (y[:, None] == 0) & (y[None, :] == 1)
  return {"within": float(s[same].mean()) if same.any() else 0.0,
          "across": float(s[cross].mean()) if cross.any() else 0.0}
