"""Stage 2, safety SFT (the STL recipe): general instructions + harmful→refusal pairs (+ STL-aug pairs)."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dcr_jax.data.batching import SFTMixture, SFTSet, load_refusals, load_spec_list, tokenize_pairs, with_refusals
from dcr_jax.data.loaders import DataError
from dcr_jax.errors import UserError
from dcr_jax.model import Decoder, ModelConfig
from dcr_jax.model.lora import attach_lora
from dcr_jax.parallel.mesh import batch_shards
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
  micro_rows = ac.batch_size // ac.grad_accum
  groups = math.gcd(micro_rows, batch_shards(spec.mesh))  # loss-position groups per microbatch, one per shard
  group_rows = micro_rows // groups
  shapes = {k: ((ac.batch_size, ac.max_len), dtype) for k, dtype in BATCH_KEYS.items()}
  shapes["loss_index"] = ((ac.grad_accum * groups, group_rows * ac.max_len), jnp.int32)  # planned at its widest

  def batches(i, rows=lambda size: slice(None)):
    batch = data.mixture.batch(i, rows(ac.batch_size))
    width = loss_width(data.mixture.loss_counts(i), group_rows, ac.max_len)
    return {**batch, "loss_index": loss_index(batch["loss_mask"], group_rows, width)}

  return StageProgram(
      name="align", trainable=trainable_filter("lora" if lora else "full"), optimizer=optimizer,
      make_step=lambda graphdef: make_align_step(graphdef, optimizer, grad_accum=ac.grad_accum),
      batch_shapes={k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()},
      steps=ac.steps, log_every=ac.log_every, **({"adapt": with_lora} if lora else {}),
      batches=None if data is None else batches)


def loss_width(row_counts: np.ndarray, group_rows: int, max_len: int, buckets: int = 8) -> int:
  """Positions per group that hold every group's loss tokens (`row_counts` [B], the global batch's), rounded up to
  one of `buckets` widths so a run compiles at most that many step shapes. Every process computes the same."""
  widest = group_rows * max_len
  bucket = max(1, -(-widest // buckets))
  most = int(row_counts.reshape(-1, group_rows).sum(axis=1).max())
  return min(widest, max(bucket, -(-most // bucket) * bucket))


def loss_index(loss_mask: np.ndarray, group_rows: int, width: int) -> np.ndarray:
  """[B T] loss mask -> [B/group_rows, width] int32: each group's loss positions in its flattened rows, -1 padded."""
  flat = loss_mask.reshape(-1, group_rows * loss_mask.shape[1])
  out = np.full((flat.shape[0], width), -1, np.int32)
  for g, row in enumerate(flat):
    where = np.flatnonzero(row)
    out[g, :len(where)] = where
  return out


def run(spec: Spec, stage: StageProgram, data: AlignData, model: Decoder, ctx: TrainContext) -> tuple[Decoder, dict]:
  """Trains stage 2 and returns (aligned model, summary with the examples per source)."""
  model, summary = train_stage(stage, model, ctx)
  summary["examples"] = {name: len(s) for name, s in data.sources.items()}
  return model, summary
