"""Stage 2, safety SFT (the STL recipe): general instructions + harmful→refusal pairs (+ STL-aug pairs)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from dcr_jax.data.batching import SFTMixture, SFTSet, load_refusals, load_spec_list, tokenize_pairs, with_refusals
from dcr_jax.data.loaders import DataError
from dcr_jax.errors import UserError
from dcr_jax.model import Decoder, ModelConfig
from dcr_jax.model.lora import attach_lora
from dcr_jax.train.loop import StageProgram, TrainContext, train_stage
from dcr_jax.train.state import make_optimizer, trainable_filter
from dcr_jax.train.steps import make_align_step

if TYPE_CHECKING:  # the spec is read, never built, here: training does not import the spec's checks
  from dcr_jax.spec import Spec

BATCH_KEYS = {"tokens": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32, "segments": jnp.int32,
              "positions": jnp.int32}


@dataclasses.dataclass(frozen=True)
class AlignData:
  """Stage 2's tokenized SFT sources by name (general, safety and, for STL-aug, aug) and their mixture."""

  sources: dict[str, SFTSet]
  mixture: SFTMixture


def load_data(spec: Spec, tokenizer) -> AlignData:
  """Loads and tokenizes stage 2's data; raises UserError naming the key before anything is written."""
  data, ac, seed = spec.data, spec.align, spec.seed
  general = load_spec_list(data.general, label="benign", n=data.n_general, seed=seed, key="data.general")
  missing = sum(1 for r in general if not r.get("response"))
  if missing:
    raise DataError("config.data.general", f"{missing} records have no response; SFT needs instruction→response "
                    "pairs (e.g. Alpaca-style files)")
  refusals = load_refusals(data.refusals) if data.refusals else []
  harmful = with_refusals(load_spec_list(data.harmful, label="toxic", n=data.n_harmful, seed=seed,
                                         key="data.harmful"), refusals)
  sources = {"general": tokenize_pairs(tokenizer, general, ac.max_len),
             "safety": tokenize_pairs(tokenizer, harmful, ac.max_len)}
  if ac.aug_weight > 0:
    aug = [r for r in load_spec_list(data.helpful_seemingly, label="seemingly_toxic", key="data.helpful_seemingly")
           if r.get("response")]
    if not aug:
      raise UserError("config.data.helpful_seemingly has no prompt→helpful-response pairs; STL-aug needs them")
    sources["aug"] = tokenize_pairs(tokenizer, aug, ac.max_len)
  weights = {"general": ac.general_weight, "safety": ac.safety_weight, "aug": ac.aug_weight}
  return AlignData(sources, SFTMixture(sources, weights, ac.batch_size, ac.max_len, seed, pack=ac.pack))


def program(spec: Spec, architecture: ModelConfig, data: AlignData | None = None) -> StageProgram:
  """Stage 2 as a value: LoRA (align.lora_rank > 0, adapters attached by `adapt`) or full fine-tuning with masked
  CE on response tokens. Without `data` it has shapes but no batches (planning)."""
  ac = spec.align
  optimizer = make_optimizer(lr=ac.lr, steps=ac.steps, warmup=ac.warmup, weight_decay=ac.weight_decay, clip=ac.clip)

  def with_lora(model: Decoder) -> Decoder:
    """A copy of `model` with fresh adapters on the configured projections (`model` itself is untouched)."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)
    attach_lora(copy, rank=ac.lora_rank, alpha=ac.lora_alpha, targets=ac.lora_targets,
                rngs=nnx.Rngs(spec.seed + 2))
    return copy

  lora = ac.lora_rank > 0
  return StageProgram(
      name="align", trainable=trainable_filter("lora" if lora else "full"), optimizer=optimizer,
      make_step=lambda graphdef: make_align_step(graphdef, optimizer, grad_accum=ac.grad_accum),
      batch_shapes={k: jax.ShapeDtypeStruct((ac.batch_size, ac.max_len), dtype) for k, dtype in BATCH_KEYS.items()},
      steps=ac.steps, log_every=ac.log_every, **({"adapt": with_lora} if lora else {}),
      batches=None if data is None else lambda i, rows=lambda size: slice(None): data.mixture.batch(
          i, rows(ac.batch_size)))


def run(spec: Spec, stage: StageProgram, data: AlignData, model: Decoder, ctx: TrainContext) -> tuple[Decoder, dict]:
  """Trains stage 2 and returns (aligned model, summary with the examples per source)."""
  model, summary = train_stage(stage, model, ctx)
  summary["examples"] = {name: len(s) for name, s in data.sources.items()}
  return model, summary
