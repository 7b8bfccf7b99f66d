"""Grids of pipeline runs, ranked by a validation objective.

python -m dcr_jax.sweep --config=configs/X.py --workdir=DIR --grid=refine.lr=1e-5,3e-5 --grid=refine.steps=10,30 \
    --seeds=0,1,2 [--objective=margin] [--config.KEY=VALUE ...]

Every point of the grid product × seeds is an ordinary `dcr_jax.main` workdir under DIR, named by its settings (e.g.
`DIR/refine.lr=1e-05,refine.steps=10,seed=0`), run in this process through `dcr_jax.main.run` with the base model
and tokenizer loaded once. A re-run skips the finished points and resumes a partial one. At the start and after
every point the sweep rewrites DIR/sweep.json (every point, those not yet run as "pending": overrides, seed,
workdir, status, objective, validation and report metrics) and DIR/sweep.md (the points and the settings, ranked by
the objective). The objective reads only the validation split (`data.val_toxic`, `data.val_seemingly_toxic`, logged
at every save); the evaluation suites are shown, never ranked by.
A grid value list is comma-separated, or semicolon-separated when the values hold commas (`refine.layer=6,9;9`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sys
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from dcr_jax import main as pipeline_main
from dcr_jax import spec as spec_lib
from dcr_jax.errors import UserError, run_command
from dcr_jax.pipeline import ModelCache, resumable_config
from dcr_jax.report import DASH, _fmt, _table, load_report
from dcr_jax.train.loop import TrainingDiverged, last_logged
from dcr_jax.workdir_io import as_path, check_workdir, ensure_dir, write_json, write_text_atomic


@dataclasses.dataclass(frozen=True)
class Objective:
  """A score of a point's validation metrics (higher is better) and the sentence sweep.md states it with."""

  groups: tuple[str, ...]  # validation groups it reads: data.val_<group>
  score: Callable[[dict], float]
  definition: str
  evaluation: Callable[[float, float], float]  # the same quantity on the evaluation suites: f(compliance, Safety)


OBJECTIVES = {
    "margin": Objective(("toxic", "seemingly_toxic"),
                        lambda v: v["toxic"] - v["seemingly_toxic"],
                        "val_refusal_prob_toxic − val_refusal_prob_seemingly_toxic: refuse the held-out toxic prompts, "
                        "answer the held-out seemingly toxic ones", lambda compliance, safety: safety + compliance - 1),
    "compliance": Objective(("seemingly_toxic",), lambda v: 1.0 - v["seemingly_toxic"],
                            "1 − val_refusal_prob_seemingly_toxic: answer the held-out seemingly toxic prompts",
                            lambda compliance, safety: compliance),
    "safety": Objective(("toxic",), lambda v: v["toxic"], "val_refusal_prob_toxic: refuse the held-out toxic prompts",
                        lambda compliance, safety: safety),
}


@dataclasses.dataclass(frozen=True)
class Point:
  overrides: tuple[tuple[str, Any], ...]  # (config key, value) in grid order
  seed: int

  @property
  def name(self) -> str:
    """The workdir's name: `key=value,...,seed=N`, path-unsafe characters replaced by `_`."""
    text = ",".join([f"{k}={v}" for k, v in self.overrides] + [f"seed={self.seed}"])
    return re.sub(r"[^\w.=,+-]", "_", text)

  @property
  def setting(self) -> str:
    return ",".join(f"{k}={v}" for k, v in self.overrides) or "(config)"


def _section_and_leaf(config: ml_collections.ConfigDict, key: str):
  """(the ConfigDict holding `key`'s last part, that part); UserError when the key is not in the config."""
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node or isinstance(node[leaf],
                                                                                       ml_collections.ConfigDict):
    raise UserError(f"--grid={key}=…: config has no key {key}; name a setting such as refine.lr "
                    "(see dcr_jax/config.py)")
  return node, leaf


def _typed(key: str, text: str, like):
  """`text` as the type of the config's current value `like`."""
  try:
    if isinstance(like, bool):
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError
      return text.lower() in ("true", "1")
    if isinstance(like, (int, float)):
      return type(like)(text)
  except ValueError:
    raise UserError(f"--grid={key}=…: {text!r} is not a {type(like).__name__}; give values like "
                    f"{like!r}") from None
  if isinstance(like, str):
    return text
  raise UserError(f"--grid={key}=…: a {type(like).__name__} setting cannot be swept; sweep a number, flag or string")


def parse_grid(entries: list[str], config: ml_collections.ConfigDict) -> list[tuple[str, list]]:
  """`KEY=V1,V2,…` entries -> [(key, typed values)], checked against `config`; UserError naming the bad entry."""
  grid = []
  for entry in entries:
    key, sep, values = entry.partition("=")
    key = key.strip()
    if not sep or not key:
      raise UserError(f"--grid={entry}: write KEY=V1,V2 (e.g. --grid=refine.lr=1e-5,3e-5)")
    if key == "seed":
      raise UserError(f"--grid={entry}: give seeds with --seeds=0,1,2, not as a grid key")
    if key in dict(grid):
      raise UserError(f"--grid={key}=…: the key is given twice; put all its values in one --grid")
    node, leaf = _section_and_leaf(config, key)
    texts = [v.strip() for v in values.split(";" if ";" in values else ",")]
    if not any(texts) or not all(texts):
      raise UserError(f"--grid={entry}: the value list has an empty value; give e.g. --grid={key}=V1,V2")
    typed = [_typed(key, t, node[leaf]) for t in texts]
    if len(set(map(str, typed))) != len(typed):
      raise UserError(f"--grid={entry}: a value is repeated; list each once")
    grid.append((key, typed))
  return grid


def parse_seeds(text: str, default: int) -> list[int]:
  """`0,1,2` -> [0, 1, 2]; "" -> [default]; UserError for anything but distinct non-negative integers."""
  if not text.strip():
    return [default]
  try:
    seeds = [int(s) for s in text.split(",")]
  except ValueError:
    raise UserError(f"--seeds={text}: not a list of integers; write e.g. --seeds=0,1,2") from None
  if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
    raise UserError(f"--seeds={text}: seeds must be distinct and >= 0; write e.g. --seeds=0,1,2")
  return seeds


def points(grid: list[tuple[str, list]], seeds: list[int]) -> list[Point]:
  """The grid product, each setting with every seed (settings in grid order, seeds innermost)."""
  keys = [k for k, _ in grid]
  return [Point(tuple(zip(keys, values)), seed) for values in itertools.product(*(v for _, v in grid))
          for seed in seeds]


def point_config(config: ml_collections.ConfigDict, point: Point) -> ml_collections.ConfigDict:
  """A copy of `config` with the point's overrides and seed."""
  out = config.copy_and_resolve_references()
  for key, value in point.overrides:
    node, leaf = _section_and_leaf(out, key)
    node[leaf] = value
  out.seed = point.seed
  return out


def validation(workdir: epath.Path, spec: spec_lib.Spec) -> dict[str, float]:
  """The validation metrics of a point's final model: each group's mean refusal probability logged at the last save
  of its last training stage ({} when nothing was logged)."""
  path = workdir / "metrics.jsonl"
  for stage in reversed(spec.training_stages):
    found = {g: last_logged(path, stage, f"val_refusal_prob_{g}") for g in ("toxic", "seemingly_toxic")}
    found = {g: v for g, v in found.items() if v is not None}
    if found:
      return found
  return {}


def _finished(workdir: epath.Path, spec: spec_lib.Spec) -> bool:
  if not (workdir / "report.json").is_file():
    return False
  return all(stage in (load_report(workdir).get("stages") or {}) for stage in spec.stages)


def summarize(point: Point, workdir: epath.Path, spec: spec_lib.Spec, objective: str, status: str) -> dict:
  """One sweep.json row: the point, its validation objective and the key report.json metrics."""
  report = load_report(workdir) if (workdir / "report.json").is_file() else {}
  stages = report.get("stages") or {}
  val = validation(workdir, spec)
  rule = OBJECTIVES[objective]
  # a diverged point is not ranked by the validation of the stage before the one that diverged
  score = rule.score(val) if status == "done" and all(g in val for g in rule.groups) else None
  probe = (stages.get("refine") or {}).get("probe") or {}
  summary = report.get("eval_summary") or {}
  return {"name": point.name, "setting": point.setting, "overrides": dict(point.overrides), "seed": point.seed,
          "workdir": str(workdir), "status": status, "objective": score,
          "validation": {f"val_refusal_prob_{g}": v for g, v in val.items()},
          "over_refusal_compliance": summary.get("over_refusal_compliance"), "safety": summary.get("safety"),
          "refine_cosine": {when: {k: probe[when][k] for k in ("within", "across") if k in probe[when]}
                            for when in ("before", "after") if when in probe},
          "refine_stopped_at": (stages.get("refine") or {}).get("stopped_at"),
          "stages": {s: {k: m.get(k) for k in ("steps", "final_loss", "seconds")} for s, m in stages.items()}}


def _ranked(rows: list[dict], key: str) -> list[dict]:
  """Best first by `key`; rows without a score last, in their order."""
  return sorted(rows, key=lambda r: (r[key] is None, -(r[key] or 0.0)))


def rank_agreement(rows: list[dict], objective: str) -> dict:
  """How well the validation objective ranked the points as the evaluation suites do: Spearman's ρ between each
  finished point's objective and the same quantity on the evaluation suites (`Objective.evaluation` of its
  over-refusal compliance and Safety), over the points that have both; ρ is None below 3 such points or when either
  side is constant."""
  both = [r for r in rows if r["objective"] is not None and r["over_refusal_compliance"] is not None
          and r["safety"] is not None]
  evaluated = [OBJECTIVES[objective].evaluation(r["over_refusal_compliance"], r["safety"]) for r in both]
  rho = None
  if len(both) >= 3 and len(set(evaluated)) > 1 and len({r["objective"] for r in both}) > 1:
    rho = float(spearmanr([r["objective"] for r in both], evaluated).statistic)
  return {"spearman_rho": rho, "points": len(both), "evaluation": {r["name"]: e for r, e in zip(both, evaluated)}}


def _num(value) -> str:
  """4 significant digits: refusal probabilities of a base model are 1e-4-sized, so fixed decimals would hide them."""
  return DASH if value is None else f"{value:.4g}"


def _cosine(row: dict, which: str) -> str:
  cos = row["refine_cosine"]
  if not cos:
    return DASH
  return f"{_fmt(cos.get('before', {}).get(which), 3)} → {_fmt(cos.get('after', {}).get(which), 3)}"


def _settings(rows: list[dict]) -> list[dict]:
  """Per setting: the seeds' mean objective (None when any seed has none), its range, mean compliance and Safety."""
  out = []
  for setting in dict.fromkeys(r["setting"] for r in rows):
    group = [r for r in rows if r["setting"] == setting]
    scores = [r["objective"] for r in group]

    def mean(key):
      values = [r[key] for r in group if r[key] is not None]
      return float(np.mean(values)) if values else None

    out.append({"setting": setting, "seeds": len(group), "objective": None if None in scores else mean("objective"),
                "range": None if None in scores else (min(scores), max(scores)),
                "over_refusal_compliance": mean("over_refusal_compliance"), "safety": mean("safety")})
  return out


def sweep_markdown(workdir: epath.Path, objective: str, grid: list[tuple[str, list]], rows: list[dict]) -> str:
  """sweep.md: the objective stated, then settings (mean over seeds) and points, each ranked by it."""
  lines = [f"# Sweep `{as_path(workdir).name}`", "",
           f"Ranked by the validation objective `{objective}` = {OBJECTIVES[objective].definition} (higher is "
           "better; mean teacher-forced refusal probability on `data.val_*`, logged at the last save of the last "
           "training stage). Over-refusal compliance and Safety come from the evaluation suites: shown for reading, "
           "never used to rank.", "",
           "Grid: " + "; ".join(f"`{k}` ∈ {{{', '.join(map(str, v))}}}" for k, v in grid)
           + f"; seeds: {', '.join(str(s) for s in dict.fromkeys(r['seed'] for r in rows))}.", "",
           "## Settings (mean over seeds)", ""]
  lines += _table(["rank", "setting", "seeds", "objective", "objective min..max", "over-refusal compliance",
                   "Safety"],
                  [[str(i + 1), s["setting"], str(s["seeds"]), _num(s["objective"]),
                    DASH if s["range"] is None else f"{_num(s['range'][0])}..{_num(s['range'][1])}",
                    _fmt(s["over_refusal_compliance"]), _fmt(s["safety"])]
                   for i, s in enumerate(_ranked(_settings(rows), "objective"))])
  agreement = rank_agreement(rows, objective)
  if agreement["points"]:
    rho = agreement["spearman_rho"]
    lines += ["", f"Validation against evaluation: Spearman's ρ = {DASH if rho is None else f'{rho:.2f}'} over "
              f"{agreement['points']} evaluated points, between the objective and the same quantity on the evaluation "
              "suites (ρ needs at least 3 points and some spread on both sides)."]
  lines += ["", "## Points", ""]
  lines += _table(["rank", "point", "status", "objective", "val refusal toxic", "val refusal seemingly toxic",
                   "over-refusal compliance", "Safety", "cosine within at ℓ (before → after)",
                   "across at ℓ (before → after)", "refine stopped at"],
                  [[str(i + 1), r["name"], r["status"], _num(r["objective"]),
                    _num(r["validation"].get("val_refusal_prob_toxic")),
                    _num(r["validation"].get("val_refusal_prob_seemingly_toxic")),
                    _fmt(r["over_refusal_compliance"]), _fmt(r["safety"]), _cosine(r, "within"),
                    _cosine(r, "across"), DASH if r["refine_stopped_at"] is None else str(r["refine_stopped_at"])]
                   for i, r in enumerate(_ranked(rows, "objective"))])
  return "\n".join(lines) + "\n"


def run_sweep(config: ml_collections.ConfigDict, workdir: epath.PathLike, grid: list[tuple[str, list]],
              seeds: list[int], objective: str = "margin", models: ModelCache | None = None,
              show_progress: bool = True, record_only: bool = False) -> dict:
  """Runs (or resumes, or skips when finished) every point, rewriting DIR/sweep.json and DIR/sweep.md after each;
  returns sweep.json's content. `record_only` writes them from the points already finished and runs nothing. Every
  point's config is resolved, and the objective checked, before DIR is touched."""
  workdir = as_path(workdir)
  if objective not in OBJECTIVES:
    raise UserError(f"--objective={objective}: unknown; choose from {', '.join(OBJECTIVES)}")
  missing = [g for g in OBJECTIVES[objective].groups if not config.data[f"val_{g}"]]
  if missing:
    raise UserError(f"--objective={objective} reads validation prompts: set --config.data.val_{missing[0]} "
                    "(held-out prompts, disjoint from training and evaluation)")
  todo = [(p, point_config(config, p)) for p in points(grid, seeds)]
  specs = [spec_lib.resolve(c) for _, c in todo]  # a bad value fails here, naming its key, before DIR is touched
  names = [p.name for p, _ in todo]
  if len(set(names)) != len(names):
    raise UserError(f"--grid: two points share the workdir name {max(names, key=names.count)}; give distinct values")
  if not specs[0].training_stages:
    raise UserError(f"config.stages={config.stages}: the objective is logged by training; include refine or align")
  # a point already run under other training settings fails before any runs; config.json is left as it is (a
  # finished point's may record a later evaluation, e.g. capability)
  for point, point_cfg in todo:
    resumable_config(workdir / point.name, point_cfg)
  models = models if models is not None else ModelCache()
  ensure_dir(workdir)
  finished = [_finished(workdir / point.name, spec) for (point, _), spec in zip(todo, specs)]
  # every point is listed from the start (finished ones with their results, the rest "pending"), so that the record
  # of a sweep stopped part-way is complete
  rows = [summarize(point, workdir / point.name, spec, objective, "done" if done else "pending")
          for (point, _), spec, done in zip(todo, specs, finished)]
  ran, started = 0, time.time()
  earlier = _invocations(workdir / "sweep.json")  # kept: a resumed sweep does not erase how its points were run

  def write() -> None:
    _write(workdir, objective, grid, rows, {"ran": ran, "skipped": sum(finished),
                                            "seconds": round(time.time() - started, 2),
                                            "model_build_seconds": [round(s, 3) for s in models.build_seconds],
                                            "model_copy_seconds": [round(s, 3) for s in models.copy_seconds]},
           earlier)

  write()
  remaining = [] if record_only else [i for i, done in enumerate(finished) if not done]
  for i in tqdm(remaining, desc="sweep", disable=not show_progress, dynamic_ncols=True):
    (point, point_cfg), spec, point_dir = todo[i], specs[i], workdir / todo[i][0].name
    status, error = "done", None
    ran += 1
    try:
      pipeline_main.run(point_cfg, point_dir, models=models)
    except TrainingDiverged as e:
      status, error = "diverged", str(e)
    rows[i] = {**summarize(point, point_dir, spec, objective, status), **({"error": error} if error else {})}
    write()
  return json.loads((workdir / "sweep.json").read_text())


def _invocations(sweep_json: epath.Path) -> list[dict]:
  """Every invocation recorded in an existing sweep.json, oldest first (none if there is none or it is unreadable)."""
  try:
    previous = json.loads(sweep_json.read_text())
  except (OSError, ValueError):
    return []
  return [*previous.get("earlier_invocations", []), *([previous["this_invocation"]] if "this_invocation" in previous
                                                        else [])]


def _write(workdir: epath.Path, objective: str, grid: list[tuple[str, list]], rows: list[dict],
           invocation: dict, earlier: list[dict]) -> None:
  write_json(workdir / "sweep.json", {
      "objective": {"name": objective, "definition": OBJECTIVES[objective].definition, "split": "validation"},
      "grid": {k: v for k, v in grid}, "points": _ranked(rows, "objective"), "settings": _ranked(_settings(rows),
                                                                                                "objective"),
      "validation_vs_evaluation": rank_agreement(rows, objective),
      "this_invocation": invocation, "earlier_invocations": earlier})
  write_text_atomic(workdir / "sweep.md", sweep_markdown(workdir, objective, grid, rows))


def _flag(name: str, define: Callable):
  """dcr_jax.main's flag `name` when importing it defined one (so points parse --config exactly as main does),
  else a new one."""
  return flags.FLAGS[name] if name in flags.FLAGS else define()


def _define_flags() -> dict:
  """The command line's flags, defined only when run as a program."""
  return {
      "config": _flag("config", lambda: config_flags.DEFINE_config_file("config", None, "Pipeline config file.")),
      "workdir": _flag("workdir", lambda: flags.DEFINE_string("workdir", None, "Sweep directory.")),
      "grid": flags.DEFINE_multi_string("grid", [], "KEY=V1,V2,… (repeatable): a config key and its values."),
      "seeds": flags.DEFINE_string("seeds", "", "Comma-separated seeds, each run at every setting (default: "
                                   "config.seed)."),
      "objective": flags.DEFINE_string("objective", "margin", f"Validation objective: {', '.join(OBJECTIVES)}."),
      "record_only": flags.DEFINE_bool("record_only", False, "Rewrite sweep.json/.md from the points already "
                                       "finished (the rest pending) and run nothing."),
      "compilation_cache": flags.DEFINE_string("compilation_cache", "<workdir>/jax_cache", "JAX's persistent "
                                               "compilation cache: points whose programs are the same (e.g. seeds) "
                                               "and re-runs reuse compiled steps; '' = off."),
  }


def main(argv):
  f = {name: flag.value for name, flag in _FLAGS.items()}
  if len(argv) > 1 or f["config"] is None or not f["workdir"]:
    print("error: give --config=FILE[:VARIANT] and --workdir=DIR (and no other arguments)", file=sys.stderr)
    sys.exit(2)

  def body() -> str:
    workdir = check_workdir(f["workdir"])
    if f["compilation_cache"]:  # before anything compiles: JAX decides at the first compilation
      jax.config.update("jax_compilation_cache_dir", f["compilation_cache"].replace("<workdir>", str(workdir)))
    result = run_sweep(f["config"], workdir, parse_grid(f["grid"], f["config"]),
                       parse_seeds(f["seeds"], f["config"].seed), f["objective"], record_only=f["record_only"])
    run = result["this_invocation"]
    built, copied = run["model_build_seconds"], run["model_copy_seconds"]
    reuse = f"; model built {len(built)}× ({sum(built):.1f} s), copied {len(copied)}× ({sum(copied):.1f} s)"
    return (f"done: {workdir / 'sweep.md'} ({len(result['points'])} points: {run['ran']} run, {run['skipped']} "
            f"already finished{reuse if built else ''})")

  run_command(body)


if __name__ == "__main__":
  _FLAGS = _define_flags()
  app.run(main)
