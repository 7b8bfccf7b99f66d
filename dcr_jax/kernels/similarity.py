"""Similarity measures on eNTK blocks K [Na Nb S S] (or scalar kernels [Na Nb]) and their group block means.

PAPER.md ("Empirical characterisation"): the paper's kernel similarity ‖K(x′, x)‖_F / ‖K(x′, x′)‖_F, reported as
3×3 block means over {seemingly toxic, toxic, general}. Plain numpy: these run on the small reduced kernel.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dcr_jax.errors import UserError

# Known groups come first, in this order; "general" is the paper's name for benign instructions.
GROUP_ORDER = ("seemingly_toxic", "toxic", "general", "benign")
REDUCTIONS = ("trace", "frobenius")


def _blocks(k) -> np.ndarray:
  k = np.asarray(k)
  if k.ndim not in (2, 4):
    raise UserError(f"kernel must be [Na Nb] or [Na Nb S S]; got shape {k.shape}")
  return k


def kernel_matrix(k) -> np.ndarray:
  """[Na Nb Sa Sb] blocks -> the [Na·Sa Nb·Sb] matrix (rows: prompt-major, then token); [Na Nb] passes through."""
  k = _blocks(k)
  if k.ndim == 2:
    return k
  na, nb, sa, sb = k.shape
  return k.transpose(0, 2, 1, 3).reshape(na * sa, nb * sb)


def block_norms(k) -> np.ndarray:
  """[Na Nb] Frobenius norms ‖K(a, b)‖_F of the blocks (|K| for a scalar kernel)."""
  k = _blocks(k)
  return np.abs(k) if k.ndim == 2 else np.sqrt(np.sum(np.square(k), axis=(2, 3)))


def block_inner(k, reduce: str = "trace") -> np.ndarray:
  """[Na Nb] block reductions ⟨K⟩_ab: `trace` tr K(a, b) = ⟨J_a, J_b⟩_F, the Frobenius inner product of the two
  Jacobians (needs one shared token set S), or `frobenius` ‖K(a, b)‖_F. A scalar kernel is returned as is."""
  if reduce not in REDUCTIONS:
    raise UserError(f"unknown block reduction {reduce!r}; choose one of {', '.join(REDUCTIONS)}")
  k = _blocks(k)
  if k.ndim == 2:
    return k
  return np.trace(k, axis1=2, axis2=3) if reduce == "trace" else block_norms(k)


def kernel_ratio(k, self_blocks=None) -> np.ndarray:
  """The paper's similarity R[a, b] = ‖K(x′_a, x_b)‖_F / ‖K(x′_a, x′_a)‖_F, [Na Nb] (rows x′, columns x).

  For K(X, X) the denominators are its diagonal blocks; for a cross kernel K(X′, X) give `self_blocks` = K(x′, x′),
  [Na S S] (or [Na] for a scalar kernel).
  """
  k = _blocks(k)
  if self_blocks is None:
    if k.shape[0] != k.shape[1]:
      raise UserError(f"kernel_ratio: K is {k.shape[0]}x{k.shape[1]} prompts; pass self_blocks=K(x', x') too")
    self_blocks = k[np.arange(len(k)), np.arange(len(k))]
  self_blocks = np.asarray(self_blocks)
  denom = np.abs(self_blocks) if self_blocks.ndim == 1 else np.sqrt(np.sum(np.square(self_blocks), axis=(1, 2)))
  if denom.shape != (k.shape[0],):
    raise UserError(f"kernel_ratio: self_blocks give {denom.shape} norms for {k.shape[0]} row prompts")
  return block_norms(k) / denom[:, None]


def kernel_cosine(k, reduce: str = "trace") -> np.ndarray:
  """Symmetric normalisation ⟨K⟩_ab / √(⟨K⟩_aa ⟨K⟩_bb) of K(X, X), [N N]; diagonal 1.

  With `trace` this is the cosine of the Jacobians J_a, J_b (in [-1, 1]); with `frobenius` it is
  ‖K_ab‖_F / √(‖K_aa‖_F ‖K_bb‖_F) in [0, 1], a symmetric version of `kernel_ratio`.
  """
  m = block_inner(k, reduce)
  if m.shape[0] != m.shape[1]:
    raise UserError(f"kernel_cosine needs K(X, X); got {m.shape[0]}x{m.shape[1]} prompts")
  d = np.sqrt(np.diagonal(m))
  return m / np.outer(d, d)


def group_names(groups: Sequence[str]) -> list[str]:
  """Distinct group names: those of GROUP_ORDER first, in that order, then the others as first seen."""
  seen = list(dict.fromkeys(str(g) for g in groups))
  return [g for g in GROUP_ORDER if g in seen] + [g for g in seen if g not in GROUP_ORDER]


def block_means(matrix, groups: Sequence[str], groups_b: Sequence[str] | None = None, *,
                names: Sequence[str] | None = None, include_diagonal: bool = False
                ) -> tuple[list[str], np.ndarray, np.ndarray]:
  """Mean of `matrix` [Na Nb] over each pair of groups: (names, means [G G], counts [G G] of pairs averaged).

  `groups` [Na] labels the rows, `groups_b` [Nb] the columns (default: the same prompts; then self-pairs a = b are
  left out unless `include_diagonal`, as they are 1 by construction for normalised measures). `names` fixes the
  order (default `group_names`); a block without pairs has mean NaN and count 0.
  """
  m = np.asarray(matrix, dtype=np.float64)
  rows = np.asarray(groups, dtype=object)
  cols = rows if groups_b is None else np.asarray(groups_b, dtype=object)
  if m.shape != (len(rows), len(cols)):
    raise UserError(f"block_means: matrix {m.shape} does not match {len(rows)} row and {len(cols)} column labels")
  names = list(names) if names is not None else group_names(list(rows) + list(cols))
  valid = np.ones(m.shape, bool)
  if groups_b is None and not include_diagonal:
    np.fill_diagonal(valid, False)
  means = np.full((len(names), len(names)), np.nan)
  counts = np.zeros((len(names), len(names)), np.int64)
  for i, gi in enumerate(names):
    for j, gj in enumerate(names):
      pairs = valid & (rows == gi)[:, None] & (cols == gj)[None, :]
      counts[i, j] = pairs.sum()
      if counts[i, j]:
        means[i, j] = m[pairs].mean()
  return names, means, counts
