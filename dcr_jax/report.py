"""Reports from workdirs: DIR/report.md for one run, and a Table-1-style comparison of several runs.

    python -m dcr_jax.report DIR1 DIR2 ... [--out FILE.md] [--png FILE.png]

writes one Markdown table with a row per run (the run name is report.json's ``run_name``, else the directory's
name): compliance rate on each over-refusal suite (higher is better), then Safety = the mean defense (refusal) rate
over the run's harmful suites, as in the paper's Table 1. Suites a run did not evaluate show "—". The Markdown goes
to --out (default stdout); a bar chart of mean over-refusal compliance vs Safety per run goes to --png (default
``report.png`` beside --out, else in the current directory). Rates are printed with 2 decimals.

Input is DIR/report.json as written by the pipeline (``dcr_jax.pipeline.update_report``): ``model``
{name, weights, params}, ``stages`` {stage: {steps, final_loss, seconds, ...}}, ``eval`` {suite: {kind, n,
refusal_rate, compliance_rate, mean_refusal_prob, by_category?}} and optionally ``kernels``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from dcr_jax.errors import UserError
from dcr_jax.evaluate.capability import HEADLINE as CAPABILITY_HEADLINE, TASKS as CAPABILITY_TASKS
from dcr_jax.evaluate.suites import SUITES, safety_score
from dcr_jax.workdir_io import as_path, is_remote

DASH = "—"


def load_report(workdir: str | os.PathLike) -> dict[str, Any]:
  """DIR/report.json (DIR local or gs://…); a missing or unreadable file is a UserError naming it."""
  path = as_path(workdir) / "report.json"
  if not path.is_file():
    raise UserError(f"{workdir}: no report.json; run `python -m dcr_jax.main --workdir={workdir}` first "
                    "or pass a run directory")
  try:
    report = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{path}: not a readable JSON report ({e}); re-run the pipeline to rewrite it") from None
  if not isinstance(report, dict):
    raise UserError(f"{path}: expected a JSON object, found {type(report).__name__}")
  return report


def run_name(workdir: str | os.PathLike, report: Mapping[str, Any]) -> str:
  """report.json's ``run_name``, else the workdir's base name."""
  path = as_path(workdir)
  return str(report.get("run_name") or (path if is_remote(path) else path.resolve()).name)


def _fmt(value, digits: int = 2) -> str:
  return DASH if value is None else f"{value:.{digits}f}"


def _prob(value) -> str:
  """A probability: 2 decimals, or 2 significant digits below 0.01 (base models give 1e-4-sized refusal mass)."""
  return _fmt(value) if value is None or value == 0 or value >= 0.01 else f"{value:.1e}"


def _cell(text) -> str:
  return str(text).replace("|", "\\|")


def _kind(name: str, metrics: Mapping[str, Any]) -> str | None:
  return metrics.get("kind") or (SUITES[name].kind if name in SUITES else None)


def _suites(evals: Sequence[Mapping[str, Mapping[str, Any]]], kind: str) -> list[str]:
  """Suite names of `kind` over all runs: registry order first, then unknown names sorted."""
  names = {n for e in evals for n, m in e.items() if _kind(n, m) == kind}
  order = {n: i for i, n in enumerate(SUITES)}
  return sorted(names, key=lambda n: (order.get(n, len(order)), n))


def _safety(source: str, evals: Mapping[str, Mapping[str, Any]]) -> float | None:
  try:
    return safety_score(evals)
  except (ValueError, KeyError) as e:
    raise UserError(f"{source}: eval section: {e}") from None


def _rate(evals: Mapping[str, Mapping[str, Any]], suite: str, key: str) -> float | None:
  return evals.get(suite, {}).get(key)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  return (["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(map(_cell, row)) + " |" for row in rows])


def table1(runs: Sequence[tuple[str, Mapping[str, Mapping[str, Any]]]], *, per_harmful: bool = False,
           capability: Sequence[Mapping[str, Mapping[str, Any]]] | None = None) -> list[str]:
  """Table-1 lines for (run name, eval section) pairs: over-refusal compliance columns, Safety, with `per_harmful`
  each harmful suite's defense rate, and with `capability` (each run's report section) each general-capability
  task's headline accuracy (acc_norm where the harness reports it, else acc)."""
  evals = [e for _, e in runs]
  over = _suites(evals, "over_refusal")
  harmful = _suites(evals, "harmful") if per_harmful else []
  capability = list(capability or [{}] * len(runs))
  tasks = [t for t in CAPABILITY_TASKS if any(t in c for c in capability)]
  header = ["run", *over, "Safety", *harmful, *(f"{t} {CAPABILITY_HEADLINE[t]}" for t in tasks)]
  rows = [[name, *(_fmt(_rate(e, s, "compliance_rate")) for s in over), _fmt(_safety(name, e)),
           *(_fmt(_rate(e, s, "refusal_rate")) for s in harmful),
           *(_fmt((c.get(t) or {}).get(CAPABILITY_HEADLINE[t])) for t in tasks)]
          for (name, e), c in zip(runs, capability)]
  return _table(header, rows)


def mean_over_refusal_compliance(evals: Mapping[str, Mapping[str, Any]]) -> float | None:
  """Unweighted mean compliance rate over the over-refusal suites evaluated; None if none."""
  rates = [m["compliance_rate"] for n, m in evals.items() if _kind(n, m) == "over_refusal"]
  return sum(rates) / len(rates) if rates else None


def _model_line(model: Mapping[str, Any] | None) -> str:
  if not model:
    return "Model: (not recorded)"
  params = model.get("params")
  params = DASH if params is None else f"{params:,} parameters" if isinstance(params, int) else f"{params} parameters"
  return f"Model: `{model.get('name', DASH)}`, weights: {model.get('weights') or 'random init'}, {params}"


def report_markdown(workdir: str | os.PathLike, report: Mapping[str, Any]) -> str:
  """The Markdown of one run's report (see ``write_report_md``)."""
  name = run_name(workdir, report)
  lines = [f"# DCR run `{name}`", "", _model_line(report.get("model")), ""]
  stages = report.get("stages") or {}
  if stages:
    lines += ["## Training stages", ""]
    lines += _table(["stage", "steps", "final loss", "seconds"],
                    [[s, str(m.get("steps", DASH)), _fmt(m.get("final_loss"), 4), _fmt(m.get("seconds"), 1)]
                     for s, m in stages.items()])
    lines.append("")
  evals = report.get("eval") or {}
  if evals:
    lines += ["## Evaluation", "",
              "Over-refusal suites: compliance rate (higher is better). Safety: mean defense (refusal) rate over the "
              "harmful suites, then each harmful suite's defense rate (higher is better).", ""]
    lines += table1([(name, evals)], per_harmful=True, capability=[report.get("capability") or {}])
    lines += ["", "### Per suite", ""]
    lines += _table(["suite", "kind", "n", "refusal rate", "compliance rate", "mean refusal prob"],
                    [[s, _kind(s, m) or DASH, str(m.get("n", DASH)), _fmt(m.get("refusal_rate")),
                      _fmt(m.get("compliance_rate")), _prob(m.get("mean_refusal_prob"))] for s, m in evals.items()])
    categorised = {s: m["by_category"] for s, m in evals.items() if m.get("by_category")}
    if categorised:
      lines += ["", "### By category", ""]
      lines += _table(["suite", "category", "n", "refusal rate", "compliance rate", "mean refusal prob"],
                      [[s, c, str(m.get("n", DASH)), _fmt(m.get("refusal_rate")), _fmt(m.get("compliance_rate")),
                        _prob(m.get("mean_refusal_prob"))] for s, cats in categorised.items() for c, m in cats.items()])
    lines.append("")
  for method, base in (report.get("baseline") or {}).items():
    lines += [f"## Beside the {method.upper()} baseline", "",
              "The same stage 2 (data, settings, steps) trained from the base weights, without stage 1, and evaluated "
              f"on the same suites (`{base.get('workdir', DASH)}`).", ""]
    lines += table1([(name, evals), (f"{method.upper()} baseline", base.get("eval") or {})], per_harmful=True,
                    capability=[report.get("capability") or {}, base.get("capability") or {}])
    lines.append("")
  capability = report.get("capability") or {}
  if capability:
    lines += ["## General capability", "", "lm-evaluation-harness conventions (log-likelihood of each choice; acc_norm "
              "divides by the choice's length in characters).", ""]
    lines += _table(["task", "n", "acc", "acc_norm"], [[t, str(m.get("n", DASH)), _fmt(m.get("acc"), 3),
                                                        _fmt(m.get("acc_norm"), 3)] for t, m in capability.items()])
    lines.append("")
  steer = report.get("steer")
  if steer:
    lines += [f"## Steering: {steer.get('method', DASH)}", "",
              "Chosen on a validation split of the run's own training data (`steer/steer.json`).", ""]
    lines += _table(["chosen", "value"], [[k, _fmt(v, 4) if isinstance(v, float) else _cell(json.dumps(v))]
                                          for k, v in (steer.get("chosen") or {}).items()])
    for name, rows in (steer.get("table") or {}).items():
      if rows:
        lines += ["", f"### Selection: {name}", ""]
        lines += _table(list(rows[0]), [[_fmt(v, 4) if isinstance(v, float) else str(v) for v in row.values()]
                                        for row in rows])
    lines.append("")
  kernels = report.get("kernels")
  if kernels:
    lines += ["## Kernels", "", "Kernel-similarity JSON and plots are in `kernels/`."]
    scalars = {k: v for k, v in kernels.items() if isinstance(v, (int, float, str))} if isinstance(kernels, dict) else {}
    if scalars:
      lines += [""] + _table(["key", "value"], [[k, _fmt(v, 4) if isinstance(v, float) else str(v)]
                                                for k, v in scalars.items()])
    lines.append("")
  return "\n".join(lines)


def write_report_md(workdir: str | os.PathLike) -> epath.Path:
  """Writes DIR/report.md (DIR local or gs://…) from DIR/report.json (model line, stage table, Table-1-style
  evaluation, per-suite and per-category tables, kernels) and returns its path."""
  path = as_path(workdir) / "report.md"
  path.write_text(report_markdown(workdir, load_report(workdir)), encoding="utf-8")
  return path


def _runs(workdirs: Sequence[str | os.PathLike]) -> list[tuple[str, dict]]:
  if not workdirs:
    raise UserError("no run directories given; pass one or more workdirs that hold report.json")
  runs = []
  for w in workdirs:
    report = load_report(w)
    runs.append((run_name(w, report), report.get("eval") or {}))
  return runs


def merge(workdirs: Sequence[str | os.PathLike]) -> str:
  """One Table-1-style Markdown table, a row per workdir: over-refusal compliance columns, Safety, then the
  general-capability tasks any run evaluated."""
  capability = [load_report(w).get("capability") or {} for w in workdirs]
  return "\n".join(table1(_runs(workdirs), capability=capability)) + "\n"


def plot(workdirs: Sequence[str | os.PathLike], path: str | os.PathLike) -> Path:
  """A PNG bar chart of mean over-refusal compliance and Safety per run (missing values are left out)."""
  return _plot(_runs(workdirs), path)


def _plot(runs: Sequence[tuple[str, Mapping[str, Mapping[str, Any]]]], path: str | os.PathLike) -> Path:
  import matplotlib  # lazy: a plotting backend only for `--plot`, not for the pipeline's report.md

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  nan = float("nan")
  compliance = [mean_over_refusal_compliance(e) for _, e in runs]
  safety = [_safety(n, e) for n, e in runs]
  x = np.arange(len(runs))
  fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(runs) + 2), 3.5))
  ax.bar(x - 0.2, [nan if v is None else v for v in compliance], 0.4, label="over-refusal compliance (mean)")
  ax.bar(x + 0.2, [nan if v is None else v for v in safety], 0.4, label="Safety (mean defense rate)")
  ax.set_xticks(x, [n for n, _ in runs], rotation=20, ha="right")
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("rate (higher is better)")
  ax.legend(loc="lower right", fontsize="small")
  fig.tight_layout()
  path = Path(path)
  fig.savefig(path, format="png", dpi=100)
  plt.close(fig)
  return path


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m dcr_jax.report", description=__doc__.split("\n\n")[0])
  parser.add_argument("workdirs", nargs="+", help="run directories, each holding report.json")
  parser.add_argument("--out", help="Markdown file to write (default: stdout)")
  parser.add_argument("--png", help="bar chart to write (default: report.png beside --out, else in the cwd)")
  args = parser.parse_args(argv)
  png = Path(args.png) if args.png else (Path(args.out).parent if args.out else Path.cwd()) / "report.png"
  try:
    runs = _runs(args.workdirs)
    markdown = "\n".join(table1(runs)) + "\n"
    try:
      if args.out:
        Path(args.out).write_text(markdown, encoding="utf-8")
      _plot(runs, png)
    except OSError as e:
      raise UserError(f"cannot write the report: {e}") from None
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not args.out:
    sys.stdout.write(markdown)
  return 0


if __name__ == "__main__":
  sys.exit(main())
