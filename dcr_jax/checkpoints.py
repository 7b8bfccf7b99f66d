"""Checkpoints, shared by every reader and writer: the layout `DIR/checkpoints/<stage>/<step>/default` (orbax), the
manager training saves through, and `restore_into`, which evaluation, kernels and export load models with."""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from dcr_jax.errors import UserError
from dcr_jax.workdir_io import as_path, is_remote

ITEM = "default"  # the one item a stage's CheckpointManager saves (the TrainState)


def stage_dir(workdir: epath.PathLike, stage: str) -> epath.Path:
  """DIR/checkpoints/<stage> (a local path or gs://…)."""
  return as_path(workdir) / "checkpoints" / stage


def kept_steps(workdir: epath.PathLike, stage: str) -> list[int]:
  """The steps of `stage` whose checkpoint is on disk, ascending; [] when none."""
  directory = stage_dir(workdir, stage)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def last_trained(workdir: epath.PathLike) -> tuple[str, int] | None:
  """(stage, step) of a workdir's last trained model: the latest align checkpoint, else refine's; None when neither."""
  for stage in ("align", "refine"):
    steps = kept_steps(workdir, stage)
    if steps:
      return stage, steps[-1]
  return None


def manager(directory: epath.PathLike, keep: int) -> ocp.CheckpointManager:
  """Orbax manager keeping the last `keep` checkpoints; a save is committed atomically (tmp dir then rename).
  Orbax takes gs://… directly; only a local path is made absolute."""
  directory = as_path(directory)
  return ocp.CheckpointManager(directory if is_remote(directory) else directory.resolve(),
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def restore_latest(checkpoints: ocp.CheckpointManager, state, shardings):
  """The latest committed checkpoint restored straight into `shardings`, or `state` when there is none."""
  latest = checkpoints.latest_step()
  if latest is None:
    return state
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  return checkpoints.restore(latest, args=ocp.args.StandardRestore(abstract))


def _item_path(path: epath.PathLike) -> epath.Path:
  path = as_path(path)
  return path if is_remote(path) else path.resolve()


def read_checkpoint(path: epath.PathLike) -> dict:
  """A saved TrainState (`…/<step>/default`) as nested dicts of arrays on this process's first device, whatever
  topology wrote it."""
  path = _item_path(path)
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  return checkpointer.restore(path, target)


def restore_into(model: nnx.Module, workdir: epath.PathLike, stage: str, step: int | None = None) -> nnx.Module:
  """A new model: `model`'s structure with the params of checkpoint (stage, step), latest when step is None.

  Only the parameters are read (not the optimizer state), each straight onto the sharding `model`'s own parameter
  has. `model` must have the structure the stage trained (e.g. LoRA attached for a LoRA `align`); it is unchanged.
  """
  steps = kept_steps(workdir, stage)
  if not steps:
    raise UserError(f"{stage_dir(workdir, stage)}: no checkpoint; run the {stage} stage first")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise UserError(f"{stage_dir(workdir, stage)}: no step {step}; kept steps: {', '.join(map(str, steps))}")
  path = _item_path(stage_dir(workdir, stage) / str(step) / ITEM)
  saved = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
  graphdef, state = nnx.split(model)
  ours = dict(nnx.to_flat_state(state))
  target = {}
  for part in ("params", "frozen"):  # TrainState: trained + frozen params = the whole model
    for keys, meta in jax.tree_util.tree_flatten_with_path(saved[part])[0]:
      names = tuple(int(k.key) if k.key.isdigit() else k.key for k in keys if k.key != "value")
      variable = ours.get(names)
      if variable is None or tuple(variable.get_value().shape) != tuple(meta.shape):
        raise UserError(f"{path}: saved {'/'.join(map(str, names))} {tuple(meta.shape)} does not fit the model "
                        f"({'absent' if variable is None else tuple(variable.get_value().shape)}); build it with "
                        "the run's config (model, LoRA settings)")
      target[(part, *(k.key for k in keys))] = names, variable
  restore_args = {}
  for key, (_, variable) in target.items():
    value = variable.get_value()
    node = restore_args
    for k in key[:-1]:
      node = node.setdefault(k, {})
    node[key[-1]] = ocp.ArrayRestoreArgs(sharding=value.sharding, dtype=value.dtype)
  item = jax.tree.map(lambda a: 0, restore_args)  # the tree's shape is all a partial restore needs of `item`
  restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))
  values = {}
  for key, (names, _) in target.items():
    node = restored
    for k in key:
      node = node[k]
    values[names] = node
  missing = [names for names, v in ours.items() if isinstance(v, nnx.Param) and names not in values]
  if missing:
    raise UserError(f"{path}: no saved value for {'/'.join(map(str, missing[0]))}; build the model with the run's "
                    "config (model, LoRA settings)")
  flat = [(names, v.replace(values[names]) if names in values else v) for names, v in ours.items()]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))
