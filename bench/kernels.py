"""Exact first-token eNTK (`dcr_jax.kernels.ntk.logit_kernel`) against a naive full-Jacobian baseline and a torch.func
peer on the same model in transformers, CPU float32.

For N prompts and a token set S, all of them compute K[a, b, i, j] = <d z_S[i](a)/dθ, d z_S[j](b)/dθ> over every
parameter of a random-init tiny Gemma 3 ([N N S S]):
  naive     one jitted function: jax.vmap(jax.jacrev(g)) over all N prompts for g(params, example) -> z_S [S]
            (the Jacobian pytree [N S ...param] is materialised whole), then a per-leaf einsum contraction;
  jacobian  logit_kernel(method="jacobian"): the same vjps chunk by chunk, tree dot products per block pair
            (blocks a <= b only, the rest by symmetry);
  jvp_vjp   logit_kernel(method="jvp_vjp"): vjps of chunk b, then jvps at every a along each of them;
  structured logit_kernel(method="structured"): per-layer activations and backpropagated signals of each prompt,
            contracted pairwise (dcr_jax.kernels.structured), no parameter-length row;
  torch     the model exported to transformers (Gemma3ForCausalLM, eager attention): torch.func.vmap over prompts of
            torch.func.jacrev of the restricted first-token logits (functional_call; the tied head shares the
            embedding), then the same per-leaf contraction (--torch to include it).
Every method must agree with the naive kernel (allclose rtol 1e-4, atol 1e-6·max|K|, float32).

Scaling is reported in two sweeps per model size: N (--n, at |S| = --s-at) and |S| (--s, at N = --n-at).
The three methods are timed interleaved (one call of each per round, order rotated every round; up to --repeats
rounds, fewer for slow cases, see --case-budget-s) after an untimed warm-up call wherever a shape is new
(naive: compiled ahead of time, one warm-up run every case); wall and process-CPU medians are both reported, and `others busy` is the
number of cores other processes kept busy meanwhile (the machine may be shared).

Peak memory is XLA's compiled memory_analysis (arguments + outputs + temporaries) of the jitted functions, not
RSS: for naive its one function; for the chunked methods the largest of their per-call functions plus the buffers
the driver keeps alive between calls (J of the current b chunk) and the [N N S S] result; for structured the params,
the factors of all N prompts (kept), the larger step's temporaries (and a factor step's output) and the result.
torch has no such figure (its column is empty). It is deterministic and
per case although every case runs in one process. Naive is skipped ("does not fit") when its Jacobian alone,
N·|S|·P·4 bytes, exceeds --naive-limit-gb (default 4), so the machine is never pushed into OOM.

    .venv/bin/python bench/kernels.py [--sizes xs,s] [--n 4,8,16,32] [--s 2,5,10] [--out bench/results/kernels.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.tree_util import Partial  # noqa: E402

from common import CpuMonitor, format_table, ints, load_average, machine_info, peak_rss_mib, write_json  # noqa: E402
from dcr_jax.kernels import ntk, structured  # noqa: E402
from dcr_jax.model import Decoder, default_positions, tiny  # noqa: E402
from dcr_jax.weights import export_hf  # noqa: E402
from dcr_jax.model.config import pattern_layer_types  # noqa: E402

SIZES = {  # tiny("gemma3", ...) overrides; 4 heads x 16 dims (tiny's default) throughout
    "xs": dict(vocab_size=1024, embed_dim=64, mlp_dim=128, num_layers=2),
    "s": dict(vocab_size=2048, embed_dim=128, mlp_dim=256, num_layers=4),
    "m": dict(vocab_size=4096, embed_dim=256, mlp_dim=512, num_layers=4),
    "l": dict(vocab_size=8192, embed_dim=512, mlp_dim=1024, num_layers=4),
}
METHODS = ("naive", "jacobian", "jvp_vjp", "structured", "torch")
OURS = ("jacobian", "jvp_vjp", "structured")
MIB = 2 ** 20


# -------------------------------------------------------------------------------------------------- the baseline


def naive_kernel(f, params, tokens, mask, ids):
  """[N N S S]: the whole Jacobian [N S ...param] by vmap(jacrev), then one einsum per parameter leaf."""

  def g(p, t, m):  # restricted first-token logits of one prompt -> [S]
    return f(p, t[None], m[None])[ids]

  jac = jax.vmap(jax.jacrev(g), in_axes=(None, 0, 0))(params, tokens, mask)
  total = 0
  for leaf in jax.tree.leaves(jac):
    j = leaf.reshape(leaf.shape[0], leaf.shape[1], -1)
    total = total + jnp.einsum("aip,bjp->abij", j, j, precision=jax.lax.Precision.HIGHEST)
  return total


def torch_kernel(directory):
  """K [N N S S] (numpy) from the transformers model saved in `directory`: torch.func vmap(jacrev) over prompts of
  the first-token logits at the token set, then a per-parameter einsum; callable(tokens, mask, ids)."""
  import torch
  import transformers
  from torch.func import functional_call, jacrev, vmap

  model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager",
                                                            dtype=torch.float32).eval()
  params = {k: v.detach() for k, v in model.named_parameters()}

  def g(p, tokens, mask, positions, ids):  # one left-padded prompt -> [S]
    out = functional_call(model, p, (tokens[None],), {"attention_mask": mask[None], "position_ids": positions[None]})
    return out.logits[0, -1, ids]

  def kernel(tokens, mask, ids):
    positions = np.asarray(default_positions(jnp.asarray(mask)))
    t, m, pos = (torch.tensor(np.asarray(x), dtype=torch.long) for x in (tokens, mask, positions))
    with torch.no_grad():
      jac = vmap(jacrev(g), in_dims=(None, 0, 0, 0, None))(params, t, m, pos, torch.tensor(ids, dtype=torch.long))
      total = 0
      for leaf in jac.values():
        j = leaf.reshape(leaf.shape[0], leaf.shape[1], -1)
        total = total + torch.einsum("aip,bjp->abij", j, j)
    return total.numpy()

  return kernel


# ------------------------------------------------------------------------------------------------------- helpers


def build(size: str, seed: int):
  kw = SIZES[size]
  cfg = tiny("gemma3", **kw, layer_types=pattern_layer_types(kw["num_layers"], 6))
  model = Decoder(cfg, rngs=nnx.Rngs(seed))
  graphdef, params, rest = ntk.split_params(model, "all")
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  return cfg, model, ntk.first_token_logits_fn(graphdef, rest), params, n_params


def prompts(rng, n: int, seq: int, vocab: int):
  """Random tokens [N T] with 0..T/4 left-padding positions per prompt."""
  tokens = rng.integers(1, vocab, (n, seq)).astype(np.int32)
  pads = rng.integers(0, seq // 4 + 1, n)
  mask = (np.arange(seq)[None] >= pads[:, None]).astype(np.int32)
  return np.where(mask, tokens, 0).astype(np.int32), mask


def mem_bytes(compiled) -> dict:
  ma = compiled.memory_analysis()
  args, out, temp = ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.temp_size_in_bytes
  alias = getattr(ma, "alias_size_in_bytes", 0) or 0
  return {"arguments": args, "outputs": out, "temp": temp, "total": args + out + temp - alias}


_CHUNK_MEM: dict = {}
_WARM: set = set()  # (size, chunk, seq, S, method) already run once (compiled)


def chunked_memory(size: str, f, params, chunk: int, seq: int, n: int, s: int) -> dict:
  """Peak device bytes of logit_kernel's two methods for chunk size `chunk`, from the compiled per-call functions
  (independent of N except for the [N N S S] result, so cached per (size, chunk, seq, S))."""
  key = (size, chunk, seq, s)
  if key not in _CHUNK_MEM:
    g = Partial(ntk._restricted_logits, ntk._as_pytree(f))
    ex = (jax.ShapeDtypeStruct((chunk, seq), jnp.int32), jax.ShapeDtypeStruct((chunk, seq), jnp.int32),
          jax.ShapeDtypeStruct((chunk, s), jnp.int32))
    basis = jax.ShapeDtypeStruct((s, s), jnp.float32)
    rows = jax.eval_shape(lambda p, e, b: ntk._jacobians(g, p, e, b, None), params, ex, basis)
    jac = mem_bytes(ntk._jacobians.lower(g, params, ex, basis, None).compile())
    con = mem_bytes(ntk._contract.lower(rows, rows).compile())
    jvp = mem_bytes(ntk._jvp_block.lower(g, params, ex, rows, None).compile())
    rows_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(rows))
    _CHUNK_MEM[key] = {
        "rows_chunk": rows_bytes, "_jacobians": jac, "_contract": con, "_jvp_block": jvp,
        # jacobian: J_a is computed while J_b is held, then both go into the contraction (off-diagonal blocks);
        # on diagonal blocks J_a is J_b, one buffer passed twice (memory_analysis counts it twice)
        "jacobian_multi": max(jac["total"] + rows_bytes, con["total"]),
        "jacobian_single": max(jac["total"], con["total"] - rows_bytes),
        # jvp_vjp: J_b, then jvps at a (J_b is an argument of the jvp block)
        "jvp_vjp": max(jac["total"], jvp["total"]),
    }
    est = structured.memory_estimate(f.graphdef, params, f.rest, prompts=chunk, width=seq, outputs=s,
                                     chunk_size=chunk)
    _CHUNK_MEM[key]["structured"] = est
    # params + the kept factors + the larger step's temporaries (a factor step also writes one chunk's factors)
    _CHUNK_MEM[key]["structured_step"] = max(est["factors"]["temp"] + est["factors"]["outputs"],
                                             est["contract"]["temp"] + est["contract"]["outputs"])
  m = _CHUNK_MEM[key]
  result = n * n * s * s * 4
  jac = m["jacobian_multi"] if n > chunk else m["jacobian_single"]
  kept = m["structured"]["factors"]["arguments"] + n * m["structured"]["factors_per_prompt"]
  return {"jacobian": jac + result, "jvp_vjp": m["jvp_vjp"] + result,
          "structured": kept + m["structured_step"] + result, "detail": m}


def rel_err(a, b) -> float:
  return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def agree(a, b) -> bool:
  return bool(np.allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.max(np.abs(b)))))


# ------------------------------------------------------------------------------------------------------ one case


def run_case(size, f, params, n_params, vocab, n, s, args, rng, torch_fn=None) -> dict:
  tokens, mask = prompts(rng, n, args.seq, vocab)
  ids = rng.choice(vocab, s, replace=False).astype(np.int32)
  chunk = min(args.chunk, n)
  case = {"size": size, "n": n, "s": s, "chunk_size": chunk, "params": n_params,
          "naive_jacobian_bytes": n * s * n_params * 4}
  fits = case["naive_jacobian_bytes"] <= args.naive_limit_gb * 1e9
  case["naive_fits"] = fits

  calls = {
      "jacobian": lambda: ntk.logit_kernel(f, params, tokens, mask, ids, method="jacobian", chunk_size=chunk,
                                           progress=False),
      "jvp_vjp": lambda: ntk.logit_kernel(f, params, tokens, mask, ids, method="jvp_vjp", chunk_size=chunk,
                                          progress=False),
      "structured": lambda: ntk.logit_kernel(f, params, tokens, mask, ids, method="structured", chunk_size=chunk,
                                             progress=False),
  }
  if torch_fn is not None and fits:  # its Jacobian is naive's
    calls["torch"] = lambda: torch_fn(tokens, mask, ids)
  mem = chunked_memory(size, f, params, chunk, args.seq, n, s)
  case["mem_bytes"] = {k: mem[k] for k in OURS}
  case["mem_detail"] = {"chunked": mem["detail"]}
  if fits:
    t0 = time.perf_counter()
    compiled = jax.jit(naive_kernel).lower(f, params, jnp.asarray(tokens), jnp.asarray(mask),
                                           jnp.asarray(ids)).compile()
    case["naive_compile_s"] = time.perf_counter() - t0
    nm = mem_bytes(compiled)
    case["mem_bytes"]["naive"] = nm["total"]
    case["mem_detail"]["naive"] = nm
    dev = (jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(ids))
    calls = {"naive": lambda: np.asarray(compiled(f, params, *dev)), **calls}

  # warm-up: only where this shape has not run before (naive is compiled ahead of time above; the chunked
  # methods' functions depend on (chunk, T, S), not on N)
  case["warmup_s"] = {}
  for name in calls:
    key = (size, chunk, args.seq, s, name) if name not in ("naive", "torch") else None
    if key not in _WARM:  # naive, torch: always (an AOT executable's first run carries a one-time cost)
      t0 = time.perf_counter()
      calls[name]()
      case["warmup_s"][name] = time.perf_counter() - t0
      if key is not None:
        _WARM.add(key)

  # interleaved timing: up to --repeats rounds, fewer once a round's time would take the case past --case-budget-s;
  # the first round's results give the agreement check
  names = list(calls)
  wall = {k: [] for k in names}
  cpu = {k: [] for k in names}
  others, results, timed = [], {}, 0.0
  for r in range(args.repeats):
    order = names[r % len(names):] + names[:r % len(names)]
    round_s = 0.0
    for name in order:
      a, cpu0 = CpuMonitor.snapshot(), time.process_time()
      res = calls[name]()
      cpu1, b = time.process_time(), CpuMonitor.snapshot()
      results.setdefault(name, res)
      wall[name].append(b[0] - a[0])
      cpu[name].append(cpu1 - cpu0)
      round_s += b[0] - a[0]
      o = CpuMonitor.other_cores(a, b)
      if o is not None:
        others.append(o)
    timed += round_s
    if timed + round_s > args.case_budget_s:
      break
  case["rounds"] = len(wall[names[0]])
  ref_name = "naive" if fits else "jacobian"
  ref = results[ref_name]
  case["reference"] = ref_name
  case["max_rel_err"] = {k: rel_err(v, ref) for k, v in results.items() if k != ref_name}
  case["allclose"] = {k: agree(v, ref) for k, v in results.items() if k != ref_name}
  case["kernel_max_abs"] = float(np.max(np.abs(ref)))

  case["wall_s"] = {k: statistics.median(v) for k, v in wall.items()}
  case["cpu_s"] = {k: statistics.median(v) for k, v in cpu.items()}
  case["wall_times_s"] = {k: [round(x, 5) for x in v] for k, v in wall.items()}
  case["others_busy"] = statistics.median(others) if others else None
  timed_ours = [k for k in OURS if k in wall]
  if fits:
    case["speedup_wall"] = {k: case["wall_s"]["naive"] / case["wall_s"][k] for k in timed_ours}
    case["speedup_cpu"] = {k: case["cpu_s"]["naive"] / case["cpu_s"][k] for k in timed_ours}
  if "torch" in wall:  # the peer's time over ours (> 1: we are faster)
    case["torch_over"] = {k: case["wall_s"]["torch"] / case["wall_s"][k] for k in timed_ours}
  return case


# ---------------------------------------------------------------------------------------------------------- main


def table(cases: list[dict]) -> str:
  short = {"jacobian": "jac", "jvp_vjp": "jvp", "structured": "str"}
  timed = [m for m in METHODS if any(m in c["wall_s"] for c in cases)]
  peer = "torch" in timed
  headers = (["N", "|S|", "rounds"] + [f"{m} s" for m in timed] + [f"x {short[m]}" for m in OURS]
             + [f"x {short[m]} cpu" for m in OURS] + ([f"torch/{short[m]}" for m in OURS] if peer else [])
             + ["naive MiB"] + [f"{short[m]} MiB" for m in OURS] + ["max rel err", "others busy"])
  rows = []
  for c in cases:
    fits = c["naive_fits"]
    speed = lambda key, m: f"{c[key][m]:.2f}" if key in c and m in c[key] else "-"
    rows.append(
        [c["n"], c["s"], c["rounds"]]
        + [c["wall_s"][m] if m in c["wall_s"] else "does not fit" if m == "naive" else "-" for m in timed]
        + [speed("speedup_wall", m) for m in OURS] + [speed("speedup_cpu", m) for m in OURS]
        + ([speed("torch_over", m) for m in OURS] if peer else [])
        + [f"{c['mem_bytes']['naive'] / MIB:.1f}" if fits else f"(J: {c['naive_jacobian_bytes'] / MIB:.0f})"]
        + [f"{c['mem_bytes'][m] / MIB:.1f}" for m in OURS]
        + [("" if all(c["allclose"].values()) else "FAIL ") + "/".join(f"{v:.1e}" for v in c["max_rel_err"].values()),
           "?" if c["others_busy"] is None else f"{c['others_busy']:.1f}"])
  return format_table(headers, rows)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="xs,s", help=f"comma-separated model sizes from {', '.join(SIZES)}")
  p.add_argument("--n", default="4,8,16,32", help="prompt counts of the N sweep")
  p.add_argument("--s", default="2,5,10", help="token-set sizes of the |S| sweep")
  p.add_argument("--n-at", type=int, default=8, help="N of the |S| sweep")
  p.add_argument("--s-at", type=int, default=5, help="|S| of the N sweep")
  p.add_argument("--seq", type=int, default=16, help="prompt length T")
  p.add_argument("--chunk", type=int, default=8, help="logit_kernel chunk_size (min(chunk, N) is used)")
  p.add_argument("--repeats", type=int, default=3, help="timed rounds at most (each times every method once)")
  p.add_argument("--case-budget-s", type=float, default=4.0,
                 help="stop adding timed rounds to a case once the next would take it past this many seconds")
  p.add_argument("--naive-limit-gb", type=float, default=4.0,
                 help="skip naive when its Jacobian N*S*P*4 bytes exceeds this many GB")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                 help="include the torch.func vmap(jacrev) peer (transformers, same weights)")
  p.add_argument("--out", default="bench/results/kernels.json")
  args = p.parse_args(argv)

  sizes = [x for x in args.sizes.split(",") if x]
  for size in sizes:
    if size not in SIZES:
      p.error(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
  info = machine_info()
  print(f"# {info['cpu']} ({info['cpu_count']} cores), jax {info['versions']['jax']}, "
        f"load average {info['load_average_at_start']}", flush=True)
  start = time.perf_counter()
  rng = np.random.default_rng(args.seed)
  out = {"machine": info, "args": vars(args), "memory_measure": "XLA compiled memory_analysis "
         "(arguments + outputs + temp; chunked methods: largest per-call function + held J chunk + result)",
         "sizes": {}, "cases": []}
  for size in sizes:
    cfg, model, f, params, n_params = build(size, args.seed)
    torch_fn = None
    if args.torch:
      with tempfile.TemporaryDirectory() as tmp:
        torch_fn = torch_kernel(export_hf(model, tmp))
    out["sizes"][size] = {"config": SIZES[size], "params": n_params, "num_heads": cfg.num_heads,
                          "head_dim": cfg.head_dim}
    n_sweep = [(n, args.s_at) for n in ints(args.n)]
    s_sweep = [(args.n_at, s) for s in ints(args.s)]
    done: dict = {}
    for n, s in n_sweep + s_sweep:
      if (n, s) in done:
        continue
      case = run_case(size, f, params, n_params, cfg.vocab_size, n, s, args, rng, torch_fn)
      done[(n, s)] = case
      out["cases"].append(case)
      ok = "ok" if all(case["allclose"].values()) else "MISMATCH"
      print(f"  [{size}] N={n} |S|={s}: " + ", ".join(f"{k} {v:.3f}s" for k, v in case["wall_s"].items())
            + f"  ({ok}, {time.perf_counter() - start:.0f}s elapsed)", flush=True)
    print(f"\n## size {size}: {n_params / 1e6:.2f}M parameters "
          f"(vocab {cfg.vocab_size}, d {cfg.embed_dim}, mlp {cfg.mlp_dim}, {cfg.num_layers} layers), T={args.seq}")
    print(f"\nscaling in N (|S| = {args.s_at}):")
    print(table([done[k] for k in n_sweep]))
    print(f"\nscaling in |S| (N = {args.n_at}):")
    print(table([done[k] for k in s_sweep]), flush=True)

  out["total_s"] = time.perf_counter() - start
  out["load_average_at_end"] = load_average()
  out["peak_rss_mib"] = peak_rss_mib()
  print(f"\nx = naive time / ours (wall medians; 'cpu' = process CPU seconds); torch/ours = the torch.func peer's time "
        f"/ ours. max rel err = max|K - K_naive| / max|K_naive| for each other method in column order (vs jacobian "
        f"where naive does not fit).\n"
        f"memory = XLA compiled memory_analysis; naive skipped when N*S*P*4 > {args.naive_limit_gb} GB "
        f"(column shows that Jacobian's MiB).\n"
        f"total {out['total_s']:.0f}s, load average {out['load_average_at_end']}, "
        f"process peak RSS {out['peak_rss_mib']:.0f} MiB")
  path = write_json(args.out, out)
  print(f"wrote {path}")
  return out


if __name__ == "__main__":
  main()
