"""The reproduction study (docs/reproduction.md, run by docs/reproduce.sh): STL, STL-aug and DCR on the embedded
gemma-3-270m and SmolLM2-135M-Instruct, with every setting chosen on a validation split and every evaluation suite
held out from training and validation alike.

    --config=configs/study.py:MODEL/METHOD    MODEL: gemma3-270m | smollm2-135m; METHOD: stl | stl-aug | dcr

Data come from ../shared/data and the built-in sets, split by rows so that no prompt is used twice:

  Safety-Tuned LLaMAs training file (2,483 harmful instruction -> safe response):
    rows 0-499 stage-1 toxic class; rows 500-1499 stage-2 harmful -> refusal pairs; rows 1500-1531 validation.
  CoCoNot contrast preferences (927 benign prompts that look harmful, each with a compliant answer):
    even rows: stage-1 seemingly toxic class, and STL-aug's seemingly toxic -> helpful pairs; rows 1, 3, .., 63:
    validation. So XSTest, the paper's stage-1 set, stays out of training for every method.
  OKTest's held-out file (50): rows 0-31 validation.
  AdvBench (520): rows 0-31 validation; rows 100, 104, .., 516 evaluation.
  Built-in sets: rows 1::4 validation, rows 3::4 evaluation (demo-*-heldout).
  Evaluation, never trained or validated on: XSTest (even rows of the 250 safe and of the 200 unsafe prompts),
  AdvBench (above), HarmBench's 80 val behaviours, the built-in held-out quarters.
  Stage-2 general data: Alpaca-cleaned 2k, Alpaca-GPT4 demo, rasbt instruction data (4,099 pairs).

Stage 2 draws general : safety examples as 1 : align.safety_weight (share w / (1 + w)); STL-aug adds CoCoNot pairs at
align.aug_weight. Which w, and which stage-1 length, is what docs/reproduce.sh sweeps on validation.
"""

from dcr_jax.config import base_config

DATA = "../shared/data"
STL_FILE = f"{DATA}/safety_tuned_llamas/training/safety_only_data_Instructions.json"
COCONOT = f"{DATA}/coconot/coconot_pref.jsonl"
GENERAL_FILES = ("alpaca_cleaned_2k/alpaca_small.json", "alpaca_gpt4_demo/alpaca_en_demo.json",
                 "rasbt_instruction_data/instruction-data.json")
MODELS = ("gemma3-270m", "smollm2-135m")
METHODS = ("stl", "stl-aug", "dcr")
EVALUATION_SUITES = ("xstest:0@::2,demo-over-refusal-heldout:0,"
                     "xstest-unsafe:0@::2,advbench:0@100::4,harmbench:0,demo-harmful-heldout:0")


def get_config(choice: str = "gemma3-270m/dcr"):
  model, _, method = choice.partition("/")
  if model not in MODELS or method not in METHODS:
    raise ValueError(f"configs/study.py:{choice}: choose MODEL/METHOD with MODEL in {', '.join(MODELS)} and METHOD "
                     f"in {', '.join(METHODS)}, e.g. configs/study.py:gemma3-270m/dcr")
  config = base_config()
  config.model.name = model
  config.stages = "refine,align,evaluate" if method == "dcr" else "align,evaluate"
  config.seed = 0

  config.data.toxic = f"{STL_FILE}@0:500"
  config.data.seemingly_toxic = f"{COCONOT}@0::2"
  config.data.general = ",".join(f"{DATA}/{f}" for f in GENERAL_FILES)
  config.data.harmful = f"{STL_FILE}@500:1500"
  config.data.helpful_seemingly = f"{COCONOT}@0::2"
  config.data.val_toxic = f"{STL_FILE}@1500:1532,{DATA}/advbench/harmful_behaviors.csv@0:32,builtin:toxic@1::4"
  config.data.val_seemingly_toxic = f"{COCONOT}@1:64:2,{DATA}/oktest/OKTest_heldout.csv@0:32,builtin:seemingly_toxic@1::4"
  config.data.n_val = 0

  config.refine.layer = "middle"
  config.refine.steps = 10
  config.refine.batch_size = 16
  config.refine.lr = 2e-5
  config.refine.warmup = 2

  # 32 steps x 8 packed rows of 128 tokens. lr 3e-4 and LoRA r = 16 are the first reproduction's (commit 0693a2e),
  # where 3e-4 beat 1e-4 on that run's validation margin (STL, same stage-2 data); its result files were not kept.
  config.align.steps = 32
  config.align.batch_size = 8
  config.align.max_len = 128
  config.align.lr = 3e-4
  config.align.warmup = 3
  config.align.lora_rank, config.align.lora_alpha = 16, 32.0
  config.align.general_weight, config.align.safety_weight = 1.0, 0.25
  config.align.aug_weight = 0.1 if method == "stl-aug" else 0.0
  config.align.log_every = 5

  config.checkpoint.every = 16
  config.checkpoint.keep = 2

  config.evaluate.suites = EVALUATION_SUITES
  config.evaluate.data_root = DATA
  config.evaluate.max_new_tokens = 32
  config.evaluate.batch_size = 16
  return config
