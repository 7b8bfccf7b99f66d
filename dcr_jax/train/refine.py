"""Stage 1, contrastive refinement: pull toxic and seemingly toxic prompts apart at layer ℓ; and the layer-ℓ probe
(pooled representations, a linear probe's held-out accuracy, class similarities) that shows the effect."""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dcr_jax.data.batching import BalancedSampler, PromptSet, SFTMixture, load_spec_list, tokenize_pairs, \
    tokenize_prompts
from dcr_jax.errors import UserError
from dcr_jax.model import Decoder, ModelConfig
from dcr_jax.train.loop import EarlyStopping, StageProgram, TrainContext, train_stage
from dcr_jax.train.state import make_optimizer, trainable_filter, with_anchor
from dcr_jax.train.steps import make_refine_step, pool

if TYPE_CHECKING:  # the spec is read, never built, here: training does not import the spec's checks
  from dcr_jax.spec import Spec


@dataclasses.dataclass(frozen=True)
class RefineData:
  """Stage 1's tokenized data: labelled prompts (train and probe holdout), and the LM-retention mixture if any."""

  train: PromptSet
  holdout: PromptSet
  sampler: BalancedSampler
  lm_batches: SFTMixture | None


def load_data(spec: Spec, tokenizer) -> RefineData:
  """Loads and tokenizes stage 1's data; raises UserError naming the key before anything is written."""
  data, seed = spec.data, spec.seed
  records = (load_spec_list(data.toxic, label="toxic", n=data.n_toxic, seed=seed, key="data.toxic")
             + load_spec_list(data.seemingly_toxic, label="seemingly_toxic", n=data.n_seemingly_toxic, seed=seed,
                              key="data.seemingly_toxic"))
  if data.benign_class:
    records += load_spec_list(data.benign_class, label="benign", seed=seed, key="data.benign_class")
  for label, key in (("toxic", "data.toxic"), ("seemingly_toxic", "data.seemingly_toxic")):
    if not any(r["label"] == label for r in records):
      raise UserError(f"config.{key}: the {label} class is empty; give at least one prompt set")
  order = np.random.default_rng(seed).permutation(len(records))
  n_holdout = int(len(records) * spec.refine.holdout)
  holdout = [records[i] for i in order[:n_holdout]]
  train = [records[i] for i in order[n_holdout:]]
  rc = spec.refine
  train_set = tokenize_prompts(tokenizer, train, rc.max_len)
  return RefineData(train=train_set, holdout=tokenize_prompts(tokenizer, holdout, rc.max_len),
                    sampler=BalancedSampler(train_set.labels, rc.batch_size, rc.class_ratio, seed),
                    lm_batches=_lm_batches(spec, tokenizer) if rc.lm_weight > 0 else None)


def _lm_batches(spec: Spec, tokenizer) -> SFTMixture:
  """General instruction data for the optional LM-retention term (packed like stage 2)."""
  general = load_spec_list(spec.data.general, label="benign", key="data.general")
  pairs = tokenize_pairs(tokenizer, [r for r in general if r.get("response")], spec.align.max_len)
  return SFTMixture({"general": pairs}, {"general": 1.0}, spec.refine.lm_batch_size, spec.align.max_len, spec.seed + 1)


LM_KEYS = {"lm_tokens": "tokens", "lm_targets": "targets", "lm_mask": "loss_mask", "lm_segments": "segments",
           "lm_positions": "positions"}


def program(spec: Spec, architecture: ModelConfig, data: RefineData | None = None) -> StageProgram:
  """Stage 1 as a value: layers ≤ ℓ (and the embedding) trained by the configured contrastive loss (plus the
  LM-retention term when refine.lm_weight > 0 and the L2-SP term when refine.l2sp > 0), stopped early when
  refine.patience > 0. Without `data` it has shapes but no batches (planning)."""
  rc = spec.refine
  optimizer = make_optimizer(lr=rc.lr, steps=rc.steps, warmup=rc.warmup, weight_decay=rc.weight_decay, clip=rc.clip)
  if rc.l2sp > 0:
    optimizer = with_anchor(optimizer)
  shapes = {"tokens": ((rc.batch_size, rc.max_len), jnp.int32), "mask": ((rc.batch_size, rc.max_len), jnp.int32),
            "labels": ((rc.batch_size,), jnp.int32)}
  if rc.lm_weight > 0:
    lm_shape = (rc.lm_batch_size, spec.align.max_len)
    shapes.update({k: (lm_shape, jnp.float32 if k == "lm_mask" else jnp.int32) for k in LM_KEYS})

  def batches(i: int, rows: Callable[[int], slice] = lambda size: slice(None)) -> dict:
    batch = data.train.take(data.sampler.indices(i)[rows(rc.batch_size)])
    if data.lm_batches is not None:
      lm = data.lm_batches.batch(i, rows(rc.lm_batch_size))
      batch.update({k: lm[v] for k, v in LM_KEYS.items()})
    return batch

  return StageProgram(
      name="refine", trainable=trainable_filter("refine", max(rc.layers)), optimizer=optimizer,
      make_step=lambda graphdef: make_refine_step(graphdef, optimizer, layers=rc.layers, pooling=rc.pooling,
                                                  loss=rc.loss, loss_kwargs=rc.loss_kwargs, lm_weight=rc.lm_weight,
                                                  l2sp=rc.l2sp),
      batch_shapes={k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()},
      steps=rc.steps, log_every=rc.log_every, batches=None if data is None else batches,
      early_stopping=EarlyStopping("contrastive", rc.patience, rc.min_delta) if rc.patience else None)


def run(spec: Spec, stage: StageProgram, data: RefineData, model: Decoder, ctx: TrainContext) -> tuple[Decoder, dict]:
  """Trains stage 1 and returns (refined model, summary with ℓ and the layer-ℓ probe before and after)."""
  rc = spec.refine
  probe_before = _probe(model, data, rc.layers[0], rc.pooling) if rc.probe else {}
  model, summary = train_stage(stage, model, ctx)
  summary["layers"] = list(rc.layers)
  if rc.probe:
    summary["probe"] = {"before": probe_before, "after": _probe(model, data, rc.layers[0], rc.pooling)}
  return model, summary


def _probe(model, data: RefineData, layer: int, pooling: str) -> dict:
  x_train = embed_prompts(model, data.train, layer=layer, pooling=pooling)
  x_hold = embed_prompts(model, data.holdout, layer=layer, pooling=pooling)
  out = mean_similarities(x_hold, data.holdout.labels)
  if len(data.holdout) and len(set(data.holdout.labels.tolist())) > 1:
    out["heldout_accuracy"] = probe_accuracy(x_train, data.train.labels, x_hold, data.holdout.labels)
  return out


# ------------------------------------------------------------------------------------------------ the layer-ℓ probe


@functools.partial(jax.jit, static_argnames=("graphdef", "layer", "pooling"))
def _pooled(graphdef, state, tokens, mask, *, layer: int, pooling: str):
  model = nnx.merge(graphdef, state)
  return pool(model(tokens, mask=mask, stop_at_layer=layer).hidden[layer], mask, pooling)


def embed_prompts(model, prompts: PromptSet, *, layer: int, pooling: str, batch_size: int = 16) -> np.ndarray:
  """[N D] L2-normalised pooled residual stream at `layer` for every prompt (computes nothing above it)."""
  graphdef, state = nnx.split(model)
  out = []
  for start in range(0, len(prompts), batch_size):
    index = np.arange(start, min(start + batch_size, len(prompts)))
    index = np.pad(index, (0, batch_size - len(index)), mode="edge")  # one compiled shape
    batch = prompts.take(index)
    out.append(np.asarray(_pooled(graphdef, state, batch["tokens"], batch["mask"], layer=layer, pooling=pooling)))
  return np.concatenate(out)[:len(prompts)]


def probe_accuracy(train_x, train_y, test_x, test_y, ridge: float = 1e-2) -> float:
  """Held-out accuracy of a ridge-regression linear classifier (closed form) separating class 0 from the rest."""
  def design(x):
    return np.concatenate([x, np.ones((len(x), 1))], axis=1)

  x = design(np.asarray(train_x, np.float64))
  y = np.where(np.asarray(train_y) == 0, 1.0, -1.0)
  w = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ y)
  predicted = design(np.asarray(test_x, np.float64)) @ w > 0
  return float(np.mean(predicted == (np.asarray(test_y) == 0)))


def mean_similarities(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
  """Mean cosine similarity within classes and across classes 0 and 1 (rows already normalised)."""
  s = x @ x.T
  same = (y[:, None] == y[None, :]) & ~np.eye(len(y), dtype=bool)
  cross = (y[:, None] == 0) & (y[None, :] == 1)
  return {"within": float(s[same].mean()) if same.any() else 0.0,
          "across": float(s[cross].mean()) if cross.any() else 0.0}
