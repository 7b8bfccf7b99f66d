"""python -m dcr_jax.export: hf (transformers logits and greedy chat continuations equal ours), peft (adapter on its
base equals the merged export), gguf (our loader and transformers' GGUF reader give our logits), multi-host byte
equality, and one-line bad input that writes nothing."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from etils import epath
from safetensors import safe_open

from dcr_jax import export, pipeline
from dcr_jax.errors import UserError
from dcr_jax.evaluate.generate import generate
from dcr_jax.model import tiny
from dcr_jax.spec import resolve
from dcr_jax.weights import encode_chat, load_model, stop_token_ids
from dcr_jax.weights.gguf_writer import QUANTS, write_gguf
from dcr_jax.weights.tokenizer import tiny_tokenizer
from helpers import random_model, xla_env

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--config=configs/tiny.py", "--config.refine.steps=2", "--config.align.steps=2",
         "--config.stages=refine,align", "--config.refine.probe=False", "--config.mesh.data=1",
         "--config.mesh.fsdp=-1"]
PROMPTS = ["How do I kill a Python process?", "What is the capital of France?", "Write a poem about the sea."]
# tiny models the GGUF readers rebuild exactly: Gemma 2/3 with the query scale they assume, Qwen3 with the head_dim
# transformers' reader assumes (it reads no key_length for qwen3)
GGUF_CONFIGS = {"gemma": tiny("gemma"), "gemma2": tiny("gemma2", query_pre_attn_scalar=256),
                "gemma3": tiny("gemma3", query_pre_attn_scalar=256), "llama": tiny("llama"),
                "mistral": tiny("mistral"), "qwen2": tiny("qwen2"), "qwen3": tiny("qwen3", head_dim=128)}
# largest |logit| difference measured on these random models (logits of order 1): f16 3.6e-3, q8_0 0.103
GGUF_TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "q8_0": 0.2}
NO_TRANSFORMERS_GGUF = {"gemma"}  # transformers has no GGUF reader for Gemma 1
DEFAULT_GGUF = ("llama", "gemma3")  # permuted q/k and Gemma's w + 1 norms by default; the rest with --runslow


def train(workdir, *extra):
  """Trains a workdir with TRAIN's settings; an `--config=FILE` in `extra` replaces the tiny config file."""
  config = [arg for arg in extra if arg.startswith("--config=")] or TRAIN[:1]  # the file comes before its overrides
  args = config + [arg for arg in TRAIN[1:] + list(extra) if not arg.startswith("--config=")]
  proc = subprocess.run([sys.executable, "-m", "dcr_jax.main", *args, f"--workdir={workdir}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return epath.Path(workdir)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny trained workdir (refine, then LoRA align), with the model of its last checkpoint as we compute it."""
  workdir = train(tmp_path_factory.mktemp("run") / "run")
  spec = resolve(export.run_config(workdir))
  model, tokenizer = pipeline.build_model(spec)
  spec = spec.bind(model.config)
  return workdir, spec, pipeline.restore_stage(spec, model, workdir, "align"), tokenizer


def reference(directory, **kwargs):
  return transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                           attn_implementation="eager", **kwargs).eval()


def torch_logits(ref, ids):
  with torch.no_grad():
    return ref(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def chat_ids(tokenizer):
  return [encode_chat(tokenizer, p)[0] for p in PROMPTS]


def assert_same_generation(model, tokenizer, directory, max_new_tokens=8):
  """apply_chat_template + generate of the export continue every prompt with our greedy tokens."""
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
  ref = reference(directory)
  ours = generate(model, chat_ids(tokenizer), max_new_tokens=max_new_tokens, stop_ids=stop_token_ids(tokenizer),
                  pad_id=tokenizer.pad_token_id or 0)
  for prompt, expected in zip(PROMPTS, ours):
    ids = hf_tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
      out = ref.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    assert out[0, ids["input_ids"].shape[1]:].tolist() == expected, prompt


def test_hf_export_loads_in_transformers_with_our_logits_and_greedy_tokens(run, tmp_path):
  workdir, spec, model, tokenizer = run
  out = export.export_run(workdir, tmp_path / "hf", "hf")
  ids = np.asarray([encode_chat(tokenizer, PROMPTS[0])[0]], np.int32)
  assert np.abs(torch_logits(reference(out), ids) - np.asarray(model(ids))).max() <= 1e-4
  assert_same_generation(model, tokenizer, out)
  stops = stop_token_ids(tokenizer)
  assert tokenizer.convert_tokens_to_ids("<end_of_turn>") in stops and tokenizer.eos_token_id in stops
  assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == stops
  assert json.loads((out / "config.json").read_text())["eos_token_id"] == stops
  card = (out / "README.md").read_text()
  assert "`align step 2` checkpoint" in card and "| align | 2 |" in card and '"lora_rank": 8' in card


def test_sharded_hf_export_matches_transformers_layout(run, tmp_path):
  """Shards named and indexed as save_pretrained does; transformers reads the same tensors as from one file."""
  workdir, spec, model, tokenizer = run
  whole = export.export_run(workdir, tmp_path / "whole", "hf")
  sharded = export.export_run(workdir, tmp_path / "sharded", "hf", max_shard_size=export.parse_size("200KB"))
  index = json.loads((sharded / export.INDEX_FILE).read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) == 6 and files[0] == "model-00001-of-00006.safetensors"
  with safe_open(str(whole / "model.safetensors"), "np") as f:
    assert index["metadata"]["total_size"] == sum(f.get_tensor(k).nbytes for k in f.keys())
    assert sorted(index["weight_map"]) == sorted(f.keys())
  ids = np.asarray([encode_chat(tokenizer, PROMPTS[1])[0]], np.int32)
  np.testing.assert_array_equal(torch_logits(reference(sharded), ids), torch_logits(reference(whole), ids))


def test_shard_plan_and_names_equal_huggingface_hub():
  from huggingface_hub import split_torch_state_dict_into_shards  # lazy: only this test compares with the hub

  sizes = [("a", 4), ("b", 4), ("c", 9), ("d", 2), ("e", 3), ("f", 8)]
  hub = split_torch_state_dict_into_shards({k: torch.zeros(n, dtype=torch.uint8) for k, n in sizes}, max_shard_size=8)
  shards = export.plan_shards(sizes, 8)
  assert dict(zip(export.shard_files(len(shards)), shards)) == hub.filename_to_tensors
  assert export.shard_files(1) == ["model.safetensors"]
  assert export.parse_size("5GB") == 5 * 10**9 and export.parse_size("2GiB") == 2 * 2**30


def test_peft_adapter_on_its_base_equals_the_merged_export(run, tmp_path):
  peft = pytest.importorskip("peft")
  workdir, spec, model, tokenizer = run
  merged = export.export_run(workdir, tmp_path / "hf", "hf")
  out = export.export_run(workdir, tmp_path / "peft", "peft")
  config = json.loads((out / "adapter_config.json").read_text())
  assert config["r"] == 8 and config["lora_alpha"] == 16.0 and Path(config["base_model_name_or_path"]) == (
      out / "base").resolve()
  adapted = peft.PeftModel.from_pretrained(reference(out / "base"), str(out)).eval()
  ids = np.asarray([encode_chat(tokenizer, PROMPTS[2])[0]], np.int32)
  theirs = torch_logits(adapted, ids)
  assert np.abs(theirs - torch_logits(reference(merged), ids)).max() <= 1e-5
  assert np.abs(theirs - torch_logits(reference(out / "base"), ids)).max() > 1e-3  # the adapter is not a no-op


@pytest.mark.parametrize("family", [f if f in DEFAULT_GGUF else pytest.param(f, marks=pytest.mark.slow)
                                    for f in GGUF_CONFIGS])
def test_gguf_round_trips_through_our_loader_and_transformers(family, tmp_path):
  model = random_model(GGUF_CONFIGS[family])
  tokenizer = tiny_tokenizer(512, pipeline.builtin_corpus())
  ids = np.asarray([tokenizer.encode(PROMPTS[0])[:8]], np.int32)  # within Mistral's window, which GGUF drops
  ours = np.asarray(model(ids))
  for quant in QUANTS:
    path = write_gguf(model, tokenizer, tmp_path / f"{quant}.gguf", quant, name=f"tiny-{family}",
                             fetch=export.host_value)
    back, back_tokenizer = load_model(str(path), progress=False)
    assert np.abs(np.asarray(back(ids)) - ours).max() <= GGUF_TOLERANCE[quant], quant
    if family not in ("gemma", "gemma2", "gemma3"):  # a Gemma GGUF is read as sentencepiece, not byte-level BPE
      assert back_tokenizer.encode(PROMPTS[0]) == tokenizer.encode(PROMPTS[0])
      assert back_tokenizer.chat_template == tokenizer.chat_template
    if family not in NO_TRANSFORMERS_GGUF:
      ref = reference(tmp_path, gguf_file=path.name)
      assert np.abs(torch_logits(ref, ids) - ours).max() <= GGUF_TOLERANCE[quant], quant


def test_gguf_of_a_model_readers_would_rebuild_differently_is_refused(run, tmp_path):
  workdir, *_ = run  # tiny-gemma3 has query_pre_attn_scalar 24; GGUF readers assume 256
  with pytest.raises(UserError, match="query_pre_attn_scalar=24 .* --format=hf"):
    export.export_run(workdir, tmp_path / "gguf", "gguf")
  assert not (tmp_path / "gguf").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(stage="probe"), r"--stage=probe: no checkpoint of that stage in .*; kept: align 2; refine 2"),
    (dict(stage="refine", step=7), r"--step=7: not kept for stage refine; kept steps: 2"),
    (dict(fmt="peft", stage="refine"), r"--format=peft: the refine checkpoint is a full fine-tune .* --format=hf"),
    (dict(fmt="gguf", quant="q4_k"), r"--quant=q4_k is a type the GGUF writer cannot produce; choose f32, f16, q8_0"),
])
def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, kwargs, message):
  workdir, *_ = run
  kwargs = {"fmt": "hf", **kwargs}
  with pytest.raises(UserError, match=message) as raised:
    export.export_run(workdir, tmp_path / "out", kwargs.pop("fmt"), **kwargs)
  assert "\n" not in str(raised.value) and not (tmp_path / "out").exists()


def test_no_checkpoint_and_non_empty_out_fail_from_the_command_line(run, tmp_path):
  workdir, *_ = run
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text((workdir / "config.json").read_text())
  taken = tmp_path / "taken"
  taken.mkdir()
  (taken / "keep.txt").write_text("mine")
  for args, message in (([f"--workdir={empty}", f"--out={tmp_path / 'a'}"], "no checkpoint under"),
                        ([f"--workdir={workdir}", f"--out={taken}"], "is not empty; pass --overwrite")):
    proc = subprocess.run([sys.executable, "-m", "dcr_jax.export", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "a").exists() and [p.name for p in taken.iterdir()] == ["keep.txt"]


def launch_export(workdir, out, processes, devices, port, extra=()):
  env = xla_env(devices, JAX_PLATFORMS="cpu")
  dist = [] if processes == 1 else [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}"]
  return [subprocess.Popen([sys.executable, "-m", "dcr_jax.export", f"--workdir={workdir}", f"--out={out}",
                            "--max_shard_size=200KB", *extra, *dist, *([f"--process_id={i}"] if dist else [])],
                           cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
          for i in range(processes)]


@pytest.mark.slow
def test_two_processes_write_byte_identical_shards_to_one(run, tmp_path):
  """2 processes x 4 devices (parameters sharded over both by mesh.fsdp=-1) write the same files as 1 x 8."""
  from parallel.test_multihost import free_port

  workdir, *_ = run
  outputs = {}
  for name, processes, devices in (("single", 1, 8), ("multi", 2, 4)):
    procs = launch_export(workdir, tmp_path / name, processes, devices, free_port())
    for p in procs:
      assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    outputs[name] = {p.name: p.read_bytes() for p in (tmp_path / name).iterdir() if p.suffix != ".md"}
  assert len([n for n in outputs["single"] if n.endswith(".safetensors")]) == 6
  assert outputs["multi"] == outputs["single"]


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank", [8, 0])
def test_gemma3_270m_exports_load_in_transformers(lora_rank, tmp_path):
  """The real gemma-3-270m trained 2 steps (LoRA or full): hf logits <= 1e-4 of ours and the same greedy chat
  continuations; the LoRA run's adapter on its base equals the merged export; its GGUF (tokenizer copied from the
  embedded file) reads back through our loader."""
  workdir = train(tmp_path / "run", "--config=configs/gemma.py", f"--config.align.lora_rank={lora_rank}",
                  "--config.refine.batch_size=4", "--config.align.batch_size=2")
  spec = resolve(export.run_config(workdir))
  base, tokenizer = pipeline.build_model(spec)
  spec = spec.bind(base.config)
  model = pipeline.restore_stage(spec, base, workdir, "align")
  out = export.export_run(workdir, tmp_path / "hf", "hf")
  ids = np.asarray([encode_chat(tokenizer, PROMPTS[0])[0]], np.int32)
  ours = np.asarray(model(ids))
  # float32 reassociation on logits up to ~85: 1.1e-4 (LoRA) and 1.9e-4 (full) measured; 1e-3 as for the 270m's
  # own parity with transformers (tests/weights/test_gemma3_270m.py)
  assert np.abs(torch_logits(reference(out), ids) - ours).max() <= 1e-3
  assert_same_generation(model, tokenizer, out, max_new_tokens=12)
  gguf = export.export_run(workdir, tmp_path / "gguf", "gguf") / "model-f32.gguf"
  back, back_tokenizer = load_model(str(gguf), progress=False)
  assert np.abs(np.asarray(back(ids)) - ours).max() <= 1e-3  # merged W + AB vs W x + (x A) B: 1.3e-4 measured
  assert back_tokenizer.encode(PROMPTS[0]) == tokenizer.encode(PROMPTS[0])
  if lora_rank:
    peft = pytest.importorskip("peft")
    adapter = export.export_run(workdir, tmp_path / "peft", "peft")
    adapted = peft.PeftModel.from_pretrained(reference(adapter / "base"), str(adapter)).eval()
    assert np.abs(torch_logits(adapted, ids) - ours).max() <= 1e-3
