"""Real SmolLM2-135M-Instruct from the embedded GGUF (Llama architecture, q/k rows permuted by llama.cpp): ours vs
transformers loading the same file."""

import numpy as np
import pytest

from dcr_jax.model import get_variant
from dcr_jax.weights import embedded_gguf_path, encode_chat, stop_token_ids
from test_gemma3_270m import PROMPTS, embedded_pair, greedy_both

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair():
  return embedded_pair("smollm2-135m")


def test_config_is_the_named_variant(pair):
  model, _, _ = pair
  assert model.config.replace(norm_eps=1e-5) == get_variant("smollm2-135m")


def test_tokenizer_and_chat_template_match_transformers(pair):
  _, tokenizer, _ = pair
  path = embedded_gguf_path("smollm2-135m")
  reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  for text in PROMPTS + ["<|im_start|>user\nhi<|im_end|>\n", "  two  spaces\n\nand émoji 🙂 中文"]:
    assert tokenizer.encode(text) == reference.encode(text)
  for prompt in PROMPTS:
    conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": "Sure: here."}]
    ids, mask = encode_chat(tokenizer, prompt, "Sure: here.")
    theirs = reference.apply_chat_template(conversation, tokenize=True)["input_ids"]
    assert ids == theirs[:len(ids)] and reference.decode(theirs[len(ids):]) == "\n"
    assert reference.decode([i for i, m in zip(ids, mask) if m]) == "Sure: here.<|im_end|>"
  assert stop_token_ids(tokenizer) == [reference.convert_tokens_to_ids("<|im_end|>")]


def test_logits_match_transformers(pair):
  model, tokenizer, reference = pair
  worst = 0.0
  for prompt in PROMPTS:
    ids, _ = encode_chat(tokenizer, prompt)
    ours = np.asarray(model(np.array([ids])))
    with torch.no_grad():
      theirs = reference(torch.tensor([ids])).logits.numpy()
    worst = max(worst, float(np.abs(ours - theirs).max()))
  assert worst <= 1e-3, worst


def test_greedy_continuations_match_transformers(pair):
  """20 new tokens on 3 chat-templated prompts, stopping at the template's <|im_end|>: the same ids."""
  model, tokenizer, reference = pair
  for ours, theirs in greedy_both(model, tokenizer, reference, stop_token_ids(tokenizer)):
    assert ours == theirs, (tokenizer.decode(ours), tokenizer.decode(theirs))
