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


@pytest.fixture(scope="module")
def pair():
  model, tokenizer = load_model("gemma3-270m", progress=False)
  path = embedded_gguf_path()
  reference = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                dtype=torch.float32, attn_implementation="eager")
  reference.eval()
  return model, tokenizer, reference


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
  prompts = [encode_chat(tokenizer, p)[0] for p in PROMPTS]
  eos = reference.generation_config.eos_token_id
  stop = [eos] if isinstance(eos, int) else list(eos)
  ours = generate(model, prompts, max_new_tokens=20, stop_ids=stop, pad_id=tokenizer.pad_token_id)
  for ids, our_new in zip(prompts, ours):
    with torch.no_grad():
      out = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=20, do_sample=False)
    their_new = out[0, len(ids):].tolist()
    assert our_new == their_new, (tokenizer.decode(our_new), tokenizer.decode(their_new))


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
