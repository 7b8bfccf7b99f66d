"""Batched generation: bucketed compilation, left padding, stop tokens, sampling with a seed."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dcr_jax.evaluate import generate as gen
from dcr_jax.model import Decoder, tiny


@pytest.fixture(scope="module")
def model():
  return Decoder(tiny("gemma3"), rngs=nnx.Rngs(0))


_forward = nnx.jit(lambda m, x: m(x))


def greedy_reference(model, prompt, steps, width=16):
  """Greedy decoding by full forwards without a cache, one token at a time. Each forward sees the ids right-padded
  to `width` (one compilation); causal attention keeps the last real position's logits those of the ids alone."""
  ids = list(prompt)
  for _ in range(steps):
    padded = np.zeros((1, width), np.int32)
    padded[0, :len(ids)] = ids
    ids.append(int(np.asarray(_forward(model, padded))[0, len(ids) - 1].argmax()))
  return ids[len(prompt):]


def test_batched_left_padded_greedy_equals_unbatched_reference(model):
  prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34]]
  outputs = gen.generate(model, prompts, max_new_tokens=6, stop_ids=[], bucket=8)
  for prompt, out in zip(prompts, outputs):
    assert out == greedy_reference(model, prompt, 6)


def test_one_compilation_per_length_bucket(model):
  gen._generate_jit.clear_cache()
  for lengths in ([3, 5], [7, 2], [8, 8], [1, 6]):  # all within the 8-token bucket
    gen.generate(model, [list(range(1, n + 1)) for n in lengths], max_new_tokens=4, stop_ids=[1], bucket=8)
  assert gen._generate_jit._cache_size() == 1
  gen.generate(model, [list(range(1, 12))] * 2, max_new_tokens=4, stop_ids=[1], bucket=8)  # the 16 bucket
  assert gen._generate_jit._cache_size() == 2


def test_stops_at_stop_token_and_includes_it(model):
  prompt = [5, 6, 7]
  free = gen.generate(model, [prompt], max_new_tokens=8, stop_ids=[], bucket=8)[0]
  stop = free[2]
  out = gen.generate(model, [prompt], max_new_tokens=8, stop_ids=[stop], bucket=8)[0]
  assert out == free[:free.index(stop) + 1]


def test_sampling_is_seeded(model):
  prompts = [[5, 6, 7], [8, 9]]
  a = gen.generate(model, prompts, max_new_tokens=8, stop_ids=[], temperature=1.0, top_p=0.9, seed=1)
  b = gen.generate(model, prompts, max_new_tokens=8, stop_ids=[], temperature=1.0, top_p=0.9, seed=1)
  c = gen.generate(model, prompts, max_new_tokens=8, stop_ids=[], temperature=1.0, top_p=0.9, seed=2)
  assert a == b and a != c


def test_greedy_takes_the_first_maximum_along_either_axis():
  logits = np.array([[0.0, 3.0, 3.0, -1.0], [5.0, 1.0, 5.0, 5.0], [-2.0, -3.0, -1.0, -1.5]], np.float32)  # [B V]
  expected = [1, 0, 2]  # ties go to the first index, as numpy's argmax
  assert gen.greedy(jnp.asarray(logits)).tolist() == expected == np.argmax(logits, axis=-1).tolist()
  assert gen.greedy(jnp.asarray(logits.T), axis=0).tolist() == expected  # the vocabulary-major form


def test_bfloat16_decode_weights_read_as_stored_with_float32_accumulation(model):
  """Matrices in bf16 (norms kept): each product is bf16(x)·w summed in float32, the cached decode equals the
  full forward of the same weights, and greedy continuations equal the float32 model's uncached reference."""
  from dcr_jax.model.layers import matmul

  narrow = gen.with_decode_weights(model, "bfloat16")
  params = nnx.state(narrow, nnx.Param)
  assert params["embedding"][...].dtype == jnp.bfloat16 and params["final_norm"]["scale"][...].dtype == jnp.float32
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal((3, 64)).astype(np.float32), jnp.asarray(rng.standard_normal((64, 5)), jnp.bfloat16)
  exact = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) @ np.asarray(w, np.float64)
  np.testing.assert_allclose(np.asarray(matmul(jnp.asarray(x), w)), exact, rtol=1e-5, atol=1e-5)
  prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]
  outputs = gen.generate(narrow, prompts, max_new_tokens=5, stop_ids=[], bucket=8)
  for prompt, out in zip(prompts, outputs):
    assert out == greedy_reference(narrow, prompt, 5)  # prefill + cached decode = full forwards, bf16 weights
  tokens = np.array([prompts[0]])
  full, half = np.asarray(model(tokens)), np.asarray(narrow(tokens))
  assert 0 < np.abs(full - half).max() < 0.05 * np.abs(full).max()  # bf16 rounding, not a different model
