"""A CPU-scale reproduction of the paper's Table 1 on the real gemma-3-270m (docs/reproduction.md).

    --config=configs/repro_cpu.py:dcr        stage 1 (contrastive refinement) + stage 2 (STL safety SFT) + evaluate
    --config=configs/repro_cpu.py:stl        stage 2 only (the STL baseline) + evaluate
    --config=configs/repro_cpu.py:stl-aug    stage 2 with seemingly toxic -> helpful pairs added + evaluate

All three share the stage-2 data, steps, learning rate and seed. Data come from ../shared/data, split by rows so
that no prompt is used twice:

    Safety-Tuned LLaMAs training file (2,483 harmful instruction -> safe response, shuffled upstream):
      rows    0-499   stage-1 toxic class (the paper's 500 harmful prompts)
      rows  500-1499  stage-2 harmful -> refusal pairs (the paper's 1k)
      rows 1500-2482  validation pool (toxic side; `data.n_val` of them, seeded)
    XSTest: the 250 safe prompts are the stage-1 seemingly toxic class (as in the paper), so XSTest-safe compliance is
      in-distribution for DCR; the 200 unsafe contrasts are evaluation only.
    dcr_jax built-in seemingly toxic prompts (126, written for this project, 9 XSTest-style types, grouped by type):
      even rows: STL-aug's seemingly toxic -> helpful pairs; odd rows: validation (seemingly toxic side).
    Alpaca-cleaned 2k, Alpaca-GPT4 demo and rasbt instruction data (4,099 pairs): stage-2 general data.

Hyper-parameters that the paper leaves open were chosen on the validation split only (docs/reproduction.md).
"""

from dcr_jax.config import base_config

DATA = "../shared/data"
STL_FILE = f"{DATA}/safety_tuned_llamas/training/safety_only_data_Instructions.json"
GENERAL_FILES = ("alpaca_cleaned_2k/alpaca_small.json", "alpaca_gpt4_demo/alpaca_en_demo.json",
                 "rasbt_instruction_data/instruction-data.json")
RUNS = ("dcr", "stl", "stl-aug")


def get_config(run: str = "dcr"):
  if run not in RUNS:
    raise ValueError(f"configs/repro_cpu.py:{run}: unknown run; choose one of {', '.join(RUNS)}")
  config = base_config()
  config.model.name = "gemma3-270m"
  config.stages = "refine,align,evaluate" if run == "dcr" else "align,evaluate"
  config.seed = 0

  config.data.toxic = f"{STL_FILE}@0:500"
  config.data.seemingly_toxic = f"{DATA}/xstest/xstest_prompts.csv#seemingly_toxic"
  config.data.general = ",".join(f"{DATA}/{f}" for f in GENERAL_FILES)
  config.data.harmful = f"{STL_FILE}@500:1500"
  config.data.helpful_seemingly = "builtin:seemingly_toxic@0::2"
  config.data.val_toxic = f"{STL_FILE}@1500:"
  config.data.val_seemingly_toxic = "builtin:seemingly_toxic@1::2"
  config.data.n_val = 32

  config.refine.layer = "middle"  # ℓ = 9 of 18
  config.refine.loss = "circle"
  config.refine.margin, config.refine.gamma = 0.25, 64.0
  config.refine.steps = 60
  config.refine.batch_size = 16
  config.refine.lr = 2e-5
  config.refine.warmup = 6

  config.align.steps = 64
  config.align.batch_size = 8
  config.align.max_len = 128
  config.align.lora_rank = 16
  config.align.lora_alpha = 32.0
  config.align.lr = 3e-4
  config.align.warmup = 6
  # The paper mixes 1k safety pairs into 20k general examples (~5%). Here only ~4.1k general examples exist, so one
  # epoch of all the data is 1,000 : 4,099 (~20%), the closest ratio the data allows; sampling follows it. STL-aug's
  # pairs take their share from the general data so that all three runs see the same amount of safety data.
  config.align.general_weight, config.align.safety_weight = 0.8, 0.2
  if run == "stl-aug":
    config.align.general_weight, config.align.aug_weight = 0.7, 0.1
  config.align.log_every = 4

  config.checkpoint.every = 32  # two stage-2 checkpoints to track kernels over
  config.checkpoint.keep = 4

  config.evaluate.suites = "xstest,xstest-unsafe,advbench:200,harmbench"
  config.evaluate.data_root = DATA
  config.evaluate.n = 0
  config.evaluate.max_new_tokens = 32
  config.evaluate.batch_size = 16

  config.kernels.n_per_group = 4
  config.kernels.top_k = 5
  config.kernels.params = "blocks"
  config.kernels.out_chunk = 1
  config.kernels.chunk_size = 2
  return config
