"""Two local processes x 4 fake CPU devices (gloo collectives on loopback), killed and resumed, equal one 8-device
process."""

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import final_stage_params, xla_env

ROOT = Path(__file__).resolve().parents[2]
ALIGN_STEPS = 8  # checkpoints every 2: the kill lands well before the end
ARGS = ["--config=configs/tiny.py", "--config.stages=refine,align", "--config.refine.steps=4",
        f"--config.align.steps={ALIGN_STEPS}", "--config.checkpoint.every=2", "--config.refine.probe=False",
        "--config.refine.log_every=1", "--config.align.log_every=1"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir, processes, devices_per_process, extra=(), env=None):
  port = free_port()
  env = xla_env(devices_per_process, JAX_PLATFORMS="cpu", **(env or {}))
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


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """One persistent compilation cache for the module's launches: every 2 x 4 launch after the first compiles
  nothing (the same programs on the same topology)."""
  return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def losses(workdir):
  """(stage, step, loss) per logged step; where a resumed run logged a step again, its last row."""
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  last = {(r["stage"], r["step"]): r["loss"] for r in rows}
  return [(stage, step, loss) for (stage, step), loss in last.items()]


def committed_align_steps(workdir):
  directory = workdir / "checkpoints" / "align"
  return [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []


# What the survivor prints when its peer dies (XLA's fatal log line, then abort): the run stops on every host.
DIED = ("Terminating process because the JAX distributed service detected fatal errors. This most likely indicates "
        "that another task died; see the other task logs for more details.")
UNHEALTHY = "UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n1\n"


def kill_process_1_after_first_align_checkpoint(workdir, procs) -> int:
  """SIGKILLs process 1 once an align checkpoint is committed; checks both end and what the user reads; returns the
  latest saved step."""
  deadline = time.time() + 300
  while time.time() < deadline and not committed_align_steps(workdir) and procs[1].poll() is None:
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGKILL)
  survivor = procs[0].wait(timeout=300)
  assert survivor == -signal.SIGABRT and procs[1].wait() == -signal.SIGKILL
  message = procs[0].stderr.read()
  xla_log = [line for line in message.splitlines() if re.match(r"[EFW]\d{4} ", line)]  # XLA's error/fatal lines
  assert DIED in message and UNHEALTHY in message, "\n".join(xla_log)[-3000:] or message[-3000:]
  saved = ocp.CheckpointManager((workdir / "checkpoints" / "align").resolve()).latest_step()
  assert saved is not None and 2 <= saved < ALIGN_STEPS
  return saved


def test_two_processes_killed_and_resumed_equal_one_eight_device_process(tmp_path, compile_cache):
  """1 x 8 devices straight through, against 2 x 4 whose process 1 is SIGKILLed in stage 2 (both processes end, with
  the message a user sees) and which is then relaunched: it resumes from the checkpoint and every logged loss and
  the final parameters equal the uninterrupted run's. The relaunch compiles nothing (persistent cache)."""
  single = launch(tmp_path / "single", 1, 8)
  assert single[0].wait(timeout=600) == 0, single[0].stderr.read()[-3000:]
  workdir = tmp_path / "multi"
  saved = kill_process_1_after_first_align_checkpoint(workdir, launch(workdir, 2, 4, env=compile_cache))
  procs = launch(workdir, 2, 4, env=compile_cache)
  for p in procs:
    assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
  report = json.loads((workdir / "report.json").read_text())
  assert report["stages"]["align"]["resumed_from"] == saved and report["stages"]["align"]["steps"] == ALIGN_STEPS
  ours, theirs = losses(workdir), losses(tmp_path / "single")
  assert [r[:2] for r in ours] == [r[:2] for r in theirs]
  np.testing.assert_allclose([r[2] for r in ours], [r[2] for r in theirs], rtol=1e-5)
  a, b = final_stage_params(workdir), final_stage_params(tmp_path / "single")
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_allclose(a[key], b[key], atol=1e-4, rtol=1e-4, err_msg=key)  # Adam: ~0 grads' noise
