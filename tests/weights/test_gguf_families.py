"""GGUF files of the gemma, gemma2, llama, qwen2 and qwen3 architectures, written with the `gguf` package's writer
as llama.cpp writes them (q/k rows of llama permuted, Gemma norms as 1 + w, no output.weight for a tied head,
quantized blocks, rope_freqs for Llama 3.1 scaling), load to our params and the source model's logits."""

import gguf
import numpy as np
import pytest
from flax import nnx

from dcr_jax.errors import UserError
from dcr_jax.model import tiny
from dcr_jax.weights import resolve_source
from dcr_jax.weights.loader import load_params
from dcr_jax.weights.tables import LINEAR, NORM, weight_table
from dcr_jax.model.layers import llama3_inverse_frequencies, rope_inverse_frequencies
from helpers import random_model

LLAMA3 = dict(rope_theta_global=500_000.0, rope_theta_local=500_000.0, rope_type="llama3", rope_scale_global=8.0,
              rope_original_max_positions=8192)


# how llama.cpp records head_dim per architecture (none for qwen2: embedding_length / head_count), and Gemma 2's
# soft-caps and window
GEMMA_HEAD_DIM = lambda cfg: {"key_length": cfg.head_dim, "value_length": cfg.head_dim}
ARCH_KEYS = {"llama": lambda cfg: {"rope_dimension_count": cfg.head_dim},
             "qwen2": lambda cfg: {}, "qwen3": lambda cfg: {"key_length": cfg.head_dim},
             "gemma": GEMMA_HEAD_DIM,
             "gemma2": lambda cfg: {**GEMMA_HEAD_DIM(cfg), "attn_logit_softcapping": cfg.attn_logit_softcap,
                                    "final_logit_softcapping": cfg.final_logit_softcap,
                                    "sliding_window": cfg.sliding_window}}


def llama_cpp_permute(rows: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotate-half halves -> interleaved pairs)."""
  return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def write_gguf(model, path, arch, quant=None, rope_freqs=None, **overrides):
  """`model` as a llama.cpp GGUF of `arch`: tensors [out in], q/k permuted for llama, Gemma norms stored as 1 + w,
  2-D weights in `quant`. Returns {our path: the tensor as the file holds it}."""
  cfg = model.config
  writer = gguf.GGUFWriter(str(path), arch)
  meta = dict(block_count=cfg.num_layers, context_length=cfg.max_position_embeddings,
              embedding_length=cfg.embed_dim, feed_forward_length=cfg.mlp_dim, head_count=cfg.num_heads,
              head_count_kv=cfg.num_kv_heads, rope_freq_base=cfg.rope_theta_global, layer_norm_rms_eps=cfg.norm_eps,
              vocab_size=cfg.vocab_size)
  meta.update(ARCH_KEYS[arch](cfg), **overrides)
  for key, value in meta.items():
    getattr(writer, f"add_{key}")(value)
  state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  expected = {}
  for entry in weight_table(cfg):
    value = np.asarray(state[entry.path].get_value(), np.float32)
    if entry.kind == LINEAR:
      value = value.T
    if arch == "llama" and entry.heads:
      value = llama_cpp_permute(value, getattr(cfg, entry.heads))
    if arch.startswith("gemma") and entry.kind == NORM:
      value = value + 1.0
    if quant is not None and value.ndim == 2:
      stored = gguf.quants.quantize(value, quant)
      writer.add_tensor(entry.gguf, stored, raw_shape=stored.shape, raw_dtype=quant)
      expected[entry.path] = gguf.quants.dequantize(stored, quant)
    else:
      writer.add_tensor(entry.gguf, value)
      expected[entry.path] = value
  if rope_freqs is not None:
    writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return expected


def llama3_factors(cfg):
  plain = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta_global, 1.0)
  return np.asarray(plain / llama3_inverse_frequencies(cfg.head_dim, cfg.rope_theta_global, cfg.rope_scale_global,
                                                       1.0, 4.0, 8192))


@pytest.mark.parametrize("arch,config,quant", [
    ("llama", tiny("llama", **LLAMA3), None),
    ("llama", tiny("llama", tie_embeddings=False), gguf.GGMLQuantizationType.Q8_0),
    ("qwen2", tiny("qwen2", tie_embeddings=False), gguf.GGMLQuantizationType.Q8_0),
    ("qwen3", tiny("qwen3", tie_embeddings=True), None),
    ("gemma", tiny("gemma"), None),
    ("gemma", tiny("gemma"), gguf.GGMLQuantizationType.Q8_0),
    ("gemma2", tiny("gemma2", query_pre_attn_scalar=256), None),  # the query scale llama.cpp assumes for Gemma 2
])
def test_gguf_loads_to_our_params(arch, config, quant, tmp_path):
  """Config from the metadata (tied iff no output.weight; llama3 scaling from rope_freqs; Gemma 2's caps and
  window), params equal to what the file holds after dequantisation (q/k un-permuted for llama only, 1 taken off
  Gemma's norms), and the same logits as the source model."""
  model = random_model(config, seed=2)
  path = tmp_path / f"{arch}.gguf"
  freqs = llama3_factors(config) if config.rope_type == "llama3" else None
  expected = write_gguf(model, path, arch, quant=quant, rope_freqs=freqs)
  cfg, source = resolve_source(str(path))
  assert cfg == config.replace(norm_eps=cfg.norm_eps) and cfg.norm_eps == pytest.approx(config.norm_eps)
  loaded = load_params(cfg, source, progress=False)
  state = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
  for entry in weight_table(cfg):  # ours, written back in the file's layout, is what the file holds
    ours = np.asarray(state[entry.path].get_value())
    if entry.kind == LINEAR:
      ours = ours.T
    if arch == "llama" and entry.heads:
      ours = llama_cpp_permute(ours, getattr(cfg, entry.heads))
    held = expected[entry.path]
    if arch.startswith("gemma") and entry.kind == NORM:
      held = held - 1.0  # the loader's own arithmetic: exact
    np.testing.assert_array_equal(ours, held, err_msg=entry.gguf)
  tokens = np.arange(1, 13)[None]
  tolerance = 1e-5 if quant is None else 0.2  # Q8_0 rounds every weight
  np.testing.assert_allclose(np.asarray(loaded(tokens)), np.asarray(model(tokens)), atol=tolerance)


def one_line(excinfo) -> str:
  message = str(excinfo.value)
  assert "\n" not in message
  return message


def test_q_or_k_inconsistent_with_head_counts(tmp_path):
  """A k tensor with rows for 2 kv heads in a file that says 1: one line naming the file, the tensor and counts."""
  path = tmp_path / "bad_heads.gguf"
  write_gguf(random_model(tiny("llama")), path, "llama", head_count_kv=1)
  cfg, source = resolve_source(str(path))
  with pytest.raises(UserError) as e:
    load_params(cfg, source, progress=False)
  message = one_line(e)
  assert "bad_heads.gguf" in message and "'blk.0.attn_k.weight'" in message and "num_kv_heads=1" in message


def test_rope_freqs_that_are_not_llama3(tmp_path):
  config = tiny("llama")
  path = tmp_path / "odd_rope.gguf"
  write_gguf(random_model(config), path, "llama", rope_freqs=np.full(config.head_dim // 2, 2.0))
  with pytest.raises(UserError) as e:
    resolve_source(str(path))
  assert "odd_rope.gguf" in one_line(e) and "rope_freqs.weight" in one_line(e)
