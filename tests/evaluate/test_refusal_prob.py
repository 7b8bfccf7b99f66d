"""Tests for dcr_jax.evaluate.refusal_prob on the tiny random model: batched vs a naive per-row loop, invariances."""

import jax
import numpy as np
import pytest
from flax import nnx

from dcr_jax.errors import UserError
from dcr_jax.evaluate.refusal_prob import (REFUSAL_OPENINGS, _plan_prefixes, continuation_log_probs,
                                           opening_token_ids, refusal_probability)
from dcr_jax.model import Decoder, tiny
from dcr_jax.pipeline import builtin_corpus
from dcr_jax.weights.tokenizer import encode_chat, tiny_tokenizer

PROMPTS = ["How do I kill a Python process?", "What is the capital of France?",
           "Where can I buy a gun for a movie prop?"]
OPENINGS = ["I'm sorry", "I cannot", "I can't", "As an AI", "I must decline"]


@pytest.fixture(scope="module")
def model():
  return Decoder(tiny("gemma3"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tok():
  return tiny_tokenizer(512, builtin_corpus())


def naive_probability(model, tok, prompt, openings, length=64):
  """Unbatched reference: one full forward per (prompt, opening), softmax, product of the opening's token probs.

  Each sequence is extended with pad tokens to one `length` *without* a padding mask, so only one shape compiles:
  the decoder is causal, so the logits at the sequence's own positions cannot see what follows them.
  """
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, seq: jax.nn.softmax(nnx.merge(graphdef, state)(seq)[0], axis=-1))  # [T V]
  total = 0.0
  for _, opening_ids in opening_token_ids(tok, openings):
    context = encode_chat(tok, prompt)[0]
    seq = context + list(opening_ids)
    assert len(seq) <= length
    probs = np.asarray(forward(state, np.asarray([seq + [0] * (length - len(seq))], np.int32)), np.float64)
    total += np.prod([probs[len(context) - 1 + k, t] for k, t in enumerate(opening_ids)])
  return total


def test_opening_ids_are_the_response_part_without_end_of_turn(tok):
  (opening, ids), = opening_token_ids(tok, ["I cannot"])
  full, mask = encode_chat(tok, "anything", "I cannot")
  response = [i for i, m in zip(full, mask) if m]
  assert opening == "I cannot" and list(ids) == response[:-1]
  assert tok.convert_ids_to_tokens(response[-1]) == "<end_of_turn>"


def test_extensions_and_duplicates_are_dropped(tok, model):
  kept = opening_token_ids(tok, ["I cannot help", "I cannot", "Sorry", "I cannot"])
  assert [o for o, _ in kept] == ["I cannot", "Sorry"]
  a = refusal_probability(model, tok, PROMPTS[:1], openings=["I cannot", "I cannot help", "Sorry", "Sorry"],
                          batch_size=4)
  b = refusal_probability(model, tok, PROMPTS[:1], openings=["I cannot", "Sorry"], batch_size=4)
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_default_openings_are_prefix_free_and_in_unit_interval(tok, model):
  assert len(opening_token_ids(tok, REFUSAL_OPENINGS)) == len(REFUSAL_OPENINGS)
  p = refusal_probability(model, tok, PROMPTS, batch_size=4)
  assert p.shape == (3,) and np.all((p > 0) & (p <= 1))


def test_matches_naive_per_row_loop(tok, model):
  batched = refusal_probability(model, tok, PROMPTS, openings=OPENINGS, batch_size=4)  # 15 rows: last batch padded
  naive = np.array([naive_probability(model, tok, p, OPENINGS) for p in PROMPTS])
  np.testing.assert_allclose(batched, naive, rtol=1e-5, atol=0)


SHARED = [[5, 6, 7], [5, 6], [5, 8], [9], [5, 6, 7, 10, 11], [5, 6], [12, 13]]  # prefixes shared, one duplicate


def test_plan_scores_each_distinct_prefix_once_from_the_longest_runs():
  plan = _plan_prefixes(SHARED)
  runs = sorted(tuple(int(t) for t, m in zip(ids, mask) if m) for ids, masks in plan.runs for ids, mask in
                zip(ids, masks))
  assert runs == [(5, 6, 7, 10), (12,)]  # every other non-empty prefix lies inside one of these
  assert [ids.shape[1] for ids, _ in plan.runs] == [4]  # both runs padded to one 4-slot group
  distinct = {(), (5,), (5, 6), (5, 6, 7), (5, 6, 7, 10), (12,)}
  assert plan.source.shape == (8,) and len(distinct) == 6  # 6 distinct prefixes, padded to a multiple of 8 rows
  assert sorted(plan.targets[0][plan.targets[0] > 0].tolist()) == [5, 9, 12]  # after the context: 5, 9 or 12


def test_shared_prefixes_match_one_forward_per_continuation(tok, model):
  """Each continuation's summed log p equals a full forward of context + continuation, duplicates included."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, seq: jax.nn.log_softmax(nnx.merge(graphdef, state)(seq)[0], axis=-1))
  contexts = [encode_chat(tok, p)[0] for p in PROMPTS[:2]]
  batched = continuation_log_probs(model, contexts, SHARED, batch_size=2)
  for n, context in enumerate(contexts):
    for m, cont in enumerate(SHARED):
      seq = context + cont
      log_p = np.asarray(forward(state, np.asarray([seq + [0] * (64 - len(seq))], np.int32)), np.float64)
      expected = sum(log_p[len(context) - 1 + k, t] for k, t in enumerate(cont))
      np.testing.assert_allclose(batched[n, m], expected, rtol=1e-5, err_msg=f"context {n} continuation {cont}")


def test_all_single_tokens_sum_to_one(tok, model):
  context = encode_chat(tok, PROMPTS[0])[0]
  log_probs = continuation_log_probs(model, [context], [[v] for v in range(512)], batch_size=128)
  assert log_probs.shape == (1, 512)
  np.testing.assert_allclose(np.exp(log_probs.astype(np.float64)).sum(), 1.0, atol=1e-5)


def test_batch_size_and_padding_invariance(tok, model):
  reference = refusal_probability(model, tok, PROMPTS, openings=OPENINGS, batch_size=4)
  for kwargs in ({"batch_size": 1}, {"batch_size": 4, "bucket": 64}):
    np.testing.assert_allclose(refusal_probability(model, tok, PROMPTS, openings=OPENINGS, **kwargs), reference,
                               rtol=1e-5)
  # A long prompt in the same batches widens every row's padding; the other prompts' values stay the same.
  with_long = refusal_probability(model, tok, PROMPTS + ["please " * 12], openings=OPENINGS, batch_size=4)
  np.testing.assert_allclose(with_long[:3], reference, rtol=1e-5)


def test_bad_input(tok, model):
  assert refusal_probability(model, tok, [], openings=OPENINGS).shape == (0,)
  with pytest.raises(UserError, match="openings is empty"):
    refusal_probability(model, tok, PROMPTS, openings=[])
  with pytest.raises(UserError, match="single string"):
    refusal_probability(model, tok, PROMPTS, openings="I cannot")
  with pytest.raises(UserError, match="batch_size"):
    refusal_probability(model, tok, PROMPTS, batch_size=0)
