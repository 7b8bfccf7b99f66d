"""load_params: with scan_layers the stacked layout is filled straight from the source, equal to stacking after."""

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from dcr_jax.model import stack_layers
from dcr_jax.weights import export_hf, resolve_source
from dcr_jax.weights.loader import load_params
from helpers import random_model


@pytest.mark.parametrize("family", ["gemma3", "llama", "qwen2"])
def test_scan_load_equals_stacking_the_layer_load(family, tmp_path):
  export_hf(random_model(family), tmp_path / family)
  cfg, source = resolve_source(str(tmp_path / family))
  per_layer = load_params(cfg, source, progress=False)
  stacked = load_params(cfg.replace(scan_layers=True), source, progress=False)
  assert stacked.config.scan_layers and not per_layer.config.scan_layers
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, nnx.state(stacked, nnx.Param)),
                              jax.tree.map(np.asarray, nnx.state(stack_layers(per_layer), nnx.Param)))
