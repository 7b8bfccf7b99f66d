"""docs/reproduction.md's tables are exactly what docs/render_study.py renders from docs/results/study/, and the
renderer's scores, seed pooling, intervals and target check follow the result files."""

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import load_script

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def render_study():
  return load_script("docs/render_study.py")


def test_committed_reproduction_doc_regenerates_from_the_result_files(render_study):
  doc = (DOCS / "reproduction.md").read_text()
  assert render_study.fill(doc, render_study.blocks(DOCS / "results" / "study")) == doc


def _run(directory: Path, refused: dict[str, list[bool]], capability=None):
  directory.mkdir(parents=True)
  kinds = {"xstest": "over_refusal", "advbench": "harmful", "harmbench": "harmful"}
  report = {"eval": {s: {"kind": kinds[s]} for s in refused}, "eval_summary": {"capability": capability or {}}}
  (directory / "report.json").write_text(json.dumps(report))
  for suite, flags in refused.items():
    (directory / f"{suite}.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{suite} {i}", "refused": r}) + "\n" for i, r in reversed(list(enumerate(flags)))))


def _sweep(results: Path, name: str, points: list[tuple[dict, int, float, dict]]):
  rows = []
  for overrides, seed, objective, refused in points:
    point = ",".join(f"{k}={v}" for k, v in overrides.items()) + f",seed={seed}"
    _run(results / name / point, refused, {"mmlu": 0.3} if seed == 0 else None)
    rows.append({"name": point, "overrides": overrides, "seed": seed, "status": "done", "objective": objective,
                 "validation": {"val_refusal_prob_toxic": objective + 0.1, "val_refusal_prob_seemingly_toxic": 0.1},
                 "stages": {"align": {"seconds": 12.0}}})
  (results / name).mkdir(parents=True, exist_ok=True)
  (results / name / "sweep.json").write_text(json.dumps({
      "points": rows, "validation_vs_evaluation": {"spearman_rho": 0.5, "points": len(rows)}}))


def test_chosen_settings_pool_their_seeds_and_the_target_is_checked(render_study, tmp_path):
  w = "align.safety_weight"
  refused = lambda comply, harm: {"xstest": [False] * comply + [True] * (4 - comply),
                                  "advbench": [True] * harm + [False] * (4 - harm), "harmbench": [True, False]}
  _sweep(tmp_path, "stl-sweep", [({w: 0.25}, 0, 0.2, refused(2, 2)), ({w: 0.5}, 0, 0.1, refused(1, 4))])
  _sweep(tmp_path, "stl-seeds", [({w: 0.25}, 1, 0.2, refused(2, 2)), ({w: 0.5}, 1, 0.0, refused(0, 0))])
  _sweep(tmp_path, "dcr-sweep", [({w: 0.25, "refine.steps": 10}, 0, 0.3, refused(4, 2))])
  _sweep(tmp_path, "dcr-seeds", [({w: 0.25, "refine.steps": 10}, s, 0.3, refused(3, 2)) for s in (1, 2)])

  best, directories = render_study.chosen(tmp_path, "stl")
  assert best["overrides"] == {w: 0.25} and [d.parent.name for d in directories] == ["stl-sweep", "stl-seeds"]
  rows = render_study.stacked(render_study.chosen(tmp_path, "dcr")[1])
  assert rows["xstest"][1].shape == (3, 4)  # seeds x prompts, aligned by prompt text
  assert render_study.score(rows, "over_refusal") == pytest.approx((1.0 + 0.75 + 0.75) / 3)
  assert render_study.score(rows, "harmful") == pytest.approx(np.mean([0.5, 0.5]))
  point, lo, hi = render_study.interval(rows, "over_refusal")
  assert lo < point < hi and 0.0 <= lo and hi <= 1.0

  text = render_study.target(tmp_path)
  assert "Safety +0.000" in text and "compliance +0.333" in text and "**met**" in text
  table = render_study.results_table(tmp_path)
  assert "| STL | w 0.25 | 2 | 0.50 [" in table
  assert "| DCR | w 0.25, stage-1 steps 10 | 3 | 0.83 [" in table and "| 0.30 |" in table
  sweeps = render_study.sweep_table(tmp_path)
  assert "| STL | w 0.25 **(chosen)** | 0.3000 | 0.1000 | 0.2000 |" in sweeps and "ρ = 0.50 over 2 points" in sweeps

  doc = "x\n<!-- study:a -->\nold\n<!-- /study:a -->\ny\n"
  assert render_study.fill(doc, {"a": "new"}) == "x\n<!-- study:a -->\nnew\n<!-- /study:a -->\ny\n"
  with pytest.raises(SystemExit, match="no <!-- study:b --> block"):
    render_study.fill(doc, {"b": "new"})
  render_study.frontier_plot({"gemma3-270m": tmp_path}, tmp_path / "frontier.png")
  assert (tmp_path / "frontier.png").stat().st_size > 10_000


def test_a_sweep_stopped_part_way_chooses_nothing(render_study, tmp_path):
  _sweep(tmp_path, "dcr-sweep", [({"refine.steps": 10}, 0, 0.3, {"xstest": [False, True]})])
  record = json.loads((tmp_path / "dcr-sweep" / "sweep.json").read_text())
  record["points"].append({"name": "refine.steps=30,seed=0", "overrides": {"refine.steps": 30}, "seed": 0,
                           "status": "pending", "objective": None})
  (tmp_path / "dcr-sweep" / "sweep.json").write_text(json.dumps(record))
  assert render_study.chosen(tmp_path, "dcr") is None
  text = render_study.sweep_table(tmp_path)
  assert "stage-1 steps 10 (best so far; sweep unfinished)" in text and "stage-1 steps 30 (pending) |" in text


def test_unfinished_sweeps_render_as_not_run(render_study, tmp_path):
  assert "not run yet" in render_study.sweep_table(tmp_path)
  assert render_study.results_table(tmp_path) == "Not run yet."
  assert render_study.target(tmp_path).startswith("Not run yet")


def test_wall_times_come_from_the_command_log(render_study, tmp_path):
  (tmp_path / "commands.log").write_text(
      "[04:32:55] .venv/bin/python -m dcr_jax.sweep --config=a|b --seeds=0\n[04:50:00] finished in 1025 s\n"
      "gemma3-270m: STL's chosen align.safety_weight: 0.25\n[23:50:01] .venv/bin/python -m dcr_jax.main --x\n"
      "[00:10:01] (stopped at the end of the sitting)\n[00:10:02] (resumed on a fresh machine)\n"
      "[00:10:02] .venv/bin/python -m dcr_jax.main --y\n")
  assert render_study.wall_times(tmp_path).splitlines()[2:] == [
      "| `-m dcr_jax.sweep --config=a\\|b --seeds=0` | 1025 |",
      "| `-m dcr_jax.main --x` | 1200 (stopped, resumed below) |",
      "| **total** | **2225** (0.6 h) |"]
