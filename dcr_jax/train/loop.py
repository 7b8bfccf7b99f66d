"""The training loop: resume from the last orbax checkpoint, progress bar, metrics, NaN guard, periodic saves."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from tqdm.auto import tqdm

from dcr_jax.errors import UserError
from dcr_jax.train.state import TrainState
from dcr_jax.workdir_io import append_text, as_path, is_remote


class TrainingDiverged(UserError):
  """The loss became NaN or Inf; the last good checkpoint is kept."""


class MetricsWriter:
  """One JSON line per logged step in DIR/metrics.jsonl, scalars mirrored to TensorBoard in DIR/tensorboard/.

  Local workdir: metrics.jsonl is appended to and tensorboardX's SummaryWriter writes its event file in place.
  Remote workdir (gs://…): object stores cannot append, and tensorboardX writes gs:// only through
  google-cloud-storage, so: the rows already in metrics.jsonl are read once, kept in memory with the new ones, and
  the whole object is rewritten at every write (one atomic object write, O(rows) per logged step); TensorBoard
  events are written synchronously (tensorboardX's EventsWriter, not the SummaryWriter's background thread, whose
  flush() can miss queued events) to one event file in a local temp directory, and that file is copied whole to
  DIR/tensorboard/ after every write.
  """

  def __init__(self, workdir: epath.PathLike, enabled: bool = True):
    workdir = as_path(workdir)
    self.enabled = enabled
    self.path = workdir / "metrics.jsonl"
    self.remote = is_remote(workdir)
    self.tensorboard = None  # local: a tensorboardX SummaryWriter
    self._rows: list[str] | None = None  # remote: metrics.jsonl's lines, loaded at the first write
    self._tb_dir = workdir / "tensorboard"
    self._tb_local = self._events = None  # remote: local temp dir + synchronous event writer
    if enabled and self.remote:
      from tensorboardX.event_file_writer import EventsWriter
      self._tb_local = tempfile.TemporaryDirectory(prefix="dcr_tensorboard_")
      self._events = EventsWriter(os.path.join(self._tb_local.name, "events"))
    elif enabled:
      from tensorboardX import SummaryWriter
      self.tensorboard = SummaryWriter(os.fspath(self._tb_dir))

  def write(self, stage: str, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"stage": stage, "step": step, **{k: float(v) for k, v in metrics.items()}}
    if not self.remote:
      append_text(self.path, json.dumps(row) + "\n")
      for key, value in metrics.items():
        self.tensorboard.add_scalar(f"{stage}/{key}", float(value), step)
      self.tensorboard.flush()
      return
    if self._rows is None:
      self._rows = self.path.read_text().splitlines() if self.path.is_file() else []
    self._rows.append(json.dumps(row))
    self.path.write_text("".join(line + "\n" for line in self._rows))
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.summary import scalar
    now = time.time()
    for key, value in metrics.items():
      self._events.write_event(Event(wall_time=now, step=step, summary=scalar(f"{stage}/{key}", float(value))))
    self._events.flush()
    for event_file in Path(self._tb_local.name).iterdir():
      (self._tb_dir / event_file.name).write_bytes(event_file.read_bytes())


def checkpoint_manager(directory: epath.PathLike, keep: int) -> ocp.CheckpointManager:
  """Orbax manager keeping the last `keep` checkpoints; a save is committed atomically (tmp dir then rename).
  Orbax takes gs://… directly; only a local path is made absolute."""
  directory = as_path(directory)
  return ocp.CheckpointManager(directory if is_remote(directory) else directory.resolve(),
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def restore_latest(manager: ocp.CheckpointManager, state: TrainState, shardings) -> TrainState:
  """The latest committed checkpoint restored straight into `shardings`, or `state` when there is none."""
  latest = manager.latest_step()
  if latest is None:
    return state
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  return manager.restore(latest, args=ocp.args.StandardRestore(abstract))


def train_loop(*, stage: str, step_fn: Callable, state: TrainState, batch_fn: Callable[[int], dict],
               num_steps: int, manager: ocp.CheckpointManager, save_every: int, log_every: int,
               writer: MetricsWriter, show_progress: bool = True,
               on_save: Callable[[int, TrainState], dict] | None = None) -> tuple[TrainState, dict]:
  """Runs steps state.step..num_steps-1; saves every `save_every` steps and at the end, logging `on_save`'s metrics
  (e.g. validation) for each saved step. Returns (state, summary)."""
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
      if on_save is not None:
        writer.write(stage, step + 1, on_save(step + 1, state))
  bar.close()
  manager.wait_until_finished()
  return state, {"steps": num_steps, "final_loss": last_loss, "train_seconds": round(seconds, 2),
                 "resumed_from": start, "tokens": tokens}


def read_checkpoint(path: epath.PathLike) -> dict:
  """A saved TrainState as nested dicts of arrays on this process's first device, whatever topology wrote it."""
  path = as_path(path)
  path = path if is_remote(path) else path.resolve()
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  return checkpointer.restore(path, target)
