"""python -m dcr_jax.kernels on a tiny trained Llama-family workdir: every checkpoint measured, JSON + PNGs,
resumable."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config=configs/tiny.py:llama", "--config.refine.steps=4", "--config.align.steps=4",
        "--config.checkpoint.every=2", "--config.checkpoint.keep=5", "--config.refine.probe=False", "--config.evaluate.n=4",
        "--config.evaluate.max_new_tokens=4", "--config.evaluate.batch_size=4",
        "--config.kernels.n_per_group=2", "--config.kernels.top_k=3", "--config.kernels.chunk_size=2",
        "--config.align.lora_targets=q, v"]  # a spaced list: trains, and kernels read it the same way


def run(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_tracks_base_and_every_checkpoint_and_rejects_unknown_steps(tmp_path):
  workdir = tmp_path / "dcr"
  trained = run("dcr_jax.main", *TINY, f"--workdir={workdir}")  # a tiny Llama end to end: refine, align, evaluate
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert json.loads((workdir / "report.json").read_text())["eval"]["demo-harmful"]["n"] == 4
  result = run("dcr_jax.kernels", *TINY, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  data = json.loads((workdir / "kernels" / "similarity.json").read_text())
  labels = [e["label"] for e in data["entries"]]
  assert labels == ["base", "refine-2", "refine-4", "align-2", "align-4"]
  for entry in data["entries"]:
    assert entry["groups"] == ["seemingly_toxic", "toxic", "general"]
    assert all(len(row) == 3 for row in entry["ratio"]) and set(entry["refusal_prob"]) == set(entry["groups"])
    assert (workdir / "kernels" / f"heatmap-{entry['label']}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert data["entries"][0]["ratio"] != data["entries"][2]["ratio"]  # stage 1 changed the kernel
  assert (workdir / "kernels" / "tracking.png").is_file()
  report = json.loads((workdir / "report.json").read_text())
  assert report["kernels"]["entries"] == 5
  before = (workdir / "kernels" / "similarity.json").read_text()
  again = run("dcr_jax.kernels", *TINY, f"--workdir={workdir}", f"--compare={workdir}")
  assert again.returncode == 0, again.stderr[-2000:]
  assert json.loads((workdir / "kernels" / "similarity.json").read_text())["entries"] == json.loads(before)["entries"]
  result = run("dcr_jax.kernels", *TINY, f"--workdir={workdir}", "--checkpoints=3,99")
  assert result.returncode == 2 and "99" in result.stderr.strip().splitlines()[-1]
