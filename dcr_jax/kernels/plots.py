"""PNG figures of kernel tracking: a heatmap per checkpoint, and curves over training steps (several workdirs)."""

from __future__ import annotations

import io

from etils import epath

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LABELS = {"seemingly_toxic": "seemingly toxic", "toxic": "toxic", "general": "general"}


def heatmap(entry: dict, path: epath.PathLike, measure: str = "ratio") -> None:
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
  _save(fig, path)


def _pair(entry: dict, measure: str, row: str, col: str) -> float:
  names = entry["groups"]
  return float(np.asarray(entry[measure])[names.index(row), names.index(col)])


_STAGE_ORDER = {"base": 0, "refine": 1, "align": 2}


def curves(runs: dict[str, list[dict]], path: epath.PathLike) -> None:
  """Against the checkpoint (base, then refine and align steps; every run on one shared axis): the toxic × seemingly
  toxic cosine, the paper's ratio in both directions (it divides by the row group's own kernel, so it is not
  symmetric), and each group's refusal probability."""
  fig, (cos_ax, ratio_ax, refusal_ax) = plt.subplots(1, 3, figsize=(14, 3.8))
  labels = sorted({(e["stage"], e["step"], e["label"]) for entries in runs.values() for e in entries},
                  key=lambda k: (_STAGE_ORDER.get(k[0], 3), k[1]))
  where = {label: i for i, (_, _, label) in enumerate(labels)}
  for run, entries in runs.items():
    x = [where[e["label"]] for e in entries]
    cos_ax.plot(x, [_pair(e, "cosine", "toxic", "seemingly_toxic") for e in entries], marker="o", label=run)
    for row, col, style in (("seemingly_toxic", "toxic", "-"), ("toxic", "seemingly_toxic", "--")):
      ratio_ax.plot(x, [_pair(e, "ratio", row, col) for e in entries], style, marker="o",
                    label=f"{run}: ‖K({LABELS[row]}, {LABELS[col]})‖ / ‖K({LABELS[row]}, {LABELS[row]})‖")
    for group, style in (("seemingly_toxic", "-"), ("toxic", "--")):
      refusal_ax.plot(x, [e["refusal_prob"].get(group, np.nan) for e in entries], style, marker=".",
                      label=f"{run}: {LABELS[group]}")
  for ax in (cos_ax, ratio_ax, refusal_ax):
    ax.set_xticks(range(len(labels)), [label for _, _, label in labels], rotation=45, ha="right", fontsize=7)
  cos_ax.set_ylabel("toxic × seemingly toxic kernel cosine")
  ratio_ax.set_ylabel("cross-group kernel ratio")
  ratio_ax.set_yscale("log")
  refusal_ax.set_ylabel("refusal probability")
  cos_ax.legend(fontsize=8)
  ratio_ax.legend(fontsize=6)
  refusal_ax.legend(fontsize=7)
  fig.tight_layout()
  _save(fig, path)


def _save(fig, path: epath.PathLike) -> None:
  """PNG bytes written through epath (a local path or gs://…), the figure closed."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120)
  plt.close(fig)
  epath.Path(path).write_bytes(buffer.getvalue())
