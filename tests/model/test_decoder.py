"""Decoder numerics: parity with transformers on tiny random configs, layer taps, KV cache, packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dcr_jax.model import Decoder, default_positions, tiny
from helpers import random_model
from dcr_jax.weights import export_hf
from dcr_jax.weights.loader import load_params
from dcr_jax.weights.sources import SafetensorsSource
from dcr_jax.weights import hf_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FAMILIES = ["gemma", "gemma2", "gemma3"]


def padded_batch(vocab, lengths, total, left=False, seed=0):
  rng = np.random.default_rng(seed)
  tokens = np.zeros((len(lengths), total), np.int32)
  mask = np.zeros((len(lengths), total), np.int32)
  for i, n in enumerate(lengths):
    sl = slice(total - n, total) if left else slice(0, n)
    tokens[i, sl] = rng.integers(1, vocab, n)
    mask[i, sl] = 1
  return tokens, mask


def hf_logits(directory, tokens, mask, positions):
  ref = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager",
                                                          dtype=torch.float32)
  with torch.no_grad():
    out = ref(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(np.asarray(positions), dtype=torch.long), output_hidden_states=True)
  return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("left", [False, True])
def test_parity_with_transformers(family, left, tmp_path):
  """Exported to HF, transformers gives our logits (padded batch of mixed lengths, beyond the sliding window)."""
  model = random_model(family)
  export_hf(model, tmp_path)
  tokens, mask = padded_batch(model.config.vocab_size, [21, 13, 5], 24, left=left)
  positions = default_positions(jnp.asarray(mask))
  ours = np.asarray(model(tokens, positions, mask))
  theirs, hidden = hf_logits(tmp_path, tokens, mask, positions)
  valid = mask.astype(bool)
  assert np.abs(ours[valid] - theirs[valid]).max() <= 1e-4
  out = model(tokens, positions, mask, return_hidden=(1, 2))
  for layer in (1, 2):
    np.testing.assert_allclose(np.asarray(out.hidden[layer])[valid], hidden[layer][valid], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_import_round_trip(family, tmp_path):
  """Our params -> HF safetensors -> our loader gives identical params and logits."""
  model = random_model(family, seed=3)
  export_hf(model, tmp_path)
  cfg = hf_config.from_hf_config(__import__("json").loads((tmp_path / "config.json").read_text()), "config.json")
  assert cfg.replace(max_position_embeddings=model.config.max_position_embeddings) == model.config
  loaded = load_params(cfg, SafetensorsSource(tmp_path), progress=False)
  import chex
  chex.assert_trees_all_equal(nnx.state(loaded, nnx.Param), nnx.state(model, nnx.Param))


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_at_layer_matches_full_forward(family):
  model = random_model(family)
  tokens, mask = padded_batch(model.config.vocab_size, [12, 7], 12)
  full = model(tokens, mask=mask, return_hidden=(2,))
  stopped = model(tokens, mask=mask, stop_at_layer=2)
  assert stopped.logits is None
  np.testing.assert_array_equal(np.asarray(stopped.hidden[2]), np.asarray(full.hidden[2]))


def test_stop_at_layer_computes_nothing_above():
  """The jaxpr of a stopped forward holds only the blocks below ℓ (no vocab projection either)."""
  model = random_model("gemma3")
  tokens = jnp.ones((1, 6), jnp.int32)
  graphdef, state = nnx.split(model)

  def run(state, stop):
    return nnx.merge(graphdef, state)(tokens, stop_at_layer=stop).hidden[stop]

  def dot_count(stop):
    return str(jax.make_jaxpr(lambda s: run(s, stop))(state)).count("dot_general")

  assert dot_count(1) * 2 == dot_count(2)
  grads = jax.grad(lambda s: run(s, 2).sum())(nnx.state(model, nnx.Param))
  assert float(jnp.abs(grads["layers"][4]["mlp"]["up_proj"]["kernel"][...]).max()) == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decoding_matches_full_forward(family):
  """Left-padded prefill then one token at a time through the cache equals the no-cache forward."""
  model = random_model(family)
  tokens, mask = padded_batch(model.config.vocab_size, [18, 13], 20, left=True)
  prompt_len = 9
  full = np.asarray(model(tokens, mask=mask))
  cache = model.init_cache(batch=2, max_len=24)
  out = model(tokens[:, :prompt_len], mask=mask[:, :prompt_len], cache=cache)
  np.testing.assert_allclose(np.asarray(out.logits)[:, -1], full[:, prompt_len - 1], atol=1e-5)
  cache = out.cache
  step = jax.jit(lambda c, t, m: model(t, mask=m, cache=c))
  for i in range(prompt_len, tokens.shape[1]):
    out = step(cache, tokens[:, i:i + 1], mask[:, i:i + 1])
    cache = out.cache
    np.testing.assert_allclose(np.asarray(out.logits)[:, 0], full[:, i], atol=1e-5)


def test_packed_segments_do_not_attend_across_examples():
  """Two examples packed in one row give the same logits as each alone."""
  model = random_model("gemma3")
  a, b = np.arange(3, 10), np.arange(20, 25)
  packed = np.concatenate([a, b])[None]
  segments = np.array([[1] * len(a) + [2] * len(b)])
  positions = np.array([list(range(len(a))) + list(range(len(b)))])
  logits = np.asarray(model(packed, positions, segments))
  np.testing.assert_allclose(logits[0, :len(a)], np.asarray(model(a[None]))[0], atol=1e-5)
  np.testing.assert_allclose(logits[0, len(a):], np.asarray(model(b[None]))[0], atol=1e-5)


def test_logits_index_picks_one_position():
  model = random_model("gemma2")
  tokens, mask = padded_batch(model.config.vocab_size, [8, 5], 8)
  full = np.asarray(model(tokens, mask=mask))
  last = np.asarray(model(tokens, mask=mask, logits_index=np.array([7, 4])))
  np.testing.assert_allclose(last, full[[0, 1], [7, 4]], atol=1e-6)


def test_sharded_safetensors_checkpoint_loads(tmp_path):
  """An HF directory split into two shards with model.safetensors.index.json loads to the same params."""
  import json

  import chex
  from safetensors.numpy import load_file, save_file

  model = random_model("gemma2", seed=4)
  export_hf(model, tmp_path)
  tensors = load_file(str(tmp_path / "model.safetensors"))
  (tmp_path / "model.safetensors").unlink()
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for file, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
  index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  cfg = hf_config.from_hf_config(json.loads((tmp_path / "config.json").read_text()), "config.json")
  loaded = load_params(cfg, SafetensorsSource(tmp_path), progress=False)
  chex.assert_trees_all_equal(nnx.state(loaded, nnx.Param), nnx.state(model, nnx.Param))


@pytest.mark.parametrize("family,untied", [("gemma2", False), ("gemma3", False), ("gemma3", True)])
def test_decoding_head_forms_agree(family, untied):
  """The fused decode head and the vocabulary-major head give the matmul head's logits (soft-cap included)."""
  config = tiny(family)
  if untied:
    config = config.replace(tie_embeddings=False)
  model = Decoder(config, rngs=nnx.Rngs(1))
  hidden = jax.random.normal(jax.random.key(2), (5, config.embed_dim))
  reference = np.asarray(model.logits(hidden))
  np.testing.assert_allclose(np.asarray(model.logits(hidden, decoding=True)), reference, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(model.logits(hidden, vocab_major=True)).T, reference, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"hidden \[N D\]"):
    model.logits(hidden[None], vocab_major=True)
