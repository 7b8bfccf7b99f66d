"""Losses in dcr_jax.train.losses against independent plain-Python/NumPy loop implementations."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcr_jax.train import losses


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


# ---------------------------------------------------------------------------------------------------------------------
# Reference implementations: loops over Python floats, no call into the module.


def _cos(x):
  x = np.asarray(x, np.float64)
  n = len(x)
  s = np.zeros((n, n))
  for i in range(n):
    for j in range(n):
      ni, nj = math.sqrt(sum(v * v for v in x[i])), math.sqrt(sum(v * v for v in x[j]))
      s[i, j] = sum(a * b for a, b in zip(x[i], x[j])) / (ni * nj) if ni * nj > 0 else 0.0
  return s


def _lse(values):
  top = max(values)
  return top + math.log(sum(math.exp(v - top) for v in values))


def _pairs(labels, valid, i):
  """Positive and negative partner indices of anchor i."""
  n = len(labels)
  pos = [j for j in range(n) if j != i and valid[j] and labels[j] == labels[i]]
  neg = [j for j in range(n) if valid[j] and labels[j] != labels[i]]
  return pos, neg


def _valid(labels, valid):
  return [True] * len(labels) if valid is None else list(valid)


def ref_circle(x, labels, margin, gamma, reduction, valid=None, alpha_at=None):
  """Circle loss; ``alpha_at`` (embeddings) freezes α_p, α_n at those points, which is what stop-gradient computes."""
  s, valid, n = _cos(x), _valid(labels, valid), len(labels)
  s_alpha = s if alpha_at is None else _cos(alpha_at)
  alpha_p = lambda i, j: max(1 + margin - s_alpha[i, j], 0.0)
  alpha_n = lambda i, j: max(s_alpha[i, j] + margin, 0.0)
  logit_p = lambda i, j: -gamma * alpha_p(i, j) * (s[i, j] - (1 - margin))
  logit_n = lambda i, j: gamma * alpha_n(i, j) * (s[i, j] - margin)
  softplus = lambda z: math.log1p(math.exp(z))
  if reduction == "batch":
    lp, ln = [], []
    for i in range(n):
      for j in range(i + 1, n):
        if valid[i] and valid[j]:
          (lp if labels[i] == labels[j] else ln).append((i, j))
    if not lp or not ln:
      return 0.0
    return softplus(_lse([logit_n(*ij) for ij in ln]) + _lse([logit_p(*ij) for ij in lp]))
  per_anchor = []
  for i in range(n):
    if not valid[i]:
      continue
    pos, neg = _pairs(labels, valid, i)
    if pos and neg:
      per_anchor.append(softplus(_lse([logit_n(i, j) for j in neg]) + _lse([logit_p(i, j) for j in pos])))
  return sum(per_anchor) / len(per_anchor) if per_anchor else 0.0


def ref_supcon(x, labels, temperature, valid=None):
  s, valid, n = _cos(x), _valid(labels, valid), len(labels)
  per_anchor = []
  for i in range(n):
    if not valid[i]:
      continue
    pos, neg = _pairs(labels, valid, i)
    if not pos:
      continue
    denominator = sum(math.exp(s[i, a] / temperature) for a in pos + neg)
    per_anchor.append(-sum(math.log(math.exp(s[i, p] / temperature) / denominator) for p in pos) / len(pos))
  return sum(per_anchor) / len(per_anchor) if per_anchor else 0.0


def ref_infonce(x, labels, temperature, valid=None):
  s, valid, n = _cos(x), _valid(labels, valid), len(labels)
  terms = []
  for i in range(n):
    if not valid[i]:
      continue
    pos, neg = _pairs(labels, valid, i)
    for p in pos:
      e_p = math.exp(s[i, p] / temperature)
      terms.append(-math.log(e_p / (e_p + sum(math.exp(s[i, k] / temperature) for k in neg))))
  return sum(terms) / len(terms) if terms else 0.0


def ref_triplet(x, labels, margin, valid=None):
  s, valid, n = _cos(x), _valid(labels, valid), len(labels)
  per_anchor = []
  for i in range(n):
    if not valid[i]:
      continue
    pos, neg = _pairs(labels, valid, i)
    if pos and neg:
      d_ap = max(1 - s[i, p] for p in pos)
      d_an = min(1 - s[i, k] for k in neg)
      per_anchor.append(max(d_ap - d_an + margin, 0.0))
  return sum(per_anchor) / len(per_anchor) if per_anchor else 0.0


REFERENCES = {
    "circle": lambda x, y, valid=None: ref_circle(x, y, 0.25, 64.0, "anchor", valid),
    "supcon": lambda x, y, valid=None: ref_supcon(x, y, 0.1, valid),
    "infonce": lambda x, y, valid=None: ref_infonce(x, y, 0.1, valid),
    "triplet": lambda x, y, valid=None: ref_triplet(x, y, 0.25, valid),
}

# Four vectors in 3 dims, two classes; and six in 3 dims, three classes (one class a singleton).
X4 = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 1.0, 0.2], [-0.3, 0.9, 0.1]])
Y4 = np.array([0, 0, 1, 1])
X6 = np.random.default_rng(0).normal(size=(6, 3))
Y6 = np.array([0, 0, 1, 1, 1, 2])
CASES = [(X4, Y4), (X6, Y6)]


@functools.cache
def _loss(name, **kwargs):
  return jax.jit(functools.partial(losses.get_loss(name), **kwargs))


# ---------------------------------------------------------------------------------------------------------------------
# Values.


def test_cosine_similarity_matrix_matches_loops():
  chex.assert_trees_all_close(losses.cosine_similarity_matrix(jnp.asarray(X6)), _cos(X6), atol=1e-12)


def test_hand_computed_values():
  # e1, e1, e2, e2 with classes 0, 0, 1, 1: s_p = 1, s_n = 0, so with m = 1/4, γ = 64 every positive and every negative
  # logit is -4 (α_p = α_n = 1/4), cosine distances are 0 (positive) and 1 (negative).
  x = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
  y = jnp.array([0, 0, 1, 1])
  # Per anchor: 1 positive, 2 negatives -> softplus(-4 + log 2 - 4). Batch: 2 positive, 4 negative unordered pairs.
  np.testing.assert_allclose(_loss("circle")(x, y), math.log1p(2 * math.exp(-8)), rtol=1e-12)
  np.testing.assert_allclose(_loss("circle", reduction="batch")(x, y), math.log1p(8 * math.exp(-8)), rtol=1e-12)
  # One positive (s = 1) against two negatives (s = 0), τ = 0.1: SupCon and InfoNCE coincide.
  np.testing.assert_allclose(_loss("supcon")(x, y), math.log1p(2 * math.exp(-10)), rtol=1e-12)
  np.testing.assert_allclose(_loss("infonce")(x, y), math.log1p(2 * math.exp(-10)), rtol=1e-12)
  np.testing.assert_allclose(_loss("triplet")(x, y), 0.0, atol=1e-12)  # relu(0 - 1 + 0.25)
  # Swap the labels so every "positive" is orthogonal and every "negative" identical: relu(1 - 0 + 0.25).
  np.testing.assert_allclose(_loss("triplet")(x, jnp.array([0, 1, 0, 1])), 1.25, rtol=1e-12)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_loss_matches_reference(name, case):
  x, y = CASES[case]
  np.testing.assert_allclose(_loss(name)(jnp.asarray(x), jnp.asarray(y)), REFERENCES[name](x, y), rtol=1e-10)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("reduction", ["anchor", "batch"])
@pytest.mark.parametrize("margin,gamma", [(0.25, 64.0), (0.4, 16.0)])
def test_circle_loss_matches_reference(case, reduction, margin, gamma):
  x, y = CASES[case]
  got = _loss("circle", margin=margin, gamma=gamma, reduction=reduction)(jnp.asarray(x), jnp.asarray(y))
  np.testing.assert_allclose(got, ref_circle(x, y, margin, gamma, reduction), rtol=1e-10)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_temperature_and_margin_are_used(temperature):
  x, y = jnp.asarray(X6), jnp.asarray(Y6)
  np.testing.assert_allclose(
      _loss("supcon", temperature=temperature)(x, y), ref_supcon(X6, Y6, temperature), rtol=1e-10)
  np.testing.assert_allclose(
      _loss("infonce", temperature=temperature)(x, y), ref_infonce(X6, Y6, temperature), rtol=1e-10)
  np.testing.assert_allclose(
      _loss("triplet", margin=temperature)(x, y), ref_triplet(X6, Y6, temperature), rtol=1e-10, atol=1e-12)


def test_class_similarity_stats_matches_loops():
  s = _cos(X6)
  within = [s[i, j] for i in range(6) for j in range(6) if i != j and Y6[i] == Y6[j]]
  across = [s[i, j] for i in range(6) for j in range(6) if Y6[i] != Y6[j]]
  stats = jax.jit(losses.class_similarity_stats)(jnp.asarray(X6), jnp.asarray(Y6))
  np.testing.assert_allclose(stats["within"], np.mean(within), rtol=1e-12)
  np.testing.assert_allclose(stats["across"], np.mean(across), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Masking, gradients, edge cases.


def _padded(x, y):
  """x, y with two padding rows appended (one zero row, one junk row copying a real label) and the valid mask."""
  junk = np.random.default_rng(1).normal(size=(1, x.shape[1]))
  xp = np.concatenate([x, np.zeros((1, x.shape[1])), junk])
  yp = np.concatenate([y, [y[0], y[-1]]])
  valid = np.array([True] * len(y) + [False, False])
  return jnp.asarray(xp), jnp.asarray(yp), jnp.asarray(valid)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_padding_rows_do_not_change_value_or_receive_gradient(name):
  x, y, valid = _padded(X6, Y6)
  loss = _loss(name)
  value, grad = jax.jit(jax.value_and_grad(lambda e: loss(e, y, valid=valid)))(x)
  np.testing.assert_allclose(value, loss(jnp.asarray(X6), jnp.asarray(Y6)), rtol=1e-12)
  np.testing.assert_allclose(value, REFERENCES[name](np.asarray(x), np.asarray(y), np.asarray(valid)), rtol=1e-10)
  chex.assert_tree_all_finite(grad)
  np.testing.assert_array_equal(grad[len(Y6):], 0.0)


def test_padding_masks_class_similarity_stats_and_batch_circle():
  x, y, valid = _padded(X6, Y6)
  stats = jax.jit(losses.class_similarity_stats)
  chex.assert_trees_all_close(stats(x, y, valid), stats(jnp.asarray(X6), jnp.asarray(Y6)), rtol=1e-12)
  circle = _loss("circle", reduction="batch")
  np.testing.assert_allclose(circle(x, y, valid=valid), circle(jnp.asarray(X6), jnp.asarray(Y6)), rtol=1e-12)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_gradients_finite_and_match_finite_differences_of_reference(name):
  x, y = jnp.asarray(X6), jnp.asarray(Y6)
  grad = jax.jit(jax.grad(_loss(name)))(x, y)
  chex.assert_tree_all_finite(grad)
  assert float(jnp.abs(grad).sum()) > 0.0
  # Directional derivative against central differences of the loop reference; for the circle loss the reference holds
  # α_p, α_n at the base point, since they are stop-gradient in the method.
  reference = REFERENCES[name] if name != "circle" else (
      lambda e, labels: ref_circle(e, labels, 0.25, 64.0, "anchor", alpha_at=X6))
  direction = np.random.default_rng(2).normal(size=X6.shape)
  eps = 1e-6
  numeric = (reference(X6 + eps * direction, Y6) - reference(X6 - eps * direction, Y6)) / (2 * eps)
  np.testing.assert_allclose(np.vdot(np.asarray(grad), direction), numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name,kwargs,reference", [
    *[(name, {}, REFERENCES[name]) for name in sorted(losses.LOSSES)],
    ("circle", {"reduction": "batch"}, lambda x, y: ref_circle(x, y, 0.25, 64.0, "batch")),
], ids=[*sorted(losses.LOSSES), "circle-batch"])
@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [5, 5, 5, 5]], ids=["no_positives", "no_negatives"])
def test_empty_pair_sets_are_finite(name, kwargs, reference, labels):
  # Without positives every loss is 0; without negatives all are 0 but SupCon, which keeps positives in its denominator.
  value, grad = jax.jit(jax.value_and_grad(_loss(name, **kwargs)))(jnp.asarray(X4), jnp.asarray(labels))
  chex.assert_tree_all_finite((value, grad))
  np.testing.assert_allclose(value, reference(X4, labels), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_all_rows_padded_is_zero(name):
  value_and_grad = jax.jit(jax.value_and_grad(_loss(name)))
  value, grad = value_and_grad(jnp.zeros((3, 2)), jnp.array([0, 1, 0]), valid=jnp.zeros(3, bool))
  assert float(value) == 0.0
  chex.assert_tree_all_finite(grad)


@pytest.mark.parametrize("reduction", ["anchor", "batch"])
def test_circle_loss_gradient_descent_pulls_classes_apart(reduction):
  x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 4)))
  y = jnp.array([0, 1] * 4)
  loss = _loss("circle", gamma=16.0, reduction=reduction)
  grad_fn = jax.jit(jax.value_and_grad(loss))
  stats = jax.jit(losses.class_similarity_stats)
  before, _ = grad_fn(x, y)
  stats_before = stats(x, y)
  for _ in range(20):
    _, grad = grad_fn(x, y)
    x = x - 0.05 * grad
  after, _ = grad_fn(x, y)
  stats_after = stats(x, y)
  assert float(after) < float(before)
  assert float(stats_after["within"] - stats_after["across"]) > float(stats_before["within"] - stats_before["across"])


def test_get_loss_and_unknown_names():
  for name, fn in losses.LOSSES.items():
    assert losses.get_loss(name) is fn
  with pytest.raises(ValueError, match=r"'nope'.*circle, infonce, supcon, triplet"):
    losses.get_loss("nope")
  with pytest.raises(ValueError, match="'mean'"):
    losses.circle_loss(jnp.asarray(X4), jnp.asarray(Y4), reduction="mean")


def test_low_precision_embeddings_are_upcast():
  value = _loss("circle")(jnp.asarray(X6, jnp.bfloat16), jnp.asarray(Y6))
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(value, ref_circle(X6, Y6, 0.25, 64.0, "anchor"), rtol=0.1)


# ---------------------------------------------------------------------------------------------------------------------
# Masked cross-entropy.


def ref_masked_cross_entropy(logits, targets, mask):
  total, count = 0.0, 0.0
  for b in range(logits.shape[0]):
    for t in range(logits.shape[1]):
      if mask[b, t]:
        row = [float(v) for v in logits[b, t]]
        total += _lse(row) - row[targets[b, t]]
        count += 1
  return (total / count if count else 0.0), count


def test_masked_cross_entropy_matches_loops():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 5, 7)) * 3
  targets = rng.integers(0, 7, size=(2, 5))
  mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
  loss, count = jax.jit(losses.masked_cross_entropy)(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  want_loss, want_count = ref_masked_cross_entropy(logits, targets, mask)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
  assert float(count) == want_count == 5
  grad = jax.jit(jax.grad(lambda l: losses.masked_cross_entropy(l, jnp.asarray(targets), jnp.asarray(mask))[0]))(
      jnp.asarray(logits))
  chex.assert_tree_all_finite(grad)
  np.testing.assert_array_equal(grad[mask == 0], 0.0)


def test_masked_cross_entropy_bf16_is_float32_and_empty_mask_is_zero():
  rng = np.random.default_rng(5)
  logits = jnp.asarray(rng.normal(size=(1, 3, 4)), jnp.bfloat16)
  targets = jnp.array([[0, 1, 2]])
  cross_entropy = jax.jit(losses.masked_cross_entropy)
  loss, count = cross_entropy(logits, targets, jnp.ones((1, 3), jnp.int32))
  assert loss.dtype == jnp.float32
  want, _ = ref_masked_cross_entropy(np.asarray(logits, np.float64), np.asarray(targets), np.ones((1, 3)))
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  loss, count = cross_entropy(logits, targets, jnp.zeros((1, 3), jnp.int32))
  assert float(loss) == 0.0 and float(count) == 0.0
