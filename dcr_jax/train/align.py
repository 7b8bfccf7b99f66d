"""Stage 2, safety SFT (the STL recipe): general instructions + harmful→refusal pairs (+ STL-aug pairs)."""

from __future__ import annotations

from flax import nnx

from dcr_jax.data.batching import SFTMixture, load_refusals, load_spec_list, tokenize_pairs, with_refusals
from dcr_jax.data.loaders import DataError
from dcr_jax.errors import UserError
from dcr_jax.model.lora import TARGETS as LORA_TARGETS, attach_lora
from dcr_jax.train.runner import StageRun, load_validation
from dcr_jax.train.state import make_optimizer, trainable_filter
from dcr_jax.train.steps import make_align_step


def load_align_data(config, tokenizer) -> dict:
  """Tokenized SFT sources by name: general, safety (harmful→refusal) and, for STL-aug, aug."""
  data, ac = config.data, config.align
  general = load_spec_list(data.general, label="benign", n=data.n_general or None, seed=config.seed,
                           key="data.general")
  missing = sum(1 for r in general if not r.get("response"))
  if missing:
    raise DataError("config.data.general", f"{missing} records have no response; SFT needs instruction→response "
                    "pairs (e.g. Alpaca-style files)")
  refusals = load_refusals(data.refusals) if data.refusals else []
  harmful = with_refusals(load_spec_list(data.harmful, label="toxic", n=data.n_harmful or None, seed=config.seed,
                                         key="data.harmful"), refusals)
  sources = {"general": tokenize_pairs(tokenizer, general, ac.max_len),
             "safety": tokenize_pairs(tokenizer, harmful, ac.max_len)}
  if ac.aug_weight > 0:
    aug = [r for r in load_spec_list(data.helpful_seemingly, label="seemingly_toxic", key="data.helpful_seemingly")
           if r.get("response")]
    if not aug:
      raise UserError("config.data.helpful_seemingly has no prompt→helpful-response pairs; STL-aug needs them")
    sources["aug"] = tokenize_pairs(tokenizer, aug, ac.max_len)
  return sources


def prepare_align(config, tokenizer, model_config) -> dict:
  """Checks the stage-2 config and loads its data before anything is written; raises UserError naming the key."""
  ac = config.align
  if ac.batch_size % ac.grad_accum:
    raise UserError(f"config.align.batch_size={ac.batch_size} is not divisible by grad_accum={ac.grad_accum}")
  targets = [t.strip() for t in str(ac.lora_targets).split(",") if t.strip()]
  unknown = [t for t in targets if t not in LORA_TARGETS]
  if ac.lora_rank > 0 and (unknown or not targets):
    raise UserError(f"config.align.lora_targets: unknown {unknown}; choose among {', '.join(LORA_TARGETS)}")
  sources = load_align_data(config, tokenizer)
  weights = {"general": ac.general_weight, "safety": ac.safety_weight, "aug": ac.aug_weight}
  return {"sources": sources, "targets": targets,
          "mixture": SFTMixture(sources, weights, ac.batch_size, ac.max_len, config.seed, pack=ac.pack),
          "validation": load_validation(config)}


def _align_run(ctx, targets) -> StageRun:
  ac = ctx.config.align
  if ac.lora_rank > 0:
    attach_lora(ctx.model, rank=ac.lora_rank, alpha=ac.lora_alpha, targets=targets,
                rngs=nnx.Rngs(ctx.config.seed + 2))
  optimizer = make_optimizer(lr=ac.lr, steps=ac.steps, warmup=ac.warmup, weight_decay=ac.weight_decay,
                             clip=ac.clip)
  return StageRun(ctx, "align", trainable_filter("lora" if ac.lora_rank > 0 else "full"), optimizer)


def restore_aligned(ctx) -> bool:
  """Loads the aligned params (LoRA attached as configured) of an earlier run into ctx.model; False if none."""
  if not StageRun.has_checkpoint(ctx, "align"):
    return False
  targets = [t.strip() for t in str(ctx.config.align.lora_targets).split(",") if t.strip()]
  _align_run(ctx, targets).hand_over()
  return True


def run_align(ctx, prepared: dict) -> dict:
  """LoRA (align.lora_rank > 0) or full fine-tuning with masked CE on response tokens; returns the stage summary."""
  ac = ctx.config.align
  sources, mixture = prepared["sources"], prepared["mixture"]
  run = _align_run(ctx, prepared["targets"])
  step = make_align_step(run.graphdef, run.optimizer, grad_accum=ac.grad_accum)
  summary = run.train(step, mixture.batch, steps=ac.steps, log_every=ac.log_every, validation=prepared["validation"])
  summary["examples"] = {name: len(s) for name, s in sources.items()}
  return summary
