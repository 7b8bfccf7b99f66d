"""Tokenizers: built once from a GGUF vocabulary (no torch needed) and cached, or read from an HF directory.

Also the one Gemma chat template used by training and evaluation alike.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from dcr_jax.errors import UserError

START_USER = "<start_of_turn>user\n"
END_TURN = "<end_of_turn>\n"
START_MODEL = "<start_of_turn>model\n"


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
  """The GGUF vocabulary -> a transformers fast tokenizer, via transformers' converter (numpy and tokenizers only)."""
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
  backend, extra = convert_gguf_tokenizer(meta["general.architecture"], vocab)
  return GemmaTokenizer(tokenizer_object=backend, **config, **extra)


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


def encode_chat(tokenizer, prompt: str, response: str | None = None) -> tuple[list[int], list[int]]:
  """Gemma chat format -> (token ids, response mask). Without a response, ends where the model starts answering.

  Prompt and response are tokenized separately so that training sees exactly the ids that generation produces.
  """
  prompt_text = f"{START_USER}{prompt}{END_TURN}{START_MODEL}"
  ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt_text, add_special_tokens=False)
  mask = [0] * len(ids)
  if response is not None:
    response_ids = tokenizer.encode(response + END_TURN.rstrip("\n"), add_special_tokens=False)
    ids += response_ids
    mask += [1] * len(response_ids)
  return ids, mask


def stop_token_ids(tokenizer) -> list[int]:
  """Ids that end a generated turn: EOS and <end_of_turn>."""
  ids = {tokenizer.eos_token_id}
  end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
  if isinstance(end, int) and end != tokenizer.unk_token_id:
    ids.add(end)
  return sorted(i for i in ids if i is not None)


TINY_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def tiny_tokenizer(vocab_size: int, corpus: list[str]) -> "PreTrainedTokenizerBase":
  """A small byte-level BPE with Gemma's special tokens and ids (pad 0, eos 1, bos 2), trained on `corpus` once
  and cached: it lets random-init tiny models run the real pipeline without any weights file."""
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
  return AutoTokenizer.from_pretrained(cached)
