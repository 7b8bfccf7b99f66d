"""The evaluate stage: rows per prompt, resumption without redoing prompts, a torn last line, metrics."""

import json
import types

import ml_collections
import pytest
from flax import nnx

from dcr_jax.config import base_config
from dcr_jax.evaluate import stage
from dcr_jax.evaluate.refusal import KeywordJudge
from dcr_jax.model import Decoder, tiny
from dcr_jax.pipeline import builtin_corpus
from dcr_jax.weights.tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def ctx_factory():
  model = Decoder(tiny("gemma3"), rngs=nnx.Rngs(0))
  tokenizer = tiny_tokenizer(512, builtin_corpus())

  def make(workdir):
    config = base_config()
    config.evaluate.batch_size = 4
    config.evaluate.max_new_tokens = 6
    config.evaluate.suites = "demo-over-refusal,demo-harmful"
    config.evaluate.n = 6
    return types.SimpleNamespace(config=config, workdir=workdir, model=model, tokenizer=tokenizer)

  return make


def test_rows_and_metrics(ctx_factory, tmp_path):
  ctx = ctx_factory(tmp_path)
  prepared = stage.prepare_evaluate(ctx.config, ctx.tokenizer, ctx.model.config)
  summary = stage.run_evaluate(ctx, prepared)
  rows = [json.loads(l) for l in (tmp_path / "eval" / "demo-harmful.jsonl").read_text().splitlines()]
  assert len(rows) == 6
  assert set(rows[0]) == {"prompt", "label", "category", "generation", "refused", "refusal_prob"}
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["eval"]["demo-harmful"]["n"] == 6 and report["eval"]["demo-harmful"]["kind"] == "harmful"
  expected = sum(r["refused"] for r in rows) / 6
  assert report["eval"]["demo-harmful"]["refusal_rate"] == pytest.approx(expected)
  assert summary["safety"] == pytest.approx(expected)


def test_resume_skips_done_prompts_and_drops_a_torn_line(ctx_factory, tmp_path, monkeypatch):
  ctx = ctx_factory(tmp_path)
  records = stage.load_suite("demo-harmful", n=6, seed=0)
  first = stage.evaluate_suite(ctx, "demo-harmful", records[:4], KeywordJudge(), show_progress=False)
  path = tmp_path / "eval" / "demo-harmful.jsonl"
  with path.open("a") as f:
    f.write('{"prompt": "torn')  # a crash in the middle of a write
  calls = []
  real = stage.generate
  monkeypatch.setattr(stage, "generate", lambda model, prompts, **kw: calls.append(len(prompts)) or
                      real(model, prompts, **kw))
  rows = stage.evaluate_suite(ctx, "demo-harmful", records, KeywordJudge(), show_progress=False)
  assert [r["prompt"] for r in rows[:4]] == [r["prompt"] for r in first]
  assert sorted(r["prompt"] for r in rows) == sorted(r["prompt"] for r in records)
  assert calls == [4]  # one batch for the two missing prompts (padded to the batch size)
  assert len(path.read_text().splitlines()) == 6


def test_unknown_suite_lists_known_ones(ctx_factory, tmp_path):
  ctx = ctx_factory(tmp_path)
  ctx.config.evaluate.suites = "xstest,nope"
  with pytest.raises(Exception) as e:
    stage.prepare_evaluate(ctx.config, ctx.tokenizer, ctx.model.config)
  assert "nope" in str(e.value) and "advbench" in str(e.value) and "\n" not in str(e.value)


def test_per_suite_prompt_counts(ctx_factory, tmp_path):
  ctx = ctx_factory(tmp_path)
  ctx.config.evaluate.suites = "demo-over-refusal:3,demo-harmful"
  assert stage.suite_sizes(ctx.config) == {"demo-over-refusal": 3, "demo-harmful": 6}
  prepared = stage.prepare_evaluate(ctx.config, ctx.tokenizer, ctx.model.config)
  assert {name: len(records) for name, records in prepared["suites"].items()} == {"demo-over-refusal": 3,
                                                                                   "demo-harmful": 6}
  ctx.config.evaluate.n = 0
  assert stage.suite_sizes(ctx.config)["demo-harmful"] is None  # 0 = all
  ctx.config.evaluate.suites = "demo-harmful:ten"
  with pytest.raises(Exception, match=r"'demo-harmful:ten'; write NAME or NAME:N"):
    stage.prepare_evaluate(ctx.config, ctx.tokenizer, ctx.model.config)
