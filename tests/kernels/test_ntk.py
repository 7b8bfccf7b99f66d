"""The exact first-token eNTK equals an explicit jacrev J_a J_bᵀ on every path, and predicts first-order changes.

Runs in float64 (scoped to this module) on a 2-layer Gemma 3 with LoRA adapters, so every parameter subset exists.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from dcr_jax.errors import UserError
from dcr_jax.kernels import ntk
from dcr_jax.kernels.similarity import kernel_cosine, kernel_matrix
from dcr_jax.model import Decoder, tiny
from dcr_jax.model.lora import attach_lora

KINDS = {"all": {}, "up_to_layer": {"layer": 1}, "lora": {}, "last_n": {"last_n": 1}}
IDS = np.array([3, 10, 20])


@pytest.fixture(scope="module", autouse=True)
def x64():
  with jax.enable_x64(True):  # leaves with the module
    yield


def make_model():
  cfg = tiny("gemma3", vocab_size=64, num_layers=2, layer_types=("local", "global"), embed_dim=32, mlp_dim=64,
             num_heads=2, num_kv_heads=1, head_dim=16, dtype="float64", param_dtype="float64")
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  attach_lora(model, rank=2, alpha=4.0, targets=["q", "v"], rngs=nnx.Rngs(1))
  for i, (_, dense) in enumerate(nnx.iter_modules(model)):  # non-zero B so that the A adapters get gradients too
    if getattr(dense, "lora_b", None) is not None:
      dense.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(i), dense.lora_b.shape, jnp.float64)
  return model


def prompts():
  """[4 7] tokens with right (row 2) and left (row 1) padding."""
  rng = np.random.default_rng(0)
  mask = np.ones((4, 7), np.int32)
  mask[1, :2] = 0
  mask[2, 5:] = 0
  return (rng.integers(1, 64, (4, 7)) * mask).astype(np.int32), mask


@pytest.fixture(scope="module")
def setup(x64):
  """Model, prompts, the explicit full-vocabulary jacrev Jacobians {path: [V ...]} per prompt, and kernel cache."""
  model = make_model()
  tokens, mask = prompts()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  f = ntk.first_token_logits_fn(graphdef, rest)
  jac = jax.jit(lambda p, t, m: jax.jacrev(lambda q: f(q, t[None], m[None]))(p))
  full = [{path: v[...] for path, v in nnx.to_flat_state(jac(params, tokens[i], mask[i]))} for i in range(4)]
  return {"model": model, "tokens": tokens, "mask": mask, "jacobians": full, "splits": {}, "kernels": {}}


def split(setup, kind):
  if kind not in setup["splits"]:
    setup["splits"][kind] = ntk.split_params(setup["model"], kind, **KINDS[kind])
  return setup["splits"][kind]


def reference(setup, kind, rows, cols, ids_rows, ids_cols):
  """[Na Nb S S] from the jacrev Jacobians restricted to the subset's parameters, flattened with ravel_pytree."""
  paths = [path for path, _ in nnx.to_flat_state(split(setup, kind)[1])]

  def flat(i, ids):  # J [S P]
    sub = {"/".join(map(str, path)): setup["jacobians"][i][path][ids] for path in paths}
    return jax.vmap(lambda tree: ravel_pytree(tree)[0])(sub)

  ja = [flat(i, ids) for i, ids in zip(rows, ids_rows)]
  jb = [flat(i, ids) for i, ids in zip(cols, ids_cols)]
  return np.stack([np.stack([a @ b.T for b in jb]) for a in ja])


def kernel(setup, kind, method, chunk_size):
  key = (kind, method, chunk_size)
  if key not in setup["kernels"]:
    graphdef, params, rest = split(setup, kind)
    f = ntk.first_token_logits_fn(graphdef, rest)
    setup["kernels"][key] = ntk.logit_kernel(f, params, setup["tokens"], setup["mask"], IDS, method=method,
                                             chunk_size=chunk_size, progress=False)
  return setup["kernels"][key]


def rel_err(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("method", ntk.METHODS)
def test_kernel_equals_jacrev(setup, kind, method):
  k = kernel(setup, kind, method, 2)
  assert k.shape == (4, 4, 3, 3) and k.dtype == np.float64
  assert rel_err(k, reference(setup, kind, range(4), range(4), [IDS] * 4, [IDS] * 4)) <= 1e-10


@pytest.mark.parametrize("method", ntk.METHODS)
def test_chunk_size_one(setup, method):
  k = kernel(setup, "all", method, 1)
  assert rel_err(k, reference(setup, "all", range(4), range(4), [IDS] * 4, [IDS] * 4)) <= 1e-10


def test_cross_sets_with_per_prompt_token_sets(setup):
  """K(X, Y) with X = prompts 0-1 and Y = prompts 2-3, each prompt with its own S (the chunk-2 compile reused)."""
  graphdef, params, rest = split(setup, "all")
  f = ntk.first_token_logits_fn(graphdef, rest)
  t, m = setup["tokens"], setup["mask"]
  ids_x, ids_y = np.array([[1, 2, 3], [4, 5, 6]]), np.array([[7, 8, 9], [3, 10, 20]])
  k = ntk.logit_kernel(f, params, t[:2], m[:2], ids_x, tokens_b=t[2:], mask_b=m[2:], ids_b=ids_y,
                       chunk_size=2, progress=False)
  assert rel_err(k, reference(setup, "all", [0, 1], [2, 3], ids_x, ids_y)) <= 1e-10


def test_symmetric_psd_and_cosine(setup):
  matrix = kernel_matrix(kernel(setup, "all", "jvp_vjp", 2))  # [N·S N·S]
  np.testing.assert_allclose(matrix, matrix.T, rtol=1e-12, atol=1e-12 * np.abs(matrix).max())
  eig = np.linalg.eigvalsh((matrix + matrix.T) / 2)
  assert eig.min() >= -1e-10 * eig.max()
  for reduce in ("trace", "frobenius"):
    np.testing.assert_allclose(np.diagonal(kernel_cosine(kernel(setup, "all", "jvp_vjp", 2), reduce)), 1.0,
                               rtol=1e-14)


def test_linearisation_and_ntk_vector_product(setup):
  """s_a(θ + ε v) − s_a(θ) = ε J_a v + O(ε²) with v = ∇θ z_j(b) / ‖·‖: residual/ε² steady over three decades."""
  graphdef, params, rest = split(setup, "all")
  g = Partial(ntk._restricted_logits, ntk.first_token_logits_fn(graphdef, rest))
  t, m = setup["tokens"], setup["mask"]
  x_a, x_b = (t[0], m[0], IDS), (t[1], m[1], IDS)
  k = kernel(setup, "all", "jvp_vjp", 2)
  e_j = jnp.eye(3)[0]
  np.testing.assert_allclose(jax.jit(ntk.ntk_vector_product)(g, params, x_a, e_j, x_b), k[0, 1, :, 0], rtol=1e-10)
  (v,) = jax.jit(lambda p: jax.vjp(lambda q: g(q, x_b), p)[1](e_j))(params)
  norm = float(jnp.sqrt(ntk.tree_dot(v, v)))
  shifted = jax.jit(lambda eps: g(jax.tree.map(lambda p, d: p + eps * d / norm, params, v), x_a) - g(params, x_a))
  residuals = [np.linalg.norm(shifted(eps) - eps * k[0, 1, :, 0] / norm) for eps in (1e-2, 1e-3, 1e-4)]
  ratios = [residuals[0] / residuals[1], residuals[1] / residuals[2]]
  assert all(60 < r < 160 for r in ratios), (residuals, ratios)


def test_one_step_prediction_and_scalar_kernel(setup):
  """Δ log π(y_o|x_o) after one SGD step on (x_u, y_u) is -η⟨∇ log π_o, ∇ L_u⟩ up to O(η²); that inner product is
  the scalar kernel of log π (L_u = -log π_u)."""
  graphdef, params, rest = split(setup, "all")
  logp = ntk.response_logprob_fn(graphdef, rest)
  rng = np.random.default_rng(3)
  tokens = rng.integers(1, 64, (2, 9)).astype(np.int32)
  rows = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.array([[0] * 4 + [1] * 4] * 2)}
  x_o, x_u = jax.tree.map(lambda x: x[0], rows), jax.tree.map(lambda x: x[1], rows)
  loss = lambda p, row: -logp(p, row)

  k = ntk.scalar_kernel(logp, params, rows, chunk_size=2, progress=False)
  grad = jax.jit(jax.grad(logp))
  grads = [grad(params, row) for row in (x_o, x_u)]
  flat = [ravel_pytree(g)[0] for g in grads]
  assert rel_err(k, np.array([[a @ b for b in flat] for a in flat])) <= 1e-10

  predict = jax.jit(lambda lr: ntk.predict_one_step_change(logp, loss, params, x_o, x_u, lr))
  actual = jax.jit(lambda lr: logp(jax.tree.map(lambda p, d: p + lr * d, params, grads[1]), x_o) - logp(params, x_o))
  errors = []
  for lr in (1e-2, 1e-3, 1e-4):
    np.testing.assert_allclose(predict(lr), lr * k[0, 1], rtol=1e-10)
    errors.append(abs(float(actual(lr) - predict(lr))))
  ratios = [errors[0] / errors[1], errors[1] / errors[2]]
  assert all(60 < r < 160 for r in ratios), (errors, ratios)


def test_first_token_logits_use_last_valid_position(setup):
  graphdef, params, rest = split(setup, "all")
  f = jax.jit(ntk.first_token_logits_fn(graphdef, rest))
  ids = np.array([5, 9, 12, 40], np.int32)
  left = f(params, np.array([[0, 0, *ids]]), np.array([[0, 0, 1, 1, 1, 1]]))
  right = f(params, np.array([[*ids, 0, 0]]), np.array([[1, 1, 1, 1, 0, 0]]))
  plain = f(params, ids[None], np.ones((1, 4), np.int32))
  np.testing.assert_allclose(left, plain, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(right, plain, rtol=1e-12, atol=1e-12)


def test_token_sets(setup):
  graphdef, params, rest = split(setup, "all")
  probs = ntk.next_token_probs(ntk.first_token_logits_fn(graphdef, rest), params, setup["tokens"], setup["mask"],
                               chunk_size=3)
  assert probs.shape == (4, 64)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-12)
  shared = ntk.token_set(probs=probs, k=3)
  np.testing.assert_array_equal(shared, np.argsort(-probs.mean(0))[:3])
  assert ntk.token_set(probs=probs, k=2, per_prompt=True).shape == (4, 2)
  hand = np.array([[0.1, 0.5, 0.4], [0.6, 0.1, 0.3]])
  np.testing.assert_array_equal(ntk.token_set(probs=hand, k=2), [1, 0])  # means 0.35 0.30 0.35: stable ties
  np.testing.assert_array_equal(ntk.token_set(probs=hand, k=2, per_prompt=True), [[1, 2], [0, 2]])
  np.testing.assert_array_equal(ntk.token_set([7, 3]), [7, 3])
  with pytest.raises(UserError):
    ntk.token_set()


def test_subsets_and_errors(setup):
  model = setup["model"]
  counts = {kind: len(jax.tree.leaves(split(setup, kind)[1])) for kind in KINDS}
  assert counts == {"all": 36, "up_to_layer": 18, "lora": 8, "last_n": 19}
  bare = Decoder(model.config, rngs=nnx.Rngs(0))
  with pytest.raises(UserError, match="attach_lora"):
    ntk.split_params(bare, "lora")
  with pytest.raises(UserError, match="last_n"):
    ntk.param_filter("last_n", last_n=1)
  with pytest.raises(UserError, match="unknown parameter subset"):
    ntk.param_filter("heads")
  with pytest.raises(UserError, match="method"):
    ntk.pairwise_kernel(lambda p, x: x, {}, np.zeros((2, 1)), method="fd")
