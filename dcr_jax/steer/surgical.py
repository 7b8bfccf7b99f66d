"""`surgical` (Wang et al., ICLR 2025, "Surgical, cheap, and flexible: mitigating false refusal in language models
via single vector ablation").

Candidates at every layer below the last 20% and every post-instruction position: the false-refusal vector
v = pseudo-harmful − harmless mean residual stream, orthogonalised against the refusal direction r = harmful −
harmless at the same place with strength λ = config.steer.strength (v' = v − λ (v·r̂) r̂; 1 = fully). v' is ablated
everywhere (every layer, mid-block and position: the weight form `orthogonalize` computes the same, so
`export.ablate_direction` can bake it into the weights). Selection on validation: among candidates whose harmless KL
is ≤ config.steer.max_kl (default 0.2), the lowest pseudo-harmful refusal score (if none passes, the lowest KL,
marked `filtered: false`). Optionally c·r is added at the chosen layer (config.steer.add_coef, default 0) to keep
refusing harmful prompts.
"""

from __future__ import annotations

import numpy as np

from dcr_jax.evaluate.generate import Steering
from dcr_jax.steer.activations import unit
from dcr_jax.steer.context import Context, Selection, ablation, add_at, diff_in_means, each_candidate, position_name

DEFAULT_MAX_KL = 0.2


def _edits(false_refusal, refusal, layer: int, add_coef: float, num_layers: int) -> tuple:
  edits = ablation(false_refusal, num_layers)
  return edits + ((add_at(refusal, layer, add_coef, num_layers),) if add_coef else ())


def select(ctx: Context) -> Selection:
  """The false-refusal vector to ablate, chosen on validation."""
  layers, tail = ctx.eligible_layers(), ctx.positions()
  refusal = diff_in_means(ctx, "harmful", "harmless", layers, tail)
  false_refusal = diff_in_means(ctx, "pseudo_harmful", "harmless", layers, tail)
  r_hat = unit(refusal)
  ortho = false_refusal - ctx.settings.strength * np.sum(false_refusal * r_hat, -1, keepdims=True) * r_hat
  max_kl, add_coef = ctx.settings.max_kl or DEFAULT_MAX_KL, ctx.settings.add_coef
  table = []
  for i, layer, p in each_candidate(layers, tail, "surgical"):
    edits = _edits(ortho[i, p], refusal[i, p], layer, add_coef, ctx.num_layers)
    table.append({"layer": layer, "position": position_name(p, tail), "kl": ctx.kl("harmless", edits),
                  "score_pseudo_harmful": ctx.score("pseudo_harmful", edits),
                  "score_harmful": ctx.score("harmful", edits)})
  kept = [row for row in table if row["kl"] <= max_kl]
  best = min(kept, key=lambda row: row["score_pseudo_harmful"]) if kept else min(table, key=lambda row: row["kl"])
  i, p = layers.index(best["layer"]), best["position"] + tail
  chosen = {"layer": best["layer"], "position": best["position"], "strength": ctx.settings.strength,
            "add_coef": add_coef, "filtered": bool(kept), "max_kl": max_kl,
            "unsteered_score_pseudo_harmful": ctx.score("pseudo_harmful"),
            "unsteered_score_harmful": ctx.score("harmful")}
  return Selection(chosen, {"candidates": table}, {"false_refusal": unit(ortho[i, p]), "refusal": refusal[i, p]})


def steering(chosen: dict, arrays: dict, model, tokenizer) -> Steering:
  """v' ablated everywhere (and c·r added at the chosen layer when add_coef ≠ 0)."""
  edits = _edits(arrays["false_refusal"], arrays["refusal"], chosen["layer"], chosen["add_coef"],
                 model.config.num_layers)
  return Steering(label=f"surgical:l{chosen['layer']}p{chosen['position']}:s{chosen['strength']}:"
                        f"c{chosen['add_coef']}", edits=lambda prompts, ids: edits)
