"""Capability scoring parity: dcr_jax.evaluate.capability against lm-evaluation-harness on the same questions.

The embedded gemma-3-270m is loaded by dcr_jax, exported with `dcr_jax.weights.export_hf` (plus its tokenizer) and
scored twice on a seeded subsample (default 100 MMLU 5-shot + 100 ARC-Challenge questions from ../shared/data):

- ours: `capability.evaluate_task` (JAX, KV cache, rows in --workdir);
- the harness: `lm_eval.simple_evaluate` with its HF backend on the exported directory, offline. Its own task YAMLs
  (arc_challenge, mmlu_<subject>) are included unchanged, with only the data source overridden: the same sampled
  questions written as JSON in the Hugging Face schema (`allenai/ai2_arc`, `cais/mmlu`, dev split for the shots).

Compared per question: the context string the harness built against ours, every choice's log-likelihood (max and
mean |difference|), the acc/acc_norm prediction, and the task accuracies. lm-eval is not a project dependency:
`pip install lm-eval` first.

    .venv/bin/python bench/capability_parity.py [--n 100] [--seed 0] [--out bench/results/capability_parity.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, write_json  # noqa: E402

import numpy as np  # noqa: E402

from dcr_jax.evaluate import capability  # noqa: E402

HARNESS_TASK = {"arc_challenge": "arc/arc_challenge.yaml"}  # MMLU: mmlu/default/mmlu_<subject>.yaml per subject


def arc_doc(question: dict, raw: dict) -> dict:
  """An ARC row in the `allenai/ai2_arc` schema from the upstream JSONL row."""
  choices = raw["question"]["choices"]
  return {"id": raw["id"], "question": raw["question"]["stem"], "answerKey": raw["answerKey"],
          "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}}


def mmlu_doc(row: list[str], subject: str, qid: str | None = None) -> dict:
  """An MMLU row in the `cais/mmlu` schema from the upstream CSV row."""
  question, *choices, answer = row
  return {"id": qid, "question": question, "subject": subject, "choices": choices,
          "answer": capability.LETTERS.index(answer.strip())}


def write_harness_tasks(folder: Path, questions: dict[str, list[dict]], data_root: Path) -> list[str]:
  """Task YAMLs (the harness's own, data source overridden) + JSONL data for the sampled questions; their names."""
  import lm_eval

  tasks_dir = Path(lm_eval.__file__).parent / "tasks"
  names = []

  def task(name: str, include: Path, files: dict[str, Path], extra: str = "") -> None:
    data = ", ".join(f"{split}: {json.dumps(str(path))}" for split, path in files.items())
    (folder / f"{name}.yaml").write_text(
      f"include: {json.dumps(str(include))}\ntask: {name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
      f"dataset_kwargs:\n  data_files: {{{data}}}\ntraining_split: null\nvalidation_split: null\ntest_split: test\n"
      + extra)
    names.append(name)

  def dump(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path

  if "arc_challenge" in questions:
    raw = {r["id"]: r for r in capability._jsonl(data_root / capability._FILES["arc_challenge"][0])}
    docs = [arc_doc(q, raw[q["id"]]) for q in questions["arc_challenge"]]
    task("parity_arc_challenge", tasks_dir / HARNESS_TASK["arc_challenge"],
         {"test": dump(folder / "arc_challenge.jsonl", docs)})
  if "mmlu" in questions:
    by_subject: dict[str, list[dict]] = {}
    for q in questions["mmlu"]:
      subject, index = q["id"].split("/")
      row = capability._csv_rows(data_root / f"mmlu/test/{subject}_test.csv")[int(index)]
      by_subject.setdefault(subject, []).append(mmlu_doc(row, subject, q["id"]))
    for subject, docs in sorted(by_subject.items()):
      dev = [mmlu_doc(row, subject) for row in capability._csv_rows(data_root / f"mmlu/dev/{subject}_dev.csv")]
      task(f"parity_mmlu_{subject}", tasks_dir / f"mmlu/default/mmlu_{subject}.yaml",
           {"test": dump(folder / f"mmlu_{subject}_test.jsonl", docs),
            "dev": dump(folder / f"mmlu_{subject}_dev.jsonl", dev)}, "fewshot_split: dev\nnum_fewshot: 5\n")
  return names


def run_harness(export_dir: Path, folder: Path, names: list[str], batch_size: int) -> dict[str, dict]:
  """question id -> {context, loglik, acc, acc_norm} from lm-eval's HF backend on the exported model."""
  import lm_eval
  from lm_eval.tasks import TaskManager

  out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export_dir},dtype=float32",
                                tasks=names, task_manager=TaskManager(include_path=str(folder)),
                                batch_size=batch_size, device="cpu", log_samples=True)
  rows = {}
  for name in names:
    for sample in out["samples"][name]:
      qid = sample["doc"]["id"]
      rows[qid] = {"context": sample["arguments"][0][0], "continuations": [a[1] for a in sample["arguments"]],
                   "loglik": [float(r[0][0]) for r in sample["resps"]], "acc": float(sample["acc"]),
                   "acc_norm": float(sample.get("acc_norm", sample["acc"]))}
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=100)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tasks", default="mmlu,arc_challenge")
  parser.add_argument("--batch-size", type=int, default=8, help="questions per batch on our side")
  parser.add_argument("--harness-batch-size", type=int, default=1,
                      help="lm-eval HF batch; its [B T V] float32 logits at V=262k take ~1 GB per row and 800 tokens")
  parser.add_argument("--data-root", default=str(capability.DEFAULT_DATA_ROOT))
  parser.add_argument("--workdir", default=None, help="keeps the export and our rows (default: a temp folder)")
  parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "capability_parity.json"))
  args = parser.parse_args()

  import lm_eval

  from dcr_jax import load_model
  from dcr_jax.weights import export_hf

  data_root = Path(args.data_root)
  names = capability.check_tasks(args.tasks, data_root)
  workdir = Path(args.workdir or tempfile.mkdtemp(prefix="capability_parity_"))
  model, tokenizer = load_model("gemma3-270m", progress=False)
  export_dir = export_hf(model, workdir / "export")
  tokenizer.save_pretrained(str(export_dir))
  questions = {name: capability.load_task(name, data_root, n=args.n, seed=args.seed) for name in names}

  ours, seconds = {}, {}
  for name in names:
    start = time.perf_counter()
    metrics = capability.evaluate_task(model, tokenizer, name, questions[name], batch_size=args.batch_size,
                                       out_path=workdir / f"capability-{name}.jsonl")
    seconds[f"ours_{name}"] = time.perf_counter() - start
    rows = {r["id"]: r for r in map(json.loads, (workdir / f"capability-{name}.jsonl").read_text().splitlines())}
    ours[name] = {"metrics": metrics, "rows": rows}

  harness_dir = workdir / "harness_tasks"
  harness_dir.mkdir(exist_ok=True)
  start = time.perf_counter()
  del model  # the harness's full [B T V] logits need the memory
  theirs = run_harness(export_dir, harness_dir, write_harness_tasks(harness_dir, questions, data_root),
                       args.harness_batch_size)
  seconds["harness_all"] = time.perf_counter() - start

  report = {"model": "gemma3-270m (embedded GGUF, exported with dcr_jax.weights.export_hf)", "n": args.n,
            "seed": args.seed, "lm_eval_version": lm_eval.__version__, "seconds": seconds, "tasks": {}}
  for name in names:
    diffs, same_context, same_pred, same_pred_norm = [], 0, 0, 0
    acc, acc_norm = [], []
    for q in questions[name]:
      mine, ref = ours[name]["rows"][q["id"]], theirs[q["id"]]
      same_context += ref["context"] == q["context"] and ref["continuations"] == [" " + c for c in q["choices"]]
      diffs += [abs(a - b) for a, b in zip(mine["loglik"], ref["loglik"])]
      same_pred += mine["acc"] == ref["acc"] and int(np.argmax(mine["loglik"])) == int(np.argmax(ref["loglik"]))
      per_char = lambda lls: int(np.argmax(np.asarray(lls) / np.asarray(mine["chars"], float)))  # noqa: E731
      same_pred_norm += per_char(mine["loglik"]) == per_char(ref["loglik"])
      acc.append(ref["acc"])
      acc_norm.append(ref["acc_norm"])
    metrics = ours[name]["metrics"]
    report["tasks"][name] = {
      "n": len(questions[name]), "ours": {"acc": metrics["acc"], "acc_norm": metrics["acc_norm"]},
      "harness": {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))},
      "same_context_and_continuations": int(same_context), "same_prediction_acc": int(same_pred),
      "same_prediction_acc_norm": int(same_pred_norm), "loglik_max_abs_diff": float(max(diffs)),
      "loglik_mean_abs_diff": float(np.mean(diffs)), "choices_compared": len(diffs)}
  report["machine"] = machine_info()
  write_json(args.out, report)
  print(json.dumps(report["tasks"], indent=2))


if __name__ == "__main__":
  main()
