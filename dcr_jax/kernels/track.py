"""Kernel similarity between prompt groups, tracked over a workdir's checkpoints (the paper's Figs. 5-6).

For the base model and every kept checkpoint of `refine` and `align`: the first-token logit eNTK on a fixed token
set S (top-k of the base model's first-token distribution), its group block means (seemingly toxic × toxic × general)
under the paper's ratio and the symmetric cosine, and the mean refusal probability of each group.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import numpy as np
from etils import epath

from dcr_jax import checkpoints, parallel, pipeline
from dcr_jax import spec as spec_lib
from dcr_jax.data.batching import load_spec_list
from dcr_jax.errors import UserError
from dcr_jax.evaluate.refusal_prob import refusal_probability
from dcr_jax.kernels import ntk, plots, similarity
from dcr_jax.model import unstack_layers
from dcr_jax.spec import Spec
from dcr_jax.weights.tokenizer import encode_chat
from dcr_jax.workdir_io import as_path, ensure_dir, update_report, write_json

GROUPS = ("seemingly_toxic", "toxic", "general")


@dataclasses.dataclass
class Probe:
  """The fixed prompts and token set every checkpoint is measured on."""

  prompts: list[str]
  groups: list[str]
  tokens: np.ndarray  # [N T] right-padded
  mask: np.ndarray  # [N T]
  ids: np.ndarray  # [S]


def probe_prompts(spec: Spec) -> tuple[list[str], list[str]]:
  """n prompts per group (seeded) from the spec's data sources: seemingly toxic, toxic, general."""
  kc, data = spec.kernels, spec.data
  specs = {"seemingly_toxic": (data.seemingly_toxic, "seemingly_toxic"), "toxic": (data.toxic, "toxic"),
           "general": (data.general, "benign")}
  prompts, groups = [], []
  for group in GROUPS:
    sources, label = specs[group]
    records = load_spec_list(sources, label=label, n=kc.n_per_group, seed=spec.seed + 17, key=f"data.{group}")
    if not records:
      raise UserError(f"config.data.{group} gave no prompts for the kernel probe")
    prompts += [r["prompt"] for r in records]
    groups += [group] * len(records)
  return prompts, groups


def encode_prompts(tokenizer, prompts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Chat-templated prompts (the last `max_len` tokens of each) as right-padded tokens and mask [N T]."""
  rows = [encode_chat(tokenizer, p)[0][-max_len:] for p in prompts]
  width = max(len(r) for r in rows)
  tokens = np.full((len(rows), width), tokenizer.pad_token_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)], mask[i, :len(r)] = r, 1
  return tokens, mask


def build_probe(model, tokenizer, spec: Spec) -> Probe:
  """The probe prompts, and S = the top-k tokens of `model`'s (the base model's) first-token distributions."""
  prompts, groups = probe_prompts(spec)
  tokens, mask = encode_prompts(tokenizer, prompts, spec.kernels.max_len)
  graphdef, params, rest = ntk.split_params(model, "all")
  probs = ntk.next_token_probs(ntk.first_token_logits_fn(graphdef, rest), params, tokens, mask)
  return Probe(prompts, groups, tokens, mask, ntk.token_set(probs=probs, k=spec.kernels.top_k))


def measure(model, tokenizer, probe: Probe, spec: Spec) -> dict:
  """Kernel block means and refusal probabilities of `model` on the probe."""
  kc = spec.kernels
  kw = {"layer": kc.layer} if kc.params == "up_to_layer" else {"last_n": kc.last_n} if kc.params == "last_n" else {}
  graphdef, params, rest = ntk.split_params(model, kc.params, **kw)
  f = ntk.first_token_logits_fn(graphdef, rest)
  started = time.time()
  k = ntk.logit_kernel(f, params, probe.tokens, probe.mask, probe.ids, method=kc.method, chunk_size=kc.chunk_size,
                       out_chunk=kc.out_chunk, progress=jax.process_index() == 0)
  names, ratio, counts = similarity.block_means(similarity.kernel_ratio(k), probe.groups)
  _, cosine, _ = similarity.block_means(similarity.kernel_cosine(k), probe.groups)
  refusal = refusal_probability(model, tokenizer, probe.prompts)
  by_group = {g: float(np.mean([p for p, gg in zip(refusal, probe.groups) if gg == g])) for g in names}
  return {"groups": names, "ratio": ratio.tolist(), "cosine": cosine.tolist(), "counts": counts.tolist(),
          "refusal_prob": by_group, "seconds": round(time.time() - started, 1)}


def selected_checkpoints(workdir: epath.PathLike, which: str) -> list[tuple[str, int]]:
  """(stage, step) of the kept checkpoints, refine before align; `which` = all | STEP,STEP,... (any stage's steps)."""
  found = [(stage, step) for stage in ("refine", "align") for step in checkpoints.kept_steps(workdir, stage)]
  if which != "all":
    try:
      wanted = {int(s) for s in which.split(",") if s.strip()}
    except ValueError:
      raise UserError(f"--checkpoints={which}: write all or comma-separated step numbers") from None
    missing = wanted - {step for _, step in found}
    if missing:
      raise UserError(f"--checkpoints: steps {sorted(missing)} are not in {workdir}/checkpoints; "
                      f"kept: {sorted({s for _, s in found})}")
    found = [(stage, step) for stage, step in found if step in wanted]
  return found


def track(config, workdir: epath.PathLike, which: str, compare: list[epath.PathLike]) -> dict:
  """Measures every selected checkpoint not yet in DIR/kernels/similarity.json; returns the file's content."""
  workdir, compare = as_path(workdir), [as_path(o) for o in compare]
  spec = spec_lib.resolve(config)
  if not (workdir / "config.json").is_file():
    raise UserError(f"{workdir}: no config.json; point --workdir at a dcr_jax.main run")
  for other in compare:
    if not (other / "kernels" / "similarity.json").is_file():
      raise UserError(f"--compare: {other}/kernels/similarity.json not found; run python -m dcr_jax.kernels there")
  parallel.initialize(spec.distributed)
  selected = selected_checkpoints(workdir, which)
  base, tokenizer = pipeline.build_model(spec, parallel.make_mesh(spec.mesh.data, spec.mesh.fsdp, spec.mesh.tensor))
  spec = spec.bind(base.config)
  out_dir = workdir / "kernels"
  ensure_dir(out_dir)
  path = out_dir / "similarity.json"
  result = json.loads(path.read_text()) if path.is_file() else {"entries": []}
  done = {e["label"] for e in result["entries"]}
  probe = build_probe(base, tokenizer, spec)
  result.update(prompts=len(probe.prompts), token_set=probe.ids.tolist(), params=spec.kernels.params,
                method=spec.kernels.method)
  for stage, step in [("base", 0)] + selected:
    label = "base" if stage == "base" else f"{stage}-{step}"
    if label in done:
      continue
    model = base if stage == "base" else pipeline.restore_stage(spec, base, workdir, stage, step)
    entry = {"label": label, "stage": stage, "step": step,
             **measure(unstack_layers(model), tokenizer, probe, spec)}  # layer subsets need one Block per layer
    result["entries"].append(entry)
    write_json(path, result)
    plots.heatmap(entry, out_dir / f"heatmap-{label}.png")
  runs = {workdir.name: result["entries"]}
  runs.update({o.name: json.loads((o / "kernels" / "similarity.json").read_text())["entries"] for o in compare})
  plots.curves(runs, out_dir / "tracking.png")
  first, last = result["entries"][0], result["entries"][-1]
  update_report(workdir, "kernels", None, {
      "entries": len(result["entries"]), "groups": first["groups"], "base_ratio": first["ratio"],
      "final_ratio": last["ratio"], "final_label": last["label"], "file": "kernels/similarity.json"})
  return result
