"""bench/device.py --smoke: the accelerator benchmark runs end to end on a CPU with tiny shapes and records every
part (the real run happens on a GPU/TPU; see bench/device.sh)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.slow
def test_device_bench_smoke_writes_every_part(tmp_path):
  import device

  out = tmp_path / "device.json"
  device.main(["--smoke", "--out", str(out)])
  report = json.loads(out.read_text())
  results = report["results"]
  assert report["smoke"] and set(results) == {"mfu", "stage1", "generate", "entk"}
  for name in ("tiny-qwen2", "tiny-gemma3"):
    r = results["mfu"][name]
    assert r["median_s"] > 0 and r["model_tflops_per_step"] > 0 and r["tokens_per_s"] > 0
  assert 0 < results["stage1"]["half_over_full"] < 1.5
  assert results["generate"]["ours"]["tokens_per_s"] > 0
  entk = results["entk"]
  assert entk["kernel_shape"] == [entk["prompts"], entk["prompts"], entk["top_k"], entk["top_k"]]
  assert entk["asymmetry"] < 1e-4 and entk["min_over_max_eigenvalue"] > -1e-4  # a Gram matrix: symmetric, PSD
