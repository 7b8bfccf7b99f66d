"""The `demo` stage: greedy completions of a few prompts, to check that a model loads and speaks."""

from __future__ import annotations

import time

from dcr_jax.evaluate.generate import generate
from dcr_jax.pipeline import Context, write_json
from dcr_jax.weights import encode_chat, stop_token_ids


def prepare_demo(config, tokenizer, model_config) -> dict:
  """Nothing to load: the prompts live in the config."""
  return {}


def run_demo(ctx: Context, prepared: dict) -> dict:
  """Writes DIR/demo.json with one greedy completion per config.demo.prompts entry."""
  start = time.time()
  prompts = list(ctx.config.demo.prompts)
  ids = [encode_chat(ctx.tokenizer, p)[0] for p in prompts]
  outputs = generate(ctx.model, ids, max_new_tokens=ctx.config.demo.max_new_tokens,
                     stop_ids=stop_token_ids(ctx.tokenizer), pad_id=ctx.tokenizer.pad_token_id)
  rows = [{"prompt": p, "completion": ctx.tokenizer.decode(o, skip_special_tokens=True)}
          for p, o in zip(prompts, outputs)]
  write_json(ctx.workdir / "demo.json", rows)
  return {"steps": 0, "final_loss": None, "seconds": round(time.time() - start, 2), "prompts": len(rows)}
