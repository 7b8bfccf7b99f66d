"""`refusal_direction` (Arditi et al. 2024, "Refusal in language models is mediated by a single direction").

Candidates r(ℓ, p): harmful − harmless mean residual stream after ℓ blocks at post-instruction position p (float64),
for every layer below the last 20% and every template position after the user's message. On the validation split,
per candidate: the refusal score under ablation of r̂ everywhere on harmful prompts (`bypass`, lower = r mediates
refusal), the KL of harmless next-token distributions under that ablation (`kl`), and the refusal score when r is
added at ℓ on harmless prompts (`induce`). Candidates with kl > config.steer.max_kl (default 0.1) or induce < 0 are
filtered out; the lowest bypass wins (if none survives, the lowest bypass overall, marked `filtered: false`).
Refusal score = mean log p(R) − log(1 − p(R)), R the refusal openings' first tokens.

For over-refusal the chosen r is added with a negative coefficient c at ℓ, at every position: c from
config.steer.coefs (default −0.25, −0.5, −1: fractions of the mean difference) by `choose_coefficient` (the one
that most lowers pseudo-harmful validation p(R) while harmful p(R) keeps config.steer.keep_harmful of its value).
"""

from __future__ import annotations

import numpy as np

from dcr_jax.evaluate.generate import Steering
from dcr_jax.steer.context import Context, Selection, ablation, add_at, candidate_grid, choose_coefficient, \
    each_candidate, position_name

DEFAULT_COEFS = (-0.25, -0.5, -1.0)
DEFAULT_MAX_KL = 0.1


def select(ctx: Context) -> Selection:
  """The refusal direction and the steering coefficient, chosen on validation."""
  layers, tail, candidates = candidate_grid(ctx)
  max_kl = ctx.settings.max_kl or DEFAULT_MAX_KL
  table = []
  for i, layer, p in each_candidate(layers, tail, "refusal_direction"):
    r = candidates[i, p]
    ablated = ablation(r, ctx.num_layers)
    table.append({"layer": layer, "position": position_name(p, tail), "bypass": ctx.score("harmful", ablated),
                  "kl": ctx.kl("harmless", ablated),
                  "induce": ctx.score("harmless", (add_at(r, layer, 1.0, ctx.num_layers),))})
  kept = [row for row in table if row["kl"] <= max_kl and row["induce"] >= 0]
  best = min(kept or table, key=lambda row: row["bypass"])
  direction = candidates[layers.index(best["layer"]), best["position"] + tail]
  coef, coef_table = choose_coefficient(ctx, ctx.settings.coefs or DEFAULT_COEFS, lambda c, cls: {
      "edits": (add_at(direction, best["layer"], c, ctx.num_layers),)})
  chosen = {"layer": best["layer"], "position": best["position"], "coef": coef, "filtered": bool(kept),
            "max_kl": max_kl, "direction_norm": float(np.linalg.norm(direction))}
  return Selection(chosen, {"candidates": table, "coefficients": coef_table}, {"direction": direction})


def steering(chosen: dict, arrays: dict, model, tokenizer) -> Steering:
  """c·r added at the chosen layer, every position (prompt and generated tokens); nothing when no c was chosen."""
  label = f"refusal_direction:l{chosen['layer']}:c{chosen['coef']}"
  if chosen["coef"] is None:
    return Steering(label=label)
  edits = (add_at(arrays["direction"], chosen["layer"], chosen["coef"], model.config.num_layers),)
  return Steering(label=label, edits=lambda prompts, ids: edits)
