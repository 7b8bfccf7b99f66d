"""Pipeline plumbing shared by the entry points: model + tokenizer from the spec, restoring a stage's model through
its program, workdir files, the report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from flax import nnx

from dcr_jax import checkpoints, parallel
from dcr_jax.config import base_config
from dcr_jax.spec import TRAINING_STAGES, Spec
from dcr_jax.errors import UserError
from dcr_jax.model import Decoder
from dcr_jax.train import align, refine
from dcr_jax.weights import embedded_gguf_path, load_model, load_tokenizer
from dcr_jax.weights.sources import GGUFSource
from dcr_jax.weights.tokenizer import tiny_tokenizer, with_chat_template
from dcr_jax.workdir_io import as_path, ensure_dir, is_main_process, write_json

BUILTIN_DIR = Path(__file__).resolve().parent / "data" / "builtin"


def builtin_corpus() -> list[str]:
  """All text of the built-in demo data (the tiny tokenizer is trained on it)."""
  texts = []
  for path in sorted(BUILTIN_DIR.glob("*.jsonl")):
    for line in path.read_text(encoding="utf-8").splitlines():
      record = json.loads(line)
      texts += [record[k] for k in ("prompt", "response") if record.get(k)]
  return texts


def build_model(spec: Spec, mesh=None) -> tuple[Decoder, object]:
  """(model, tokenizer): random-init when model.random_init, else loaded from the weights or the variant, each
  tensor placed straight onto its sharding over `mesh`; activation constraints on when mesh.constrain_activations."""
  place = None if mesh is None else parallel.placement(mesh)
  m = spec.model
  if m.random_init:
    model = Decoder(m.architecture, rngs=nnx.Rngs(spec.seed))
    if m.architecture.vocab_size <= 4096:
      tokenizer = with_chat_template(tiny_tokenizer(m.architecture.vocab_size, builtin_corpus()), m.chat_template)
    else:
      tokenizer = load_tokenizer(GGUFSource(embedded_gguf_path()), m.tokenizer or None, m.chat_template)
  else:
    model, tokenizer = load_model(m.weights or m.name, place=place, dtype=m.dtype, tokenizer=m.tokenizer or None,
                                  chat_template=m.chat_template, scan_layers=m.scan_layers,
                                  progress=is_main_process())
    model.config = model.config.replace(remat=m.remat)
  if spec.mesh.constrain_activations and mesh is not None:
    model.constrain_activations = parallel.activation_constraint(mesh)
  return model, tokenizer


class ModelCache:
  """Models built once per (model spec, random-init seed, mesh), each caller getting its own copy of the weights
  (training donates its state's buffers, so two runs never share arrays): a sweep loads the weights and tokenizer
  once for all its points. `build_seconds` and `copy_seconds` list what each build and each copy took."""

  def __init__(self):
    self._built = {}
    self.build_seconds: list[float] = []
    self.copy_seconds: list[float] = []

  def get(self, spec: Spec, mesh=None) -> tuple[Decoder, object]:
    """(a copy of the model, the tokenizer) for `spec`, as `build_model(spec, mesh)` returns them."""
    key = (spec.model, spec.seed if spec.model.random_init else None, spec.mesh, mesh)
    if key not in self._built:
      started = time.perf_counter()
      self._built[key] = build_model(spec, mesh)
      self.build_seconds.append(time.perf_counter() - started)
    model, tokenizer = self._built[key]
    started = time.perf_counter()
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, jax.block_until_ready(jax.tree.map(jnp.copy, state)))
    self.copy_seconds.append(time.perf_counter() - started)
    return copy, tokenizer


STAGE_PROGRAMS = {"refine": refine.program, "align": align.program}


def restore_stage(spec: Spec, model: Decoder, workdir: epath.PathLike, stage: str, step: int | None = None) -> Decoder:
  """The model a stage's checkpoint holds (latest when step is None), built through the stage's own program (so a
  LoRA `align` gets its adapters first): evaluation, kernels and export all restore through here."""
  stage_program = STAGE_PROGRAMS[stage](spec, model.config)
  return checkpoints.restore_into(stage_program.adapt(model), workdir, stage, step)


def restore_trained(spec: Spec, model: Decoder, workdir: epath.PathLike) -> Decoder:
  """The last trained model of a workdir: its align checkpoint, else its refine one, else `model` unchanged."""
  last = checkpoints.last_trained(workdir)
  return model if last is None else restore_stage(spec, model, workdir, *last)


TRAINING_KEYS = ("seed", "model", "data", "refine", "align")  # what a resumed run must keep unchanged


def _training_stages(stages: str) -> list[str]:
  return [s.strip() for s in str(stages).split(",") if s.strip() in TRAINING_STAGES]


def prepare_workdir(workdir: epath.PathLike, config: ml_collections.ConfigDict) -> None:
  """Creates the workdir and writes config.json, after `resumable_config` has checked it against the run there."""
  workdir = as_path(workdir)
  resolved = resumable_config(workdir, config)
  ensure_dir(workdir)
  write_json(workdir / "config.json", resolved)


def resumable_config(workdir: epath.PathLike, config: ml_collections.ConfigDict) -> dict:
  """The config.json that running `config` in `workdir` would write; touches nothing. A re-run resumes, so it must
  keep the training settings; the stages it runs may differ only by leaving training out (e.g.
  `--config.stages=evaluate` on a trained workdir), and then the saved stages are kept."""
  config_file = as_path(workdir) / "config.json"
  resolved = json.loads(config.to_json_best_effort())
  if config_file.is_file():
    previous = _with_defaults(json.loads(config_file.read_text()), json.loads(base_config().to_json_best_effort()))
    changed = _first_difference({k: previous.get(k) for k in TRAINING_KEYS}, {k: resolved.get(k) for k in
                                                                              TRAINING_KEYS})
    new_training = _training_stages(config.stages)
    if not changed and new_training and new_training != _training_stages(previous.get("stages", "")):
      changed = "config.stages"
    if changed:
      raise UserError(f"{config_file}: key {changed} differs from the run already in this workdir; "
                      "use a new --workdir or delete it")
    if not new_training:
      resolved["stages"] = previous.get("stages")
  return resolved


def _with_defaults(saved: dict, defaults: dict) -> dict:
  """A config.json written before keys were added to the schema, with those keys at their defaults (so a workdir
  from an earlier version resumes unless a new key is set away from its default)."""
  out = dict(saved)
  for key, value in defaults.items():
    if key not in out:
      out[key] = value
    elif isinstance(value, dict) and isinstance(out[key], dict):
      out[key] = _with_defaults(out[key], value)
  return out


def _first_difference(a, b, prefix="config") -> str | None:
  if isinstance(a, dict) and isinstance(b, dict):
    for key in sorted(set(a) | set(b)):
      found = _first_difference(a.get(key), b.get(key), f"{prefix}.{key}")
      if found:
        return found
    return None
  return None if a == b else prefix
