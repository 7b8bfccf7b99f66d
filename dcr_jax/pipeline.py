"""Pipeline plumbing shared by the stages: model + tokenizer from config, workdir files, the report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import ml_collections
from etils import epath
from flax import nnx

from dcr_jax.errors import UserError
from dcr_jax.model import Decoder, ModelConfig, get_variant, stack_layers, tiny
from dcr_jax.weights import load_model
from dcr_jax.weights.tokenizer import tiny_tokenizer
from dcr_jax.workdir_io import as_path, ensure_dir, write_text_atomic

BUILTIN_DIR = Path(__file__).resolve().parent / "data" / "builtin"


@dataclasses.dataclass
class Context:
  """What every stage gets: the resolved config, the workdir, the model and its tokenizer."""

  config: ml_collections.ConfigDict
  workdir: epath.Path  # local directory or gs://… URI (dcr_jax.workdir_io)
  model: Decoder
  tokenizer: object
  mesh: jax.sharding.Mesh
  writer: object  # train.loop.MetricsWriter


def builtin_corpus() -> list[str]:
  """All text of the built-in demo data (the tiny tokenizer is trained on it)."""
  texts = []
  for path in sorted(BUILTIN_DIR.glob("*.jsonl")):
    for line in path.read_text(encoding="utf-8").splitlines():
      record = json.loads(line)
      texts += [record[k] for k in ("prompt", "response") if record.get(k)]
  return texts


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The architecture named by config.model.name (`tiny-<family>` for random-init tiny models)."""
  name = config.model.name
  common = dict(dtype=config.model.dtype, param_dtype=config.model.dtype, remat=config.model.remat,
                scan_layers=config.model.scan_layers)
  if name.startswith("tiny-"):
    return tiny(name[len("tiny-"):], **common)
  return get_variant(name).replace(**common)


def build_model(config: ml_collections.ConfigDict, mesh=None) -> tuple[Decoder, object]:
  """(model, tokenizer): random-init when config.model.random_init, else loaded from weights or the variant,
  each tensor placed straight onto its sharding over `mesh`."""
  from dcr_jax import parallel

  place = None if mesh is None else parallel.placement(mesh)
  if config.model.random_init:
    cfg = model_config(config)
    model = Decoder(cfg, rngs=nnx.Rngs(config.seed))
    if cfg.vocab_size <= 4096:
      return model, tiny_tokenizer(cfg.vocab_size, builtin_corpus())
    from dcr_jax.weights import embedded_gguf_path, load_tokenizer
    from dcr_jax.weights.sources import GGUFSource
    return model, load_tokenizer(GGUFSource(embedded_gguf_path()), config.model.tokenizer or None)
  spec = config.model.weights or config.model.name
  model, tokenizer = load_model(spec, place=place, dtype=config.model.dtype,
                                tokenizer=config.model.tokenizer or None, progress=is_main_process())
  model.config = model.config.replace(remat=config.model.remat)
  if config.model.scan_layers:
    model = stack_layers(model, place=place)
  return model, tokenizer


def is_main_process() -> bool:
  return jax.process_index() == 0


def write_json(path: epath.PathLike, data) -> None:
  """Atomic JSON write by process 0 only: a crash never leaves a half-written file (temp file + rename for a local
  path, one object write for gs://…)."""
  if not is_main_process():
    return
  write_text_atomic(path, json.dumps(data, indent=2, default=str))


TRAINING_KEYS = ("seed", "model", "data", "refine", "align")  # what a resumed run must keep unchanged


def training_stages(stages: str) -> list[str]:
  return [s.strip() for s in str(stages).split(",") if s.strip() in ("refine", "align")]


def prepare_workdir(workdir: epath.PathLike, config: ml_collections.ConfigDict) -> None:
  """Creates the workdir and writes config.json. A re-run resumes, so it must keep the training settings; the
  stages it runs may differ only by leaving training out (e.g. `--config.stages=evaluate` on a trained workdir)."""
  workdir = as_path(workdir)
  config_file = workdir / "config.json"
  resolved = json.loads(config.to_json_best_effort())
  if config_file.is_file():
    previous = json.loads(config_file.read_text())
    changed = _first_difference({k: previous.get(k) for k in TRAINING_KEYS}, {k: resolved.get(k) for k in
                                                                              TRAINING_KEYS})
    new_training = training_stages(config.stages)
    if not changed and new_training and new_training != training_stages(previous.get("stages", "")):
      changed = "config.stages"
    if changed:
      raise UserError(f"{config_file}: key {changed} differs from the run already in this workdir; "
                      "use a new --workdir or delete it")
    if not new_training:
      resolved["stages"] = previous.get("stages")
  ensure_dir(workdir)
  write_json(config_file, resolved)


def _first_difference(a, b, prefix="config") -> str | None:
  if isinstance(a, dict) and isinstance(b, dict):
    for key in sorted(set(a) | set(b)):
      found = _first_difference(a.get(key), b.get(key), f"{prefix}.{key}")
      if found:
        return found
    return None
  return None if a == b else prefix


def update_report(workdir: epath.PathLike, section: str, key: str | None, value) -> dict:
  """Merges one entry into DIR/report.json and rewrites it atomically."""
  path = as_path(workdir) / "report.json"
  report = json.loads(path.read_text()) if path.is_file() else {}
  if key is None:
    report[section] = value
  else:
    report.setdefault(section, {})[key] = value
  write_json(path, report)
  return report
