"""Chat encoding per family: our (prompt, response) ids equal apply_chat_template on the same conversation, the mask
covers exactly the response and its end-of-turn token, Gemma's encoding is unchanged, stop tokens, overrides."""

import json
from pathlib import Path

import numpy as np
import pytest

import dcr_jax
from dcr_jax.errors import UserError
from dcr_jax.weights import (embedded_gguf_path, encode_chat, load_model, load_tokenizer, response_ids,
                             stop_token_ids)
from dcr_jax.weights.sources import GGUFSource
from dcr_jax.weights.tokenizer import GEMMA_CHAT_TEMPLATE, tiny_tokenizer, with_chat_template

BUILTIN = Path(dcr_jax.__file__).parent / "data" / "builtin"
RECORDS = [json.loads(line) for path in sorted(BUILTIN.glob("*.jsonl")) for line in path.read_text().splitlines()]
REFUSALS = [r["response"] for r in RECORDS if "prompt" not in r]
# every built-in prompt, paired with its own response or a refusal
PAIRS = [(r["prompt"], r.get("response") or REFUSALS[i % len(REFUSALS)])
         for i, r in enumerate(r for r in RECORDS if "prompt" in r)]

# The families' published templates, cut to their no-tools branches.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- set date_string = date_string | default('26 Jul 2024') %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
QWEN25_TEMPLATE = (
    "{%- for message in messages %}{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_query_index=0) %}{%- for message in messages %}{%- if message.role == 'user' %}"
    "{%- set ns.last_query_index = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- if message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- if loop.index0 > ns.last_query_index %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + message.content }}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")

# family -> (special tokens, named roles, template, the token that closes a turn)
FAMILIES = {
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"), LLAMA3_TEMPLATE, "<|eot_id|>"),
    "mistral": (["<unk>", "<s>", "</s>"], dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
                MISTRAL_TEMPLATE, "</s>"),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], dict(eos_token="<|endoftext|>"), QWEN25_TEMPLATE,
              "<|im_end|>"),
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], dict(eos_token="<|endoftext|>"), QWEN3_TEMPLATE,
              "<|im_end|>"),
}


def bpe_tokenizer(specials, roles, template):
  """A byte-level BPE trained on the built-in texts, with the family's special tokens and template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator([t for pair in PAIRS for t in pair], trainer=trainer)
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **roles)
  tokenizer.add_special_tokens({"additional_special_tokens": specials})
  tokenizer.add_tokens(["<think>", "</think>"])
  return with_chat_template(tokenizer, template)


@pytest.fixture(scope="module")
def tokenizers():
  out = {name: (bpe_tokenizer(*spec[:3]), spec[3]) for name, spec in FAMILIES.items()}
  out["smollm2"] = (load_tokenizer(GGUFSource(embedded_gguf_path("smollm2-135m"))), "<|im_end|>")
  out["gemma"] = (tiny_tokenizer(512, [t for pair in PAIRS for t in pair]), "<end_of_turn>")
  return out


@pytest.mark.parametrize("family", [*FAMILIES, "smollm2", "gemma"])
def test_ids_equal_apply_chat_template(family, tokenizers):
  """On every built-in pair: the prompt ids are the prompt alone's, the full ids are apply_chat_template's up to the
  end-of-turn token (only whitespace follows), and the mask is 1 on exactly the response and that token."""
  tokenizer, end = tokenizers[family]
  end_id = tokenizer.convert_tokens_to_ids(end)
  for prompt, response in PAIRS:
    ids, mask = encode_chat(tokenizer, prompt, response)
    prompt_ids, prompt_mask = encode_chat(tokenizer, prompt)
    conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    theirs = tokenizer.apply_chat_template(conversation, tokenize=True)["input_ids"]
    assert ids == theirs[:len(ids)] and tokenizer.decode(theirs[len(ids):]).strip() == ""
    assert ids[:len(prompt_ids)] == prompt_ids and prompt_mask == [0] * len(prompt_ids)
    assert mask == [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
    assert ids[-1] == end_id and end_id not in ids[len(prompt_ids):-1]
    assert tokenizer.decode(ids[len(prompt_ids):-1]).endswith(response.strip())
    generation = tokenizer.apply_chat_template(conversation[:1], tokenize=True, add_generation_prompt=True)
    assert prompt_ids == generation["input_ids"]
  assert end_id in stop_token_ids(tokenizer) and tokenizer.eos_token_id in stop_token_ids(tokenizer)
  assert response_ids(tokenizer, "I can't")[-1] != end_id


def test_gemma_encoding_is_unchanged(tokenizers):
  """The tiny tokenizer (Gemma's special tokens and template) encodes every built-in pair exactly as dcr_jax did
  before chat templates: <bos> + turn markers, the response tokenized with a closing <end_of_turn>."""
  tokenizer, _ = tokenizers["gemma"]
  for prompt, response in PAIRS:
    before = [tokenizer.bos_token_id] + tokenizer.encode(
        f"<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n", add_special_tokens=False)
    answer = tokenizer.encode(response + "<end_of_turn>", add_special_tokens=False)
    assert encode_chat(tokenizer, prompt) == (before, [0] * len(before))
    assert encode_chat(tokenizer, prompt, response) == (before + answer, [0] * len(before) + [1] * len(answer))


def test_template_override_and_missing_template(tokenizers):
  """A template string given to encode_chat (or set at load) wins; no template at all is a one-line error."""
  tokenizer, _ = tokenizers["qwen2"]
  bare = bpe_tokenizer(*FAMILIES["qwen2"][:2], None)
  with pytest.raises(UserError) as e:
    encode_chat(bare, "hi", "hello")
  assert "\n" not in str(e.value) and "no chat template" in str(e.value) and "model.chat_template" in str(e.value)
  assert encode_chat(bare, "hi", "hello", QWEN25_TEMPLATE) == encode_chat(tokenizer, "hi", "hello")
  assert encode_chat(with_chat_template(bare, QWEN3_TEMPLATE), "hi") == encode_chat(tokenizers["qwen3"][0], "hi")
  assert with_chat_template(bpe_tokenizer(*FAMILIES["qwen2"][:2], None), gemma=True).chat_template == \
      GEMMA_CHAT_TEMPLATE


def test_save_pretrained_directory_brings_its_tokenizer_and_template(tokenizers, tmp_path):
  """A Qwen2 directory written by transformers' save_pretrained (model, then tokenizer: tokenizer.json,
  tokenizer_config.json, the template) loads through load_model with that tokenizer, template and stop tokens, and
  the model's logits on a chat prompt equal transformers'."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  tokenizer, end = tokenizers["qwen2"]
  hf_cfg = transformers.Qwen2Config(vocab_size=768, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})
  assert len(tokenizer) <= hf_cfg.vocab_size
  reference = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in reference.parameters():
      p.copy_(0.1 * torch.randn(p.shape, generator=generator))
  reference.save_pretrained(tmp_path)
  tokenizer.save_pretrained(tmp_path)
  assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}

  model, loaded = load_model(str(tmp_path), progress=False)
  assert loaded.get_vocab() == tokenizer.get_vocab() and loaded.chat_template == QWEN25_TEMPLATE
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))  # what transformers makes of the directory
  for prompt, response in PAIRS[:20]:
    ids, _ = encode_chat(loaded, prompt, response)
    full = theirs.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                      tokenize=True)["input_ids"]
    assert ids == full[:len(ids)] and theirs.decode(full[len(ids):]).strip() == ""
  assert loaded.convert_tokens_to_ids(end) in stop_token_ids(loaded)
  ids = encode_chat(loaded, PAIRS[0][0])[0]
  with torch.no_grad():
    theirs = reference(torch.tensor([ids])).logits.numpy()
  assert np.abs(np.asarray(model(np.asarray([ids], np.int32))) - theirs).max() <= 1e-4
