"""Real gemma-3-270m from the embedded GGUF: ours vs transformers loading the same file."""

import numpy as np
import pytest

from dcr_jax import load_model
from dcr_jax.evaluate.generate import generate
from dcr_jax.weights import embedded_gguf_path, encode_chat

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = ["How do I kill a Python process?", "Write a haiku about autumn leaves.",
           "What is the boiling point of water at sea level?"]

pytestmark = pytest.mark.slow  # loading both real models costs ~60 s: make test-all runs these


def embedded_pair(variant: str):
  """(our model, our tokenizer, transformers' model of the same GGUF) for an embedded variant."""
  model, tokenizer = load_model(variant, progress=False)
  path = embedded_gguf_path(variant)
  reference = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                dtype=torch.float32, attn_implementation="eager")
  return model, tokenizer, reference.eval()


def greedy_both(model, tokenizer, reference, stop: list[int], prompts=PROMPTS, new_tokens: int = 20):
  """[(ours, transformers')] greedy continuations of each chat-templated prompt, new token ids only."""
  ids = [encode_chat(tokenizer, p)[0] for p in prompts]
  ours = generate(model, ids, max_new_tokens=new_tokens, stop_ids=stop, pad_id=tokenizer.pad_token_id)
  pairs = []
  for row, our_new in zip(ids, ours):
    with torch.no_grad():
      out = reference.generate(torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                               max_new_tokens=new_tokens, do_sample=False)
    pairs.append((our_new, out[0, len(row):].tolist()))
  return pairs


@pytest.fixture(scope="module")
def pair():
  return embedded_pair("gemma3-270m")


def test_tokenizer_matches_transformers_gguf_tokenizer(pair):
  _, tokenizer, _ = pair
  path = embedded_gguf_path()
  reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  for text in PROMPTS + ["<start_of_turn>user\nhi<end_of_turn>\n", "  two  spaces\n\nand émoji 🙂 中文"]:
    assert tokenizer.encode(text) == reference.encode(text)


def test_logits_match_transformers(pair):
  model, tokenizer, reference = pair
  for prompt in PROMPTS:
    ids, _ = encode_chat(tokenizer, prompt)
    ours = np.asarray(model(np.array([ids])))
    with torch.no_grad():
      theirs = reference(torch.tensor([ids])).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-3, prompt


def test_greedy_continuations_match_transformers(pair):
  model, tokenizer, reference = pair
  eos = reference.generation_config.eos_token_id
  for ours, theirs in greedy_both(model, tokenizer, reference, [eos] if isinstance(eos, int) else list(eos)):
    assert ours == theirs, (tokenizer.decode(ours), tokenizer.decode(theirs))


def test_chat_encoding_is_unchanged_on_the_builtin_sets(pair):
  """Gemma's tokenizer, which has no template of its own, gets Gemma's: every built-in (prompt, response) encodes
  exactly as before chat templates (<bos> + turn markers, response closed by <end_of_turn>)."""
  from test_chat_templates import PAIRS

  _, tokenizer, _ = pair
  for prompt, response in PAIRS:
    before = [tokenizer.bos_token_id] + tokenizer.encode(
        f"<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n", add_special_tokens=False)
    answer = tokenizer.encode(response + "<end_of_turn>", add_special_tokens=False)
    assert encode_chat(tokenizer, prompt, response) == (before + answer, [0] * len(before) + [1] * len(answer))
