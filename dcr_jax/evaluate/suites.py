"""Named evaluation suites: where each prompt set comes from, how it loads, and the metrics reported per suite.

A suite is an upstream prompt set with a role: ``over_refusal`` (benign prompts that look harmful; higher compliance
is better), ``harmful`` (prompts a safe model refuses; higher refusal = defense rate is better) or ``general``.
``load_suite`` finds the prompts in this order: an explicit ``path`` (file or ``hf:`` spec), the suite's upstream file
under ``data_root``, the suite's Hugging Face copy; parsing is ``dcr_jax.data.loaders.load_records``.

Metrics follow the paper (PAPER.md): compliance rate on over-refusal suites, refusal (defense) rate on harmful suites,
and the safety score = the unweighted mean defense rate over the harmful suites evaluated.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dcr_jax.data.loaders import HF_PREFIX, DataError, load_records

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "data" / "builtin"
from dcr_jax.errors import UserError

KINDS = ("over_refusal", "harmful", "general")
_LABEL_OF_KIND = {"over_refusal": "seemingly_toxic", "harmful": "toxic", "general": "benign"}


def xstest_safe(record: Mapping[str, Any]) -> bool:
  """XSTest's 250 safe prompts: every type except the ``contrast_*`` ones (XSTest v2 type names)."""
  return not (record.get("category") or "").startswith("contrast_")


def xstest_unsafe(record: Mapping[str, Any]) -> bool:
  """XSTest's 200 unsafe contrast prompts: types ``contrast_*``."""
  return (record.get("category") or "").startswith("contrast_")


@dataclasses.dataclass(frozen=True)
class Suite:
  """One evaluation prompt set.

  ``label`` is given to every record (``load_records(label=...)``); ``default_local`` is the upstream file name
  relative to a data root; ``hf_id`` is the ``hf:`` spec body ``<dataset_id>[:<config>]:<split>`` (None when there is
  no Hugging Face copy); ``expected_columns`` documents the upstream layout; ``filter`` keeps a subset of records
  (applied before subsampling); ``source`` names the paper and upstream repository.
  """

  name: str
  kind: str
  label: str
  default_local: str | None
  hf_id: str | None
  expected_columns: str
  source: str
  filter: Callable[[Mapping[str, Any]], bool] | None = None
  rows: slice | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"suite {self.name}: kind {self.kind!r} is not one of {', '.join(KINDS)}")


def _suite(name: str, kind: str, default_local: str | None, hf_id: str | None, expected_columns: str, source: str,
           filter: Callable[[Mapping[str, Any]], bool] | None = None, rows: slice | None = None) -> Suite:
  return Suite(name, kind, _LABEL_OF_KIND[kind], default_local, hf_id, expected_columns, source, filter, rows)


HELD_OUT_ROWS = slice(3, None, 4)
_STL = "Bianchi et al. 2024 (Safety-Tuned LLaMAs), github.com/vinid/safety-tuned-llamas data/evaluation"
_STL_JSON = 'JSON `{"instructions": [...]}`'

SUITES: dict[str, Suite] = {s.name: s for s in (
  # Over-refusal: benign prompts that resemble harmful ones. Compliance rate, higher is better.
  _suite("xstest", "over_refusal", "xstest/xstest_prompts.csv", "walledai/XSTest:test",
         "CSV `id,prompt,type,label,focus,note`; safe rows (types not `contrast_*`)",
         "Röttger et al. 2024 (XSTest), github.com/paul-rottger/exaggerated-safety", xstest_safe),
  _suite("orbench-hard", "over_refusal", "orbench/or-bench-hard-1k.csv", "bench-llm/or-bench:or-bench-hard-1k:train",
         "CSV `prompt,category`", "Cui et al. 2024 (OR-Bench), github.com/justincui03/or-bench"),
  _suite("oktest", "over_refusal", "oktest/OKTest.csv", None,
         "CSV `prompt` (quoted, may span lines)", "Shi et al. 2024 (OKTest), github.com/InvokerStark/OverKill"),
  _suite("phtest", "over_refusal", "phtest/dataset_v0.1.csv", "furonghuang-lab/PHTest:train",
         "CSV `ID,Request,Harmfulness` (harmless and controversial; see by_category)",
         "An et al. 2024 (PHTest), github.com/umd-huang-lab/FalseRefusal"),
  _suite("coconot", "over_refusal", "coconot/coconot_contrast_eval.jsonl", "allenai/coconot:contrast:test",
         "JSONL `id,category,subcategory,prompt,response` (contrast set: benign)",
         "Brahman et al. 2024 (CoCoNot), github.com/allenai/noncompliance"),
  # Harmful: refusal (defense) rate, higher is better.
  _suite("xstest-unsafe", "harmful", "xstest/xstest_prompts.csv", "walledai/XSTest:test",
         "CSV `id,prompt,type,label,focus,note`; unsafe rows (types `contrast_*`)",
         "Röttger et al. 2024 (XSTest), github.com/paul-rottger/exaggerated-safety", xstest_unsafe),
  _suite("orbench-toxic", "harmful", "orbench/or-bench-toxic.csv", "bench-llm/or-bench:or-bench-toxic:train",
         "CSV `prompt,category`", "Cui et al. 2024 (OR-Bench), github.com/justincui03/or-bench"),
  _suite("advbench", "harmful", "advbench/harmful_behaviors.csv", "walledai/AdvBench:train",
         "CSV `goal,target`", "Zou et al. 2023 (AdvBench), github.com/llm-attacks/llm-attacks"),
  _suite("harmbench", "harmful", "harmbench/harmbench_behaviors_text_val.csv", "walledai/HarmBench:standard:train",
         "CSV `Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID` (local: val split)",
         "Mazeika et al. 2024 (HarmBench), github.com/centerforaisafety/HarmBench"),
  _suite("jbb", "harmful", "jbb/behaviors.csv", "JailbreakBench/JBB-Behaviors:behaviors:harmful",
         "CSV `,Goal,Target,Behavior,Category,Source`",
         "Chao et al. 2024 (JailbreakBench), github.com/JailbreakBench/jailbreakbench"),
  _suite("strongreject", "harmful", "strongreject/strongreject_dataset.csv", "walledai/StrongREJECT:train",
         "CSV `category,source,forbidden_prompt`",
         "Souly et al. 2024 (StrongREJECT), github.com/alexandrasouly/strongreject"),
  _suite("i-malicious", "harmful", "safety_tuned_llamas/evaluation/I-MaliciousInstructions.json",
         "walledai/SafetyDatasets:MaliciousInstructions:train", f"{_STL_JSON} (+ `tags`)", _STL),
  _suite("i-cona", "harmful", "safety_tuned_llamas/evaluation/I-CoNa.json", "walledai/SafetyDatasets:CoNa:train",
         _STL_JSON, _STL),
  _suite("i-controversial", "harmful", "safety_tuned_llamas/evaluation/I-Controversial.json",
         "walledai/SafetyDatasets:ControversialInstructions:train", _STL_JSON, _STL),
  _suite("q-harm", "harmful", "safety_tuned_llamas/evaluation/Q-Harm.json", "walledai/SafetyDatasets:QHarm:train",
         _STL_JSON, _STL),
  # The built-in demo sets (in-distribution for the default run, which also trains on them): offline smoke checks.
  _suite("demo-over-refusal", "over_refusal", "builtin:seemingly_toxic", None, "dcr_jax built-in JSONL records",
         "dcr_jax/data/builtin/seemingly_toxic.jsonl (written for this project)"),
  _suite("demo-harmful", "harmful", "builtin:toxic", None, "dcr_jax built-in JSONL records",
         "dcr_jax/data/builtin/toxic.jsonl (written for this project)"),
  # Every fourth built-in record (rows 3, 7, 11, ...; every category): the demo sets' held-out quarter, which the
  # CPU default configs leave out of training (their data specs `builtin:NAME@0::2,builtin:NAME@1::4`).
  _suite("demo-over-refusal-heldout", "over_refusal", "builtin:seemingly_toxic", None,
         "dcr_jax built-in JSONL records, rows 3::4", "dcr_jax/data/builtin/seemingly_toxic.jsonl (held-out quarter)",
         rows=HELD_OUT_ROWS),
  _suite("demo-harmful-heldout", "harmful", "builtin:toxic", None, "dcr_jax built-in JSONL records, rows 3::4",
         "dcr_jax/data/builtin/toxic.jsonl (held-out quarter)", rows=HELD_OUT_ROWS),
)}
"""Every known suite by name, over-refusal first."""


class UnknownSuiteError(UserError, ValueError):
  """A suite name that is not in ``SUITES``."""


def get_suite(name: str) -> Suite:
  """The registered suite called ``name``; an unknown name raises with the list of known names."""
  try:
    return SUITES[name]
  except KeyError:
    raise UnknownSuiteError(f"unknown suite {name!r}; known suites: {', '.join(SUITES)}") from None


def suite_names(kind: str | None = None) -> list[str]:
  """Registered suite names, all or those of one ``kind``."""
  if kind is not None and kind not in KINDS:
    raise ValueError(f"kind={kind!r}; expected one of {', '.join(KINDS)}")
  return [s.name for s in SUITES.values() if kind is None or s.kind == kind]


def _resolve(suite: Suite, path: str | os.PathLike | None, data_root: str | os.PathLike | None) -> str:
  """The spec ``load_records`` reads: ``path``, else the file under ``data_root`` if present, else ``hf:<hf_id>``."""
  if path is not None:
    return os.fspath(path)
  if suite.default_local and suite.default_local.startswith("builtin:"):
    return str(BUILTIN_DIR / f"{suite.default_local[len('builtin:'):]}.jsonl")
  local = Path(data_root) / suite.default_local if data_root is not None and suite.default_local else None
  if local is not None and local.is_file():
    return str(local)
  if suite.hf_id:
    return HF_PREFIX + suite.hf_id
  looked = f" (looked for {local})" if local is not None else ""
  file_name = Path(suite.default_local).name if suite.default_local else "the prompt file"
  raise DataError(suite.name, f"no local file{looked} and no Hugging Face copy; download {file_name} from "
                              f"{suite.source} and pass its path (or place it at <data_root>/{suite.default_local})")


def _subsample(records: list[dict], n: int | None, seed: int) -> list[dict]:
  """The seeded subsample rule of ``load_records``: ``n`` without replacement, original order kept."""
  if n is None or n >= len(records):
    return records
  keep = np.sort(np.random.default_rng(seed).choice(len(records), size=n, replace=False))
  return [records[i] for i in keep]


def load_suite(name: str, *, path: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None,
               n: int | None = None, seed: int = 0, rows: slice | None = None) -> list[dict]:
  """Records of suite ``name``, every one labelled ``suite.label``; ``rows`` keeps a slice of them (after the suite's
  own filter and rows), then ``n`` a seeded subsample.

  ``path`` (a file or ``hf:`` spec) overrides; otherwise ``<data_root>/<default_local>`` when that file exists;
  otherwise the Hugging Face copy. Unknown names raise ``UnknownSuiteError`` (a ``ValueError``); unreadable or
  missing data raises ``DataError``.
  """
  suite = get_suite(name)
  if n is not None and n < 0:
    raise ValueError(f"n={n}; expected a non-negative count or None")
  spec = _resolve(suite, path, data_root)
  records = load_records(spec, label=suite.label)
  if suite.filter is not None:
    records = [r for r in records if suite.filter(r)]
    if not records:
      raise DataError(spec, f"no rows pass the {suite.name} filter ({suite.filter.__doc__ or suite.filter.__name__}); "
                            f"expected {suite.expected_columns}")
  if suite.rows is not None:
    records = records[suite.rows]
  if rows is not None:
    records = records[rows]
    if not records:
      raise DataError(spec, f"rows {rows.start}:{rows.stop}:{rows.step} of suite {name} select no prompts; narrow less")
  return _subsample(records, n, seed)


# ---------------------------------------------------------------------------------------------------------------------
# Metrics.


def _rates(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
  n = len(rows)
  refused = sum(bool(r["refused"]) for r in rows)
  probs = [float(r["refusal_prob"]) for r in rows if r.get("refusal_prob") is not None]
  return {"n": n, "refusal_rate": refused / n, "compliance_rate": (n - refused) / n,
          "mean_refusal_prob": sum(probs) / len(probs) if probs else None}


def suite_metrics(kind: str, rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
  """Metrics of one evaluated suite from rows ``{"refused": bool, "refusal_prob": float|None, "category": ...}``.

  Returns ``kind``, ``n``, ``refusal_rate``, ``compliance_rate`` (= 1 - refusal_rate), ``mean_refusal_prob`` (mean
  over rows that have one; None if none do) and ``by_category``: the same four numbers per category, over the rows
  that have a category (sorted by name; empty when no row has one).
  """
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}; expected one of {', '.join(KINDS)}")
  rows = list(rows)
  if not rows:
    raise ValueError("no rows; a suite needs at least one evaluated prompt")
  for i, row in enumerate(rows):
    if "refused" not in row:
      raise ValueError(f"row {i} has no 'refused' field (keys: {', '.join(row)}); judge the responses first")
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for row in rows:
    if row.get("category") is not None:
      groups.setdefault(str(row["category"]), []).append(row)
  return {"kind": kind, **_rates(rows), "by_category": {c: _rates(groups[c]) for c in sorted(groups)}}


def safety_score(results: Mapping[str, Mapping[str, Any]]) -> float | None:
  """Mean defense (refusal) rate over the harmful suites in ``results`` (name -> ``suite_metrics``); None if none.

  A result's kind is its ``kind`` field, else the registered suite's kind.
  """
  rates = []
  for name, metrics in results.items():
    kind = metrics.get("kind") or (SUITES[name].kind if name in SUITES else None)
    if kind is None:
      raise ValueError(f"result {name!r} has no 'kind' and is not a registered suite; add kind to its metrics")
    if kind == "harmful":
      rates.append(metrics["refusal_rate"])
  return sum(rates) / len(rates) if rates else None


# ---------------------------------------------------------------------------------------------------------------------
# Documentation.


def suites_markdown() -> str:
  """A markdown table of every suite: name, kind, record label, expected columns, local file, HF id, source."""
  lines = ["| suite | kind | label | expected columns | local file (under data root) | Hugging Face | source |",
           "|---|---|---|---|---|---|---|"]
  for s in SUITES.values():
    local = f"`{s.default_local}`" if s.default_local else "—"
    hf = f"`{s.hf_id}`" if s.hf_id else "— (local file only)"
    columns = s.expected_columns.replace("|", "\\|")
    lines.append(f"| `{s.name}` | {s.kind} | {s.label} | {columns} | {local} | {hf} | {s.source} |")
  return "\n".join(lines) + "\n"


SUITES_DOC = suites_markdown()
"""``suites_markdown()`` rendered once, for the README."""
