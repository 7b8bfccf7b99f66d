"""What every steering method measures: the run's prompt classes split into estimation and validation prompts,
class means of the residual stream at the post-instruction positions (float64), and next-token statistics under an
intervention (refusal probability of the refusal openings' first tokens, KL to the unsteered model)."""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dcr_jax.data.batching import load_spec_list
from dcr_jax.errors import UserError
from dcr_jax.evaluate.generate import bucket_length, contrast_logits, left_pad
from dcr_jax.evaluate.refusal_prob import opening_token_ids
from dcr_jax.weights.tokenizer import encode_chat

if TYPE_CHECKING:  # the spec is read, never built, here
  from dcr_jax.spec import Spec

CLASSES = ("harmful", "harmless", "pseudo_harmful")
BUCKET = 16  # prompt lengths are padded to a multiple of this


@dataclasses.dataclass(frozen=True)
class SteerData:
  """Prompt texts per class (harmful, harmless, pseudo_harmful), each split into `train` (estimation) and `val`
  (selection) by a seeded shuffle; `tail` chat-template tokens follow the instruction in every prompt."""

  train: dict[str, list[str]]
  val: dict[str, list[str]]
  tail: int


def _class_records(spec: Spec, name: str) -> tuple[list[dict], str]:
  d = spec.data
  if name == "harmful":
    key = "data.toxic" if d.toxic else "data.harmful"
    return load_spec_list(d.toxic or d.harmful, label="toxic", key=key), key
  if name == "harmless":
    return load_spec_list(d.general, label="benign", key="data.general"), "data.general"
  return load_spec_list(d.seemingly_toxic, label="seemingly_toxic", key="data.seemingly_toxic"), \
      "data.seemingly_toxic"


def load_data(spec: Spec, tokenizer) -> SteerData:
  """The three classes from the run's data (harmful = data.toxic, else data.harmful; harmless = data.general's
  prompts; pseudo-harmful = data.seemingly_toxic), validation carved off first; a UserError names an empty class."""
  sc = spec.steer
  train, val = {}, {}
  for i, name in enumerate(CLASSES):
    records, key = _class_records(spec, name)
    prompts = list(dict.fromkeys(r["prompt"] for r in records))
    if len(prompts) < 2:
      raise UserError(f"config.{key}: the {name} class has {len(prompts)} prompts; steering estimates directions "
                      "from it and validates on it, so give at least 2")
    order = np.random.default_rng([spec.seed, 71, i]).permutation(len(prompts))
    n_val = min(sc.n_val, len(prompts) // 2)
    val[name] = [prompts[j] for j in order[:n_val]]
    rest = [prompts[j] for j in order[n_val:]]
    train[name] = rest[:sc.n_train] if sc.n_train else rest
  return SteerData(train, val, template_tail(tokenizer, [p for ps in train.values() for p in ps]))


def template_tail(tokenizer, prompts: Sequence[str]) -> int:
  """How many chat-template tokens follow the user's message (e.g. Gemma's `<end_of_turn>\\n<start_of_turn>model\\n`):
  the longest id suffix every chat-templated prompt shares."""
  ids = [encode_chat(tokenizer, p)[0] for p in prompts]
  tail = 0
  while tail < min(len(x) for x in ids) and len({tuple(x[len(x) - tail - 1:]) for x in ids}) == 1:
    tail += 1
  if tail == 0:
    raise UserError("the chat template adds no tokens after the user's message; steering needs the "
                    "post-instruction positions (set config.model.chat_template)")
  return tail


def encode(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
  """Chat-templated prompt ids, ending where the model answers."""
  return [encode_chat(tokenizer, p)[0] for p in prompts]


def batches(ids: Sequence[Sequence[int]], batch_size: int):
  """(start, count, rows) per batch; the last batch is filled with copies, so every batch has one shape."""
  for start in range(0, len(ids), batch_size):
    rows = list(ids[start:start + batch_size])
    count = len(rows)
    yield start, count, rows + [rows[-1]] * (batch_size - count)


def padded(rows: Sequence[Sequence[int]], pad_id: int, length: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded tokens/mask [B T]: T = `length` when it fits (one compiled shape for every batch), else a multiple
  of BUCKET."""
  longest = max(len(r) for r in rows)
  return left_pad(rows, length if length >= longest else bucket_length(longest, BUCKET), pad_id)


@functools.partial(jax.jit, static_argnames=("graphdef", "layers", "tail"))
def _tail_states(graphdef, state, tokens, mask, *, layers: tuple[int, ...], tail: int):
  """[len(layers) B tail D] residual stream at the last `tail` positions (left-padded rows)."""
  model = nnx.merge(graphdef, state)
  out = model(tokens, mask=mask, stop_at_layer=max(layers), return_hidden=layers)
  return jnp.stack([out.hidden[l][:, -tail:] for l in layers])


def tail_states(model, ids: Sequence[Sequence[int]], layers: Sequence[int], tail: int, *, batch_size: int,
                pad_id: int, length: int = 0) -> np.ndarray:
  """[N len(layers) tail D] float64: each prompt's residual stream at `layers`, last `tail` positions (rows padded
  to `length`, see `padded`)."""
  graphdef, state = nnx.split(model)
  out = []
  for _, count, rows in batches(ids, batch_size):
    tokens, mask = padded(rows, pad_id, length)
    states = _tail_states(graphdef, state, tokens, mask, layers=tuple(layers), tail=tail)
    out.append(np.asarray(states, np.float64).transpose(1, 0, 2, 3)[:count])
  return np.concatenate(out)


def class_mean(model, ids, layers, tail, **kw) -> np.ndarray:
  """[len(layers) tail D] float64 mean of `tail_states` over the prompts."""
  return tail_states(model, ids, layers, tail, **kw).mean(axis=0)


@functools.partial(jax.jit, static_argnames=("graphdef", "contrast"))
def _next_log_probs(graphdef, state, tokens, mask, edits, alpha, contrast: bool):
  """[B V] float32 log-softmax of the next token after left-padded rows, under `edits` (contrastive: rows
  [plain; contrasting] [2B T])."""
  model = nnx.merge(graphdef, state)
  last = jnp.full((tokens.shape[0],), tokens.shape[1] - 1, jnp.int32)
  logits = model(tokens, mask=mask, logits_index=last, interventions=edits)
  if contrast:
    logits = contrast_logits(logits, alpha)
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def next_log_probs(model, ids: Sequence[Sequence[int]], *, batch_size: int, pad_id: int, length: int = 0,
                   edits: Callable[[list[list[int]]], tuple] | None = None,
                   contrast: Sequence[Sequence[int]] | None = None, alpha: float = 0.0) -> np.ndarray:
  """[N V] float32 next-token log-probabilities after each prompt, under `edits(rows)` (rows of a batch) or decoded
  contrastively against `contrast` (one prompt per row) with weight `alpha`; rows padded to `length`."""
  graphdef, state = nnx.split(model)
  out = []
  for start, count, rows in batches(ids, batch_size):
    batch = rows
    if contrast is not None:
      other = list(contrast[start:start + count])
      batch = rows + other + [other[-1]] * (batch_size - count)
    tokens, mask = padded(batch, pad_id, length)
    log_probs = _next_log_probs(graphdef, state, tokens, mask, tuple(edits(rows) if edits else ()),
                                jnp.float32(alpha), contrast is not None)
    out.append(np.asarray(log_probs)[:count])
  return np.concatenate(out)


def refusal_token_ids(tokenizer) -> np.ndarray:
  """The distinct first tokens of the refusal openings (`REFUSAL_OPENINGS`): the set R of the refusal score."""
  return np.unique([ids[0] for _, ids in opening_token_ids(tokenizer)])


def refusal_prob(log_probs: np.ndarray, refusal_ids: np.ndarray) -> np.ndarray:
  """[N] p(R): next-token probability mass on the refusal tokens."""
  return np.exp(log_probs[:, refusal_ids].astype(np.float64)).sum(axis=1)


def refusal_score(log_probs: np.ndarray, refusal_ids: np.ndarray) -> float:
  """Mean over prompts of log p(R) − log(1 − p(R)) (Arditi et al. 2024)."""
  p = np.clip(refusal_prob(log_probs, refusal_ids), 1e-12, 1 - 1e-12)
  return float(np.mean(np.log(p) - np.log1p(-p)))


def kl(base: np.ndarray, other: np.ndarray) -> float:
  """Mean over prompts of KL(base ‖ other) between next-token distributions given as log-probabilities [N V]."""
  base, other = base.astype(np.float64), other.astype(np.float64)
  return float(np.mean(np.sum(np.exp(base) * (base - other), axis=1)))


def unit(v: np.ndarray) -> np.ndarray:
  """v / ‖v‖ along the last axis; a zero vector is a UserError (its class means coincide)."""
  norm = np.linalg.norm(v, axis=-1, keepdims=True)
  if np.any(norm == 0):
    raise UserError("a steering direction is zero (the two classes' mean activations coincide there); use other "
                    "layers (config.steer.layers) or other data")
  return v / norm
