"""`self_cd` (Shi et al. 2024, "Navigating the OverKill in large language models", Self-Contrastive Decoding).

Each prompt is run twice, as it is and with a safety system prompt (config.steer.system_prompt, placed before the
user's message in the same turn), both rows in one batched forward with their own KV caches; every next token is
chosen from ℓ_sys − α(ℓ_sys − ℓ_nosys), which removes what the safety emphasis adds. α is chosen on validation from
config.steer.coefs (default 0, 0.5, 1.5, 2.5) by `choose_coefficient`, on the contrastive first-token refusal
probability.
"""

from __future__ import annotations

from typing import Sequence

from dcr_jax.evaluate.generate import Steering
from dcr_jax.steer.activations import encode
from dcr_jax.steer.context import Context, Selection, choose_coefficient

DEFAULT_ALPHAS = (0.0, 0.5, 1.5, 2.5)


def with_system(system_prompt: str, prompts: Sequence[str]) -> list[str]:
  """The prompts with the safety system prompt before them, in the same user turn."""
  return [f"{system_prompt}\n\n{p}" for p in prompts]


def select(ctx: Context) -> Selection:
  """α chosen on validation."""
  system = ctx.settings.system_prompt
  contrast = {c: encode(ctx.tokenizer, with_system(system, ctx.data.val[c])) for c in ctx.data.val}
  alpha, table = choose_coefficient(ctx, ctx.settings.coefs or DEFAULT_ALPHAS,
                                    lambda a, cls: {"contrast": contrast[cls], "alpha": a})
  return Selection({"alpha": alpha, "system_prompt": system}, {"alphas": table}, {})


def steering(chosen: dict, arrays: dict, model, tokenizer) -> Steering:
  """Contrastive decoding against the system-prompted rows with the chosen α (nothing when none was chosen)."""
  label = f"self_cd:a{chosen['alpha']}"
  if chosen["alpha"] is None:
    return Steering(label=label)
  return Steering(label=label, contrast=lambda prompts: encode(tokenizer, with_system(chosen["system_prompt"],
                                                                                      prompts)),
                  alpha=float(chosen["alpha"]))
