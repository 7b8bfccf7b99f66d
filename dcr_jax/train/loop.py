"""Training a stage: the typed `StageProgram` every stage builder returns, `train_stage` (state on the mesh, compile
once, resume, loop, the trained model out), and the loop itself (progress bar, metrics, NaN guard, periodic saves,
early stopping)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from tqdm.auto import tqdm

from dcr_jax import checkpoints, parallel
from dcr_jax.errors import UserError
from dcr_jax.model import Decoder
from dcr_jax.train.state import create_state, merge
from dcr_jax.train.steps import compile_step
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
      from tensorboardX.event_file_writer import EventsWriter  # lazy: only the writer this workdir needs
      self._tb_local = tempfile.TemporaryDirectory(prefix="dcr_tensorboard_")
      self._events = EventsWriter(os.path.join(self._tb_local.name, "events"))
    elif enabled:
      from tensorboardX import SummaryWriter  # lazy: only the writer this workdir needs
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
    from tensorboardX.proto.event_pb2 import Event  # lazy: tensorboardX's protobuf modules, remote runs only
    from tensorboardX.summary import scalar
    now = time.time()
    for key, value in metrics.items():
      self._events.write_event(Event(wall_time=now, step=step, summary=scalar(f"{stage}/{key}", float(value))))
    self._events.flush()
    for event_file in Path(self._tb_local.name).iterdir():
      (self._tb_dir / event_file.name).write_bytes(event_file.read_bytes())


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
  """Stop a stage once its logged `metric` has gone `patience` logged steps without falling below the best value
  so far by more than `min_delta`. The decision is a function of the logged values alone, so a resumed run replays
  them from metrics.jsonl and never restarts a stage that had stopped."""

  metric: str
  patience: int
  min_delta: float = 0.0

  def stopped_at(self, logged: Sequence[tuple[int, float]]) -> int | None:
    """The step a run that logged these (step, value) pairs, in order, stopped at; None while it goes on."""
    best, waited = math.inf, 0
    for step, value in logged:
      if value < best - self.min_delta:
        best, waited = value, 0
      else:
        waited += 1
        if waited >= self.patience:
          return step
    return None


def train_loop(*, stage: str, step_fn: Callable, state, batch_fn: Callable[[int], dict],
               num_steps: int, manager: ocp.CheckpointManager, save_every: int, log_every: int,
               writer: MetricsWriter, show_progress: bool = True,
               on_save: Callable[[int, Any], dict] | None = None, early_stopping: EarlyStopping | None = None,
               logged: Sequence[tuple[int, float]] = ()) -> tuple[Any, dict]:
  """Runs steps state.step..num_steps-1; saves every `save_every` steps and at the end, logging `on_save`'s metrics
  (e.g. validation) for each saved step. With `early_stopping` it also ends (saving) at the logged step where the
  rule stops; `logged` holds the (step, value) pairs of its metric that earlier invocations logged up to
  state.step. Returns (state, summary); the summary's `steps` are those trained, `stopped_at` set when stopped."""
  start = int(jax.device_get(state.step))
  history = [(s, v) for s, v in logged if s <= start]
  stopped = early_stopping.stopped_at(history) if early_stopping else None
  last_loss, seconds, tokens = None, 0.0, 0.0
  bar = tqdm(total=num_steps, initial=start, desc=stage, disable=not show_progress, dynamic_ncols=True)
  for step in range(start, num_steps if stopped is None else start):
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
      if early_stopping is not None:
        history.append((step + 1, float(metrics[early_stopping.metric])))
        stopped = early_stopping.stopped_at(history)
    if (step + 1) % save_every == 0 or step + 1 == num_steps or stopped is not None:
      manager.save(step + 1, args=ocp.args.StandardSave(state))
      if on_save is not None:
        writer.write(stage, step + 1, on_save(step + 1, state))
    if stopped is not None:
      break
  bar.close()
  manager.wait_until_finished()
  summary = {"steps": num_steps if stopped is None else stopped, "final_loss": last_loss,
             "train_seconds": round(seconds, 2), "resumed_from": start, "tokens": tokens}
  if early_stopping is not None:
    summary["stopped_at"] = stopped
  return state, summary


def _same(model: Decoder) -> Decoder:
  return model


@dataclasses.dataclass(frozen=True)
class StageProgram:
  """One training stage as a value, built by the stage's pure `program(spec, architecture, data)`: training, the
  planner (abstract shapes), restoring and the sweep all read the same one, so they cannot drift."""

  name: str  # the checkpoint directory: DIR/checkpoints/<name>
  trainable: Any  # nnx filter of the params the optimizer updates; the rest ride along frozen
  optimizer: optax.GradientTransformation
  make_step: Callable[[nnx.GraphDef], Callable]  # graphdef -> pure step(state, batch) -> (state, metrics)
  batch_shapes: dict[str, jax.ShapeDtypeStruct]  # one global batch
  steps: int
  log_every: int
  adapt: Callable[[Decoder], Decoder] = _same  # the model this stage trains, made from the one handed in (LoRA)
  early_stopping: EarlyStopping | None = None  # None = always run `steps`
  # (step, rows) -> host batch of this process's rows, `rows(global batch size)` giving them; None when built
  # without data (planning). Rows are built alone, so a process never materialises the global batch.
  batches: Callable[[int, Callable[[int], slice]], dict] | None = None


@dataclasses.dataclass(frozen=True)
class TrainContext:
  """Where a stage trains and saves: built by the entry point and handed to `train_stage`."""

  workdir: epath.Path
  mesh: jax.sharding.Mesh
  writer: "MetricsWriter"
  seed: int
  save_every: int
  keep: int
  validate: Callable[[Decoder], dict] | None = None  # metrics of the saved model, logged at every save


def train_stage(program: StageProgram, model: Decoder, ctx: TrainContext) -> tuple[Decoder, dict]:
  """Trains `program.adapt(model)` from its latest checkpoint (if any) to `program.steps`; returns the trained model
  (a new value) and the stage summary. The step donates its state, whose trained arrays may share buffers with
  `model`'s: do not use `model` afterwards (`pipeline.ModelCache` hands each run its own copy)."""
  mesh = ctx.mesh
  graphdef, state = create_state(program.adapt(model), program.trainable, program.optimizer, ctx.seed)
  shardings = parallel.state_shardings(state, mesh)
  state = parallel.shard_pytree(state, shardings)
  manager = checkpoints.manager(checkpoints.stage_dir(ctx.workdir, program.name), keep=ctx.keep)
  state = checkpoints.restore_latest(manager, state, shardings)
  batch_shardings = {k: parallel.batch_sharding(mesh, len(v.shape)) for k, v in program.batch_shapes.items()}
  compiled = compile_step(program.make_step(graphdef), shardings, batch_shardings)

  rows_sharding = parallel.batch_sharding(mesh, 1)

  def placed_batch(i):
    """Each process builds only the rows of batch i its devices hold (a function of seed, step and row)."""
    local = program.batches(i, lambda size: parallel.process_rows(rows_sharding, (size,)))
    return {k: parallel.local_batch_to_global(np.asarray(v), mesh) for k, v in local.items()}

  on_save = None if ctx.validate is None else (lambda step, saved: ctx.validate(merge(graphdef, saved)))
  metrics_path = as_path(ctx.workdir) / "metrics.jsonl"
  stopping = program.early_stopping
  state, summary = train_loop(stage=program.name, step_fn=compiled, state=state, batch_fn=placed_batch,
                              num_steps=program.steps, manager=manager, save_every=ctx.save_every,
                              log_every=program.log_every, writer=ctx.writer,
                              show_progress=jax.process_index() == 0, on_save=on_save, early_stopping=stopping,
                              logged=logged_values(metrics_path, program.name, stopping.metric) if stopping else ())
  if summary["final_loss"] is None:  # the stage had already finished: report its last logged loss
    summary["final_loss"] = last_logged(metrics_path, program.name, "loss")
  return merge(graphdef, state), summary


def logged_values(path, stage: str, key: str) -> list[tuple[int, float]]:
  """(step, value) of `key` as logged for `stage` in metrics.jsonl (a local path or gs://…), by step; where a
  resumed run logged a step again, its last row."""
  path = as_path(path)
  if not path.is_file():
    return []
  values = {}
  for line in path.read_text().splitlines():
    row = json.loads(line)
    if row.get("stage") == stage and key in row:
      values[row["step"]] = row[key]
  return sorted(values.items())


def last_logged(path, stage: str, key: str):
  """The value of `key` logged for `stage` at its latest step in metrics.jsonl (a local path or gs://…), or None."""
  values = logged_values(path, stage, key)
  return values[-1][1] if values else None
