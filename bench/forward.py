"""Forward-pass speed of dcr_jax against transformers on CPU, gemma-3-270m, both in float32.

Measures in one run, on the same random tokens [batch, seq]:
  (a) logits at every position: our jitted forward vs the transformers forward;
  (b) prefill with logits at the last position only (what generation needs): ours with `logits_index` vs
      transformers with `logits_to_keep=1`, and vs the transformers full-logits forward.
The four cases are timed interleaved (one call of each per round, order rotated each round), so that load from
other processes hits all of them alike; the ratio reported is median(torch) / median(ours), with the median of the
per-round ratios, the ratio of mins and the ratio of "quiet" medians (calls during which other processes used
<= --quiet-threshold cores) next to it. Every call also records this process's CPU seconds, which, unlike wall
time, barely depends on other load (pin with `taskset -c 0 ... --threads 1` for a clean per-core comparison; see
bench/README.md). FLOPs come from XLA's cost analysis of our compiled forward (cross-checked against an
analytic count) and the same count is used for torch; the fraction of peak is against this CPU's measured fp32
matmul peak (the better of a jitted jnp.dot and torch.mm of 2048x2048, before and after the runs, or the probe's
FLOPs per CPU-second times the usable cores when that is higher).

    .venv/bin/python bench/forward.py [--batch 8] [--seq 128] [--repeats 5] [--out bench/results/forward.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (CpuMonitor, banner, format_table, load_average, machine_info, matmul_peak,  # noqa: E402
                    peak_rss_mib, wait_for_quiet, write_json)

CASES = ("ours_full", "torch_full", "ours_last", "torch_last")
LABELS = {
    "ours_full": "dcr_jax   logits [B,T,V]",
    "torch_full": "HF        logits [B,T,V]",
    "ours_last": "dcr_jax   logits_index=T-1",
    "torch_last": "HF        logits_to_keep=1",
}


def fmt_cores(x: float | None) -> str:
  return "?" if x is None else f"{x:.1f}"


def analytic_flops(cfg, batch: int, seq: int, last_only: bool) -> dict[str, float]:
  """Matmul FLOPs of one forward: 2 * weights * tokens for projections, full (unmasked) T x T attention, head."""
  d, f, n, k, h = cfg.embed_dim, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  tokens = batch * seq
  per_layer_weights = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f
  projections = 2.0 * per_layer_weights * cfg.num_layers * tokens
  attention = 2.0 * 2 * batch * n * seq * seq * h * cfg.num_layers  # q.k^T and p.v, every (t, s) pair
  head = 2.0 * d * cfg.vocab_size * (batch if last_only else tokens)
  return {"projections": projections, "attention": attention, "head": head,
          "total": projections + attention + head}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="gemma3-270m")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--repeats", type=int, default=5, help="timed rounds (each times every case once)")
  p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
  p.add_argument("--matmul-n", type=int, default=2048)
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (XLA uses all cores)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quiet-threshold", type=float, default=0.5,
                 help="calls during which other processes used at most this many cores count as quiet")
  p.add_argument("--quiet-wait", type=float, default=0.0,
                 help="before each timed round, wait up to this many seconds for other processes to go idle")
  p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "forward.json"))
  args = p.parse_args(argv)
  t_start = time.perf_counter()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from flax import nnx

  torch.set_num_threads(args.threads)
  info = machine_info()
  print(banner(info, torch.get_num_threads()), flush=True)

  def probe_peak() -> dict:
    before = CpuMonitor.snapshot()
    pk = matmul_peak(args.matmul_n, repeats=8, torch_threads=args.threads)
    pk["other_cores_busy"] = CpuMonitor.other_cores(before, CpuMonitor.snapshot())
    return pk

  peaks = [probe_peak()]
  print(f"# fp32 matmul {args.matmul_n}^2: jax {peaks[0]['jax']['gflops']:.1f}, torch {peaks[0]['torch']['gflops']:.1f}"
        f" GFLOP/s (others busy {fmt_cores(peaks[0]['other_cores_busy'])} cores)", flush=True)
  rss = {"after_matmul_peak": peak_rss_mib()}

  # --- ours -------------------------------------------------------------------------------------------------
  import dcr_jax.weights
  from dcr_jax import load_model

  t0 = time.perf_counter()
  model, _ = load_model(args.model, progress=False)
  load_ours_s = time.perf_counter() - t0
  cfg = model.config
  graphdef, state = nnx.split(model)
  del model
  b, t = args.batch, args.seq
  tokens_np = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (b, t), dtype=np.int64)
  tokens = jnp.asarray(tokens_np, jnp.int32)
  last = jnp.full((b,), t - 1, jnp.int32)

  full_fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  last_fn = jax.jit(lambda s, x, i: nnx.merge(graphdef, s)(x, logits_index=i))
  t0 = time.perf_counter()
  full_c = full_fn.lower(state, tokens).compile()
  last_c = last_fn.lower(state, tokens, last).compile()
  compile_s = time.perf_counter() - t0

  def xla_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None

  flops = {
      "full": {"xla": xla_flops(full_c), "analytic": analytic_flops(cfg, b, t, last_only=False)},
      "last": {"xla": xla_flops(last_c), "analytic": analytic_flops(cfg, b, t, last_only=True)},
  }
  for v in flops.values():
    v["used"] = v["xla"] or v["analytic"]["total"]
  rss["after_ours_load_compile"] = peak_rss_mib()

  # --- transformers -------------------------------------------------------------------------------------------
  from transformers import AutoModelForCausalLM
  from transformers.utils import logging as hf_logging

  hf_logging.set_verbosity_error()
  hf_logging.disable_progress_bar()
  path = dcr_jax.weights.embedded_gguf_path(args.model)
  t0 = time.perf_counter()
  hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  load_torch_s = time.perf_counter() - t0
  rss["after_torch_load"] = peak_rss_mib()
  tokens_pt = torch.from_numpy(tokens_np)

  calls = {
      "ours_full": lambda: jax.block_until_ready(full_c(state, tokens)),
      "ours_last": lambda: jax.block_until_ready(last_c(state, tokens, last)),
      "torch_full": lambda: hf(tokens_pt).logits,
      "torch_last": lambda: hf(tokens_pt, logits_to_keep=1).logits,
  }

  # --- agreement (first warm-up round), then interleaved timing -------------------------------------------------
  times = {c: [] for c in CASES}
  contention = {c: [] for c in CASES}  # cores kept busy by other processes during each timed call
  cpu_times = {c: [] for c in CASES}  # this process's CPU seconds (all threads) per timed call
  agreement = {}
  waited_s = 0.0
  with torch.inference_mode():
    for r in range(args.warmup + args.repeats):
      if r >= args.warmup and args.quiet_wait > 0:
        waited_s += wait_for_quiet(args.quiet_wait, threshold=min(args.quiet_threshold, 0.25))
      order = CASES[r % len(CASES):] + CASES[:r % len(CASES)]
      results = {}
      for case in order:
        before = CpuMonitor.snapshot()
        out = calls[case]()
        after = CpuMonitor.snapshot()
        if r >= args.warmup:
          times[case].append(after[0] - before[0])
          contention[case].append(CpuMonitor.other_cores(before, after))
          cpu_times[case].append(after[2] - before[2])
        elif r == 0:
          results[case] = np.asarray(out, np.float32).reshape(b, -1, cfg.vocab_size)[:, -1]
        del out
      if r == 0:
        ref = results["torch_full"]
        agreement = {case: float(np.max(np.abs(results[case] - ref))) for case in CASES if case != "torch_full"}
        agreement["top1_match_ours_vs_torch"] = float(np.mean(results["ours_full"].argmax(-1) == ref.argmax(-1)))
        del results, ref
      print(f"# round {r + 1}/{args.warmup + args.repeats}{' (warm-up)' if r < args.warmup else ''}: "
            + ", ".join(f"{c} {times[c][-1]:.2f}s (others {fmt_cores(contention[c][-1])})"
                        for c in CASES if r >= args.warmup), flush=True)
  rss["end"] = peak_rss_mib()

  peaks.append(probe_peak())
  peak_wall = max(pk["peak_gflops"] for pk in peaks)
  peak_per_cpu_s = max(pk[lib]["gflops_per_cpu_s"] for pk in peaks for lib in ("jax", "torch") if lib in pk)
  # A probe that ran while other processes held cores under-reads the peak; FLOPs per CPU-second times the cores
  # we can use does not, so the reference peak is the larger of the two.
  cores = min(args.threads, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else args.threads)
  peak_from_cpu = peak_per_cpu_s * cores
  peak_gflops = max(peak_wall, peak_from_cpu)

  # --- summary -----------------------------------------------------------------------------------------------
  results = {}
  for case in CASES:
    med = statistics.median(times[case])
    fl = flops["full" if case.endswith("full") else "last"]["used"]
    busy = [c for c in contention[case] if c is not None]
    quiet = [x for x, c in zip(times[case], contention[case]) if c is not None and c <= args.quiet_threshold]
    results[case] = {"median_s": med, "min_s": min(times[case]), "max_s": max(times[case]),
                     "times_s": [round(x, 4) for x in times[case]], "flops": fl, "gflops": fl / med / 1e9,
                     "fraction_of_peak": fl / med / 1e9 / peak_gflops,
                     "best_gflops": fl / min(times[case]) / 1e9,
                     "best_fraction_of_peak": fl / min(times[case]) / 1e9 / peak_gflops,
                     "tokens_per_s": b * t / med,
                     "cpu_s_median": statistics.median(cpu_times[case]),
                     "gflops_per_cpu_s": fl / statistics.median(cpu_times[case]) / 1e9,
                     "fraction_of_peak_per_cpu_s": fl / statistics.median(cpu_times[case]) / 1e9 / peak_per_cpu_s,
                     "cpu_s": [round(x, 3) for x in cpu_times[case]],
                     "other_cores_busy": [None if c is None else round(c, 2) for c in contention[case]],
                     "other_cores_busy_median": statistics.median(busy) if busy else None,
                     "quiet_median_s": statistics.median(quiet) if quiet else None,
                     "quiet_n": len(quiet)}

  def ratio(num: str, den: str) -> dict:
    per_round = [a / c for a, c in zip(times[num], times[den])]
    return {"ratio_of_medians": results[num]["median_s"] / results[den]["median_s"],
            "ratio_of_mins": results[num]["min_s"] / results[den]["min_s"],
            "ratio_of_quiet_medians": (results[num]["quiet_median_s"] / results[den]["quiet_median_s"]
                                       if results[num]["quiet_n"] and results[den]["quiet_n"] else None),
            "ratio_of_cpu_time_medians": results[num]["cpu_s_median"] / results[den]["cpu_s_median"],
            "median_of_round_ratios": statistics.median(per_round),
            "round_ratios": [round(x, 3) for x in per_round]}

  ratios = {
      "a_full_logits__torch_full_over_ours_full": ratio("torch_full", "ours_full"),
      "b_prefill__torch_full_over_ours_last": ratio("torch_full", "ours_last"),
      "b_prefill__torch_last_over_ours_last": ratio("torch_last", "ours_last"),
  }
  goals = {
      "a_full_logits_ratio_ge_1": ratios["a_full_logits__torch_full_over_ours_full"]["ratio_of_medians"] >= 1.0,
      "b_prefill_vs_hf_full_ratio_ge_2": ratios["b_prefill__torch_full_over_ours_last"]["ratio_of_medians"] >= 2.0,
  }
  load_end = load_average()

  print()
  print(f"{args.model}, float32, batch {b} x seq {t} random tokens, {args.repeats} interleaved rounds "
        f"(+{args.warmup} warm-up); torch {args.threads} threads, attn={hf.config._attn_implementation}")
  print(f"fp32 matmul peak {peak_gflops:.1f} GFLOP/s = max(wall-clock {peak_wall:.1f}: best median of jax dot / "
        f"torch.mm {args.matmul_n}^2 over {len(peaks)} probes, others busy "
        f"{', '.join(fmt_cores(pk['other_cores_busy']) for pk in peaks)} cores; {peak_per_cpu_s:.1f} GFLOP/cpu-s x "
        f"{cores} cores = {peak_from_cpu:.1f})")
  print(f"load avg start {info['load_average_at_start']} end {load_end} on {info['cpu_count']} cores")
  print(f"FLOPs/forward (XLA cost analysis; analytic): full {flops['full']['used'] / 1e9:.1f} G "
        f"({flops['full']['analytic']['total'] / 1e9:.1f} G, of which head "
        f"{flops['full']['analytic']['head'] / 1e9:.1f} G), last-only {flops['last']['used'] / 1e9:.1f} G "
        f"({flops['last']['analytic']['total'] / 1e9:.1f} G)")
  print()
  print(format_table(
      ["case", "median s", "min s", "max s", "quiet med s (n)", "GFLOP/s", "% peak", "best % peak", "tok/s", "cpu s",
       "GFLOP/cpu-s", "others busy"],
      [[LABELS[c], results[c]["median_s"], results[c]["min_s"], results[c]["max_s"],
        "-" if results[c]["quiet_median_s"] is None else f"{results[c]['quiet_median_s']:.3f} ({results[c]['quiet_n']})",
        results[c]["gflops"], 100 * results[c]["fraction_of_peak"], 100 * results[c]["best_fraction_of_peak"],
        results[c]["tokens_per_s"], results[c]["cpu_s_median"], results[c]["gflops_per_cpu_s"],
        fmt_cores(results[c]["other_cores_busy_median"])]
       for c in CASES]))
  print(f"(GFLOP/s and % peak from the median time, best % peak from the min; quiet med: median over the calls during "
        f"which other processes used <= {args.quiet_threshold} cores; cpu s: median CPU seconds of this process per "
        f"call, all threads, spin-waits included; GFLOP/cpu-s: FLOPs per CPU-second, vs the matmul probe's "
        f"{peak_per_cpu_s:.1f}; others busy: median cores used by other processes during the calls)")
  print()
  named = [("(a) full logits: HF full / ours full", "a_full_logits__torch_full_over_ours_full", ">= 1.0"),
           ("(b) prefill: HF full / ours last", "b_prefill__torch_full_over_ours_last", ">= 2.0"),
           ("(b) prefill: HF logits_to_keep=1 / ours last", "b_prefill__torch_last_over_ours_last", "(info)")]
  print(format_table(
      ["ratio (torch time / our time)", "of medians", "of mins", "median per round", "of quiet medians", "goal"],
      [[label, ratios[k]["ratio_of_medians"], ratios[k]["ratio_of_mins"], ratios[k]["median_of_round_ratios"],
        "-" if ratios[k]["ratio_of_quiet_medians"] is None else ratios[k]["ratio_of_quiet_medians"], goal]
       for label, k, goal in named]))
  busy = [x for c in CASES for x in contention[c] if x is not None]
  if busy and statistics.median(busy) > 0.25:
    print(f"WARNING: other processes kept a median {statistics.median(busy):.1f} of {info['cpu_count']} cores busy "
          "during timing. torch (OpenMP) slows down far more than XLA under steady contention, which inflates our "
          "lead; contention that comes and goes between calls can swing a median either way. Prefer the quiet "
          "medians and mins, the CPU-time columns, or rerun on an idle machine (or with --quiet-wait).")
  print()
  print("max |logit diff| at last position vs HF full: "
        + ", ".join(f"{k} {v:.3g}" for k, v in agreement.items() if k != "top1_match_ours_vs_torch")
        + f"; top-1 agreement {100 * agreement['top1_match_ours_vs_torch']:.0f}%")
  print(f"load: ours {load_ours_s:.1f}s + compile {compile_s:.1f}s, HF {load_torch_s:.1f}s; peak RSS (cumulative) "
        + ", ".join(f"{k} {v:.0f} MiB" for k, v in rss.items()))
  total_s = time.perf_counter() - t_start
  met = lambda ok: "MET" if ok else "NOT MET"  # noqa: E731
  ra, rb = ratios["a_full_logits__torch_full_over_ours_full"], ratios["b_prefill__torch_full_over_ours_last"]
  print(f"goals (medians | mins): (a) >= 1.0: {met(goals['a_full_logits_ratio_ge_1'])} | {met(ra['ratio_of_mins'] >= 1)}"
        f"; (b) >= 2.0 vs HF full: {met(goals['b_prefill_vs_hf_full_ratio_ge_2'])} | "
        f"{met(rb['ratio_of_mins'] >= 2)}; bench took {total_s:.0f}s")

  report = {
      "bench": "forward",
      "config": {"model": args.model, "batch": b, "seq": t, "repeats": args.repeats, "warmup": args.warmup,
                 "dtype": "float32", "torch_threads": args.threads, "seed": args.seed,
                 "hf_attn_implementation": hf.config._attn_implementation},
      "machine": info,
      "load_average_end": load_end,
      "matmul_peak": {"peak_gflops": peak_gflops, "peak_gflops_wall": peak_wall, "peak_gflops_per_cpu_s": peak_per_cpu_s,
                      "peak_gflops_from_cpu_s": peak_from_cpu, "cores": cores, "probes": peaks},
      "flops": flops,
      "results": results,
      "ratios": ratios,
      "goals": goals,
      "goals_on_mins": {
          "a_full_logits_ratio_ge_1": ratios["a_full_logits__torch_full_over_ours_full"]["ratio_of_mins"] >= 1.0,
          "b_prefill_vs_hf_full_ratio_ge_2": ratios["b_prefill__torch_full_over_ours_last"]["ratio_of_mins"] >= 2.0,
      },
      "quiet_wait_s_total": waited_s,
      "agreement_max_abs_diff_last_position_vs_torch_full": agreement,
      "setup_s": {"load_ours": load_ours_s, "compile_ours": compile_s, "load_torch": load_torch_s},
      "peak_rss_mib": rss,
      "total_s": total_s,
  }
  out = write_json(args.out, report)
  print(f"wrote {out}")
  return report


if __name__ == "__main__":
  main()
