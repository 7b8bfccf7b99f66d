"""Batched greedy generation speed of dcr_jax on CPU against transformers `generate`, gemma-3-270m (default) in float32.

One run: 16 chat-templated prompts of varied length (`dcr_jax.weights.encode_chat`), left-padded with an attention
mask on both sides, greedy, exactly --new-tokens new tokens per prompt (no early stop: `stop_ids=[]` for ours,
`min_new_tokens = max_new_tokens` for transformers). Throughput counts only new tokens (batch x new tokens). Both
sides are warmed up once (ours: the jit compile), then timed in interleaved rounds (one call of each per round, order
alternating) so that load from other processes hits both alike; figures are medians over rounds. With --breakdown
(default) a second pair of cases generates 1 token, i.e. the prefill, so decode throughput can be separated. A
third case generates with bfloat16 decode weights (`evaluate.decode_weights=bfloat16`), and the run records how
many of its rows equal the float32 rows. --model smollm2-135m runs the same against transformers on that GGUF.

    .venv/bin/python bench/generate.py [--new-tokens 64] [--repeats 3] [--out bench/results/generate.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CpuMonitor, banner, format_table, load_average, machine_info, peak_rss_mib, write_json  # noqa: E402

CONTENDED_CORES = 0.3
CONTENTION_WARNING = (
    "WARNING: other processes kept ~{cores:.1f} cores busy while timing. torch's OpenMP threads slow down far more "
    "than XLA's when a core is taken (measured on this 2-core machine: HF 1-token prefill 1.2 s idle vs 9.9 s with one "
    "core busy; HF generate 13 s vs 85-185 s), so ratios measured under contention overstate dcr_jax's advantage. "
    "Rerun on an idle machine (or compare the 'cpu s' column with care).")

PROMPTS = [
    "Hi!",
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of baking soda around the house.",
    "Translate 'good morning, how are you today?' into Spanish and German.",
    "I have a meeting with my manager tomorrow about a raise. What should I prepare, and how should I open the "
    "conversation?",
    "Summarize the plot of Romeo and Juliet for a ten-year-old.",
    "What's the difference between a list and a tuple in Python? Give a short example of each and say when you "
    "would prefer one over the other.",
    "Give me a recipe for a quick vegetarian dinner.",
    "How do vaccines train the immune system? Please keep it simple but accurate, and mention memory cells.",
    "Tell me a joke.",
    "My houseplant's leaves are turning yellow at the edges. It sits near a south-facing window and I water it "
    "every three days. The pot has no drainage hole. What might be wrong and what should I change first?",
    "Write a short, polite email declining an invitation to a conference because of a scheduling conflict, and "
    "suggest staying in touch for next year's edition.",
    "Why do we have leap years?",
    "Compare renting and buying a home for someone who expects to move cities within the next four years. Consider "
    "transaction costs, flexibility, maintenance, and the risk of price changes, then give a recommendation.",
]


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="gemma3-270m")
  p.add_argument("--batch", type=int, default=16, help="number of prompts (cycled from the built-in list)")
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--bucket", type=int, default=32, help="our prompt-length bucket (padding multiple)")
  p.add_argument("--repeats", type=int, default=3, help="timed rounds (each times every case once)")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (XLA uses all cores)")
  p.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                 help="skip the 1-new-token (prefill only) cases")
  p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "generate.json"))
  args = p.parse_args(argv)
  t_start = time.perf_counter()

  import numpy as np
  import torch

  torch.set_num_threads(args.threads)
  info = machine_info()
  print(banner(info, torch.get_num_threads()), flush=True)
  rss = {}

  # --- ours ----------------------------------------------------------------------------------------------------------
  import dcr_jax.weights
  from dcr_jax import load_model
  from dcr_jax.evaluate.generate import bucket_length, generate, with_decode_weights

  t0 = time.perf_counter()
  model, tok = load_model(args.model, progress=False)
  load_ours_s = time.perf_counter() - t0
  rss["after_ours_load"] = peak_rss_mib()
  prompts = [dcr_jax.weights.encode_chat(tok, PROMPTS[i % len(PROMPTS)])[0] for i in range(args.batch)]
  lengths = [len(x) for x in prompts]
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
  n = args.new_tokens
  padded_len = bucket_length(max(lengths), args.bucket)

  narrow = with_decode_weights(model, "bfloat16")  # evaluate.decode_weights=bfloat16

  def ours(new_tokens, decoder=model):
    return lambda: generate(decoder, prompts, max_new_tokens=new_tokens, stop_ids=[], pad_id=pad_id,
                            bucket=args.bucket)

  # --- transformers ----------------------------------------------------------------------------------------------------
  from transformers import AutoModelForCausalLM
  from transformers.utils import logging as hf_logging

  hf_logging.set_verbosity_error()
  hf_logging.disable_progress_bar()
  path = dcr_jax.weights.embedded_gguf_path(args.model)
  t0 = time.perf_counter()
  hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  load_torch_s = time.perf_counter() - t0
  rss["after_torch_load"] = peak_rss_mib()
  width = max(lengths)
  ids = torch.full((args.batch, width), pad_id, dtype=torch.long)
  attn = torch.zeros((args.batch, width), dtype=torch.long)
  for i, seq in enumerate(prompts):
    ids[i, width - len(seq):] = torch.tensor(seq)
    attn[i, width - len(seq):] = 1

  def theirs(new_tokens):
    def call():
      with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=pad_id)
      return out[:, width:].tolist()
    return call

  cases = {"ours": ours(n), "hf": theirs(n), "ours_bf16": ours(n, narrow)}
  if args.breakdown:
    cases.update({"ours_prefill": ours(1), "hf_prefill": theirs(1)})

  # --- warm-up (compile), agreement, then interleaved timing ---------------------------------------------------------
  warm = {}
  outputs = {}
  for name, call in cases.items():
    t0 = time.perf_counter()
    outputs[name] = call()
    warm[name] = time.perf_counter() - t0
    print(f"# warm-up {name}: {warm[name]:.2f}s", flush=True)
  ours_out, hf_out = outputs["ours"], outputs["hf"]
  assert all(len(r) == n for r in ours_out) and all(len(r) == n for r in hf_out), "expected exactly n new tokens"
  prefix = []
  for a, b in zip(ours_out, hf_out):
    k = 0
    while k < n and a[k] == b[k]:
      k += 1
    prefix.append(k)
  agreement = {"rows_identical": sum(k == n for k in prefix), "rows": len(prefix),
               "matching_prefix_tokens": prefix, "token_match_fraction": float(np.mean(
                   [np.mean(np.asarray(a) == np.asarray(b)) for a, b in zip(ours_out, hf_out)])),
               "bf16_rows_identical_to_float32": sum(a == b for a, b in zip(outputs["ours_bf16"], ours_out))}
  del outputs
  rss["after_warmup"] = peak_rss_mib()

  names = list(cases)
  times = {c: [] for c in names}
  cpu = {c: [] for c in names}
  others = {c: [] for c in names}
  for r in range(args.repeats):
    order = names if r % 2 == 0 else names[::-1]
    for name in order:
      before, c0 = CpuMonitor.snapshot(), time.process_time()
      cases[name]()
      after, c1 = CpuMonitor.snapshot(), time.process_time()
      times[name].append(after[0] - before[0])
      cpu[name].append(c1 - c0)
      others[name].append(CpuMonitor.other_cores(before, after))
    print(f"# round {r + 1}/{args.repeats}: " + ", ".join(
        f"{c} {times[c][-1]:.2f}s (others {'?' if others[c][-1] is None else f'{others[c][-1]:.1f}'})"
        for c in names), flush=True)
  rss["end"] = peak_rss_mib()

  results = {}
  for name in names:
    new = args.batch * (1 if name.endswith("_prefill") else n)
    med = statistics.median(times[name])
    busy = [b for b in others[name] if b is not None]
    results[name] = {"median_s": med, "min_s": min(times[name]), "max_s": max(times[name]),
                     "times_s": [round(x, 4) for x in times[name]], "cpu_median_s": statistics.median(cpu[name]),
                     "warmup_s": warm[name], "new_tokens": new, "new_tokens_per_s": new / med,
                     "other_cores_busy": [None if b is None else round(b, 2) for b in others[name]],
                     "other_cores_busy_median": statistics.median(busy) if busy else None}
  per_round = [h / o for h, o in zip(times["hf"], times["ours"])]
  summary = {"hf_over_ours": results["hf"]["median_s"] / results["ours"]["median_s"],
             "hf_over_ours_median_of_rounds": statistics.median(per_round),
             "round_ratios": [round(x, 3) for x in per_round],
             "hf_over_ours_cpu_time": results["hf"]["cpu_median_s"] / results["ours"]["cpu_median_s"]}
  if args.breakdown:
    for side in ("ours", "hf"):
      decode_s = results[side]["median_s"] - results[f"{side}_prefill"]["median_s"]
      summary[f"{side}_decode_s"] = decode_s
      summary[f"{side}_decode_tokens_per_s"] = args.batch * (n - 1) / decode_s if decode_s > 0 else None
      summary[f"{side}_decode_ms_per_step"] = 1e3 * decode_s / (n - 1) if decode_s > 0 else None
    summary["hf_over_ours_prefill"] = results["hf_prefill"]["median_s"] / results["ours_prefill"]["median_s"]
    if summary["ours_decode_s"] > 0 and summary["hf_decode_s"] > 0:
      summary["hf_over_ours_decode"] = summary["hf_decode_s"] / summary["ours_decode_s"]
  summary["hf_over_ours_bf16"] = results["hf"]["median_s"] / results["ours_bf16"]["median_s"]
  goals = {"tokens_per_s_ratio_ge_3": max(summary["hf_over_ours"], summary["hf_over_ours_bf16"]) >= 3.0}
  busy = [results[c]["other_cores_busy_median"] for c in ("ours", "hf") if results[c]["other_cores_busy_median"] is not None]
  contended = bool(busy) and max(busy) > CONTENDED_CORES
  load_end = load_average()
  total_s = time.perf_counter() - t_start

  print()
  print(f"{args.model} greedy generation, float32, {args.batch} chat prompts of {min(lengths)}.."
        f"{max(lengths)} tokens (ours padded to {padded_len}, HF to {width}), {n} new tokens each, no early stop; "
        f"warm-up 1 + median of {args.repeats} interleaved rounds; torch {args.threads} threads, "
        f"attn={hf.config._attn_implementation}")
  print(f"load avg start {info['load_average_at_start']} end {load_end} on {info['cpu_count']} cores")
  print()
  print(format_table(["case", "median s", "min s", "cpu s", "others", "new tok", "new tok/s", "warm-up s"],
                     [[c, r["median_s"], r["min_s"], r["cpu_median_s"],
                       "?" if r["other_cores_busy_median"] is None else r["other_cores_busy_median"], r["new_tokens"],
                       r["new_tokens_per_s"], r["warmup_s"]] for c, r in results.items()]))
  print()
  rows = [["tokens/s ours / HF (= HF time / ours)", summary["hf_over_ours"], ">= 3.0"],
          ["  median of per-round ratios", summary["hf_over_ours_median_of_rounds"], ""],
          ["  by process CPU time", summary["hf_over_ours_cpu_time"], ""]]
  if args.breakdown:
    rows += [["prefill only (1 new token)", summary["hf_over_ours_prefill"], ""]]
    if "hf_over_ours_decode" in summary:
      rows += [[f"decode only ({n - 1} steps, by difference)", summary["hf_over_ours_decode"], ""]]
  print(format_table(["ratio", "value", "goal"], rows))
  if args.breakdown:
    print(f"decode (by difference): ours {summary['ours_decode_ms_per_step'] or float('nan'):.1f} ms/step, HF "
          f"{summary['hf_decode_ms_per_step'] or float('nan'):.1f} ms/step")
  print(f"agreement ours vs HF (greedy): {agreement['rows_identical']}/{agreement['rows']} rows identical, "
        f"{100 * agreement['token_match_fraction']:.1f}% of tokens equal position-wise, matching prefixes "
        f"{agreement['matching_prefix_tokens']}")
  print(f"load: ours {load_ours_s:.1f}s, HF {load_torch_s:.1f}s; peak RSS (cumulative) "
        + ", ".join(f"{k} {v:.0f} MiB" for k, v in rss.items()))
  print(f"goal: >= 3x: {'MET' if goals['tokens_per_s_ratio_ge_3'] else 'NOT MET'}; bench took {total_s:.0f}s")
  if contended:
    print(CONTENTION_WARNING.format(cores=max(busy)))

  report = {
      "bench": "generate",
      "config": {"model": args.model, "batch": args.batch, "new_tokens": n, "bucket": args.bucket,
                 "repeats": args.repeats, "torch_threads": args.threads, "dtype": "float32", "greedy": True,
                 "prompt_lengths": lengths, "ours_padded_length": padded_len, "hf_padded_length": width,
                 "hf_attn_implementation": hf.config._attn_implementation,
                 "hf_cache_implementation": getattr(hf.generation_config, "cache_implementation", None)},
      "machine": info,
      "load_average_end": load_end,
      "results": results,
      "summary": summary,
      "goals": goals,
      "contended": contended,
      "agreement": agreement,
      "setup_s": {"load_ours": load_ours_s, "load_torch": load_torch_s},
      "peak_rss_mib": rss,
      "total_s": total_s,
  }
  out = write_json(args.out, report)
  print(f"wrote {out}")
  return report


if __name__ == "__main__":
  main()
