"""Copies a finished run's result files (never checkpoints or exports) into docs/results/, so that every figure the
docs quote can be re-read: report.json/.md, config.json, metrics.jsonl, steer/steer.json, eval/*.jsonl with their
*.settings.json, kernels/*.json, and the same for a baseline run inside it (DIR/baseline-*/).

    .venv/bin/python docs/collect_run.py RUN_DIR DEST [--log FILE ...]
"""

from __future__ import annotations

import argparse
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


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("run", type=Path)
  p.add_argument("dest", type=Path)
  p.add_argument("--log", type=Path, action="append", default=[], help="also copy these files (command or time logs)")
  args = p.parse_args(argv)
  copied = collect(args.run, args.dest)
  for log in args.log:
    copied.append(Path(shutil.copy2(log, args.dest / log.name)))
  print(f"{len(copied)} files -> {args.dest}")


if __name__ == "__main__":
  main()
