"""Shared test options: slow tests are opt-in with --runslow; shared data is found beside the checkout."""

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One persistent XLA compilation cache for the session, inherited by every `dcr_jax.main` the tests launch: the
# tiny configs' steps compile once, not once per process (set before JAX is imported; a test may point elsewhere).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dcr_jax_test_xla_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# The suite compiles several hundred small programs, so compile time dominates it: XLA's cheaper CPU code
# generation (same semantics) cuts it by about a quarter. Inherited by the processes tests launch; a test that needs
# more devices appends its flag (tests/multidevice.py, `helpers.xla_env`).
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
                                    "--xla_llvm_disable_expensive_passes=true"]).strip()

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow"):
    return
  skip = pytest.mark.skip(reason="slow: opt in with --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
