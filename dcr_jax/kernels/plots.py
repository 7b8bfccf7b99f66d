"""PNG figures of kernel tracking: a heatmap per checkpoint, and curves over training steps (several workdirs)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LABELS = {"seemingly_toxic": "seemingly toxic", "toxic": "toxic", "general": "general"}


def heatmap(entry: dict, path: Path, measure: str = "ratio") -> None:
  """The group block means of one checkpoint as an annotated heatmap."""
  names, values = entry["groups"], np.asarray(entry[measure])
  fig, ax = plt.subplots(figsize=(4.2, 3.6))
  im = ax.imshow(values, cmap="viridis")
  ticks = [LABELS.get(n, n) for n in names]
  ax.set_xticks(range(len(names)), ticks, rotation=30, ha="right")
  ax.set_yticks(range(len(names)), ticks)
  for i in range(len(names)):
    for j in range(len(names)):
      ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", color="w" if values[i, j] < values.max() * 0.6
              else "k")
  ax.set_title(f"{entry['label']}: kernel {measure}")
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _cross(entry: dict, measure: str) -> float:
  names = entry["groups"]
  a, b = names.index("toxic"), names.index("seemingly_toxic")
  values = np.asarray(entry[measure])
  return float((values[a, b] + values[b, a]) / 2)


def curves(runs: dict[str, list[dict]], path: Path, measure: str = "ratio") -> None:
  """Cross-group (toxic × seemingly toxic) similarity and per-group refusal probability against the step."""
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
  for run, entries in runs.items():
    x = np.arange(len(entries))
    left.plot(x, [_cross(e, measure) for e in entries], marker="o", label=run)
    for group, style in (("seemingly_toxic", "-"), ("toxic", "--")):
      right.plot(x, [e["refusal_prob"].get(group, np.nan) for e in entries], style, marker=".",
                 label=f"{run}: {LABELS[group]}")
    left.set_xticks(x, [e["label"] for e in entries], rotation=45, ha="right", fontsize=7)
    right.set_xticks(x, [e["label"] for e in entries], rotation=45, ha="right", fontsize=7)
  left.set_ylabel(f"toxic × seemingly toxic kernel {measure}")
  right.set_ylabel("refusal probability")
  left.legend(fontsize=8)
  right.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
