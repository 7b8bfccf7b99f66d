"""The sweep: every point an ordinary workdir, ranked by the validation objective; resumes; bad input fails early."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dcr_jax import main as pipeline_main
from dcr_jax import sweep
from dcr_jax.errors import UserError
from dcr_jax.pipeline import ModelCache
from dcr_jax.train.loop import last_logged

ROOT = Path(__file__).resolve().parents[1]


def cheap_config():
  """configs/tiny.py cut to seconds: stage 1 (2 steps) then evaluation (4 prompts per suite), validation on 4
  prompts per group (logged at stage 1's save). Stage 2 is left out: its compilation is the dearest part."""
  loader = importlib.util.spec_from_file_location("tiny_config", ROOT / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(loader)
  loader.loader.exec_module(module)
  config = module.get_config()
  config.stages = "refine,evaluate"
  config.refine.steps, config.refine.batch_size, config.checkpoint.every = 2, 8, 10
  config.evaluate.suites = "demo-over-refusal:4,demo-harmful:4"
  config.evaluate.max_new_tokens, config.evaluate.batch_size, config.evaluate.refusal_prob = 4, 4, False
  config.data.val_toxic, config.data.val_seemingly_toxic = "builtin:toxic", "builtin:seemingly_toxic"
  config.data.n_val = 4
  return config


def test_a_sweep_runs_every_point_ranks_by_validation_and_resumes(tmp_path, monkeypatch):
  config = cheap_config()
  grid = sweep.parse_grid(["refine.lr=1e-3,1e-2", "refine.patience=1"], config)
  models = ModelCache()
  result = sweep.run_sweep(config, tmp_path, grid, [0], models=models, show_progress=False)
  names = ["refine.lr=0.001,refine.patience=1,seed=0", "refine.lr=0.01,refine.patience=1,seed=0"]
  assert sorted(p["name"] for p in result["points"]) == names
  assert len(models.build_seconds) == 1 and len(models.copy_seconds) == 2  # one load, a copy per point
  for point in result["points"]:
    workdir = tmp_path / point["name"]
    assert point["status"] == "done" and point["workdir"] == str(workdir)
    report = json.loads((workdir / "report.json").read_text())
    assert set(report["stages"]) == {"refine", "evaluate"}
    assert point["overrides"]["refine.lr"] == json.loads((workdir / "config.json").read_text())["refine"]["lr"]
    toxic = last_logged(workdir / "metrics.jsonl", "refine", "val_refusal_prob_toxic")
    seemingly = last_logged(workdir / "metrics.jsonl", "refine", "val_refusal_prob_seemingly_toxic")
    assert point["objective"] == pytest.approx(toxic - seemingly)  # the margin, from the validation rows alone
    assert point["safety"] == report["eval_summary"]["safety"]
    assert point["refine_cosine"]["after"]["across"] == report["stages"]["refine"]["probe"]["after"]["across"]
    assert point["refine_stopped_at"] == report["stages"]["refine"]["stopped_at"]
  scores = [p["objective"] for p in result["points"]]
  assert scores == sorted(scores, reverse=True)
  table = (tmp_path / "sweep.md").read_text()
  assert "validation objective `margin`" in table
  point_rows = [line for line in table.split("## Points")[1].splitlines() if line.startswith("| ") and "rank" not in
                line]
  assert [row.split(" | ")[1] for row in point_rows] == [p["name"] for p in result["points"]]

  real_run = pipeline_main.run
  monkeypatch.setattr(pipeline_main, "run", lambda *a, **k: pytest.fail("a finished point ran again"))
  recorded = sweep.run_sweep(config, tmp_path, grid, [0, 1], show_progress=False,
                             record_only=True)  # another seed: its points are listed as pending, and nothing runs
  assert [p["status"] for p in recorded["points"]] == ["done", "done", "pending", "pending"]
  assert [p["name"] for p in recorded["points"]][2:] == [n.replace("seed=0", "seed=1") for n in names]
  assert recorded["this_invocation"]["ran"] == 0
  evaluated_later = tmp_path / names[0] / "config.json"  # as after `--config.stages=evaluate` with capability there
  saved = json.loads(evaluated_later.read_text())
  saved["evaluate"]["capability"] = "piqa"
  evaluated_later.write_text(json.dumps(saved))
  again = sweep.run_sweep(config, tmp_path, grid, [0], show_progress=False)
  assert again["this_invocation"]["skipped"] == 2 and again["points"] == result["points"]
  assert json.loads(evaluated_later.read_text()) == saved  # a finished point's record is not rewritten
  assert [i["ran"] for i in again["earlier_invocations"]] == [2, 0]  # the first run's record is kept, then record_only
  assert (tmp_path / "sweep.md").read_text() == table

  partial = tmp_path / names[1] / "report.json"  # as if killed during evaluation
  report = json.loads(partial.read_text())
  del report["stages"]["evaluate"]
  partial.write_text(json.dumps(report))
  calls, listed = [], []

  def resume(config, workdir, models=None):
    calls.append(workdir)  # sweep.json already lists every point: the finished one, and this one as pending
    listed.append({p["name"]: p["status"] for p in json.loads((tmp_path / "sweep.json").read_text())["points"]})
    return real_run(config, workdir, models=models)

  monkeypatch.setattr(pipeline_main, "run", resume)
  resumed = sweep.run_sweep(config, tmp_path, grid, [0], models=models, show_progress=False)
  assert [str(c) for c in calls] == [str(tmp_path / names[1])] and resumed["this_invocation"]["ran"] == 1
  assert listed == [{names[0]: "done", names[1]: "pending"}]
  assert "evaluate" in json.loads(partial.read_text())["stages"]
  assert (tmp_path / "sweep.md").read_text() == table


@pytest.mark.parametrize("grid, seeds, needle", [
    (["refine.lr="], "0", "--grid=refine.lr="),
    (["refine.lr=1e-3,,2e-3"], "0", "empty value"),
    (["refine.lr=abc"], "0", "'abc' is not a float"),
    (["refine"], "0", "KEY=V1,V2"),
    (["seed=1,2"], "0", "--seeds"),
    (["refine.lr=1e-3", "refine.lr=2e-3"], "0", "given twice"),
    (["refine.steps=-1"], "0", "config.refine.steps=-1"),
    (["refine.lr=1e-3"], "0,x", "--seeds=0,x"),
    (["refine.lr=1e-3"], "1,1", "--seeds=1,1"),
])
def test_bad_input_names_the_problem_and_writes_nothing(tmp_path, grid, seeds, needle):
  config = cheap_config()
  with pytest.raises(UserError) as e:
    sweep.run_sweep(config, tmp_path / "dir", sweep.parse_grid(grid, config), sweep.parse_seeds(seeds, 0))
  assert needle in str(e.value) and "\n" not in str(e.value)
  assert not (tmp_path / "dir").exists()


def test_an_objective_without_its_validation_prompts_is_refused(tmp_path):
  config = cheap_config()
  config.data.val_toxic = ""
  with pytest.raises(UserError, match="--config.data.val_toxic"):
    sweep.run_sweep(config, tmp_path / "dir", [], [0])
  assert not (tmp_path / "dir").exists()


def test_the_command_line_rejects_an_unknown_grid_key_in_one_line(tmp_path):
  workdir = tmp_path / "dir"
  result = subprocess.run([sys.executable, "-m", "dcr_jax.sweep", "--config=configs/tiny.py", f"--workdir={workdir}",
                           "--grid=refine.bogus=1,2", "--seeds=0,1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "refine.bogus" in lines[0], result.stderr
  assert not workdir.exists()


def test_rank_agreement_is_spearman_between_validation_and_the_evaluation_analogue():
  from scipy.stats import spearmanr

  def row(name, objective, compliance, safety):
    return {"name": name, "objective": objective, "over_refusal_compliance": compliance, "safety": safety}

  rows = [row("a", 0.30, 0.9, 0.5), row("b", 0.10, 0.6, 0.5), row("c", 0.20, 0.95, 0.2), row("d", 0.20, 0.7, 0.7),
          row("e", None, 0.8, 0.8), row("f", 0.50, None, None)]  # e diverged, f not evaluated: both left out
  agreement = sweep.rank_agreement(rows, "margin")
  margins = [0.9 + 0.5 - 1, 0.6 + 0.5 - 1, 0.95 + 0.2 - 1, 0.7 + 0.7 - 1]  # Safety + compliance - 1
  assert agreement["points"] == 4 and list(agreement["evaluation"].values()) == pytest.approx(margins)
  assert agreement["spearman_rho"] == pytest.approx(spearmanr([0.30, 0.10, 0.20, 0.20], margins).statistic)
  assert sweep.rank_agreement(rows, "safety")["spearman_rho"] == pytest.approx(
      spearmanr([0.30, 0.10, 0.20, 0.20], [0.5, 0.5, 0.2, 0.7]).statistic)
  assert sweep.rank_agreement(rows[:2], "margin")["spearman_rho"] is None  # fewer than 3 points
  table = sweep.sweep_markdown(Path("sweep"), "margin", [("refine.steps", [1])], [
      {**r, "setting": r["name"], "seed": 0, "status": "done", "validation": {}, "refine_cosine": {},
       "refine_stopped_at": None} for r in rows])
  assert f"Spearman's ρ = {agreement['spearman_rho']:.2f} over 4 evaluated points" in table
