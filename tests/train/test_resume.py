"""Crash safety: SIGKILL mid-stage then re-run gives bitwise-identical final params; torn saves; NaN guard."""

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import struct

from dcr_jax.checkpoints import manager as checkpoint_manager
from dcr_jax.train.loop import MetricsWriter, TrainingDiverged, train_loop
from helpers import final_stage_params

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--config=configs/tiny.py", "--config.refine.steps=9", "--config.align.steps=9",
        "--config.checkpoint.every=2", "--config.refine.log_every=1", "--config.align.log_every=1",
        "--config.refine.probe=False"]


def start(workdir):
  return subprocess.Popen([sys.executable, "-m", "dcr_jax.main", *ARGS, f"--workdir={workdir}"], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def logged(workdir, stage, step) -> bool:
  path = workdir / "metrics.jsonl"
  if not path.is_file():
    return False
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return any(r["stage"] == stage and r["step"] >= step for r in rows)


@pytest.mark.slow  # over the default run's 15-minute budget; make test-all runs it
def test_sigkill_twice_then_resume_is_bitwise_identical(tmp_path):
  reference = tmp_path / "reference"
  proc = start(reference)
  assert proc.wait(timeout=600) == 0, proc.stderr.read()
  rng = np.random.default_rng(int(time.time()))
  kills = [("refine", int(rng.integers(1, 8))), ("align", int(rng.integers(1, 8)))]  # one in each stage
  resumed = tmp_path / "resumed"
  for stage, step in kills:
    proc = start(resumed)
    deadline = time.time() + 300
    while not logged(resumed, stage, step) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    assert proc.poll() is None, f"run ended before the kill at {stage} step {step}: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  proc = start(resumed)
  assert proc.wait(timeout=600) == 0, proc.stderr.read()
  ours, theirs = final_stage_params(resumed), final_stage_params(reference)
  assert ours.keys() == theirs.keys()
  for key in ours:
    assert ours[key].tobytes() == theirs[key].tobytes(), (key, kills)
  report = json.loads((resumed / "report.json").read_text())
  assert report["stages"]["align"]["steps"] == 9


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
  script = textwrap.dedent(f"""
      import os, signal, numpy as np, orbax.checkpoint as ocp
      from dcr_jax.checkpoints import manager as checkpoint_manager
      from pathlib import Path
      manager = checkpoint_manager(Path({str(tmp_path)!r}), keep=3)
      manager.save(1, args=ocp.args.StandardSave({{"w": np.ones((4, 4), np.float32)}}))
      manager.wait_until_finished()
      manager.save(2, args=ocp.args.StandardSave({{"w": np.zeros((64, 1024, 1024), np.float32)}}))
      os.kill(os.getpid(), signal.SIGKILL)
  """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL
  manager = checkpoint_manager(tmp_path, keep=3)
  assert manager.latest_step() == 1
  restored = manager.restore(1, args=ocp.args.StandardRestore({"w": np.zeros((4, 4), np.float32)}))
  np.testing.assert_array_equal(restored["w"], np.ones((4, 4)))


class CountingState(struct.PyTreeNode):
  step: jax.Array
  w: jax.Array


def test_nan_loss_stops_with_the_step_and_keeps_last_good_checkpoint(tmp_path):
  def step_fn(state, batch):
    loss = jnp.where(state.step == 4, jnp.nan, 1.0)
    return CountingState(step=state.step + 1, w=state.w * 2), {"loss": loss}

  manager = checkpoint_manager(tmp_path / "ck", keep=2)
  with pytest.raises(TrainingDiverged) as e:
    train_loop(stage="align", step_fn=step_fn, state=CountingState(step=jnp.zeros((), jnp.int32), w=jnp.ones(3)),
               batch_fn=lambda i: {"mask": np.ones((1, 1))}, num_steps=10, manager=manager, save_every=2,
               log_every=1, writer=MetricsWriter(tmp_path, enabled=False), show_progress=False)
  assert "step 4" in str(e.value) and "\n" not in str(e.value)
  assert manager.latest_step() == 4
