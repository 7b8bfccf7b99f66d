"""bench/others_busy.py and bench/record_pipeline.py: a whole-pipeline timing records the cores other processes kept
busy, and is marked contended from that measurement."""

import json
import subprocess
import sys

import pytest

from helpers import load_script

TIME_LOG = """\tUser time (seconds): 100.50
\tSystem time (seconds): 4.25
\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02:03
\tMaximum resident set size (kbytes): 2097152
"""




def test_watching_a_busy_child_counts_its_cpu_not_as_others(tmp_path):
  child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 2.0: pass"])
  result = load_script("bench/others_busy.py").main([str(child.pid), "--out", str(tmp_path / "busy.json"), "--every", "0.2"])
  child.wait()
  assert json.loads((tmp_path / "busy.json").read_text()) == result
  assert 0.8 <= result["process_cpu_s"] <= 2.5 and 0.8 <= result["watched_s"] <= 2.5
  # the machine's busy time includes the child's: what is left over is other processes (and this test's own polling)
  assert result["machine_busy_s"] >= result["process_cpu_s"] - 0.2 and result["others_busy"] > -0.2


@pytest.mark.parametrize("others, contended", [(0.05, False), (0.6, True)])
def test_record_marks_contended_from_the_measured_cores(tmp_path, monkeypatch, others, contended):
  record = load_script("bench/record_pipeline.py")
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "report.json").write_text(json.dumps({"stages": {"align": {"steps": 30}}}))
  (tmp_path / "time.log").write_text(TIME_LOG)
  (tmp_path / "busy.json").write_text(json.dumps({"others_busy": others}))
  out_dir = tmp_path / "results"
  out_dir.mkdir()
  monkeypatch.setattr(record, "__file__", str(tmp_path / "record_pipeline.py"))
  out = record.main(["--name", "t", "--workdir", str(workdir), "--time-log", str(tmp_path / "time.log"),
                     "--command", "python -m dcr_jax.main", "--load-at-start", "1.7 1.6 1.4",
                     "--others-busy-file", str(tmp_path / "busy.json")])
  assert out["contended"] is contended and out["wall_s"] == 3723 and out["peak_rss_mib"] == 2048
  assert f"other processes kept {others:.2f} cores busy" in out["note"] and "wall 62m03s" in out["note"]
  assert json.loads((out_dir / "pipeline_t.json").read_text())["contended"] is contended
  assert record.main(["--name", "t", "--workdir", str(workdir), "--time-log", str(tmp_path / "time.log"),
                      "--command", "c", "--load-at-start", "1.7 1.6 1.4"])["contended"]  # no measurement: the load
