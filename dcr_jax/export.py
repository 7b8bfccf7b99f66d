"""python -m dcr_jax.export --workdir=DIR [--stage=align|refine] [--step=N] --out=OUT --format=hf|peft|gguf
[--dtype=float32|bfloat16|float16] [--quant=f32|f16|q8_0] [--overwrite]

The aligned model out of a run. `hf`: merged safetensors sharded like transformers, config.json,
generation_config.json (every stop id), the tokenizer with its chat template and a model card. `peft`: the LoRA
adapter PEFT loads, with the model it applies to. `gguf`: one llama.cpp file. On many hosts no process gathers the
whole model: each writes the safetensors files it owns, process 0 the index and metadata.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import jax
import ml_collections
import ml_dtypes
import numpy as np
from absl import app, flags
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from dcr_jax import checkpoints, parallel, pipeline
from dcr_jax import spec as spec_lib
from dcr_jax.config import base_config
from dcr_jax.errors import UserError, run_command
from dcr_jax.model import Decoder
from dcr_jax.model.layers import LoRAParam
from dcr_jax.report import report_markdown, run_name
from dcr_jax.spec import Spec, Stage
from dcr_jax.weights import hf_config, resolve_source, stop_token_ids
from dcr_jax.weights.gguf_writer import QUANTS, check_expressible, gguf_file_name, write_gguf
from dcr_jax.weights.sources import GGUFSource
from dcr_jax.weights.loader import abstract_model, hf_layout, lora_adapters, merged_params
from dcr_jax.weights.tables import weight_table
from dcr_jax.workdir_io import as_path, default_file_mode, is_main_process

FORMATS = ("hf", "peft", "gguf")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
MAX_SHARD_SIZE = 5 * 10**9  # transformers' save_pretrained default, "5GB"
SIZE_UNITS = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
INDEX_FILE = "model.safetensors.index.json"
PEFT_PREFIX = "base_model.model."  # PeftModel wraps the *ForCausalLM; the HF names follow this prefix
PEFT_BASE_DIR = "base"  # peft: the model the adapter applies to, when it is not the run's own HF directory
EXPORT_STAGES = ("align", "refine")  # the default export is the first of these with a checkpoint
HUB_IDS = {"gemma3-270m": "google/gemma-3-270m", "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
LIBRARY = {"hf": "transformers", "peft": "peft", "gguf": "gguf"}


def parse_size(text: str) -> int:
  """'5GB' (10^9), '2GiB' (2^30), '200MB', '100KB' or plain bytes -> bytes."""
  value = str(text).strip().upper()
  unit = next((u for u in SIZE_UNITS if value.endswith(u)), "")
  try:
    number = float(value[:len(value) - len(unit)]) * SIZE_UNITS.get(unit, 1)
  except ValueError:
    raise UserError(f"--max_shard_size={text}: not a size; write e.g. 5GB, 500MB or a byte count") from None
  if number < 1:
    raise UserError(f"--max_shard_size={text}: must be positive; write e.g. 5GB")
  return int(number)


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
  """Tensor names grouped into files as huggingface_hub splits a state dict: in order, a new file when the next
  tensor would pass `max_bytes`; a tensor larger than that gets a file of its own."""
  shards, current, used = [], [], 0
  for name, size in sizes:
    if size > max_bytes:
      shards.append([name])
      continue
    if current and used + size > max_bytes:
      shards.append(current)
      current, used = [], 0
    current.append(name)
    used += size
  return shards + [current] if current else shards


def shard_files(count: int) -> list[str]:
  """transformers' names: model.safetensors alone, else model-00001-of-0000N.safetensors ..."""
  return ["model.safetensors"] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors"
                                                   for i in range(1, count + 1)]


def host_value(value: jax.Array, keep: bool) -> np.ndarray | None:
  """`value` in this process's memory when `keep`, else None. A tensor sharded over processes is gathered by a
  collective every process joins (in the same tensor order), one tensor at a time; only its writer keeps it."""
  if value.is_fully_addressable:
    return np.asarray(jax.device_get(value)) if keep else None
  gathered = multihost_utils.process_allgather(value, tiled=True)
  return np.asarray(gathered) if keep else None


def write_safetensors(model: Decoder, out: Path, dtype: str, max_shard_size: int, merge: bool = True) -> dict:
  """The model's HF tensors (LoRA merged when `merge`) as safetensors files in `out`; file i is written by process
  i mod N. Returns the index (weight_map, total_size) of transformers' model.safetensors.index.json."""
  cfg = model.config.replace(scan_layers=False)
  shapes = {path: var.get_value().shape for path, var in nnx.to_flat_state(nnx.state(abstract_model(cfg)))}
  itemsize = np.dtype(DTYPES[dtype]).itemsize
  sizes = [(entry.hf, math.prod(shapes[entry.path]) * itemsize) for entry in weight_table(cfg)]
  files = shard_files(len(shards := plan_shards(sizes, max_shard_size)))
  file_of = {name: file for file, names in zip(files, shards) for name in names}
  mine = {file for i, file in enumerate(files) if i % jax.process_count() == jax.process_index()}
  held: dict[str, dict[str, np.ndarray]] = {file: {} for file in mine}
  for entry, value in merged_params(model, merge):
    file = file_of[entry.hf]
    host = host_value(value, file in mine)
    if host is None:
      continue
    held[file][entry.hf] = hf_layout(entry, host.astype(DTYPES[dtype]))
    if len(held[file]) == len(shards[files.index(file)]):
      save_file(held.pop(file), str(out / file), metadata={"format": "pt"})
      os.chmod(out / file, default_file_mode())  # safetensors creates files 0600
  return {"metadata": {"total_size": sum(size for _, size in sizes)}, "weight_map": dict(sorted(file_of.items()))}


def _hf_metadata(spec: Spec, model: Decoder, tokenizer, out: Path, dtype: str, index: dict) -> None:
  """config.json (with every stop id), generation_config.json, the tokenizer files and, when sharded, the index."""
  stops = stop_token_ids(tokenizer)
  ids = {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": stops}
  ids = {k: v for k, v in ids.items() if v is not None}
  config = {**hf_config.to_hf_config(model.config), **ids, "torch_dtype": dtype}
  (out / "config.json").write_text(json.dumps(config, indent=2))
  (out / "generation_config.json").write_text(json.dumps(ids, indent=2))
  if len(set(index["weight_map"].values())) > 1:
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
  tokenizer.save_pretrained(str(out))


def _base_model(spec: Spec) -> str:
  if spec.model.random_init:
    return f"{spec.model.name} (random init)"
  return spec.model.weights or f"{spec.model.name} (embedded: {HUB_IDS.get(spec.model.name, spec.model.name)})"


def model_card(spec: Spec, workdir: epath.PathLike, checkpoint: str, fmt: str) -> str:
  """README.md: the base model, the checkpoint, the run's report (rendered from report.json) and its config."""
  workdir = as_path(workdir)
  report_file, config_file = workdir / "report.json", workdir / "config.json"
  report = json.loads(report_file.read_text()) if report_file.is_file() else {}
  front = ["---", f"library_name: {LIBRARY[fmt]}", "tags: [dcr, over-refusal, dcr_jax]"]
  if spec.model.name in HUB_IDS and not spec.model.weights and not spec.model.random_init:
    front.append(f"base_model: {HUB_IDS[spec.model.name]}")
  name = run_name(workdir, report)
  lines = front + ["---", "", f"# {name}: {spec.model.name} after DCR", "",
                   f"Base model: `{_base_model(spec)}`. Exported by `python -m dcr_jax.export` ({fmt}) from the "
                   f"`{checkpoint}` checkpoint of the run `{name}`.", ""]
  if report:
    body = report_markdown(workdir, report).splitlines()
    lines += ["## Run report"] + ["#" + l if l.startswith("#") else l for l in body[1:]] + [""]
  else:
    lines += ["The run has no report.json (nothing evaluated yet).", ""]
  if config_file.is_file():
    lines += ["## Config", "", "```json", config_file.read_text().strip(), "```", ""]
  return "\n".join(lines)


def _write_peft(spec: Spec, model: Decoder, tokenizer, out: Path, dtype: str, max_shard_size: int) -> None:
  """adapter_model.safetensors (PEFT names, lora_A [r in], lora_B [out r]) + adapter_config.json; the model they
  apply to is the run's HF directory when it trained nothing else, else written to OUT/base (adapters left out)."""
  tensors, modules, scale, rank = {}, set(), 0.0, 0
  for entry, a, b, scale in lora_adapters(model):
    rank = a.shape[-1]
    modules.add(entry.hf.split(".")[-2])
    stem = PEFT_PREFIX + entry.hf.removesuffix(".weight")
    for key, value in ((f"{stem}.lora_A.weight", a), (f"{stem}.lora_B.weight", b)):
      host = host_value(value, is_main_process())
      if host is not None:
        tensors[key] = np.ascontiguousarray(host.T.astype(DTYPES[dtype]))
  weights = spec.model.weights
  reuse = bool(weights) and Stage.REFINE not in spec.stages and (Path(weights) / "config.json").is_file()
  base = Path(weights).resolve() if reuse else (out / PEFT_BASE_DIR).resolve()
  if not reuse:
    (out / PEFT_BASE_DIR).mkdir(exist_ok=True)
    index = write_safetensors(model, out / PEFT_BASE_DIR, dtype, max_shard_size, merge=False)
    if is_main_process():
      _hf_metadata(spec, model, tokenizer, out / PEFT_BASE_DIR, dtype, index)
  if not is_main_process():
    return
  save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
  os.chmod(out / "adapter_model.safetensors", default_file_mode())
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": scale * rank,
            "lora_dropout": 0.0, "target_modules": sorted(modules), "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "inference_mode": True, "base_model_name_or_path": str(base)}
  (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
  tokenizer.save_pretrained(str(out))


def check_request(fmt: str, dtype: str, quant: str) -> None:
  """A format, dtype and quant type the writers can produce; else a one-line UserError."""
  if fmt not in FORMATS:
    raise UserError(f"--format={fmt} is unknown; choose {', '.join(FORMATS)}")
  if dtype not in DTYPES:
    raise UserError(f"--dtype={dtype} is unknown; choose {', '.join(DTYPES)}")
  if quant not in QUANTS:
    raise UserError(f"--quant={quant} is a type the GGUF writer cannot produce; choose {', '.join(QUANTS)}")


def check_adapter(spec: Spec, stage: str, fmt: str) -> None:
  """peft needs a LoRA align checkpoint; a full fine-tune (refine, or align with lora_rank 0) asks for hf."""
  if fmt == "peft" and (stage != Stage.ALIGN or spec.align.lora_rank == 0):
    what = "refine" if stage != Stage.ALIGN else "align with lora_rank=0"
    raise UserError(f"--format=peft: the {what} checkpoint is a full fine-tune with no LoRA adapter; "
                    "use --format=hf")


def export_model(spec: Spec, model: Decoder, tokenizer, out_dir: epath.PathLike, fmt: str, *,
                 workdir: epath.PathLike, checkpoint: str = "final", dtype: str = "float32", quant: str = "f32",
                 max_shard_size: int = MAX_SHARD_SIZE) -> Path:
  """Writes `model` (as trained: LoRA attached for a LoRA run) to `out_dir` in `fmt` (hf | peft | gguf), replacing
  what is there, with a model card from `workdir`'s report.json. Every process must call it (multi-host)."""
  check_request(fmt, dtype, quant)
  if fmt == "peft" and not jax.tree.leaves(nnx.state(model, LoRAParam)):
    raise UserError("--format=peft: the model is a full fine-tune with no LoRA adapter; use --format=hf")
  if fmt == "gguf":
    check_expressible(model.config)
  out = Path(out_dir)
  if is_main_process():
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
  _sync("export: out ready")
  if fmt == "hf":
    index = write_safetensors(model, out, dtype, max_shard_size)
    if is_main_process():
      _hf_metadata(spec, model, tokenizer, out, dtype, index)
  elif fmt == "peft":
    _write_peft(spec, model, tokenizer, out, dtype, max_shard_size)
  else:
    write_gguf(model, tokenizer, out / gguf_file_name(quant), quant, name=spec.model.name,
               source=_source_gguf(spec), fetch=host_value)
  if is_main_process():
    (out / "README.md").write_text(model_card(spec, workdir, checkpoint, fmt))
  _sync("export: done")
  return out


def _on_mesh(model: Decoder, mesh) -> Decoder:
  """`model` with every array (adapters too) on its sharding over `mesh`; a process-local array goes through host
  memory, which is how JAX places one value given by every process onto devices of many."""
  def to_host(x):
    local = isinstance(x, jax.Array) and x.is_fully_addressable
    return np.asarray(x) if local and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x

  graphdef, state = nnx.split(model)
  state = jax.tree.map(to_host, state)
  return nnx.merge(graphdef, parallel.shard_pytree(state, parallel.state_shardings(state, mesh)))


def _source_gguf(spec: Spec) -> Path | None:
  """The GGUF the run's weights and tokenizer came from (its tokenizer metadata is copied), if any."""
  if spec.model.random_init or spec.model.tokenizer:
    return None
  _, source = resolve_source(spec.model.weights or spec.model.name)
  return source.path if isinstance(source, GGUFSource) else None


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def run_config(workdir: epath.Path) -> ml_collections.ConfigDict:
  """DIR/config.json over base_config() (keys added since the run keep their defaults)."""
  path = workdir / "config.json"
  if not path.is_file():
    raise UserError(f"{workdir}: no config.json; point --workdir at a dcr_jax.main run")
  config = base_config()
  config.update(json.loads(path.read_text()))
  return config


def choose_checkpoint(workdir: epath.Path, stage: str | None, step: int | None) -> tuple[str, int]:
  """(stage, step) to export: the given ones, else the last stage with a checkpoint and its latest step."""
  kept = {s: checkpoints.kept_steps(workdir, s) for s in EXPORT_STAGES}
  listing = "; ".join(f"{s} {', '.join(map(str, steps))}" for s, steps in kept.items() if steps)
  if not listing:
    raise UserError(f"{workdir}: no checkpoint under {workdir / 'checkpoints'}; run a training stage "
                    "(python -m dcr_jax.main --config.stages=refine,align) first")
  if stage is None:
    stage = next(s for s in EXPORT_STAGES if kept[s])
  if not kept.get(stage):
    raise UserError(f"--stage={stage}: no checkpoint of that stage in {workdir}; kept: {listing}")
  if step is None:
    step = kept[stage][-1]
  if step not in kept[stage]:
    raise UserError(f"--step={step}: not kept for stage {stage}; kept steps: {', '.join(map(str, kept[stage]))}")
  return stage, step


def export_run(workdir: epath.PathLike, out: epath.PathLike, fmt: str, *, stage: str | None = None,
               step: int | None = None, dtype: str = "float32", quant: str = "f32", overwrite: bool = False,
               max_shard_size: int = MAX_SHARD_SIZE, distributed: dict | None = None) -> Path:
  """Restores a run's checkpoint (default: align, else refine; latest step) and exports it to `out`. Every check
  runs before anything is written. `distributed` replaces the run's config.distributed (this command's own
  processes)."""
  workdir = as_path(workdir)
  check_request(fmt, dtype, quant)
  config = run_config(workdir)
  config.distributed = ml_collections.ConfigDict({**base_config().distributed.to_dict(), **(distributed or {})})
  stage, step = choose_checkpoint(workdir, stage, step)
  spec = spec_lib.resolve(config)
  check_adapter(spec, stage, fmt)
  out = Path(out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
    raise UserError(f"--out={out} is not empty; pass --overwrite to replace it or choose a new directory")
  parallel.initialize(spec.distributed)
  mesh = parallel.make_mesh(spec.mesh.data, spec.mesh.fsdp, spec.mesh.tensor)
  model, tokenizer = pipeline.build_model(spec, mesh)
  spec = spec.bind(model.config)
  model = _on_mesh(pipeline.restore_stage(spec, model, workdir, stage, step), mesh)
  return export_model(spec, model, tokenizer, out, fmt, workdir=workdir, checkpoint=f"{stage} step {step}",
                      dtype=dtype, quant=quant, max_shard_size=max_shard_size)


def _define_flags() -> dict:
  """The command line's flags, defined only when run as a program (so the pipeline can import this module)."""
  return {
      "workdir": flags.DEFINE_string("workdir", None, "A dcr_jax.main run directory (local path or gs://…)."),
      "out": flags.DEFINE_string("out", None, "Directory to write (local); must be empty unless --overwrite."),
      "format": flags.DEFINE_string("format", "hf", "hf | peft | gguf"),
      "stage": flags.DEFINE_string("stage", None, "align | refine (default: align if it has a checkpoint, else "
                                   "refine)."),
      "step": flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest kept)."),
      "dtype": flags.DEFINE_string("dtype", "float32", "hf/peft tensor dtype: float32 | bfloat16 | float16."),
      "quant": flags.DEFINE_string("quant", "f32", "gguf tensor type: f32 | f16 | q8_0."),
      "overwrite": flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out."),
      "max_shard_size": flags.DEFINE_string("max_shard_size", "5GB", "hf: largest safetensors file (transformers' "
                                            "default)."),
      "coordinator_address": flags.DEFINE_string("coordinator_address", "", "Multi-process: host:port of process 0."),
      "num_processes": flags.DEFINE_integer("num_processes", 1, "Multi-process: number of processes."),
      "process_id": flags.DEFINE_integer("process_id", 0, "Multi-process: this process's index."),
  }


def main(argv):
  f = {name: flag.value for name, flag in _FLAGS.items()}
  if len(argv) > 1 or not f["workdir"] or not f["out"]:
    print("error: give --workdir=DIR and --out=OUT (and no other arguments)", file=sys.stderr)
    sys.exit(2)

  def body() -> str:
    out = export_run(f["workdir"], f["out"], f["format"], stage=f["stage"], step=f["step"], dtype=f["dtype"],
                     quant=f["quant"], overwrite=f["overwrite"], max_shard_size=parse_size(f["max_shard_size"]),
                     distributed={k: f[k] for k in ("coordinator_address", "num_processes", "process_id")})
    return f"done: {out} ({f['format']})"

  run_command(body)


if __name__ == "__main__":
  _FLAGS = _define_flags()
  app.run(main)
