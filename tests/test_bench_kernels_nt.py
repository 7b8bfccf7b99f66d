"""bench/kernels_nt.py --smoke end to end: neural-tangents' empirical_ntk_fn (its own venv, in a subprocess) on the
re-implemented tiny Gemma 3 agrees with our structured eNTK. Skipped where the peer's venv is absent."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NT_PYTHON = os.environ.get("NT_PYTHON", str(ROOT / ".nt-venv" / "bin" / "python"))  # made by `make nt-venv`


@pytest.mark.slow
@pytest.mark.skipif(not Path(NT_PYTHON).exists(), reason=f"no neural-tangents venv at {NT_PYTHON} (set NT_PYTHON)")
def test_smoke_agrees_with_neural_tangents(tmp_path):
  out = tmp_path / "kernels_nt_smoke.json"
  proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels_nt.py"), "--smoke", "--nt-python", NT_PYTHON,
                         "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  data = json.loads(out.read_text())
  assert data["smoke"] and data["summary"]["all_agree"]
  (case,) = data["cases"]
  assert case["kernel_shape"] == [4, 4, 3, 3]
  assert case["logits_max_abs_diff"] < 1e-4
  assert set(case["max_rel_err"]) == {"JACOBIAN_CONTRACTION", "NTK_VECTOR_PRODUCTS", "STRUCTURED_DERIVATIVES"}
  assert max(case["max_rel_err"].values()) < 1e-4
  assert case["ours"]["wall_s"] > 0 and case["nt_best_over_ours"] > 0
