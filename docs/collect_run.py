"""Copies a finished run's result files (never checkpoints or exports) into docs/results/, so that every figure the
docs quote can be re-read: report.json/.md, config.json, metrics.jsonl, steer/steer.json, eval/*.jsonl with their
*.settings.json, kernels/*.json, and the same for a baseline run inside it (DIR/baseline-*/). With --restore it
does the reverse: it puts an evaluated run's committed files back where the run keeps them, so that a study resumed
on a machine without runs/ counts that run as done instead of training it again (its checkpoints are not restored).

    .venv/bin/python docs/collect_run.py RUN_DIR DEST [--log FILE ...]
    .venv/bin/python docs/collect_run.py --restore DEST RUN_DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

PATTERNS = ("report.json", "report.md", "config.json", "metrics.jsonl", "steer/steer.json", "eval/*.jsonl",
            "eval/*.settings.json", "kernels/*.json")


def collect(run: Path, dest: Path) -> list[Path]:
  """Copies `run`'s result files (and its baselines') to `dest`, flattening steer/ and eval/; returns the copies."""
  if not (run / "report.json").is_file():
    raise SystemExit(f"error: {run}/report.json not found; give a finished run directory")
  dest.mkdir(parents=True, exist_ok=True)
  copied = []
  for pattern in PATTERNS:
    for src in sorted(run.glob(pattern)):
      if src.is_file():
        copied.append(Path(shutil.copy2(src, dest / src.name)))
  for baseline in sorted(run.glob("baseline-*")):
    if (baseline / "report.json").is_file():
      copied += collect(baseline, dest / baseline.name)
  return copied


TOP_LEVEL = ("report.json", "report.md", "config.json", "metrics.jsonl")


def _home(name: str) -> str:
  """Where a flattened result file lives in a run directory (the inverse of collect's flattening)."""
  if name in TOP_LEVEL:
    return name
  if name == "steer.json":
    return f"steer/{name}"
  if name.endswith(".jsonl") or name.endswith(".settings.json"):
    return f"eval/{name}"
  return f"kernels/{name}"


def restore(results: Path, run: Path) -> list[Path]:
  """Copies the committed result files of an evaluated run back into `run` (and its baselines'), unless `run`
  already has a report.json or the committed run was not evaluated; returns the copies."""
  report = results / "report.json"
  if (run / "report.json").exists() or not report.is_file() or "eval_summary" not in json.loads(report.read_text()):
    return []
  copied = []
  for src in sorted(results.iterdir()):
    if src.is_file():
      dest = run / _home(src.name)
      dest.parent.mkdir(parents=True, exist_ok=True)
      copied.append(Path(shutil.copy2(src, dest)))
    elif src.name.startswith("baseline-"):
      copied += restore(src, run / src.name)
  return copied


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("run", type=Path)
  p.add_argument("dest", type=Path)
  p.add_argument("--log", type=Path, action="append", default=[], help="also copy these files (command or time logs)")
  p.add_argument("--restore", action="store_true", help="copy the committed files in DEST back into RUN_DIR")
  args = p.parse_args(argv)
  if args.restore:
    print(f"{len(restore(args.run, args.dest))} files -> {args.dest}")
    return
  copied = collect(args.run, args.dest)
  for log in args.log:
    copied.append(Path(shutil.copy2(log, args.dest / log.name)))
  print(f"{len(copied)} files -> {args.dest}")


if __name__ == "__main__":
  main()
