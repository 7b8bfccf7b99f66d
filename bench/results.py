"""Render bench/results/*.json into one Markdown summary, bench/results.md.

Reads forward.json, train_step.json, generate.json, kernels.json, kernels_270m.json, load_memory.json and
capability_parity.json (each optional; a missing one is listed as "not run") plus forward_smollm2.json,
generate_smollm2.json, kernels_nt.json, parity_270m.json, decode_verdicts.json, device.json and pipeline_*.json if
present. Every value is looked up defensively: a missing key or a partial file shows as "n/a"
rather than stopping the render. A timing taken while other processes held >= 0.25 cores (or a file marked
"contended") is reported as such and its goal is not judged. Only reads JSON; runs no benchmark.

    .venv/bin/python bench/results.py [--results bench/results] [--out bench/results.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
from pathlib import Path
from typing import Any

BENCHES = ("forward", "train_step", "generate", "kernels", "kernels_270m", "load_memory", "capability_parity")
EXTRA = ("forward_smollm2", "generate_smollm2", "kernels_nt", "parity_270m", "decode_verdicts")
VERSIONS = ("jax", "jaxlib", "flax", "torch", "transformers")
NA = "n/a"
HERE = Path(__file__).resolve().parent


def get(d: Any, *keys: Any) -> Any:
  """d[k0][k1]..., or None if any step is missing or of the wrong type."""
  for k in keys:
    try:
      d = d[k]
    except (KeyError, IndexError, TypeError):
      return None
  return d


def num(x: Any) -> float | None:
  """x as a float if it is a real number (not bool), else None."""
  if isinstance(x, bool) or not isinstance(x, (int, float)):
    return None
  return float(x)


def fmt(x: Any, spec: str = ".3g", suffix: str = "") -> str:
  """A number formatted with `spec` and `suffix`, or "n/a"."""
  x = num(x)
  return NA if x is None else f"{x:{spec}}{suffix}"


def txt(x: Any) -> str:
  """str(x), or "n/a" for None."""
  return NA if x is None else str(x)


def fmt_s(x: Any) -> str:
  """Seconds: three significant digits, whole seconds from 100 s up."""
  x = num(x)
  return fmt(x, ".0f" if x is not None and abs(x) >= 100 else ".3g", " s")


def fmt_x(x: Any) -> str:
  """A ratio as "1.23x"."""
  return fmt(x, ".2f", "x")


def fmt_mib(x: Any) -> str:
  """Mebibytes, no decimals."""
  return fmt(x, ".0f", " MiB")


BUSY = 0.25  # other processes' cores during a timing from which it counts as contended
NOT_JUDGED = "contended — not judged"


def met(ok: bool | None, busy: float | None = None) -> str:
  """yes / no / n/a for a goal check; "contended — not judged" when the timings behind it ran beside `busy` >=
  BUSY cores of other processes."""
  if busy is not None and busy >= BUSY:
    return NOT_JUDGED
  return NA if ok is None else ("yes" if ok else "no")


def at_least(x: Any, goal: float) -> bool | None:
  """x >= goal, or None when x is not a number."""
  x = num(x)
  return None if x is None else x >= goal


def peak_rss(data: Any) -> float | None:
  """The peak RSS in MiB of a bench's JSON: the max over its named checkpoints, or the number itself."""
  v = get(data, "peak_rss_mib")
  if isinstance(v, dict):
    vals = [num(x) for x in v.values()]
    vals = [x for x in vals if x is not None]
    return max(vals) if vals else None
  return num(v)


def recorded_at(path: Path) -> dt.datetime:
  """When a result file was written: its last commit's date if git tracks it unchanged (a fresh clone resets every
  file's mtime), else its modification time."""
  try:
    git = ["git", "-C", str(path.parent)]
    changed = subprocess.run([*git, "status", "--porcelain", "--", path.name], capture_output=True, text=True, timeout=30)
    committed = subprocess.run([*git, "log", "-1", "--format=%ct", "--", path.name], capture_output=True, text=True,
                               timeout=30)
    if changed.returncode == 0 and not changed.stdout.strip() and committed.stdout.strip():
      return dt.datetime.fromtimestamp(int(committed.stdout.strip()))
  except (OSError, subprocess.SubprocessError, ValueError):
    pass
  return dt.datetime.fromtimestamp(path.stat().st_mtime)


def load(results: Path) -> dict[str, dict[str, Any]]:
  """Each bench name -> {"path", "data" (dict or None), "mtime" (when written, or None), "error" (str or None)}."""
  out = {}
  for name in (*BENCHES, *EXTRA):
    path = results / f"{name}.json"
    entry: dict[str, Any] = {"path": path, "data": None, "mtime": None, "error": None}
    if path.exists():
      try:
        entry["mtime"] = recorded_at(path)
        data = json.loads(path.read_text())
        if isinstance(data, dict):
          entry["data"] = data
        else:
          entry["error"] = "not a JSON object"
      except (OSError, ValueError) as e:
        entry["error"] = f"unreadable ({type(e).__name__})"
    out[name] = entry
  return out


def row(cells: list[str]) -> str:
  """One Markdown table row (pipes in cells escaped)."""
  return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
  """A Markdown table as a list of lines."""
  return [row(header), row(["---"] * len(header)), *(row(r) for r in rows)]


def header_section(benches: dict[str, dict[str, Any]]) -> list[str]:
  """Machine and versions, with one line per source file (date recorded, load at start, or "not run")."""
  lines = []
  machines = {}
  for name in BENCHES:
    m = get(benches[name]["data"], "machine")
    if isinstance(m, dict):
      key = (m.get("cpu") or NA, m.get("cpu_count") or NA,
             tuple((v, get(m, "versions", v) or NA) for v in VERSIONS))
      machines.setdefault(key, []).append(name)
  if not machines:
    lines.append("Machine: n/a (no result file names one).")
  for (cpu, cores, versions), names in machines.items():
    prefix = "Machine" if len(machines) == 1 else f"Machine ({', '.join(names)})"
    lines.append(f"{prefix}: {cpu}, {cores} cores; " + ", ".join(f"{k} {v}" for k, v in versions) + ".")
  lines.append("")
  rows = []
  for name in BENCHES:
    b = benches[name]
    if b["data"] is None and b["error"] is None:
      rows.append([f"{name}.json", "not run", NA, NA])
      continue
    when = b["mtime"].strftime("%Y-%m-%d %H:%M") if b["mtime"] else NA
    load_avg = get(b["data"], "machine", "load_average_at_start")
    load_s = "/".join(fmt(x, ".2f") for x in load_avg) if isinstance(load_avg, list) else NA
    rows.append([f"{name}.json", b["error"] or "ok", when, load_s])
  lines += table(["file", "status", "recorded", "load avg at start (1/5/15 min)"], rows)
  return lines


def busy(values: list[Any]) -> float | None:
  """The median of the other processes' busy cores over the given timings, None when none was recorded."""
  vals = sorted(x for x in map(num, values) if x is not None)
  return vals[len(vals) // 2] if vals else None


def contention(values: list[Any]) -> str:
  """A note when other processes kept >= BUSY cores busy (median over the given cases) during timing, else ""."""
  b = busy(values)
  if b is None or b < BUSY:
    return ""
  return f"; contended: other processes held ~{b:.1f} cores during timing"


def kernel_summary(cases: Any, method: str) -> tuple[float | None, float | None, str]:
  """Best and worst wall speedup of `method` over naive, over cases where naive fits, and a note on where."""
  pts = []
  for c in cases if isinstance(cases, list) else []:
    sp = num(get(c, "speedup_wall", method))
    if get(c, "naive_fits") and sp is not None:
      pts.append((sp, f"{get(c, 'size')} N={get(c, 'n')} |S|={get(c, 's')}"))
  if not pts:
    return None, None, "no case where naive fits"
  best, worst = max(pts), min(pts)
  hit = sum(sp >= 10 for sp, _ in pts)
  return best[0], worst[0], f"best at {best[1]}, worst at {worst[1]}; {hit}/{len(pts)} cases >= 10x"


def ratio_rows(benches: dict[str, dict[str, Any]]) -> list[list[str]]:
  """The rows of the "ratios against a peer" table (one per goal), "not run" where the JSON is missing."""
  fw, ts, gen, kern, k270, mem, cap = (benches[n]["data"] for n in BENCHES)
  rows = []
  fw2, gen2 = benches["forward_smollm2"]["data"], benches["generate_smollm2"]["data"]

  def missing(label: str, name: str, goal: str) -> list[str]:
    why = benches[name]["error"] or "not run"
    return [label, NA, NA, NA, goal, NA, NA, f"{name}.json {why}"]

  fw_cases = [get(fw, "results", c, "other_cores_busy_median") for c in ("ours_full", "torch_full")]
  fw_busy = contention(fw_cases)
  label = "(a) forward, all-position logits, 8x128, vs transformers"
  if fw is None:
    rows.append(missing(label, "forward", ">= 1.0x"))
  else:
    r = get(fw, "ratios", "a_full_logits__torch_full_over_ours_full", "median_of_round_ratios")
    mins = get(fw, "ratios", "a_full_logits__torch_full_over_ours_full", "ratio_of_mins")
    rows.append([label, fmt_s(get(fw, "results", "ours_full", "median_s")),
                 fmt_s(get(fw, "results", "torch_full", "median_s")), fmt_x(r), ">= 1.0x", met(at_least(r, 1.0), busy(fw_cases)),
                 fmt_mib(peak_rss(fw)), f"median of per-round ratios; ratio of mins {fmt_x(mins)}; "
                 "RSS is one process holding both models" + fw_busy])

  label = "(b) prefill (last position only) vs transformers full logits"
  if fw is None:
    rows.append(missing(label, "forward", ">= 2.0x"))
  else:
    r = get(fw, "ratios", "b_prefill__torch_full_over_ours_last", "median_of_round_ratios")
    vs_last = get(fw, "ratios", "b_prefill__torch_last_over_ours_last", "median_of_round_ratios")
    cases = [get(fw, "results", c, "other_cores_busy_median") for c in ("ours_last", "torch_full")]
    rows.append([label, fmt_s(get(fw, "results", "ours_last", "median_s")),
                 fmt_s(get(fw, "results", "torch_full", "median_s")), fmt_x(r), ">= 2.0x",
                 met(at_least(r, 2.0), busy(cases)), fmt_mib(peak_rss(fw)),
                 f"vs HF logits_to_keep=1 ({fmt_s(get(fw, 'results', 'torch_last', 'median_s'))}): {fmt_x(vs_last)}"
                 + contention(cases)])

  stage2_cases = [get(ts, "results", c, "other_cores_busy_median") for c in ("stage2_full", "torch_stage2_full")]
  stage1_cases = [get(ts, "results", c, "other_cores_busy_median") for c in ("stage1_l9", "stage1_l18")]
  label = "(c) stage-2 step, full FT, AdamW, real 8x128 SFT batch, vs transformers+torch"
  if ts is None:
    rows.append(missing(label, "train_step", ">= 1.3x"))
  else:
    r = get(ts, "summary", "stage2_torch_over_ours")
    every = get(ts, "summary", "stage2_all_positions_over_response_only")
    head = (f"; head at {txt(get(ts, 'results', 'stage2_full', 'head_rows'))} loss positions of "
            f"{txt(get(ts, 'config', 'batch'))}x{txt(get(ts, 'config', 'seq'))}, our all-position head "
            f"{fmt_x(every)} slower" if every is not None else "")
    rows.append([label, fmt_s(get(ts, "results", "stage2_full", "median_s")),
                 fmt_s(get(ts, "results", "torch_stage2_full", "median_s")), fmt_x(r), ">= 1.3x",
                 met(at_least(r, 1.3), busy(stage2_cases)), fmt_mib(peak_rss(ts)),
                 f"on CPU time {fmt_x(get(ts, 'summary', 'stage2_torch_over_ours_cpu_time'))}; torch ran in its own "
                 f"process, peak RSS {fmt_mib(get(ts, 'results', 'torch_stage2_full', 'peak_rss_mib'))}{head}"
                 + contention(stage2_cases)])

  label = "(d) stage-2 step, fraction of this CPU's fp32 matmul peak"
  if ts is None:
    rows.append(missing(label, "train_step", "none (re-scoped)"))
  else:
    r = get(ts, "summary", "stage2_fraction_of_peak")
    rows.append([label, fmt(get(ts, "results", "stage2_full", "gflops"), ".0f", " GFLOP/s"),
                 fmt(get(ts, "matmul_peak", "peak_gflops"), ".0f", " GFLOP/s peak"), fmt(r, ".2f"),
                 "none (re-scoped: less work, not a peak fraction)", NA, fmt_mib(peak_rss(ts)),
                 "ratio = ours / peak; peak = best jitted 2048^2 jnp.dot / torch.mm median; on CPU time "
                 f"{fmt(get(ts, 'summary', 'stage2_cpu_time_fraction_of_jax_dot'), '.2f')} of jnp.dot"])

  label = "(e) stage-1 step at l = L/2 vs full depth"
  if ts is None:
    rows.append(missing(label, "train_step", "~0.5 (0.4-0.6)"))
  else:
    r = num(get(ts, "summary", "stage1_l9_over_l18"))
    rows.append([label, fmt_s(get(ts, "results", "stage1_l9", "median_s")) + " (l=9)",
                 fmt_s(get(ts, "results", "stage1_l18", "median_s")) + " (l=18, ours)", fmt(r, ".2f"),
                 "~0.5 (0.4-0.6)", met(None if r is None else abs(r - 0.5) <= 0.1, busy(stage1_cases)),
                 fmt_mib(peak_rss(ts)),
                 "ratio = ours l9 / ours l18 time, lower is better; frozen embedding "
                 f"{fmt(get(ts, 'summary', 'stage1_l9_over_l18_frozen_emb'), '.2f')}"])

  label = "(f) generation, batch 16, 64 new tokens, vs transformers generate"
  if gen is None:
    rows.append(missing(label, "generate", ">= 3.0x"))
  else:
    r = get(gen, "summary", "hf_over_ours")
    cases = [get(gen, "results", c, "other_cores_busy_median") for c in ("ours", "hf")]
    rows.append([label, fmt_s(get(gen, "results", "ours", "median_s")), fmt_s(get(gen, "results", "hf", "median_s")),
                 fmt_x(r), ">= 3.0x", met(at_least(r, 3.0), busy(cases)), fmt_mib(peak_rss(gen)),
                 f"decode only {fmt_x(get(gen, 'summary', 'hf_over_ours_decode'))}, prefill "
                 f"{fmt_x(get(gen, 'summary', 'hf_over_ours_prefill'))}; greedy tokens identical in "
                 f"{txt(get(gen, 'agreement', 'rows_identical'))}/{txt(get(gen, 'agreement', 'rows'))} rows"
                 + (f"; bf16 decode weights {fmt_x(get(gen, 'summary', 'hf_over_ours_bf16'))}, "
                    f"{txt(get(gen, 'agreement', 'bf16_rows_identical_to_float32'))}/"
                    f"{txt(get(gen, 'agreement', 'rows'))} rows equal to float32"
                    if get(gen, "summary", "hf_over_ours_bf16") is not None else "")
                 + contention(cases)])

  for method in ("jacobian", "jvp_vjp", "structured"):
    label = f"(g) eNTK logit_kernel {method} vs naive vmap(jacrev)+einsum"
    if kern is None:
      rows.append(missing(label, "kernels", ">= 10x"))
      continue
    cases = get(kern, "cases") if isinstance(get(kern, "cases"), list) else []
    best, worst, note = kernel_summary(cases, method)
    ratio = NA if best is None else f"{fmt_x(worst)} - {fmt_x(best)}"
    others = [get(c, "others_busy") for c in cases]
    rows.append([label, "per case below", "per case below", ratio, ">= 10x", met(at_least(worst, 10.0), busy(others)),
                 fmt_mib(peak_rss(kern)), f"wall speedup, worst - best; {note}; RSS of the whole sweep"
                 + contention(others)])

  label = "(g) eNTK structured vs torch.func vmap(jacrev) of the transformers model"
  if kern is not None:
    cases = get(kern, "cases") if isinstance(get(kern, "cases"), list) else []
    pts = [(num(get(c, "torch_over", "structured")), f"{get(c, 'size')} N={get(c, 'n')} |S|={get(c, 's')}")
           for c in cases if num(get(c, "torch_over", "structured")) is not None]
    if pts:
      worst, best = min(pts), max(pts)
      rows.append([label, "per case below", "per case below", f"{fmt_x(worst[0])} - {fmt_x(best[0])}", ">= 3x",
                   met(at_least(worst[0], 3.0)), fmt_mib(peak_rss(kern)),
                   f"wall, worst at {worst[1]}, best at {best[1]}"
                   + contention([get(c, "others_busy") for c in cases])])

  rows.append(nt_row(benches))

  label = "(h) real gemma-3-270m eNTK"
  if k270 is None:
    rows.append(missing(label, "kernels_270m", "none (no peer)"))
  else:
    n, k, params = (get(k270, "config", x) for x in ("n", "k", "params"))
    label = (f"(h) real gemma-3-270m eNTK, {txt(n)} x {txt(k)}, "
             f"all params ({fmt(num(params) / 1e6 if num(params) else None, '.1f', 'M')})")
    check = get(k270, "method_check", "max_abs_diff_over_max")
    contended = ("; contended: other processes held ~" + fmt(get(k270, "others_busy"), ".1f")
                 + f" cores, {fmt_s(get(k270, 'cpu_seconds'))} process CPU") if get(k270, "contended") else ""
    rows.append([label, fmt_s(get(k270, "seconds")), "none", NA, "none (no peer)", NA, fmt_mib(peak_rss(k270)),
                 f"method {get(k270, 'config', 'method') or NA}{contended}; asymmetry "
                 f"{fmt(get(k270, 'symmetry_max_abs_diff_over_max'), '.1e')}, min/max eigenvalue "
                 f"{fmt(get(k270, 'min_eigenvalue_over_max'), '.1e')}, {get(k270, 'config', 'method') or 'jvp_vjp'} vs "
                 f"{get(k270, 'method_check', 'against') or 'jacobian'} {fmt(check, '.1e')}"])

  label = "(i) peak host RSS loading gemma-3-270m, scan_layers vs per-layer"
  if mem is None:
    rows.append(missing(label, "load_memory", "<= 1.10x; scan load <= 1.2x params"))
  else:
    ratio, over = get(mem, "scan_over_layers_peak"), get(mem, "scan_load_over_params")
    ok = None if num(ratio) is None or num(over) is None else (num(ratio) <= 1.10 and num(over) <= 1.2)
    rows.append([label, fmt_mib(get(mem, "rows", 1, "peak_mib")) + " (scan)",
                 fmt_mib(get(mem, "rows", 0, "peak_mib")) + " (per-layer)", fmt_x(ratio),
                 "<= 1.10x; scan load <= 1.2x params", met(ok), fmt_mib(get(mem, "rows", 1, "peak_mib")),
                 f"scan load (peak - baseline) {fmt_x(over)} the params ({fmt_mib(get(mem, 'rows', 1, 'params_mib'))});"
                 " memory, not time: contention does not change it"])

  label = "(j) capability accuracy vs lm-evaluation-harness (HF backend), same questions"
  if cap is None:
    rows.append(missing(label, "capability_parity", "equal accuracy"))
  else:
    tasks = get(cap, "tasks") if isinstance(get(cap, "tasks"), dict) else {}
    same = [get(t, "ours") == get(t, "harness") for t in tasks.values()]
    worst = max((num(get(t, "loglik_max_abs_diff")) or 0.0 for t in tasks.values()), default=None)
    rows.append([label, ", ".join(f"{k} {fmt(get(t, 'ours', 'acc'), '.2f')}" for k, t in tasks.items()),
                 ", ".join(f"{k} {fmt(get(t, 'harness', 'acc'), '.2f')}" for k, t in tasks.items()), NA,
                 "equal accuracy", met(all(same) if same else None), NA,
                 f"acc and acc_norm per task; max |d loglik| {fmt(worst, '.1e')}; n={txt(get(cap, 'n'))} per task"])
  for label, data, key, ours, theirs, goal in (
      ("(a) smollm2-135m forward, all-position logits, vs transformers", fw2,
       ("ratios", "a_full_logits__torch_full_over_ours_full", "median_of_round_ratios"), "ours_full", "torch_full",
       1.0),
      ("(f) smollm2-135m generation, batch 16, 64 new tokens, vs transformers", gen2, ("summary", "hf_over_ours"),
       "ours", "hf", 3.0)):
    if data is None:
      continue
    r = get(data, *key)
    cases = [get(data, "results", c, "other_cores_busy_median") for c in (ours, theirs)]
    rows.append([label, fmt_s(get(data, "results", ours, "median_s")), fmt_s(get(data, "results", theirs, "median_s")),
                 fmt_x(r), f">= {goal:.1f}x", met(at_least(r, goal), busy(cases)), fmt_mib(peak_rss(data)),
                 "same GGUF on both sides" + contention(cases)])
  return rows


def nt_row(benches: dict[str, dict[str, Any]]) -> list[str]:
  """The "(g) structured vs neural-tangents" row: worst and best of the peer's fastest agreeing implementation's
  time over ours, per case of kernels_nt.json (smoke runs are not judged)."""
  label = "(g) eNTK structured vs neural-tangents empirical_ntk_fn (its best implementation)"
  data = benches["kernels_nt"]["data"]
  if data is None:
    return [label, NA, NA, NA, ">= 1.0x", NA, NA, f"kernels_nt.json {benches['kernels_nt']['error'] or 'not run'}"]
  cases = get(data, "cases") if isinstance(get(data, "cases"), list) else []
  pts = [(num(get(c, "nt_best_over_ours")), f"{get(c, 'size')} N={get(c, 'n')} |S|={get(c, 's')}")
         for c in cases if num(get(c, "nt_best_over_ours")) is not None]
  if not pts:
    return [label, "per case below", "per case below", NA, ">= 1.0x", NA, fmt_mib(peak_rss(data)),
            "no case where a neural-tangents kernel agreed"]
  worst, best = min(pts), max(pts)
  others = [get(c, "others_busy") for c in cases]
  ok = at_least(worst[0], 1.0) if get(data, "summary", "all_agree") else False
  return [label, "per case below", "per case below", f"{fmt_x(worst[0])} - {fmt_x(best[0])}", ">= 1.0x",
          "n/a (smoke)" if get(data, "smoke") else met(ok, busy(others)), fmt_mib(peak_rss(data)),
          f"wall, worst at {worst[1]}, best at {best[1]}; {txt(get(data, 'args', 'dtype'))}, max rel err "
          f"{fmt(get(data, 'summary', 'max_rel_err'), '.1e')}; neural-tangents "
          f"{txt(get(data, 'nt', 'versions', 'neural_tangents'))} on jax "
          f"{txt(get(data, 'nt', 'versions', 'jax'))} in its own process" + contention(others)]


def nt_cases(data: Any) -> list[str]:
  """The per-case table of kernels_nt.json: our structured time, each neural-tangents implementation's, the ratio
  of the best one and the agreement."""
  cases = get(data, "cases")
  if not isinstance(cases, list) or not cases:
    return ["No neural-tangents cases recorded."]
  impls = get(data, "args", "implementations") or []
  rows = []
  for c in cases:
    error = lambda i: str(get(c, "nt", i, "error"))
    nt = [fmt(get(c, "nt", i, "wall_s"), ".3g") if get(c, "nt", i, "error") is None
          else "does not fit" if error(i).startswith("does not fit") else "failed" for i in impls]
    errs = get(c, "max_rel_err") if isinstance(get(c, "max_rel_err"), dict) else {}
    rows.append([txt(get(c, "size")), txt(get(c, "n")), txt(get(c, "s")), fmt(get(c, "ours", "wall_s"), ".3g"), *nt,
                 txt(get(c, "nt_best")), fmt_x(get(c, "nt_best_over_ours")),
                 fmt(max((num(v) or 0.0 for v in errs.values()), default=None), ".1e"),
                 fmt(get(c, "others_busy"), ".2f")])
  header = ["size", "N", "|S|", "wall s structured", *(f"wall s nt {i.lower()}" for i in impls), "nt best",
            "nt best / structured", "max rel err", "others busy"]
  return table(header, rows)


def numerics_lines(benches: dict[str, dict[str, Any]], results: Path) -> list[str]:
  """parity_270m.json (logit gaps, float32 and float64) and every decode_verdicts*.json (bf16 decode weights'
  effect, per evaluated model)."""
  lines = []
  parity = benches["parity_270m"]["data"]
  if parity is not None:
    gaps = get(parity, "max_abs_difference") or {}
    lines += [f"Largest |logit| difference on real gemma-3-270m, {len(get(parity, 'config', 'prompts') or [])} chat "
              f"prompts (largest |logit| {fmt(get(parity, 'largest_abs_logit'), '.1f')}):", "",
              *table(["pair", "max abs diff"], [[k.replace("_", " "), fmt(v, ".2e")] for k, v in gaps.items()]), ""]
  for name in sorted(results.glob("decode_verdicts*.json")):
    try:
      verdicts = json.loads(name.read_text())
    except (OSError, ValueError):
      continue
    suites = get(verdicts, "suites") or {}
    model = get(verdicts, "model_id") or get(verdicts, "config", "model") or NA
    lines += [f"bfloat16 decode weights against float32 on the built-in suites (`{name.name}`, model {model}; same "
              "prompts, greedy):", "",
              *table(["suite", "rows", "identical generations", "identical verdicts", "refusal rate f32", "bf16"],
                     [[k, txt(get(v, "rows")), txt(get(v, "identical_generations")),
                       txt(get(v, "identical_verdicts")), fmt(get(v, "refusal_rate_float32"), ".3f"),
                       fmt(get(v, "refusal_rate_bfloat16"), ".3f")] for k, v in suites.items()]), ""]
  return lines or ["No numerics file recorded."]


def pipeline_lines(results: Path) -> list[str]:
  """One line per pipeline_*.json (a whole `dcr_jax.main` run): command, wall and CPU time, contended or not."""
  lines = []
  for path in sorted(results.glob("pipeline_*.json")):
    try:
      data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
      lines.append(f"- `{path.name}`: unreadable ({type(e).__name__})")
      continue
    state = NOT_JUDGED if get(data, "contended") else "not contended"
    lines.append(f"- `{path.name}`: `{txt(get(data, 'command'))}` ({state}): {txt(get(data, 'note'))}")
  return lines or ["No pipeline run recorded."]


def kernel_cases(kern: Any) -> list[str]:
  """The per-case eNTK table: size, N, |S|, wall seconds and XLA memory per method, speedups over naive."""
  cases = get(kern, "cases")
  if not isinstance(cases, list) or not cases:
    return ["No eNTK cases recorded."]
  methods = ("naive", "jacobian", "jvp_vjp", "structured")
  mib = 1 << 20
  rows = []
  for c in cases:
    if not isinstance(c, dict):
      continue
    fits = get(c, "naive_fits")
    wall = [fmt(get(c, "wall_s", m), ".3g") if (m != "naive" or fits) else "does not fit" for m in methods]
    mem = [fmt(num(get(c, "mem_bytes", m)) / mib if num(get(c, "mem_bytes", m)) is not None else None, ".0f")
           for m in methods]
    speed = [fmt_x(get(c, "speedup_wall", m)) for m in methods[1:]]
    peer = [fmt(get(c, "wall_s", "torch"), ".3g"), fmt_x(get(c, "torch_over", "structured"))]
    rows.append([txt(get(c, "size")), txt(get(c, "n")), txt(get(c, "s")), *wall, *speed, *peer, *mem])
  header = ["size", "N", "|S|", *(f"wall s {m}" for m in methods), *(f"x {m}" for m in methods[1:]),
            "wall s torch.func", "torch.func / structured", *(f"MiB {m}" for m in methods)]
  return [row(header), row(["---"] * len(header)), *(row(r) for r in rows)]


def device_lines(results: Path) -> list[str]:
  """bench/device.py runs (device.json and device_*.json, smoke excluded): a stage-2 MFU row per model and setting,
  then the stage-1, generation and eNTK parts of each run that has them."""
  runs = []
  for path in sorted(results.glob("device*.json")):
    try:
      data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
      runs.append((path.name, {"error": f"unreadable ({type(e).__name__})"}))
      continue
    if isinstance(data, dict) and not data.get("smoke"):
      runs.append((path.name, data))
  if not runs:
    return ["No accelerator run recorded: bench/device.sh is prepared (its --smoke runs in the tests) and awaits one."]
  header = ["file", "device", "model", "remat", "batch x seq", "step", "TFLOP/s", "MFU (goal >= 40% at 1.5B)",
            "of measured matmul"]
  rows, notes = [], []
  for name, d in runs:
    mfu = get(d, "results", "mfu") or {}
    for model, r in mfu.items():
      if not isinstance(r, dict) or model == "part_s":
        continue
      value = num(get(r, "mfu"))
      rows.append([f"`{name}`", txt(get(d, "device_kind")), model, txt(get(r, "remat") or "full"),
                   f"{txt(get(r, 'batch'))} x {txt(get(r, 'seq'))}", fmt_s(get(r, "median_s")),
                   fmt(get(r, "achieved_tflops"), ".0f"), fmt(value * 100 if value is not None else None, ".1f", "%"),
                   fmt(get(r, "fraction_of_measured_matmul"), ".2f")])
    if "error" in mfu:
      rows.append([f"`{name}`", txt(get(d, "device_kind")), "mfu part failed", "", "", "", "", "",
                   txt(mfu["error"])[:80]])
    s1, gen, entk = (get(d, "results", k) or {} for k in ("stage1", "generate", "entk"))
    if "half_over_full" in s1:
      notes.append(f"- `{name}` stage 1 ({txt(s1.get('model'))}, batch {txt(s1.get('batch'))} x {txt(s1.get('seq'))}):"
                   f" step at l = L/2 takes {fmt_x(s1['half_over_full'])} the time of l = L.")
    if "ours_over_transformers" in gen:
      notes.append(f"- `{name}` generation ({txt(gen.get('model'))}-sized, bf16, batch {txt(gen.get('batch'))}, "
                   f"{txt(gen.get('new_tokens'))} new tokens): {fmt(get(gen, 'ours', 'tokens_per_s'), '.0f')} tokens/s "
                   f"against transformers' {fmt(get(gen, 'transformers', 'tokens_per_s'), '.0f')}, "
                   f"{fmt_x(gen['ours_over_transformers'])}.")
    if "second_s" in entk:
      peak = num(entk.get("device_peak_bytes"))
      notes.append(f"- `{name}` eNTK ({txt(entk.get('model'))}-sized, {txt(entk.get('method'))}, "
                   f"{txt(entk.get('prompts'))} prompts x |S| = {txt(entk.get('top_k'))}, all parameters): "
                   f"{fmt_s(entk.get('first_s'))} first call (compilation included), {fmt_s(entk['second_s'])} second; "
                   f"device peak {fmt(peak / 2**30 if peak is not None else None, '.1f', ' GiB')}.")
  return [row(header), row(["---"] * len(header)), *(row(r) for r in rows), "", *notes]


def render(results: Path) -> str:
  """The whole Markdown document for the JSON files under `results`."""
  benches = load(results)
  try:
    shown = results.resolve().relative_to(Path.cwd())
  except ValueError:
    shown = results
  lines = ["# Benchmark results", "",
           f"Rendered by `bench/results.py` from `{shown}/` on {dt.datetime.now():%Y-%m-%d %H:%M}. "
           "CPU, float32, gemma-3-270m weights unless stated; times are medians.", ""]
  lines += header_section(benches)
  lines += ["", "## Ratios against a peer measured in the same run", "",
            "ratio = peer time / our time (> 1: we are faster), except (d), (e) and (i) as noted. "
            "Peak RSS is the bench process's maximum. A timing taken while other processes held >= "
            f"{BUSY} cores is reported but its goal is not judged (\"{NOT_JUDGED}\").", ""]
  lines += table(["benchmark", "ours", "peer", "ratio", "goal", "met?", "our peak RSS", "notes"],
                 ratio_rows(benches))
  lines += ["", "### eNTK cases (random-init tiny Gemma 3, all params; memory is XLA's compiled estimate)", ""]
  kern = benches["kernels"]
  if kern["data"] is None:
    lines.append(f"kernels.json {kern['error'] or 'not run'}.")
  else:
    lines += kernel_cases(kern["data"])
  nt = benches["kernels_nt"]["data"]
  if nt is not None:
    lines += ["", f"### eNTK against neural-tangents (same tiny Gemma 3 re-implemented in jax.numpy, all params, "
              f"{txt(get(nt, 'args', 'dtype'))})", "", *nt_cases(nt)]
  lines += ["", "## Numerics", "", *numerics_lines(benches, results)]
  lines += ["", "## Whole pipeline runs", "", *pipeline_lines(results)]
  lines += ["", "## Accelerator", "", *device_lines(results), ""]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
  """Parse arguments, render the results and write the Markdown file; returns its text."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--results", default=str(HERE / "results"), help="directory holding the bench JSON files")
  p.add_argument("--out", default=str(HERE / "results.md"), help="Markdown file to write")
  args = p.parse_args(argv)
  text = render(Path(args.results))
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)
  print(f"wrote {out}")
  return text


if __name__ == "__main__":
  main()
