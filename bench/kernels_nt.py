"""Exact first-token eNTK: `logit_kernel(method="structured")` against neural-tangents' `nt.empirical_ntk_fn`.

Both compute K[a, b, i, j] = <d z_S[i](a)/dθ, d z_S[j](b)/dθ> over every parameter of the same random-init tiny
Gemma 3 ([N N S S]), for the first generated token's logits z (the last valid position of a left-padded prompt)
restricted to a shared token set S, with no approximation on either side:
  ours  ntk.logit_kernel(first_token_logits_fn(...), params, tokens, mask, ids, method="structured"), chunked
        (--chunk, min(chunk, N) prompts at a time);
  nt    bench/nt_peer.py in a separate interpreter (--nt-python, default $NT_PYTHON or .nt-venv/bin/python;
        neural-tangents needs an older JAX than dcr_jax): the same model re-implemented in plain jax.numpy from the
        exported parameters, its logits checked against ours, then the jitted
        `empirical_ntk_fn(f, trace_axes=(), vmap_axes=0, implementation=...)` for each implementation
        (JACOBIAN_CONTRACTION, NTK_VECTOR_PRODUCTS, STRUCTURED_DERIVATIVES; --implementations), all parameters.
The kernels must agree (max|K_nt - K_ours| / max|K_ours| <= --rtol, default 1e-4 in float32 and 1e-6 in float64:
both sides take RoPE angles in float32, whose sin/cos differ by an ulp between the two XLA versions, 7e-9 of max|K|
in a float64 smoke run, 4e-7 in float32).
Reported per case: both wall medians (common.time_fn: --warmup untimed calls, then --repeats timed, each result
fetched to the host; the peer times fewer calls, at least one, where --repeats would pass --nt-case-budget-s, and
skips an implementation as "does not fit" where one buffer of its compiled program exceeds --nt-limit-gb), the
ratio nt / ours per implementation and for the best one (> 1: ours is faster), the
agreement, and `others busy` (cores other processes kept busy meanwhile, CpuMonitor) on each side. Each side runs
in its own process, ours first, then the peer per model size, so their timings are not interleaved: run it on an
idle machine.

The peer's venv (`.nt-venv`, ignored by git; the project's own venv has a JAX neural-tangents does not support):

    make nt-venv   # .nt-venv: jax 0.4.23, numpy < 2, scipy < 1.13, neural-tangents

    .venv/bin/python bench/kernels_nt.py [--sizes xs,s] [--n 8,16,32] [--s 5] [--out bench/results/kernels_nt.json]
    .venv/bin/python bench/kernels_nt.py --smoke      # xs, N=4, |S|=3, one repeat: an end-to-end check
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from common import CpuMonitor, format_table, ints, load_average, machine_info, peak_rss_mib, time_fn, write_json  # noqa: E402
from dcr_jax.kernels import ntk  # noqa: E402
from dcr_jax.model import Decoder, tiny  # noqa: E402
from dcr_jax.model.config import pattern_layer_types  # noqa: E402

HERE = Path(__file__).resolve().parent
SIZES = {  # as bench/kernels.py: tiny("gemma3", ...) overrides, 4 heads x 16 dims, 2 kv heads
    "xs": dict(vocab_size=1024, embed_dim=64, mlp_dim=128, num_layers=2),
    "s": dict(vocab_size=2048, embed_dim=128, mlp_dim=256, num_layers=4),
    "m": dict(vocab_size=4096, embed_dim=256, mlp_dim=512, num_layers=4),
}
IMPLEMENTATIONS = ("JACOBIAN_CONTRACTION", "NTK_VECTOR_PRODUCTS", "STRUCTURED_DERIVATIVES")
DEFAULT_NT_PYTHON = os.environ.get("NT_PYTHON",
                                   str(Path(__file__).resolve().parents[1] / ".nt-venv" / "bin" / "python"))


def build(size: str, seed: int, dtype: str):
  kw = SIZES[size]
  cfg = tiny("gemma3", **kw, layer_types=pattern_layer_types(kw["num_layers"], 6), dtype=dtype, param_dtype=dtype)
  model = Decoder(cfg, rngs=nnx.Rngs(seed))
  graphdef, params, rest = ntk.split_params(model, "all")
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  return cfg, ntk.first_token_logits_fn(graphdef, rest), params, n_params


def flat_params(params) -> dict[str, np.ndarray]:
  """"layers.0.attn.q_proj.kernel" -> array: the parameters as the peer reads them."""
  return {".".join(str(k) for k in path): np.asarray(var[...]) for path, var in nnx.to_flat_state(params)}


def prompts(rng, n: int, seq: int, vocab: int):
  """Random tokens [N T] with 0..T/4 left-padding positions per prompt (as bench/kernels.py)."""
  tokens = rng.integers(1, vocab, (n, seq)).astype(np.int32)
  pads = rng.integers(0, seq // 4 + 1, n)
  mask = (np.arange(seq)[None] >= pads[:, None]).astype(np.int32)
  return np.where(mask, tokens, 0).astype(np.int32), mask


def rel_err(a, b) -> float:
  return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def run_ours(f, params, tokens, mask, ids, chunk: int, args) -> tuple[np.ndarray, dict]:
  call = lambda: ntk.logit_kernel(f, params, tokens, mask, ids, method="structured", chunk_size=chunk,
                                  progress=False)
  start = time.perf_counter()
  kernel = call()
  first = time.perf_counter() - start
  a = CpuMonitor.snapshot()
  t = time_fn(call, warmup=args.warmup, repeats=args.repeats)
  b = CpuMonitor.snapshot()
  return kernel, {"wall_s": t["median_s"], "cpu_s": t["cpu_median_s"], "min_s": t["min_s"], "times_s": t["times_s"],
                  "first_call_s": first, "others_busy": CpuMonitor.other_cores(a, b), "chunk_size": chunk}


def run_peer(args, cfg, params, cases: list[dict], work: Path) -> dict:
  """Writes the parameters, inputs and our logits, runs bench/nt_peer.py under --nt-python, returns its result with
  each kernel loaded (key "kernel_array")."""
  np.savez(work / "params.npz", **flat_params(params))
  manifest = {"config": {**cfg.to_dict(), "layer_types": list(cfg.layer_types)}, "params": str(work / "params.npz"),
              "out_dir": str(work), "implementations": args.implementations, "warmup": args.warmup,
              "repeats": args.repeats, "logits_atol": args.logits_atol, "limit_gb": args.nt_limit_gb,
              "case_budget_s": args.nt_case_budget_s, "cases": []}
  for c in cases:
    path = work / f"{c['name']}.npz"
    np.savez(path, tokens=c["tokens"], mask=c["mask"], ids=c["ids"], logits=c["logits"])
    manifest["cases"].append({"name": c["name"], "inputs": str(path)})
  (work / "manifest.json").write_text(json.dumps(manifest, indent=2))
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  env.pop("PYTHONPATH", None)  # the peer's venv must not see this project's packages
  start = time.perf_counter()
  proc = subprocess.run([args.nt_python, str(HERE / "nt_peer.py"), str(work / "manifest.json")], env=env,
                        timeout=args.peer_timeout_s, capture_output=True, text=True)
  sys.stdout.write("".join(f"    {line}\n" for line in proc.stdout.splitlines()))
  if proc.returncode != 0 or not (work / "result.json").exists():
    raise RuntimeError(f"nt_peer.py exited {proc.returncode}:\n{proc.stderr[-3000:]}")
  result = json.loads((work / "result.json").read_text())
  result["process_s"] = time.perf_counter() - start
  for rec in result["cases"].values():
    for r in rec["implementations"].values():
      if "kernel" in r:
        r["kernel_array"] = np.load(r.pop("kernel"))
  return result


def compare(case: dict, ours: np.ndarray, peer: dict, rtol: float) -> None:
  """Fills `case` with the peer's per-implementation timings, the ratios nt / ours and the agreement."""
  case["nt"], case["max_rel_err"], case["agree"], case["nt_over_ours"] = {}, {}, {}, {}
  case["logits_max_abs_diff"] = peer.get("logits_max_abs_diff")
  if "error" in peer:
    case["nt_error"] = peer["error"]
  for impl, r in peer["implementations"].items():
    k = r.pop("kernel_array", None)
    case["nt"][impl] = r
    if k is None:
      continue
    if k.shape != ours.shape:
      r["error"] = f"kernel shape {k.shape}, ours {ours.shape}"
      continue
    case["max_rel_err"][impl] = rel_err(k, ours)
    case["agree"][impl] = case["max_rel_err"][impl] <= rtol
    case["nt_over_ours"][impl] = r["wall_s"] / case["ours"]["wall_s"]
  timed = [i for i in case["nt_over_ours"] if case["agree"][i]]
  if timed:
    best = min(timed, key=lambda i: case["nt"][i]["wall_s"])
    case["nt_best"] = best
    case["nt_best_s"] = case["nt"][best]["wall_s"]
    case["nt_best_over_ours"] = case["nt_over_ours"][best]
    case["nt_best_over_ours_cpu"] = case["nt"][best]["cpu_s"] / case["ours"]["cpu_s"]
  busy = [x for x in [case["ours"]["others_busy"], *(r.get("others_busy") for r in case["nt"].values())]
          if x is not None]
  case["others_busy"] = max(busy) if busy else None


SHORT = {"JACOBIAN_CONTRACTION": "jc", "NTK_VECTOR_PRODUCTS": "nvp", "STRUCTURED_DERIVATIVES": "sd"}


def status(r: dict) -> str:
  """A peer implementation without a time: "does not fit", "failed" or "-" (not run)."""
  return "-" if "error" not in r else "does not fit" if r["error"].startswith("does not fit") else "failed"


def table(cases: list[dict], impls: list[str]) -> str:
  headers = (["size", "N", "|S|", "ours s"] + [f"nt {SHORT.get(i, i)} s" for i in impls]
             + [f"nt {SHORT.get(i, i)}/ours" for i in impls] + ["best", "best/ours", "max rel err", "others busy"])
  rows = []
  for c in cases:
    nt_s = [c["nt"].get(i, {}).get("wall_s", status(c["nt"].get(i, {}))) for i in impls]
    ratios = [f"{c['nt_over_ours'][i]:.2f}" if i in c["nt_over_ours"] else "-" for i in impls]
    errs = "/".join(f"{c['max_rel_err'][i]:.1e}" + ("" if c["agree"][i] else " FAIL") for i in c["max_rel_err"])
    rows.append([c["size"], c["n"], c["s"], c["ours"]["wall_s"], *nt_s, *ratios, SHORT.get(c.get("nt_best"), "-"),
                 f"{c['nt_best_over_ours']:.2f}" if "nt_best_over_ours" in c else "-", errs or "-",
                 "?" if c["others_busy"] is None else f"{c['others_busy']:.2f}"])
  return format_table(headers, rows)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="xs,s", help=f"comma-separated model sizes from {', '.join(SIZES)}")
  p.add_argument("--n", default="8,16,32", help="prompt counts N")
  p.add_argument("--s", default="5", help="token-set sizes |S|")
  p.add_argument("--seq", type=int, default=16, help="prompt length T")
  p.add_argument("--chunk", type=int, default=8, help="our chunk_size (min(chunk, N) is used)")
  p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                 help="model and kernel dtype, both sides")
  p.add_argument("--implementations", default=",".join(IMPLEMENTATIONS),
                 help="neural-tangents NtkImplementation names to time")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first (compiling) one")
  p.add_argument("--repeats", type=int, default=5, help="timed calls per method and case")
  p.add_argument("--rtol", type=float, default=None,
                 help="agreement bound on max|K_nt - K_ours| / max|K_ours| (default 1e-4 float32, 1e-6 float64)")
  p.add_argument("--logits-atol", type=float, default=None,
                 help="bound on the peer's first-token logits against ours, relative to max(1, max|logit|) "
                      "(default 1e-4 float32, 1e-6 float64)")
  p.add_argument("--nt-python", default=DEFAULT_NT_PYTHON, help="interpreter of the neural-tangents venv")
  p.add_argument("--nt-limit-gb", type=float, default=4.0,
                 help="skip a neural-tangents implementation whose compiled program holds one buffer over this")
  p.add_argument("--nt-case-budget-s", type=float, default=20.0,
                 help="fewer timed peer calls (at least one) when --repeats of them would take longer than this")
  p.add_argument("--peer-timeout-s", type=float, default=3600.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--smoke", action="store_true", help="xs, N=4, |S|=3, one repeat, no extra warm-up")
  p.add_argument("--out", default=None, help="JSON output (default bench/results/kernels_nt.json; "
                                              "kernels_nt_smoke.json with --smoke)")
  args = p.parse_args(argv)
  if args.smoke:
    args.sizes, args.n, args.s, args.repeats, args.warmup = "xs", "4", "3", 1, 0
  args.out = args.out or str(HERE / "results" / ("kernels_nt_smoke.json" if args.smoke else "kernels_nt.json"))
  args.rtol = args.rtol or (1e-4 if args.dtype == "float32" else 1e-6)
  args.logits_atol = args.logits_atol or (1e-4 if args.dtype == "float32" else 1e-6)
  args.implementations = [x for x in args.implementations.split(",") if x]
  for impl in args.implementations:
    if impl not in IMPLEMENTATIONS:
      p.error(f"unknown implementation {impl!r}; choose from {', '.join(IMPLEMENTATIONS)}")
  sizes = [x for x in args.sizes.split(",") if x]
  for size in sizes:
    if size not in SIZES:
      p.error(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
  if not Path(args.nt_python).exists():
    p.error(f"--nt-python {args.nt_python} not found; create the venv as in this script's --help")

  if args.dtype == "float64":
    jax.config.update("jax_enable_x64", True)
  info = machine_info()
  print(f"# {info['cpu']} ({info['cpu_count']} cores), jax {info['versions']['jax']}, {args.dtype}, "
        f"load average {info['load_average_at_start']}", flush=True)
  start = time.perf_counter()
  rng = np.random.default_rng(args.seed)
  out = {"machine": info, "args": vars(args), "smoke": args.smoke, "sizes": {}, "cases": []}
  for size in sizes:
    cfg, f, params, n_params = build(size, args.seed, args.dtype)
    out["sizes"][size] = {"config": SIZES[size], "params": n_params}
    logits_of = jax.jit(lambda p, t, m: jax.vmap(lambda a, b: f(p, a[None], b[None]))(t, m))
    cases, pending = [], []
    for n in ints(args.n):
      for s in ints(args.s):
        tokens, mask = prompts(rng, n, args.seq, cfg.vocab_size)
        ids = rng.choice(cfg.vocab_size, s, replace=False).astype(np.int32)
        kernel, ours = run_ours(f, params, tokens, mask, ids, min(args.chunk, n), args)
        logits = np.asarray(logits_of(params, tokens, mask))[:, ids]
        name = f"{size}_n{n}_s{s}"
        case = {"name": name, "size": size, "n": n, "s": s, "seq": args.seq, "params": n_params,
                "dtype": args.dtype, "kernel_shape": list(kernel.shape),
                "kernel_max_abs": float(np.max(np.abs(kernel))),
                "ours": ours}
        cases.append(case)
        pending.append({"name": name, "tokens": tokens, "mask": mask, "ids": ids, "logits": logits,
                        "kernel": kernel})
        print(f"  [{size}] N={n} |S|={s}: ours (structured) {ours['wall_s']:.4f}s "
              f"({time.perf_counter() - start:.0f}s elapsed)", flush=True)
    with tempfile.TemporaryDirectory(prefix="kernels_nt_") as tmp:
      peer = run_peer(args, cfg, params, pending, Path(tmp))
    out.setdefault("nt", {k: peer[k] for k in ("versions", "python", "executable", "devices",
                                               "neural_tangents_import_s")})
    out["sizes"][size]["peer_process_s"] = peer["process_s"]
    for case, p_in in zip(cases, pending):
      compare(case, p_in["kernel"], peer["cases"][case["name"]], args.rtol)
      out["cases"].append(case)
    print(f"\n## size {size}: {n_params / 1e6:.2f}M parameters (vocab {cfg.vocab_size}, d {cfg.embed_dim}, "
          f"mlp {cfg.mlp_dim}, {cfg.num_layers} layers), T={args.seq}, {args.dtype}")
    print(table(cases, args.implementations), flush=True)

  ratios = [(c["nt_best_over_ours"], c["name"]) for c in out["cases"] if "nt_best_over_ours" in c]
  busy = [c["others_busy"] for c in out["cases"] if c["others_busy"] is not None]
  out["summary"] = {
      "cases": len(out["cases"]),  # every case has a peer kernel, and every kernel it has agrees
      "all_agree": bool(out["cases"]) and all(c["agree"] and all(c["agree"].values()) for c in out["cases"]),
      "max_rel_err": max((v for c in out["cases"] for v in c["max_rel_err"].values()), default=None),
      "worst_nt_best_over_ours": min(ratios)[0] if ratios else None, "worst_case": min(ratios)[1] if ratios else None,
      "best_nt_best_over_ours": max(ratios)[0] if ratios else None, "best_case": max(ratios)[1] if ratios else None,
      "others_busy_median": statistics.median(busy) if busy else None,
  }
  out["total_s"] = time.perf_counter() - start
  out["load_average_at_end"] = load_average()
  out["peak_rss_mib"] = peak_rss_mib()
  s = out["summary"]
  print(f"\nnt/ours = neural-tangents' time / ours (wall medians; > 1: ours is faster); best = its fastest "
        f"implementation that agrees. max rel err = max|K_nt - K_ours| / max|K_ours| per implementation "
        f"(bound {args.rtol:g}).\nagreement {'ok' if s['all_agree'] else 'FAILED'}, worst best/ours "
        f"{s['worst_nt_best_over_ours']}, total {out['total_s']:.0f}s, load average {out['load_average_at_end']}")
  path = write_json(args.out, out)
  print(f"wrote {path}")
  if not s["all_agree"]:
    raise SystemExit("kernels_nt: the kernels do not agree (or the peer failed)")
  return out


if __name__ == "__main__":
  main()
