"""The `evaluate` stage: generate on every configured suite, judge refusals, score, write eval/*.jsonl + report.

Resumable: each suite's JSONL is appended batch by batch, and prompts already there are not redone.
"""

from __future__ import annotations

import io
import json

import numpy as np
from etils import epath
from tqdm.auto import tqdm

from dcr_jax.errors import UserError
from dcr_jax.evaluate.generate import generate
from dcr_jax.evaluate.refusal import make_judge
from dcr_jax.evaluate.suites import get_suite, load_suite, safety_score, suite_metrics
from dcr_jax.weights.tokenizer import encode_chat, stop_token_ids
from dcr_jax.workdir_io import append_text, as_path, ensure_dir, is_remote


def suite_list(config) -> list[str]:
  """The suite names of config.evaluate.suites (each entry is NAME or NAME:N)."""
  return list(suite_sizes(config))


def suite_sizes(config) -> dict[str, int | None]:
  """Suite name -> prompts to evaluate: N from a `NAME:N` entry, else config.evaluate.n (0 or None = all)."""
  sizes = {}
  for entry in [s.strip() for s in str(config.evaluate.suites).split(",") if s.strip()]:
    name, _, count = entry.partition(":")
    if count and not count.isdigit():
      raise UserError(f"config.evaluate.suites: {entry!r}; write NAME or NAME:N with N a number of prompts")
    sizes[name] = int(count) if count else config.evaluate.n
  return {name: n or None for name, n in sizes.items()}


def prepare_evaluate(config, tokenizer, model_config) -> dict:
  """Loads every suite (and checks the judge) before anything is written; raises UserError naming the problem."""
  ec = config.evaluate
  sizes = suite_sizes(config)
  if not sizes:
    raise UserError("config.evaluate.suites is empty; name at least one suite (see README)")
  for name in sizes:
    get_suite(name)  # every name is checked before any data is read
  data_root = ec.data_root or None
  suites = {name: load_suite(name, data_root=data_root, n=n, seed=config.seed) for name, n in sizes.items()}
  return {"suites": suites, "judge": make_judge(ec.judge)}


def _done_rows(path: epath.PathLike) -> list[dict]:
  """Rows already written; a torn last line (crash mid-write) is dropped and the file truncated to the good part.
  (A remote object is written whole, so it cannot be torn; a bad tail there is cut by rewriting the object.)"""
  path = as_path(path)
  if not path.is_file():
    return []
  data = path.read_bytes()
  rows, good_bytes = [], 0
  for line in io.BytesIO(data):  # split on b'\n' only, as iterating the file did
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      break
    good_bytes += len(line)
  if good_bytes != len(data):
    if is_remote(path):
      path.write_bytes(data[:good_bytes])
    else:
      with open(path, "r+b") as f:
        f.truncate(good_bytes)
  return rows


def _append(path: epath.PathLike, rows: list[dict]) -> None:
  """Appends rows to the suite's JSONL (fsync'd locally). On gs://… the object is read and rewritten whole per batch
  (object stores cannot append): O(rows so far) per batch, small next to a batch of generation."""
  import jax

  if jax.process_index() != 0:  # every process generates (the model is sharded); process 0 writes
    return
  append_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), fsync=True)


def evaluate_suite(ctx, name: str, records: list[dict], judge, show_progress: bool = True) -> list[dict]:
  """Rows for one suite (prompt, label, category, generation, refused, refusal_prob), resuming DIR/eval/<name>.jsonl."""
  from dcr_jax.evaluate.refusal_prob import refusal_probability

  ec = ctx.config.evaluate
  path = as_path(ctx.workdir) / "eval" / f"{name}.jsonl"
  ensure_dir(path.parent)
  rows = _done_rows(path)
  done = {r["prompt"] for r in rows}
  todo = [r for r in records if r["prompt"] not in done]
  if not todo:
    return rows
  prompts_ids = [encode_chat(ctx.tokenizer, r["prompt"])[0] for r in todo]
  order = np.argsort([len(p) for p in prompts_ids], kind="stable")  # similar lengths share a bucket
  stops = stop_token_ids(ctx.tokenizer)
  b = ec.batch_size
  for start in tqdm(range(0, len(order), b), desc=f"eval {name}", disable=not show_progress, dynamic_ncols=True,
                    initial=len(rows) // b, total=(len(records) + b - 1) // b):
    chunk = [int(i) for i in order[start:start + b]]
    batch = [prompts_ids[i] for i in chunk]
    batch += [batch[0]] * (b - len(batch))  # a fixed batch shape: one compilation per length bucket
    outputs = generate(ctx.model, batch, max_new_tokens=ec.max_new_tokens, stop_ids=stops,
                       pad_id=ctx.tokenizer.pad_token_id, temperature=ec.temperature, top_p=ec.top_p,
                       seed=ctx.config.seed + start, bucket=ec.bucket)[:len(chunk)]
    texts = [ctx.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outputs]
    prompts = [todo[i]["prompt"] for i in chunk]
    refused = judge(prompts, texts)
    probs = (refusal_probability(ctx.model, ctx.tokenizer, prompts, batch_size=b) if ec.refusal_prob
             else [None] * len(chunk))
    new = [{"prompt": todo[i]["prompt"], "label": todo[i]["label"], "category": todo[i].get("category"),
            "generation": text, "refused": bool(r), "refusal_prob": None if p is None else float(p)}
           for i, text, r, p in zip(chunk, texts, refused, probs)]
    _append(path, new)
    rows += new
  return rows


def run_evaluate(ctx, prepared: dict) -> dict:
  """Evaluates the current model on every suite; fills report.json's `eval` and returns the stage summary."""
  import copy

  from dcr_jax.model import unstack_layers
  from dcr_jax.pipeline import is_main_process, update_report

  ctx = copy.copy(ctx)
  ctx.model = unstack_layers(ctx.model)  # so that decoding does not slice stacked params at every step
  results = {}
  for name, records in prepared["suites"].items():
    rows = evaluate_suite(ctx, name, records, prepared["judge"], show_progress=is_main_process())
    results[name] = suite_metrics(get_suite(name).kind, rows)
    update_report(ctx.workdir, "eval", name, results[name])
  over = [m["compliance_rate"] for m in results.values() if m["kind"] == "over_refusal"]
  summary = {"suites": len(results), "prompts": sum(m["n"] for m in results.values()),
             "safety": safety_score(results), "over_refusal_compliance": float(np.mean(over)) if over else None}
  update_report(ctx.workdir, "eval_summary", None, summary)
  return {"steps": 0, "final_loss": None, **summary}
