"""The structured eNTK (per-layer activations and backpropagated signals, no parameter-length rows) equals the
jacobian method to 1e-10 relative in float64 on a tiny model of every family, with LoRA, on cross sets with
per-prompt token sets, and under both contraction strategies (tiny dims make `auto` pick "explicit" for most
projections; real ones pick "gram", so the family tests force it). Parameter subsets: test_ntk.py runs every
method, this one included (auto), on every subset of its Gemma 3 + LoRA model against explicit jacrev Jacobians.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dcr_jax.errors import UserError
from dcr_jax.kernels import ntk, structured
from dcr_jax.model import Decoder, stack_layers, tiny
from dcr_jax.model.lora import attach_lora

IDS = np.array([3, 10, 20], np.int32)
DIMS = dict(vocab_size=48, embed_dim=16, mlp_dim=24, num_heads=2, num_kv_heads=1, head_dim=8, dtype="float64",
            param_dtype="float64")
# gemma2: scaled embeddings, (1 + w) norms and post-norms, attention and final soft-caps; gemma3: q/k norms, tied;
# llama: plain norms, tied; mistral: sliding window, untied head; qwen2: q/k/v biases; qwen3: q/k norms, untied.
# (Gemma 1 is Gemma 2 without post-norms or caps.)
FAMILIES = ("gemma2", "gemma3", "llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(scope="module", autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def make_model(family: str, layers: int = 1, lora: tuple = ()):
  """A float64 tiny model, every weight (norm scales, biases and LoRA B included) drawn with numpy."""
  cfg = tiny(family, **DIMS, num_layers=layers, layer_types=tiny(family).layer_types[-layers:])

  def build():
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    if lora:
      attach_lora(model, rank=2, alpha=4.0, targets=lora, rngs=nnx.Rngs(1))
    return model

  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  rng = np.random.default_rng(0)
  fill = lambda x: jnp.asarray(rng.normal(0.0, (x.shape[0] if len(x.shape) == 2 else 8) ** -0.5, x.shape))
  return nnx.merge(graphdef, jax.tree.map(fill, abstract))


def prompts(n: int = 3, seed: int = 0):
  """[n 9] tokens, row 1 left-padded and row 2 right-padded (when present)."""
  rng = np.random.default_rng(seed)
  mask = np.ones((n, 9), np.int32)
  mask[1:2, :3] = 0
  mask[2:3, 6:] = 0
  return (rng.integers(1, DIMS["vocab_size"], (n, 9)) * mask).astype(np.int32), mask


def rel_err(a, b) -> float:
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def structured_and_jacobian(model, kind: str, strategy: str):
  """The structured kernel (under `strategy`) and the jacobian method's, over the subset `kind`, 3 prompts in
  chunks of 2 (the second chunk padded)."""
  tokens, mask = prompts()
  graphdef, params, rest = ntk.split_params(model, kind)
  k = structured.logit_kernel(graphdef, params, rest, ntk._with_ids(tokens, mask, IDS), chunk_size=2,
                              progress=False, strategy=strategy)
  reference = ntk.logit_kernel(ntk.first_token_logits_fn(graphdef, rest), params, tokens, mask, IDS,
                               method="jacobian", chunk_size=2, progress=False)
  return k, reference


@pytest.mark.parametrize("family", FAMILIES)
def test_equals_jacobian_on_every_family(family):
  """All parameters: the re-expressed forward is the model's (padded rows too), and the kernel is the jacobian
  method's."""
  model = make_model(family)
  tokens, mask = prompts()
  graphdef, params, rest = ntk.split_params(model, "all")
  ours = jax.jit(jax.vmap(lambda t, m: structured.first_token_forward(model, t[None], m[None])[0]))
  theirs = jax.jit(jax.vmap(lambda t, m: ntk.first_token_logits_fn(graphdef, rest)(params, t[None], m[None])))
  np.testing.assert_allclose(ours(tokens, mask), theirs(tokens, mask), rtol=1e-12, atol=1e-12)
  k, reference = structured_and_jacobian(model, "all", "gram")
  assert k.shape == (3, 3, 3, 3) and k.dtype == np.float64
  assert rel_err(k, reference) <= 1e-10


@pytest.mark.parametrize("kind,strategy", [("all", "explicit"), ("lora", "gram")])
def test_lora_with_biases(kind, strategy):
  """Qwen2 (biases) with adapters on every projection: all parameters with every projection's gradient formed,
  and the adapters alone through their factors."""
  model = make_model("qwen2", lora=("q", "k", "v", "o", "gate", "up", "down"))
  k, reference = structured_and_jacobian(model, kind, strategy)
  assert rel_err(k, reference) <= 1e-10


def test_cross_sets_with_per_prompt_token_sets():
  """K(X, Y) on a tied Gemma 3, X = 3 prompts and Y = 2 others, each prompt with its own S."""
  model = make_model("gemma3")
  (tx, mx), (ty, my) = prompts(3, seed=1), prompts(2, seed=2)
  ids_x, ids_y = np.array([[1, 2], [4, 5], [4, 7]]), np.array([[7, 2], [9, 1]])
  graphdef, params, rest = ntk.split_params(model, "all")
  f = ntk.first_token_logits_fn(graphdef, rest)
  k, reference = [ntk.logit_kernel(f, params, tx, mx, ids_x, tokens_b=ty, mask_b=my, ids_b=ids_y, method=m,
                                   chunk_size=2, progress=False) for m in ("structured", "jacobian")]
  assert k.shape == (3, 2, 2, 2)
  assert rel_err(k, reference) <= 1e-10


def test_errors():
  model = make_model("llama")
  graphdef, params, rest = ntk.split_params(model, "all")
  example = ntk._with_ids(*prompts(), IDS)
  with pytest.raises(UserError, match="strategy"):
    structured.logit_kernel(graphdef, params, rest, example, strategy="dense")
  with pytest.raises(UserError, match="first_token_logits_fn"):
    ntk.logit_kernel(lambda p, t, m: t, params, *prompts(), IDS, method="structured")
  with pytest.raises(UserError, match="logit_kernel"):
    ntk.pairwise_kernel(lambda p, x: x, {}, np.zeros((2, 1)), method="structured")
  stacked = stack_layers(model)
  graphdef, params, rest = ntk.split_params(stacked, "all")
  with pytest.raises(UserError, match="unstack_layers"):
    structured.logit_kernel(graphdef, params, rest, example)


@pytest.mark.slow
def test_real_gemma3_270m_equals_jvp_vjp():
  """The embedded gemma-3-270m, all 268M parameters, float32: two chat-templated prompts, |S| = 3; the structured
  kernel equals jvp_vjp's to float32 rounding (the 32-prompt bench measured 3.8e-6)."""
  from dcr_jax import load_model
  from dcr_jax.kernels.track import encode_prompts

  with jax.enable_x64(False):
    model, tokenizer = load_model("gemma3-270m", progress=False)
    tokens, mask = encode_prompts(tokenizer, ["How do I kill a Python process?", "Write a haiku about rain."], 64)
    graphdef, params, rest = ntk.split_params(model, "all")
    f = ntk.first_token_logits_fn(graphdef, rest)
    ids = ntk.token_set(probs=ntk.next_token_probs(f, params, tokens, mask), k=3)
    k, reference = [ntk.logit_kernel(f, params, tokens, mask, ids, method=m, chunk_size=2, out_chunk=1,
                                     progress=False) for m in ("structured", "jvp_vjp")]
  assert k.dtype == np.float32 and rel_err(k, reference) <= 1e-4
