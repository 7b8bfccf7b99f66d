"""Renders launch/plans/*.json (written by launch/plans.sh) as the Markdown table of launch/README.md."""

import json
import sys
from pathlib import Path

PLANS = Path(__file__).resolve().parent / "plans"
HBM_GIB = {"v5e-8": 16e9 / 2**30, "v5p-32": 95e9 / 2**30}  # per chip
ORDER = ("qwen2.5-1.5b", "qwen2.5-7b", "llama3.1-8b")


def gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def rows() -> list[str]:
  """One table row per (variant, slice, stage); peak in bold, marked when it exceeds the chip's HBM."""
  out = ["| run | stage | params | optimizer | temporaries | peak (args + temps) | fits | TFLOP/step |",
         "|---|---|---:|---:|---:|---:|---|---:|"]
  for path in sorted(PLANS.glob("*.json"), key=lambda p: (ORDER.index(p.stem.split("__")[0]), p.stem)):
    plan = json.loads(path.read_text())
    variant, slice_name, *accum = path.stem.split("__")
    for stage, r in plan["stages"].items():
      if accum and stage != "align":
        continue
      peak = r["peak_bytes_estimate"]
      fits = "yes" if peak / 2**30 < 0.9 * HBM_GIB[slice_name] else "**no**"
      stage = f"{stage}, grad_accum {accum[0][len('accum'):]}" if accum else stage
      out.append(f"| {variant}, {slice_name} ({plan['devices']} chips) | {stage} | {gib(r['params_bytes'])} | "
                 f"{gib(r['optimizer_bytes'])} | {gib(r['temp_bytes'])} | **{gib(peak)}** | {fits} | "
                 f"{r['flops_per_step'] / 1e12:.1f} |")
  return out


if __name__ == "__main__":
  sys.stdout.write("\n".join(rows()) + "\n")
