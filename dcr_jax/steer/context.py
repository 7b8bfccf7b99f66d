"""What a method's selection reads: the model, the prompts (ids per class and split), next-token statistics under an
intervention, and the one objective every method's coefficient is chosen by."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np
from tqdm import tqdm

from dcr_jax.model.interventions import Edit, ablate_everywhere, add, span
from dcr_jax.steer import activations as act
from dcr_jax.steer.activations import SteerData

EXTRA = 48  # room for what some methods append to a prompt (scans' affirmative opening, self_cd's system prompt)


@dataclasses.dataclass
class Context:
  """A selection run: `settings` is config.steer resolved (`dcr_jax.spec.SteerSpec`)."""

  model: Any
  tokenizer: Any
  data: SteerData
  settings: Any
  _base: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.train = {c: act.encode(self.tokenizer, p) for c, p in self.data.train.items()}
    self.val = {c: act.encode(self.tokenizer, p) for c, p in self.data.val.items()}
    self.refusal_ids = act.refusal_token_ids(self.tokenizer)
    self.pad_id = self.tokenizer.pad_token_id or 0
    self.num_layers = self.model.config.num_layers
    longest = max(len(x) for split in (self.train, self.val) for ids in split.values() for x in ids)
    self.kw = dict(batch_size=self.settings.batch_size, pad_id=self.pad_id,  # one padded length: one compile each
                   length=act.bucket_length(longest + EXTRA, act.BUCKET))

  @property
  def tail(self) -> int:
    return self.data.tail

  def means(self, cls: str, layers: Sequence[int], tail: int) -> np.ndarray:
    """[len(layers) tail D] float64 mean residual stream of the class's estimation prompts."""
    return act.class_mean(self.model, self.train[cls], layers, tail, **self.kw)

  def log_probs(self, cls: str, edits: Callable | tuple | None = None, **contrast) -> np.ndarray:
    """[N V] next-token log-probabilities on the class's validation prompts; `edits` a tuple or rows -> tuple."""
    if edits is None and not contrast:
      if cls not in self._base:
        self._base[cls] = act.next_log_probs(self.model, self.val[cls], **self.kw)
      return self._base[cls]
    fn = edits if callable(edits) or edits is None else (lambda rows: edits)
    return act.next_log_probs(self.model, self.val[cls], edits=fn, **self.kw, **contrast)

  def p_refuse(self, cls: str, edits=None, **contrast) -> float:
    """Mean first-token refusal probability p(R) on the class's validation prompts."""
    return float(np.mean(act.refusal_prob(self.log_probs(cls, edits, **contrast), self.refusal_ids)))

  def score(self, cls: str, edits=None) -> float:
    """Refusal score (mean log-odds of R) on the class's validation prompts."""
    return act.refusal_score(self.log_probs(cls, edits), self.refusal_ids)

  def kl(self, cls: str, edits) -> float:
    """Mean KL(unsteered ‖ steered) of the next-token distribution on the class's validation prompts."""
    return act.kl(self.log_probs(cls), self.log_probs(cls, edits))

  def eligible_layers(self) -> list[int]:
    """Candidate layers: config.steer.layers, else every ℓ in 1..L below the last 20% of layers."""
    if self.settings.layers:
      return list(self.settings.layers)
    return [l for l in range(1, self.num_layers + 1) if l < 0.8 * self.num_layers] or [1]

  def positions(self) -> int:
    """How many post-instruction positions are searched (config.steer.positions, 0 = all of the template tail)."""
    return min(self.settings.positions or self.tail, self.tail)


def choose_coefficient(ctx: Context, coefs: Sequence[float], steer: Callable[[float, str], dict]
                       ) -> tuple[float | None, list]:
  """The coefficient of `coefs` that most lowers the pseudo-harmful validation refusal probability while the harmful
  one stays at least config.steer.keep_harmful × its unsteered value; None (no steering) when none does better.

  `steer(c, cls)` gives the keyword arguments of `Context.p_refuse` for coefficient c on class `cls`. Returns
  (chosen, table rows; the first row, coef None, is the unsteered model).
  """
  floor = ctx.settings.keep_harmful * ctx.p_refuse("harmful")
  rows = [{"coef": None, "p_refuse_pseudo_harmful": ctx.p_refuse("pseudo_harmful"),
           "p_refuse_harmful": ctx.p_refuse("harmful"), "kept": True}]
  for c in coefs:
    harmful = ctx.p_refuse("harmful", **steer(c, "harmful"))
    rows.append({"coef": float(c), "p_refuse_pseudo_harmful": ctx.p_refuse("pseudo_harmful",
                                                                           **steer(c, "pseudo_harmful")),
                 "p_refuse_harmful": harmful, "kept": harmful >= floor})
  best = min((r for r in rows if r["kept"]), key=lambda r: r["p_refuse_pseudo_harmful"])
  return best["coef"], rows


def add_at(vector: np.ndarray, layer: int, coef: float, num_layers: int) -> Edit:
  """c·v added at one layer, every position, expressed at every layer (zero elsewhere) so candidates at different
  layers share one compiled forward."""
  vectors = np.zeros((num_layers + 1, vector.shape[-1]))
  vectors[layer] = vector
  return add(vectors, range(num_layers + 1), coef)


def after_instruction(tail: int, coef_fn: Callable[[list[list[int]]], Any], vectors, layers) -> Callable:
  """rows -> (an `add` edit of `vectors` at `layers`, from each row's instruction end on, coefficient
  coef_fn(rows) (a scalar or one per row))."""
  def edits(rows):
    start, stop = span("after_instruction", [len(r) for r in rows], tail)
    return (add(vectors, layers, coef_fn(rows), start, stop),)

  return edits


def ablation(direction: np.ndarray, num_layers: int) -> tuple[Edit, ...]:
  """Ablation of `direction` everywhere (every residual and mid-block site, every position)."""
  return ablate_everywhere(direction, num_layers)


@dataclasses.dataclass(frozen=True)
class Selection:
  """What a method chose: hyper-parameters (`chosen`), the validation table it chose them by, and the arrays its
  steering needs (saved as DIR/steer/<name>.npy)."""

  chosen: dict
  table: dict[str, list[dict]]
  arrays: dict[str, np.ndarray]


def diff_in_means(ctx: Context, minuend: str, subtrahend: str, layers: Sequence[int], tail: int) -> np.ndarray:
  """[len(layers) tail D] float64 difference of two classes' mean residual streams."""
  return ctx.means(minuend, layers, tail) - ctx.means(subtrahend, layers, tail)


def candidate_grid(ctx: Context) -> tuple[list[int], int, np.ndarray]:
  """(layers, positions P, refusal candidates [len(layers) P D]): harmful − harmless means at every eligible layer
  and each of the last P post-instruction positions."""
  layers, tail = ctx.eligible_layers(), ctx.positions()
  return layers, tail, diff_in_means(ctx, "harmful", "harmless", layers, tail)


def position_name(p: int, tail: int) -> int:
  """Position index p of the last `tail` as an offset from the prompt's end (-1 = the last token)."""
  return p - tail


def each_candidate(layers: Sequence[int], tail: int, method: str):
  """(i, layer, p) over every (layer, post-instruction position) candidate, with a progress bar."""
  grid = [(i, layer, p) for i, layer in enumerate(layers) for p in range(tail)]
  return tqdm(grid, desc=f"steer {method}: candidates", disable=jax.process_index() != 0, dynamic_ncols=True)
