"""docs/results/comparison.md is exactly what docs/render_results.py renders from the committed result files, and
its intervals are bootstrap percentiles around the per-suite means."""

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import load_script

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


@pytest.fixture(scope="module")
def render_results():
  return load_script("docs/render_results.py")


def test_committed_comparison_regenerates_from_the_result_files(render_results):
  assert (RESULTS / "comparison.md").read_text() == render_results.render(RESULTS)


def test_scores_and_intervals_from_rows(render_results, tmp_path):
  run = tmp_path / "default-gemma"
  run.mkdir()
  suites = {"or": ("over_refusal", [False] * 3 + [True]), "harm": ("harmful", [True, False])}
  (run / "report.json").write_text(json.dumps({"eval": {s: {"kind": k} for s, (k, _) in suites.items()},
                                               "eval_summary": {"model": "align-2",
                                                                "capability": {"arc_easy": 0.25}}}))
  for suite, (_, refused) in suites.items():
    (run / f"{suite}.jsonl").write_text("".join(json.dumps({"refused": r}) + "\n" for r in refused))
  rows = render_results.suite_rows(run, json.loads((run / "report.json").read_text()))
  assert render_results.score(rows, "over_refusal") == 0.75 and render_results.score(rows, "harmful") == 0.5
  point, lo, hi = render_results.interval(rows, "over_refusal")
  assert point == 0.75 and 0.0 <= lo < point < hi <= 1.0
  assert np.isclose(render_results.interval(rows, "harmful")[0], 0.5)
  text = render_results.render(tmp_path)
  assert "| DCR (default run) | `align-2` | or 4, harm 2 | 0.75 [" in text
  assert "| Safety | arc_easy | chosen steering |" in text and "| 0.250 | " in text
