"""Train-step speed of dcr_jax on CPU, gemma-3-270m in float32 (real weights), against transformers + torch.

Measures in one run:
  (1) stage 2, FULL fine-tuning with AdamW (+ global-norm clipping), on the default config's real stage-2 batch
      [batch, seq] (packed chat-templated pairs, loss on response tokens only): our jitted align step (state
      donated; the head runs only at the loss positions) vs transformers + torch doing the same (train(), forward
      with the same positions and a block-diagonal mask, so the losses agree, CE over the response tokens of
      all-position logits, backward, clip_grad_norm_, AdamW.step, zero_grad). Ratio = torch time / our time. Our
      step with the head at every position is timed beside it. The torch side runs in a subprocess (so that the
      ~9 GiB working sets never coexist and each peak RSS is its own).
  (2) achieved FLOP/s of our stage-2 step as a fraction of this CPU's measured fp32 matmul peak; FLOPs from XLA's
      cost analysis of the compiled step, cross-checked by an analytic count (3 x forward matmul FLOPs).
  (3) stage 1 (contrastive refine, circle loss, last-token pooling) at l = L/2 vs at l = L: with the default filter
      (embedding 262144 x 640 + blocks < l trained) and with the embedding frozen (blocks < l only), to show how much
      of the step is the embedding's gradient and AdamW update, which do not shrink with l. The l = L/2 and l = L
      steps are timed interleaved (alternating, order rotated each round) so that both see the same contention.

Every timed step records wall time, this process's CPU time, and how many cores *other* processes kept busy meanwhile
(`common.CpuMonitor`), because the benchmark machine is often shared: read the ratios together with that column.
The CPU-time column is a contention-robust second view (XLA and OpenMP worker threads may spin, so it is not exact).

    .venv/bin/python bench/train_step.py [--batch 8] [--seq 128] [--warmup 2] [--repeats 3]
        [--s1-warmup 1] [--s1-repeats 3] [--parts stage2,torch,stage1] [--out bench/results/train_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (CpuMonitor, format_table, load_average, machine_info, matmul_peak,  # noqa: E402
                    peak_rss_mib, wait_for_quiet, write_json)

LR, WEIGHT_DECAY, CLIP = 1e-5, 0.01, 1.0


# --------------------------------------------------------------------------------------------------------------------
# shared pieces


def time_interleaved(calls: dict[str, Callable[[], Any]], *, warmup: int, repeats: int, quiet_wait: float = 0.0,
                     ) -> dict[str, dict[str, Any]]:
  """Runs every `call` (each must block until its step is done) in rounds, warmup + repeats rounds, the order
  rotated each round so that load from other processes hits all cases alike; per step: wall, CPU, contention."""
  names = list(calls)
  rec = {n: {"walls": [], "cpus": [], "others": [], "warm": []} for n in names}
  waited = 0.0
  for i in range(warmup + repeats):
    timed = i >= warmup
    order = names[i % len(names):] + names[:i % len(names)]
    for name in order:
      if timed and quiet_wait > 0:
        waited += wait_for_quiet(quiet_wait)
      before, cpu0 = CpuMonitor.snapshot(), time.process_time()
      calls[name]()
      after, cpu1 = CpuMonitor.snapshot(), time.process_time()
      wall, busy = after[0] - before[0], CpuMonitor.other_cores(before, after)
      r = rec[name]
      if timed:
        r["walls"].append(wall)
        r["cpus"].append(cpu1 - cpu0)
        r["others"].append(busy)
      else:
        r["warm"].append(wall)
      print(f"#   {name} step {i + 1}/{warmup + repeats}{'' if timed else ' (warm-up)'}: {wall:.2f}s wall, "
            f"{cpu1 - cpu0:.2f}s cpu, others {'?' if busy is None else f'{busy:.1f}'} cores", flush=True)
  out = {}
  for name, r in rec.items():
    busy = [b for b in r["others"] if b is not None]
    out[name] = {"median_s": statistics.median(r["walls"]), "min_s": min(r["walls"]), "max_s": max(r["walls"]),
                 "times_s": [round(x, 4) for x in r["walls"]], "warmup_times_s": [round(x, 4) for x in r["warm"]],
                 "cpu_median_s": statistics.median(r["cpus"]), "cpu_times_s": [round(x, 4) for x in r["cpus"]],
                 "other_cores_busy": [None if b is None else round(b, 2) for b in r["others"]],
                 "other_cores_busy_median": statistics.median(busy) if busy else None,
                 "quiet_waited_s": waited, "warmup": warmup, "repeats": repeats,
                 "interleaved_with": [n for n in names if n != name]}
  return out


def time_steps(call: Callable[[], Any], *, warmup: int, repeats: int, quiet_wait: float = 0.0,
               label: str = "") -> dict[str, Any]:
  """`time_interleaved` for one case."""
  res = time_interleaved({label: call}, warmup=warmup, repeats=repeats, quiet_wait=quiet_wait)[label]
  res.pop("interleaved_with")
  return res


def sft_batch(b: int, t: int, seed: int):
  """numpy stage-2 batch `seed` of the default config's data (configs/gemma.py: general + safety pairs, chat
  template, packed rows, loss on response tokens only), built by dcr_jax's own stage-2 data path."""
  import importlib.util

  from dcr_jax.spec import resolve
  from dcr_jax.train import align
  from dcr_jax.weights import embedded_gguf_path, load_tokenizer
  from dcr_jax.weights.sources import GGUFSource

  path = Path(__file__).resolve().parents[1] / "configs" / "gemma.py"
  module_spec = importlib.util.spec_from_file_location("gemma_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config()
  config.align.batch_size, config.align.max_len, config.align.grad_accum = b, t, 1
  spec = resolve(config)
  tokenizer = load_tokenizer(GGUFSource(embedded_gguf_path()), None, spec.model.chat_template)
  return align.load_data(spec, tokenizer).mixture.batch(seed)


def with_loss_index(batch: dict) -> dict:
  """The batch plus `loss_index` (one group: this bench runs on one device), as stage 2 builds it."""
  import numpy as np

  from dcr_jax.train.align import loss_index, loss_width

  b, t = batch["loss_mask"].shape
  width = loss_width(np.count_nonzero(batch["loss_mask"], axis=1), b, t)
  return {**batch, "loss_index": loss_index(batch["loss_mask"], b, width)}


def block_diagonal_mask(segments):
  """[B T] segment ids -> additive float mask [B 1 T T] for transformers: causal within a segment, padding (0) out."""
  import numpy as np

  seg = np.asarray(segments)
  allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0) & np.tril(np.ones((seg.shape[1],) * 2, bool))
  allowed |= np.eye(seg.shape[1], dtype=bool)[None]  # a padding query attends to itself (no all-masked row)
  return np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None]


def refine_batch(vocab: int, b: int, t: int, seed: int):
  """numpy stage-1 batch: right-padded rows of lengths in [t/2, t] (the longest is t), labels alternating 0/1."""
  import numpy as np

  rng = np.random.default_rng(seed + 1)
  tokens = rng.integers(0, vocab, (b, t), dtype=np.int64).astype(np.int32)
  lengths = rng.integers(t // 2, t + 1, (b,))
  lengths[0] = t
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)
  return {"tokens": tokens * mask, "mask": mask, "labels": (np.arange(b) % 2).astype(np.int32)}


def analytic_flops(cfg, b: int, t: int, *, depth: int, head: bool, head_rows: int | None = None) -> dict[str, float]:
  """Matmul FLOPs of a training step = 3 x forward (backward = 2 x forward); full causal T x T attention counted;
  the head at `head_rows` positions (default all b x t)."""
  d, f, n, k, h = cfg.embed_dim, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  tokens = b * t
  per_layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f
  projections = 2.0 * per_layer * depth * tokens
  attention = 2.0 * 2 * b * n * t * t * h * depth
  logits = 2.0 * d * cfg.vocab_size * (tokens if head_rows is None else head_rows) if head else 0.0
  fwd = projections + attention + logits
  return {"forward": fwd, "projections_fwd": projections, "attention_fwd": attention, "head_fwd": logits,
          "total": 3.0 * fwd, "params_in_matmuls": per_layer * depth + (d * cfg.vocab_size if head else 0)}


def xla_cost(compiled) -> dict[str, float | None]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  cost = cost or {}
  return {"flops": float(cost["flops"]) if "flops" in cost else None,
          "bytes_accessed": float(cost["bytes accessed"]) if "bytes accessed" in cost else None}


def cpu_matmul_probe(n: int, repeats: int = 6) -> dict[str, float]:
  """A jitted n x n fp32 jnp.dot: GFLOP per wall second and per second of this process's CPU time."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
  bm = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
  dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
  r = time_steps(lambda: jax.block_until_ready(dot(a, bm)), warmup=2, repeats=repeats, label="matmul-cpu")
  flops = 2.0 * n ** 3
  return {"gflops_wall": flops / r["median_s"] / 1e9, "gflops_per_cpu_s": flops / r["cpu_median_s"] / 1e9,
          "other_cores_busy_median": r["other_cores_busy_median"]}


# --------------------------------------------------------------------------------------------------------------------
# ours


def run_ours(args, model, cfg, phases: dict, rss: dict) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from dcr_jax.train.state import create_state, layers_up_to, make_optimizer, trainable_filter
  from dcr_jax.train.steps import make_align_step, make_refine_step

  optimizer = make_optimizer(lr=LR, steps=1000, warmup=10, weight_decay=WEIGHT_DECAY, clip=CLIP)
  graphdef_m, master = nnx.split(model)
  b, t = args.batch, args.seq
  out: dict[str, Any] = {}

  def fresh_model():
    # the step donates its state; copy the weights so every case starts from the loaded model
    return nnx.merge(graphdef_m, jax.tree.map(jnp.copy, master))

  def prepare(name: str, make_step: Callable, trainable, batch: dict) -> dict:
    print(f"# {name}: compiling", flush=True)
    graphdef, state = create_state(fresh_model(), trainable, optimizer, args.seed)
    n_trained = sum(x.size for x in jax.tree.leaves(state.params))
    step = make_step(graphdef, optimizer)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    case = {"state": state, "losses": [], "compiled": compiled, "compile_s": time.perf_counter() - t0,
            "trained_params": int(n_trained)}

    def call():
      case["state"], metrics = compiled(case["state"], batch)
      case["losses"].append(float(metrics["loss"]))  # blocks until the step is done

    case["call"] = call
    return case

  def finish(name: str, case: dict, timing: dict, flops_analytic: dict) -> dict:
    cost = xla_cost(case["compiled"])
    meta = {"compile_s": case["compile_s"], "trained_params": case["trained_params"],
            "loss_first_step": case["losses"][0], "losses": case["losses"]}
    case.clear()  # drops the state and the executable
    flops = cost["flops"] or flops_analytic["total"]
    rss[f"after_{name}"] = peak_rss_mib()
    return {**timing, **meta, "xla_cost": cost, "flops_analytic": flops_analytic, "flops_used": flops,
            "gflops": flops / timing["median_s"] / 1e9, "gflops_per_cpu_s": flops / timing["cpu_median_s"] / 1e9}

  def run_group(specs: dict[str, tuple], warmup: int, repeats: int) -> dict[str, dict]:
    """specs: name -> (make_step, trainable, flops_analytic, batch); the cases' steps are timed interleaved."""
    cases = {name: prepare(name, make, trainable, {k: jnp.asarray(v) for k, v in batch.items()})
             for name, (make, trainable, _, batch) in specs.items()}
    timings = time_interleaved({n: c["call"] for n, c in cases.items()}, warmup=warmup, repeats=repeats,
                               quiet_wait=args.quiet_wait)
    return {name: finish(name, cases[name], timings[name], specs[name][2]) for name in specs}

  if "stage2" in phases:
    batch = sft_batch(b, t, args.seed)
    sparse = with_loss_index(batch)
    loss_rows = int(sparse["loss_index"].size)
    step = lambda g, o: make_align_step(g, o, grad_accum=1)
    full = trainable_filter("full")
    cases = {"ours_stage2_full": (step, full, analytic_flops(cfg, b, t, depth=cfg.num_layers, head=True,
                                                              head_rows=loss_rows), sparse),
             "ours_stage2_full_all_positions": (step, full, analytic_flops(cfg, b, t, depth=cfg.num_layers,
                                                                           head=True), batch)}
    res = run_group(cases, args.warmup, args.repeats)
    out["stage2_full"] = {**res["ours_stage2_full"], "head_rows": loss_rows,
                          "loss_tokens": int(np.count_nonzero(batch["loss_mask"]))}
    out["stage2_full_all_positions"] = {**res["ours_stage2_full_all_positions"], "head_rows": b * t}
    del batch, sparse

  if "stage1" in phases:
    batch = refine_batch(cfg.vocab_size, b, t, args.seed)
    half = args.layer or cfg.num_layers // 2

    def blocks_only(layer):
      def keep(path, variable) -> bool:
        return isinstance(variable, nnx.Param) and path[0] == "layers" and int(path[1]) < layer
      return keep

    def make(layer):
      return lambda g, o: make_refine_step(g, o, layers=[layer], pooling="last", loss="circle",
                                           loss_kwargs={"margin": 0.25, "gamma": 64.0})

    # l = L/2 and l = L are timed interleaved (same contention), first with the embedding trained, then frozen
    for frozen_emb in (False, True):
      suffix = "_frozen_emb" if frozen_emb else ""
      specs = {f"ours_stage1_l{layer}{suffix}": (make(layer), blocks_only(layer) if frozen_emb else layers_up_to(layer),
                                                 analytic_flops(cfg, b, t, depth=layer, head=False), batch)
               for layer in (half, cfg.num_layers)}
      for name, res in run_group(specs, args.s1_warmup, args.s1_repeats).items():
        out[name[5:]] = {**res, "layer": int(name.split("_l")[1].split("_")[0]), "embedding_trained": not frozen_emb}
    del batch
  return out


# --------------------------------------------------------------------------------------------------------------------
# transformers + torch (subprocess)


def torch_worker(args) -> dict:
  """Loads the HF model from the same GGUF, runs the stage-2 full fine-tuning step, returns timings."""
  import numpy as np
  import torch
  from transformers import AutoModelForCausalLM
  from transformers.utils import logging as hf_logging

  import dcr_jax.weights

  torch.set_num_threads(args.threads)
  hf_logging.set_verbosity_error()
  hf_logging.disable_progress_bar()
  path = dcr_jax.weights.embedded_gguf_path()
  t0 = time.perf_counter()
  hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
  load_s = time.perf_counter() - t0
  hf.train()
  n_params = sum(p.numel() for p in hf.parameters())
  opt = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
  batch = sft_batch(args.batch, args.seq, args.seed)
  tokens = torch.from_numpy(batch["tokens"].astype(np.int64))
  positions = torch.from_numpy(batch["positions"].astype(np.int64))
  attention = torch.from_numpy(block_diagonal_mask(batch["segments"]))
  targets = torch.from_numpy(batch["targets"].astype(np.int64))
  mask = torch.from_numpy(batch["loss_mask"])
  losses, parts = [], []

  def call():
    t_a = time.perf_counter()
    logits = hf(input_ids=tokens, position_ids=positions, attention_mask=attention).logits
    nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            reduction="none")
    loss = (nll * mask.reshape(-1)).sum() / mask.sum().clamp_min(1)
    t_b = time.perf_counter()
    loss.backward()
    t_c = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(loss.detach()))
    parts.append({"forward_s": t_b - t_a, "backward_s": t_c - t_b, "optimizer_s": time.perf_counter() - t_c})

  timing = time_steps(call, warmup=args.warmup, repeats=args.repeats, quiet_wait=args.quiet_wait,
                      label="torch_stage2_full")
  timed_parts = parts[args.warmup:]
  return {**timing, "load_s": load_s, "trained_params": int(n_params), "loss_first_step": losses[0],
          "losses": losses, "attn_implementation": hf.config._attn_implementation, "threads": torch.get_num_threads(),
          "parts_median_s": {k: statistics.median(p[k] for p in timed_parts) for k in timed_parts[0]},
          "peak_rss_mib": vm_hwm_mib()}


def vm_hwm_mib() -> float | None:
  """This process's peak RSS from /proc/self/status (VmHWM). Unlike ru_maxrss, it is not inherited across exec
  (Linux carries the parent's ru_maxrss into a fork+exec'd child), so a subprocess reports its own peak."""
  try:
    for line in Path("/proc/self/status").read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  except (OSError, ValueError):
    pass
  return None


def run_torch_subprocess(args) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    result = Path(tmp) / "torch.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--torch-worker", str(result), "--batch", str(args.batch),
           "--seq", str(args.seq), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--seed", str(args.seed), "--quiet-wait", str(args.quiet_wait)]
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
      print(proc.stderr[-4000:], file=sys.stderr)
      raise RuntimeError(f"torch worker failed with exit status {proc.returncode}")
    return json.loads(result.read_text())


# --------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="gemma3-270m")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--warmup", type=int, default=2, help="stage-2 untimed steps (ours and torch)")
  p.add_argument("--repeats", type=int, default=3, help="stage-2 timed steps (ours and torch)")
  p.add_argument("--s1-warmup", type=int, default=1, help="stage-1 untimed steps per case")
  p.add_argument("--s1-repeats", type=int, default=3, help="stage-1 timed steps per case")
  p.add_argument("--layer", type=int, default=None, help="stage-1 layer l (default L/2)")
  p.add_argument("--parts", default="stage2,torch,stage1", help="comma list of stage2, torch, stage1")
  p.add_argument("--matmul-n", type=int, default=2048)
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (XLA uses all cores)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quiet-wait", type=float, default=0.0,
                 help="before each timed step, wait up to this many seconds for other processes to go idle")
  p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "train_step.json"))
  p.add_argument("--torch-worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args.torch_worker:
    res = torch_worker(args)
    Path(args.torch_worker).write_text(json.dumps(res))
    return res

  t_start = time.perf_counter()
  phases = {x.strip() for x in args.parts.split(",") if x.strip()}
  import jax  # noqa: F401

  info = machine_info()
  print(f"# {info['cpu']} x{info['cpu_count']} | jax {info['versions']['jax']} | torch {info['versions']['torch']} | "
        f"transformers {info['versions']['transformers']} | load {info['load_average_at_start']}", flush=True)

  def probe_peak() -> dict:
    before = CpuMonitor.snapshot()
    pk = matmul_peak(args.matmul_n, repeats=8, torch_threads=args.threads)
    pk["other_cores_busy"] = CpuMonitor.other_cores(before, CpuMonitor.snapshot())
    pk["jax_cpu_time"] = cpu_matmul_probe(args.matmul_n)
    return pk

  peaks = [probe_peak()]
  print(f"# fp32 matmul {args.matmul_n}^2: jax {peaks[0]['jax']['gflops']:.1f}, torch {peaks[0]['torch']['gflops']:.1f} "
        f"GFLOP/s (others busy {peaks[0]['other_cores_busy'] or 0:.1f} cores); jax "
        f"{peaks[0]['jax_cpu_time']['gflops_per_cpu_s']:.1f} GFLOP per CPU-second", flush=True)
  rss = {"after_matmul_peak": peak_rss_mib()}

  from dcr_jax import load_model

  results: dict[str, Any] = {}
  cfg = None
  load_ours_s = None
  if phases & {"stage2", "stage1"}:
    t0 = time.perf_counter()
    model, _ = load_model(args.model, progress=False)
    load_ours_s = time.perf_counter() - t0
    cfg = model.config
    rss["after_ours_load"] = peak_rss_mib()
    if "stage2" in phases:
      results.update(run_ours(args, model, cfg, {"stage2"}, rss))
  if "torch" in phases:
    print("# torch: loading transformers model in a subprocess", flush=True)
    results["torch_stage2_full"] = run_torch_subprocess(args)
  if "stage1" in phases:
    results.update(run_ours(args, model, cfg, {"stage1"}, rss))
  if cfg is not None:
    del model
  rss["end_ours_process"] = peak_rss_mib()

  peaks.append(probe_peak())
  peak_gflops = max(pk["peak_gflops"] for pk in peaks)
  peak_per_cpu_s = max(pk["jax_cpu_time"]["gflops_per_cpu_s"] for pk in peaks)
  for name, r in results.items():
    if name.startswith("torch") or "flops_used" not in r:
      continue
    r["fraction_of_peak"] = r["gflops"] / peak_gflops
    r["best_fraction_of_peak"] = r["flops_used"] / r["min_s"] / 1e9 / peak_gflops
    r["cpu_time_fraction_of_jax_dot"] = r["gflops_per_cpu_s"] / peak_per_cpu_s
    # the peak probe whose contention was closest to this case's (a step that ran on one free core compared with
    # a matmul that had both cores, or the reverse, says more about the neighbours than about the step)
    if r["other_cores_busy_median"] is not None and all(pk["other_cores_busy"] is not None for pk in peaks):
      near = min(peaks, key=lambda pk: abs(pk["other_cores_busy"] - r["other_cores_busy_median"]))
      r["fraction_of_peak_same_contention"] = r["gflops"] / near["peak_gflops"]
      r["same_contention_peak"] = {"gflops": near["peak_gflops"], "other_cores_busy": near["other_cores_busy"]}

  # --- summary -----------------------------------------------------------------------------------------------------
  summary: dict[str, Any] = {}
  ours2, torch2 = results.get("stage2_full"), results.get("torch_stage2_full")
  if ours2 and torch2:
    summary["stage2_torch_over_ours"] = torch2["median_s"] / ours2["median_s"]
    summary["stage2_torch_over_ours_min"] = torch2["min_s"] / ours2["min_s"]
    summary["stage2_torch_over_ours_cpu_time"] = torch2["cpu_median_s"] / ours2["cpu_median_s"]
    if torch2["trained_params"]:
      summary["trained_params_ours_vs_torch"] = [ours2["trained_params"], torch2["trained_params"]]
  every = results.get("stage2_full_all_positions")
  if ours2 and every:
    summary["stage2_all_positions_over_response_only"] = every["median_s"] / ours2["median_s"]
  if ours2:
    summary["stage2_fraction_of_peak"] = ours2["fraction_of_peak"]
    if "fraction_of_peak_same_contention" in ours2:
      summary["stage2_fraction_of_peak_same_contention"] = ours2["fraction_of_peak_same_contention"]
    summary["stage2_cpu_time_fraction_of_jax_dot"] = ours2["cpu_time_fraction_of_jax_dot"]
  s1 = {k: v for k, v in results.items() if k.startswith("stage1")}
  if s1:
    half = min(v["layer"] for v in s1.values())
    full = max(v["layer"] for v in s1.values())
    for suffix in ("", "_frozen_emb"):
      a, c = s1.get(f"stage1_l{half}{suffix}"), s1.get(f"stage1_l{full}{suffix}")
      if a and c:
        summary[f"stage1_l{half}_over_l{full}{suffix}"] = a["median_s"] / c["median_s"]
        summary[f"stage1_l{half}_over_l{full}{suffix}_cpu_time"] = a["cpu_median_s"] / c["cpu_median_s"]
  goals = {}
  if "stage2_torch_over_ours" in summary:
    goals["stage2_ratio_ge_1.3"] = summary["stage2_torch_over_ours"] >= 1.3
  busy = [r["other_cores_busy_median"] for r in (ours2, torch2) if r and r["other_cores_busy_median"] is not None]
  contended = bool(busy) and max(busy) > 0.3
  load_end = load_average()
  total_s = time.perf_counter() - t_start

  print()
  print(f"gemma-3-270m ({args.model}) training step, float32, batch {args.batch} x seq {args.seq}; "
        f"stage 2 warm-up {args.warmup} + median of {args.repeats}, stage 1 warm-up {args.s1_warmup} + median of "
        f"{args.s1_repeats}; torch {args.threads} threads")
  busy_txt = ", ".join("?" if pk["other_cores_busy"] is None else f"{pk['other_cores_busy']:.1f}" for pk in peaks)
  print(f"fp32 matmul peak {peak_gflops:.1f} GFLOP/s (best median of jax dot / torch.mm {args.matmul_n}^2 over "
        f"{len(peaks)} probes; others busy {busy_txt} cores); "
        f"jax dot {peak_per_cpu_s:.1f} GFLOP per CPU-s; load avg start {info['load_average_at_start']} end "
        f"{load_end} on {info['cpu_count']} cores")
  rows = []
  for name, r in results.items():
    fl = r.get("flops_used")
    rows.append([name, r.get("trained_params", 0) / 1e6, r["median_s"], r["min_s"], r["cpu_median_s"],
                 r["other_cores_busy_median"] if r["other_cores_busy_median"] is not None else "?",
                 fl / 1e9 if fl else "-", r.get("gflops", "-"),
                 100 * r["fraction_of_peak"] if "fraction_of_peak" in r else "-",
                 args.batch * args.seq / r["median_s"]])
  print()
  print(format_table(["case", "trained M", "median s", "min s", "cpu s", "others", "GFLOP", "GFLOP/s", "% peak",
                      "tok/s"], rows))
  if ours2:
    fa = ours2["flops_analytic"]
    print(f"\nstage-2 FLOPs/step: XLA cost analysis {ours2['xla_cost']['flops'] / 1e9:.1f} G (bytes accessed "
          f"{(ours2['xla_cost']['bytes_accessed'] or 0) / 1e9:.1f} GB); analytic 3 x forward = {fa['total'] / 1e9:.1f} G "
          f"(of which tied head at {ours2['head_rows']} of {args.batch * args.seq} positions "
          f"{3 * fa['head_fwd'] / 1e9:.1f} G, attention {3 * fa['attention_fwd'] / 1e9:.1f} G); "
          f"6 x {fa['params_in_matmuls'] / 1e6:.0f}M matmul params x {args.batch * args.seq} tokens = "
          f"{6 * fa['params_in_matmuls'] * args.batch * args.seq / 1e9:.1f} G")
    print(f"stage-2 ours: {ours2['gflops']:.1f} GFLOP/s = {100 * ours2['fraction_of_peak']:.1f}% of peak "
          f"(best step {100 * ours2['best_fraction_of_peak']:.1f}%); per CPU-second {ours2['gflops_per_cpu_s']:.1f} "
          f"GFLOP = {100 * ours2['cpu_time_fraction_of_jax_dot']:.1f}% of the jax dot's"
          + (f"; vs the peak probe at the closest contention ({ours2['same_contention_peak']['gflops']:.1f} GFLOP/s, "
             f"others {ours2['same_contention_peak']['other_cores_busy']:.1f}): "
             f"{100 * ours2['fraction_of_peak_same_contention']:.1f}%" if "same_contention_peak" in ours2 else "")
          + f"; first-step loss "
          f"{ours2['loss_first_step']:.4f}")
  if torch2:
    print(f"torch step parts (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in torch2["parts_median_s"].items())
          + f"; first-step loss torch {torch2['loss_first_step']:.4f}; HF load {torch2['load_s']:.1f}s, "
          f"torch process peak RSS {torch2['peak_rss_mib'] or float('nan'):.0f} MiB")
  print()
  print(format_table(["ratio", "value", "goal"], [[k, v, {"stage2_torch_over_ours": ">= 1.3"}.get(k, "")]
                                                   for k, v in summary.items() if isinstance(v, float)]))
  print(f"\npeak RSS (ours, cumulative): " + ", ".join(f"{k} {v:.0f} MiB" for k, v in rss.items())
        + (f"; load ours {load_ours_s:.1f}s" if load_ours_s else ""))
  print("goals: " + ", ".join(f"{k}: {'MET' if v else 'NOT MET'}" for k, v in goals.items())
        + f"; bench took {total_s:.0f}s")
  if contended:
    print(f"WARNING: other processes kept ~{max(busy):.1f} cores busy during the stage-2 steps. torch's OpenMP threads "
          "slow down far more than XLA's when a core is taken (on this 2-core machine the torch step went from 12.3 s "
          "idle to 48-54 s with one core busy, ours from 14.7 s to 28-44 s), so the torch/ours ratio measured under "
          "contention overstates dcr_jax's advantage; rerun on an idle machine (--quiet-wait helps).")

  report = {
      "bench": "train_step",
      "config": {"model": args.model, "batch": args.batch, "seq": args.seq, "warmup": args.warmup,
                 "repeats": args.repeats, "s1_warmup": args.s1_warmup, "s1_repeats": args.s1_repeats,
                 "layer": args.layer, "parts": sorted(phases), "dtype": "float32", "torch_threads": args.threads,
                 "optimizer": {"kind": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY, "clip_global_norm": CLIP},
                 "seed": args.seed, "quiet_wait": args.quiet_wait},
      "machine": info,
      "load_average_end": load_end,
      "matmul_peak": {"peak_gflops": peak_gflops, "jax_dot_gflops_per_cpu_s": peak_per_cpu_s, "probes": peaks},
      "results": results,
      "summary": summary,
      "goals": goals,
      "contended": contended,
      "peak_rss_mib": rss,
      "load_ours_s": load_ours_s,
      "total_s": total_s,
  }
  out = write_json(args.out, report)
  print(f"wrote {out}")
  return report


if __name__ == "__main__":
  main()
