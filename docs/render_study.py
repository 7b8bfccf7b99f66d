"""Renders the tables of docs/reproduction.md and its frontier plot from the study's committed result files
(docs/results/study/<model>/, written by docs/reproduce.sh); nothing is typed by hand. Each table sits between
`<!-- study:NAME -->` and `<!-- /study:NAME -->` in the doc and is replaced there; tests/test_render_study.py renders
them again and compares.

    .venv/bin/python docs/render_study.py [--results docs/results/study] [--doc docs/reproduction.md] [--check]

Intervals are 95% bootstrap percentiles over prompts and seeds: each resample draws the seeds with replacement and,
within every suite, the prompts with replacement (the same prompts for every seed: every seed evaluates the same
rows). A method's score is the unweighted mean over its suites of each suite's rate, as the paper reports them.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MODELS = ("gemma3-270m", "smollm2-135m")
BOOTSTRAP = 2000
SEED = 0
SAFETY_BAND = 0.03  # the target: at STL's Safety (± this), DCR's compliance >= STL's + TARGET_GAIN
TARGET_GAIN = 0.10
KINDS = {"over_refusal": "compliance", "harmful": "Safety"}
STEER_METHODS = ("refusal_direction", "surgical", "scans", "self_cd")
CAPABILITY = ("mmlu", "arc_easy", "arc_challenge", "openbookqa", "piqa")


# ---------------------------------------------------------------------------------------------------------------------
# Reading the result files.


def _report(directory: Path) -> dict | None:
  path = directory / "report.json"
  return json.loads(path.read_text()) if path.is_file() else None


def outcomes(directory: Path) -> dict[str, tuple[str, dict[str, float]]]:
  """suite -> (kind, prompt -> outcome): 1 = complied on an over-refusal suite, 1 = refused on a harmful one."""
  report = _report(directory) or {}
  out = {}
  for suite, summary in report.get("eval", {}).items():
    rows = [json.loads(line) for line in (directory / f"{suite}.jsonl").read_text().splitlines() if line.strip()]
    flip = summary["kind"] == "over_refusal"
    out[suite] = (summary["kind"], {r["prompt"]: float(r["refused"] != flip) for r in rows})
  return out


def stacked(directories: Sequence[Path]) -> dict[str, tuple[str, np.ndarray]]:
  """suite -> (kind, [seeds, prompts] outcomes) over the runs of one method, prompts aligned by text; only suites and
  prompts every run evaluated. Read once per render (the tables and the plot share it)."""
  return _stacked(tuple(directories))


@functools.lru_cache(maxsize=None)
def _stacked(directories: tuple[Path, ...]) -> dict[str, tuple[str, np.ndarray]]:
  runs = [outcomes(d) for d in directories]
  if not runs or not all(runs):
    return {}
  out = {}
  for suite, (kind, first) in runs[0].items():
    if not all(suite in r for r in runs):
      continue
    prompts = sorted(set(first).intersection(*(r[suite][1].keys() for r in runs[1:])))
    out[suite] = (kind, np.array([[r[suite][1][p] for p in prompts] for r in runs]))
  return out


def score(rows: dict[str, tuple[str, np.ndarray]], kind: str) -> float | None:
  """Mean over seeds of the unweighted mean over `kind`'s suites of each suite's rate."""
  means = [table.mean() for k, table in rows.values() if k == kind and table.size]
  return float(np.mean(means)) if means else None


def interval(rows: dict[str, tuple[str, np.ndarray]], kind: str) -> tuple[float, float, float] | None:
  """(estimate, 2.5th, 97.5th percentile) of `score` over BOOTSTRAP resamples of seeds and prompts (seeded)."""
  tables = [table for k, table in rows.values() if k == kind and table.size]
  if not tables:
    return None
  rng = np.random.default_rng(SEED)
  seeds = tables[0].shape[0]
  draws = np.empty(BOOTSTRAP)
  for b in range(BOOTSTRAP):
    pick = rng.integers(0, seeds, seeds)
    draws[b] = np.mean([t[pick][:, rng.integers(0, t.shape[1], t.shape[1])].mean() for t in tables])
  return score(rows, kind), float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


@functools.lru_cache(maxsize=None)
def estimate(directories: tuple[Path, ...], kind: str) -> tuple[float, float, float] | None:
  """`interval` of the runs in `directories`, computed once per render."""
  return interval(stacked(directories), kind)


def sweep(results: Path, name: str) -> dict | None:
  path = results / name / "sweep.json"
  return json.loads(path.read_text()) if path.is_file() else None


def point_dir(results: Path, sweep_name: str, point: dict) -> Path:
  return results / sweep_name / point["name"]


def chosen(results: Path, method: str) -> tuple[dict, list[Path]] | None:
  """A trained method's validation-chosen point (the best-ranked of its sweep) and the result directories of every
  seed run at it (the sweep's seed 0, then its seeds sweep); None before its sweep has finished."""
  ranked = sweep(results, f"{method}-sweep")
  if not ranked or any(p["status"] != "done" for p in ranked["points"]):
    return None
  best = ranked["points"][0]
  directories = [point_dir(results, f"{method}-sweep", best)]
  seeds = sweep(results, f"{method}-seeds")
  if seeds:
    directories += [point_dir(results, f"{method}-seeds", p) for p in seeds["points"] if p["status"] == "done"
                    and p["overrides"] == best["overrides"]]
  return best, [d for d in directories if (d / "report.json").is_file()]


# ---------------------------------------------------------------------------------------------------------------------
# Formatting.


def num(value: float | None, digits: int = 2) -> str:
  return "–" if value is None else f"{value:.{digits}f}"


def cell(estimate: tuple[float, float, float] | None) -> str:
  return "–" if estimate is None else f"{estimate[0]:.2f} [{estimate[1]:.2f}, {estimate[2]:.2f}]"


def setting(overrides: dict) -> str:
  names = {"align.safety_weight": "w", "refine.steps": "stage-1 steps"}
  return ", ".join(f"{names.get(k, k)} {v}" for k, v in sorted(overrides.items()))


def table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


# ---------------------------------------------------------------------------------------------------------------------
# The tables.


def sweep_table(results: Path) -> str:
  """Every swept point (seed 0): its validation scores, stage 1's geometry, and the evaluation it was not chosen by."""
  rows, agreement = [], []
  for method in ("stl", "dcr"):
    ranked = sweep(results, f"{method}-sweep")
    if not ranked:
      rows.append([method.upper(), "not run yet"] + [""] * 7)
      continue
    complete = all(p["status"] == "done" for p in ranked["points"])
    for rank, point in enumerate(ranked["points"]):
      validation = point.get("validation") or {}
      cosine = (point.get("refine_cosine") or {}).get("after") or {}
      runs = (point_dir(results, f"{method}-sweep", point),)
      mark = (" **(chosen)**" if complete else " (best so far; sweep unfinished)") if rank == 0 else ""
      rows.append([method.upper(), setting(point["overrides"]) + mark + ("" if point["status"] == "done" else
                                                                         f" ({point['status']})"),
                   num(validation.get("val_refusal_prob_toxic"), 4),
                   num(validation.get("val_refusal_prob_seemingly_toxic"), 4), num(point.get("objective"), 4),
                   f"{num(cosine.get('within'))} / {num(cosine.get('across'))}" if cosine else "–",
                   cell(estimate(runs, "over_refusal")), cell(estimate(runs, "harmful")),
                   f"{point['stages']['align']['seconds']:.0f}" if point.get("stages", {}).get("align") else "–"])
    rho = (ranked.get("validation_vs_evaluation") or {})
    agreement.append(f"{method.upper()}: Spearman ρ = {num(rho.get('spearman_rho'))} over {rho.get('points', 0)} "
                     f"points")
  header = ["method", "setting (seed 0)", "val p(refuse) toxic", "val p(refuse) seemingly toxic", "margin (ranked by)",
            "cosine at ℓ after stage 1: within / across", "compliance [95%]", "Safety [95%]", "stage-2 s"]
  if not agreement:
    return table(header, rows)
  return table(header, rows) + "\n\nValidation margin against the same quantity on the evaluation suites (Safety + " \
                               "compliance − 1), rank agreement across each sweep: " + "; ".join(agreement) + "."


def method_rows(results: Path) -> list[tuple[str, str, list[Path]]]:
  """(label, setting, result directories) of every method with results: the chosen STL and DCR over their seeds,
  STL-aug, and each steering baseline."""
  found = []
  for method in ("stl", "dcr"):
    picked = chosen(results, method)
    if picked:
      found.append((method.upper(), setting(picked[0]["overrides"]), picked[1]))
  if (results / "stl-aug" / "report.json").is_file():
    found.append(("STL-aug", "STL's w, CoCoNot pairs at weight 0.1", [results / "stl-aug"]))
  for name in STEER_METHODS:
    directory = results / "steer" / name
    report = _report(directory)
    if report:
      keep = {k: v for k, v in report.get("steer", {}).get("chosen", {}).items() if not isinstance(v, (list, dict))}
      found.append((f"STL + {name}", ", ".join(f"{k} {round(v, 3) if isinstance(v, float) else v}"
                                               for k, v in keep.items()), [directory]))
  return found


def results_table(results: Path) -> str:
  """Each method's mean compliance and Safety with intervals, each suite's rate, and capability (seed 0)."""
  methods = method_rows(results)
  if not methods:
    return "Not run yet."
  suites = list(dict.fromkeys(s for _, _, dirs in methods for s in stacked(dirs)))
  header = ["method", "setting", "seeds", "compliance [95%]", "Safety [95%]"] + suites + list(CAPABILITY)
  rows = []
  for label, chosen_setting, directories in methods:
    evaluated = stacked(directories)
    capability = (_report(directories[0]) or {}).get("eval_summary", {}).get("capability", {})
    rows.append([label, chosen_setting, str(len(directories)), cell(estimate(tuple(directories), "over_refusal")),
                 cell(estimate(tuple(directories), "harmful"))]
                + [num(evaluated[s][1].mean()) if s in evaluated else "–" for s in suites]
                + [num(capability.get(t)) for t in CAPABILITY])
  return table(header, rows)


def target(results: Path) -> str:
  """The issue's target, checked on the chosen settings: at STL's Safety (± SAFETY_BAND), DCR's compliance ≥ STL's +
  TARGET_GAIN."""
  stl, dcr = chosen(results, "stl"), chosen(results, "dcr")
  if not stl or not dcr:
    return "Not run yet: the target needs the chosen STL and DCR settings."
  a, b = stacked(stl[1]), stacked(dcr[1])
  gap = score(b, "harmful") - score(a, "harmful")
  gain = score(b, "over_refusal") - score(a, "over_refusal")
  met = abs(gap) <= SAFETY_BAND and gain >= TARGET_GAIN
  return (f"Chosen on validation: STL {setting(stl[0]['overrides'])} ({len(stl[1])} seeds), DCR "
          f"{setting(dcr[0]['overrides'])} ({len(dcr[1])} seeds). DCR − STL: Safety {gap:+.3f} (target within "
          f"±{SAFETY_BAND}), compliance {gain:+.3f} (target ≥ +{TARGET_GAIN:.2f}). Target "
          f"**{'met' if met else 'not met'}**.")


def wall_times(results: Path) -> str:
  """Each command of docs/reproduce.sh with its wall time from commands.log: finished ones, stopped ones, the total."""
  log = results / "commands.log"
  if not log.is_file():
    return "Not run yet."
  rows, command, started, total = [], None, 0, 0
  for line in log.read_text().splitlines():
    stamped = re.match(r"\[(\d+):(\d+):(\d+)\] (.*)$", line)
    if not stamped:
      continue
    hours, minutes, seconds, text = stamped.groups()
    now = 3600 * int(hours) + 60 * int(minutes) + int(seconds)
    done = re.fullmatch(r"finished in (\d+) s", text)
    if done and command:
      rows.append([f"`{command}`", done.group(1)])
      total, command = total + int(done.group(1)), None
    elif text.startswith("(stopped") and command:
      elapsed = (now - started) % 86400  # the log's stamps are times of day
      rows.append([f"`{command}`", f"{elapsed} (stopped, resumed below)"])
      total, command = total + elapsed, None
    elif not text.startswith("("):
      command, started = re.sub(r"^(\S*python )?", "", text).replace("|", "\\|"), now
  if not rows:
    return "Not run yet."
  return table(["command (after `python`)", "wall s"], rows + [["**total**", f"**{total}** ({total / 3600:.1f} h)"]])


def frontier_plot(results: dict[str, Path], out: Path) -> None:
  """Compliance against Safety of every swept point (seed 0) with 95% intervals, each method's Pareto front joined,
  the chosen settings over their seeds ringed, STL-aug and steering as single points; one panel per model."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 5.5), squeeze=False)
  colours = {"stl": "tab:blue", "dcr": "tab:red"}
  for ax, (model, model_results) in zip(axes[0], results.items()):
    for method, colour in colours.items():
      ranked = sweep(model_results, f"{method}-sweep")
      if not ranked:
        continue
      points = []
      for point in ranked["points"]:
        runs = (point_dir(model_results, f"{method}-sweep", point),)
        x, y = estimate(runs, "harmful"), estimate(runs, "over_refusal")
        if x and y:
          ax.errorbar(x[0], y[0], xerr=[[x[0] - x[1]], [x[2] - x[0]]], yerr=[[y[0] - y[1]], [y[2] - y[0]]],
                      fmt="o", color=colour, alpha=0.6, capsize=2)
          ax.annotate(setting(point["overrides"]).replace("stage-1 steps", "s"), (x[0], y[0]), fontsize=7,
                      xytext=(3, 3), textcoords="offset points")
          points.append((x[0], y[0]))
      front = sorted(p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points))
      if front:
        ax.plot(*zip(*front), "-", color=colour, label=f"{method.upper()} (swept, seed 0; Pareto front)")
      picked = chosen(model_results, method)
      if picked:
        evaluated = stacked(picked[1])
        ax.plot(score(evaluated, "harmful"), score(evaluated, "over_refusal"), "o", ms=14, mfc="none", color=colour,
                label=f"{method.upper()} chosen on validation ({len(picked[1])} seeds)")
    for label, _, directories in method_rows(model_results):
      if label in ("STL", "DCR"):
        continue
      evaluated = stacked(directories)
      ax.plot(score(evaluated, "harmful"), score(evaluated, "over_refusal"), "s" if label == "STL-aug" else "^",
              label=label)
    ax.set(title=model, xlabel="Safety (mean refusal rate, harmful suites)",
           ylabel="over-refusal compliance (mean, over-refusal suites)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7, loc="lower left")
    else:
      ax.text(0.5, 0.5, "not run yet", ha="center", va="center", transform=ax.transAxes)
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# The doc.


def blocks(results: Path) -> dict[str, str]:
  """Every rendered block of the doc, by marker name."""
  out = {}
  for model in MODELS:
    model_results = results / model
    out[f"{model}:sweep"] = sweep_table(model_results)
    out[f"{model}:results"] = results_table(model_results)
    out[f"{model}:target"] = target(model_results)
    out[f"{model}:times"] = wall_times(model_results)
  return out


def fill(doc: str, rendered: dict[str, str]) -> str:
  """`doc` with every `<!-- study:NAME -->…<!-- /study:NAME -->` block replaced by its rendering."""
  for name, text in rendered.items():
    pattern = re.compile(rf"(<!-- study:{re.escape(name)} -->\n)(?:.*?\n)?(<!-- /study:{re.escape(name)} -->)", re.S)
    if not pattern.search(doc):
      raise SystemExit(f"error: the doc has no <!-- study:{name} --> block; add one")
    doc = pattern.sub(lambda m: m.group(1) + text + "\n" + m.group(2), doc)
  return doc


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--results", type=Path, default=HERE / "results" / "study")
  p.add_argument("--doc", type=Path, default=HERE / "reproduction.md")
  p.add_argument("--plot", type=Path, default=HERE / "figures" / "study_frontier.png")
  p.add_argument("--check", action="store_true", help="exit 1 if the doc differs from its rendering")
  args = p.parse_args(argv)
  doc = args.doc.read_text()
  rendered = fill(doc, blocks(args.results))
  if args.check:
    sys.exit(0 if rendered == doc else 1)
  args.doc.write_text(rendered)
  frontier_plot({m: args.results / m for m in MODELS}, args.plot)
  print(f"wrote {args.doc} and {args.plot}")


if __name__ == "__main__":
  main()
