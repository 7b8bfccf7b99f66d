"""Memory and FLOP planning before paying for a pod: compile the stage steps on abstract shapes, no weights.

python -m dcr_jax.plan --config=configs/gemma.py:VARIANT --devices=N [--kernels] [--out=plan.json] \
    [--config.KEY=VALUE ...]

--kernels adds the memory of a structured eNTK run (`kernels.*` of the config, one device) the same way.
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

import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dcr_jax import spec as spec_lib  # noqa: E402
from dcr_jax import parallel  # noqa: E402
from dcr_jax.spec import TRAINING_STAGES, Spec  # noqa: E402
from dcr_jax.errors import UserError, run_command  # noqa: E402
from dcr_jax.kernels import ntk, structured  # noqa: E402
from dcr_jax.model import Decoder  # noqa: E402
from dcr_jax.pipeline import STAGE_PROGRAMS as PROGRAMS  # noqa: E402
from dcr_jax.train.loop import StageProgram  # noqa: E402
from dcr_jax.train.state import create_state  # noqa: E402


def _define_flags() -> dict:
  """The command line's flags, defined only when run as a program (so `plan()` imports beside dcr_jax.main)."""
  return {"config": config_flags.DEFINE_config_file("config", None,
                                                    "Pipeline config (e.g. configs/gemma.py:gemma-7b)."),
          "devices": flags.DEFINE_integer("devices", 8, "Number of devices to plan for (simulated on CPU)."),
          "out": flags.DEFINE_string("out", "", "Write the plan as JSON here too."),
          "kernels": flags.DEFINE_bool("kernels", False, "Also plan a structured eNTK run (kernels.* config).")}


def _per_device_bytes(tree, shardings) -> int:
  """Bytes one device holds of `tree` under `shardings` (the largest shard of each leaf)."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shape = sharding.shard_shape(leaf.shape)
    total += int(np.prod(shape)) * jnp.dtype(leaf.dtype).itemsize
  return total


def plan_stage(stage: StageProgram, spec: Spec, mesh) -> dict:
  """Compiles one stage's program (the step training runs) on abstract state and batch; returns bytes per device
  and FLOPs per step.

  XLA's cost analysis counts a while loop's body once, so under `scan_layers` the FLOPs come from two small
  unscanned compilations instead (`_scanned_flops`).
  """
  architecture = spec.model.architecture
  graphdefs = []

  def abstract_state():  # traced by eval_shape: no parameter or optimizer memory is allocated
    model = stage.adapt(Decoder(architecture, rngs=nnx.Rngs(0)))
    if spec.mesh.constrain_activations:
      model.constrain_activations = parallel.activation_constraint(mesh)
    graphdef, state = create_state(model, stage.trainable, stage.optimizer, spec.seed)
    graphdefs.append(graphdef)
    return state

  state = jax.eval_shape(abstract_state)
  shardings = parallel.state_shardings(state, mesh)
  batch = stage.batch_shapes
  batch_shardings = {k: parallel.batch_sharding(mesh, len(v.shape), v.shape) for k, v in batch.items()}
  started = time.time()
  compiled = jax.jit(stage.make_step(graphdefs[0]), in_shardings=(shardings, batch_shardings),
                     out_shardings=(shardings, None), donate_argnums=0).lower(state, batch).compile()
  seconds = round(time.time() - started, 1)
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # XLA counts a loop body once: stage 2's microbatch loop (align.grad_accum) runs its body that many times
  flops = float(cost.get("flops", 0.0)) * mesh.size * (spec.align.grad_accum if stage.name == "align" else 1)
  if architecture.scan_layers:
    depth = max(spec.refine.layers) if stage.name == "refine" else architecture.num_layers
    flops = _scanned_flops(stage.name, spec, mesh, depth)
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


def _scanned_flops(name: str, spec: Spec, mesh, depth: int) -> float:
  """FLOPs per step of `depth` blocks, from unscanned 1- and 2-block compilations (exactly linear in depth: every
  block costs the same, local attention being computed densely under a mask)."""
  counts = []
  for n in (1, 2):
    arch = spec.model.architecture
    small = arch.replace(num_layers=n, layer_types=arch.layer_types[:n], scan_layers=False)
    small_spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, architecture=small),
                                     refine=dataclasses.replace(spec.refine, layers=(n,)))
    counts.append(plan_stage(PROGRAMS[name](small_spec, small), small_spec, mesh)["flops_per_step"])
  return counts[0] + (counts[1] - counts[0]) * (depth - 1)


def plan_kernels(spec: Spec) -> dict:
  """Bytes of a `kernels.method=structured` run of the spec's kernel probe (3·n_per_group prompts of at most
  max_len tokens, |S| = top_k, the kernels.params subset) on one device, compiled on abstract shapes: the params,
  one chunk's factor step and one block's contraction (`structured.memory_estimate`), and the factors of every
  prompt, which the run keeps on the host."""
  kc = spec.kernels
  architecture = spec.model.architecture.replace(scan_layers=False)  # the kernels run one Block per layer
  model = nnx.eval_shape(lambda: Decoder(architecture, rngs=nnx.Rngs(0)))
  kw = {"layer": kc.layer} if kc.params == "up_to_layer" else {"last_n": kc.last_n} if kc.params == "last_n" else {}
  graphdef, params, rest = ntk.split_params(model, kc.params, **kw)
  started = time.time()
  est = structured.memory_estimate(graphdef, params, rest, prompts=3 * kc.n_per_group, width=kc.max_len,
                                   outputs=kc.top_k, chunk_size=kc.chunk_size)
  return {"prompts": 3 * kc.n_per_group, "width": kc.max_len, "outputs": kc.top_k, "params": kc.params,
          "chunk_size": min(kc.chunk_size, 3 * kc.n_per_group), **est,
          "compile_seconds": round(time.time() - started, 1)}


def plan(config, devices: int, kernels: bool = False) -> dict:
  """The plan for config.stages' training stages (both when it has none) on `devices` devices of this process, and
  with `kernels` that of a structured eNTK run."""
  spec = spec_lib.resolve(config)
  if not spec.training_stages:
    spec = dataclasses.replace(spec, stages=TRAINING_STAGES)
  if jax.device_count() < devices:
    raise UserError(f"--devices={devices} but JAX sees {jax.device_count()}; run python -m dcr_jax.plan directly "
                    "(it fakes the devices on CPU) or set XLA_FLAGS=--xla_force_host_platform_device_count")
  mesh = parallel.make_mesh(spec.mesh.data, spec.mesh.fsdp, spec.mesh.tensor, devices=jax.devices()[:devices])
  spec_lib.check_batches(spec, mesh)
  arch = spec.model.architecture
  out = {"model": spec.model.name, "devices": devices, "mesh": dict(mesh.shape), "remat": arch.remat,
         "scan_layers": arch.scan_layers, "stages": {}}
  for name in spec.training_stages:
    out["stages"][name] = plan_stage(PROGRAMS[name](spec, arch), spec, mesh)
  if kernels:
    out["kernels"] = plan_kernels(spec)
  return out


def _gib(n: int) -> str:
  return f"{n / 2**30:.2f} GiB"


def _kernel_lines(k: dict | None) -> list[str]:
  if k is None:
    return []
  return [f"structured eNTK ({k['prompts']} prompts x {k['width']} tokens, |S| = {k['outputs']}, params "
          f"{k['params']}, chunks of {k['chunk_size']}), one device: device peak {_gib(k['device_peak'])} (factor "
          f"step {_gib(k['factors']['total'])}, contraction {_gib(k['contract']['total'])}); factors "
          f"{_gib(k['factors_per_prompt'])} per prompt, {_gib(k['host_factors'])} on the host"]


def main(argv):
  if _FLAGS["config"].value is None:
    print("error: --config=FILE[:VARIANT] is required", file=sys.stderr)
    sys.exit(2)

  def body() -> str:
    result = plan(_FLAGS["config"].value, _FLAGS["devices"].value, _FLAGS["kernels"].value)
    if _FLAGS["out"].value:
      with open(_FLAGS["out"].value, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return "\n".join([
        f"{result['model']} on {result['devices']} devices, mesh {result['mesh']}, remat={result['remat']}, "
        f"scan_layers={result['scan_layers']}",
        "| stage | params | optimizer | temporaries | peak (args + temps) | TFLOP/step | compile s |",
        "|---|---|---|---|---|---|---|",
        *(f"| {stage} | {_gib(r['params_bytes'])} | {_gib(r['optimizer_bytes'])} | {_gib(r['temp_bytes'])} | "
          f"{_gib(r['peak_bytes_estimate'])} | {r['flops_per_step'] / 1e12:.2f} | {r['compile_seconds']} |"
          for stage, r in result["stages"].items()),
        "(bytes are per device)", *_kernel_lines(result.get("kernels"))])

  run_command(body)


if __name__ == "__main__":
  _FLAGS = _define_flags()
  app.run(main)
