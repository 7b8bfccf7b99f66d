"""Exact first-token eNTK on the real gemma-3-270m over all 268M parameters: N prompts x |S| tokens, CPU float32.

The prompts are the built-in demo prompts, a third each seemingly toxic, toxic and general (seeded); S is the top-|S|
of the base model's mean first-token distribution. One parameter-sized Jacobian row is 1.07 GB in float32, so the
row methods (jvp_vjp, jacobian) hold --chunk prompts x --out-chunk tokens of S rows at a time (2 x 1: 2.1 GB); the
structured method (the default) never forms a row: it keeps per-prompt activations and backpropagated signals and
contracts them --chunk prompts against --chunk at a time (--chunk 8 unless given). Reported: wall time, peak RSS, how
busy other processes kept the CPUs meanwhile (`others_busy` cores, `contended` when >= 0.25), the symmetry and PSD
checks of K, the group block means, and (--check) the method against another exact one on the first prompts
(structured against jvp_vjp).

    .venv/bin/python bench/kernels_270m.py [--n 32] [--k 10] [--method structured] \
        [--out bench/results/kernels_270m.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from common import CpuMonitor, banner, load_average, machine_info, peak_rss_mib, write_json  # noqa: E402


def prompts(n: int, seed: int) -> tuple[list[str], list[str]]:
  """n built-in prompts, split as evenly as possible over seemingly toxic, toxic and general."""
  from dcr_jax.data.batching import load_spec_list

  specs = [("seemingly_toxic", "builtin:seemingly_toxic", "seemingly_toxic"), ("toxic", "builtin:toxic", "toxic"),
           ("general", "builtin:benign", "benign")]
  texts, groups = [], []
  for i, (group, spec, label) in enumerate(specs):
    count = n // 3 + (1 if i < n % 3 else 0)
    records = load_spec_list(spec, label=label, n=count, seed=seed, key=f"bench.{group}")
    texts += [r["prompt"] for r in records]
    groups += [group] * len(records)
  return texts, groups


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--n", type=int, default=32, help="prompts")
  p.add_argument("--k", type=int, default=10, help="|S|: top-k first tokens of the base model")
  p.add_argument("--method", default="structured", choices=["structured", "jvp_vjp", "jacobian"])
  p.add_argument("--chunk", type=int, default=None, help="prompts per chunk (default 8 structured, 2 otherwise)")
  p.add_argument("--out-chunk", type=int, default=1, help="tokens of S per chunk")
  p.add_argument("--max-len", type=int, default=64, help="prompt tokens kept (the chat-templated tail)")
  p.add_argument("--check", type=int, default=2, help="prompts on which both exact methods are compared (0 = skip)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "kernels_270m.json"))
  args = p.parse_args(argv)
  if args.chunk is None:
    args.chunk = 8 if args.method == "structured" else 2

  import jax

  from dcr_jax.kernels import ntk, similarity
  from dcr_jax.kernels.track import encode_prompts
  from dcr_jax.weights import load_model

  info = machine_info()
  print(banner(info, torch_threads=0), flush=True)
  model, tokenizer = load_model("gemma3-270m", progress=False)
  texts, groups = prompts(args.n, args.seed)
  tokens, mask = encode_prompts(tokenizer, texts, args.max_len)
  width = tokens.shape[1]
  graphdef, params, rest = ntk.split_params(model, "all")
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  f = ntk.first_token_logits_fn(graphdef, rest)
  ids = ntk.token_set(probs=ntk.next_token_probs(f, params, tokens, mask), k=args.k)
  print(f"# {len(texts)} prompts ({', '.join(f'{g}: {groups.count(g)}' for g in dict.fromkeys(groups))}), "
        f"T <= {width}, |S| = {len(ids)}: {[tokenizer.decode([int(i)]) for i in ids]}; {n_params / 1e6:.1f}M params; "
        f"one Jacobian row {n_params * 4 / 1e9:.2f} GB", flush=True)

  check = None
  if args.check:
    c = args.check
    started = time.perf_counter()
    other = "jacobian" if args.method == "jvp_vjp" else "jvp_vjp"
    both = {m: ntk.logit_kernel(f, params, tokens[:c], mask[:c], ids, method=m, chunk_size=c if m == "structured"
                                else 1, out_chunk=1, progress=False) for m in (args.method, other)}
    scale = float(np.abs(both[other]).max())
    check = {"prompts": c, "against": other, "seconds": round(time.perf_counter() - started, 1),
             "max_abs_diff_over_max": float(np.abs(both[args.method] - both[other]).max()) / scale}
    print(f"# methods agree on {c} prompts: max|{args.method} - {other}| / max|K| = "
          f"{check['max_abs_diff_over_max']:.2e}", flush=True)

  before, started, cpu = CpuMonitor.snapshot(), time.perf_counter(), time.process_time()
  kernel = ntk.logit_kernel(f, params, tokens, mask, ids, method=args.method, chunk_size=args.chunk,
                            out_chunk=args.out_chunk, progress=True)
  seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
  others_busy = CpuMonitor.other_cores(before, CpuMonitor.snapshot())
  n, s = kernel.shape[0], kernel.shape[2]
  flat = kernel.transpose(0, 2, 1, 3).reshape(n * s, n * s).astype(np.float64)
  scale = float(np.abs(flat).max())
  eigenvalues = np.linalg.eigvalsh((flat + flat.T) / 2)
  names, ratio, counts = similarity.block_means(similarity.kernel_ratio(kernel), groups)
  _, cosine, _ = similarity.block_means(similarity.kernel_cosine(kernel), groups)
  result = {
      "bench": "kernels_270m", "machine": info,
      "config": {"n": n, "k": s, "method": args.method, "chunk_size": args.chunk, "out_chunk": args.out_chunk,
                 "max_len": args.max_len, "seed": args.seed,
                 "params": n_params, "token_set": [int(i) for i in ids]},
      "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "peak_rss_mib": peak_rss_mib(),
      "others_busy": others_busy,
      "contended": others_busy is None or others_busy >= 0.25, "load_average_at_end": load_average(),
      "symmetry_max_abs_diff_over_max": float(np.abs(flat - flat.T).max()) / scale,
      "min_eigenvalue_over_max": float(eigenvalues.min() / eigenvalues.max()),
      "groups": names, "ratio_block_means": ratio.tolist(), "cosine_block_means": cosine.tolist(),
      "counts": counts.tolist(), "method_check": check,
  }
  busy = "?" if others_busy is None else f"{others_busy:.1f}"
  print(f"# K [{n} {n} {s} {s}] in {seconds:.0f} s, {cpu:.0f} s process CPU ({busy} cores busy with other "
        "processes), "
        f"peak RSS {result['peak_rss_mib']:.0f} MiB; "
        f"asymmetry {result['symmetry_max_abs_diff_over_max']:.1e}, min/max eigenvalue "
        f"{result['min_eigenvalue_over_max']:.1e}")
  print("# cosine block means (" + ", ".join(names) + "):")
  for name, row in zip(names, cosine):
    print(f"#   {name:>16}: " + "  ".join(f"{v:.3f}" for v in row))
  write_json(args.out, result)
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
