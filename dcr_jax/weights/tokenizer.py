"""Tokenizers: built once from a GGUF vocabulary (no torch needed) and cached, or read from an HF directory.

Also the chat encoding used by training and evaluation alike: each tokenizer's own chat template (Gemma's for a
Gemma tokenizer that has none), applied through transformers' `apply_chat_template`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np

from dcr_jax.errors import UserError

START_USER = "<start_of_turn>user\n"
END_TURN = "<end_of_turn>\n"
START_MODEL = "<start_of_turn>model\n"
# Gemma's turn format, without the official template's trimming: the encoding dcr_jax has always used for Gemma
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ message['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>")


def cache_root() -> Path:
  """`$DCR_CACHE`, default `~/.cache/dcr_jax`."""
  return Path(os.environ.get("DCR_CACHE", Path.home() / ".cache" / "dcr_jax"))


def _gguf_fingerprint(path: Path) -> str:
  stat = path.stat()
  digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode())
  with path.open("rb") as f:
    digest.update(f.read(1 << 20))
  return digest.hexdigest()[:16]


def _build_from_gguf(source) -> "PreTrainedTokenizerBase":
  """The GGUF vocabulary (sentencepiece or GPT-2 byte-level BPE) and chat template -> a transformers fast tokenizer,
  via transformers' converter (numpy and tokenizers only)."""
  from transformers import PreTrainedTokenizerFast
  from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
  from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

  meta = source.metadata()
  groups = {group: {name: _plain(meta[f"tokenizer.{key}"]) for key, name in renames.items()
                    if f"tokenizer.{key}" in meta} for group, renames in GGUF_TOKENIZER_MAPPING.items()}
  vocab, config = groups["tokenizer"], groups["tokenizer_config"]
  if "tokens" not in vocab:
    raise UserError(f"{source.path}: the GGUF has no tokenizer vocabulary; pass a tokenizer directory instead")
  if vocab.get("tokenizer_type") == "llama":
    config.setdefault("add_bos_token", True)
  for name, key in {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unk_token_id",
                    "pad_token": "pad_token_id"}.items():
    if vocab.get(key) is not None:
      config[name] = vocab["tokens"][vocab[key]]
  arch = meta["general.architecture"]
  backend, extra = convert_gguf_tokenizer(arch, vocab)
  cls = GemmaTokenizer if arch.startswith("gemma") else PreTrainedTokenizerFast  # what AutoTokenizer picks
  return cls(tokenizer_object=backend, **config, **extra)


def _plain(value):
  return [v.item() if isinstance(v, np.generic) else v for v in value] if isinstance(value, list) else value


def tokenizer_from_gguf(source) -> "PreTrainedTokenizerBase":
  """The GGUF's tokenizer; the ~20 s conversion of a 262k vocabulary runs once, then loads from the cache."""
  from transformers import AutoTokenizer

  cached = cache_root() / "tokenizers" / _gguf_fingerprint(source.path)
  if not (cached / "tokenizer.json").is_file():
    tok = _build_from_gguf(source)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent))
    tok.save_pretrained(tmp)
    try:
      tmp.rename(cached)
    except OSError:  # another process cached it first
      shutil.rmtree(tmp, ignore_errors=True)
  return AutoTokenizer.from_pretrained(cached)


def tokenizer_from_dir(directory: str | Path) -> "PreTrainedTokenizerBase":
  """The tokenizer saved in an HF checkpoint directory."""
  from transformers import AutoTokenizer

  try:
    return AutoTokenizer.from_pretrained(str(directory))
  except (OSError, ValueError) as e:
    raise UserError(f"{directory}: no usable tokenizer files ({type(e).__name__}); add tokenizer.json "
                    "or pass --config.model.tokenizer=DIR") from None


def with_chat_template(tokenizer, template: str | None = None, *, gemma: bool = False):
  """`tokenizer` with its chat template set to `template` when given; a Gemma tokenizer (`gemma`) without one gets
  GEMMA_CHAT_TEMPLATE. Others keep theirs (or none: encoding a chat then fails with a one-line error)."""
  if template:
    tokenizer.chat_template = template
  elif gemma and not tokenizer.chat_template:
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
  return tokenizer


_SPECIAL_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its special token ids


def special_ids(tokenizer) -> frozenset[int]:
  """Ids of every special token, named (bos, eos, ...) or added (a GGUF's control tokens); cached per tokenizer."""
  if tokenizer not in _SPECIAL_IDS:
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    _SPECIAL_IDS[tokenizer] = frozenset(added | set(tokenizer.all_special_ids))
  return _SPECIAL_IDS[tokenizer]


def _render(tokenizer, messages: list[dict], template: str | None, add_generation_prompt: bool) -> str:
  template = template or tokenizer.chat_template
  if not template:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    raise UserError(f"tokenizer {name!r} has no chat template; set config.model.chat_template to a Jinja template")
  return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)


def encode_chat(tokenizer, prompt: str, response: str | None = None, template: str | None = None
                ) -> tuple[list[int], list[int]]:
  """(token ids, response mask) of a one-turn chat in the tokenizer's chat template (or `template`).

  Without a response, the ids end where the model starts answering (the template's generation prompt). With one,
  the ids are those of `apply_chat_template` on [user, assistant] up to and including the end-of-turn token that
  closes the response (what a generation stops at; the template's trailing newline is never generated), and the
  mask is 1 on exactly the response tokens and that end-of-turn token. The prompt's ids are always those of the
  prompt alone, what generation is given: in the rare case that the response's first characters merge with the
  prompt's last token, the response is tokenized on its own.
  """
  user = [{"role": "user", "content": prompt}]
  prompt_text = _render(tokenizer, user, template, add_generation_prompt=True)
  ids = tokenizer.encode(prompt_text, add_special_tokens=False)
  mask = [0] * len(ids)
  if response is None:
    return ids, mask
  full = _render(tokenizer, user + [{"role": "assistant", "content": response}], template,
                 add_generation_prompt=False)
  if not full.startswith(prompt_text):
    raise UserError("the chat template writes a conversation that does not start with its own generation prompt; "
                    "set config.model.chat_template to one that does")
  full_ids = tokenizer.encode(full, add_special_tokens=False)
  if full_ids[:len(ids)] == ids:
    rest = full_ids[len(ids):]
  else:  # the response's first characters merged with the prompt's last token: keep the prompt's own ids
    rest = tokenizer.encode(full[len(prompt_text):], add_special_tokens=False)
  specials = special_ids(tokenizer)
  end = next((i for i, token in enumerate(rest) if token in specials), None)
  if end is None:
    raise UserError("the chat template closes the assistant turn with no special end-of-turn token; "
                    "set config.model.chat_template to one that does")
  return ids + rest[:end + 1], mask + [1] * (end + 1)


def response_ids(tokenizer, text: str, template: str | None = None) -> list[int]:
  """The ids `text` has as a response in the chat template, without the end-of-turn token (refusal openings)."""
  ids, mask = encode_chat(tokenizer, "", text, template)
  return [i for i, m in zip(ids, mask) if m][:-1]


def stop_token_ids(tokenizer, template: str | None = None) -> list[int]:
  """Ids that end a generated turn: EOS, the token the chat template closes a response with, and the usual
  end-of-turn tokens (<end_of_turn>, <|im_end|>, <|eot_id|>, ...) that the vocabulary holds as special tokens."""
  ids = {tokenizer.eos_token_id}
  specials = special_ids(tokenizer)
  ids.update(i for i in tokenizer.convert_tokens_to_ids(list(END_OF_TURN_TOKENS))
             if i in specials and i != tokenizer.unk_token_id)
  if template or tokenizer.chat_template:
    ids.add(encode_chat(tokenizer, "", "x", template)[0][-1])
  return sorted(i for i in ids if i is not None)


TINY_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def tiny_tokenizer(vocab_size: int, corpus: list[str]) -> "PreTrainedTokenizerBase":
  """A small byte-level BPE with Gemma's special tokens and ids (pad 0, eos 1, bos 2), trained on `corpus` once
  and cached, with Gemma's chat template: it lets random-init tiny models run the real pipeline without any weights
  file."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import AutoTokenizer, PreTrainedTokenizerFast

  digest = hashlib.sha256("\n".join(corpus).encode()).hexdigest()[:12]
  cached = cache_root() / "tokenizers" / f"tiny-{vocab_size}-{digest}"
  if not (cached / "tokenizer.json").is_file():
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=TINY_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                  bos_token="<bos>", unk_token="<unk>",
                                  additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent))
    tok.save_pretrained(tmp)
    try:
      tmp.rename(cached)
    except OSError:
      shutil.rmtree(tmp, ignore_errors=True)
  return with_chat_template(AutoTokenizer.from_pretrained(cached), gemma=True)
