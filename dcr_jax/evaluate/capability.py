"""General-capability multiple-choice benchmarks, scored as lm-evaluation-harness scores them (base model, no chat
template).

Tasks (``TASKS``) read the upstream files under a data root (default ``../shared/data/capability`` beside the
project; its README names files, sources and conventions):

| task | file(s) under the data root | context | choices | gold |
|---|---|---|---|---|
| ``mmlu`` | ``mmlu/test/<subject>_test.csv`` + ``mmlu/dev/<subject>_dev.csv`` (57 subjects, CSV without header) | description line + 5 dev shots + ``{question}\\nA. …\\nD. …\\nAnswer:`` | ``A`` … ``D`` | answer letter |
| ``arc_easy``, ``arc_challenge`` | ``arc_*/ARC-*-Test.jsonl`` | ``Question: {stem}\\nAnswer:`` | answer texts | ``answerKey`` |
| ``openbookqa`` | ``openbookqa/test.jsonl`` | the bare stem | answer texts | ``answerKey`` |
| ``piqa`` | ``piqa/valid.jsonl`` + ``piqa/valid-labels.lst`` | ``Question: {goal}\\nAnswer:`` | ``sol1``, ``sol2`` | label |
| ``truthfulqa_mc1`` | ``truthfulqa/mc_task.json`` | the harness's 6-shot QA primer + ``\\n\\nQ: {question}\\nA:`` | ``mc1_targets`` keys | the one marked 1 |

Scoring (the harness's ``multiple_choice`` output type): each choice is the continuation ``" " + choice`` (target
delimiter one space). As the harness's HF backend does, the context is tokenized alone and the continuation is the
tail of the tokenized context + continuation beyond the context's length, with the tokenizer's default special tokens
(Gemma: a BOS). ``acc`` is 1 when the gold choice has the largest summed log-likelihood, ``acc_norm`` when it has the
largest log-likelihood per character of the choice (first index wins ties, as ``np.argmax``). The harness reports
only ``acc`` for MMLU and TruthfulQA-MC1; ``acc_norm`` is computed the same way for every task (for MMLU's one-letter
choices it equals ``acc``).

Each question's context runs once into a KV cache; every choice continues it (``refusal_prob.prefill`` /
``continue_from``). The first token of all choices is scored from one vocabulary-head row per question; the later
tokens of all choices are packed so that the head runs on real tokens only, and logits exist only in [B 8 V] chunks
(``refusal_prob.head_log_probs``). Context length, continuation width, choice count and packed token count are
bucketed, so a task compiles a few shapes.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from dcr_jax.errors import UserError
from dcr_jax.evaluate.generate import bucket_length, left_pad
from dcr_jax.evaluate.refusal_prob import _HEAD_CHUNK, continue_from, head_log_probs, prefill
from dcr_jax.workdir_io import append_rows, as_path, ensure_dir, read_rows, write_text_atomic

TASKS = ("mmlu", "arc_easy", "arc_challenge", "openbookqa", "piqa", "truthfulqa_mc1")
# The metric papers and the Open LLM Leaderboard quote per task (normalised accuracy where the harness reports it).
HEADLINE = {"mmlu": "acc", "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm",
            "piqa": "acc_norm", "truthfulqa_mc1": "acc"}
DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[3] / "shared" / "data" / "capability"
FORMAT = "lm-eval-0.4 multiple_choice v1"  # part of every row's key: change it when prompts or tokenization change

MMLU_SUBJECTS = (
  "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
  "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
  "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
  "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
  "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
  "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
  "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
  "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
  "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
  "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
  "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
  "world_religions",
)
MMLU_SHOTS = 5
LETTERS = ("A", "B", "C", "D")

# lm-evaluation-harness tasks/truthfulqa/truthfulqa_mc1.yaml: the QA primer of Lin et al. (2021), 0 further shots.
TRUTHFULQA_PRIMER = (
  "Q: What is human life expectancy in the United States?\n"
  "A: Human life expectancy in the United States is 78 years.\n\n"
  "Q: Who was president of the United States in 1955?\n"
  "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
  "Q: Which party did he belong to?\n"
  "A: He belonged to the Republican Party.\n\n"
  "Q: What is the square root of banana?\n"
  "A: I have no comment.\n\n"
  "Q: How does a telescope work?\n"
  "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
  "Q: Where were the 1992 Olympics held?\n"
  "A: The 1992 Olympics were held in Barcelona, Spain."
)

_FILES = {
  "mmlu": tuple(f"mmlu/{split}/{s}_{split}.csv" for s in MMLU_SUBJECTS for split in ("test", "dev")),
  "arc_easy": ("arc_easy/ARC-Easy-Test.jsonl",),
  "arc_challenge": ("arc_challenge/ARC-Challenge-Test.jsonl",),
  "openbookqa": ("openbookqa/test.jsonl",),
  "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
  "truthfulqa_mc1": ("truthfulqa/mc_task.json",),
}


def _csv_rows(path: Path) -> list[list[str]]:
  """Rows of an MMLU CSV (no header; CRLF or LF, quoted fields may hold line breaks)."""
  with open(path, newline="", encoding="utf-8") as f:
    return [row for row in csv.reader(f) if row]


def _jsonl(path: Path) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _mmlu_item(row: Sequence[str]) -> str:
  question, *choices, _ = row
  return question.strip() + "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, choices)) + "\nAnswer:"


def _load_mmlu(root: Path) -> list[dict]:
  """5-shot MMLU: per subject, the description line, the first 5 dev rows with their answers, then the question."""
  questions = []
  for subject in MMLU_SUBJECTS:
    shots = _csv_rows(root / f"mmlu/dev/{subject}_dev.csv")[:MMLU_SHOTS]
    prefix = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    prefix += "".join(f"{_mmlu_item(row)} {row[-1].strip()}\n\n" for row in shots)
    for i, row in enumerate(_csv_rows(root / f"mmlu/test/{subject}_test.csv")):
      questions.append({"id": f"{subject}/{i}", "context": prefix + _mmlu_item(row), "choices": list(LETTERS),
                        "gold": LETTERS.index(row[-1].strip())})
  return questions


def _load_ai2(path: Path, template: str) -> list[dict]:
  """ARC / OpenBookQA JSONL: `template` formats the stem; choices in file order; gold = index of answerKey."""
  questions = []
  for row in _jsonl(path):
    choices = row["question"]["choices"]
    labels = [c["label"] for c in choices]
    questions.append({"id": row["id"], "context": template.format(row["question"]["stem"]),
                      "choices": [c["text"] for c in choices], "gold": labels.index(row["answerKey"].strip())})
  return questions


def _load_piqa(root: Path) -> list[dict]:
  rows = _jsonl(root / "piqa/valid.jsonl")
  labels = (root / "piqa/valid-labels.lst").read_text(encoding="utf-8").split()
  if len(labels) != len(rows):
    raise UserError(f"{root / 'piqa/valid-labels.lst'}: {len(labels)} labels for {len(rows)} questions in "
                    f"valid.jsonl; use the matching pair from the PIQA release")
  return [{"id": str(i), "context": f"Question: {row['goal']}\nAnswer:", "choices": [row["sol1"], row["sol2"]],
           "gold": int(label)} for i, (row, label) in enumerate(zip(rows, labels))]


def _load_truthfulqa(root: Path) -> list[dict]:
  with open(root / "truthfulqa/mc_task.json", encoding="utf-8") as f:
    rows = json.load(f)
  return [{"id": str(i), "context": f"{TRUTHFULQA_PRIMER}\n\nQ: {row['question']}\nA:",
           "choices": list(row["mc1_targets"]), "gold": list(row["mc1_targets"].values()).index(1)}
          for i, row in enumerate(rows)]


_LOADERS = {
  "mmlu": _load_mmlu,
  "arc_easy": lambda root: _load_ai2(root / _FILES["arc_easy"][0], "Question: {}\nAnswer:"),
  "arc_challenge": lambda root: _load_ai2(root / _FILES["arc_challenge"][0], "Question: {}\nAnswer:"),
  "openbookqa": lambda root: _load_ai2(root / _FILES["openbookqa"][0], "{}"),
  "piqa": _load_piqa,
  "truthfulqa_mc1": _load_truthfulqa,
}


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
  """Task names from a comma-separated string or a list (blanks dropped, order kept, duplicates removed)."""
  names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
  return list(dict.fromkeys(t.strip() for t in names if t.strip()))


def check_tasks(tasks: str | Sequence[str], data_root: str | os.PathLike | None = None) -> list[str]:
  """The task names, after checking that each is known and that its files exist under `data_root` (UserError)."""
  root = Path(data_root or DEFAULT_DATA_ROOT).expanduser()
  names = parse_tasks(tasks)
  for name in names:
    if name not in TASKS:
      raise UserError(f"unknown capability task {name!r}; known tasks: {', '.join(TASKS)}")
  for name in names:
    for rel in _FILES[name]:
      if not (root / rel).is_file():
        raise UserError(f"capability task {name}: missing file {root / rel}; copy the upstream file there (see "
                        f"shared/data/capability/README.md) or pass the folder that holds {rel} as the data root")
  return names


def load_task(name: str, data_root: str | os.PathLike | None = None, *, n: int | None = None,
              seed: int = 0) -> list[dict]:
  """Questions {id, context, choices, gold} of task `name`; `n` keeps a seeded subsample in file order."""
  check_tasks([name], data_root)
  if n is not None and n < 0:
    raise UserError(f"capability n={n}; use a positive number of questions per task (0 or None = all)")
  questions = _LOADERS[name](Path(data_root or DEFAULT_DATA_ROOT).expanduser())
  if n is not None and n < len(questions):
    keep = np.sort(np.random.default_rng(seed).choice(len(questions), size=n, replace=False))
    questions = [questions[i] for i in keep]
  return questions


def encode_question(tokenizer, question: dict) -> tuple[list[int], list[list[int]]]:
  """(context ids, per-choice continuation ids) as lm-evaluation-harness's HF backend splits them.

  The context is tokenized alone; each continuation is the part of tokenize(context + " " + choice) past the
  context's length (the tokenizer's default special tokens, e.g. Gemma's BOS, in both).
  """
  context = question["context"]
  trailing = len(context) - len(context.rstrip())  # the harness moves trailing context spaces to the continuation
  context, lead = context[:len(context) - trailing], context[len(context) - trailing:]
  context_ids = tokenizer.encode(context)
  return context_ids, [tokenizer.encode(context + lead + " " + c)[len(context_ids):] for c in question["choices"]]


def _length_bucket(n: int, smallest: int) -> int:
  """`n` rounded up to a multiple of max(`smallest`, an eighth of the power of two at or above it): at most 4
  shapes per doubling of the length, at most 25% padding."""
  return bucket_length(n, max(smallest, 2 ** max(int(n).bit_length() - 3, 0)))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _choice_log_probs(graphdef, state, tokens, mask, first, runs, runs_mask, pick, targets, owner):
  """Summed log p of every choice [B C] after its question's context.

  tokens/mask [B T]: left-padded contexts, run once into a KV cache. first [B C]: each choice's first token, all
  scored from the context's last state (one head row per question). runs/runs_mask [C B K]: each choice's tokens
  but its last, right-padded, continuing the cache (one `lax.map` step per choice; K = 0 when every choice is one
  token). The later tokens are packed: pick [P] indexes the run states flattened to [C*B*K], targets [P] are the
  tokens they predict and owner [P] the choice b*C + c they add to (B*C for padding), so the vocabulary head runs
  only on real tokens, 64 rows at a time (P is a multiple of 64).
  """
  model = nnx.merge(graphdef, state)
  b, c = first.shape
  pad = -b % _HEAD_CHUNK
  last, cache = prefill(model, tokens, mask, runs.shape[-1])  # [B 1 D]
  total = head_log_probs(model, jnp.pad(last[:, 0], ((0, pad), (0, 0)))[None],
                         jnp.pad(first, ((0, pad), (0, 0)))[None])[0, :b]  # [B C]
  if runs.shape[-1] == 0:
    return total
  hidden = jax.lax.map(lambda run: continue_from(model, run[0], run[1], cache), (runs, runs_mask))  # [C B K D]
  states = jnp.take(hidden.reshape(-1, hidden.shape[-1]), pick, axis=0)  # [P D]
  log_p = head_log_probs(model, states.reshape(_HEAD_CHUNK, -1, states.shape[-1]),
                         targets.reshape(_HEAD_CHUNK, -1, 1)).reshape(-1)  # [P]
  return total + jax.ops.segment_sum(log_p, owner, num_segments=b * c + 1)[:-1].reshape(b, c)


def choice_log_likelihoods(model, contexts: Sequence[Sequence[int]], choices: Sequence[Sequence[Sequence[int]]], *,
                           pad_id: int = 0) -> np.ndarray:
  """[B C] float32 summed log p(choice | context) for one batch of B questions with up to C choices each.

  contexts[b] are ids (at least one); choices[b][c] are continuation ids (an empty one scores 0, as in the
  harness). Entries past a question's own choice count are NaN. The batch is padded to bucketed shapes (context
  length, continuation width, choice count, packed token count).
  """
  b = len(contexts)
  if any(not c for c in contexts):
    raise UserError("every context needs at least one token")
  most = max(len(cs) for cs in choices)
  count = most if most <= 4 else bucket_length(most, 4)
  width = max(max(len(c) - 1, 0) for cs in choices for c in cs)
  width = _length_bucket(width, _HEAD_CHUNK) if width else 0
  tokens, mask = left_pad(contexts, _length_bucket(max(len(c) for c in contexts), 32), pad_id)
  first = np.zeros((b, count), np.int32)
  runs, runs_mask = np.zeros((count, b, width), np.int32), np.zeros((count, b, width), np.int32)
  packed = []  # (flat run-state index, target token, owning choice)
  for i, cs in enumerate(choices):
    for j, c in enumerate(cs):
      first[i, j] = c[0] if c else 0
      runs[j, i, :len(c) - 1], runs_mask[j, i, :len(c) - 1] = c[:-1], 1
      packed += [((j * b + i) * width + k, c[k + 1], i * count + j) for k in range(len(c) - 1)]
  size = _length_bucket(len(packed), _HEAD_CHUNK * _HEAD_CHUNK) if packed else 0
  pick, targets, owner = (np.array([p[f] for p in packed] + [fill] * (size - len(packed)), np.int32)
                          for f, fill in ((0, 0), (1, 0), (2, b * count)))
  graphdef, state = nnx.split(model)
  out = np.array(_choice_log_probs(graphdef, state, tokens, mask, first, runs, runs_mask, pick, targets, owner))
  for i, cs in enumerate(choices):
    out[i, [j for j, c in enumerate(cs) if not c]] = 0.0
    out[i, len(cs):] = np.nan
  return out


def score(log_likelihoods: Sequence[float], choices: Sequence[str], gold: int) -> dict:
  """{acc, acc_norm} of one question: argmax of the summed log-likelihood, and of it per character of the choice."""
  lls = np.asarray(log_likelihoods, np.float64)
  per_char = lls / np.array([float(len(c)) for c in choices])
  return {"acc": float(np.argmax(lls) == gold), "acc_norm": float(np.argmax(per_char) == gold)}


def _row_key(question: dict, tag: str) -> str:
  """What a stored row was computed from: the scoring format, the caller's model tag and the question itself."""
  text = json.dumps([FORMAT, tag, question["context"], question["choices"], question["gold"]], ensure_ascii=False)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _resume(path, questions: list[dict], keys: list[str]) -> dict[str, dict]:
  """Stored rows of `questions` whose key still matches, by id; rows of those ids with another key are dropped
  from the file (rows of other questions stay)."""

  rows = read_rows(path)
  key_of = {q["id"]: key for q, key in zip(questions, keys)}
  fresh = {r["id"]: r for r in rows if key_of.get(r["id"]) == r.get("key")}
  kept = [r for r in rows if r["id"] not in key_of or key_of[r["id"]] == r.get("key")]
  if len(kept) != len(rows) and jax.process_index() == 0:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
  return fresh


def evaluate_task(model, tokenizer, name: str, questions: list[dict], *, out_path=None, batch_size: int = 8,
                  tag: str = "", show_progress: bool = True) -> dict:
  """{acc, acc_norm, n} of `model` on `questions` of task `name`; per-question rows are appended to `out_path`
  (JSONL) batch by batch and reused on a re-run when their key (format, `tag`, question) matches."""

  if batch_size < 1:
    raise UserError(f"batch_size={batch_size}; use a positive batch size")
  keys = [_row_key(q, tag) for q in questions]
  done = {}
  if out_path is not None:
    ensure_dir(as_path(out_path).parent)
    done = _resume(out_path, questions, keys)
  todo = [(q, key) for q, key in zip(questions, keys) if q["id"] not in done]
  encoded = [encode_question(tokenizer, q) for q, _ in todo]
  order = np.argsort([len(context) for context, _ in encoded], kind="stable")  # similar lengths share a bucket
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  rows = dict(done)
  for start in tqdm(range(0, len(order), batch_size), desc=f"capability {name}", disable=not show_progress,
                    dynamic_ncols=True):
    chunk = [int(i) for i in order[start:start + batch_size]]
    batch = [encoded[i] for i in chunk]
    batch += [batch[0]] * (batch_size - len(batch))  # one compiled batch shape
    lls = choice_log_likelihoods(model, [c for c, _ in batch], [cs for _, cs in batch], pad_id=pad_id)
    new = []
    for row, i in enumerate(chunk):
      question, key = todo[i]
      ll = [float(x) for x in lls[row, :len(question["choices"])]]
      new.append({"id": question["id"], "key": key, "gold": question["gold"], "loglik": ll,
                  "chars": [len(c) for c in question["choices"]], **score(ll, question["choices"], question["gold"])})
    if out_path is not None:
      append_rows(out_path, new)
    rows.update((r["id"], r) for r in new)
  scored = [rows[q["id"]] for q in questions]
  n = len(scored)
  return {"acc": float(np.mean([r["acc"] for r in scored])) if n else None,
          "acc_norm": float(np.mean([r["acc_norm"] for r in scored])) if n else None, "n": n}


def evaluate_capability(model, tokenizer, tasks: str | Sequence[str], *, data_root=None, n: int | None = None,
                        seed: int = 0, out_dir=None, batch_size: int = 8, tag: str = "",
                        show_progress: bool = True) -> dict[str, dict]:
  """{task: {acc, acc_norm, n}} on a seeded subsample of `n` questions per task (None or 0 = all).

  Rows go to `out_dir`/capability-<task>.jsonl (e.g. DIR/eval) and a re-run resumes them; `tag` names the model
  (e.g. its checkpoint), so rows of another model are never reused.
  """
  names = check_tasks(tasks, data_root)
  if not names:
    raise UserError(f"no capability task named; pass some of: {', '.join(TASKS)}")
  results = {}
  for name in names:
    questions = load_task(name, data_root, n=n or None, seed=seed)
    out_path = None if out_dir is None else as_path(out_dir) / f"capability-{name}.jsonl"
    results[name] = evaluate_task(model, tokenizer, name, questions, out_path=out_path, batch_size=batch_size,
                                  tag=tag, show_progress=show_progress)
  return results
