"""From records to fixed-shape batches: chat tokenization, the balanced contrastive sampler, the SFT mixture, packing.

Every batch is a pure function of (seed, step), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from dcr_jax.data.loaders import DataError, load_records, read_jsonl
from dcr_jax.errors import UserError
from dcr_jax.weights.tokenizer import encode_chat

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
CLASS_IDS = {"toxic": 0, "seemingly_toxic": 1, "benign": 2}


_ROWS = re.compile(r"@(\d*):(\d*)(?::(\d+))?$")
_ONLY_LABEL = re.compile(r"#(" + "|".join(CLASS_IDS) + r")$")


def parse_selectors(spec: str) -> tuple[str, str | None, slice | None]:
  """`SPEC[#LABEL][@START:STOP[:STEP]]` -> (SPEC, LABEL, rows): keep the records the file itself labels LABEL, then
  the Python slice START:STOP:STEP of those (file order, before any subsample), so that disjoint parts of one file
  can feed different uses (e.g. `@0:500` and `@500:1500`, or `@0::2` and `@1::2`)."""
  rows = _ROWS.search(spec)
  if rows:
    start, stop, step = (int(x) if x else None for x in rows.groups())
    if (start is not None and stop is not None and stop <= start) or step == 0:
      raise UserError(f"{spec}: empty row selection {rows.group(0)}; write @START:STOP[:STEP] with STOP > START "
                      "and STEP > 0")
    spec, rows = spec[:rows.start()], slice(start, stop, step)
  only = _ONLY_LABEL.search(spec)
  if only:
    spec = spec[:only.start()]
  return spec, only.group(1) if only else None, rows


def source_list(specs: str | Sequence[str]) -> list[str]:
  """A comma-separated string of specs, or a sequence of them (a resolved config's tuple), as stripped entries."""
  parts = specs.split(",") if isinstance(specs, str) else specs
  return [s.strip() for s in parts if s.strip()]


def load_spec_list(specs: str | Sequence[str], *, label: str | None = None, n: int | None = None, seed: int = 0,
                   key: str = "data") -> list[dict]:
  """Records from a list of specs (`source_list`): `builtin:NAME`, a local file, or `hf:ID[:CONFIG][:SPLIT]`, each
  optionally narrowed by `#LABEL` and `@START:STOP` (`parse_selectors`); `label` then relabels every record."""
  records = []
  for full_spec in source_list(specs):
    spec, only, rows = parse_selectors(full_spec)
    if spec.startswith("builtin:"):
      path = BUILTIN_DIR / f"{spec[len('builtin:'):]}.jsonl"
      if not path.is_file():
        known = ", ".join(sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl")))
        raise UserError(f"config.{key}: unknown built-in set {spec!r}; known: {known}")
      spec = str(path)
    if only is None:
      part = load_records(spec, label=label)
    else:
      try:
        part = [r for r in load_records(spec) if r["label"] == only]
      except DataError as e:
        raise UserError(f"config.{key}: {full_spec}: #{only} needs a file that labels its rows ({e})") from None
      part = [{**r, "label": label or r["label"]} for r in part]
    if rows is not None:
      part = part[rows]
    if not part:
      raise UserError(f"config.{key}: {full_spec} selects no records; check the #label and @start:stop")
    records += part
  if n is not None and n < len(records):
    keep = np.sort(np.random.default_rng(seed).choice(len(records), n, replace=False))
    records = [records[i] for i in keep]
  return records


def load_refusals(specs: str | Sequence[str]) -> list[str]:
  """Refusal texts from `builtin:NAME`, a .txt file (one per line) or a .jsonl file of {"response": ...}."""
  texts = []
  for spec in source_list(specs):
    path = BUILTIN_DIR / f"{spec[len('builtin:'):]}.jsonl" if spec.startswith("builtin:") else Path(spec)
    if not path.is_file():
      raise UserError(f"config.data.refusals: {spec} not found; give builtin:refusals, a .txt or a .jsonl file")
    if path.suffix == ".txt":
      texts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
      texts += [r["response"] for r in read_jsonl(path) if r.get("response")]
  return texts


def rng_for(seed: int, step: int, stream: int = 0) -> np.random.Generator:
  """The random generator of one step: a pure function of (seed, step, stream)."""
  return np.random.default_rng([seed, step, stream])


# ---------------------------------------------------------------------------------------------------------------- stage 1


@dataclasses.dataclass
class PromptSet:
  """Chat-templated prompts with class ids; `lengths` are the true lengths before padding."""

  tokens: np.ndarray  # [N T] int32, right-padded
  lengths: np.ndarray  # [N]
  labels: np.ndarray  # [N] class ids (CLASS_IDS)

  def __len__(self):
    return len(self.labels)

  def take(self, index) -> dict:
    """A batch dict for rows `index`: tokens, mask, labels (mask 1 on valid tokens)."""
    tokens = self.tokens[index]
    mask = (np.arange(tokens.shape[1])[None] < self.lengths[index][:, None]).astype(np.int32)
    return {"tokens": tokens, "mask": mask, "labels": self.labels[index].astype(np.int32)}


def tokenize_prompts(tokenizer, records: Sequence[dict], max_len: int) -> PromptSet:
  """Prompts in the chat template ending where the model answers; longer ones keep their last max_len tokens
  (the pooled last prompt token must survive truncation)."""
  rows = [encode_chat(tokenizer, r["prompt"])[0][-max_len:] for r in records]
  tokens = np.full((len(rows), max_len), tokenizer.pad_token_id, np.int32)
  for i, ids in enumerate(rows):
    tokens[i, :len(ids)] = ids
  labels = np.array([CLASS_IDS[r["label"]] for r in records], np.int32)
  return PromptSet(tokens, np.array([len(r) for r in rows], np.int32), labels)


class BalancedSampler:
  """Every batch holds each class in a fixed ratio; indices are drawn without replacement within a step."""

  def __init__(self, labels: np.ndarray, batch_size: int, ratio: Sequence[float], seed: int):
    self.classes = sorted(set(labels.tolist()))
    if len(ratio) != len(self.classes):
      raise UserError(f"config.refine.class_ratio has {len(ratio)} entries for {len(self.classes)} classes")
    weights = np.asarray(ratio, float) / np.sum(ratio)
    counts = np.floor(weights * batch_size).astype(int)
    counts[np.argmax(weights)] += batch_size - counts.sum()
    if np.any(counts < 2):
      raise UserError(f"config.refine.batch_size={batch_size} gives a class fewer than 2 examples per batch; "
                      "raise the batch size")
    self.by_class = [np.flatnonzero(labels == c) for c in self.classes]
    self.counts = counts
    self.seed = seed

  def indices(self, step: int) -> np.ndarray:
    """The row indices of batch `step`, class by class."""
    rng = rng_for(self.seed, step)
    return np.concatenate([rng.choice(pool, n, replace=len(pool) < n) for pool, n in zip(self.by_class,
                                                                                          self.counts)])


# ---------------------------------------------------------------------------------------------------------------- stage 2


@dataclasses.dataclass
class SFTSet:
  """Tokenized (prompt, response) pairs: ids and response masks as ragged lists."""

  ids: list[list[int]]
  response_mask: list[list[int]]

  def __len__(self):
    return len(self.ids)


def tokenize_pairs(tokenizer, records: Sequence[dict], max_len: int) -> SFTSet:
  """Chat-templated pairs cut to max_len + 1 tokens (inputs and shifted targets come from the same row)."""
  ids, masks = [], []
  for r in records:
    row, mask = encode_chat(tokenizer, r["prompt"], r["response"])
    if sum(mask[:max_len + 1]) == 0:
      continue  # the prompt alone fills the row: nothing to learn from
    ids.append(row[:max_len + 1])
    masks.append(mask[:max_len + 1])
  return SFTSet(ids, masks)


def with_refusals(records: Sequence[dict], refusals: Sequence[str]) -> list[dict]:
  """Harmful prompts paired with a refusal: their own response if they carry one, else one of `refusals`."""
  out = []
  for i, r in enumerate(records):
    response = r.get("response") or (refusals[i % len(refusals)] if refusals else None)
    if response is None:
      raise DataError("config.data.harmful", "records carry no refusal and config.data.refusals is empty; "
                      "set config.data.refusals")
    out.append({**r, "response": response})
  return out


class SFTMixture:
  """Draws examples from named sources in fixed proportions and packs them into [B T] rows with segment ids."""

  def __init__(self, sources: dict[str, SFTSet], weights: dict[str, float], batch_size: int, max_len: int,
               seed: int, pack: bool = True):
    self.names = [n for n in sources if weights.get(n, 0) > 0 and len(sources[n])]
    if not self.names:
      raise UserError("config.align: every SFT source is empty or has weight 0")
    total = sum(weights[n] for n in self.names)
    self.probs = np.array([weights[n] / total for n in self.names])
    self.sources, self.batch_size, self.max_len, self.seed, self.pack = sources, batch_size, max_len, seed, pack

  def _segments(self, step: int, global_row: int):
    """Row `global_row` of batch `step` as (source, example, start, length) segments, drawn from the row's own
    stream (seed, step, row)."""
    t, used, segment = self.max_len, 0, 0
    rng = rng_for(self.seed, step, stream=1 + global_row)
    while used < t - 1:
      src = self.sources[self.names[rng.choice(len(self.names), p=self.probs)]]
      k = int(rng.integers(len(src)))
      n = len(src.ids[k]) - 1  # inputs ids[:-1], targets ids[1:]
      if segment and (not self.pack or used + n > t):
        break
      n = min(n, t - used)
      segment += 1
      yield src, k, used, n
      used += n
      if not self.pack:
        break

  def batch(self, step: int, rows: slice = slice(None)) -> dict:
    """Rows `rows` of batch `step`: tokens/targets/loss_mask/segments/positions [B T]. Each row draws from its own
    stream (seed, step, row), so a process builds only the rows it feeds and they equal the global batch's."""
    chosen = range(self.batch_size)[rows]
    out = {k: np.zeros((len(chosen), self.max_len), np.int32) for k in ("tokens", "targets", "segments", "positions")}
    out["loss_mask"] = np.zeros((len(chosen), self.max_len), np.float32)
    for row, global_row in enumerate(chosen):
      for segment, (src, k, start, n) in enumerate(self._segments(step, global_row), start=1):
        ids, mask, sl = src.ids[k], src.response_mask[k], slice(start, start + n)
        out["tokens"][row, sl] = ids[:n]
        out["targets"][row, sl] = ids[1:n + 1]
        out["loss_mask"][row, sl] = mask[1:n + 1]
        out["segments"][row, sl] = segment
        out["positions"][row, sl] = np.arange(n)
    return out

  def loss_counts(self, step: int) -> np.ndarray:
    """Loss tokens in each row of batch `step` [B], every row's, without building the tokens (cheap)."""
    return np.array([sum(int(np.count_nonzero(src.response_mask[k][1:n + 1]))
                         for src, k, _, n in self._segments(step, row)) for row in range(self.batch_size)])
