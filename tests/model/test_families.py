"""Llama, Mistral, Qwen2 and Qwen3 by flags: parity with transformers on tiny random configs (padded batches, KV-cache
decode), directories written by transformers' save_pretrained, and the flags' own numerics."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dcr_jax.model import Decoder, default_positions, get_variant, stack_layers, tiny
from dcr_jax.model.layers import LoRAParam, llama3_inverse_frequencies, rope_inverse_frequencies
from dcr_jax.model.lora import attach_lora
from dcr_jax.weights import export_hf, hf_config, resolve_source
from dcr_jax.weights.loader import load_params
from helpers import random_model
from test_decoder import padded_batch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# llama3 RoPE at tiny size: head_dim 16 and theta 1e4 give wavelengths 6.3 ... 19869; original 128 puts 62.8 in the
# interpolated band, 6.3 and 19.9 in the kept one and the rest in the divided one.
CONFIGS = {
    "llama": tiny("llama"),
    "llama3-rope": tiny("llama", rope_type="llama3", rope_scale_global=8.0, rope_original_max_positions=128),
    "mistral": tiny("mistral"),
    "qwen2": tiny("qwen2"),
    "qwen3": tiny("qwen3"),
}


def torch_logits(reference, tokens, mask):
  positions = np.asarray(default_positions(jnp.asarray(mask)))
  with torch.no_grad():
    return reference(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()


def load_reference(directory):
  return transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager",
                                                           dtype=torch.float32).eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_parity_with_transformers(name, tmp_path):
  """Exported to HF, transformers gives our logits: right- and left-padded batches of mixed lengths (past the
  sliding window), and a left-padded prefill continued one token at a time through the KV cache."""
  model = random_model(CONFIGS[name])
  export_hf(model, tmp_path)
  reference = load_reference(tmp_path)
  assert type(reference).__name__ == hf_config.HF_ARCHITECTURES[model.config.family]
  worst = 0.0
  for left in (False, True):
    tokens, mask = padded_batch(model.config.vocab_size, [21, 13, 5], 24, left=left)
    ours = np.asarray(model(tokens, mask=mask))
    theirs = torch_logits(reference, tokens, mask)
    worst = max(worst, float(np.abs(ours - theirs)[mask.astype(bool)].max()))
  assert worst <= 1e-4, worst

  prompt_len = 9
  cache = model.init_cache(batch=3, max_len=24)
  out = model(tokens[:, :prompt_len], mask=mask[:, :prompt_len], cache=cache)
  decoded = [np.asarray(out.logits)[:, -1]]
  step = jax.jit(lambda c, t, m: model(t, mask=m, cache=c))
  for i in range(prompt_len, tokens.shape[1]):
    out = step(out.cache, tokens[:, i:i + 1], mask[:, i:i + 1])
    decoded.append(np.asarray(out.logits)[:, 0])
  decoded = np.stack(decoded, axis=1)  # B T-prompt_len+1 V: positions prompt_len-1 ...
  valid = mask[:, prompt_len - 1:].astype(bool)
  assert np.abs(decoded - theirs[:, prompt_len - 1:])[valid].max() <= 1e-4


def _random_torch_params(reference, seed):
  """Every parameter random, norms around one and biases non-zero (a zero bias would hide a missing one)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in reference.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_((1.0 + 0.3 * noise) if name.endswith("norm.weight") else 0.1 * noise)


@pytest.mark.parametrize("family,tied,shard", [("qwen2", True, False), ("qwen3", False, True)])
def test_loads_a_save_pretrained_directory(family, tied, shard, tmp_path):
  """A Qwen2 (biases, tied) / Qwen3 (q/k norm, untied, sharded with an index) directory written by transformers'
  save_pretrained loads to the same logits on a left-padded batch."""
  config_cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
  hf_cfg = config_cls(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied,
                      rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
  reference = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
  _random_torch_params(reference, seed=1)
  reference.save_pretrained(tmp_path, max_shard_size="100KB" if shard else "1GB")
  assert (tmp_path / "model.safetensors.index.json").is_file() == shard

  cfg, source = resolve_source(str(tmp_path))
  assert (cfg.family, cfg.tie_embeddings, cfg.qkv_bias, cfg.use_qk_norm) == (
      family, tied, family == "qwen2", family == "qwen3")
  model = load_params(cfg, source, progress=False)
  tokens, mask = padded_batch(cfg.vocab_size, [17, 6], 20, left=True)
  diff = np.abs(np.asarray(model(tokens, mask=mask)) - torch_logits(reference, tokens, mask))
  assert diff[mask.astype(bool)].max() <= 1e-4


@pytest.mark.parametrize("name", ["llama3-rope", "qwen2"])
def test_hf_config_round_trip(name, tmp_path):
  """export_hf's config.json reads back to the same config; the params (biases included) to the same values."""
  model = random_model(CONFIGS[name], seed=3)
  export_hf(model, tmp_path)
  cfg = hf_config.from_hf_config(json.loads((tmp_path / "config.json").read_text()), "config.json")
  assert cfg == model.config
  loaded = load_params(cfg, resolve_source(str(tmp_path))[1], progress=False)
  chex.assert_trees_all_equal(nnx.state(loaded, nnx.Param), nnx.state(model, nnx.Param))


def test_llama3_frequencies():
  """Llama 3.1's scaling at its published parameters: high frequencies kept, low ones divided by the factor, the
  band between interpolated (values of transformers' `_compute_llama3_parameters` for head_dim 128, theta 5e5)."""
  plain = np.asarray(rope_inverse_frequencies(128, 500_000.0, 1.0))
  scaled = np.asarray(llama3_inverse_frequencies(128, 500_000.0, 8.0, 1.0, 4.0, 8192))
  wavelen = 2 * np.pi / plain
  np.testing.assert_array_equal(scaled[wavelen < 8192 / 4], plain[wavelen < 8192 / 4])
  np.testing.assert_allclose(scaled[wavelen > 8192], plain[wavelen > 8192] / 8.0, rtol=1e-6)
  band = (wavelen >= 2048) & (wavelen <= 8192)
  assert band.sum() == 6 and np.all(scaled[band] < plain[band]) and np.all(scaled[band] > plain[band] / 8.0)
  reference = transformers.LlamaConfig(head_dim=128, hidden_size=4096, num_attention_heads=32, rope_parameters={
      "rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](reference, "cpu")
  np.testing.assert_allclose(scaled, theirs.numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", ["mistral", "qwen2"])
def test_scan_lora_and_cache_keep_working(name):
  """With biases / an all-local window: scanned equals the layer loop, LoRA starts as a no-op and trains."""
  model = random_model(CONFIGS[name])
  tokens, mask = padded_batch(model.config.vocab_size, [14, 9], 14)
  full = np.asarray(model(tokens, mask=mask))
  np.testing.assert_allclose(np.asarray(stack_layers(model)(tokens, mask=mask)), full, atol=1e-5)
  attach_lora(model, rank=2, alpha=4.0, targets=("q", "k", "v", "o"), rngs=nnx.Rngs(5))
  np.testing.assert_array_equal(np.asarray(model(tokens, mask=mask)), full)


def test_named_variants_have_the_published_shapes():
  """Parameter counts of the real checkpoints (embedding counted once when tied), from one- and two-block copies."""
  counts = {"llama3.2-1b": 1_235_814_400, "llama3.1-8b": 8_030_261_248, "mistral-7b": 7_241_732_096,
            "qwen2.5-0.5b": 494_032_768, "qwen2.5-7b": 7_615_616_512, "qwen3-0.6b": 596_049_920,
            "qwen3-8b": 8_190_735_360, "smollm2-135m": 134_515_008}

  def count(cfg, layers):
    cfg = cfg.replace(num_layers=layers, layer_types=cfg.layer_types[:layers])
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))

  for name, expected in counts.items():
    cfg = get_variant(name)
    one, two = count(cfg, 1), count(cfg, 2)
    assert one + (cfg.num_layers - 1) * (two - one) == expected, name


@pytest.mark.parametrize("name", ["qwen2", "mistral"])
def test_export_with_lora_merged_loads_in_transformers(name, tmp_path):
  """A model with trained-looking (non-zero) adapters exports merged: transformers gives our logits."""
  model = random_model(CONFIGS[name])
  attach_lora(model, rank=2, alpha=4.0, targets=("q", "k", "v", "o", "gate", "up", "down"), rngs=nnx.Rngs(5))
  adapters = nnx.state(model, LoRAParam)
  keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(adapters))))
  nnx.update(model, jax.tree.map(lambda a: a + 0.2 * jax.random.normal(next(keys), a.shape), adapters))
  tokens, mask = padded_batch(model.config.vocab_size, [11, 6], 12, left=True)
  ours = np.asarray(model(tokens, mask=mask))
  export_hf(model, tmp_path)
  theirs = torch_logits(load_reference(tmp_path), tokens, mask)
  assert np.abs(ours - theirs)[mask.astype(bool)].max() <= 1e-4
