"""`scans` (Cao et al., AAAI 2025, "SCANS: mitigating the exaggerated safety for LLMs via safety-conscious
activation steering").

- Refusal vectors v_ℓ = harmful − harmless mean residual stream at the last prompt token, at the middle layers
  (L/4 < ℓ ≤ 3L/4, or config.steer.layers).
- Classification. A query's hidden-state transition toward an affirmative opening is
  Δ_ℓ(x) = h_ℓ(x + a) − h_ℓ(x) at the last token, a = config.steer.affirmative as the answer's first tokens. The
  anchors' transition is T_ℓ = mean Δ_ℓ(harmful) − mean Δ_ℓ(harmless) over the estimation prompts, centred at
  m_ℓ, the midpoint of the two means; a query's score is the mean over the upper layers (ℓ > L/2) of
  cos(Δ_ℓ(x) − m_ℓ, T_ℓ), and it is judged harmful when the score exceeds τ.
- Steering: +α·v_ℓ for queries judged harmful, −α·v_ℓ for the others, at the middle layers, from the instruction
  end on (generated tokens included): per-row coefficients, one forward.
- τ maximises balanced accuracy on the validation split (harmful vs harmless + pseudo-harmful); α is chosen from
  config.steer.coefs (default 0.25, 0.5, 1) by `choose_coefficient`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dcr_jax.evaluate.generate import Steering
from dcr_jax.steer import activations as act
from dcr_jax.steer.context import Context, Selection, after_instruction, choose_coefficient, diff_in_means
from dcr_jax.weights.tokenizer import response_ids

DEFAULT_ALPHAS = (0.25, 0.5, 1.0)


class Classifier:
  """score(ids) = mean cosine over the upper layers between the prompt's transition and the anchors' (see module);
  harmful when above `tau`. Scores are memoised per prompt."""

  def __init__(self, model, affirmative: Sequence[int], upper: Sequence[int], centre: np.ndarray,
               anchor: np.ndarray, tau: float, **kw):
    self.model, self.affirmative, self.upper = model, list(affirmative), list(upper)
    self.centre, self.anchor, self.tau = centre, anchor, tau
    self.kw, self._memo = kw, {}  # batch_size, pad_id and optionally length, as `tail_states` takes them

  def transitions(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
    """[N U D] float64 Δ_ℓ at the upper layers."""
    after = act.tail_states(self.model, [list(x) + self.affirmative for x in ids], self.upper, 1, **self.kw)
    return (after - act.tail_states(self.model, ids, self.upper, 1, **self.kw))[:, :, 0]

  def scores(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
    """[N] mean cosine to the anchors' transition."""
    todo = [x for x in dict.fromkeys(tuple(x) for x in ids) if x not in self._memo]
    if todo:
      delta = self.transitions(todo) - self.centre
      cos = np.sum(delta * self.anchor, -1) / (np.linalg.norm(delta, axis=-1) * np.linalg.norm(self.anchor, axis=-1))
      self._memo.update(zip(todo, cos.mean(axis=1)))
    return np.array([self._memo[tuple(x)] for x in ids])

  def signs(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
    """[B] +1 for rows judged harmful, −1 for the others."""
    return np.where(self.scores(ids) > self.tau, 1.0, -1.0)


def layer_sets(num_layers: int, chosen: Sequence[int] = ()) -> tuple[list[int], list[int]]:
  """(middle layers that are steered, upper layers that classify)."""
  middle = list(chosen) or [l for l in range(1, num_layers + 1) if num_layers / 4 < l <= 3 * num_layers / 4]
  return middle or [1], [l for l in range(1, num_layers + 1) if l > num_layers / 2]


def best_threshold(positive: np.ndarray, negative: np.ndarray) -> tuple[float, float]:
  """(τ, balanced accuracy): the midpoint between sorted scores that best separates positive (above) from
  negative."""
  values = np.unique(np.concatenate([positive, negative]))
  cuts = np.concatenate([[values[0] - 1], (values[1:] + values[:-1]) / 2, [values[-1] + 1]])
  accuracy = [(np.mean(positive > t) + np.mean(negative <= t)) / 2 for t in cuts]
  i = int(np.argmax(accuracy))
  return float(cuts[i]), float(accuracy[i])


def _classifier(ctx: Context, middle, upper, tau=0.0) -> tuple[Classifier, np.ndarray]:
  affirmative = response_ids(ctx.tokenizer, ctx.settings.affirmative)
  probe = Classifier(ctx.model, affirmative, upper, 0.0, 0.0, tau, **ctx.kw)
  harmful, harmless = probe.transitions(ctx.train["harmful"]).mean(0), probe.transitions(ctx.train["harmless"]).mean(0)
  probe.centre, probe.anchor = (harmful + harmless) / 2, harmful - harmless
  return probe, diff_in_means(ctx, "harmful", "harmless", middle, 1)[:, 0]


def select(ctx: Context) -> Selection:
  """τ and α chosen on validation."""
  middle, upper = layer_sets(ctx.num_layers, ctx.settings.layers)
  classifier, vectors = _classifier(ctx, middle, upper)
  scores = {c: classifier.scores(ctx.val[c]) for c in ctx.val}
  tau, accuracy = best_threshold(scores["harmful"], np.concatenate([scores["harmless"], scores["pseudo_harmful"]]))
  classifier.tau = tau
  alpha, table = choose_coefficient(ctx, ctx.settings.coefs or DEFAULT_ALPHAS, lambda a, cls: {
      "edits": after_instruction(ctx.tail, lambda rows: a * classifier.signs(rows), vectors, middle)})
  chosen = {"tau": tau, "alpha": alpha, "balanced_accuracy": accuracy, "middle_layers": middle,
            "upper_layers": upper, "tail": ctx.tail, "affirmative": ctx.settings.affirmative,
            "judged_harmful": {c: float(np.mean(s > tau)) for c, s in scores.items()}}
  arrays = {"vectors": vectors, "centre": classifier.centre, "anchor": classifier.anchor}
  return Selection(chosen, {"alphas": table}, arrays)


def steering(chosen: dict, arrays: dict, model, tokenizer) -> Steering:
  """±α·v_ℓ per row by the classifier, at the middle layers from the instruction end on."""
  label = f"scans:t{chosen['tau']:.4g}:a{chosen['alpha']}"
  if chosen["alpha"] is None:
    return Steering(label=label)
  classifier = Classifier(model, response_ids(tokenizer, chosen["affirmative"]), chosen["upper_layers"],
                          arrays["centre"], arrays["anchor"], chosen["tau"], batch_size=16,
                          pad_id=tokenizer.pad_token_id or 0)
  edits = after_instruction(chosen["tail"], lambda rows: chosen["alpha"] * classifier.signs(rows),
                            arrays["vectors"], chosen["middle_layers"])
  return Steering(label=label, edits=lambda prompts, ids: edits(ids))
