"""Batches: balanced classes in the configured ratio, determinism per (seed, step), packing layout, response masks."""

import numpy as np
import pytest

from dcr_jax.data.batching import (BalancedSampler, SFTMixture, SFTSet, load_refusals, load_spec_list,
                                   tokenize_pairs, tokenize_prompts, with_refusals)
from dcr_jax.errors import UserError
from dcr_jax.pipeline import builtin_corpus
from dcr_jax.weights.tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
  return tiny_tokenizer(512, builtin_corpus())


def test_builtin_sets_meet_the_minimum_sizes():
  assert len(load_spec_list("builtin:toxic")) >= 100
  seemingly = load_spec_list("builtin:seemingly_toxic")
  assert len(seemingly) >= 100 and len({r["category"] for r in seemingly}) >= 7
  benign = load_spec_list("builtin:benign")
  assert len(benign) >= 200 and all(r["response"] for r in benign)
  assert len(load_refusals("builtin:refusals")) >= 30


def test_unknown_builtin_names_the_key():
  with pytest.raises(UserError, match="config.data.toxic: unknown built-in set"):
    load_spec_list("builtin:nope", key="data.toxic")


def test_balanced_sampler_ratio_and_determinism():
  labels = np.array([0] * 30 + [1] * 70)
  sampler = BalancedSampler(labels, batch_size=12, ratio=[1, 2], seed=3)
  for step in range(5):
    idx = sampler.indices(step)
    assert np.sum(labels[idx] == 0) == 4 and np.sum(labels[idx] == 1) == 8
    assert len(set(idx.tolist())) == 12
    np.testing.assert_array_equal(idx, BalancedSampler(labels, 12, [1, 2], seed=3).indices(step))
  assert not np.array_equal(sampler.indices(0), sampler.indices(1))
  assert not np.array_equal(sampler.indices(0), BalancedSampler(labels, 12, [1, 2], seed=4).indices(0))


def test_prompt_tokens_end_where_the_model_answers(tokenizer):
  records = load_spec_list("builtin:toxic")[:3]
  prompts = tokenize_prompts(tokenizer, records, max_len=48)
  batch = prompts.take(np.arange(3))
  for row, n in zip(batch["tokens"], prompts.lengths):
    assert tokenizer.decode(row[:n]).endswith("<start_of_turn>model\n")
  assert batch["mask"].sum() == prompts.lengths.sum()


def test_response_mask_covers_the_answer_only(tokenizer):
  pairs = tokenize_pairs(tokenizer, [{"prompt": "Say hi.", "response": "Hi there!"}], max_len=64)
  ids, mask = np.array(pairs.ids[0]), np.array(pairs.response_mask[0])
  assert tokenizer.decode(ids[mask == 1]) == "Hi there!<end_of_turn>"


def test_harmful_prompts_get_refusals():
  records = with_refusals([{"prompt": "a", "label": "toxic"}, {"prompt": "b", "label": "toxic", "response": "No."}],
                          ["I can't help with that."])
  assert [r["response"] for r in records] == ["I can't help with that.", "No."]


def test_mixture_packs_segments_with_fresh_positions_and_is_deterministic():
  ids = [list(range(1, 1 + n)) for n in (5, 7, 9, 6)]
  masks = [[0] * (len(i) - 2) + [1, 1] for i in ids]
  mix = SFTMixture({"a": SFTSet(ids, masks)}, {"a": 1.0}, batch_size=3, max_len=24, seed=0)
  batch = mix.batch(7)
  for key, value in batch.items():
    np.testing.assert_array_equal(value, SFTMixture({"a": SFTSet(ids, masks)}, {"a": 1.0}, 3, 24, 0).batch(7)[key])
  for row in range(3):
    for seg in range(1, batch["segments"][row].max() + 1):
      sel = batch["segments"][row] == seg
      np.testing.assert_array_equal(batch["positions"][row][sel], np.arange(sel.sum()))
      np.testing.assert_array_equal(batch["targets"][row][sel][:-1], batch["tokens"][row][sel][1:])
  assert batch["segments"].max() >= 2
  assert (batch["loss_mask"][batch["segments"] == 0] == 0).all()


def test_mixture_follows_weights():
  a = SFTSet([[1, 2, 3]] * 5, [[0, 1, 1]] * 5)
  b = SFTSet([[4, 5, 6]] * 5, [[0, 1, 1]] * 5)
  mix = SFTMixture({"a": a, "b": b}, {"a": 0.8, "b": 0.2}, batch_size=4, max_len=3, seed=0, pack=False)
  firsts = np.concatenate([mix.batch(s)["tokens"][:, 0] for s in range(200)])
  assert 0.75 < np.mean(firsts == 1) < 0.85


def _write_csv(path, rows):
  path.write_text("id,prompt,type,label,focus,note\n" + "".join(
      f"{i},prompt {i},{kind},{label},x,\n" for i, (kind, label) in enumerate(rows)), encoding="utf-8")
  return str(path)


def test_selectors_pick_disjoint_rows_in_file_order(tmp_path):
  spec = _write_csv(tmp_path / "x.csv", [("homonyms", "safe"), ("contrast_homonyms", "unsafe")] * 5)
  safe = load_spec_list(spec + "#seemingly_toxic")
  assert [r["prompt"] for r in safe] == [f"prompt {i}" for i in range(0, 10, 2)]
  assert {r["label"] for r in load_spec_list(spec + "#toxic")} == {"toxic"}
  first, rest = load_spec_list(spec + "#seemingly_toxic@0:2"), load_spec_list(spec + "#seemingly_toxic@2:")
  assert [r["prompt"] for r in first + rest] == [r["prompt"] for r in safe]
  even, odd = load_spec_list(spec + "@0::2"), load_spec_list(spec + "@1::2")
  assert {r["prompt"] for r in even} | {r["prompt"] for r in odd} == {f"prompt {i}" for i in range(10)}
  assert not {r["prompt"] for r in even} & {r["prompt"] for r in odd}
  relabelled = load_spec_list(spec + "#seemingly_toxic@1:3", label="benign")
  assert [(r["prompt"], r["label"]) for r in relabelled] == [("prompt 2", "benign"), ("prompt 4", "benign")]


def test_selector_errors_name_the_spec(tmp_path):
  spec = _write_csv(tmp_path / "x.csv", [("homonyms", "safe")] * 3)
  with pytest.raises(UserError, match=r"x.csv@5:2: empty row selection"):
    load_spec_list(spec + "@5:2")
  with pytest.raises(UserError, match=r"config.data.toxic: .*#toxic selects no records"):
    load_spec_list(spec + "#toxic", key="data.toxic")
  with pytest.raises(UserError, match=r"config.data.toxic: .*@7: selects no records"):
    load_spec_list(spec + "@7:", key="data.toxic")
  advbench = tmp_path / "adv.csv"
  advbench.write_text("goal,target\nDo harm,Sure\n", encoding="utf-8")
  with pytest.raises(UserError, match=r"#toxic needs a file that labels its rows"):
    load_spec_list(f"{advbench}#toxic", key="data.toxic")
