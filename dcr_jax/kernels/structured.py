"""The exact first-token logit eNTK from per-layer factors: no parameter-length row is ever formed.

For a projection y_t = a_t W, the gradient of an output z is Σ_t a_t ⊗ δ_t with δ_t = ∂z/∂y_t, so its share of
K(x, x') is Σ_{t,u} (a_t·a'_u)(δ_t·δ'_u). The δ's are the gradients of z_S with respect to zero perturbations added
at every projection's output (and at the embedding lookup and the head's pre-cap logits); the a's are the
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


def first_token_forward(model, tokens: Array, mask: Array, embed_delta: Array | None = None,
                        head_delta: Array | None = None) -> tuple[Array, Array]:
  """(logits [V], final-normed hidden [D]) of one prompt, tokens/mask [1 T]: the decoder's forward to the last
  valid position, with optional perturbations of the looked-up embedding rows [1 T D] and the pre-cap logits [V]."""
  cfg = model.config
  if cfg.scan_layers:
    raise UserError("kernels: method 'structured' needs one Block per layer; pass "
                    "dcr_jax.model.unstack_layers(model)")
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
  """Per prompt pair, gram costs T²·in + S·T²·out + S²·T·out multiply-adds, explicit S²·in·out; auto takes the
  cheaper."""
  if strategy != "auto":
    return strategy
  return "explicit" if s * s * d_in * d_out <= t * t * d_in + s * t * t * d_out + s * s * t * d_out else "gram"


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
  """One prompt's factors: tokens/mask [T], ids [S] -> {"gram": {name: (a [T in], δ [S T out])}, "explicit":
  {name: [S ...param]}, "gather": (tokens [T], δ [S T D]), "head": (h [D], δ [S V])} (the last two when planned)."""
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
  out = {"gram": {}, "explicit": {_key(p): v[...] for p, v in nnx.to_flat_state(grads)}}

  def add(name, form, a, delta):  # a [T in], delta [S T out]
    if form == "gram":
      out["gram"][name] = (a, delta)
    else:
      out["explicit"][name] = jnp.einsum("ti,sto->sio", a, delta, precision=_HIGHEST)

  for tap in plan.taps:
    dense, key = _module(shape_model, tap.path), _key(tap.path)
    a, delta = inputs[key][0], signals[key][:, 0]
    for name, form in tap.forms:
      if name == "kernel":
        add(f"{key}/kernel", form, a, delta)
      elif name == "lora_a":
        add(f"{key}/lora_a", form, a, dense.lora_scale * jnp.einsum("sto,ro->str", delta,
                                                                    dense.lora_b[...].astype(a.dtype)))
      else:
        add(f"{key}/lora_b", form, a @ dense.lora_a[...].astype(a.dtype), dense.lora_scale * delta)
  if plan.embedding:
    out["gather"] = (tokens, signals["embed"][:, 0])
  if plan.head:
    out["head"] = (h, signals["head"])
  return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _factors(graphdef, plan, direct, frozen, tokens, mask, ids) -> dict:
  """`_prompt_factors` for a chunk of prompts [C T] (leading C on every factor)."""
  return jax.vmap(lambda t, m, i: _prompt_factors(graphdef, plan, direct, frozen, t, m, i))(tokens, mask, ids)


# -------------------------------------------------------------------------------------------------- the contraction


def _gram(c, ra, rb):
  """Σ_{t,u} c[t,u] (δ_a[i,t]·δ_b[j,u]) for c [Ca Cb T U], ra [Ca S T O], rb [Cb S' U O] -> [Ca Cb S S']."""
  x = jnp.einsum("xytu,yjuo->xytjo", c, rb, precision=_HIGHEST)
  return jnp.einsum("xito,xytjo->xyij", ra, x, precision=_HIGHEST)


def _lookup_head(gather, head):
  """The tied embedding's cross term ⟨lookup gradient of a, head gradient of b⟩ -> [Ca Cb S S']:
  Σ_t δ_head_b[j, token_a,t] (δ_a[i,t]·h_b)."""
  (tokens, ra), (h, rh) = gather, head
  g = jnp.einsum("xitd,yd->xyit", ra, h, precision=_HIGHEST)
  picked = jnp.take(rh, tokens, axis=2)  # Cb S' Ca T
  return jnp.einsum("xyit,yjxt->xyij", g, picked, precision=_HIGHEST)


@functools.partial(jax.jit, static_argnums=0)
def _contract(plan, fa, fb):
  """K[a, b] [Ca Cb S S'] from the factors of two chunks."""
  total = 0
  for name, (la, ra) in fa["gram"].items():
    lb, rb = fb["gram"][name]
    total = total + _gram(jnp.einsum("xti,yui->xytu", la, lb, precision=_HIGHEST), ra, rb)
  for name, ga in fa["explicit"].items():
    gb = fb["explicit"][name]
    dims = tuple(range(2, ga.ndim))
    total = total + jnp.tensordot(ga, gb, axes=(dims, dims), precision=_HIGHEST).transpose(0, 2, 1, 3)
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


def logit_kernel(graphdef, params, rest, examples, examples_b=None, *, chunk_size: int = 8, progress: bool = True,
                 strategy: str = "auto") -> np.ndarray:
  """First-token logit eNTK [Na Nb S S] over the parameters `params` of nnx.merge(graphdef, params, rest).

  examples (and examples_b, default the same set; then only blocks a <= b are computed): (tokens [N T], mask [N T],
  ids [N S]). Factors are computed `chunk_size` prompts at a time and kept on the host (per prompt, about S·T·Σout
  numbers over the selected projections); blocks of chunk pairs are contracted on the device. `strategy`: per
  projection, contract the factors ("gram"), form its [S in out] gradient ("explicit"), or take the cheaper
  ("auto").
  """
  if strategy not in STRATEGIES:
    raise UserError(f"kernels: unknown structured strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
  symmetric = examples_b is None
  sets = [examples] if symmetric else [examples, examples_b]
  model = nnx.merge(graphdef, params, rest)
  if model.config.scan_layers:
    raise UserError("kernels: method 'structured' needs one Block per layer; pass "
                    "dcr_jax.model.unstack_layers(model)")
  selected = {path for path, _ in nnx.to_flat_state(params)}
  width, outputs = max(s[0].shape[1] for s in sets), max(s[2].shape[1] for s in sets)
  plan, direct_paths = _plan(model, selected, width, outputs, strategy)
  graphdef, direct, frozen = nnx.split(model, lambda path, _: path in direct_paths, ...)

  chunked = [ntk._chunks(s, chunk_size) for s in sets]
  steps = sum(len(c) for c in chunked)
  steps += len(chunked[0]) * (len(chunked[0]) + 1) // 2 if symmetric else len(chunked[0]) * len(chunked[1])
  with tqdm(total=steps, disable=not progress, desc="structured eNTK", unit="step", leave=False) as bar:
    factors = []
    for chunks in chunked:
      factors.append([])
      for chunk in chunks:
        factors[-1].append(jax.device_get(_factors(graphdef, plan, direct, frozen, *chunk)))
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
