"""The evaluate stage: rows per prompt, resumption without redoing prompts, a torn last line, metrics; the validation
callback training logs at each save."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from dcr_jax.config import base_config
from dcr_jax.spec import resolve
from dcr_jax.evaluate import stage
from dcr_jax.evaluate.refusal import KeywordJudge
from dcr_jax.evaluate.suites import load_suite
from dcr_jax.evaluate.refusal_prob import refusal_probability
from dcr_jax.model import Decoder, tiny
from dcr_jax.pipeline import builtin_corpus
from dcr_jax.weights.tokenizer import tiny_tokenizer
from conftest import SHARED_DATA


@pytest.fixture(scope="module")
def setup():
  model = Decoder(tiny("gemma3"), rngs=nnx.Rngs(0))
  tokenizer = tiny_tokenizer(512, builtin_corpus())

  def spec(**evaluate):
    config = base_config()
    config.model.name, config.model.random_init = "tiny-gemma3", True
    config.evaluate.batch_size = 4
    config.evaluate.max_new_tokens = 6
    config.evaluate.suites = "demo-over-refusal,demo-harmful"
    config.evaluate.n = 6
    config.evaluate.update(evaluate)
    return resolve(config)

  return model, tokenizer, spec


def test_rows_and_metrics(setup, tmp_path):
  model, tokenizer, spec = setup
  summary = stage.run(spec(), stage.load_data(spec()), model, tokenizer, tmp_path)
  rows = [json.loads(l) for l in (tmp_path / "eval" / "demo-harmful.jsonl").read_text().splitlines()]
  assert len(rows) == 6
  assert set(rows[0]) == {"prompt", "label", "category", "generation", "refused", "refusal_prob"}
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["eval"]["demo-harmful"]["n"] == 6 and report["eval"]["demo-harmful"]["kind"] == "harmful"
  expected = sum(r["refused"] for r in rows) / 6
  assert report["eval"]["demo-harmful"]["refusal_rate"] == pytest.approx(expected)
  assert summary["safety"] == pytest.approx(expected)


def test_resume_skips_done_prompts_and_drops_a_torn_line(setup, tmp_path, monkeypatch):
  model, tokenizer, spec = setup
  records = stage.load_suite("demo-harmful", n=6, seed=0)
  first = stage.evaluate_suite(spec(), model, tokenizer, tmp_path, "demo-harmful", records[:4], KeywordJudge(),
                               show_progress=False)
  path = tmp_path / "eval" / "demo-harmful.jsonl"
  with path.open("a") as f:
    f.write('{"prompt": "torn')  # a crash in the middle of a write
  calls = []
  real = stage.generate
  monkeypatch.setattr(stage, "generate", lambda model, prompts, **kw: calls.append(len(prompts)) or
                      real(model, prompts, **kw))
  rows = stage.evaluate_suite(spec(), model, tokenizer, tmp_path, "demo-harmful", records, KeywordJudge(),
                              show_progress=False)
  assert [r["prompt"] for r in rows[:4]] == [r["prompt"] for r in first]
  assert sorted(r["prompt"] for r in rows) == sorted(r["prompt"] for r in records)
  assert calls == [4]  # one batch for the two missing prompts (padded to the batch size)
  assert len(path.read_text().splitlines()) == 6


def test_unknown_suite_lists_known_ones(setup):
  _, _, spec = setup
  with pytest.raises(Exception) as e:
    spec(suites="xstest,nope")
  assert "nope" in str(e.value) and "advbench" in str(e.value) and "\n" not in str(e.value)


def test_per_suite_prompt_counts(setup):
  _, _, spec = setup
  counted = spec(suites="demo-over-refusal:3,demo-harmful")
  assert counted.evaluate.suites == (("demo-over-refusal", 3, None), ("demo-harmful", 6, None))
  assert {name: len(records) for name, records in stage.load_data(counted).suites.items()} == {
      "demo-over-refusal": 3, "demo-harmful": 6}
  assert spec(n=0).evaluate.suites[1] == ("demo-harmful", None, None)  # 0 = all
  with pytest.raises(Exception, match=r"'demo-harmful:ten' is not NAME\[:N\]\[@START:STOP\[:STEP\]\]"):
    spec(suites="demo-harmful:ten")


def test_suite_rows_narrow_before_the_subsample(setup):
  _, _, spec = setup
  rows = spec(suites="demo-harmful:0@10:40:3,demo-over-refusal:4@1::2")
  assert rows.evaluate.suites == (("demo-harmful", None, slice(10, 40, 3)), ("demo-over-refusal", 4, slice(1, None, 2)))
  loaded = stage.load_data(rows).suites
  every_harmful = load_suite("demo-harmful")
  assert [r["prompt"] for r in loaded["demo-harmful"]] == [r["prompt"] for r in every_harmful[10:40:3]]
  odd = {r["prompt"] for r in load_suite("demo-over-refusal")[1::2]}
  assert len(loaded["demo-over-refusal"]) == 4 and {r["prompt"] for r in loaded["demo-over-refusal"]} <= odd
  assert stage.row_settings(rows, "demo-harmful")["rows"] == [10, 40, 3]
  assert "rows" not in stage.row_settings(spec(suites="demo-harmful"), "demo-harmful")  # old rows keep their key
  for bad, says in (("demo-harmful@5:2", "empty row selection"), ("demo-harmful,demo-harmful:3", "twice"),
                    ("demo-harmful#toxic", "is not NAME")):
    with pytest.raises(Exception, match=says):
      spec(suites=bad)


def test_validation_is_the_refusal_probability_of_the_saved_model(setup):
  model, tokenizer, _ = setup
  config = base_config()
  config.data.val_toxic, config.data.val_seemingly_toxic = "builtin:toxic@0:3", "builtin:seemingly_toxic@::40"
  groups = stage.load_validation(resolve(config))
  assert [len(groups[g]) for g in ("toxic", "seemingly_toxic")] == [3, 4]
  validate = stage.validator(groups, tokenizer)
  graphdef, state = nnx.split(model)
  moved = nnx.merge(graphdef, jax.tree.map(lambda x: x * 1.5, state))
  got = validate(moved)
  for group, prompts in groups.items():
    after = float(np.mean(refusal_probability(moved, tokenizer, prompts)))
    before = float(np.mean(refusal_probability(model, tokenizer, prompts)))
    assert got[f"val_refusal_prob_{group}"] == pytest.approx(after, rel=1e-5)
    assert got[f"val_refusal_prob_{group}"] != pytest.approx(before, rel=1e-3)


def test_no_validation_sets_means_no_validation():
  assert stage.load_validation(resolve(base_config())) == {}
  assert stage.validator({}, None) is None


@pytest.mark.parametrize("change", [{"max_new_tokens": 4}, {"temperature": 0.7}, {"n": 5}, {"seed": 3},
                                    {"decode_weights": "bfloat16"}])
def test_a_changed_setting_starts_the_suite_afresh_and_keeps_the_earlier_rows(setup, tmp_path, change):
  model, tokenizer, spec = setup
  first_spec = spec()
  records = stage.load_suite("demo-harmful", n=6, seed=0)
  stage.evaluate_suite(first_spec, model, tokenizer, tmp_path, "demo-harmful", records, KeywordJudge(),
                       show_progress=False)
  path = tmp_path / "eval" / "demo-harmful.jsonl"
  earlier = path.read_text()
  changed_spec = spec(**{k: v for k, v in change.items() if k != "seed"})
  if "seed" in change:
    changed_spec = dataclasses.replace(changed_spec, seed=change["seed"])
  rows = stage.evaluate_suite(changed_spec, model, tokenizer, tmp_path, "demo-harmful", records, KeywordJudge(),
                              show_progress=False)
  kept = [p for p in (tmp_path / "eval").iterdir() if p.name.startswith("demo-harmful.") and p.name != path.name
          and p.suffix == ".jsonl"]
  assert len(kept) == 1 and kept[0].read_text() == earlier  # the earlier results, intact, beside the new file
  assert json.loads(kept[0].with_suffix(".settings.json").read_text()) == stage.row_settings(first_spec,
                                                                                              "demo-harmful")
  assert json.loads((tmp_path / "eval" / "demo-harmful.settings.json").read_text()) == stage.row_settings(
      changed_spec, "demo-harmful")
  assert len(rows) == 6 and len(path.read_text().splitlines()) == 6  # only rows of the current settings
  if "max_new_tokens" in change:
    assert rows != [json.loads(line) for line in earlier.splitlines()]
  again = stage.evaluate_suite(changed_spec, model, tokenizer, tmp_path, "demo-harmful", records, KeywordJudge(),
                               show_progress=False)
  assert again == rows and len(list((tmp_path / "eval").glob("demo-harmful.*.jsonl"))) == 1  # same settings: resumed


def test_sampled_rows_do_not_depend_on_where_a_run_resumed(setup, tmp_path):
  model, tokenizer, spec = setup
  sampled = spec(temperature=1.0, max_new_tokens=8)
  records = stage.load_suite("demo-harmful", n=6, seed=0)
  whole = stage.evaluate_suite(sampled, model, tokenizer, tmp_path / "a", "demo-harmful", records, KeywordJudge(),
                               show_progress=False)
  stage.evaluate_suite(sampled, model, tokenizer, tmp_path / "b", "demo-harmful", records[2:5], KeywordJudge(),
                       show_progress=False)
  resumed = stage.evaluate_suite(sampled, model, tokenizer, tmp_path / "b", "demo-harmful", records, KeywordJudge(),
                                 show_progress=False)
  by_prompt = {r["prompt"]: r["generation"] for r in whole}
  assert {r["prompt"]: r["generation"] for r in resumed} == by_prompt
  assert len(set(by_prompt.values())) > 1


@pytest.mark.skipif(not (SHARED_DATA / "capability").is_dir(), reason="needs ../shared/data/capability")
def test_capability_tasks_go_to_the_report(setup, tmp_path):
  from dcr_jax.report import report_markdown

  model, tokenizer, spec = setup
  with_capability = spec(suites="demo-harmful:2", capability="arc_easy, piqa", capability_n=3,
                         data_root=str(SHARED_DATA))
  assert with_capability.evaluate.capability == ("arc_easy", "piqa")
  summary = stage.run(with_capability, stage.load_data(with_capability), model, tokenizer, tmp_path)
  report = json.loads((tmp_path / "report.json").read_text())
  assert set(report["capability"]) == {"arc_easy", "piqa"}
  for task, metrics in report["capability"].items():
    assert metrics["n"] == 3 and 0 <= metrics["acc"] <= 1 and 0 <= metrics["acc_norm"] <= 1
    assert summary["capability"][task] == metrics["acc_norm"]
    assert len((tmp_path / "eval" / f"capability-{task}.jsonl").read_text().splitlines()) == 3
  markdown = report_markdown(tmp_path, report)
  assert "## General capability" in markdown and "arc_easy acc_norm" in markdown


def test_capability_bad_input_is_one_line(setup, tmp_path):
  _, _, spec = setup
  with pytest.raises(Exception) as e:
    spec(capability="arc_easy,hellaswag", data_root=str(SHARED_DATA))
  assert "hellaswag" in str(e.value) and "mmlu" in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(Exception) as e:
    spec(capability="piqa", capability_root=str(tmp_path))
  assert "config.evaluate.capability" in str(e.value) and "missing file" in str(e.value)
  assert "\n" not in str(e.value)
