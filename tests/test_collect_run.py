"""docs/collect_run.py: a finished run's result files (and its baseline's) are copied, never its checkpoints."""

from pathlib import Path

import pytest

from helpers import load_script



@pytest.fixture(scope="module")
def collect_run():
  return load_script("docs/collect_run.py")


def write(path: Path, text: str = "{}") -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def test_copies_results_of_run_and_baseline_not_checkpoints(collect_run, tmp_path):
  run = tmp_path / "run"
  for name in ("report.json", "report.md", "config.json", "metrics.jsonl", "steer/steer.json",
               "eval/demo-harmful-heldout.jsonl", "eval/demo-harmful-heldout.settings.json",
               "baseline-stl/report.json", "baseline-stl/eval/demo-harmful-heldout.jsonl",
               "checkpoints/align/2/state", "export/hf/model.safetensors"):
    write(run / name, name)
  copied = collect_run.collect(run, tmp_path / "out")
  names = sorted(str(p.relative_to(tmp_path / "out")) for p in copied)
  assert names == ["baseline-stl/demo-harmful-heldout.jsonl", "baseline-stl/report.json", "config.json",
                   "demo-harmful-heldout.jsonl", "demo-harmful-heldout.settings.json", "metrics.jsonl",
                   "report.json", "report.md", "steer.json"]
  assert (tmp_path / "out" / "steer.json").read_text() == "steer/steer.json"


def test_unfinished_run_is_refused(collect_run, tmp_path):
  with pytest.raises(SystemExit, match="report.json not found"):
    collect_run.collect(tmp_path / "missing", tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_restore_puts_an_evaluated_run_back_where_the_run_keeps_it(collect_run, tmp_path):
  run = tmp_path / "run"
  for name in ("config.json", "metrics.jsonl", "steer/steer.json", "eval/xstest.jsonl", "eval/xstest.settings.json",
               "kernels/kernel_step_32.json", "baseline-stl/eval/xstest.jsonl", "checkpoints/align/2/state"):
    write(run / name, name)
  write(run / "report.json", '{"eval_summary": {"safety": 0.5}}')
  write(run / "baseline-stl/report.json", '{"eval_summary": {}}')
  collect_run.collect(run, tmp_path / "results")
  back = tmp_path / "back"
  restored = collect_run.restore(tmp_path / "results", back)
  names = sorted(str(p.relative_to(back)) for p in restored)
  assert names == ["baseline-stl/eval/xstest.jsonl", "baseline-stl/report.json", "config.json",
                   "eval/xstest.jsonl", "eval/xstest.settings.json", "kernels/kernel_step_32.json", "metrics.jsonl",
                   "report.json", "steer/steer.json"]
  for name in names:
    assert (back / name).read_text() == (run / name).read_text()
  assert collect_run.restore(tmp_path / "results", back) == []  # a run already there is never overwritten


def test_restore_skips_a_run_that_was_not_evaluated(collect_run, tmp_path):
  write(tmp_path / "results" / "report.json", '{"model": {}}')
  assert collect_run.restore(tmp_path / "results", tmp_path / "back") == []
  assert not (tmp_path / "back").exists()
