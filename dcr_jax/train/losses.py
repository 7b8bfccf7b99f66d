"""Contrastive losses for stage 1 (refine) and masked cross-entropy for stage 2 (align).

Every contrastive loss has the signature ``loss(embeddings [N, D], labels [N] int, *, valid=None [N] bool, **hp)
-> scalar``: pairs are formed in-batch (same label = positive, different label = negative, never an item with
itself), rows with ``valid == False`` (padding) take part in no pair, and similarities are cosine similarities
computed in at least float32. All functions are pure ``jax.numpy``, jit-able and differentiable, and return a finite
value (0 for an empty set of anchors or pairs) rather than NaN.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def _compute_dtype(x: Array) -> jnp.dtype:
  """At least float32 (bf16/f16 upcast, f64 kept)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def cosine_similarity_matrix(embeddings: Array, eps: float = 1e-12) -> Array:
  """Cosine similarities ``[N, N]`` of ``embeddings [N, D]``; rows are L2-normalised as ``x / max(|x|, eps)``."""
  x = embeddings.astype(_compute_dtype(embeddings))
  # rsqrt of a clamped squared norm: same value as x / max(|x|, eps), but an all-zero (padding) row has zero gradient
  # instead of the NaN that d sqrt(0) would give.
  x = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))
  return x @ x.T


def _pair_masks(labels: Array, valid: Array | None) -> tuple[Array, Array]:
  """Positive and negative pair masks ``[N, N]`` bool: same / different label, both valid, no self-pairs."""
  n = labels.shape[0]
  valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
  both_valid = valid[:, None] & valid[None, :]
  same = labels[:, None] == labels[None, :]
  positive = same & ~jnp.eye(n, dtype=bool) & both_valid
  negative = ~same & both_valid
  return positive, negative


def _masked_logsumexp(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
  """``log Σ_{mask} exp(x)`` along ``axis``; ``-inf`` (with zero, not NaN, gradient) where the mask is empty."""
  x_max = jnp.max(jnp.where(mask, x, -jnp.inf), axis=axis, keepdims=True)
  x_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(x_max), x_max, 0.0))
  total = jnp.sum(jnp.where(mask, jnp.exp(jnp.where(mask, x, x_max) - x_max), 0.0), axis=axis)
  nonempty = jnp.any(mask, axis=axis)
  lse = jnp.log(jnp.where(nonempty, total, 1.0)) + jnp.squeeze(x_max, axis=axis)
  return jnp.where(nonempty, lse, -jnp.inf)


def _masked_mean(x: Array, mask: Array) -> Array:
  """Mean of ``x`` over ``mask`` (any shape); 0 when the mask is empty."""
  mask = mask.astype(bool)
  count = jnp.sum(mask)
  return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(count, 1).astype(x.dtype)


def circle_loss(
    embeddings: Array,
    labels: Array,
    *,
    margin: float = 0.25,
    gamma: float = 64.0,
    valid: Array | None = None,
    reduction: str = "anchor",
) -> Array:
  """Circle loss (Sun et al., CVPR 2020) on ``embeddings [N, D]``, ``labels [N]`` int -> scalar.

  ``L = softplus(LSE_n(γ·α_n·(s_n − m)) + LSE_p(−γ·α_p·(s_p − (1 − m))))`` with ``α_p = relu(1 + m − s_p)``,
  ``α_n = relu(s_n + m)`` (both stop-gradient) and ``s`` cosine similarity.

  ``reduction="anchor"`` (default): one ``L_i`` per anchor over its own positives/negatives, averaged over anchors
  with at least one of each. ``reduction="batch"``: one ``L`` whose log-sum-exps run over every unordered pair
  ``i < j`` of the batch. The default is per-anchor because with γ ≈ 64 a log-sum-exp is close to a hard max, so the
  batch form sends almost all gradient to the single hardest positive and hardest negative pair in the batch, while
  the per-anchor form gives every anchor its own hardest pairs (as in pytorch-metric-learning's ``CircleLoss``).
  An empty positive or negative set contributes 0.
  """
  if reduction not in ("anchor", "batch"):
    raise ValueError(f"circle_loss: unknown reduction {reduction!r}; use 'anchor' or 'batch'.")
  s = cosine_similarity_matrix(embeddings)
  positive, negative = _pair_masks(labels, valid)
  alpha_p = jax.lax.stop_gradient(jax.nn.relu(1.0 + margin - s))
  alpha_n = jax.lax.stop_gradient(jax.nn.relu(s + margin))
  logit_p = -gamma * alpha_p * (s - (1.0 - margin))
  logit_n = gamma * alpha_n * (s - margin)
  if reduction == "batch":
    upper = jnp.triu(jnp.ones_like(positive), k=1)
    positive, negative = positive & upper, negative & upper
    axis = None
  else:
    axis = 1
  has_both = jnp.any(positive, axis=axis) & jnp.any(negative, axis=axis)
  z = _masked_logsumexp(logit_n, negative, axis) + _masked_logsumexp(logit_p, positive, axis)
  per_anchor = jax.nn.softplus(jnp.where(has_both, z, 0.0))
  return _masked_mean(per_anchor, has_both)


def supcon_loss(
    embeddings: Array, labels: Array, *, temperature: float = 0.1, valid: Array | None = None
) -> Array:
  """Supervised contrastive loss (Khosla et al., 2020, L_out) on ``embeddings [N, D]``, ``labels [N]`` -> scalar.

  ``L_i = −1/|P(i)| Σ_{p∈P(i)} log(exp(s_ip/τ) / Σ_{a∈A(i)} exp(s_ia/τ))`` with ``A(i)`` every valid ``a ≠ i`` and
  ``P(i)`` its same-label members; averaged over anchors with ``|P(i)| ≥ 1``.
  """
  logits = cosine_similarity_matrix(embeddings) / temperature
  positive, negative = _pair_masks(labels, valid)
  log_denominator = _masked_logsumexp(logits, positive | negative, axis=1)  # [N]
  log_prob = logits - log_denominator[:, None]
  has_positive = jnp.any(positive, axis=1)
  num_positive = jnp.maximum(jnp.sum(positive, axis=1), 1).astype(logits.dtype)
  per_anchor = -jnp.sum(jnp.where(positive, log_prob, 0.0), axis=1) / num_positive
  return _masked_mean(per_anchor, has_positive)


def infonce_loss(
    embeddings: Array, labels: Array, *, temperature: float = 0.1, valid: Array | None = None
) -> Array:
  """NT-Xent / InfoNCE with label positives on ``embeddings [N, D]``, ``labels [N]`` -> scalar.

  Each positive is scored alone against the anchor's negatives ``N(i)`` (other positives are not in the denominator):
  ``ℓ_ip = −log(exp(s_ip/τ) / (exp(s_ip/τ) + Σ_{n∈N(i)} exp(s_in/τ)))``, averaged over all ordered
  (anchor, positive) pairs ``i ≠ p``. An anchor with no negatives gives ``ℓ_ip = 0``.
  """
  logits = cosine_similarity_matrix(embeddings) / temperature
  positive, negative = _pair_masks(labels, valid)
  log_negatives = _masked_logsumexp(logits, negative, axis=1)  # [N]
  per_pair = jnp.logaddexp(logits, log_negatives[:, None]) - logits  # [N, N]
  return _masked_mean(per_pair, positive)


def triplet_loss(
    embeddings: Array, labels: Array, *, margin: float = 0.25, valid: Array | None = None
) -> Array:
  """Batch-hard triplet loss on cosine distance ``d = 1 − s`` for ``embeddings [N, D]``, ``labels [N]`` -> scalar.

  ``L_i = relu(max_{p∈P(i)} d_ip − min_{n∈N(i)} d_in + margin)``, averaged over anchors with at least one positive
  and one negative.
  """
  d = 1.0 - cosine_similarity_matrix(embeddings)
  positive, negative = _pair_masks(labels, valid)
  has_both = jnp.any(positive, axis=1) & jnp.any(negative, axis=1)
  hardest_positive = jnp.max(jnp.where(positive, d, -jnp.inf), axis=1)
  hardest_negative = jnp.min(jnp.where(negative, d, jnp.inf), axis=1)
  gap = jnp.where(has_both, hardest_positive - hardest_negative, 0.0)
  return _masked_mean(jax.nn.relu(gap + margin), has_both)


LOSSES: dict[str, Callable[..., Array]] = {
    "circle": circle_loss,
    "supcon": supcon_loss,
    "infonce": infonce_loss,
    "triplet": triplet_loss,
}


def get_loss(name: str) -> Callable[..., Array]:
  """The contrastive loss registered as ``name`` in ``LOSSES``."""
  if name not in LOSSES:
    raise ValueError(f"Unknown contrastive loss {name!r}; known losses: {', '.join(sorted(LOSSES))}.")
  return LOSSES[name]


def masked_cross_entropy(logits: Array, targets: Array, mask: Array) -> tuple[Array, Array]:
  """Token cross-entropy: ``logits [B, T, V]``, ``targets [B, T]`` int, ``mask [B, T]`` -> ``(mean_loss, num_tokens)``.

  Computed in (at least) float32; the mean runs over tokens with ``mask == 1`` and is 0 when there are none.
  ``num_tokens`` is the float count of those tokens (for token-weighted averaging across batches).
  """
  logits = logits.astype(_compute_dtype(logits))
  # logsumexp minus the target logit: no [B T V] log-prob array and no scatter in the backward pass
  hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None].astype(jnp.int32)
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)  # [B, T]
  weights = mask.astype(nll.dtype)
  num_tokens = jnp.sum(weights)
  return jnp.sum(nll * weights) / jnp.maximum(num_tokens, 1.0), num_tokens


def class_similarity_stats(
    embeddings: Array, labels: Array, valid: Array | None = None
) -> dict[str, Array]:
  """Mean cosine similarity of ``embeddings [N, D]`` over distinct same-label pairs (``within``) and over
  different-label pairs (``across``); each is 0 when no such pair exists."""
  s = cosine_similarity_matrix(embeddings)
  positive, negative = _pair_masks(labels, valid)
  return {"within": _masked_mean(s, positive), "across": _masked_mean(s, negative)}
