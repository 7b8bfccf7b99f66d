"""How close can two correct float32 implementations of gemma-3-270m be? Logit differences on real weights.

Loads the embedded gemma-3-270m GGUF (dequantised) into dcr_jax and into transformers (eager and sdpa attention),
in float32 and float64, and runs the same chat-templated prompts through each. Writes the largest |logit|
difference of every pair to bench/results/parity_270m.json:
  - ours vs transformers, float32 (what the export and parity tests compare);
  - transformers eager vs transformers sdpa, float32: two correct implementations in one library, which sets the
    scale of float32 reassociation on logits of this size;
  - ours vs transformers eager, float64: the same computation with rounding taken out, which shows whether any
    float32 gap is arithmetic or a difference of computation.

    .venv/bin/python bench/parity_270m.py [--model gemma3-270m] [--out bench/results/parity_270m.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, write_json  # noqa: E402

PROMPTS = ["How do I kill a Python process?", "What is the capital of France?", "Write a poem about the sea."]


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="gemma3-270m")
  p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "parity_270m.json"))
  args = p.parse_args(argv)

  import jax

  jax.config.update("jax_enable_x64", True)
  import numpy as np
  import torch
  from transformers import AutoModelForCausalLM
  from transformers.utils import logging as hf_logging

  from dcr_jax.weights import embedded_gguf_path, encode_chat, load_model

  hf_logging.set_verbosity_error()
  hf_logging.disable_progress_bar()
  started = time.perf_counter()
  path = embedded_gguf_path(args.model)
  logits, tokenizer = {}, None
  for dtype in ("float32", "float64"):
    model, tokenizer = load_model(args.model, dtype=dtype, progress=False)
    rows = [np.asarray([encode_chat(tokenizer, q)[0]], np.int32) for q in PROMPTS]
    logits[f"ours_{dtype}"] = [np.asarray(model(ids), np.float64) for ids in rows]
    del model
    torch_dtype = getattr(torch, dtype)
    for attention in ("eager", "sdpa") if dtype == "float32" else ("eager",):
      hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype,
                                                attn_implementation=attention).eval()
      with torch.no_grad():
        logits[f"hf_{attention}_{dtype}"] = [hf(torch.tensor(ids, dtype=torch.long)).logits.double().numpy()
                                             for ids in rows]
      del hf

  def largest(a: str, b: str) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(logits[a], logits[b]))

  pairs = {"ours_vs_hf_eager_float32": ("ours_float32", "hf_eager_float32"),
           "ours_vs_hf_sdpa_float32": ("ours_float32", "hf_sdpa_float32"),
           "hf_eager_vs_hf_sdpa_float32": ("hf_eager_float32", "hf_sdpa_float32"),
           "ours_vs_hf_eager_float64": ("ours_float64", "hf_eager_float64"),
           "ours_float32_vs_hf_eager_float64": ("ours_float32", "hf_eager_float64"),
           "hf_eager_float32_vs_hf_eager_float64": ("hf_eager_float32", "hf_eager_float64")}
  report = {
      "bench": "parity_270m",
      "config": {"model": args.model, "prompts": PROMPTS,
                 "tokens_per_prompt": [int(x.shape[1]) for x in logits["ours_float32"]]},
      "machine": machine_info(),
      "largest_abs_logit": max(float(np.abs(x).max()) for x in logits["hf_eager_float64"]),
      "max_abs_difference": {name: largest(a, b) for name, (a, b) in pairs.items()},
      "total_s": time.perf_counter() - started,
  }
  for name, value in report["max_abs_difference"].items():
    print(f"{name:40s} {value:.3e}")
  print(f"largest |logit| {report['largest_abs_logit']:.1f}")
  print(f"wrote {write_json(args.out, report)}")
  return report


if __name__ == "__main__":
  main()
