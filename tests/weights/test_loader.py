"""load_params: with scan_layers the stacked layout is filled straight from the source, equal to stacking after;
Gemma 3 multimodal tensor names load as the plain ones."""

import json

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from dcr_jax.model import stack_layers
from dcr_jax.weights import export_hf, resolve_source
from dcr_jax.weights.loader import load_params
from helpers import random_model


def params_of(model) -> dict:
  return jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


@pytest.mark.parametrize("family", ["gemma3", "llama", "qwen2"])
def test_scan_load_equals_stacking_the_layer_load(family, tmp_path):
  export_hf(random_model(family), tmp_path / family)
  cfg, source = resolve_source(str(tmp_path / family))
  per_layer = load_params(cfg, source, progress=False)
  stacked = load_params(cfg.replace(scan_layers=True), source, progress=False)
  assert stacked.config.scan_layers and not per_layer.config.scan_layers
  chex.assert_trees_all_equal(params_of(stacked), params_of(stack_layers(per_layer)))


@pytest.mark.parametrize("rename", [lambda name: f"language_model.{name}",  # transformers 4.x multimodal
                                    lambda name: f"model.language_model.{name.removeprefix('model.')}"],  # 5.x
                         ids=["language_model.model", "model.language_model"])
def test_multimodal_gemma3_names_load_as_the_plain_names(rename, tmp_path):
  """A Gemma 3 multimodal checkpoint (text tower under a prefix, vision tower beside it, config.json with a
  text_config) loads to the same params as the plain text checkpoint."""
  from safetensors.numpy import load_file, save_file

  plain = export_hf(random_model("gemma3"), tmp_path / "plain")
  text_config = json.loads((plain / "config.json").read_text())
  tensors = {rename(name): value for name, value in load_file(str(plain / "model.safetensors")).items()}
  tensors["vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.ones((8, 3, 2, 2), np.float32)
  tensors["multi_modal_projector.mm_input_projection_weight"] = np.ones((8, text_config["hidden_size"]), np.float32)
  multimodal = tmp_path / "multimodal"
  multimodal.mkdir()
  save_file(tensors, str(multimodal / "model.safetensors"), metadata={"format": "pt"})
  (multimodal / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text_config,
                                                      "architectures": ["Gemma3ForConditionalGeneration"]}))
  cfg, source = resolve_source(str(multimodal))
  assert cfg == resolve_source(str(plain))[0]
  chex.assert_trees_all_equal(params_of(load_params(cfg, source, progress=False)),
                              params_of(load_params(cfg, resolve_source(str(plain))[1], progress=False)))
