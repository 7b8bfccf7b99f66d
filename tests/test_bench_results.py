"""bench/results.py: a timing taken beside other processes is reported as contended and its goal is not judged."""

import datetime as dt
import json
import os
import subprocess

import pytest

from helpers import load_script


@pytest.fixture(scope="module")
def results():
  return load_script("bench/results.py")


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


def test_device_runs_table_every_file_but_the_smoke(results, tmp_path):
  mfu = {"median_s": 0.5, "achieved_tflops": 333.0, "mfu": 0.336, "batch": 8, "seq": 2048, "remat": "dots",
         "fraction_of_measured_matmul": 0.62}
  (tmp_path / "device.json").write_text(json.dumps({
      "device_kind": "NVIDIA H200", "results": {
          "mfu": {"qwen2.5-1.5b": mfu, "part_s": 9.0},
          "stage1": {"model": "gemma3-1b", "batch": 32, "seq": 128, "half_over_full": 0.55},
          "generate": {"model": "qwen2.5-1.5b", "batch": 16, "new_tokens": 64, "ours": {"tokens_per_s": 6520.0},
                       "transformers": {"tokens_per_s": 403.0}, "ours_over_transformers": 16.2},
          "entk": {"model": "gemma3-270m", "method": "structured", "prompts": 32, "top_k": 10, "first_s": 46.5,
                   "second_s": 5.0, "device_peak_bytes": 2 ** 30}}}))
  (tmp_path / "device_oom.json").write_text(json.dumps({"device_kind": "NVIDIA H200",
                                                        "results": {"mfu": {"error": "RESOURCE_EXHAUSTED"}}}))
  (tmp_path / "device_smoke.json").write_text(json.dumps({"smoke": True, "device_kind": "cpu",
                                                          "results": {"mfu": {"tiny": mfu}}}))
  text = "\n".join(results.device_lines(tmp_path))
  assert "| `device.json` | NVIDIA H200 | qwen2.5-1.5b | dots | 8 x 2048 | 0.5 s | 333 | 33.6% | 0.62 |" in text
  assert "| `device_oom.json` | NVIDIA H200 | mfu part failed |" in text and "RESOURCE_EXHAUSTED" in text
  assert "smoke" not in text and "tiny" not in text
  assert "0.55x the time of l = L" in text and "16.20x" in text and "device peak 1.0 GiB" in text
  assert results.device_lines(tmp_path / "none")[0].startswith("No accelerator run recorded")


def test_neural_tangents_row_and_cases(results, tmp_path):
  """kernels_nt.json: the worst of the peer's best time over ours is judged against 1x; absent, "not run"."""
  assert met_column(results, tmp_path, {})["(g) "] == "n/a"  # the nt row closes the (g) rows
  case = lambda n, ratio, busy: {
      "size": "xs", "n": n, "s": 5, "ours": {"wall_s": 0.1}, "nt_best": "NTK_VECTOR_PRODUCTS",
      "nt_best_over_ours": ratio, "others_busy": busy, "max_rel_err": {"NTK_VECTOR_PRODUCTS": 2e-7},
      "nt": {"NTK_VECTOR_PRODUCTS": {"wall_s": 0.1 * ratio}, "STRUCTURED_DERIVATIVES": {"error": "boom"}}}
  data = {"args": {"dtype": "float32", "implementations": ["NTK_VECTOR_PRODUCTS", "STRUCTURED_DERIVATIVES"]},
          "summary": {"all_agree": True, "max_rel_err": 2e-7}, "nt": {"versions": {"neural_tangents": "0.6.5"}},
          "cases": [case(8, 1.5, 0.0), case(16, 3.0, 0.1)]}
  assert met_column(results, tmp_path, {"kernels_nt": data})["(g) "] == "yes"
  text = results.render(tmp_path)
  assert "1.50x - 3.00x" in text and "worst at xs N=8 \\|S\\|=5" in text
  assert "| xs | 16 | 5 | 0.1 | 0.3 | failed | NTK_VECTOR_PRODUCTS | 3.00x | 2.0e-07 | 0.10 |" in text
  data["cases"][0]["nt_best_over_ours"] = 0.8
  assert met_column(results, tmp_path, {"kernels_nt": data})["(g) "] == "no"
  data["cases"][0]["others_busy"] = 1.0
  assert met_column(results, tmp_path, {"kernels_nt": data})["(g) "] == "contended — not judged"


def test_a_committed_result_is_dated_by_its_commit_and_a_changed_one_by_its_mtime(results, tmp_path):
  """A fresh clone gives every file the clone's mtime, so an unchanged tracked file takes its commit's date."""
  path = tmp_path / "forward.json"
  path.write_text("{}")
  env = {**os.environ, "GIT_AUTHOR_DATE": "2020-01-02T03:04:05", "GIT_COMMITTER_DATE": "2020-01-02T03:04:05",
         "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
  for args in (["init", "-q"], ["add", "forward.json"], ["commit", "-qm", "r"]):
    subprocess.run(["git", "-C", str(tmp_path), *args], check=True, env=env)
  os.utime(path, (1.7e9, 1.7e9))
  assert results.recorded_at(path) == dt.datetime(2020, 1, 2, 3, 4, 5)
  path.write_text('{"changed": 1}')
  os.utime(path, (1.7e9, 1.7e9))
  assert results.recorded_at(path) == dt.datetime.fromtimestamp(1.7e9)
