"""Stage 1, contrastive refinement: pull toxic and seemingly toxic prompts apart at layer ℓ."""

from __future__ import annotations

import numpy as np

from dcr_jax.data.batching import BalancedSampler, SFTMixture, load_spec_list, tokenize_pairs, tokenize_prompts
from dcr_jax.errors import UserError
from dcr_jax.train import probe
from dcr_jax.train.state import make_optimizer, trainable_filter
from dcr_jax.train.steps import make_refine_step
from dcr_jax.train.runner import StageRun, load_validation


def parse_layers(spec, num_layers: int) -> list[int]:
  """"middle" | "9" | "6,9" -> sorted layer indices in 1..num_layers (ℓ = after ℓ blocks)."""
  text = str(spec).strip()
  layers = [num_layers // 2] if text in ("middle", "", "-1") else [int(p) for p in text.split(",") if p.strip()]
  bad = [l for l in layers if not 1 <= l <= num_layers]
  if bad:
    raise UserError(f"config.refine.layer={spec!r} is out of range; use 1..{num_layers} or 'middle'")
  return sorted(set(layers))


def load_refine_data(config, tokenizer):
  """(train PromptSet, holdout PromptSet) of the labelled prompts, split by a seeded permutation."""
  data = config.data
  records = (load_spec_list(data.toxic, label="toxic", n=data.n_toxic or None, seed=config.seed, key="data.toxic")
             + load_spec_list(data.seemingly_toxic, label="seemingly_toxic", n=data.n_seemingly_toxic or None,
                              seed=config.seed, key="data.seemingly_toxic"))
  if data.benign_class:
    records += load_spec_list(data.benign_class, label="benign", seed=config.seed, key="data.benign_class")
  for label, key in (("toxic", "data.toxic"), ("seemingly_toxic", "data.seemingly_toxic")):
    if not any(r["label"] == label for r in records):
      raise UserError(f"config.{key}: the {label} class is empty; give at least one prompt set")
  order = np.random.default_rng(config.seed).permutation(len(records))
  n_holdout = int(len(records) * config.refine.holdout)
  holdout = [records[i] for i in order[:n_holdout]]
  train = [records[i] for i in order[n_holdout:]]
  max_len = config.refine.max_len
  return tokenize_prompts(tokenizer, train, max_len), tokenize_prompts(tokenizer, holdout, max_len)


LOSS_KWARGS = {"circle": ("margin", "gamma"), "triplet": ("margin",), "supcon": ("temperature",),
               "infonce": ("temperature",)}


def prepare_refine(config, tokenizer, model_config) -> dict:
  """Checks the stage-1 config and loads its data before anything is written; raises UserError naming the key."""
  rc = config.refine
  if rc.loss not in LOSS_KWARGS:
    raise UserError(f"config.refine.loss={rc.loss!r} is unknown; choose from {', '.join(LOSS_KWARGS)}")
  if rc.pooling not in ("last", "mean"):
    raise UserError(f"config.refine.pooling={rc.pooling!r} is unknown; choose last or mean")
  layers = parse_layers(rc.layer, model_config.num_layers)
  train, holdout = load_refine_data(config, tokenizer)
  ratio = [float(x) for x in str(rc.class_ratio).split(",")]
  return {"layers": layers, "train": train, "holdout": holdout,
          "sampler": BalancedSampler(train.labels, rc.batch_size, ratio, config.seed),
          "loss_kwargs": {k: rc[k] for k in LOSS_KWARGS[rc.loss]},
          "lm_batches": _lm_batches(config, tokenizer) if rc.lm_weight > 0 else None,
          "validation": load_validation(config)}


def run_refine(ctx, prepared: dict) -> dict:
  """Trains layers ≤ ℓ (and the embedding) with the configured contrastive loss; returns the stage summary."""
  rc = ctx.config.refine
  layers, train, holdout = prepared["layers"], prepared["train"], prepared["holdout"]
  sampler, lm_batches = prepared["sampler"], prepared["lm_batches"]
  probe_before = _probe(ctx.model, train, holdout, layers[0], rc.pooling) if rc.probe else {}
  optimizer = make_optimizer(lr=rc.lr, steps=rc.steps, warmup=rc.warmup, weight_decay=rc.weight_decay,
                             clip=rc.clip)
  run = StageRun(ctx, "refine", trainable_filter("refine", max(layers)), optimizer)
  step = make_refine_step(run.graphdef, optimizer, layers=layers, pooling=rc.pooling, loss=rc.loss,
                          loss_kwargs=prepared["loss_kwargs"], lm_weight=rc.lm_weight)

  def batch_fn(i):
    batch = train.take(sampler.indices(i))
    if lm_batches is not None:
      lm = lm_batches.batch(i)
      batch.update({"lm_tokens": lm["tokens"], "lm_targets": lm["targets"], "lm_mask": lm["loss_mask"],
                    "lm_segments": lm["segments"], "lm_positions": lm["positions"]})
    return batch

  summary = run.train(step, batch_fn, steps=rc.steps, log_every=rc.log_every, validation=prepared["validation"])
  summary["layers"] = layers
  if rc.probe:
    summary["probe"] = {"before": probe_before, "after": _probe(ctx.model, train, holdout, layers[0], rc.pooling)}
  return summary


def _lm_batches(config, tokenizer) -> SFTMixture:
  """General instruction data for the optional LM-retention term (packed like stage 2)."""
  general = load_spec_list(config.data.general, label="benign", key="data.general")
  pairs = tokenize_pairs(tokenizer, [r for r in general if r.get("response")], config.align.max_len)
  return SFTMixture({"general": pairs}, {"general": 1.0}, config.refine.lm_batch_size, config.align.max_len,
                    config.seed + 1)


def _probe(model, train, holdout, layer, pooling) -> dict:
  x_train = probe.embed_prompts(model, train, layer=layer, pooling=pooling)
  x_hold = probe.embed_prompts(model, holdout, layer=layer, pooling=pooling)
  out = probe.mean_similarities(x_hold, holdout.labels)
  if len(holdout) and len(set(holdout.labels.tolist())) > 1:
    out["heldout_accuracy"] = probe.probe_accuracy(x_train, train.labels, x_hold, holdout.labels)
  return out


def restore_refined(ctx) -> bool:
  """Loads the refined params of an earlier run of this workdir into ctx.model; False when there are none."""
  rc = ctx.config.refine
  if not StageRun.has_checkpoint(ctx, "refine"):
    return False
  layers = parse_layers(rc.layer, ctx.model.config.num_layers)
  optimizer = make_optimizer(lr=rc.lr, steps=rc.steps, warmup=rc.warmup, weight_decay=rc.weight_decay,
                             clip=rc.clip)
  StageRun(ctx, "refine", trainable_filter("refine", max(layers)), optimizer).hand_over()
  return True
