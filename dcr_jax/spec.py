"""The config resolved once into a typed, frozen `Spec`: tuples, enums, parsed data sources. Every check of the config
lives here and fails with one line naming the key and the fix; every entry point reads the spec."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Callable, Sequence

import ml_collections

from dcr_jax.data.batching import parse_selectors
from dcr_jax.errors import UserError
from dcr_jax.evaluate.capability import check_tasks
from dcr_jax.evaluate.generate import DECODE_WEIGHTS
from dcr_jax.evaluate.refusal import make_judge
from dcr_jax.evaluate.suites import get_suite
from dcr_jax.kernels.ntk import KINDS as KERNEL_PARAMS, METHODS as KERNEL_METHODS
from dcr_jax.model import ModelConfig, get_variant, tiny
from dcr_jax.model.lora import TARGETS as LORA_TARGETS
from dcr_jax.steer.stage import METHODS as STEER_METHODS
from dcr_jax.weights.gguf_writer import QUANTS as GGUF_QUANTS

class Stage(enum.StrEnum):
  DEMO = "demo"
  REFINE = "refine"
  ALIGN = "align"
  EVALUATE = "evaluate"
  STEER = "steer"


TRAINING_STAGES = (Stage.REFINE, Stage.ALIGN)


class Loss(enum.StrEnum):
  CIRCLE = "circle"
  SUPCON = "supcon"
  INFONCE = "infonce"
  TRIPLET = "triplet"


LOSS_KWARGS = {Loss.CIRCLE: ("margin", "gamma"), Loss.TRIPLET: ("margin",), Loss.SUPCON: ("temperature",),
               Loss.INFONCE: ("temperature",)}


class Pooling(enum.StrEnum):
  LAST = "last"
  MEAN = "mean"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  name: str
  weights: str
  tokenizer: str
  chat_template: str | None  # a Jinja template replacing the tokenizer's own; None = its own
  dtype: str
  random_init: bool
  remat: str
  scan_layers: bool
  architecture: ModelConfig  # of the named variant (or tiny family); loaded weights may refine it (`Spec.bind`)


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  data: int
  fsdp: int
  tensor: int
  constrain_activations: bool


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Each source list is a tuple of `SPEC[#LABEL][@START:STOP[:STEP]]` entries, checked at resolution."""

  toxic: tuple[str, ...]
  seemingly_toxic: tuple[str, ...]
  benign_class: tuple[str, ...]
  general: tuple[str, ...]
  harmful: tuple[str, ...]
  refusals: tuple[str, ...]
  helpful_seemingly: tuple[str, ...]
  val_toxic: tuple[str, ...]
  val_seemingly_toxic: tuple[str, ...]
  n_toxic: int | None  # None = all
  n_seemingly_toxic: int | None
  n_general: int | None
  n_harmful: int | None
  n_val: int | None


@dataclasses.dataclass(frozen=True)
class OptimSpec:
  steps: int
  batch_size: int
  max_len: int
  lr: float
  warmup: int
  weight_decay: float
  clip: float
  log_every: int


@dataclasses.dataclass(frozen=True)
class RefineSpec(OptimSpec):
  layer: str | int | tuple  # as configured: "middle", 9 or "6,9"
  layers: tuple[int, ...]  # ℓ resolved (blocks from the embedding): sorted, within 1..num_layers
  pooling: Pooling
  loss: Loss
  loss_kwargs: dict
  class_ratio: tuple[float, ...]  # toxic, seemingly_toxic[, benign]
  lm_weight: float
  lm_batch_size: int
  l2sp: float  # λ of λ·Σ‖θ−θ₀‖² over the trained params, θ₀ = their values at the stage's start
  patience: int  # logged steps without improvement of the contrastive loss before stopping; 0 = never stop early
  min_delta: float
  holdout: float
  probe: bool


@dataclasses.dataclass(frozen=True)
class AlignSpec(OptimSpec):
  grad_accum: int
  pack: bool
  lora_rank: int  # 0 = full fine-tuning
  lora_alpha: float
  lora_targets: tuple[str, ...]
  general_weight: float
  safety_weight: float
  aug_weight: float


@dataclasses.dataclass(frozen=True)
class EvaluateSpec:
  suites: tuple[tuple[str, int | None, slice | None], ...]  # (suite name, prompts (None = all), rows)
  data_root: str | None
  max_new_tokens: int
  batch_size: int
  bucket: int
  temperature: float
  top_p: float
  judge: str
  refusal_prob: bool
  capability: tuple[str, ...]  # general-capability tasks (none = not evaluated)
  capability_n: int | None  # questions per task; None = all
  capability_root: str | None  # the tasks' data folder; None = dcr_jax.evaluate.capability's default
  decode_weights: str = "float32"  # generation's weight matrices (bfloat16: half the bytes per decode step)


@dataclasses.dataclass(frozen=True)
class KernelsSpec:
  n_per_group: int
  top_k: int
  params: str
  layer: int
  last_n: int
  method: str
  chunk_size: int
  out_chunk: int | None  # None = all of S at once
  max_len: int


@dataclasses.dataclass(frozen=True)
class SteerSpec:
  method: str
  n_train: int | None  # None = all
  n_val: int
  layers: tuple[int, ...]  # () = every layer below the last 20%
  positions: int  # 0 = all post-instruction positions
  max_kl: float  # 0 = the method's default
  coefs: tuple[float, ...]  # () = the method's default grid
  keep_harmful: float
  strength: float
  add_coef: float
  affirmative: str
  system_prompt: str
  batch_size: int


EXPORT_FORMATS = ("hf", "peft", "gguf")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ExportSpec:
  formats: tuple[str, ...]  # written to DIR/export/<format>/ at the end of a run; () = none
  dtype: str
  quant: str
  max_shard_size: str
  ablate_direction: str  # a .npy direction the exported weights are orthogonalised against; "" = none


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
  coordinator_address: str  # host:port of process 0; "" on one host or a TPU pod (auto-detected)
  num_processes: int
  process_id: int
  heartbeat_timeout: int


@dataclasses.dataclass(frozen=True)
class Spec:
  """The config resolved once: typed, frozen, checked. Built by `resolve`; every entry point reads this."""

  stages: tuple[Stage, ...]
  seed: int
  model: ModelSpec
  mesh: MeshSpec
  data: DataSpec
  refine: RefineSpec
  align: AlignSpec
  checkpoint_every: int
  checkpoint_keep: int
  evaluate: EvaluateSpec
  steer: SteerSpec
  kernels: KernelsSpec
  export: ExportSpec
  distributed: DistributedSpec
  demo_prompts: tuple[str, ...]
  demo_max_new_tokens: int
  baseline: str = ""  # "stl": stage 2 from the base weights, evaluated beside this run

  @property
  def training_stages(self) -> tuple[Stage, ...]:
    return tuple(s for s in self.stages if s in TRAINING_STAGES)

  def bind(self, architecture: ModelConfig) -> "Spec":
    """The spec for the model actually loaded: its architecture, and ℓ resolved against its depth."""
    refine = dataclasses.replace(self.refine, layers=_layers(self.refine.layer, architecture.num_layers))
    return dataclasses.replace(self, model=dataclasses.replace(self.model, architecture=architecture), refine=refine)


def _fail(key: str, value, fix: str):
  raise UserError(f"config.{key}={value!r} {fix}")


def _items(value, key: str) -> tuple[str, ...]:
  """A comma string (the command line's form) or a sequence -> stripped, non-empty entries."""
  if isinstance(value, str):
    parts = value.split(",")
  elif isinstance(value, Sequence):
    parts = [str(v) for v in value]
  else:
    _fail(key, value, "is not a list; write comma-separated values")
  return tuple(p.strip() for p in parts if p.strip())


def _sources(value, key: str) -> tuple[str, ...]:
  entries = _items(value, key)
  for entry in entries:
    parse_selectors(entry)  # a bad @START:STOP fails here, before anything is loaded
  return entries


def _numbers(value, key: str, kind: Callable = float) -> tuple:
  try:
    return tuple(kind(x) for x in _items(value, key))
  except ValueError:
    _fail(key, value, f"is not a list of numbers; write e.g. {'1,1' if kind is float else '6,9'}")


def _choice(enum_type, value, key: str):
  try:
    return enum_type(value)
  except ValueError:
    _fail(key, value, f"is unknown; choose from {', '.join(m.value for m in enum_type)}")


def _count(value) -> int | None:
  return int(value) or None


def _layers(request, num_layers: int) -> tuple[int, ...]:
  """"middle" | 9 | "6,9" -> sorted layer indices in 1..num_layers (ℓ = after ℓ blocks)."""
  text = ",".join(str(x) for x in request) if isinstance(request, (list, tuple)) else str(request).strip()
  if text in ("middle", "", "-1"):
    return (num_layers // 2,)
  layers = _numbers(text, "refine.layer", int)
  if not layers or any(not 1 <= l <= num_layers for l in layers):
    _fail("refine.layer", request, f"is out of range; use 1..{num_layers} or 'middle'")
  return tuple(sorted(set(layers)))


def _template(value: str) -> str | None:
  """model.chat_template: "" (the tokenizer's own), a Jinja string, or a path to a file holding one."""
  if not value:
    return None
  if "{" in value:
    return value
  path = Path(value)
  if not path.is_file():
    _fail("model.chat_template", value, "is neither a Jinja template nor a file; give the template or its path")
  return path.read_text(encoding="utf-8")


def architecture(model: ml_collections.ConfigDict) -> ModelConfig:
  """The architecture config.model names (`tiny-<family>` for random-init tiny models), with its run settings."""
  common = dict(dtype=model.dtype, param_dtype=model.dtype, remat=model.remat, scan_layers=model.scan_layers)
  if model.name.startswith("tiny-"):
    return tiny(model.name[len("tiny-"):], **common)
  return get_variant(model.name).replace(**common)


def _optim(section: ml_collections.ConfigDict, key: str) -> dict:
  for name in ("steps", "batch_size", "max_len", "log_every"):
    if section[name] < (0 if name == "steps" else 1):
      _fail(f"{key}.{name}", section[name], "must be positive")
  return {name: section[name] for name in ("steps", "batch_size", "max_len", "lr", "warmup", "weight_decay", "clip",
                                           "log_every")}


def _refine(c: ml_collections.ConfigDict, num_layers: int) -> RefineSpec:
  rc = c.refine
  loss = _choice(Loss, rc.loss, "refine.loss")
  ratio = _numbers(rc.class_ratio, "refine.class_ratio")
  classes = 3 if _items(c.data.benign_class, "data.benign_class") else 2
  if len(ratio) != classes or any(r <= 0 for r in ratio):
    _fail("refine.class_ratio", rc.class_ratio, f"needs {classes} positive weights (toxic, seemingly_toxic"
          f"{', benign' if classes == 3 else ''})")
  for name in ("l2sp", "patience", "min_delta"):
    if rc[name] < 0:
      _fail(f"refine.{name}", rc[name], "must be >= 0 (0 = off)")
  return RefineSpec(**_optim(rc, "refine"), layer=rc.layer, layers=_layers(rc.layer, num_layers),
                    pooling=_choice(Pooling, rc.pooling, "refine.pooling"), loss=loss,
                    loss_kwargs={k: rc[k] for k in LOSS_KWARGS[loss]}, class_ratio=ratio, lm_weight=rc.lm_weight,
                    lm_batch_size=rc.lm_batch_size, l2sp=rc.l2sp, patience=rc.patience, min_delta=rc.min_delta,
                    holdout=rc.holdout, probe=rc.probe)


def _align(c: ml_collections.ConfigDict) -> AlignSpec:
  ac = c.align
  if ac.grad_accum < 1 or ac.batch_size % ac.grad_accum:
    _fail("align.grad_accum", ac.grad_accum, f"must divide align.batch_size={ac.batch_size}")
  targets = _items(ac.lora_targets, "align.lora_targets")
  unknown = [t for t in targets if t not in LORA_TARGETS]
  if ac.lora_rank > 0 and (unknown or not targets):
    _fail("align.lora_targets", ac.lora_targets, f"names unknown {unknown}; choose among {', '.join(LORA_TARGETS)}")
  return AlignSpec(**_optim(ac, "align"), grad_accum=ac.grad_accum, pack=ac.pack, lora_rank=ac.lora_rank,
                   lora_alpha=ac.lora_alpha, lora_targets=targets, general_weight=ac.general_weight,
                   safety_weight=ac.safety_weight, aug_weight=ac.aug_weight)


def _suites(value, default_n: int, required: bool) -> tuple[tuple[str, int | None, slice | None], ...]:
  """`NAME[:N][@START:STOP[:STEP]]` entries -> (name, prompts, rows): N defaults to evaluate.n (0 = all, None); the
  rows narrow the suite to a slice of its prompts (file order, before the subsample), e.g. to leave out rows that
  validate."""
  suites = {}
  for entry in _items(value, "evaluate.suites"):
    head, only, rows = _parse_rows(entry)
    name, _, count = head.partition(":")
    if only is not None or (count and not count.isdigit()):
      _fail("evaluate.suites", entry, "is not NAME[:N][@START:STOP[:STEP]]; write N as a number of prompts")
    get_suite(name)  # an unknown name lists the known ones
    if name in suites:
      _fail("evaluate.suites", entry, f"names {name} twice; give each suite once")
    suites[name] = (name, _count(int(count) if count else default_n), rows)
  if required and not suites:
    _fail("evaluate.suites", value, "is empty; name at least one suite (see README)")
  return tuple(suites.values())


def _parse_rows(entry: str):
  try:
    return parse_selectors(entry)
  except UserError as e:
    raise UserError(f"config.evaluate.suites: {e}") from None


def _evaluate(c: ml_collections.ConfigDict) -> EvaluateSpec:
  ec = c.evaluate
  make_judge(ec.judge)  # the judge spec is checked here; the judge itself is made by the stage
  required = Stage.EVALUATE in _items(c.stages, "stages")
  root = ec.capability_root or (f"{ec.data_root.rstrip('/')}/capability" if ec.data_root else None)
  tasks = _items(ec.capability, "evaluate.capability")
  if tasks and required:
    try:
      check_tasks(tasks, root)
    except UserError as e:
      raise UserError(f"config.evaluate.capability: {e}") from None
  if ec.capability_n < 0:
    _fail("evaluate.capability_n", ec.capability_n, "must be >= 0 (0 = every question)")
  if ec.decode_weights not in DECODE_WEIGHTS:
    _fail("evaluate.decode_weights", ec.decode_weights, f"is unknown; choose {' or '.join(DECODE_WEIGHTS)}")
  return EvaluateSpec(capability=tasks, capability_n=_count(ec.capability_n), capability_root=root,
                      suites=_suites(ec.suites, ec.n, required),
                      data_root=ec.data_root or None, max_new_tokens=ec.max_new_tokens, batch_size=ec.batch_size,
                      bucket=ec.bucket, temperature=ec.temperature, top_p=ec.top_p, judge=ec.judge,
                      refusal_prob=ec.refusal_prob, decode_weights=ec.decode_weights)


def _steer(c: ml_collections.ConfigDict, stages: tuple[Stage, ...], num_layers: int) -> SteerSpec:
  sc = c.steer
  if sc.method not in STEER_METHODS:
    _fail("steer.method", sc.method, f"is unknown; choose from {', '.join(STEER_METHODS)}")
  layers = _numbers(sc.layers, "steer.layers", int)
  if any(not 1 <= l <= num_layers for l in layers):
    _fail("steer.layers", sc.layers, f"is out of range; use layers 1..{num_layers} (after ℓ blocks) or ''")
  for key in ("n_train", "positions"):
    if sc[key] < 0:
      _fail(f"steer.{key}", sc[key], "must be >= 0 (0 = all)")
  for key in ("n_val", "batch_size"):
    if sc[key] < 1:
      _fail(f"steer.{key}", sc[key], "must be positive")
  if Stage.STEER in stages:
    training = [s.value for s in stages if s in TRAINING_STAGES]
    if training:
      _fail("stages", c.stages, f"mixes steer with training ({', '.join(training)}); steering is training-free: run "
            "steer,evaluate on a finished run's workdir (its trained model) or on a fresh one (the base model)")
    if _items(c.evaluate.capability, "evaluate.capability"):
      _fail("evaluate.capability", c.evaluate.capability, "is not scored under steering; evaluate capability in "
            "a run without the steer stage")
  return SteerSpec(method=sc.method, n_train=_count(sc.n_train), n_val=sc.n_val, layers=tuple(sorted(set(layers))),
                   positions=sc.positions, max_kl=sc.max_kl, coefs=_numbers(sc.coefs, "steer.coefs"),
                   keep_harmful=sc.keep_harmful, strength=sc.strength, add_coef=sc.add_coef,
                   affirmative=sc.affirmative, system_prompt=sc.system_prompt, batch_size=sc.batch_size)


def _kernels(c: ml_collections.ConfigDict) -> KernelsSpec:
  kc = c.kernels
  if kc.params not in KERNEL_PARAMS:
    _fail("kernels.params", kc.params, f"is unknown; choose from {', '.join(KERNEL_PARAMS)}")
  if kc.method not in KERNEL_METHODS:
    _fail("kernels.method", kc.method, f"is unknown; choose from {', '.join(KERNEL_METHODS)}")
  return KernelsSpec(n_per_group=kc.n_per_group, top_k=kc.top_k, params=kc.params, layer=kc.layer,
                     last_n=kc.last_n, method=kc.method, chunk_size=kc.chunk_size, out_chunk=kc.out_chunk or None,
                     max_len=kc.max_len)


def _export(c: ml_collections.ConfigDict) -> ExportSpec:
  xc = c.export
  formats = _items(xc.formats, "export.formats")
  unknown = [f for f in formats if f not in EXPORT_FORMATS]
  if unknown:
    _fail("export.formats", xc.formats, f"names unknown {unknown}; choose among {', '.join(EXPORT_FORMATS)}")
  if xc.dtype not in EXPORT_DTYPES:
    _fail("export.dtype", xc.dtype, f"is unknown; choose {', '.join(EXPORT_DTYPES)}")
  if xc.quant not in GGUF_QUANTS:
    _fail("export.quant", xc.quant, f"is a type the GGUF writer cannot produce; choose {', '.join(GGUF_QUANTS)}")
  if "peft" in formats and c.align.lora_rank == 0:
    _fail("export.formats", xc.formats, "asks peft of a full fine-tune (align.lora_rank=0); use hf")
  ablate = xc.ablate_direction
  if ablate and not Path(ablate).is_file() and Stage.STEER not in _items(c.stages, "stages"):
    _fail("export.ablate_direction", ablate, "is not a file; give a .npy direction (e.g. DIR/steer/false_refusal.npy "
          "of a surgical steer run) or ''")
  return ExportSpec(formats=formats, dtype=xc.dtype, quant=xc.quant, max_shard_size=xc.max_shard_size,
                    ablate_direction=ablate)


def _data(c: ml_collections.ConfigDict) -> DataSpec:
  d = c.data
  lists = {k: _sources(d[k], f"data.{k}") for k in ("toxic", "seemingly_toxic", "benign_class", "general", "harmful",
                                                     "refusals", "helpful_seemingly", "val_toxic",
                                                     "val_seemingly_toxic")}
  return DataSpec(**lists, **{k: _count(d[k]) for k in ("n_toxic", "n_seemingly_toxic", "n_general", "n_harmful",
                                                         "n_val")})


def resolve(config: ml_collections.ConfigDict) -> Spec:
  """The typed, frozen spec of `config`; raises UserError naming the first bad key and its fix."""
  stages = tuple(_choice(Stage, s, "stages") for s in _items(config.stages, "stages"))
  if not stages:
    _fail("stages", config.stages, "is empty; set e.g. --config.stages=refine,align,evaluate")
  for key in ("data", "fsdp", "tensor"):
    if config.mesh[key] == 0 or config.mesh[key] < -1:
      _fail(f"mesh.{key}", config.mesh[key], "is invalid; use a positive size or -1 to fill")
  m = config.model
  if m.dtype not in ("float32", "bfloat16"):
    _fail("model.dtype", m.dtype, "is unknown; choose float32 or bfloat16")
  arch = architecture(m)
  return Spec(
      stages=stages, seed=config.seed,
      model=ModelSpec(name=m.name, weights=m.weights, tokenizer=m.tokenizer, chat_template=_template(m.chat_template),
                      dtype=m.dtype, random_init=m.random_init,
                      remat=m.remat, scan_layers=m.scan_layers, architecture=arch),
      mesh=MeshSpec(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, config.mesh.constrain_activations),
      data=_data(config), refine=_refine(config, arch.num_layers), align=_align(config),
      checkpoint_every=config.checkpoint.every, checkpoint_keep=config.checkpoint.keep, evaluate=_evaluate(config),
      steer=_steer(config, stages, arch.num_layers),
      kernels=_kernels(config), export=_export(config), distributed=DistributedSpec(**config.distributed.to_dict()), demo_prompts=tuple(config.demo.prompts),
      demo_max_new_tokens=config.demo.max_new_tokens, baseline=_baseline(config.get("baseline", ""), stages))


BASELINE_STAGES = (Stage.REFINE, Stage.ALIGN, Stage.EVALUATE)


def _baseline(value: str, stages: tuple[Stage, ...]) -> str:
  """The baseline to run beside this one: "stl", or "" (none, also when the stages lack refine, align or evaluate:
  without them there is nothing to compare, e.g. `--config.stages=refine,align` on a config that sets one)."""
  if value not in ("", "stl"):
    _fail("baseline", value, "is unknown; use 'stl' (stage 2 from the base weights beside this run) or ''")
  return value if all(s in stages for s in BASELINE_STAGES) else ""


def check_batches(spec: Spec, mesh) -> None:
  """Each training stage's (micro)batch must split evenly over the data x fsdp devices."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  for stage, section, accum in ((Stage.REFINE, spec.refine, 1), (Stage.ALIGN, spec.align, spec.align.grad_accum)):
    size = section.batch_size // accum
    if stage in spec.stages and size % shards:
      raise UserError(f"config.{stage}.batch_size={section.batch_size} (per microbatch {size}) is not divisible by "
                      f"data*fsdp = {shards} devices; use a multiple of {shards}")
