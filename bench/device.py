"""Accelerator benchmark: one prepared run, written for the day a GPU or TPU is at hand (bench/device.sh runs it).

Random-init models at real published sizes, so nothing has to travel but the code:
  mfu       bf16 stage-2 full fine-tuning step (AdamW, every position's loss) on qwen2.5-1.5b- and gemma3-1b-sized
            models: step time, tokens/s and model FLOPs utilisation against the chip's dense bf16 peak (a table
            below, or --peak-tflops) and against a bf16 matmul measured in the same run;
  stage1    stage-1 (Circle loss) step at l = L/2 against l = L on the gemma3-1b-sized model;
  generate  greedy generation, batch 16, 64 new tokens, ours against transformers `generate` on the same device
            with the same architecture in bf16 (torch on CUDA; skipped where torch sees no accelerator);
  entk      the exact eNTK of a gemma-3-270m-sized model, 32 prompts x |S| = 10, all parameters, by the structured
            method when this checkout has it (else jvp_vjp), wall time and device memory.

--smoke shrinks every shape to tiny configs so that the whole script runs on a CPU in about a minute (the test suite
runs it). Writes bench/results/device.json (device_smoke.json with --smoke, or --out); bench/results.py
renders it.

    python bench/device.py [--smoke] [--parts mfu,stage1,generate,entk] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, time_fn, write_json  # noqa: E402

# dense bf16 peak per chip, TFLOP/s (vendor figures, no sparsity)
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L4": 121.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0,
                    "TPU v5p": 459.0, "TPU v4": 275.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0}
FULL = {"mfu": {"models": ("qwen2.5-1.5b", "gemma3-1b"), "batch": 8, "seq": 2048, "steps": 6, "warmup": 2},
        "stage1": {"model": "gemma3-1b", "batch": 32, "seq": 128, "steps": 6, "warmup": 2},
        "generate": {"model": "qwen2.5-1.5b", "batch": 16, "prompt": 128, "new_tokens": 64, "repeats": 3},
        "entk": {"model": "gemma3-270m", "prompts": 32, "top_k": 10, "seq": 32},
        "matmul": 8192}
SMOKE = {"mfu": {"models": ("tiny-qwen2", "tiny-gemma3"), "batch": 2, "seq": 32, "steps": 2, "warmup": 1},
         "stage1": {"model": "tiny-gemma3", "batch": 4, "seq": 16, "steps": 2, "warmup": 1},
         "generate": {"model": "tiny-qwen2", "batch": 2, "prompt": 8, "new_tokens": 4, "repeats": 1},
         "entk": {"model": "tiny-gemma3", "prompts": 4, "top_k": 2, "seq": 8},
         "matmul": 256}


def model_config(name: str, dtype: str, remat: str | None = None):
  """A variant's architecture (or `tiny-FAMILY`) in `dtype`, no scan (one compiled body per layer); remat defaults to
  full in bf16 (the training setting that fits any batch) and none otherwise."""
  from dcr_jax.model import get_variant, tiny

  cfg = tiny(name.removeprefix("tiny-")) if name.startswith("tiny-") else get_variant(name)
  remat = remat or ("full" if dtype == "bfloat16" else "none")
  return cfg.replace(dtype=dtype, param_dtype=dtype, remat=remat)


def timed(fn: Callable[[], Any], steps: int, warmup: int) -> dict:
  """`common.time_fn` with this script's argument names (`fn` blocks itself)."""
  return time_fn(fn, warmup=warmup, repeats=steps, block=lambda _: None)


def chip_peak(override: float | None) -> tuple[float | None, str]:
  """(dense bf16 TFLOP/s, device kind) of device 0; None where the kind is not in the table and not overridden."""
  import jax

  kind = jax.devices()[0].device_kind
  if override:
    return override, kind
  return next((v for k, v in PEAK_BF16_TFLOPS.items() if k.lower() in kind.lower()), None), kind


def measured_matmul_tflops(n: int) -> float:
  """bf16 n x n x n matmul throughput, TFLOP/s (median of 10 after 3 warm-ups)."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  dot = jax.jit(lambda x, y: (x @ y).astype(jnp.bfloat16))
  res = timed(lambda: dot(a, b).block_until_ready(), steps=10, warmup=3)
  return 2 * n ** 3 / res["median_s"] / 1e12


def step_flops(cfg, b: int, t: int, depth: int | None = None, head: bool = True) -> float:
  """Model FLOPs of one training step: 3 x forward matmuls, causal attention counted in full (T x T)."""
  depth = cfg.num_layers if depth is None else depth
  d, h = cfg.embed_dim, cfg.head_dim
  per_layer = d * cfg.num_heads * h + 2 * d * cfg.num_kv_heads * h + cfg.num_heads * h * d + 3 * d * cfg.mlp_dim
  forward = 2.0 * b * t * (per_layer * depth + (d * cfg.vocab_size if head else 0))
  forward += 4.0 * b * t * t * cfg.num_heads * h * depth
  return 3.0 * forward


def bench_mfu(p: dict, peak: float | None, matmul: float, remat: str | None = None) -> dict:
  """bf16 stage-2 full fine-tuning steps at the real sizes: time, tokens/s, MFU."""
  import jax
  import numpy as np
  from flax import nnx

  from dcr_jax.model import Decoder
  from dcr_jax.train.state import create_state, make_optimizer, trainable_filter
  from dcr_jax.train.steps import make_align_step

  out = {}
  for name in p["models"]:
    cfg = model_config(name, "bfloat16", remat)
    b, t = p["batch"], p["seq"]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((b, t), np.float32),
             "segments": np.ones((b, t), np.int32), "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))}
    batch = jax.device_put({k: np.ascontiguousarray(v) for k, v in batch.items()})
    optimizer = make_optimizer(lr=1e-5, steps=1000, warmup=10, weight_decay=0.01, clip=1.0)
    graphdef, state = create_state(Decoder(cfg, rngs=nnx.Rngs(0)), trainable_filter("full"), optimizer, 0)
    step = jax.jit(make_align_step(graphdef, optimizer), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    box = {"state": state}

    def call():
      box["state"], metrics = compiled(box["state"], batch)
      jax.block_until_ready(metrics["loss"])

    res = timed(call, p["steps"], p["warmup"])
    flops = step_flops(cfg, b, t)
    achieved = flops / res["median_s"] / 1e12
    out[name] = {**res, "compile_s": compile_s, "batch": b, "seq": t, "remat": cfg.remat,
                 "params": int(sum(x.size for x in jax.tree.leaves(box["state"].params))),
                 "model_tflops_per_step": flops / 1e12, "achieved_tflops": achieved,
                 "tokens_per_s": b * t / res["median_s"], "mfu": achieved / peak if peak else None,
                 "fraction_of_measured_matmul": achieved / matmul}
    del box, state, compiled
  return out


def bench_stage1(p: dict) -> dict:
  """Stage-1 step at l = L/2 against l = L (embedding and blocks below l trained, bf16)."""
  import jax
  import numpy as np
  from flax import nnx

  from dcr_jax.model import Decoder
  from dcr_jax.train.state import create_state, layers_up_to, make_optimizer
  from dcr_jax.train.steps import make_refine_step

  cfg = model_config(p["model"], "bfloat16")
  b, t = p["batch"], p["seq"]
  rng = np.random.default_rng(1)
  batch = jax.device_put({"tokens": rng.integers(1, cfg.vocab_size, (b, t)).astype(np.int32),
                          "mask": np.ones((b, t), np.int32), "labels": np.arange(b, dtype=np.int32) % 2})
  out = {}
  for layer in (cfg.num_layers // 2, cfg.num_layers):
    optimizer = make_optimizer(lr=1e-5, steps=1000, warmup=10, weight_decay=0.0, clip=1.0)
    graphdef, state = create_state(Decoder(cfg, rngs=nnx.Rngs(0)), layers_up_to(layer), optimizer, 0)
    step = jax.jit(make_refine_step(graphdef, optimizer, layers=[layer], pooling="last", loss="circle",
                                    loss_kwargs={"margin": 0.25, "gamma": 64.0}), donate_argnums=0)
    box = {"state": state}

    def call():
      box["state"], metrics = step(box["state"], batch)
      jax.block_until_ready(metrics["loss"])

    out[f"l{layer}"] = {**timed(call, p["steps"], p["warmup"]), "layer": layer}
    del box, state
  half, full = out[f"l{cfg.num_layers // 2}"], out[f"l{cfg.num_layers}"]
  return {"model": p["model"], "batch": b, "seq": t, "cases": out, "half_over_full": half["median_s"] / full["median_s"]}


def bench_generate(p: dict) -> dict:
  """Greedy generation tokens/s, ours against transformers on the same device, bf16, same architecture."""
  import numpy as np
  from flax import nnx

  from dcr_jax.evaluate.generate import generate
  from dcr_jax.model import Decoder

  cfg = model_config(p["model"], "bfloat16").replace(remat="none")
  rng = np.random.default_rng(2)
  prompts = [rng.integers(1, cfg.vocab_size, p["prompt"]).tolist() for _ in range(p["batch"])]
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  n = p["new_tokens"]
  ours = timed(lambda: generate(model, prompts, max_new_tokens=n, stop_ids=[], bucket=p["prompt"]), p["repeats"], 1)
  out = {"model": p["model"], "batch": p["batch"], "prompt": p["prompt"], "new_tokens": n,
         "ours": {**ours, "tokens_per_s": p["batch"] * n / ours["median_s"]}}
  try:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dcr_jax.weights.hf_config import to_hf_config
  except ImportError as e:
    return {**out, "transformers": None, "skipped": f"transformers/torch not importable: {e}"}
  device = "cuda" if torch.cuda.is_available() else None
  if device is None:
    return {**out, "transformers": None, "skipped": "torch sees no CUDA device"}
  hf_cfg = to_hf_config(cfg)
  hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_cfg), dtype=torch.bfloat16).to(device).eval()
  ids = torch.tensor(prompts, dtype=torch.long, device=device)

  def theirs():
    with torch.inference_mode():
      hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                  min_new_tokens=n, pad_token_id=0)
    torch.cuda.synchronize()

  res = timed(theirs, p["repeats"], 1)
  out["transformers"] = {**res, "tokens_per_s": p["batch"] * n / res["median_s"]}
  out["ours_over_transformers"] = out["ours"]["tokens_per_s"] / out["transformers"]["tokens_per_s"]
  return out


def bench_entk(p: dict) -> dict:
  """Exact first-token eNTK, all parameters, float32: wall time (first call, compile included, and a second)."""
  import jax
  import numpy as np
  from flax import nnx

  from dcr_jax.kernels import ntk
  from dcr_jax.model import Decoder

  cfg = model_config(p["model"], "float32")
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = ntk.split_params(model, "all")
  f = ntk.first_token_logits_fn(graphdef, rest)
  rng = np.random.default_rng(3)
  tokens = rng.integers(1, cfg.vocab_size, (p["prompts"], p["seq"])).astype(np.int32)
  mask = np.ones_like(tokens)
  ids = rng.choice(cfg.vocab_size, p["top_k"], replace=False)
  method = "structured" if "structured" in getattr(ntk, "METHODS", ()) else "jvp_vjp"
  out = {"model": p["model"], "prompts": p["prompts"], "top_k": p["top_k"], "seq": p["seq"], "method": method,
         "params": int(sum(x.size for x in jax.tree.leaves(params)))}
  for label in ("first_s", "second_s"):
    t0 = time.perf_counter()
    kernel = np.asarray(ntk.logit_kernel(f, params, tokens, mask, ids, method=method, progress=False))
    out[label] = time.perf_counter() - t0
  out["kernel_shape"] = list(kernel.shape)  # [N N S S]
  square = kernel.transpose(0, 2, 1, 3).reshape(p["prompts"] * p["top_k"], -1)
  out["asymmetry"] = float(np.abs(square - square.T).max() / np.abs(square).max())
  eigenvalues = np.linalg.eigvalsh((square + square.T) / 2)
  out["min_over_max_eigenvalue"] = float(eigenvalues[0] / np.abs(eigenvalues).max())
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
  out["device_peak_bytes"] = stats.get("peak_bytes_in_use") if stats else None
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script end to end on a CPU")
  p.add_argument("--parts", default="mfu,stage1,generate,entk")
  p.add_argument("--remat", choices=("full", "dots", "none"), default=None,
                 help="the mfu part's rematerialisation (default full: recompute each block in the backward pass)")
  p.add_argument("--batch", type=int, default=None, help="the mfu part's batch (default 8 sequences of 2048)")
  p.add_argument("--models", default=None, help="the mfu part's models, comma-separated (default both sizes)")
  p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of one chip, if not in the table")
  p.add_argument("--out", default=None, help="default bench/results/device.json (device_smoke.json with --smoke)")
  args = p.parse_args(argv)
  args.out = args.out or str(Path(__file__).resolve().parent / "results" /
                             ("device_smoke.json" if args.smoke else "device.json"))
  parts = [x.strip() for x in args.parts.split(",") if x.strip()]
  unknown = sorted(set(parts) - {"mfu", "stage1", "generate", "entk"})
  if unknown:
    p.error(f"--parts: unknown {', '.join(unknown)}; choose from mfu, stage1, generate, entk")
  sizes = SMOKE if args.smoke else FULL
  if args.models:
    sizes = {**sizes, "mfu": {**sizes["mfu"], "models": tuple(m.strip() for m in args.models.split(",") if m.strip())}}
  if args.batch:
    sizes = {**sizes, "mfu": {**sizes["mfu"], "batch": args.batch}}
  started = time.perf_counter()
  peak, kind = chip_peak(args.peak_tflops)
  matmul = measured_matmul_tflops(sizes["matmul"])
  print(f"# {kind}: bf16 peak {peak} TFLOP/s (table), measured {sizes['matmul']}^3 matmul {matmul:.1f} TFLOP/s",
        flush=True)
  report: dict[str, Any] = {"bench": "device", "smoke": args.smoke, "argv": sys.argv[1:], "device_kind": kind, "peak_bf16_tflops": peak,
                            "measured_matmul_tflops": matmul, "machine": machine_info(), "sizes": sizes,
                            "results": {}}
  failed: list[str] = []
  runners = {"mfu": lambda: bench_mfu(sizes["mfu"], peak, matmul, args.remat), "stage1": lambda: bench_stage1(sizes["stage1"]),
             "generate": lambda: bench_generate(sizes["generate"]), "entk": lambda: bench_entk(sizes["entk"])}
  for part in parts:
    t0 = time.perf_counter()
    print(f"# {part} ...", flush=True)
    try:
      report["results"][part] = runners[part]()
    except Exception as e:  # one prepared run on a lent machine: a failing part must not lose the others
      traceback.print_exc()
      report["results"][part] = {"error": f"{type(e).__name__}: {e}"[:2000]}
      failed.append(part)
    report["results"][part]["part_s"] = time.perf_counter() - t0
    write_json(args.out, report)  # each part lands on disk as soon as it is done
  report["total_s"] = time.perf_counter() - started
  mfu = report["results"].get("mfu", {})
  for name, r in mfu.items():
    if isinstance(r, dict) and "mfu" in r:
      print(f"{name}: step {r['median_s']:.3f} s, {r['tokens_per_s']:.0f} tok/s, {r['achieved_tflops']:.1f} TFLOP/s, "
            f"MFU {r['mfu'] if r['mfu'] is None else round(100 * r['mfu'], 1)}%")
  print(f"wrote {write_json(args.out, report)} in {report['total_s']:.0f} s")
  if failed:
    raise SystemExit(f"bench/device.py: parts failed: {', '.join(failed)} (errors in {args.out})")
  return report


if __name__ == "__main__":
  main()
