"""What both training stages share: state on the mesh, compile once, resume, loop, hand the model on."""

from __future__ import annotations

import json

import jax
import numpy as np
from flax import nnx

from dcr_jax import parallel
from dcr_jax.data.batching import load_spec_list
from dcr_jax.train.loop import checkpoint_manager, restore_latest, train_loop
from dcr_jax.train.state import create_state
from dcr_jax.train.steps import compile_step
from dcr_jax.workdir_io import as_path


class StageRun:
  """One training stage of the pipeline: builds the sharded TrainState, restores the latest checkpoint, trains."""

  def __init__(self, ctx, name: str, trainable, optimizer):
    self.ctx, self.name, self.optimizer = ctx, name, optimizer
    self.graphdef, state = create_state(ctx.model, trainable, optimizer, ctx.config.seed)
    self.shardings = parallel.state_shardings(state, ctx.mesh)
    self.state = parallel.shard_pytree(state, self.shardings)
    ck = ctx.config.checkpoint
    self.manager = checkpoint_manager(as_path(ctx.workdir) / "checkpoints" / name, keep=ck.keep)
    self.state = restore_latest(self.manager, self.state, self.shardings)
    self.save_every = ck.every

  @staticmethod
  def has_checkpoint(ctx, name: str) -> bool:
    directory = as_path(ctx.workdir) / "checkpoints" / name
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())

  def hand_over(self) -> None:
    """Puts this stage's (restored) params into ctx.model."""
    nnx.update(self.ctx.model, self.state.params, self.state.frozen)

  def train(self, step, batch_fn, *, steps: int, log_every: int, validation: dict | None = None) -> dict:
    """Compiles `step` once for this stage's shardings, runs the loop, and updates ctx.model in place. With
    `validation` (group -> prompts, `load_validation`), each saved step also logs `val_refusal_prob_<group>`."""
    mesh = self.ctx.mesh
    example = batch_fn(int(jax.device_get(self.state.step)) if steps else 0)
    batch_shardings = {k: parallel.batch_sharding(mesh, np.ndim(v)) for k, v in example.items()}
    compiled = compile_step(step, self.shardings, batch_shardings)

    def placed_batch(i):
      """Every process builds batch i (cheap, deterministic) and feeds only the rows its devices hold."""
      batch = batch_fn(i)
      return {k: parallel.local_batch_to_global(
          np.asarray(v)[parallel.process_rows(batch_shardings[k], np.shape(v))], mesh) for k, v in batch.items()}

    state, summary = train_loop(stage=self.name, step_fn=compiled, state=self.state, batch_fn=placed_batch,
                                num_steps=steps, manager=self.manager, save_every=self.save_every,
                                log_every=log_every, writer=self.ctx.writer, show_progress=jax.process_index() == 0,
                                on_save=self._validator(validation) if validation else None)
    self.state = state
    self.hand_over()
    if summary["final_loss"] is None:  # the stage had already finished: report its last logged loss
      summary["final_loss"] = last_logged(as_path(self.ctx.workdir) / "metrics.jsonl", self.name, "loss")
    return summary

  def _validator(self, validation: dict):
    from dcr_jax.evaluate.refusal_prob import refusal_probability
    from dcr_jax.model import unstack_layers

    def validate(step: int, state) -> dict:
      """Mean teacher-forced refusal probability of each validation group under the saved params."""
      model = unstack_layers(nnx.merge(self.graphdef, state.params, state.frozen))
      tokenizer = self.ctx.tokenizer
      return {f"val_refusal_prob_{group}": float(np.mean(refusal_probability(model, tokenizer, prompts, batch_size=32)))
              for group, prompts in validation.items()}

    return validate


def load_validation(config) -> dict:
  """Validation prompts by group from data.val_toxic / data.val_seemingly_toxic (n_val seeded each); {} if unset."""
  data = config.data
  groups = {}
  for group in ("toxic", "seemingly_toxic"):
    spec = data[f"val_{group}"]
    if spec:
      records = load_spec_list(spec, label=group, n=data.n_val or None, seed=config.seed + 29,
                               key=f"data.val_{group}")
      groups[group] = [r["prompt"] for r in records]
  return groups


def last_logged(path, stage: str, key: str):
  """The last value of `key` logged for `stage` in metrics.jsonl (a local path or gs://…), or None."""
  path = as_path(path)
  if not path.is_file():
    return None
  value = None
  for line in path.read_text().splitlines():
    row = json.loads(line)
    if row.get("stage") == stage and key in row:
      value = row[key]
  return value
