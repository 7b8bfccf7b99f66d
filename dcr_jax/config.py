"""The pipeline's config schema (ml_collections) and its defaults; `dcr_jax.spec` resolves it into a typed, frozen
spec with every check."""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Every key the pipeline reads, with defaults; configs/*.py start from this and override."""
  c = ml_collections.ConfigDict()
  c.stages = "refine,align,evaluate"
  c.seed = 0
  # "stl": after the stages, also train stage 2 from the base weights (the STL baseline, same stage-2 data and
  # settings) and evaluate it, in DIR/baseline-stl, reported beside this run; only when stages has refine, align
  # and evaluate.
  c.baseline = ""

  c.model = ml_collections.ConfigDict()
  c.model.name = "gemma3-270m"  # a variant name (see dcr_jax.model.VARIANTS) or "tiny-<family>"
  c.model.weights = ""  # "" = embedded weights of the variant; else an HF directory or .gguf file
  c.model.tokenizer = ""  # "" = from the weights; else an HF tokenizer directory
  c.model.chat_template = ""  # "" = the tokenizer's own; else a Jinja chat template (string) or a file holding one
  c.model.dtype = "float32"
  c.model.random_init = False  # random weights of the named shape (tests, planning)
  c.model.remat = "none"  # none | full | dots: recompute block activations in the backward pass
  c.model.scan_layers = False  # stack the blocks' params and run them with jax.lax.scan (compile time at 7B+)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.constrain_activations = False

  c.data = ml_collections.ConfigDict()
  # Each is a comma-separated list of `builtin:NAME`, local files or `hf:ID[:CONFIG][:SPLIT]`, each optionally
  # narrowed to the rows the file labels LABEL (`#LABEL`) and to a slice of rows (`@START:STOP[:STEP]`); see README.
  c.data.toxic = "builtin:toxic"  # stage 1 toxic class
  c.data.seemingly_toxic = "builtin:seemingly_toxic"  # stage 1 seemingly toxic class
  c.data.benign_class = ""  # optional third stage-1 class
  c.data.general = "builtin:benign"  # stage 2 instruction -> response
  c.data.harmful = "builtin:toxic"  # stage 2 harmful prompts, paired with refusals
  c.data.refusals = "builtin:refusals"  # refusal texts for harmful prompts that carry none
  c.data.helpful_seemingly = "builtin:seemingly_toxic"  # STL-aug: seemingly toxic -> helpful answer
  c.data.n_toxic = 0  # 0 = all; else a seeded subsample
  c.data.n_seemingly_toxic = 0
  c.data.n_general = 0
  c.data.n_harmful = 0
  # Validation prompts (held out from training): each saved checkpoint logs their mean refusal probability.
  c.data.val_toxic = ""
  c.data.val_seemingly_toxic = ""
  c.data.n_val = 64  # seeded subsample of each validation set; 0 = all

  c.refine = ml_collections.ConfigDict()
  c.refine.layer = "middle"  # "middle", "9" or a list "6,9"; ℓ counts blocks from the embedding (ℓ = 0)
  c.refine.pooling = "last"  # last prompt token (emits the first response token) | mean
  c.refine.loss = "circle"  # circle | supcon | infonce | triplet
  c.refine.margin = 0.25
  c.refine.gamma = 64.0
  c.refine.temperature = 0.1
  c.refine.steps = 40
  c.refine.batch_size = 16
  c.refine.class_ratio = "1,1"  # toxic, seemingly_toxic[, benign]
  c.refine.max_len = 64
  c.refine.lr = 2e-5
  c.refine.warmup = 4
  c.refine.weight_decay = 0.0
  c.refine.clip = 1.0
  c.refine.lm_weight = 0.0  # λ of the optional LM-retention term on data.general
  c.refine.lm_batch_size = 4
  c.refine.l2sp = 0.0  # λ of the L2-SP term λ·Σ‖θ−θ₀‖² pulling the trained params toward the stage's start
  c.refine.patience = 0  # stop when the contrastive loss has not improved for this many logged steps; 0 = off
  c.refine.min_delta = 0.0  # an improvement must lower the best logged contrastive loss by more than this
  c.refine.holdout = 0.2  # fraction held out for the linear probe
  c.refine.probe = True
  c.refine.log_every = 5

  c.align = ml_collections.ConfigDict()
  c.align.steps = 30
  c.align.batch_size = 8
  c.align.grad_accum = 1
  c.align.max_len = 128
  c.align.pack = True
  c.align.lora_rank = 8  # 0 = full fine-tuning
  c.align.lora_alpha = 16.0
  c.align.lora_targets = "q,k,v,o,gate,up,down"
  c.align.lr = 2e-4
  c.align.warmup = 3
  c.align.weight_decay = 0.0
  c.align.clip = 1.0
  c.align.general_weight = 0.9
  c.align.safety_weight = 0.1
  c.align.aug_weight = 0.0  # > 0: the STL-aug baseline (seemingly toxic -> helpful pairs)
  c.align.log_every = 5

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 10
  c.checkpoint.keep = 2

  c.evaluate = ml_collections.ConfigDict()
  # NAME[:N][@START:STOP[:STEP]] entries: names from dcr_jax.evaluate.suites (README table), N prompts (default
  # evaluate.n), a slice of the suite's prompts taken first
  c.evaluate.suites = "demo-over-refusal,demo-harmful"
  c.evaluate.data_root = ""  # folder with the suites' upstream files (e.g. ../shared/data); "" = HF ids
  c.evaluate.n = 32  # prompts per suite (seeded subsample); 0 = all
  c.evaluate.max_new_tokens = 48
  c.evaluate.batch_size = 16
  c.evaluate.bucket = 32  # prompt lengths are padded to a multiple of this (few compilations)
  c.evaluate.temperature = 0.0  # 0 = greedy, as in the paper
  c.evaluate.top_p = 1.0
  c.evaluate.decode_weights = "float32"  # float32 | bfloat16: weight matrices as generation reads them
  c.evaluate.judge = "keyword"  # keyword | openai:<base_url>:<model>
  c.evaluate.refusal_prob = True
  # General capability (opt-in): mmlu,arc_easy,arc_challenge,openbookqa,piqa,truthfulqa_mc1, scored as
  # lm-evaluation-harness scores them, from evaluate.capability_root ("" = <evaluate.data_root>/capability when
  # data_root is set, else ../shared/data/capability beside the project).
  c.evaluate.capability = ""
  c.evaluate.capability_n = 100  # questions per task (seeded subsample); 0 = all
  c.evaluate.capability_root = ""

  c.steer = ml_collections.ConfigDict()  # training-free baselines: --config.stages=steer,evaluate (README)
  c.steer.method = "refusal_direction"  # refusal_direction | surgical | scans | self_cd
  c.steer.n_train = 32  # prompts per class the directions are estimated from (0 = all left after validation)
  c.steer.n_val = 16  # validation prompts per class, carved from the same training data first
  c.steer.layers = ""  # candidate layers ℓ (after ℓ blocks), e.g. "3,6"; "" = every layer below the last 20%
  c.steer.positions = 0  # post-instruction template positions searched; 0 = all of them
  c.steer.max_kl = 0.0  # candidate filter on harmless KL; 0 = the method's (refusal_direction 0.1, surgical 0.2)
  c.steer.coefs = ""  # coefficient grid (refusal_direction c, scans α, self_cd α); "" = the method's default
  c.steer.keep_harmful = 0.9  # a coefficient must keep harmful validation p(refusal) >= this x its unsteered value
  c.steer.strength = 1.0  # surgical: λ of the orthogonalisation against the refusal direction (1 = fully)
  c.steer.add_coef = 0.0  # surgical: c of the refusal direction added at its layer (0 = none)
  c.steer.affirmative = "Sure, here is"  # scans: the affirmative opening of the hidden-state transition
  c.steer.system_prompt = ("You are a helpful, safe assistant. Refuse any request that could cause harm, and "
                           "answer every harmless request.")  # self_cd: the safety system prompt (placed before
  # the user's message in the same turn, as Gemma's template places a system message)
  c.steer.batch_size = 16

  c.export = ml_collections.ConfigDict()  # the aligned model out at the end of a run: DIR/export/<format>/
  c.export.formats = ""  # comma list of hf, peft (LoRA runs), gguf; "" = none (python -m dcr_jax.export does it later)
  c.export.dtype = "float32"  # hf / peft: float32 | bfloat16 | float16
  c.export.quant = "f32"  # gguf: f32 | f16 | q8_0
  c.export.max_shard_size = "5GB"  # hf safetensors shards, as transformers splits them
  # a .npy direction [D] the exported weights are orthogonalised against (embedding, o_proj, down_proj: the weight
  # form of ablating it everywhere; a tied head changes too), e.g. DIR/steer/false_refusal.npy; "" = none
  c.export.ablate_direction = ""

  c.kernels = ml_collections.ConfigDict()  # python -m dcr_jax.kernels
  c.kernels.n_per_group = 4  # prompts per group (seemingly toxic, toxic, general)
  c.kernels.top_k = 10  # |S|: top-k tokens of the base model's first-token distribution
  c.kernels.params = "all"  # all | up_to_layer | lora | last_n | blocks (no embedding)
  c.kernels.layer = 9  # for up_to_layer
  c.kernels.last_n = 2  # for last_n
  c.kernels.method = "jvp_vjp"  # jvp_vjp | jacobian | structured (per-layer factors, no parameter-length rows)
  c.kernels.chunk_size = 4
  c.kernels.out_chunk = 0  # tokens of S per chunk (0 = all); 1 holds one parameter-sized row per prompt at a time
  c.kernels.max_len = 64

  c.distributed = ml_collections.ConfigDict()  # multi-process runs; a TPU pod is detected by itself
  c.distributed.coordinator_address = ""  # host:port of process 0
  c.distributed.num_processes = 1
  c.distributed.process_id = 0
  c.distributed.heartbeat_timeout = 100  # seconds before a lost process fails the run on every host

  c.demo = ml_collections.ConfigDict()
  c.demo.prompts = ("How do I kill a Python process?", "What is the capital of France?",
                    "Write a short poem about the sea.")
  c.demo.max_new_tokens = 32
  return c


def cpu_defaults(config):
  """`config` as the embedded models' default run: stage 1 and 2 train on half of each built-in set, a quarter
  validates (each saved checkpoint's refusal probability), and the other quarter, never trained on, is what the run
  evaluates, beside the STL baseline trained on the same stage-2 data."""
  for key, name in (("toxic", "toxic"), ("seemingly_toxic", "seemingly_toxic"), ("harmful", "toxic"),
                    ("helpful_seemingly", "seemingly_toxic")):
    config.data[key] = f"builtin:{name}@0::2"
  config.data.val_toxic, config.data.val_seemingly_toxic = "builtin:toxic@1::4", "builtin:seemingly_toxic@1::4"
  config.evaluate.suites = "demo-over-refusal-heldout,demo-harmful-heldout"  # rows 3::4
  config.baseline = "stl"
  return config


def tpu_defaults(config, refine_batch: int, align_batch: int, max_len: int, lora_rank: int):
  """`config` with a TPU-sized run: bf16, remat, FSDP over every device, scanned layers, the given batches (the
  TPU variants of configs/gemma.py, llama.py and qwen.py)."""
  config.model.dtype = "bfloat16"
  config.model.remat = "full"
  config.model.scan_layers = True
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
  config.mesh.constrain_activations = True  # else the partitioner may gather the batch for the vocab matmul
  config.refine.batch_size, config.refine.max_len, config.refine.steps = refine_batch, 128, 200
  config.align.batch_size, config.align.max_len, config.align.steps = align_batch, max_len, 1000
  config.align.lora_rank = lora_rank
  config.align.lr = 2e-4 if lora_rank else 2e-5
  config.checkpoint.every, config.checkpoint.keep = 100, 3
  config.evaluate.n = 0
  config.evaluate.batch_size = 64
  config.evaluate.max_new_tokens = 128
  return config
