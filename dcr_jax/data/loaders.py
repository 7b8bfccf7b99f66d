"""Load prompt sets (local files or Hugging Face datasets) into records.

A record is ``{"prompt": str, "label": "toxic"|"seemingly_toxic"|"benign", "response": str|None,
"source": str, "category": str|None}``.

The file extension picks the parser (``.csv``, ``.json``, ``.jsonl``, each optionally ``.gz``); the column names pick
the mapping, from the declarative table ``_FORMATS``. ``hf:`` specs go through ``datasets.load_dataset`` and the same
table.
Every problem with the input raises ``DataError`` with a one-line message naming the file and what to do.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dcr_jax.errors import UserError
from dcr_jax.workdir_io import write_text_atomic

LABELS = ("toxic", "seemingly_toxic", "benign")
HF_PREFIX = "hf:"
_EXTENSIONS = (".csv", ".json", ".jsonl")

Row = Mapping[str, Any]


class DataError(UserError, ValueError):
  """A prompt set could not be read; the message is one line naming the file and the fix."""

  def __init__(self, where: str, what: str):
    super().__init__(" ".join(f"{where}: {what}".splitlines()))


# ---------------------------------------------------------------------------------------------------------------------
# Column formats: the required columns identify the format; the first match in table order wins.


def _text(row: Row, column: str, where: str, n: int) -> str:
  """Returns ``row[column]`` as text; missing or null is ''."""
  value = row.get(column)
  if value is None:
    return ""
  if not isinstance(value, str):
    raise DataError(where, f"row {n}: column {column!r} holds {type(value).__name__}, expected text; fix the file")
  return value


def _optional(column: str) -> Callable[[Row, str, int], str | None]:
  def get(row: Row, where: str, n: int) -> str | None:
    return _text(row, column, where, n) or None

  return get


def _prompt(column: str) -> Callable[[Row, str, int], str]:
  return lambda row, where, n: _text(row, column, where, n)


def _mapped_label(column: str, mapping: Mapping[str, str]) -> Callable[[Row, str, int], str]:
  def get(row: Row, where: str, n: int) -> str:
    value = _text(row, column, where, n)
    if value not in mapping:
      allowed = ", ".join(mapping)
      raise DataError(where, f"row {n}: {column} {value!r} is not one of {allowed}; fix the row or pass label=")
    return mapping[value]

  return get


_HUMAN, _ASSISTANT = "\n\nHuman: ", "\n\nAssistant:"


def _first_human_turn(row: Row, where: str, n: int) -> str:
  """HH-RLHF: the text of the first Human turn of the ``chosen`` dialogue."""
  dialogue = _text(row, "chosen", where, n)
  start = dialogue.find(_HUMAN)
  if start < 0:
    raise DataError(where, f"row {n}: 'chosen' has no {_HUMAN!r} turn; expected HH-RLHF dialogues")
  start += len(_HUMAN)
  end = dialogue.find(_ASSISTANT, start)
  return dialogue[start : end if end >= 0 else None].strip()


def _harmbench_prompt(row: Row, where: str, n: int) -> str:
  """HarmBench: contextual behaviours carry a ContextString that goes before the behaviour."""
  behavior = _text(row, "Behavior", where, n)
  context = _text(row, "ContextString", where, n)
  return f"{context}\n\n---\n\n{behavior}" if context.strip() else behavior


def _instruction_prompt(row: Row, where: str, n: int) -> str:
  """Alpaca-style: the instruction, then the input (if any) after a blank line."""
  instruction = _text(row, "instruction", where, n)
  extra = _text(row, "input", where, n)
  return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _none(row: Row, where: str, n: int) -> None:
  return None


@dataclasses.dataclass(frozen=True)
class _Format:
  """How one upstream layout maps to records. ``label`` is None when the layout carries no label."""

  name: str
  columns: tuple[str, ...]
  prompt: Callable[[Row, str, int], str]
  label: Callable[[Row, str, int], str] | None = None
  response: Callable[[Row, str, int], str | None] = _none
  category: Callable[[Row, str, int], str | None] = _none
  source: Callable[[Row, str, int], str | None] = _none
  dedupe: bool = False


_FORMATS: tuple[_Format, ...] = (
  _Format("XSTest", ("prompt", "type", "label"), _prompt("prompt"),
          label=_mapped_label("label", {"safe": "seemingly_toxic", "unsafe": "toxic"}), category=_optional("type")),
  _Format("CoCoNot", ("id", "category", "subcategory", "prompt", "response"), _prompt("prompt"),
          response=_optional("response"), category=_optional("category")),
  # CoCoNot's contrast preference set: benign prompts with a compliant `chosen` and an over-refusing `rejected` answer.
  _Format("CoCoNot preference", ("prompt", "chosen", "rejected"), _prompt("prompt"), response=_optional("chosen"),
          category=_optional("subcategory")),
  _Format("records", ("prompt", "label"), _prompt("prompt"), label=_mapped_label("label", {x: x for x in LABELS}),
          response=_optional("response"), category=_optional("category"), source=_optional("source")),
  _Format("HH-RLHF", ("chosen", "rejected"), _first_human_turn, label=lambda row, where, n: "toxic", dedupe=True),
  _Format("HarmBench", ("Behavior", "FunctionalCategory", "SemanticCategory", "ContextString"), _harmbench_prompt,
          category=_optional("SemanticCategory")),
  _Format("JailbreakBench", ("Goal", "Target", "Behavior", "Category"), _prompt("Goal"),
          category=_optional("Category")),
  _Format("StrongREJECT", ("category", "source", "forbidden_prompt"), _prompt("forbidden_prompt"),
          category=_optional("category")),
  _Format("PHTest", ("ID", "Request", "Harmfulness"), _prompt("Request"),
          label=_mapped_label("Harmfulness", {"harmless": "seemingly_toxic", "controversial": "seemingly_toxic"}),
          category=_optional("Harmfulness")),
  _Format("AdvBench", ("goal", "target"), _prompt("goal")),
  _Format("instruction/input/output", ("instruction",), _instruction_prompt, response=_optional("output")),
  _Format("OR-Bench", ("prompt", "category"), _prompt("prompt"), category=_optional("category")),
  _Format("prompt-only (OKTest, string lists)", ("prompt",), _prompt("prompt")),
)


def _detect(columns: Sequence[str], where: str) -> _Format:
  """The first format whose required columns are all present; else a DataError about the closest one."""
  present = set(columns)
  for fmt in _FORMATS:
    if present.issuperset(fmt.columns):
      return fmt
  found = ", ".join(columns) or "none"
  closest = max(_FORMATS, key=lambda f: len(present.intersection(f.columns)))
  if not present.intersection(closest.columns):
    known = " | ".join(f"{f.name}: {','.join(f.columns)}" for f in _FORMATS)
    raise DataError(where, f"unrecognised columns (found: {found}); expected one of {known}")
  missing = ", ".join(repr(c) for c in closest.columns if c not in present)
  plural = "s" if len(closest.columns) - len(present.intersection(closest.columns)) > 1 else ""
  raise DataError(where, f"missing column{plural} {missing} (found: {found}); "
                         f"expected columns {','.join(closest.columns)} ({closest.name})")


def _map_rows(rows: Iterable[Row], columns: Sequence[str], *, where: str, source: str,
              label: str | None = None) -> list[dict]:
  """Maps table rows (CSV/JSON rows or a ``datasets.Dataset``) to records by their column names.

  ``label`` overrides the label of every row; it is required when the detected format carries none. Rows with an
  empty or whitespace prompt are skipped; HH-RLHF prompts are de-duplicated in first-seen order.
  """
  fmt = _detect(columns, where)
  if label is None and fmt.label is None:
    raise DataError(where, f"{fmt.name} rows carry no label; pass label= one of {', '.join(LABELS)}")
  records, seen = [], set()
  for n, row in enumerate(rows, start=1):
    prompt = fmt.prompt(row, where, n)
    if not prompt.strip() or (fmt.dedupe and prompt in seen):
      continue
    seen.add(prompt)
    records.append({
      "prompt": prompt,
      "label": label if label is not None else fmt.label(row, where, n),
      "response": fmt.response(row, where, n),
      "source": fmt.source(row, where, n) or source,
      "category": fmt.category(row, where, n),
    })
  return records


# ---------------------------------------------------------------------------------------------------------------------
# Local files: bytes → text → rows.


def _split_extension(path: Path) -> tuple[str, bool]:
  """Returns (``.csv``|``.json``|``.jsonl``, gzipped) or raises for anything else."""
  name = path.name.lower()
  gz = name.endswith(".gz")
  base = name[:-3] if gz else name
  for ext in _EXTENSIONS:
    if base.endswith(ext):
      return ext, gz
  raise DataError(str(path),
                  "unknown extension; expected .csv, .json, .jsonl (optionally .gz) or an hf:<dataset_id> spec")


def _read_text(path: Path, gz: bool) -> str:
  where = str(path)
  if not path.is_file():
    raise DataError(where, "no such file; check the path (or use hf:<dataset_id>[:split] for a Hugging Face dataset)")
  data = path.read_bytes()
  if gz:
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
      raise DataError(where, f"not a valid gzip file ({e}); re-download it or drop the .gz extension") from e
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(where, f"not UTF-8 (invalid byte 0x{data[e.start]:02x} at byte offset {e.start}); "
                           "re-save the file as UTF-8") from e
  return text.removeprefix("\ufeff")


def _load_json(path: Path, text: str) -> tuple[list[Row], list[str]]:
  """JSON: a list of objects, a list of strings (HarmfulQ), or ``{"instructions": [...]}`` (Safety-Tuned LLaMAs)."""
  where = str(path)
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(where, f"bad JSON at line {e.lineno} column {e.colno} ({e.msg}); fix the file") from e
  if isinstance(data, dict) and isinstance(data.get("instructions"), list):
    data = data["instructions"]
  if not isinstance(data, list):
    raise DataError(where, "expected a JSON list of objects or strings, or an object with an 'instructions' list")
  if all(isinstance(x, str) for x in data):
    return [{"prompt": x} for x in data], ["prompt"]
  if all(isinstance(x, dict) for x in data):
    return data, _union_keys(data)
  raise DataError(where, "JSON list mixes objects and other values; expected all objects or all strings")


def _load_jsonl(path: Path, text: str) -> tuple[list[Row], list[str]]:
  rows = []
  for lineno, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(str(path), f"bad JSON on line {lineno} ({e.msg} at column {e.colno}); fix the line") from e
    if not isinstance(row, dict):
      raise DataError(str(path), f"line {lineno} is a JSON {type(row).__name__}, expected an object; fix the line")
    rows.append(row)
  return rows, _union_keys(rows)


def _load_csv(path: Path, text: str) -> tuple[list[Row], list[str]]:
  reader = csv.DictReader(io.StringIO(text, newline=""))
  try:
    rows = list(reader)
  except csv.Error as e:
    raise DataError(str(path), f"malformed CSV at line {reader.line_num} ({e}); fix the file") from e
  return rows, list(reader.fieldnames or [])


def _union_keys(rows: Iterable[Row]) -> list[str]:
  return list(dict.fromkeys(k for row in rows for k in row))


_PARSERS = {".csv": _load_csv, ".json": _load_json, ".jsonl": _load_jsonl}


def _load_file(path: Path, label: str | None) -> list[dict]:
  ext, gz = _split_extension(path)
  text = _read_text(path, gz)
  if not text.strip():
    raise DataError(str(path), "file is empty; expected a header/rows — check the download")
  rows, columns = _PARSERS[ext](path, text)
  if not rows:
    raise DataError(str(path), "no rows (only a header or an empty list); check the download")
  source = path.name[: len(path.name) - len(ext) - (3 if gz else 0)]
  return _map_rows(rows, columns, where=str(path), source=source, label=label)


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face datasets.


def _parse_hf(spec: str) -> tuple[str, str | None, str | None]:
  """``hf:<id>``, ``hf:<id>:<split>`` or ``hf:<id>:<config>:<split>`` → (id, config, split)."""
  parts = spec[len(HF_PREFIX):].split(":")
  if not parts[0] or len(parts) > 3 or not all(parts):
    raise DataError(spec, "malformed spec; expected hf:<dataset_id>[:split] or hf:<dataset_id>:<config>:<split>")
  if len(parts) == 3:
    return parts[0], parts[1], parts[2]
  return parts[0], None, parts[1] if len(parts) == 2 else None


def _load_hf(spec: str, label: str | None) -> list[dict]:
  import datasets  # Heavy; only needed for hf: specs.

  dataset_id, config, split = _parse_hf(spec)
  try:
    ds = datasets.load_dataset(dataset_id, config, split=split)
  except Exception as e:  # Hub, network and builder errors all mean the same thing to the caller.
    first_line = (str(e).strip().splitlines() or [""])[0]
    raise DataError(spec, f"could not load dataset ({type(e).__name__}: {first_line}); check the id, config and "
                          "split, or download the file and pass its local path") from e
  if isinstance(ds, datasets.DatasetDict):
    if len(ds) != 1:
      raise DataError(spec, f"dataset has splits {', '.join(ds)}; name one as hf:{dataset_id}:<split>")
    ds = next(iter(ds.values()))
  if len(ds) == 0:
    raise DataError(spec, "dataset split has no rows; choose another split")
  source = f"{dataset_id}:{config}" if config else dataset_id
  return _map_rows(ds, ds.column_names, where=spec, source=source, label=label)


# ---------------------------------------------------------------------------------------------------------------------
# Public API.


def load_records(spec: str | os.PathLike, *, label: str | None = None, n: int | None = None,
                 seed: int = 0) -> list[dict]:
  """Loads a prompt set from a local file or ``hf:<dataset_id>[:split]`` into records.

  ``label`` sets the label of every record (required for layouts that carry none, e.g. AdvBench). ``n`` keeps a
  seeded subsample without replacement (``numpy.random.default_rng(seed)``) in the original order; ``n`` larger than
  the set returns it all.
  """
  if label is not None and label not in LABELS:
    raise ValueError(f"label={label!r}; expected one of {', '.join(LABELS)}")
  if n is not None and n < 0:
    raise ValueError(f"n={n}; expected a non-negative count or None")
  spec_str = os.fspath(spec)
  if spec_str.startswith(HF_PREFIX):
    records = _load_hf(spec_str, label)
  else:
    records = _load_file(Path(spec_str), label)
  if not records:
    raise DataError(spec_str, "every prompt is empty; check the prompt column")
  if n is None or n >= len(records):
    return records
  keep = np.sort(np.random.default_rng(seed).choice(len(records), size=n, replace=False))
  return [records[i] for i in keep]


def balance_check(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
  """Counts records per label: every label in ``LABELS`` (zero if absent), then any unexpected ones."""
  counts = dict.fromkeys(LABELS, 0)
  for record in records:
    counts[record["label"]] = counts.get(record["label"], 0) + 1
  return counts


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> None:
  """Writes one JSON object per line, atomically (``workdir_io.write_text_atomic``)."""
  write_text_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """Reads a JSONL file (optionally ``.gz``) written by ``write_jsonl``; blank lines are ignored."""
  path = Path(path)
  rows, _ = _load_jsonl(path, _read_text(path, path.name.lower().endswith(".gz")))
  return rows
