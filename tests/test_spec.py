"""The config resolved once: typed and frozen, lists read one way everywhere, bad values as one-line errors."""

import dataclasses
from pathlib import Path

import pytest

from dcr_jax.config import base_config
from dcr_jax.errors import UserError
from dcr_jax.model import tiny
from dcr_jax.spec import Loss, Pooling, Stage, resolve


def tiny_config(**changes):
  config = base_config()
  config.model.name, config.model.random_init = "tiny-gemma3", True
  for key, value in changes.items():
    section, _, name = key.partition("__")
    if name:
      config[section][name] = value
    else:
      config[section] = value
  return config


def test_spaced_lists_resolve_to_the_same_tuples():
  spaced = resolve(tiny_config(stages=" refine , align,evaluate ", align__lora_targets="q, v ,",
                               evaluate__suites="demo-harmful:4 , demo-over-refusal", refine__class_ratio="2, 1",
                               data__toxic="builtin:toxic@0:8 , builtin:toxic@8:16"))
  assert spaced.stages == (Stage.REFINE, Stage.ALIGN, Stage.EVALUATE)
  assert spaced.align.lora_targets == ("q", "v")
  assert spaced.evaluate.suites == (("demo-harmful", 4, None), ("demo-over-refusal", 32, None))
  assert spaced.refine.class_ratio == (2.0, 1.0)
  assert spaced.data.toxic == ("builtin:toxic@0:8", "builtin:toxic@8:16")


def test_types_and_frozen():
  spec = resolve(tiny_config(refine__layer="5, 2", refine__pooling="mean"))
  assert spec.refine.layers == (2, 5) and spec.refine.pooling is Pooling.MEAN and spec.refine.loss is Loss.CIRCLE
  assert spec.refine.loss_kwargs == {"margin": 0.25, "gamma": 64.0}
  assert resolve(tiny_config()).refine.layers == (3,)  # middle of 6
  assert spec.data.n_toxic is None and spec.evaluate.data_root is None
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.seed = 3


def test_bind_resolves_the_layer_against_the_loaded_depth():
  spec = resolve(tiny_config())
  deeper = spec.bind(tiny("gemma3", num_layers=12, layer_types=("local",) * 11 + ("global",)))
  assert deeper.refine.layers == (6,) and deeper.model.architecture.num_layers == 12
  assert spec.refine.layers == (3,)  # the original is a value, unchanged


def test_peft_export_of_a_full_fine_tune_is_refused():
  config = tiny_config(export__formats="peft")
  config.align.lora_rank = 0
  with pytest.raises(UserError, match="asks peft of a full fine-tune"):
    resolve(config)


@pytest.mark.parametrize("key, value, needle", [
    ("refine__layer", "abc", "config.refine.layer='abc'"),
    ("refine__layer", "0", "config.refine.layer='0' is out of range; use 1..6"),
    ("refine__class_ratio", "1,x", "config.refine.class_ratio='1,x' is not a list of numbers"),
    ("refine__class_ratio", "1,1,1", "needs 2 positive weights"),
    ("refine__loss", "hinge", "config.refine.loss='hinge' is unknown; choose from circle"),
    ("align__lora_targets", "q, zz", "config.align.lora_targets='q, zz' names unknown ['zz']"),
    ("align__grad_accum", 3, "config.align.grad_accum=3 must divide align.batch_size=8"),
    ("stages", "refine,bogus", "config.stages='bogus' is unknown"),
    ("stages", " , ", "config.stages=' , ' is empty"),
    ("evaluate__suites", "demo-harmful:ten", "config.evaluate.suites='demo-harmful:ten' is not NAME[:N][@START:STO"),
    ("kernels__method", "fd", "config.kernels.method='fd' is unknown"),
    ("evaluate__decode_weights", "int4", "config.evaluate.decode_weights='int4' is unknown; choose float32 or"),
    ("data__toxic", "builtin:toxic@5:2", "empty row selection"),
    ("model__dtype", "float16", "config.model.dtype='float16'"),
    ("export__formats", "hf, onnx", "config.export.formats='hf, onnx' names unknown ['onnx']"),
    ("export__quant", "q4_k", "config.export.quant='q4_k' is a type the GGUF writer cannot produce"),
])
def test_bad_values_are_one_line_errors(key, value, needle):
  with pytest.raises(UserError) as e:
    resolve(tiny_config(**{key: value}))
  assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("config_file", ["configs/gemma.py", "configs/llama.py"])
def test_the_embedded_default_runs_evaluate_on_prompts_they_never_train_or_validate_on(config_file):
  """cpu_defaults: training (stage 1 and 2), validation and the evaluated suites use disjoint built-in rows."""
  import importlib.util
  from pathlib import Path

  from dcr_jax.data.batching import load_spec_list
  from dcr_jax.evaluate.suites import load_suite

  path = Path(__file__).resolve().parents[1] / config_file
  module_spec = importlib.util.spec_from_file_location("config_under_test", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  spec = resolve(module.get_config())
  prompts = lambda specs, key: {r["prompt"] for r in load_spec_list(specs, key=key)}
  trained = set().union(*(prompts(getattr(spec.data, k), k) for k in ("toxic", "seemingly_toxic", "harmful",
                                                                         "helpful_seemingly")))
  validated = prompts(spec.data.val_toxic, "val_toxic") | prompts(spec.data.val_seemingly_toxic, "val_seemingly")
  evaluated = {r["prompt"] for name, _, rows in spec.evaluate.suites for r in load_suite(name, rows=rows)}
  assert trained and validated and len(evaluated) >= 50 and spec.baseline == "stl"
  assert not trained & validated and not trained & evaluated and not validated & evaluated


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent (only in the dev workspace)")
@pytest.mark.parametrize("choice", ["gemma3-270m/dcr", "smollm2-135m/stl-aug"])
def test_the_study_trains_validates_and_evaluates_on_disjoint_prompts(choice):
  """configs/study.py: no prompt is in two of training, validation and evaluation; XSTest is evaluation only."""
  import importlib.util

  from dcr_jax.data.batching import load_spec_list
  from dcr_jax.evaluate.suites import load_suite

  path = Path(__file__).resolve().parents[1] / "configs" / "study.py"
  module_spec = importlib.util.spec_from_file_location("study_config_under_test", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  spec = resolve(module.get_config(choice))
  label = {"toxic": "toxic", "harmful": "toxic", "val_toxic": "toxic", "general": "benign"}
  prompts = lambda key: {r["prompt"] for r in load_spec_list(getattr(spec.data, key), key=key,
                                                             label=label.get(key, "seemingly_toxic"))}
  trained = {key: prompts(key) for key in ("toxic", "seemingly_toxic", "harmful", "helpful_seemingly", "general")}
  validated = prompts("val_toxic") | prompts("val_seemingly_toxic")
  evaluated = {name: {r["prompt"] for r in load_suite(name, data_root=spec.evaluate.data_root, rows=rows)}
               for name, _, rows in spec.evaluate.suites}
  assert {name: len(p) for name, p in evaluated.items()} == {
      "xstest": 125, "demo-over-refusal-heldout": 31, "xstest-unsafe": 100, "advbench": 105, "harmbench": 80,
      "demo-harmful-heldout": 28}
  assert len(trained["toxic"]) == 500 and len(trained["harmful"]) == 999 and len(validated) == 189
  every_trained, every_evaluated = set().union(*trained.values()), set().union(*evaluated.values())
  assert not every_trained & validated and not every_trained & every_evaluated and not validated & every_evaluated
  with pytest.raises(ValueError, match="choose MODEL/METHOD"):
    module.get_config("gemma3-270m/steer")
