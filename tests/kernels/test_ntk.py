"""The exact first-token eNTK equals an explicit jacrev J_a J_bᵀ on every path, and predicts first-order changes.

Runs in float64 (scoped to this module) on a 2-layer Gemma 3 with LoRA adapters, so every parameter subset exists.
The sharded check (params split FSDP x tensor over 8 fake devices) runs in an 8-device child process.
"""

from multidevice import EIGHT, IN_CHILD, rerun_in_child  # sets XLA_FLAGS before jax starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from jax.tree_util import Partial  # noqa: E402

from dcr_jax import parallel  # noqa: E402
from dcr_jax.errors import UserError  # noqa: E402
from dcr_jax.kernels import ntk  # noqa: E402
from dcr_jax.kernels.similarity import kernel_cosine, kernel_matrix  # noqa: E402
from dcr_jax.model import Decoder, tiny  # noqa: E402
from dcr_jax.model.lora import attach_lora  # noqa: E402

KINDS = {"all": {}, "up_to_layer": {"layer": 1}, "lora": {}, "last_n": {"last_n": 1}, "blocks": {}}
IDS = np.array([3, 10, 20], np.int32)
ROW_METHODS = ("jvp_vjp", "jacobian")  # the methods built on parameter-length rows (chunks of S, sharded rows)
N = 3  # prompts: with chunk_size 2 the last chunk is padded


@pytest.fixture(scope="module", autouse=True)
def x64():
  with jax.enable_x64(True):  # leaves with the module
    yield


def make_model():
  """The tiny model with LoRA on q/v, every weight drawn from N(0, 1/fan_in) with numpy (no per-shape compiles;
  norm scales and LoRA B non-zero too, so that every parameter has a gradient)."""
  cfg = tiny("gemma3", vocab_size=64, num_layers=2, layer_types=("local", "global"), embed_dim=32, mlp_dim=64,
             num_heads=2, num_kv_heads=1, head_dim=16, dtype="float64", param_dtype="float64")

  def build():
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    attach_lora(model, rank=2, alpha=4.0, targets=["q", "v"], rngs=nnx.Rngs(1))
    return model

  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  rng = np.random.default_rng(0)
  fill = lambda x: jnp.asarray(rng.normal(0.0, (x.shape[0] if len(x.shape) == 2 else 16) ** -0.5, x.shape))
  return nnx.merge(graphdef, jax.tree.map(fill, abstract))


def prompts():
  """[N 7] tokens with left (row 1) and right (row 2) padding."""
  rng = np.random.default_rng(0)
  mask = np.ones((N, 7), np.int32)
  mask[1, :2] = 0
  mask[2, 5:] = 0
  return (rng.integers(1, 64, (N, 7)) * mask).astype(np.int32), mask


@pytest.fixture(scope="module")
def base(x64):
  """Model, prompts and the split and kernel caches."""
  tokens, mask = prompts()
  return {"model": make_model(), "tokens": tokens, "mask": mask, "splits": {}, "kernels": {}}


@pytest.fixture(scope="module")
def setup(base):
  """`base` with the explicit full-vocabulary jacrev Jacobians {path: [V ...]} per prompt."""
  tokens, mask = base["tokens"], base["mask"]
  graphdef, params, rest = nnx.split(base["model"], nnx.Param, ...)
  f = ntk.first_token_logits_fn(graphdef, rest)
  jac = jax.jit(lambda p, t, m: jax.jacrev(lambda q: f(q, t[None], m[None]))(p))
  base["jacobians"] = [{path: np.asarray(v[...]) for path, v in nnx.to_flat_state(jac(params, tokens[i], mask[i]))}
                       for i in range(N)]
  return base


def split(setup, kind):
  if kind not in setup["splits"]:
    setup["splits"][kind] = ntk.split_params(setup["model"], kind, **KINDS[kind])
  return setup["splits"][kind]


def reference(setup, kind, rows, cols, ids_rows, ids_cols):
  """[Na Nb S S] from the jacrev Jacobians restricted to the subset's parameters and tokens, flattened to J [S P]."""
  paths = [path for path, _ in nnx.to_flat_state(split(setup, kind)[1])]

  def flat(i, ids):  # numpy: eager jnp ops would compile once per parameter shape
    return np.concatenate([setup["jacobians"][i][path][ids].reshape(len(ids), -1) for path in paths], axis=1)

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
  assert k.shape == (N, N, 3, 3) and k.dtype == np.float64
  assert rel_err(k, reference(setup, kind, range(N), range(N), [IDS] * N, [IDS] * N)) <= 1e-10


@pytest.mark.parametrize("method", ROW_METHODS)
def test_chunk_size_one(setup, method):
  k = kernel(setup, "all", method, 1)
  assert rel_err(k, reference(setup, "all", range(N), range(N), [IDS] * N, [IDS] * N)) <= 1e-10


@pytest.mark.parametrize("method", ROW_METHODS)
@pytest.mark.parametrize("out_chunk", [1, 2])
def test_output_chunks(setup, method, out_chunk):
  """|S| = 3 in chunks of 1 or 2 (the last padded): one parameter-sized row at a time for a 270m-sized model."""
  graphdef, params, rest = split(setup, "all")
  f = ntk.first_token_logits_fn(graphdef, rest)
  k = ntk.logit_kernel(f, params, setup["tokens"], setup["mask"], IDS, method=method, chunk_size=2,
                       out_chunk=out_chunk, progress=False)
  assert rel_err(k, reference(setup, "all", range(N), range(N), [IDS] * N, [IDS] * N)) <= 1e-10


def test_cross_sets_with_per_prompt_token_sets(setup):
  """K(X, Y) with X = prompts 0-1 and Y = prompt 2, each prompt with its own S (the chunk-2 compile reused)."""
  graphdef, params, rest = split(setup, "all")
  f = ntk.first_token_logits_fn(graphdef, rest)
  t, m = setup["tokens"], setup["mask"]
  ids_x, ids_y = np.array([[1, 2, 3], [4, 5, 6]]), np.array([[7, 8, 9]])
  k = ntk.logit_kernel(f, params, t[:2], m[:2], ids_x, tokens_b=t[2:], mask_b=m[2:], ids_b=ids_y,
                       chunk_size=2, progress=False)
  assert k.shape == (2, 1, 3, 3)
  assert rel_err(k, reference(setup, "all", [0, 1], [2], ids_x, ids_y)) <= 1e-10


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
  e_j = np.eye(3)[0]
  np.testing.assert_allclose(jax.jit(ntk.ntk_vector_product)(g, params, x_a, e_j, x_b), k[0, 1, :, 0], rtol=1e-10)
  rows = ntk._jacobians(g, params, (t[:2], m[:2], np.stack([IDS, IDS])), np.eye(len(IDS), dtype=np.float32),
                         None)  # [2 S ...] reuses a compile
  v = jax.tree.map(lambda r: np.asarray(r)[1, 0], rows)  # ∇θ z_{S[0]}(b), numpy (no per-shape eager compiles)
  norm = np.sqrt(sum(np.vdot(x, x) for x in jax.tree.leaves(v)))
  step = lambda eps, v: jax.tree.map(lambda p, d: p + eps * d / norm, params, v)
  shifted = jax.jit(lambda eps, v: g(step(eps, v), x_a) - g(params, x_a))
  residuals = [np.linalg.norm(shifted(eps, v) - eps * k[0, 1, :, 0] / norm) for eps in (1e-2, 1e-3, 1e-4)]
  ratios = [residuals[0] / residuals[1], residuals[1] / residuals[2]]
  assert all(60 < r < 160 for r in ratios), (residuals, ratios)


def test_one_step_prediction_and_scalar_kernel(setup):
  """Δ log π(y_o|x_o) after one SGD step on (x_u, y_u) is -η⟨∇ log π_o, ∇ L_u⟩ up to O(η²); with L = -log π that
  is η K(o, u) for the scalar kernel K of log π (jvp along a gradient there, vjp rows and tree dots here)."""
  graphdef, params, rest = split(setup, "all")
  logp = ntk.response_logprob_fn(graphdef, rest)
  rng = np.random.default_rng(3)
  tokens = rng.integers(1, 64, (2, 9)).astype(np.int32)
  rows = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.array([[0] * 4 + [1] * 4] * 2)}
  x_o, x_u = jax.tree.map(lambda x: x[0], rows), jax.tree.map(lambda x: x[1], rows)
  loss = lambda p, row: -logp(p, row)

  k = ntk.scalar_kernel(logp, params, rows, chunk_size=2, progress=False)
  predict = jax.jit(lambda a, b, lr: ntk.predict_one_step_change(logp, loss, params, a, b, lr))
  for i, a in enumerate((x_o, x_u)):
    for j, b in enumerate((x_o, x_u)):
      np.testing.assert_allclose(predict(a, b, 1.0), k[i, j], rtol=1e-10)

  grad_u = jax.tree.map(lambda r: -np.asarray(r)[1, 0], ntk._jacobians(  # ∇ L(x_u), reusing scalar_kernel's compile
      Partial(ntk._as_vector, logp), params, rows, np.ones((1, 1), np.float32), None))
  step = lambda lr, d: jax.tree.map(lambda p, d: p - lr * d, params, d)
  actual = jax.jit(lambda lr, d: logp(step(lr, d), x_o) - logp(params, x_o))
  errors = [abs(float(actual(lr, grad_u) - predict(x_o, x_u, lr))) for lr in (1e-3, 1e-4, 1e-5)]
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
  assert probs.shape == (N, 64)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-12)
  shared = ntk.token_set(probs=probs, k=3)
  np.testing.assert_array_equal(shared, np.argsort(-probs.mean(0))[:3])
  assert ntk.token_set(probs=probs, k=2, per_prompt=True).shape == (N, 2)
  hand = np.array([[0.125, 0.5, 0.375], [0.5, 0.25, 0.25]])  # means 0.3125 0.375 0.3125; ties keep id order
  np.testing.assert_array_equal(ntk.token_set(probs=hand, k=2), [1, 0])
  np.testing.assert_array_equal(ntk.token_set(probs=hand, k=2, per_prompt=True), [[1, 2], [0, 1]])
  np.testing.assert_array_equal(ntk.token_set([7, 3]), [7, 3])
  with pytest.raises(UserError):
    ntk.token_set()


def test_subsets_and_errors(setup):
  model = setup["model"]
  counts = {kind: len(jax.tree.leaves(split(setup, kind)[1])) for kind in KINDS}
  assert counts == {"all": 36, "up_to_layer": 18, "lora": 8, "last_n": 19, "blocks": 34}
  bare = nnx.eval_shape(lambda: Decoder(model.config, rngs=nnx.Rngs(0)))
  with pytest.raises(UserError, match="attach_lora"):
    ntk.split_params(bare, "lora")
  with pytest.raises(UserError, match="last_n"):
    ntk.param_filter("last_n", last_n=1)
  with pytest.raises(UserError, match="unknown parameter subset"):
    ntk.param_filter("heads")
  with pytest.raises(UserError, match="method"):
    ntk.pairwise_kernel(lambda p, x: x, {}, np.zeros((2, 1)), method="fd")


@pytest.mark.skipif(EIGHT or IN_CHILD, reason="this process already has 8 devices")
def test_in_8_device_subprocess():
  rerun_in_child(__file__ + "::test_sharded_kernel_equals_single_device")


@pytest.mark.skipif(not EIGHT, reason="runs with 8 devices (test_in_8_device_subprocess)")
def test_sharded_kernel_equals_single_device(base):
  """LoRA params and the frozen rest split 4-way FSDP x 2-way tensor: the kernel equals the 1-device one."""
  mesh = parallel.make_mesh(1, 4, 2)
  graphdef, params, rest = split(base, "lora")  # the base weights ride along, sharded, in rest
  params, rest = (parallel.shard_pytree(x, parallel.state_shardings(x, mesh)) for x in (params, rest))
  assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in jax.tree.leaves(params))
  f = ntk.first_token_logits_fn(graphdef, rest)
  shardings = ntk._param_shardings(params)
  chunk = ntk._chunks(ntk._with_ids(base["tokens"], base["mask"], IDS), 2)[0]
  basis = np.eye(len(IDS), dtype=np.float32)
  rows = ntk._jacobians(Partial(ntk._restricted_logits, f), params, chunk, basis, shardings)  # per-example grads
  for r, s in zip(jax.tree.leaves(rows), shardings):  # [C S ...param] keep the parameter's split
    assert r.sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, *s.spec)), r.ndim), (r.sharding, s)
  for method in ROW_METHODS:
    k = ntk.logit_kernel(f, params, base["tokens"], base["mask"], IDS, method=method, chunk_size=2, progress=False)
    np.testing.assert_allclose(k, kernel(base, "lora", method, 2), rtol=1e-10, atol=0)
