"""Meshes and shardings on 8 fake CPU devices: legal specs for every param, sharded loading, sharded forward parity.

Needs 8 devices, so XLA_FLAGS is set before JAX starts. In a pytest process where JAX was imported first by
another module (1 device), `test_in_8_device_subprocess` reruns this file in a child process with the flag set.
"""

from multidevice import EIGHT, IN_CHILD, rerun_in_child  # sets XLA_FLAGS before jax starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from dcr_jax.errors import UserError  # noqa: E402
from helpers import random_model as _random_model  # noqa: E402
from dcr_jax.model import Decoder, tiny  # noqa: E402
from dcr_jax.parallel import (  # noqa: E402
    activation_constraint, batch_sharding, local_batch_to_global, logical_to_spec, make_mesh, placement,
    shard_pytree, state_shardings)
from dcr_jax.weights import abstract_model, export_hf, load_params  # noqa: E402
from dcr_jax.weights.sources import SafetensorsSource  # noqa: E402

eight_devices = pytest.mark.skipif(not EIGHT, reason="runs in the 8-device child (test_in_8_device_subprocess)")

MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)]
# vocab 500 and one kv head: some dimensions do not divide 8, so rules must fall back to replication
CONFIG = tiny("gemma3", vocab_size=500, num_kv_heads=1)


@pytest.mark.skipif(EIGHT or IN_CHILD, reason="this process already has 8 devices")
def test_in_8_device_subprocess():
  """Runs this module with 8 fake devices (JAX was started by an earlier module with fewer)."""
  rerun_in_child(__file__)


def test_child_has_eight_devices():
  if IN_CHILD:
    assert EIGHT, f"got {jax.device_count()} devices, expected 8"


def random_model(cfg=CONFIG, seed=0):
  return _random_model(cfg, seed)


def assert_legal(sharding: NamedSharding, shape):
  """Each dim divisible by its mesh axes, no mesh axis used twice."""
  used = []
  for dim, entry in zip(shape, tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    used += axes
    assert dim % int(np.prod([sharding.mesh.shape[a] for a in axes])) == 0, (sharding.spec, shape)
  assert len(used) == len(set(used)), sharding.spec


@eight_devices
@pytest.mark.parametrize("sizes,expected", [((-1, 1, 1), (8, 1, 1)), ((1, 8, 1), (1, 8, 1)), ((2, 2, 2), (2, 2, 2)),
                                            ((2, -1, 1), (2, 4, 1)), ((1, 2, -1), (1, 2, 4))])
def test_mesh_shapes(sizes, expected):
  mesh = make_mesh(*sizes)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape.values()) == expected
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@eight_devices
@pytest.mark.parametrize("kwargs,words", [
    (dict(data=3), "data*fsdp*tensor = 3*1*1 = 3 does not equal 8 devices; set mesh.data=-1"),
    (dict(data=-1, fsdp=3), "fsdp*tensor = 3*1 = 3 does not divide 8 devices"),
    (dict(data=-1, tensor=-1), "only one size may be -1"),
    (dict(data=0), "mesh.data=0 must be a positive integer"),
])
def test_mesh_errors_are_one_line(kwargs, words):
  with pytest.raises(UserError) as e:
    make_mesh(**kwargs)
  assert words in str(e.value) and "\n" not in str(e.value)


@eight_devices
def test_logical_to_spec_drops_indivisible_and_repeated_axes():
  mesh = make_mesh(2, 2, 2)
  assert logical_to_spec(("embed", "heads"), mesh, (64, 64)) == P("fsdp", "tensor")
  assert logical_to_spec(("vocab", "embed"), mesh, (501, 64)) == P(None, "fsdp")
  assert logical_to_spec(("heads", "kv_heads"), mesh, (8, 8)) == P("tensor", None)
  assert logical_to_spec(("batch", None, "embed"), mesh, (8, 3, 64)) == P(("data", "fsdp"), None, None)
  assert logical_to_spec(("batch",), mesh, (6,)) == P("data")
  assert logical_to_spec(("norm",), mesh, (64,)) == P(None)
  assert logical_to_spec(("embed", None), mesh, (64, 4)) == P("fsdp", None)  # a LoRA A [in r]
  with pytest.raises(UserError, match="no rule"):
    logical_to_spec(("experts",), mesh)


@eight_devices
@pytest.mark.parametrize("sizes", MESHES)
def test_every_param_gets_a_legal_sharding(sizes):
  mesh = make_mesh(*sizes)
  model = Decoder(CONFIG, rngs=nnx.Rngs(0))
  state = nnx.state(model)
  shardings = state_shardings(state, mesh)
  placed = shard_pytree(state, shardings)
  flat_sh, flat_placed = dict(nnx.to_flat_state(shardings)), dict(nnx.to_flat_state(placed))
  split_any = False
  for path, var in nnx.to_flat_state(state):
    sharding, value = flat_sh[path].get_value(), flat_placed[path].get_value()
    assert_legal(sharding, var.shape)
    assert value.sharding == sharding, path
    split_any |= sharding.shard_shape(var.shape) != tuple(var.shape)
  assert split_any == (sizes != (8, 1, 1))  # pure data parallelism replicates every param
  if sizes == (1, 1, 8):  # vocab 500 stays whole; k/v kernels [64, 1*16] split 8 ways on their output
    assert flat_sh[("embedding",)].get_value().spec == P(None, "fsdp")
    assert flat_sh[("layers", 0, "attn", "k_proj", "kernel")].get_value().spec == P("fsdp", "tensor")


@eight_devices
def test_optimizer_state_follows_params():
  """Adam moments get their param's sharding (nnx State or pure dict); the count is replicated."""
  mesh = make_mesh(1, 4, 2)
  params = nnx.state(Decoder(CONFIG, rngs=nnx.Rngs(0)), nnx.Param)
  expected = {p: v.get_value().spec for p, v in nnx.to_flat_state(state_shardings(params, mesh))}
  key = ("layers", 0, "mlp", "down_proj", "kernel")
  assert expected[key] == P("tensor", "fsdp")
  for tree in (params, nnx.to_pure_dict(params)):
    train_state = {"step": jnp.int32(0), "params": params, "opt_state": optax.adamw(1e-3).init(tree)}
    shardings = state_shardings(train_state, mesh)
    adam = shardings["opt_state"][0]
    assert adam.count.spec == P() and shardings["step"].spec == P()
    assert specs_by_path(adam.mu) == expected and specs_by_path(adam.nu) == expected
    placed = shard_pytree(train_state, shardings)
    for x, sharding in zip(jax.tree.leaves(placed), jax.tree.leaves(shardings), strict=True):
      assert x.sharding == sharding


def specs_by_path(tree):
  """{param path: PartitionSpec} of a tree of shardings, bare or held in Variables."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  return {tuple(k.key for k in path): (s.get_value() if isinstance(s, nnx.Variable) else s).spec
          for path, s in leaves}


@eight_devices
def test_load_params_with_placement(tmp_path):
  """Loading an exported HF dir straight onto the mesh gives the rule shardings and identical values."""
  mesh = make_mesh(2, 2, 2)
  model = random_model()
  export_hf(model, tmp_path)
  loaded = load_params(CONFIG, SafetensorsSource(tmp_path), place=placement(mesh), progress=False)
  expected = dict(nnx.to_flat_state(state_shardings(nnx.state(model), mesh)))
  original = dict(nnx.to_flat_state(nnx.state(model)))
  place_by_table = placement(mesh, abstract_model(CONFIG))  # for callers that pass no shape
  for path, var in nnx.to_flat_state(nnx.state(loaded)):
    value = var.get_value()
    assert value.sharding == expected[path].get_value() == place_by_table(path, var.logical_axes), path
    np.testing.assert_array_equal(np.asarray(value), np.asarray(original[path].get_value()), err_msg=str(path))


@eight_devices
@pytest.mark.parametrize("sizes", MESHES)
def test_sharded_forward_matches_unsharded(sizes):
  mesh = make_mesh(*sizes)
  model = random_model()
  tokens = np.random.default_rng(0).integers(1, CONFIG.vocab_size, (8, 12)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, 9:] = 0
  reference = np.asarray(model(tokens, mask=mask))

  model.constrain_activations = activation_constraint(mesh)
  graphdef, state = nnx.split(model)
  shardings = state_shardings(state, mesh)
  forward = jax.jit(lambda s, t, m: nnx.merge(graphdef, s)(t, mask=m),
                    in_shardings=(shardings, batch_sharding(mesh, 2), batch_sharding(mesh, 2)),
                    out_shardings=batch_sharding(mesh, 3))
  logits = forward(shard_pytree(state, shardings), local_batch_to_global(tokens, mesh),
                   local_batch_to_global(mask, mesh))
  assert logits.sharding.spec == batch_sharding(mesh, 3).spec
  np.testing.assert_allclose(np.asarray(logits), reference, atol=1e-5, rtol=1e-5)


@eight_devices
def test_local_batch_to_global_single_process():
  mesh = make_mesh(2, 2, 2)
  batch = {"tokens": np.arange(32, dtype=np.int32).reshape(8, 4), "mask": np.ones((8, 4), np.int32)}
  out = local_batch_to_global(batch, mesh)
  assert out["tokens"].shape == (8, 4) and out["tokens"].sharding.spec == P(("data", "fsdp"), None)
  assert len(out["tokens"].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(out["tokens"]), batch["tokens"])
  with pytest.raises(UserError, match="multiple of 4"):
    local_batch_to_global(np.zeros((6, 4)), mesh)
