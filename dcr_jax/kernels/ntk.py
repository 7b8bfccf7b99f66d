"""Exact empirical NTK (eNTK) of the first generated token's logits, and of scalar outputs, via jax.vjp / jax.jvp.

For a prompt x and a token set S, J_x = ∂ z_S(x) / ∂θ is the Jacobian of the first-token logits restricted to S
([|S| P] over a chosen parameter subset θ), and K(a, b) = J_a J_bᵀ ([|S| |S|]) is the kernel of the learning-dynamics
account in PAPER.md: one SGD step on b moves a's logits by -η K(a, b) G(b). No finite differences anywhere.

Model functions here are pytrees (graphdef static, the other state as leaves), so they are jit arguments rather than
baked-in constants, and one compilation serves every chunk. Parameters may be sharded on a mesh (NamedSharding, e.g.
`parallel.shard_pytree(params, parallel.state_shardings(params, mesh))`, and `rest` likewise): the per-example
gradients are constrained to the parameter sharding and only the small kernel block is reduced and fetched.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.tree_util import Partial
from tqdm.auto import tqdm

from dcr_jax.errors import UserError
from dcr_jax.model.config import ModelConfig
from dcr_jax.model.layers import LoRAParam
from dcr_jax.train.state import layers_up_to

Array = jax.Array
KINDS = ("all", "up_to_layer", "lora", "last_n", "blocks")
METHODS = ("jvp_vjp", "jacobian", "structured")


# ----------------------------------------------------------------------------------------------- parameter subsets


def param_filter(kind: str, *, layer: int | None = None, last_n: int | None = None,
                 config: ModelConfig | None = None):
  """nnx filter of the parameters the kernel differentiates.

  `all`: every Param (LoRA adapters included when attached). `up_to_layer`: the embedding and blocks < `layer` (the
  stage-1 set of Proposition 1). `lora`: adapters only. `last_n`: the last `last_n` blocks, the final norm and the
  head (with tied embeddings the shared embedding matrix, whose gradient is dominated by its use as the head);
  `last_n` needs `config` for the depth. `blocks`: every block's params (adapters included), no embedding or head.
  """
  if kind == "all":
    return nnx.Param
  if kind == "blocks":
    return lambda path, variable: isinstance(variable, nnx.Param) and path[0] == "layers"
  if kind == "lora":
    return LoRAParam
  if kind == "up_to_layer":
    if layer is None or layer < 0:
      raise UserError(f"kernels: kind='up_to_layer' needs layer=ℓ >= 0 (got {layer!r})")
    return layers_up_to(layer)
  if kind == "last_n":
    if config is None or last_n is None or not 1 <= last_n <= config.num_layers:
      depth = "?" if config is None else config.num_layers
      raise UserError(f"kernels: kind='last_n' needs config= and last_n in 1..{depth} (got {last_n!r})")
    first = config.num_layers - last_n
    head = "embedding" if config.tie_embeddings else "head"

    def keep(path, variable) -> bool:
      if not isinstance(variable, nnx.Param):
        return False
      return path[0] in ("final_norm", head) or (path[0] == "layers" and int(path[1]) >= first)

    return keep
  raise UserError(f"kernels: unknown parameter subset {kind!r}; choose one of {', '.join(KINDS)}")


def split_params(model: nnx.Module, kind: str = "all", **kw) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, params, rest): `params` is the subset `kind` (see `param_filter`), `rest` everything else."""
  config = getattr(model, "config", None)
  if kind in ("up_to_layer", "last_n") and getattr(config, "scan_layers", False):
    raise UserError(f"kernels: subset {kind!r} selects single layers; pass dcr_jax.model.unstack_layers(model) "
                    "instead of a scan_layers model")
  keep = param_filter(kind, config=config, **kw)
  graphdef, params, rest = nnx.split(model, keep, ...)
  if not jax.tree.leaves(params):
    hint = " (attach adapters first: dcr_jax.model.lora.attach_lora)" if kind == "lora" else ""
    raise UserError(f"kernels: parameter subset {kind!r} {kw or ''} selects no parameters{hint}")
  return graphdef, params, rest


# ------------------------------------------------------------------------------------------------ model functions


def last_valid_index(mask: Array) -> Array:
  """[B T] mask -> [B] index of the last non-zero entry (left or right padding)."""
  mask = jnp.asarray(mask)
  return mask.shape[-1] - 1 - jnp.argmax(mask[..., ::-1] != 0, axis=-1)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["rest"], meta_fields=["graphdef"])
@dataclasses.dataclass(frozen=True, eq=False)
class FirstTokenLogits:
  """f(params, tokens [1 T], mask [1 T]) -> logits [V] at the last valid prompt position (a pytree: jit-passable)."""

  graphdef: nnx.GraphDef
  rest: nnx.State

  def __call__(self, params, tokens, mask) -> Array:
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    if tokens.ndim != 2 or tokens.shape[0] != 1 or mask.shape != tokens.shape:
      raise UserError(f"first-token logits take one prompt, tokens/mask [1 T]; got {tokens.shape} / {mask.shape}")
    model = nnx.merge(self.graphdef, params, self.rest)
    return model(tokens, mask=mask, logits_index=last_valid_index(mask))[0]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["rest"], meta_fields=["graphdef"])
@dataclasses.dataclass(frozen=True, eq=False)
class ResponseLogProb:
  """fn(params, row) -> log π(y | x): teacher-forced sum of log-probs of the response tokens of one stage-2 row.

  row: tokens/targets/loss_mask [T] (targets = tokens shifted by one; loss_mask 1 on response targets), optionally
  segments/positions [T] as in packed stage-2 batches.
  """

  graphdef: nnx.GraphDef
  rest: nnx.State

  def __call__(self, params, row: dict) -> Array:
    model = nnx.merge(self.graphdef, params, self.rest)
    segments = row.get("segments")
    logits = model(row["tokens"][None], None if row.get("positions") is None else row["positions"][None],
                   None if segments is None else segments[None])[0]  # T V
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, row["targets"][:, None].astype(jnp.int32), axis=-1)[:, 0]
    return jnp.sum(picked * row["loss_mask"].astype(picked.dtype))


def first_token_logits_fn(graphdef: nnx.GraphDef, rest: nnx.State) -> FirstTokenLogits:
  """f(params, tokens [1 T], mask [1 T]) -> logits [V] of the first generated token (the last valid position)."""
  return FirstTokenLogits(graphdef, rest)


def response_logprob_fn(graphdef: nnx.GraphDef, rest: nnx.State) -> ResponseLogProb:
  """fn(params, row) -> scalar log π(y|x) of one stage-2 row; the natural `fn` of `scalar_kernel`."""
  return ResponseLogProb(graphdef, rest)


# ---------------------------------------------------------------------------------------------------- token sets


@jax.jit
def _probs_chunk(f, params, tokens, mask):
  logits = jax.vmap(lambda t, m: f(params, t[None], m[None]))(tokens, mask)
  return jax.nn.softmax(logits, axis=-1)


def next_token_probs(f, params, tokens, mask, *, chunk_size: int = 8) -> np.ndarray:
  """[N V] first-token probabilities of `f` (e.g. the base model's) for prompts tokens/mask [N T]."""
  chunks = _chunks((np.asarray(tokens), np.asarray(mask)), chunk_size)
  probs = np.concatenate([np.asarray(_probs_chunk(_as_pytree(f), params, *c)) for c in chunks])
  return probs[: len(tokens)]


def token_set(ids=None, *, probs=None, k: int | None = None, per_prompt: bool = False) -> np.ndarray:
  """The logit set S: given `ids` ([S], e.g. first tokens of refusal openings), or the top-`k` of `probs` [N V]
  (a reference distribution, e.g. `next_token_probs` of the base model): averaged over prompts -> [k] (shared S),
  or `per_prompt` -> [N k]. Ids come sorted by decreasing probability."""
  if (ids is None) == (probs is None):
    raise UserError("token_set: give either ids= or probs= (with k=)")
  if ids is not None:
    ids = np.asarray(ids, np.int32)
    if ids.ndim not in (1, 2) or ids.shape[-1] == 0:
      raise UserError(f"token_set: ids must be [S] or [N S] with S >= 1; got shape {ids.shape}")
    return ids
  probs = np.asarray(probs)
  if probs.ndim != 2 or not k or not 1 <= k <= probs.shape[1]:
    raise UserError(f"token_set: probs must be [N V] and k in 1..V; got shape {probs.shape}, k={k!r}")
  ref = probs if per_prompt else probs.mean(axis=0, keepdims=True)
  top = np.argsort(-ref, axis=-1, kind="stable")[:, :k].astype(np.int32)
  return top if per_prompt else top[0]


# ------------------------------------------------------------------------------------------------------- helpers


def _as_pytree(fn):
  """A jit-passable callable: pytrees of arrays stay as they are, anything else is wrapped (static) in a Partial."""
  leaves = jax.tree.leaves(fn)
  if all(isinstance(x, (jax.Array, np.ndarray, np.generic)) for x in leaves):
    return fn
  return Partial(fn)


def _num(examples) -> int:
  return int(jax.tree.leaves(examples)[0].shape[0])


def _chunks(examples, size: int) -> list:
  """Examples (pytree, leading N) -> chunks of exactly `size` rows; the last is padded with row 0 (one compile)."""
  if size < 1:
    raise UserError(f"kernels: chunk_size must be >= 1 (got {size})")
  n = _num(examples)
  pad = -n % size
  padded = jax.tree.map(lambda x: np.concatenate([np.asarray(x), np.repeat(np.asarray(x)[:1], pad, 0)]), examples)
  return [jax.tree.map(lambda x: x[i:i + size], padded) for i in range(0, n + pad, size)]


def _param_shardings(params) -> tuple[NamedSharding, ...] | None:
  """The leaves' NamedShardings (hashable, a static jit argument), or None when params are not on a mesh."""
  shardings = tuple(getattr(x, "sharding", None) for x in jax.tree.leaves(params))
  return shardings if shardings and all(isinstance(s, NamedSharding) for s in shardings) else None


def _constrain(tree, shardings, lead: int):
  """Keeps per-example gradients [lead dims..., param] in the parameter sharding (leading dims replicated)."""
  if shardings is None:
    return tree
  leaves, treedef = jax.tree.flatten(tree)
  return treedef.unflatten([
      jax.lax.with_sharding_constraint(x, NamedSharding(s.mesh, P(*(None,) * lead, *s.spec)))
      for x, s in zip(leaves, shardings)])


# --------------------------------------------------------------------------------------------- the kernel engine


@functools.partial(jax.jit, static_argnames="shardings")
def _jacobians(g, params, examples, basis, shardings):
  """Rows of J for a chunk: [C R ...param], the vjps of g along the R output directions `basis` [R O], kept in the
  param sharding."""

  def rows(example):
    out, pullback = jax.vjp(lambda p: g(p, example), params)
    return jax.vmap(pullback)(basis.astype(out.dtype))[0]

  return _constrain(jax.vmap(rows)(examples), shardings, 2)


@functools.partial(jax.jit, static_argnames="shardings")
def _jvp_block(g, params, examples_a, rows_b, shardings):
  """K[a, b] = J_a J_bᵀ [Ca Cb Oa Ob] as NTK-vector products: jvp at each a along each row of J_b."""
  rows_b = _constrain(rows_b, shardings, 2)
  cb, ob = jax.tree.leaves(rows_b)[0].shape[:2]
  tangents = jax.tree.map(lambda t: t.reshape(cb * ob, *t.shape[2:]), rows_b)

  def one(example):  # [Cb·Ob Oa]; the primal is computed once, only tangents are batched
    push = lambda v: jax.jvp(lambda p: g(p, example), (params,), (v,))[1]
    return jax.vmap(push)(tangents)

  out = jax.vmap(one)(examples_a)  # Ca Cb·Ob Oa
  return out.reshape(out.shape[0], cb, ob, out.shape[-1]).transpose(0, 1, 3, 2)


@jax.jit
def _contract(rows_a, rows_b):
  """[Ca Oa ...] · [Cb Ob ...] over the parameter dims of every leaf -> [Ca Cb Oa Ob]."""
  total = 0
  for a, b in zip(jax.tree.leaves(rows_a), jax.tree.leaves(rows_b)):
    dims = tuple(range(2, a.ndim))
    total = total + jnp.tensordot(a, b, axes=(dims, dims), precision=jax.lax.Precision.HIGHEST)
  return total.transpose(0, 2, 1, 3)


def pairwise_kernel(g: Callable, params, examples, examples_b=None, *, method: str = "jvp_vjp",
                    chunk_size: int = 8, out_chunk: int | None = None, progress: bool = True,
                    desc: str = "eNTK") -> np.ndarray:
  """K[a, b] = J_a J_bᵀ for g(params, example) -> [O]: [Na Nb O O] (numpy).

  `examples` (and `examples_b`, default the same set, then only blocks a <= b are computed) are pytrees with leading
  N, processed `chunk_size` at a time, and the O outputs `out_chunk` at a time (default all), so memory stays at
  about chunk_size·out_chunk parameter-sized gradients (1.07 GB each for gemma-3-270m in float32).
  method `jvp_vjp`: vjps of the outputs of each b give J_bᵀ's columns; jvps at a along them give K(a, b) column by
  column, never forming J_a. method `jacobian`: rows of J_a and J_b as cotangent pytrees, then tree dot products.
  """
  if method not in METHODS:
    raise UserError(f"kernels: unknown method {method!r}; choose one of {', '.join(METHODS)}")
  if method == "structured":
    raise UserError("kernels: method 'structured' needs the model's layers: use logit_kernel with "
                    "first_token_logits_fn, or method jvp_vjp / jacobian")
  symmetric = examples_b is None
  examples_b = examples if symmetric else examples_b
  na, nb = _num(examples), _num(examples_b)
  g, shardings = _as_pytree(g), _param_shardings(params)
  chunks_a, chunks_b = _chunks(examples, chunk_size), _chunks(examples_b, chunk_size)
  first = jax.tree.map(lambda x: x[0], chunks_b[0])
  outputs = jax.eval_shape(g, params, first).shape[0]
  bases = _output_bases(outputs, out_chunk or outputs)
  per_pair = len(bases) * (len(bases) if method == "jacobian" else 1)
  pairs = sum(j + 1 if symmetric else len(chunks_a) for j in range(len(chunks_b))) * per_pair
  out = None
  with tqdm(total=pairs, disable=not progress, desc=desc, unit="block", leave=False) as bar:
    for j, cb in enumerate(chunks_b):
      b = slice(j * chunk_size, min((j + 1) * chunk_size, nb))
      for ob, basis_b in bases:
        rows_b = _jacobians(g, params, cb, basis_b, shardings)
        for i, ca in enumerate(chunks_a[: j + 1] if symmetric else chunks_a):
          a = slice(i * chunk_size, min((i + 1) * chunk_size, na))
          if method == "jvp_vjp":
            parts = [(slice(None), _jvp_block(g, params, ca, rows_b, shardings))]
          else:
            parts = [(oa, _contract(rows_b if symmetric and i == j and oa == ob
                                    else _jacobians(g, params, ca, basis_a, shardings), rows_b))
                     for oa, basis_a in bases]
          for oa, block in parts:
            block = np.asarray(jax.device_get(block))
            if out is None:
              out = np.zeros((na, nb, outputs, outputs), block.dtype)
            rows, cols = out[a, b, oa, ob].shape[2:]
            out[a, b, oa, ob] = block[: a.stop - a.start, : b.stop - b.start, :rows, :cols]
            bar.update()
      if symmetric:  # blocks (a < b) are complete: mirror them
        for i in range(j):
          a = slice(i * chunk_size, min((i + 1) * chunk_size, na))
          out[b, a] = out[a, b].transpose(1, 0, 3, 2)
  return out


def _output_bases(outputs: int, size: int) -> list[tuple[slice, np.ndarray]]:
  """(output slice, [size O] identity rows) per chunk of `size` outputs; the last is padded with zero rows."""
  if size < 1:
    raise UserError(f"kernels: out_chunk must be >= 1 (got {size})")
  eye = np.eye(outputs, dtype=np.float32)
  bases = []
  for start in range(0, outputs, size):
    rows = eye[start:start + size]
    bases.append((slice(start, start + len(rows)), np.concatenate([rows, np.zeros((size - len(rows), outputs),
                                                                                   np.float32)])))
  return bases


def _restricted_logits(f, params, example):
  tokens, mask, ids = example
  return f(params, tokens[None], mask[None])[ids]


def _with_ids(tokens, mask, ids) -> tuple:
  tokens, mask, ids = np.asarray(tokens), np.asarray(mask), np.asarray(ids, np.int32)
  if tokens.ndim != 2 or mask.shape != tokens.shape:
    raise UserError(f"kernels: tokens and mask must be [N T] of one shape; got {tokens.shape} and {mask.shape}")
  if ids.ndim == 1:
    ids = np.broadcast_to(ids, (len(tokens), len(ids)))
  if ids.ndim != 2 or len(ids) != len(tokens):
    raise UserError(f"kernels: token set must be [S] or [N S] with N={len(tokens)}; got shape {ids.shape}")
  return tokens, mask, ids


def logit_kernel(f, params, tokens, mask, ids, *, tokens_b=None, mask_b=None, ids_b=None, method: str = "jvp_vjp",
                 chunk_size: int = 8, out_chunk: int | None = None, progress: bool = True) -> np.ndarray:
  """First-token logit eNTK on a token set: [Na Nb S S], K[a, b, i, j] = ⟨∇θ z_{S_a[i]}(a), ∇θ z_{S_b[j]}(b)⟩.

  f: `first_token_logits_fn(...)`; tokens/mask [N T] (any padding); ids: S, shared [S] or per prompt [N S] (see
  `token_set`). With tokens_b/mask_b (and ids_b, default `ids`) the kernel is between two prompt sets, else K(X, X).
  `chunk_size` prompts and `out_chunk` tokens of S are processed at a time (see `pairwise_kernel`). method
  `structured` (`dcr_jax.kernels.structured`) contracts per-layer activations and backpropagated signals instead of
  parameter-length rows; it ignores `out_chunk`.
  """
  a = _with_ids(tokens, mask, ids)
  b = None if tokens_b is None else _with_ids(tokens_b, mask_b, ids if ids_b is None else ids_b)
  if method == "structured":
    from dcr_jax.kernels import structured  # it builds on this module

    if not isinstance(f, FirstTokenLogits):
      raise UserError("kernels: method 'structured' takes f = first_token_logits_fn(graphdef, rest)")
    return structured.logit_kernel(f.graphdef, params, f.rest, a, b, chunk_size=chunk_size, progress=progress)
  return pairwise_kernel(Partial(_restricted_logits, _as_pytree(f)), params, a, b, method=method,
                         chunk_size=chunk_size, out_chunk=out_chunk, progress=progress, desc="logit eNTK")


def _as_vector(fn, params, example):
  return jnp.reshape(fn(params, example), (1,))


def scalar_kernel(fn, params, examples, examples_b=None, *, method: str = "jacobian", chunk_size: int = 8,
                  progress: bool = True) -> np.ndarray:
  """[Na Nb] gradient dot products ⟨∇θ fn(a), ∇θ fn(b)⟩ of a scalar output per example, e.g. fn =
  `response_logprob_fn(...)` (log π(y|x)) with examples the stacked rows [N T]."""
  k = pairwise_kernel(Partial(_as_vector, _as_pytree(fn)), params, examples, examples_b, method=method,
                      chunk_size=chunk_size, progress=progress, desc="scalar eNTK")
  return k[..., 0, 0]


# ------------------------------------------------------------------------------------------ learning dynamics


def ntk_vector_product(f, params, x, v_out, x_b=None) -> Array:
  """K(x, x_b) v = J_x (J_{x_b}ᵀ v) with one vjp (at x_b, default x) and one jvp (at x); f(params, x) -> out,
  v_out shaped like f(params, x_b). Neither Jacobian is formed."""
  x_b = x if x_b is None else x_b
  _, pullback = jax.vjp(lambda p: f(p, x_b), params)
  (jtv,) = pullback(jnp.asarray(v_out))
  return jax.jvp(lambda p: f(p, x), (params,), (jtv,))[1]


def predict_one_step_change(logp_fn, loss_fn, params, x_o, batch_u, lr: float) -> Array:
  """First-order change of logp_fn(θ, x_o) after one SGD step θ ← θ - lr ∇L(θ, batch_u):
  -lr ⟨∇ logp(x_o), ∇ L(x_u)⟩, computed as a jvp of logp along the update (error O(lr²))."""
  grads = jax.grad(loss_fn)(params, batch_u)
  step = jax.tree.map(lambda g: -lr * g, grads)
  return jax.jvp(lambda p: logp_fn(p, x_o), (params,), (step,))[1]

