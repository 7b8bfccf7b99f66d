"""Memory and FLOP planning before paying for a pod: compile the stage steps on abstract shapes, no weights.

python -m dcr_jax.plan --config=configs/gemma.py:VARIANT --devices=N [--out=plan.json] [--config.KEY=VALUE ...]
"""

from __future__ import annotations

import os
import sys


def _fake_devices(argv) -> None:
  """Sets the host device count from --devices before JAX starts (CPU stands in for the target chips)."""
  for arg in argv:
    if arg.startswith("--devices="):
      flag = f"--xla_force_host_platform_device_count={int(arg.split('=', 1)[1])}"
      os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
      os.environ.setdefault("JAX_PLATFORMS", "cpu")


if __name__ == "__main__":
  _fake_devices(sys.argv)

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dcr_jax import parallel  # noqa: E402
from dcr_jax.errors import UserError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pipeline config (e.g. configs/gemma.py:gemma-7b).")
_DEVICES = flags.DEFINE_integer("devices", 8, "Number of devices to plan for (simulated on CPU).")
_OUT = flags.DEFINE_string("out", "", "Write the plan as JSON here too.")


def _per_device_bytes(tree, shardings) -> int:
  """Bytes one device holds of `tree` under `shardings` (the largest shard of each leaf)."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shape = sharding.shard_shape(leaf.shape)
    total += int(np.prod(shape)) * jnp.dtype(leaf.dtype).itemsize
  return total


def _abstract_batch(stage: str, config) -> dict:
  if stage == "refine":
    b, t = config.refine.batch_size, config.refine.max_len
    shapes = {"tokens": (b, t), "mask": (b, t), "labels": (b,)}
  else:
    b, t = config.align.batch_size, config.align.max_len
    shapes = {k: (b, t) for k in ("tokens", "targets", "segments", "positions")}
    shapes["loss_mask"] = (b, t)
  return {k: jax.ShapeDtypeStruct(s, jnp.float32 if k == "loss_mask" else jnp.int32) for k, s in shapes.items()}


def plan_stage(stage: str, config, model_config, mesh, refine_layers=None) -> dict:
  """Compiles one stage's step on abstract state and batch; returns bytes per device and FLOPs per step.

  XLA's cost analysis counts a while loop's body once, so under `scan_layers` the FLOPs come from two small
  unscanned compilations instead (`_scanned_flops`).
  """
  from dcr_jax.model import Decoder
  from dcr_jax.model.lora import attach_lora
  from dcr_jax.train.refine import parse_layers
  from dcr_jax.train.state import create_state, make_optimizer, trainable_filter
  from dcr_jax.train.steps import make_align_step, make_refine_step

  section = config[stage]
  optimizer = make_optimizer(lr=section.lr, steps=section.steps, warmup=section.warmup,
                             weight_decay=section.weight_decay, clip=section.clip)

  def build():
    model = Decoder(model_config, rngs=nnx.Rngs(0))
    if stage == "align" and config.align.lora_rank > 0:
      attach_lora(model, rank=config.align.lora_rank, alpha=config.align.lora_alpha,
                  targets=[t for t in config.align.lora_targets.split(",") if t], rngs=nnx.Rngs(1))
    if config.mesh.constrain_activations:
      model.constrain_activations = parallel.activation_constraint(mesh)
    return model

  if stage == "refine":
    layers = refine_layers or parse_layers(config.refine.layer, model_config.num_layers)
    trainable = trainable_filter("refine", max(layers))
  else:
    trainable = trainable_filter("lora" if config.align.lora_rank > 0 else "full")
  graphdefs = []

  def abstract_state():  # traced by eval_shape: no parameter or optimizer memory is allocated
    graphdef, state = create_state(build(), trainable, optimizer, config.seed)
    graphdefs.append(graphdef)
    return state

  state = jax.eval_shape(abstract_state)
  graphdef = graphdefs[0]
  if stage == "refine":
    step = make_refine_step(graphdef, optimizer, layers=layers, pooling=config.refine.pooling,
                            loss=config.refine.loss, loss_kwargs={"margin": config.refine.margin,
                                                                  "gamma": config.refine.gamma}
                            if config.refine.loss == "circle" else {})
  else:
    step = make_align_step(graphdef, optimizer, grad_accum=config.align.grad_accum)
  shardings = parallel.state_shardings(state, mesh)
  batch = _abstract_batch(stage, config)
  batch_shardings = {k: parallel.batch_sharding(mesh, len(v.shape), v.shape) for k, v in batch.items()}
  started = time.time()
  compiled = jax.jit(step, in_shardings=(shardings, batch_shardings), out_shardings=(shardings, None),
                     donate_argnums=0).lower(state, batch).compile()
  seconds = round(time.time() - started, 1)
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) * mesh.size
  if model_config.scan_layers:
    depth = max(layers) if stage == "refine" else model_config.num_layers
    flops = _scanned_flops(stage, config, model_config, mesh, depth)
  return {
      "params_bytes": _per_device_bytes(state.params, shardings.params) + _per_device_bytes(state.frozen,
                                                                                            shardings.frozen),
      "trained_params_bytes": _per_device_bytes(state.params, shardings.params),
      "optimizer_bytes": _per_device_bytes(state.opt_state, shardings.opt_state),
      "argument_bytes": int(memory.argument_size_in_bytes),
      "output_bytes": int(memory.output_size_in_bytes),
      "temp_bytes": int(memory.temp_size_in_bytes),
      "peak_bytes_estimate": int(memory.argument_size_in_bytes + memory.temp_size_in_bytes),
      "flops_per_step": flops,
      "compile_seconds": seconds,
  }


def _scanned_flops(stage: str, config, model_config, mesh, depth: int) -> float:
  """FLOPs per step of `depth` blocks, from unscanned 1- and 2-block compilations (exactly linear in depth: every
  block costs the same, local attention being computed densely under a mask)."""
  counts = []
  for n in (1, 2):
    small = model_config.replace(num_layers=n, layer_types=model_config.layer_types[:n], scan_layers=False)
    counts.append(plan_stage(stage, config, small, mesh, refine_layers=[n])["flops_per_step"])
  return counts[0] + (counts[1] - counts[0]) * (depth - 1)


def plan(config, devices: int) -> dict:
  """The plan for config.stages' training stages on `devices` devices of this process."""
  from dcr_jax import config as config_lib
  from dcr_jax.pipeline import model_config as model_config_of

  stages = [s for s in config_lib.validate(config) if s in ("refine", "align")] or ["refine", "align"]
  if jax.device_count() < devices:
    raise UserError(f"--devices={devices} but JAX sees {jax.device_count()}; run python -m dcr_jax.plan directly "
                    "(it fakes the devices on CPU) or set XLA_FLAGS=--xla_force_host_platform_device_count")
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                            devices=jax.devices()[:devices])
  config_lib.check_batches(config, stages, mesh)
  model_config = model_config_of(config)
  out = {"model": config.model.name, "devices": devices, "mesh": dict(mesh.shape), "remat": model_config.remat,
         "scan_layers": model_config.scan_layers, "stages": {}}
  for stage in stages:
    out["stages"][stage] = plan_stage(stage, config, model_config, mesh)
  return out


def _gib(n: int) -> str:
  return f"{n / 2**30:.2f} GiB"


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if _CONFIG.value is None:
    print("error: --config=FILE[:VARIANT] is required", file=sys.stderr)
    sys.exit(2)
  try:
    result = plan(_CONFIG.value, _DEVICES.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"{result['model']} on {result['devices']} devices, mesh {result['mesh']}, remat={result['remat']}, "
        f"scan_layers={result['scan_layers']}")
  print("| stage | params | optimizer | temporaries | peak (args + temps) | TFLOP/step | compile s |")
  print("|---|---|---|---|---|---|---|")
  for stage, r in result["stages"].items():
    print(f"| {stage} | {_gib(r['params_bytes'])} | {_gib(r['optimizer_bytes'])} | {_gib(r['temp_bytes'])} | "
          f"{_gib(r['peak_bytes_estimate'])} | {r['flops_per_step'] / 1e12:.2f} | {r['compile_seconds']} |")
  print("(bytes are per device)")
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
