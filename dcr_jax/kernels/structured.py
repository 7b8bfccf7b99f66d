"""The exact first-token logit eNTK from per-layer factors: no parameter-length row is ever formed.

For a projection y_t = a_t W, the gradient of an output z is Σ_t a_t ⊗ δ_t with δ_t = ∂z/∂y_t, so its share
of K(x, x') is Σ_{t,u} (a_t·a'_u)(δ_t·δ'_u). The δ's are the gradients of z_S with respect to zero perturbations
added at every projection's output (and at the embedding lookup and the head's pre-cap logits); the a's are the
projections' inputs. Per prompt that is [S T out] per projection instead of [S in·out]. The same holds for
  - the embedding lookup x_t = E[token_t]: a_t is one-hot, so a_t·a'_u = [token_t == token'_u];
  - the head: one position, a = the final-normed hidden h, δ = ∂z/∂(logits before the soft-cap) [V]; a tied head
    shares E with the lookup, so the cross terms Σ_t δ_head'[token_t] (δ_t·h') join the kernel;
  - LoRA: A's share is a ⊗ (s δ Bᵀ), B's is (a A) ⊗ (s δ), both from the projection's own a and δ.
Every other selected parameter (norm scales, Gemma's (1 + w) and Qwen3's q/k norms included, and biases) has a
gradient of O(L·D) entries, taken per output by the same backward pass and dotted directly.

The forward is `first_token_forward`: the decoder's own blocks with taps on their projections (the model holds no
kernel logic), and the decoder's embedding and head re-expressed around them; tests check it equals the model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from dcr_jax.errors import UserError
from dcr_jax.kernels import ntk
from dcr_jax.model.decoder import default_positions
from dcr_jax.model.layers import Dense, layer_specs

Array = jax.Array
STRATEGIES = ("auto", "gram", "explicit")
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------------- the forward


class _Tap:
  """A projection that records its input and adds `delta` [1 T out] to its output."""

  def __init__(self, dense: Dense, delta: Array, inputs: dict, key: str):
    self.dense, self.delta, self.inputs, self.key = dense, delta, inputs, key

  def __call__(self, x: Array) -> Array:
    self.inputs[self.key] = x
    y = self.dense(x)
    return y + self.delta.astype(y.dtype)


def _module(root, path: tuple):
  for key in path:
    root = root[key] if isinstance(key, int) else getattr(root, key)
  return root


def _check_unscanned(config) -> None:
  if config.scan_layers:
    raise UserError("kernels: method 'structured' needs one Block per layer; pass "
                    "dcr_jax.model.unstack_layers(model)")


def first_token_forward(model, tokens: Array, mask: Array, embed_delta: Array | None = None,
                        head_delta: Array | None = None) -> tuple[Array, Array]:
  """(logits [V], final-normed hidden [D]) of one prompt, tokens/mask [1 T]: the decoder's forward to the last
  valid position, with optional perturbations of the looked-up embedding rows [1 T D] and the pre-cap logits [V]."""
  cfg = model.config
  _check_unscanned(cfg)
  tokens, mask = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask).astype(jnp.int32)
  rows = model.embedding[...][tokens]
  if embed_delta is not None:
    rows = rows + embed_delta.astype(rows.dtype)
  x = rows.astype(cfg.dtype)
  if cfg.scale_embeddings:
    x = x * jnp.asarray(cfg.embed_dim ** 0.5, cfg.dtype)
  positions = default_positions(mask)
  slots = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  for block, layer in zip(model.layers, layer_specs(cfg)):
    x, _ = block(x, layer, positions, mask, slots)
  h = model.final_norm(x[0, ntk.last_valid_index(mask)[0]])
  table = (model.embedding[...] if cfg.tie_embeddings else model.head[...].T).astype(h.dtype)  # V D
  y = h @ table.T
  if head_delta is not None:
    y = y + head_delta.astype(y.dtype)
  logits = y.astype(jnp.promote_types(h.dtype, jnp.float32))
  if cfg.final_logit_softcap is not None:
    logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
  return logits, h


# -------------------------------------------------------------------------------------------------------- the plan


class _TapPlan(NamedTuple):
  """One projection: its module path and, per selected parameter (kernel, lora_a, lora_b), "gram" or "explicit"."""

  path: tuple
  forms: tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What the selected subset needs (hashable: a static jit argument)."""

  taps: tuple[_TapPlan, ...]
  embedding: bool  # the lookup's share of the embedding
  head: bool  # the head's share: the untied head, or the tied embedding used as the head
  tied: bool


def _key(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def _form(strategy: str, t: int, s: int, d_in: int, d_out: int) -> str:
  """Per prompt pair, gram costs T²·in + S·T²·out + S²·T·out multiply-adds and keeps T·in + S·T·out numbers
  per prompt; explicit costs S²·in·out and keeps S·in·out. auto takes explicit where it is cheaper and no
  larger."""
  if strategy != "auto":
    return strategy
  cheaper = s * s * d_in * d_out <= t * t * d_in + s * t * t * d_out + s * s * t * d_out
  return "explicit" if cheaper and s * d_in * d_out <= t * d_in + s * t * d_out else "gram"


def _plan(model, selected: set, width: int, outputs: int, strategy: str) -> tuple[_Plan, set]:
  """The plan, and the selected parameter paths whose per-output gradients are taken directly."""
  structural = set()
  taps = []
  for path, dense in nnx.iter_modules(model):
    if not isinstance(dense, Dense):
      continue
    d_in, d_out = dense.kernel.shape
    rank = 0 if dense.lora_a is None else dense.lora_a.shape[-1]
    shapes = {"kernel": (d_in, d_out), "lora_a": (d_in, rank), "lora_b": (rank, d_out)}
    forms = tuple((name, _form(strategy, width, outputs, *shape)) for name, shape in shapes.items()
                  if (*path, name) in selected)
    structural |= {(*path, name) for name, _ in forms}
    if forms:
      taps.append(_TapPlan(tuple(path), forms))
  tied = model.config.tie_embeddings
  embedding = ("embedding",) in selected
  head = embedding if tied else ("head",) in selected
  structural |= {("embedding",), ("head",)}
  return _Plan(tuple(taps), embedding, head, tied), selected - structural


# ------------------------------------------------------------------------------------------------------ the factors


def _prompt_factors(graphdef, plan: _Plan, direct, frozen, tokens, mask, ids) -> dict:
  """One prompt's factors: tokens/mask [T], ids [S] -> {"gram": {group: (a [G T in], δ [G S T out])},
  "explicit": {group: [G S ...param]}, "gather": (tokens [T], δ [S T D]), "head": (h [D], δ [S V])} (the last two
  when planned)."""
  shape_model = nnx.merge(graphdef, direct, frozen)
  cfg = shape_model.config
  t = tokens.shape[0]
  deltas = {_key(tap.path): jnp.zeros((1, t, _module(shape_model, tap.path).kernel.shape[1]), cfg.dtype)
            for tap in plan.taps}
  if plan.embedding:
    deltas["embed"] = jnp.zeros((1, t, cfg.embed_dim), shape_model.embedding.dtype)
  if plan.head:
    deltas["head"] = jnp.zeros((cfg.vocab_size,), cfg.dtype)

  def forward(direct, deltas):
    model = nnx.merge(graphdef, direct, frozen)
    inputs = {}
    for tap in plan.taps:
      parent = _module(model, tap.path[:-1])
      setattr(parent, tap.path[-1], _Tap(getattr(parent, tap.path[-1]), deltas[_key(tap.path)], inputs,
                                         _key(tap.path)))
    logits, h = first_token_forward(model, tokens[None], mask[None], deltas.get("embed"), deltas.get("head"))
    return logits[ids], (inputs, h)

  z, pullback, (inputs, h) = jax.vjp(forward, direct, deltas, has_aux=True)
  grads, signals = jax.vmap(pullback)(jnp.eye(z.shape[0], dtype=z.dtype))
  gram, explicit = [], [v[...] for _, v in nnx.to_flat_state(grads)]

  def add(form, a, delta):  # a [T in], delta [S T out]
    if form == "gram":
      gram.append((a, delta))
    else:
      explicit.append(jnp.einsum("ti,sto->sio", a, delta, precision=_HIGHEST))

  for tap in plan.taps:
    dense, key = _module(shape_model, tap.path), _key(tap.path)
    a, delta = inputs[key][0], signals[key][:, 0]
    for name, form in tap.forms:
      if name == "kernel":
        add(form, a, delta)
      elif name == "lora_a":
        add(form, a, dense.lora_scale * jnp.einsum("sto,ro->str", delta, dense.lora_b[...].astype(a.dtype)))
      else:
        add(form, a @ dense.lora_a[...].astype(a.dtype), dense.lora_scale * delta)
  out = {"gram": _stack(gram, lambda term: (term[0].shape[1], term[1].shape[2])),
         "explicit": _stack(explicit, lambda g: g.shape[1:])}
  if plan.embedding:
    out["gather"] = (tokens, signals["embed"][:, 0])
  if plan.head:
    out["head"] = (h, signals["head"])
  return out


def _stack(terms: list, shape) -> dict:
  """Terms of one `shape` (not depending on T or S, so two prompt sets group alike) stacked on a leading axis G,
  in plan order: {"in x out": [G ...]}; G-loops keep one projection's intermediates alive at a time."""
  groups: dict = {}
  for term in terms:
    groups.setdefault("x".join(map(str, shape(term))), []).append(term)
  return {k: jax.tree.map(lambda *xs: jnp.stack(xs), *v) for k, v in groups.items()}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _factors(graphdef, plan, direct, frozen, tokens, mask, ids) -> dict:
  """`_prompt_factors` for a chunk of prompts [C T] (leading C on every factor)."""
  return jax.vmap(lambda t, m, i: _prompt_factors(graphdef, plan, direct, frozen, t, m, i))(tokens, mask, ids)


# -------------------------------------------------------------------------------------------------- the contraction


def _gram(c, ra, rb):
  """Σ_{t,u} c[t,u] (δ_a[i,t]·δ_b[j,u]) for c [Ca Cb T U], ra [Ca S T O], rb [Cb S' U O] -> [Ca Cb S S'], as two
  batched matmuls in row-major layouts (a quarter faster on CPU than the plain einsums)."""
  (ca, cb, t, u), s, s2, o = c.shape, ra.shape[1], rb.shape[1], ra.shape[3]
  c = c.transpose(1, 0, 2, 3).reshape(cb, ca * t, u)
  x = jnp.matmul(c, rb.transpose(0, 2, 1, 3).reshape(cb, u, s2 * o), precision=_HIGHEST)  # Cb (Ca T) (S' O)
  x = x.reshape(cb, ca, t, s2, o).transpose(1, 2, 4, 0, 3).reshape(ca, t * o, cb * s2)
  k = jnp.matmul(ra.reshape(ca, s, t * o), x, precision=_HIGHEST)  # Ca S (Cb S')
  return k.reshape(ca, s, cb, s2).transpose(0, 2, 1, 3)


def _lookup_head(gather, head):
  """The tied embedding's cross term ⟨lookup gradient of a, head gradient of b⟩ -> [Ca Cb S S']:
  Σ_t δ_head_b[j, token_a,t] (δ_a[i,t]·h_b)."""
  (tokens, ra), (h, rh) = gather, head
  g = jnp.einsum("xitd,yd->xyit", ra, h, precision=_HIGHEST)
  picked = jnp.take(rh, tokens, axis=2)  # Cb S' Ca T
  return jnp.einsum("xyit,yjxt->xyij", g, picked, precision=_HIGHEST)


def _loop(groups_a, groups_b, term):
  """Σ over every group and every member g of term(a_g, b_g) -> [Ca Cb S S'], members one at a time (fori_loop)."""
  total = 0
  for name, a in groups_a.items():
    b = groups_b[name]
    pick = lambda tree, g: jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, g, 1, keepdims=False), tree)
    body = lambda g, acc: acc + term(pick(a, g), pick(b, g))
    first = jax.eval_shape(term, pick(a, 0), pick(b, 0))
    total = total + jax.lax.fori_loop(0, jax.tree.leaves(a)[0].shape[1], body, jnp.zeros(first.shape, first.dtype))
  return total


def _gram_term(a, b):
  (la, ra), (lb, rb) = a, b
  return _gram(jnp.einsum("xti,yui->xytu", la, lb, precision=_HIGHEST), ra, rb)


def _explicit_term(ga, gb):
  dims = tuple(range(2, ga.ndim))
  return jnp.tensordot(ga, gb, axes=(dims, dims), precision=_HIGHEST).transpose(0, 2, 1, 3)


@functools.partial(jax.jit, static_argnums=0)
def _contract(plan, fa, fb):
  """K[a, b] [Ca Cb S S'] from the factors of two chunks."""
  total = _loop(fa["gram"], fb["gram"], _gram_term) + _loop(fa["explicit"], fb["explicit"], _explicit_term)
  if plan.embedding:
    (ta, ra), (tb, rb) = fa["gather"], fb["gather"]
    total = total + _gram((ta[:, None, :, None] == tb[None, :, None, :]).astype(ra.dtype), ra, rb)
  if plan.head:
    (ha, ra), (hb, rb) = fa["head"], fb["head"]
    total = total + (jnp.einsum("xd,yd->xy", ha, hb, precision=_HIGHEST)[..., None, None]
                     * jnp.einsum("xiv,yjv->xyij", ra, rb, precision=_HIGHEST))
  if plan.tied and plan.embedding:
    total = total + _lookup_head(fa["gather"], fb["head"])
    total = total + _lookup_head(fb["gather"], fa["head"]).transpose(1, 0, 3, 2)
  return total


# ------------------------------------------------------------------------------------------------------- the driver


def _prepare(graphdef, params, rest, width: int, outputs: int, strategy: str):
  """(plan, graphdef, direct, frozen): the model re-split into the parameters differentiated directly and the
  rest (closed over)."""
  if strategy not in STRATEGIES:
    raise UserError(f"kernels: unknown structured strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
  model = nnx.merge(graphdef, params, rest)
  _check_unscanned(model.config)
  selected = {path for path, _ in nnx.to_flat_state(params)}
  plan, direct_paths = _plan(model, selected, width, outputs, strategy)
  return (plan, *nnx.split(model, lambda path, _: path in direct_paths, ...))


def logit_kernel(graphdef, params, rest, examples, examples_b=None, *, chunk_size: int = 8, progress: bool = True,
                 strategy: str = "auto") -> np.ndarray:
  """First-token logit eNTK [Na Nb S S] over the parameters `params` of nnx.merge(graphdef, params, rest).

  examples (and examples_b, default the same set; then only blocks a <= b are computed): (tokens [N T], mask [N T],
  ids [N S]). Factors are computed `chunk_size` prompts at a time and kept on the host (per prompt, about S·T·Σout
  numbers over the selected projections); blocks of chunk pairs are contracted on the device. `strategy`: per
  projection, contract the factors ("gram"), form its [S in out] gradient ("explicit"), or choose by cost and size
  ("auto", see `_form`).
  """
  symmetric = examples_b is None
  sets = [examples] if symmetric else [examples, examples_b]
  width, outputs = max(s[0].shape[1] for s in sets), max(s[2].shape[1] for s in sets)
  plan, graphdef, direct, frozen = _prepare(graphdef, params, rest, width, outputs, strategy)
  chunk_size = min(chunk_size, max(len(s[0]) for s in sets))
  chunked = [ntk._chunks(s, chunk_size) for s in sets]
  steps = sum(len(c) for c in chunked)
  steps += len(chunked[0]) * (len(chunked[0]) + 1) // 2 if symmetric else len(chunked[0]) * len(chunked[1])
  keep = (lambda x: x) if jax.default_backend() == "cpu" else jax.device_get  # the host, without a copy on CPU
  with tqdm(total=steps, disable=not progress, desc="structured eNTK", unit="step", leave=False) as bar:
    factors = []
    for chunks in chunked:
      factors.append([])
      for chunk in chunks:
        factors[-1].append(keep(jax.block_until_ready(_factors(graphdef, plan, direct, frozen, *chunk))))
        bar.update()
    fa, fb = factors[0], factors[-1]
    na, nb = len(sets[0][0]), len(sets[-1][0])
    out = None
    for j, f_b in enumerate(fb):
      b = slice(j * chunk_size, min((j + 1) * chunk_size, nb))
      for i, f_a in enumerate(fa[: j + 1] if symmetric else fa):
        a = slice(i * chunk_size, min((i + 1) * chunk_size, na))
        block = np.asarray(jax.device_get(_contract(plan, f_a, f_b)))
        if out is None:
          out = np.zeros((na, nb, *block.shape[2:]), block.dtype)
        out[a, b] = block[: a.stop - a.start, : b.stop - b.start]
        if symmetric and i < j:
          out[b, a] = out[a, b].transpose(1, 0, 3, 2)
        bar.update()
  return out


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _compiled_bytes(fn, *args) -> dict:
  """Arguments, outputs and temporaries of jit `fn` compiled for `args` (shapes suffice), from XLA's analysis."""
  m = fn.lower(*args).compile().memory_analysis()
  alias = getattr(m, "alias_size_in_bytes", 0) or 0
  return {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
          "temp": int(m.temp_size_in_bytes),
          "total": int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - alias)}


def memory_estimate(graphdef, params, rest, *, prompts: int, width: int, outputs: int, chunk_size: int = 8,
                    strategy: str = "auto") -> dict:
  """Bytes of a `logit_kernel` run over `prompts` prompts of `width` tokens and |S| = `outputs`, from the compiled
  memory analysis of its two device functions; params/rest may be abstract (jax.ShapeDtypeStruct leaves).

  factors: one chunk's factor step; contract: one block of two chunks; host_factors: the factors of every prompt
  kept on the host (and on the device while a block uses two chunks of them); device_peak: the larger step.
  """
  plan, graphdef, direct, frozen = _prepare(graphdef, params, rest, width, outputs, strategy)
  chunk_size = min(chunk_size, prompts)
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  chunk = (spec(chunk_size, width), spec(chunk_size, width), spec(chunk_size, outputs))
  factors = _compiled_bytes(_factors, graphdef, plan, direct, frozen, *chunk)
  shapes = jax.eval_shape(lambda *c: _factors(graphdef, plan, direct, frozen, *c), *chunk)
  contract = _compiled_bytes(_contract, plan, shapes, shapes)
  per_prompt = _nbytes(shapes) // chunk_size
  return {"factors": factors, "contract": contract, "factors_per_prompt": per_prompt,
          "host_factors": per_prompt * prompts, "device_peak": max(factors["total"], contract["total"])}
