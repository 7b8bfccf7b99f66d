"""Running a test module on 8 fake CPU devices, even inside a pytest process whose JAX already has one.

Import this before jax in the module. If JAX was started earlier with fewer devices, `rerun_in_child(__file__)`
reruns the module in a child process with the flag set.
"""

import os
import subprocess
import sys
from pathlib import Path

FLAG = "--xla_force_host_platform_device_count=8"
CHILD = "DCR_EIGHT_DEVICE_CHILD"
if "jax" not in sys.modules and FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAG}".strip()

import jax  # noqa: E402

EIGHT = jax.device_count() == 8
IN_CHILD = os.environ.get(CHILD) == "1"


def rerun_in_child(test_file: str) -> None:
  """Runs `test_file` under pytest with 8 devices; fails unless every test there passed."""
  env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FLAG}".strip(), CHILD: "1"}
  root = Path(__file__).resolve().parents[1]
  proc = subprocess.run([sys.executable, "-m", "pytest", test_file, "-q", "-rs", "-p", "no:cacheprovider"], cwd=root,
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
  assert " passed" in proc.stdout and "8-device child" not in proc.stdout, proc.stdout[-3000:]
