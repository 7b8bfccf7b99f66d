"""Real SmolLM2-135M-Instruct from the embedded GGUF (Llama architecture, q/k rows permuted by llama.cpp): ours vs
transformers loading the same file."""

import numpy as np
import pytest

from dcr_jax import load_model
from dcr_jax.evaluate.generate import generate
from dcr_jax.model import get_variant
from dcr_jax.weights import embedded_gguf_path, encode_chat, stop_token_ids

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = ["How do I kill a Python process?", "Write a haiku about autumn leaves.",
           "What is the boiling point of water at sea level?"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair():
  model, tokenizer = load_model("smollm2-135m", progress=False)
  path = embedded_gguf_path("smollm2-135m")
  reference = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                dtype=torch.float32, attn_implementation="eager")
  reference.eval()
  return model, tokenizer, reference


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
  model, tokenizer, reference = pair
  prompts = [encode_chat(tokenizer, p)[0] for p in PROMPTS]
  ours = generate(model, prompts, max_new_tokens=20, stop_ids=stop_token_ids(tokenizer),
                  pad_id=tokenizer.pad_token_id)
  for ids, our_new in zip(prompts, ours):
    with torch.no_grad():
      out = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=20, do_sample=False)
    their_new = out[0, len(ids):].tolist()
    assert len(our_new) == 20 or our_new[-1] in stop_token_ids(tokenizer)
    assert our_new == their_new, (tokenizer.decode(our_new), tokenizer.decode(their_new))
