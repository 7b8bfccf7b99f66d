"""Two local processes x 4 fake CPU devices (gloo collectives on loopback) equal one 8-device process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import final_stage_params

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--config=configs/tiny.py", "--config.stages=refine,align", "--config.refine.steps=4",
        "--config.align.steps=4", "--config.checkpoint.every=2", "--config.refine.probe=False",
        "--config.refine.log_every=1", "--config.align.log_every=1"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir, processes, devices_per_process, extra=()):
  port = free_port()
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
         "JAX_PLATFORMS": "cpu"}
  procs = []
  for pid in range(processes):
    dist = [] if processes == 1 else [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                                      f"--config.distributed.num_processes={processes}",
                                      f"--config.distributed.process_id={pid}",
                                      "--config.distributed.heartbeat_timeout=10"]
    procs.append(subprocess.Popen([sys.executable, "-m", "dcr_jax.main", *ARGS, *dist, *extra,
                                   f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def losses(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [(r["stage"], r["step"], r["loss"]) for r in rows]


def test_two_processes_equal_one_eight_device_process(tmp_path):
  single = launch(tmp_path / "single", 1, 8)
  assert single[0].wait(timeout=600) == 0, single[0].stderr.read()[-3000:]
  procs = launch(tmp_path / "multi", 2, 4)
  for p in procs:
    assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
  ours, theirs = losses(tmp_path / "multi"), losses(tmp_path / "single")
  assert [r[:2] for r in ours] == [r[:2] for r in theirs]
  np.testing.assert_allclose([r[2] for r in ours], [r[2] for r in theirs], rtol=1e-5)
  a, b = final_stage_params(tmp_path / "multi"), final_stage_params(tmp_path / "single")
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_allclose(a[key], b[key], atol=1e-4, rtol=1e-4, err_msg=key)  # Adam: ~0 grads' noise


def committed_align_steps(workdir):
  directory = workdir / "checkpoints" / "align"
  return [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []


@pytest.mark.slow
def test_killing_one_process_fails_both_and_rerun_resumes(tmp_path):
  workdir = tmp_path / "multi"
  procs = launch(workdir, 2, 4, extra=["--config.align.steps=40"])
  deadline = time.time() + 300
  while time.time() < deadline and not committed_align_steps(workdir) and procs[1].poll() is None:
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGKILL)
  survivor = procs[0].wait(timeout=300)
  assert survivor != 0 and procs[1].wait() != 0
  message = procs[0].stderr.read()
  assert "process" in message.lower() or "heartbeat" in message.lower(), message[-2000:]
  saved = ocp.CheckpointManager((workdir / "checkpoints" / "align").resolve()).latest_step()
  assert saved is not None and saved >= 2
  procs = launch(workdir, 2, 4, extra=["--config.align.steps=40"])
  for p in procs:
    assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
  report = json.loads((workdir / "report.json").read_text())
  assert report["stages"]["align"]["resumed_from"] == saved
