"""Renders docs/results/comparison.md from the result files committed under docs/results/ (nothing is typed by hand):
the default gemma run's DCR and STL rows and every steering baseline applied to that STL model, on the same held-out
suites, with 95% bootstrap intervals over prompts. tests/test_render_results.py re-renders it and compares.

    .venv/bin/python docs/render_results.py [--results docs/results] [--out docs/results/comparison.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BOOTSTRAP = 2000
SEED = 0


def runs(results: Path) -> list[tuple[str, Path]]:
  """(label, directory) of every run the table shows, in order; only those whose report.json exists."""
  found = [("DCR (default run)", results / "default-gemma"), ("STL (its baseline)", results / "default-gemma" /
                                                                "baseline-stl")]
  found += [(f"STL + {d.name}", d) for d in sorted((results / "steer-on-stl").glob("*")) if d.is_dir()]
  return [(label, d) for label, d in found if (d / "report.json").is_file()]


def suite_rows(directory: Path, report: dict) -> dict[str, tuple[str, np.ndarray]]:
  """suite -> (kind, per-prompt outcome: 1 = complied for over-refusal suites, 1 = refused for harmful ones)."""
  out = {}
  for suite, summary in report.get("eval", {}).items():
    path = directory / f"{suite}.jsonl"
    if not path.is_file():
      continue
    refused = np.array([json.loads(line)["refused"] for line in path.read_text().splitlines() if line.strip()], float)
    out[suite] = (summary["kind"], 1.0 - refused if summary["kind"] == "over_refusal" else refused)
  return out


def score(rows: dict[str, tuple[str, np.ndarray]], kind: str, rng: np.random.Generator | None = None) -> float | None:
  """Mean over the suites of `kind` of each suite's mean outcome; with `rng`, of a bootstrap resample of each."""
  means = []
  for k, outcome in rows.values():
    if k != kind or not len(outcome):
      continue
    sample = outcome if rng is None else outcome[rng.integers(0, len(outcome), len(outcome))]
    means.append(sample.mean())
  return float(np.mean(means)) if means else None


def interval(rows: dict, kind: str) -> tuple[float | None, float | None, float | None]:
  """(estimate, 2.5th, 97.5th percentile of BOOTSTRAP resamples over prompts, seeded)."""
  point = score(rows, kind)
  if point is None:
    return None, None, None
  rng = np.random.default_rng(SEED)
  draws = np.array([score(rows, kind, rng) for _ in range(BOOTSTRAP)])
  return point, float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def cell(estimate: tuple[float | None, float | None, float | None]) -> str:
  point, lo, hi = estimate
  return "n/a" if point is None else f"{point:.2f} [{lo:.2f}, {hi:.2f}]"


def chosen(report: dict) -> str:
  """The steering method's chosen settings, or '' for a trained run."""
  steer = report.get("steer")
  if not steer:
    return ""
  keep = {k: v for k, v in steer.get("chosen", {}).items() if not isinstance(v, (list, dict))}
  return ", ".join(f"{k}={round(v, 3) if isinstance(v, float) else v}" for k, v in keep.items())


def render(results: Path) -> str:
  """The Markdown of docs/results/comparison.md."""
  reports = [(label, directory, json.loads((directory / "report.json").read_text())) for label, directory in
             runs(results)]
  tasks = sorted({t for _, _, r in reports for t in r.get("eval_summary", {}).get("capability", {})})
  lines = ["# DCR, STL and the steering baselines on gemma-3-270m", "",
           f"Rendered by `docs/render_results.py` from the files under `docs/results/`. Held-out suites of the default "
           f"run (rows never trained on). Over-refusal compliance (higher is better) and Safety (refusal rate on "
           f"harmful prompts, higher is better); 95% intervals from {BOOTSTRAP} bootstrap resamples over prompts (one "
           f"seed). Steering is selected on the run's validation split and applied to the STL model."
           + (" Capability columns: each task's headline metric (lm-evaluation-harness conventions) on the run's "
              "seeded subsample; empty where the run was not scored." if tasks else ""), "",
           "| run | model | prompts | over-refusal compliance | Safety | " + "".join(f"{t} | " for t in tasks)
           + "chosen steering |",
           "|---|---|---|---|---|" + "---|" * len(tasks) + "---|"]
  for label, directory, report in reports:
    rows = suite_rows(directory, report)
    capability = report.get("eval_summary", {}).get("capability", {})
    scores = "".join(f"{capability[t]:.3f} | " if t in capability else " | " for t in tasks)
    model = report.get("eval_summary", {}).get("model", "n/a")
    prompts = ", ".join(f"{suite} {len(outcome)}" for suite, (_, outcome) in rows.items())
    lines.append(f"| {label} | `{model}` | {prompts} | {cell(interval(rows, 'over_refusal'))} | "
                 f"{cell(interval(rows, 'harmful'))} | {scores}{chosen(report)} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--results", type=Path, default=HERE / "results")
  p.add_argument("--out", type=Path, default=HERE / "results" / "comparison.md")
  args = p.parse_args(argv)
  args.out.write_text(render(args.results))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
