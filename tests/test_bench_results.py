"""bench/results.py: a timing taken beside other processes is reported as contended and its goal is not judged."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results():
  spec = importlib.util.spec_from_file_location("bench_results", ROOT / "bench" / "results.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def forward(busy: float) -> dict:
  """forward.json with (a) at 2.0x and (b) at 1.5x, timed beside `busy` cores of other processes."""
  timing = {"median_s": 1.0, "other_cores_busy_median": busy}
  return {"results": {name: timing for name in ("ours_full", "torch_full", "ours_last", "torch_last")},
          "ratios": {"a_full_logits__torch_full_over_ours_full": {"median_of_round_ratios": 2.0},
                     "b_prefill__torch_full_over_ours_last": {"median_of_round_ratios": 1.5}}}


def met_column(results, tmp_path, files: dict) -> dict[str, str]:
  for name, data in files.items():
    (tmp_path / f"{name}.json").write_text(json.dumps(data))
  text = results.render(tmp_path)
  return {line.split(" | ")[0][2:6]: line.split(" | ")[5] for line in text.splitlines() if line.startswith("| (")}


@pytest.mark.parametrize("busy, a, b", [(0.0, "yes", "no"), (0.2, "yes", "no"),
                                        (1.0, "contended — not judged", "contended — not judged")])
def test_contended_timings_are_not_judged(results, tmp_path, busy, a, b):
  met = met_column(results, tmp_path, {"forward": forward(busy)})
  assert (met["(a) "], met["(b) "]) == (a, b)
  assert met["(c) "] == "n/a"  # train_step.json not run


def test_memory_row_and_pipeline_runs(results, tmp_path):
  """The load-memory row is judged whatever the load (memory, not time); a pipeline run marked contended says so."""
  memory = {"rows": [{"peak_mib": 2000.0, "params_mib": 1000.0}, {"peak_mib": 2100.0, "params_mib": 1000.0}],
            "scan_over_layers_peak": 1.05, "scan_load_over_params": 1.15}
  (tmp_path / "pipeline_x.json").write_text(json.dumps({"command": "make run", "contended": True, "note": "wall 9m"}))
  assert met_column(results, tmp_path, {"load_memory": memory})["(i) "] == "yes"
  memory["scan_load_over_params"] = 1.3
  assert met_column(results, tmp_path, {"load_memory": memory})["(i) "] == "no"
  assert "- `pipeline_x.json`: `make run` (contended — not judged): wall 9m" in results.render(tmp_path)
