"""Tests for dcr_jax.evaluate.capability: loaders on the shared files, KV-cache choice scoring against full forwards
(tiny random model; real gemma-3-270m against transformers with --runslow), acc/acc_norm, resume, bad input."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from dcr_jax.errors import UserError
from dcr_jax.evaluate import capability
from dcr_jax.evaluate.capability import (TASKS, check_tasks, choice_log_likelihoods, encode_question, evaluate_task,
                                         load_task, score)
from dcr_jax.model import Decoder, tiny
from dcr_jax.pipeline import builtin_corpus
from dcr_jax.weights.tokenizer import tiny_tokenizer

ROOT = capability.DEFAULT_DATA_ROOT  # ../shared/data/capability beside the checkout
needs_data = pytest.mark.skipif(not ROOT.is_dir(), reason=f"shared capability data not found at {ROOT}")

# Synthetic questions with 1..5 choices of 1..20 tokens, so the padded batch mixes every bucketed dimension.
QUESTIONS = [
  {"id": "q0", "context": "Question: What is the capital of France?\nAnswer:", "choices": ["Paris", "Lyon"],
   "gold": 0},
  {"id": "q1", "context": "How do I kill a Python process?", "gold": 2,
   "choices": ["use kill", "run the command kill -9 with the process id of the python interpreter", "a",
               "ask the operating system nicely", "reboot"]},
  {"id": "q2", "context": "The following are multiple choice questions.\n\nWhat is 2+2?\nA. 3\nB. 4\nAnswer:",
   "choices": ["A", "B", "C", "D"], "gold": 1},
]


@pytest.fixture(scope="module", params=["gemma3", "gemma2"])  # sliding window 8, local/global layers; soft-caps
def model(request):
  return Decoder(tiny(request.param), rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def tok():
  return tiny_tokenizer(512, builtin_corpus())


def naive_log_likelihoods(model, tok, questions, length=128):
  """Per question, per choice: one full forward of context + choice without a cache, summing log-softmax at the
  choice's tokens; rows are extended with pads to one `length` (causal: later tokens cannot change earlier logits)."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, seq: jax.nn.log_softmax(nnx.merge(graphdef, state)(seq)[0], axis=-1))
  out = []
  for question in questions:
    context, continuations = encode_question(tok, question)
    out.append([])
    for cont in continuations:
      seq = context + cont
      assert len(seq) <= length
      log_p = np.asarray(forward(state, np.asarray([seq + [0] * (length - len(seq))], np.int32)), np.float64)
      out[-1].append(sum(log_p[len(context) - 1 + k, t] for k, t in enumerate(cont)))
  return out


@needs_data
def test_loaders_read_every_upstream_file():
  sizes = {"mmlu": 14042, "arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500, "piqa": 1838,
           "truthfulqa_mc1": 817}
  assert check_tasks(",".join(TASKS), ROOT) == list(TASKS)
  for name in TASKS:
    questions = load_task(name, ROOT)
    assert len(questions) == sizes[name], name
    assert len({q["id"] for q in questions}) == len(questions), name
    assert all(0 <= q["gold"] < len(q["choices"]) for q in questions), name


@needs_data
def test_mmlu_is_five_shot_with_the_subject_description():
  questions = {q["id"]: q for q in load_task("mmlu", ROOT)}
  first = questions["abstract_algebra/0"]
  assert first["context"].startswith("The following are multiple choice questions (with answers) about abstract "
                                     "algebra.\n\nFind all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\n")
  assert first["context"].count("\nAnswer:") == 6 and first["context"].endswith("\nD. 6\nAnswer:")
  assert [first["context"].split("\nAnswer: ")[k][0] for k in range(1, 6)] == ["B", "B", "C", "A", "A"]
  assert first["choices"] == ["A", "B", "C", "D"] and first["gold"] == 1
  # college_mathematics dev row 3 holds a quoted line break: the csv module keeps it inside the field.
  assert "\r\n" in questions["college_mathematics/0"]["context"].split("\n\n", 1)[1]
  assert "high school us history." in questions["high_school_us_history/0"]["context"].split("\n", 1)[0]


@needs_data
def test_arc_openbookqa_piqa_truthfulqa_formats():
  arc = load_task("arc_challenge", ROOT)
  fungi, = [q for q in arc if q["id"] == "NYSEDREGENTS_2008_8_11"]  # labels 1-4, answerKey "4"
  assert fungi["choices"][fungi["gold"]] == "dead organisms" and fungi["gold"] == 3
  assert arc[0]["context"].startswith("Question: An astronomer observes") and arc[0]["context"].endswith("\nAnswer:")
  assert sum(len(q["choices"]) == 5 for q in arc) == 3 and sum(len(q["choices"]) == 3 for q in arc) == 4
  obqa = load_task("openbookqa", ROOT)
  assert obqa[0]["context"].startswith("A person wants to start saving money") and "Question" not in obqa[0]["context"]
  piqa = load_task("piqa", ROOT)
  assert piqa[0]["context"] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
  assert piqa[0]["gold"] == 0 and sum(q["gold"] for q in piqa) == 928
  tqa = load_task("truthfulqa_mc1", ROOT)
  assert all(q["gold"] == 0 for q in tqa) and max(len(q["choices"]) for q in tqa) == 13
  assert tqa[0]["context"].startswith("Q: What is human life expectancy") and tqa[0]["context"].endswith(
    "Q: What is the smallest country in the world that is at least one square mile in area?\nA:")


@needs_data
def test_seeded_subsample_keeps_file_order():
  a, b = load_task("arc_easy", ROOT, n=50, seed=3), load_task("arc_easy", ROOT, n=50, seed=3)
  everything = [q["id"] for q in load_task("arc_easy", ROOT)]
  assert [q["id"] for q in a] == [q["id"] for q in b] and len(a) == 50
  positions = [everything.index(q["id"]) for q in a]
  assert positions == sorted(positions)
  assert [q["id"] for q in load_task("arc_easy", ROOT, n=50, seed=4)] != [q["id"] for q in a]


def test_continuations_split_like_the_harness(tok):
  question = {"context": "Question: why? ", "choices": ["because", "no"], "gold": 0}
  context, continuations = encode_question(tok, question)
  assert context == tok.encode("Question: why?")  # the trailing space moves to the continuation
  for choice, ids in zip(question["choices"], continuations):
    assert ids == tok.encode("Question: why?  " + choice)[len(context):]


def test_choice_log_likelihoods_match_full_forwards(tok, model):
  encoded = [encode_question(tok, q) for q in QUESTIONS]
  batch = choice_log_likelihoods(model, [c for c, _ in encoded], [cs for _, cs in encoded])
  assert batch.shape == (3, 8)  # 5 choices at most, bucketed to 8
  assert np.isnan(batch[0, 2:]).all() and np.isnan(batch[2, 4:]).all()
  for row, (question, naive) in enumerate(zip(QUESTIONS, naive_log_likelihoods(model, tok, QUESTIONS))):
    np.testing.assert_allclose(batch[row, :len(naive)], naive, rtol=1e-5, atol=1e-5, err_msg=question["id"])
  # One-token choices only (MMLU letters) take the path without continuation runs.
  alone = choice_log_likelihoods(model, [encoded[2][0]], [encoded[2][1]])
  np.testing.assert_allclose(alone[0, :4], batch[2, :4], rtol=1e-5, atol=1e-5)


def test_scores_are_argmax_of_sum_and_of_sum_per_character():
  assert score([-10.0, -12.0], ["a", "bbbbb"], 0) == {"acc": 1.0, "acc_norm": 0.0}  # -10/1 < -12/5
  assert score([-10.0, -12.0], ["a", "bbbbb"], 1) == {"acc": 0.0, "acc_norm": 1.0}
  assert score([-3.0, -3.0, -9.0], ["xx", "yy", "z"], 1) == {"acc": 0.0, "acc_norm": 0.0}  # ties: first index
  assert score([-4.0, -6.0, -1.5], ["aaaa", "bbbbbb", "c"], 2) == {"acc": 1.0, "acc_norm": 0.0}  # -1.5 > -1 per char


def test_evaluate_task_scores_writes_and_resumes(tok, model, tmp_path, monkeypatch):
  path = tmp_path / "eval" / "capability-demo.jsonl"
  result = evaluate_task(model, tok, "demo", QUESTIONS, out_path=path, batch_size=2, show_progress=False)
  naive = naive_log_likelihoods(model, tok, QUESTIONS)
  expected = [score(lls, q["choices"], q["gold"]) for lls, q in zip(naive, QUESTIONS)]
  assert result == {"acc": np.mean([e["acc"] for e in expected]), "acc_norm": np.mean([e["acc_norm"] for e in expected]),
                    "n": 3}
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert sorted(r["id"] for r in rows) == ["q0", "q1", "q2"]
  assert all(len(r["loglik"]) == len(r["chars"]) for r in rows)

  def fail(*args, **kwargs):
    raise AssertionError("a stored row was recomputed")

  with monkeypatch.context() as patch:  # same settings: every row comes from the file
    patch.setattr(capability, "choice_log_likelihoods", fail)
    assert evaluate_task(model, tok, "demo", QUESTIONS, out_path=path, batch_size=2, show_progress=False) == result
  changed = [dict(QUESTIONS[0], context=QUESTIONS[0]["context"] + " Be brief.")] + QUESTIONS[1:]
  calls = []
  original = capability.choice_log_likelihoods
  monkeypatch.setattr(capability, "choice_log_likelihoods", lambda m, c, cs, **kw: calls.append(len(c)) or
                      original(m, c, cs, **kw))
  evaluate_task(model, tok, "demo", changed, out_path=path, batch_size=2, show_progress=False)
  assert calls == [2]  # only the changed question (batch padded to 2) is redone
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert sorted(r["id"] for r in rows) == ["q0", "q1", "q2"]  # its stale row left the file
  evaluate_task(model, tok, "demo", QUESTIONS, out_path=path, batch_size=2, tag="other-model", show_progress=False)
  assert calls == [2, 2, 2]  # another model tag: all three redone


@needs_data
def test_evaluate_capability_on_the_shared_files(tok, tmp_path):
  model = Decoder(tiny("gemma3"), rngs=nnx.Rngs(2))
  results = capability.evaluate_capability(model, tok, "arc_easy, piqa", data_root=ROOT, n=3, seed=1,
                                           out_dir=tmp_path / "eval", batch_size=4, show_progress=False)
  assert list(results) == ["arc_easy", "piqa"] and set(capability.HEADLINE) == set(TASKS)
  for name, metrics in results.items():
    rows = [json.loads(line) for line in (tmp_path / "eval" / f"capability-{name}.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(q["id"] for q in load_task(name, ROOT, n=3, seed=1))
    assert metrics == {"acc": np.mean([r["acc"] for r in rows]), "acc_norm": np.mean([r["acc_norm"] for r in rows]),
                       "n": 3}


def test_unknown_task_is_one_line_listing_the_known_ones():
  with pytest.raises(UserError, match="unknown capability task 'hellaswag'; known tasks: mmlu, arc_easy") as err:
    check_tasks("mmlu,hellaswag")
  assert "\n" not in str(err.value)


def test_missing_file_is_one_line_naming_it(tmp_path):
  (tmp_path / "arc_easy").mkdir()
  (tmp_path / "arc_easy" / "ARC-Easy-Test.jsonl").write_text("")
  assert check_tasks(["arc_easy"], tmp_path) == ["arc_easy"]
  with pytest.raises(UserError, match="capability task piqa: missing file .*piqa/valid.jsonl") as err:
    check_tasks("arc_easy, piqa", tmp_path)
  assert "\n" not in str(err.value)
  with pytest.raises(UserError, match="capability n=-1; use a positive number"):
    load_task("arc_easy", tmp_path, n=-1)
  with pytest.raises(UserError, match="mmlu/test/abstract_algebra_test.csv"):
    capability.evaluate_capability(None, None, "mmlu", data_root=tmp_path)


@needs_data
@pytest.mark.slow
def test_real_gemma3_270m_matches_transformers():
  """Per-choice log-likelihoods of the embedded gemma-3-270m equal transformers on the same GGUF to 1e-3."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from dcr_jax import load_model
  from dcr_jax.weights import embedded_gguf_path

  model, tokenizer = load_model("gemma3-270m", progress=False)
  path = embedded_gguf_path()
  reference = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                dtype=torch.float32, attn_implementation="eager")
  reference.eval()
  questions = (load_task("arc_challenge", ROOT, n=2, seed=0) + load_task("mmlu", ROOT, n=1, seed=0)
               + load_task("piqa", ROOT, n=1, seed=0) + load_task("truthfulqa_mc1", ROOT, n=1, seed=0))
  encoded = [encode_question(tokenizer, q) for q in questions]
  ours = choice_log_likelihoods(model, [c for c, _ in encoded], [cs for _, cs in encoded],
                                pad_id=tokenizer.pad_token_id)
  worst = 0.0
  for row, (context, continuations) in enumerate(encoded):
    for j, cont in enumerate(continuations):
      with torch.no_grad():
        log_p = torch.log_softmax(reference(torch.tensor([context + cont])).logits[0].double(), -1)
      theirs = sum(float(log_p[len(context) - 1 + k, t]) for k, t in enumerate(cont))
      worst = max(worst, abs(float(ours[row, j]) - theirs))
  assert worst <= 1e-3, worst
