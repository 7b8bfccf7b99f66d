"""The command line: bad input gives one line naming the problem, a non-zero exit and an untouched workdir."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import xla_env

ROOT = Path(__file__).resolve().parents[1]


def run_main(*args, cwd=ROOT, env=None):
  return subprocess.run([sys.executable, "-m", "dcr_jax.main", *args], cwd=cwd, capture_output=True, text=True,
                        timeout=600, env=env)


@pytest.mark.parametrize("args, needle", [
    (["--config=configs/gemma.py:gemma9-1b"], "gemma9-1b"),
    (["--config=configs/gemma.py", "--config.model.weights=/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
    (["--config=configs/tiny.py", "--config.stages=refine,bogus"], "config.stages"),
    (["--config=configs/tiny.py", "--config.mesh.data=0"], "config.mesh.data"),
    (["--config=configs/tiny.py", "--config.refine.layer=99"], "config.refine.layer"),
    (["--config=configs/tiny.py", "--config.refine.layer=abc"], "config.refine.layer='abc'"),
    (["--config=configs/tiny.py", "--config.refine.class_ratio=1,x"], "config.refine.class_ratio='1,x'"),
    (["--config=configs/tiny.py", "--config.refine.loss=hinge"], "config.refine.loss"),
    (["--config=configs/tiny.py", "--config.data.seemingly_toxic="], "config.data.seemingly_toxic"),
    (["--config=configs/tiny.py", "--config.data.toxic=/nowhere/toxic.csv"], "/nowhere/toxic.csv"),
    (["--config=configs/tiny.py", "--config.align.lora_targets=q,zz"], "config.align.lora_targets"),
    (["--config=configs/tiny.py", "--config.refine.batch_size=12"], "config.refine.batch_size"),
])
def test_bad_input_is_one_line_and_leaves_no_workdir(tmp_path, args, needle):
  workdir = tmp_path / "run"
  env = xla_env(8)  # batch 12 vs 8 devices
  result = run_main(*args, f"--workdir={workdir}", env=env)
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and needle in lines[0], result.stderr
  assert not workdir.exists()


@pytest.mark.slow  # over the default run's 15-minute budget; make test-all runs it
def test_tiny_demo_writes_report_and_rerun_rejects_changed_config(tmp_path):
  workdir = tmp_path / "run"
  result = run_main("--config=configs/tiny.py", "--config.stages=demo", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr
  report = json.loads((workdir / "report.json").read_text())
  assert report["model"]["name"] == "tiny-gemma3" and report["stages"]["demo"]["prompts"] == 3
  assert len(json.loads((workdir / "demo.json").read_text())) == 3
  before = (workdir / "config.json").read_text()
  changed = run_main("--config=configs/tiny.py", "--config.stages=demo", "--config.seed=7", f"--workdir={workdir}")
  assert changed.returncode != 0 and "config.seed" in changed.stderr.strip().splitlines()[-1]
  assert (workdir / "config.json").read_text() == before


def test_tiny_pipeline_trains_evaluates_and_reevaluates(tmp_path):
  workdir = tmp_path / "dcr"
  short = ["--config.refine.steps=12", "--config.align.steps=12", "--config.checkpoint.every=6"]
  result = run_main("--config=configs/tiny.py", "--config.export.formats=hf", "--config.baseline=stl", *short,
                    f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((workdir / "report.json").read_text())
  assert set(report["stages"]) == {"refine", "align", "evaluate"}
  stl = report["baseline"]["stl"]  # stage 2 from the base weights, evaluated on the same suites
  base_report = json.loads((workdir / "baseline-stl" / "report.json").read_text())
  assert set(base_report["stages"]) == {"align", "evaluate"} and stl["eval"] == base_report["eval"]
  assert stl["eval"]["demo-harmful"]["n"] == 16 and stl["align"]["steps"] == report["stages"]["align"]["steps"]
  assert not (workdir / "baseline-stl" / "export").exists()
  assert "Beside the STL baseline" in (workdir / "report.md").read_text()
  for stage in ("refine", "align"):
    assert report["stages"][stage]["steps"] > 0 and report["stages"][stage]["seconds"] > 0
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  align = [r["loss"] for r in rows if r["stage"] == "align"]
  assert align[-1] < align[0]
  probe = report["stages"]["refine"]["probe"]
  assert probe["after"]["across"] < probe["before"]["across"]  # the classes moved apart at layer ℓ
  assert report["eval"]["demo-harmful"]["n"] == 16 and (workdir / "report.md").is_file()
  exported = workdir / "export" / "hf"  # the aligned model, LoRA merged, as transformers reads it
  assert report["export"]["hf"] == str(exported) and (exported / "model.safetensors").is_file()
  assert json.loads((exported / "config.json").read_text())["model_type"] == "gemma3_text"
  assert "align step 12" in (exported / "README.md").read_text()
  before = (workdir / "eval" / "demo-harmful.jsonl").read_text()
  again = run_main("--config=configs/tiny.py", "--config.stages=evaluate", "--config.export.formats=hf", *short,
                   f"--workdir={workdir}")
  assert again.returncode == 0, again.stderr[-3000:]
  rerun = json.loads((workdir / "report.json").read_text())["stages"]
  assert rerun["evaluate"]["seconds"] >= report["stages"]["evaluate"]["seconds"]  # a total, not the re-run's time
  assert rerun["align"] == report["stages"]["align"]
  assert (workdir / "eval" / "demo-harmful.jsonl").read_text() == before  # finished prompts are not redone
  assert json.loads((workdir / "config.json").read_text())["stages"] == "refine,align,evaluate"


@pytest.mark.slow  # over the default run's 15-minute budget; make test-all runs it
def test_tiny_pipeline_with_scanned_layers_and_lora(tmp_path):
  """scan_layers end to end: stage 1 on stacked weights, stacked LoRA adapters, checkpoints, evaluation."""
  workdir = tmp_path / "scan"
  result = run_main("--config=configs/tiny.py", "--config.model.scan_layers=True", "--config.model.remat=full",
                    "--config.align.lora_rank=4", "--config.refine.steps=6", "--config.align.steps=6",
                    "--config.checkpoint.every=3", "--config.data.val_toxic=builtin:toxic@0::2",
                    "--config.data.val_seemingly_toxic=builtin:seemingly_toxic@1::2", "--config.data.n_val=4",
                    f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((workdir / "report.json").read_text())
  assert set(report["stages"]) == {"refine", "align", "evaluate"}
  assert report["stages"]["align"]["steps"] == 6 and report["eval"]["demo-harmful"]["n"] == 16
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  validated = [(r["stage"], r["step"]) for r in rows if "val_refusal_prob_toxic" in r]
  assert validated == [("refine", 3), ("refine", 6), ("align", 3), ("align", 6)]  # at every saved step
  values = [r["val_refusal_prob_seemingly_toxic"] for r in rows if "val_refusal_prob_toxic" in r]
  assert all(0 < v < 1 for v in values) and len(set(values)) == 4  # the params changed between saves
  probe = report["stages"]["refine"]["probe"]
  assert probe["after"]["across"] < probe["before"]["across"]
