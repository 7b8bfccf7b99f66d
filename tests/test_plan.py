"""The planner compiles both stage steps on abstract shapes; remat changes memory, never the loss."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from dcr_jax.model import VARIANTS, Decoder, tiny
from dcr_jax.train.losses import masked_cross_entropy

ROOT = Path(__file__).resolve().parents[1]


def run_plan(variant, devices, *extra, tmp_path):
  out = tmp_path / f"{variant}.json"
  proc = subprocess.run([sys.executable, "-m", "dcr_jax.plan", f"--config=configs/gemma.py:{variant}",
                         f"--devices={devices}", f"--out={out}", *extra], cwd=ROOT, capture_output=True, text=True,
                        timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text())


def test_plan_with_scan_on_a_real_size_variant(tmp_path):
  """gemma3-270m laid out as every TPU variant is (scanned layers, full remat), on 8 devices: nothing is allocated,
  the parameter bytes are the variant's exact f32 bytes, and FLOPs come from the unscanned 1- and 2-block
  compilations."""
  result = run_plan("gemma3-270m", 8, "--config.model.scan_layers=True", "--config.model.remat=full",
                    tmp_path=tmp_path)
  assert result["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1} and result["scan_layers"] and result["remat"] == "full"
  abstract = jax.eval_shape(lambda: nnx.state(Decoder(VARIANTS["gemma3-270m"], rngs=nnx.Rngs(0)), nnx.Param))
  exact = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  assert result["stages"]["refine"]["params_bytes"] == exact  # replicated over data: every device holds it all
  for stage in ("refine", "align"):
    r = result["stages"][stage]
    assert r["temp_bytes"] > 0 and r["flops_per_step"] > 0
  # stage 1 trains the embedding and the lower half: its optimizer state dwarfs LoRA's
  assert result["stages"]["refine"]["optimizer_bytes"] > 10 * result["stages"]["align"]["optimizer_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_plan_every_variant(variant, tmp_path):
  result = run_plan(variant, 8, "--config.mesh.data=1", "--config.mesh.fsdp=8", tmp_path=tmp_path)
  assert set(result["stages"]) == {"refine", "align"}


@pytest.mark.slow
def test_scan_and_remat_lower_gemma_7b_temporaries(tmp_path):
  """The memory difference the planner shows for gemma-7b (FSDP 8, the variant's batch): remat under scan."""
  common = ("--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.stages=align")
  plans = {(scan, remat): run_plan("gemma-7b", 8, *common, f"--config.model.scan_layers={scan}",
                                   f"--config.model.remat={remat}", tmp_path=tmp_path)
           for scan, remat in [(True, "full"), (True, "none"), (False, "full")]}
  temps = {key: plan["stages"]["align"]["temp_bytes"] for key, plan in plans.items()}
  assert plans[True, "full"]["scan_layers"] and not plans[False, "full"]["scan_layers"]
  assert temps[True, "full"] < temps[True, "none"]
  assert temps[True, "full"] < temps[False, "full"]


def test_bad_device_count_is_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "dcr_jax.plan", "--config=configs/gemma.py:gemma3-270m", "--devices=8",
                         "--config.mesh.data=3"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "mesh" in proc.stderr


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_keeps_loss_and_gradients(policy):
  tokens = np.random.default_rng(0).integers(1, 512, (2, 10)).astype(np.int32)

  def loss_and_grads(remat):
    model = Decoder(tiny("gemma3", remat=remat), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
      logits = nnx.merge(graphdef, p)(tokens[:, :-1])
      return masked_cross_entropy(logits, tokens[:, 1:], np.ones((2, 9)))[0]

    return jax.jit(jax.value_and_grad(loss))(params)

  (base_loss, base_grads), (loss, grads) = loss_and_grads("none"), loss_and_grads(policy)
  assert float(loss) == float(base_loss)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)  # recompute reorders f32 sums


def test_plan_counts_the_lm_retention_term():
  """The planner compiles the program training runs: stage 1's LM-retention batch adds FLOPs and memory."""
  from dcr_jax.config import base_config
  from dcr_jax.plan import plan

  def planned(lm_weight):
    config = base_config()
    config.model.name, config.model.random_init, config.stages = "tiny-gemma3", True, "refine"
    config.refine.lm_weight = lm_weight
    return plan(config, devices=1)["stages"]["refine"]

  without, with_lm = planned(0.0), planned(0.5)
  assert with_lm["flops_per_step"] > 1.5 * without["flops_per_step"]
  assert with_lm["argument_bytes"] > without["argument_bytes"]  # the LM batch rides in
  assert with_lm["temp_bytes"] > without["temp_bytes"]  # and its full-depth activations and logits


def test_plan_counts_every_microbatch():
  """XLA counts a loop body once; the planner multiplies stage 2's by align.grad_accum (same work, same FLOPs)."""
  from dcr_jax.config import base_config
  from dcr_jax.plan import plan

  def flops(accum):
    config = base_config()
    config.model.name, config.model.random_init, config.stages = "tiny-gemma3", True, "align"
    config.align.grad_accum = accum
    return plan(config, devices=1)["stages"]["align"]["flops_per_step"]

  assert flops(4) == pytest.approx(flops(1), rel=0.05)


def test_plan_kernels_structured_memory():
  """The structured eNTK's plan on a 2-layer tiny Gemma 3 (12 prompts x 64 tokens, |S| = 10): the factor step's arguments are
  the params, the host keeps every prompt's factors, and the per-prompt factors are the run's own."""
  import dataclasses
  import importlib.util

  from dcr_jax import spec as spec_lib
  from dcr_jax.kernels import ntk, structured
  from dcr_jax.plan import plan_kernels

  loader = importlib.util.spec_from_file_location("tiny_config", ROOT / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(loader)
  loader.loader.exec_module(module)
  spec = spec_lib.resolve(module.get_config())
  arch = spec.model.architecture.replace(num_layers=2, layer_types=spec.model.architecture.layer_types[:2])
  spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, architecture=arch))
  k = plan_kernels(spec)
  model = nnx.eval_shape(lambda: Decoder(spec.model.architecture, rngs=nnx.Rngs(0)))
  graphdef, params, rest = ntk.split_params(model, "all")
  assert k["factors"]["arguments"] >= sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
  assert k["host_factors"] == k["prompts"] * k["factors_per_prompt"] and k["prompts"] == 12
  tokens = np.ones((k["chunk_size"], k["width"]), np.int32)
  ids = np.zeros((k["chunk_size"], k["outputs"]), np.int32)
  plan, graphdef, direct, frozen = structured._prepare(graphdef, params, rest, k["width"], k["outputs"], "auto")
  real = jax.eval_shape(lambda: structured._factors(graphdef, plan, direct, frozen, tokens, tokens, ids))
  assert k["factors_per_prompt"] * k["chunk_size"] == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(real))
  assert k["device_peak"] == max(k["factors"]["total"], k["contract"]["total"])
