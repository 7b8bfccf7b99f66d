"""Stage 1 and stage 2 steps on meshes (8,1,1), (1,8,1), (2,2,2) equal the 1-device run, and compile once."""

from multidevice import EIGHT, IN_CHILD, rerun_in_child  # sets XLA_FLAGS before jax starts

import chex  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from dcr_jax import parallel  # noqa: E402
from dcr_jax.data.batching import SFTMixture, SFTSet  # noqa: E402
from dcr_jax.model import Decoder, tiny  # noqa: E402
from dcr_jax.train.state import create_state, trainable_filter  # noqa: E402
from dcr_jax.train.steps import compile_step, make_align_step, make_refine_step  # noqa: E402

eight_devices = pytest.mark.skipif(not EIGHT, reason="runs in the 8-device child (test_in_8_device_subprocess)")
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2)]


@pytest.mark.slow  # over the default run's 15-minute budget; make test-all runs it
@pytest.mark.skipif(EIGHT or IN_CHILD, reason="this process already has 8 devices")
def test_in_8_device_subprocess():
  rerun_in_child(__file__)


def refine_batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 512, (8, 12)).astype(np.int32)
  mask = (np.arange(12)[None] < rng.integers(4, 13, 8)[:, None]).astype(np.int32)
  return {"tokens": tokens * mask, "mask": mask, "labels": np.array([0, 1] * 4, np.int32)}


def align_batch():
  rng = np.random.default_rng(1)
  ids = [rng.integers(1, 512, int(n)).tolist() for n in rng.integers(6, 14, 20)]
  masks = [[0] * (len(i) // 2) + [1] * (len(i) - len(i) // 2) for i in ids]
  return SFTMixture({"g": SFTSet(ids, masks)}, {"g": 1.0}, batch_size=8, max_len=24, seed=0).batch(0)


def stage_setup(stage):
  model = Decoder(tiny("gemma3"), rngs=nnx.Rngs(0))
  opt = optax.sgd(0.5)  # plain SGD: params compare the gradients themselves (Adam amplifies ~0 gradients' noise)
  if stage == "refine":
    graphdef, state = create_state(model, trainable_filter("refine", 3), opt, seed=0)
    step = make_refine_step(graphdef, opt, layers=[3], pooling="last", loss="circle",
                            loss_kwargs={"margin": 0.25, "gamma": 64.0})
    return step, state, refine_batch()
  graphdef, state = create_state(model, trainable_filter("full"), opt, seed=0)
  return make_align_step(graphdef, opt, grad_accum=2), state, align_batch()


def run_on(mesh, stage, calls=2):
  step, state, batch = stage_setup(stage)
  shardings = parallel.state_shardings(state, mesh)
  state = parallel.shard_pytree(state, shardings)
  batch_shardings = {k: parallel.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
  compiled = compile_step(step, shardings, batch_shardings)
  losses = []
  for _ in range(calls):
    state, metrics = compiled(state, parallel.local_batch_to_global(batch, mesh))
    losses.append(float(metrics["loss"]))
  return jax.device_get(state), losses, compiled._cache_size()


@eight_devices
@pytest.mark.parametrize("stage", ["refine", "align"])
def test_sharded_step_equals_single_device(stage):
  single_state, single_losses, _ = run_on(parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1]), stage)
  for shape in MESHES:
    state, losses, compiles = run_on(parallel.make_mesh(*shape), stage)
    np.testing.assert_allclose(losses, single_losses, rtol=1e-5, err_msg=str(shape))
    chex.assert_trees_all_close(state.params, single_state.params, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_equal(state.frozen, single_state.frozen)
    assert compiles == 1, (shape, compiles)
