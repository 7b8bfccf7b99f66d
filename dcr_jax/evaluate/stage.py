"""The generation stages: `evaluate` (generate on every configured suite, judge refusals, score, write
eval/*.jsonl + report) and `demo`; and the refusal-probability validation that training logs at each save.

Resumable: each suite's JSONL is appended batch by batch, and prompts already there are not redone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import zlib
from typing import TYPE_CHECKING, Callable

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from dcr_jax.data.batching import load_spec_list
from dcr_jax.evaluate.capability import HEADLINE, evaluate_capability
from dcr_jax.evaluate.generate import Steering, generate, with_decode_weights
from dcr_jax.evaluate.refusal import Judge, make_judge
from dcr_jax.evaluate.refusal_prob import refusal_probability
from dcr_jax.evaluate.suites import get_suite, load_suite, safety_score, suite_metrics
from dcr_jax.model import unstack_layers
from dcr_jax.weights.tokenizer import encode_chat, stop_token_ids
from dcr_jax.workdir_io import append_rows, as_path, ensure_dir, is_remote, read_rows, update_report, write_json

if TYPE_CHECKING:  # the spec is read, never built, here
  from dcr_jax.spec import Spec


@dataclasses.dataclass(frozen=True)
class EvaluateData:
  """The loaded suites (name -> records, in the configured order) and the refusal judge."""

  suites: dict[str, list[dict]]
  judge: Judge


def load_data(spec: Spec, tokenizer=None) -> EvaluateData:
  """Loads every configured suite (and makes the judge) before anything is written; raises UserError naming the
  problem."""
  ec = spec.evaluate
  suites = {name: load_suite(name, data_root=ec.data_root, n=n, seed=spec.seed, rows=rows)
            for name, n, rows in ec.suites}
  return EvaluateData(suites, make_judge(ec.judge))


ROW_SETTINGS = ("max_new_tokens", "temperature", "top_p", "judge", "refusal_prob")


def row_settings(spec: Spec, name: str, model_id: str = "") -> dict:
  """What shapes a suite's rows: the model evaluated (its checkpoint), the subsample (seed, n, data root), decoding
  and judging."""
  ec = spec.evaluate
  narrow = {"decode_weights": ec.decode_weights} if ec.decode_weights != "float32" else {}  # float32 rows keep keys
  _, n, rows = next((s for s in ec.suites if s[0] == name), (name, None, None))
  if rows is not None:  # no slice, no key: rows written before slices existed still resume
    narrow["rows"] = [rows.start, rows.stop, rows.step]
  return {"suite": name, "model": model_id, "seed": spec.seed, "n": n,
          "data_root": ec.data_root, **{key: getattr(ec, key) for key in ROW_SETTINGS}, **narrow}


def row_seed(seed: int, suite: str, prompt: str) -> int:
  """The sampling seed of one row: a function of (seed, suite, the row's prompt), wherever a resumed run starts."""
  return zlib.crc32(f"{seed}/{suite}/{prompt}".encode())


def _settings_path(path: epath.Path) -> epath.Path:
  return path.with_suffix(".settings.json")


def _start_or_resume(path: epath.Path, settings: dict) -> None:
  """Keeps DIR/eval/<suite>.jsonl when it was written under `settings`; else moves it (and its settings) aside to
  <suite>.<digest of its settings>.jsonl, so this run starts the suite afresh and earlier results stay intact."""
  sidecar = _settings_path(path)
  old = json.loads(sidecar.read_text()) if sidecar.is_file() else None
  if jax.process_index() == 0 and old != settings:
    if path.is_file():
      digest = hashlib.sha1(json.dumps(old, sort_keys=True).encode()).hexdigest()[:8]
      kept = path.parent / f"{path.stem}.{digest}.jsonl"
      changed = sorted(k for k in settings if (old or {}).get(k) != settings[k])
      logging.warning("eval %s: settings changed (%s); earlier rows kept in %s, starting afresh", path.stem,
                      ", ".join(changed), kept.name)
      _move(path, kept)
      if sidecar.is_file():
        _move(sidecar, _settings_path(kept))
    write_json(sidecar, settings)
  if jax.process_count() > 1:  # every process reads the rows only after process 0 has decided
    multihost_utils.sync_global_devices(f"eval-settings-{path.stem}")


def _move(source: epath.Path, target: epath.Path) -> None:
  """A rename locally; copy and delete on an object store (which cannot rename)."""
  if is_remote(source):
    target.write_bytes(source.read_bytes())
    source.unlink()
  else:
    source.rename(target)


def evaluate_suite(spec: Spec, model, tokenizer, workdir: epath.PathLike, name: str, records: list[dict], judge,
                   show_progress: bool = True, model_id: str = "", steering: Steering | None = None) -> list[dict]:
  """Rows for one suite (prompt, label, category, generation, refused, refusal_prob) of `records`, resuming
  DIR/eval/<name>.jsonl when it was written under the same settings (`row_settings`), else starting afresh.
  `steering` steers generation and the refusal probability alike (`model_id` must then name it)."""
  ec = spec.evaluate
  path = as_path(workdir) / "eval" / f"{name}.jsonl"
  ensure_dir(path.parent)
  _start_or_resume(path, row_settings(spec, name, model_id))
  wanted = {r["prompt"] for r in records}
  rows = [r for r in read_rows(path) if r["prompt"] in wanted]
  done = {r["prompt"] for r in rows}
  todo = [r for r in records if r["prompt"] not in done]
  if not todo:
    return rows
  prompts_ids = [encode_chat(tokenizer, r["prompt"])[0] for r in todo]
  decoder = model if ec.decode_weights == "float32" else with_decode_weights(model, ec.decode_weights)
  order = np.argsort([len(p) for p in prompts_ids], kind="stable")  # similar lengths share a bucket
  stops = stop_token_ids(tokenizer)
  b = ec.batch_size
  for start in tqdm(range(0, len(order), b), desc=f"eval {name}", disable=not show_progress, dynamic_ncols=True,
                    initial=len(rows) // b, total=(len(records) + b - 1) // b):
    chunk = [int(i) for i in order[start:start + b]]
    batch = [prompts_ids[i] for i in chunk]
    batch += [batch[0]] * (b - len(batch))  # a fixed batch shape: one compilation per length bucket
    seeds = [row_seed(spec.seed, name, todo[i]["prompt"]) for i in chunk]
    chosen = [todo[i] for i in chunk]
    prompts = [r["prompt"] for r in chosen]
    steer = _steer_batch(steering, prompts + [prompts[0]] * (b - len(chunk)), batch)
    outputs = generate(decoder, batch, max_new_tokens=ec.max_new_tokens, stop_ids=stops,
                       pad_id=tokenizer.pad_token_id, temperature=ec.temperature, top_p=ec.top_p,
                       seed=seeds + [seeds[0]] * (b - len(chunk)), bucket=ec.bucket, **steer)[:len(chunk)]
    texts = [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outputs]
    refused = judge(prompts, texts)
    probs = (refusal_probability(model, tokenizer, prompts, batch_size=b, steering=steering) if ec.refusal_prob
             else [None] * len(chunk))
    new = [{"prompt": r["prompt"], "label": r["label"], "category": r.get("category"), "generation": text,
            "refused": bool(verdict), "refusal_prob": None if p is None else float(p)}
           for r, text, verdict, p in zip(chosen, texts, refused, probs)]
    append_rows(path, new)
    rows += new
  return rows


def _steer_batch(steering: Steering | None, prompts: list[str], ids: list[list[int]]) -> dict:
  """`generate`'s steering arguments for one batch (prompt texts and ids in batch order)."""
  if steering is None:
    return {}
  return {"edits": steering.edits(prompts, ids) if steering.edits else (),
          "contrast": steering.contrast(prompts) if steering.contrast else None, "alpha": steering.alpha}


def run(spec: Spec, data: EvaluateData, model, tokenizer, workdir: epath.PathLike, model_id: str = "",
        steering: Steering | None = None) -> dict:
  """Evaluates `model` (`model_id` names its checkpoint, e.g. align-30, so rows of another model are never reused)
  on every suite and capability task, steered by `steering` when given (its label joins the model id); fills
  report.json's `eval` and returns the stage summary."""
  model = unstack_layers(model)  # so that decoding does not slice stacked params at every step
  if steering is not None:
    model_id = f"{model_id}+{steering.label}"
  results = {}
  for name, records in data.suites.items():
    rows = evaluate_suite(spec, model, tokenizer, workdir, name, records, data.judge,
                          show_progress=jax.process_index() == 0, model_id=model_id, steering=steering)
    results[name] = suite_metrics(get_suite(name).kind, rows)
    update_report(workdir, "eval", name, results[name])
  over = [m["compliance_rate"] for m in results.values() if m["kind"] == "over_refusal"]
  summary = {"model": model_id, "suites": len(results), "prompts": sum(m["n"] for m in results.values()),
             "safety": safety_score(results), "over_refusal_compliance": float(np.mean(over)) if over else None}
  ec = spec.evaluate
  if ec.capability:
    scores = evaluate_capability(model, tokenizer, ec.capability, data_root=ec.capability_root, n=ec.capability_n,
                                 seed=spec.seed, out_dir=as_path(workdir) / "eval", batch_size=ec.batch_size,
                                 tag=model_id, show_progress=jax.process_index() == 0)
    for task, metrics in scores.items():
      update_report(workdir, "capability", task, metrics)
    summary["capability"] = {task: metrics[HEADLINE[task]] for task, metrics in scores.items()}
  update_report(workdir, "eval_summary", None, summary)
  return {"steps": 0, "final_loss": None, **summary}


def run_demo(spec: Spec, model, tokenizer, workdir: epath.PathLike) -> dict:
  """The `demo` stage: writes DIR/demo.json with one greedy completion per config.demo.prompts entry."""
  start = time.time()
  prompts = list(spec.demo_prompts)
  ids = [encode_chat(tokenizer, p)[0] for p in prompts]
  outputs = generate(model, ids, max_new_tokens=spec.demo_max_new_tokens, stop_ids=stop_token_ids(tokenizer),
                     pad_id=tokenizer.pad_token_id)
  rows = [{"prompt": p, "completion": tokenizer.decode(o, skip_special_tokens=True)} for p, o in zip(prompts, outputs)]
  write_json(as_path(workdir) / "demo.json", rows)
  return {"steps": 0, "final_loss": None, "seconds": round(time.time() - start, 2), "prompts": len(rows)}


def load_validation(spec: Spec) -> dict[str, list[str]]:
  """Validation prompts by group from data.val_toxic / data.val_seemingly_toxic (n_val seeded each); {} if unset."""
  groups = {}
  for group in ("toxic", "seemingly_toxic"):
    sources = getattr(spec.data, f"val_{group}")
    if sources:
      records = load_spec_list(sources, label=group, n=spec.data.n_val, seed=spec.seed + 29, key=f"data.val_{group}")
      groups[group] = [r["prompt"] for r in records]
  return groups


def validator(groups: dict[str, list[str]], tokenizer) -> Callable[[object], dict] | None:
  """The training-time validation: the mean teacher-forced refusal probability of each group under a saved model,
  as `val_refusal_prob_<group>`; None without groups."""
  if not groups:
    return None

  def validate(model) -> dict:
    model = unstack_layers(model)
    return {f"val_refusal_prob_{group}": float(np.mean(refusal_probability(model, tokenizer, prompts, batch_size=32)))
            for group, prompts in groups.items()}

  return validate
