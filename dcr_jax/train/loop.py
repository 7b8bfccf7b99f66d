"""The training loop: resume from the last orbax checkpoint, progress bar, metrics, NaN guard, periodic saves."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from dcr_jax.errors import UserError
from dcr_jax.train.state import TrainState


class TrainingDiverged(UserError):
  """The loss became NaN or Inf; the last good checkpoint is kept."""


class MetricsWriter:
  """Appends one JSON line per logged step to DIR/metrics.jsonl and mirrors scalars to TensorBoard in DIR."""

  def __init__(self, workdir: Path, enabled: bool = True):
    self.enabled = enabled
    self.path = workdir / "metrics.jsonl"
    self.tensorboard = None
    if enabled:
      from tensorboardX import SummaryWriter
      self.tensorboard = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, stage: str, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"stage": stage, "step": step, **{k: float(v) for k, v in metrics.items()}}
    with self.path.open("a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    for key, value in metrics.items():
      self.tensorboard.add_scalar(f"{stage}/{key}", float(value), step)
    self.tensorboard.flush()


def checkpoint_manager(directory: Path, keep: int) -> ocp.CheckpointManager:
  """Orbax manager keeping the last `keep` checkpoints; a save is committed atomically (tmp dir then rename)."""
  return ocp.CheckpointManager(directory.resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                                                         create=True))


def restore_latest(manager: ocp.CheckpointManager, state: TrainState, shardings) -> TrainState:
  """The latest committed checkpoint restored straight into `shardings`, or `state` when there is none."""
  latest = manager.latest_step()
  if latest is None:
    return state
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  return manager.restore(latest, args=ocp.args.StandardRestore(abstract))


def train_loop(*, stage: str, step_fn: Callable, state: TrainState, batch_fn: Callable[[int], dict],
               num_steps: int, manager: ocp.CheckpointManager, save_every: int, log_every: int,
               writer: MetricsWriter, show_progress: bool = True) -> tuple[TrainState, dict]:
  """Runs steps state.step..num_steps-1; saves every `save_every` steps and at the end. Returns (state, summary)."""
  start = int(jax.device_get(state.step))
  last_loss, seconds, tokens = None, 0.0, 0.0
  bar = tqdm(total=num_steps, initial=start, desc=stage, disable=not show_progress, dynamic_ncols=True)
  for step in range(start, num_steps):
    batch = batch_fn(step)
    started = time.time()
    state, metrics = step_fn(state, batch)
    metrics = jax.device_get(metrics)
    elapsed = time.time() - started
    seconds += elapsed
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
      manager.wait_until_finished()
      raise TrainingDiverged(f"{stage}: loss is {loss} at step {step}; the last good checkpoint "
                             f"(step {manager.latest_step()}) is kept; lower the learning rate")
    last_loss = loss
    batch_tokens = float(np.sum(batch.get("mask", batch.get("loss_mask", 0)) != 0))
    tokens += batch_tokens
    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{batch_tokens / max(elapsed, 1e-9):.0f}")
    bar.update(1)
    if (step + 1) % log_every == 0 or step + 1 == num_steps:
      writer.write(stage, step + 1, {**metrics, "tokens_per_second": batch_tokens / max(elapsed, 1e-9)})
    if (step + 1) % save_every == 0 or step + 1 == num_steps:
      manager.save(step + 1, args=ocp.args.StandardSave(state))
  bar.close()
  manager.wait_until_finished()
  return state, {"steps": num_steps, "final_loss": last_loss, "train_seconds": round(seconds, 2),
                 "resumed_from": start, "tokens": tokens}


def read_checkpoint(path: Path) -> dict:
  """A saved TrainState as nested dicts of arrays on this process's first device, whatever topology wrote it."""
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  return checkpointer.restore(path, target)
