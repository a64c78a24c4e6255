"""Qwen2.5-0.5B-Instruct on GSM8K: a real model loaded from a local Hugging Face folder.

Get the weights and data once, on a machine with internet (`hf` is the CLI of huggingface_hub, a
dependency of transformers; GSM8K comes as the hub's Parquet files, read by our Parquet source, so
no TensorFlow is needed):
  hf download Qwen/Qwen2.5-0.5B-Instruct --local-dir ~/models/Qwen2.5-0.5B-Instruct
  hf download openai/gsm8k --repo-type dataset --include "main/*" --local-dir ~/data/gsm8k
Then:
  python -m grpo_jax.train --config=configs/qwen2_5_0p5b_gsm8k.py \
    --config.model.path=$HOME/models/Qwen2.5-0.5B-Instruct --workdir=/tmp/qwen_gsm8k
Sized for one 80 GB GPU or a v5e-8 slice; set --config.mesh.* for more devices.
"""

import importlib.util
import os

# The default config is the base; loaded by path so this file works from any working directory.
_spec = importlib.util.spec_from_file_location(
    "grpo_default_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))
default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(default)


def get_config(arg: str | None = None):
  c = default.get_config()
  c.model.path = os.path.expanduser("~/models/Qwen2.5-0.5B-Instruct")  # local HF folder.
  c.model.dtype = "bfloat16"  # compute dtype.
  c.model.param_dtype = "float32"  # master weights and Adam moments in float32.
  c.model.remat = True  # rematerialise layers: long responses.
  c.tokenizer = ""  # "" = the model folder's own tokenizer.

  # The hub's Parquet files (see above); {split} is "train" or "test".
  c.data.source = "parquet:~/data/gsm8k/main/{split}-00000-of-00001.parquet"
  c.data.split = "train"
  c.data.eval_split = "test"
  c.data.prompt_field = "question"  # GSM8K question column.
  c.data.answer_field = "answer"  # worked solution; the `numeric` reward takes the number after '#### '.
  c.data.template = ("{prompt}\nLet's think step by step and output the final answer after "
                     "\"####\".")  # verl's GSM8K instruction.
  c.data.use_chat_template = True  # Qwen chat template from the tokenizer.
  c.data.max_prompt_len = 512  # tokens.
  c.data.length_buckets = (128, 256, 512)  # tokens.
  c.data.batch_size = 64  # prompts per step.

  c.rewards = (("numeric", 1.0, {}), ("format", 0.1, {"tags": ("####",)}))

  c.rollout.group_size = 8  # G.
  c.rollout.max_new_tokens = 512  # response budget (tokens).
  c.rollout.temperature = 1.0

  c.rl.kl_coef = 0.001  # beta (verl's GSM8K example).
  c.rl.clip_high = 0.28  # DAPO clip-higher.
  c.optim.learning_rate = 1e-6  # peak lr.
  c.optim.warmup_steps = 10
  c.optim.decay = "constant"
  c.optim.weight_decay = 0.01

  c.train.num_steps = 500
  c.train.minibatch_size = 128  # responses per optimizer step (4 per rollout batch).
  c.train.microbatch_size = 16  # responses per forward/backward.
  c.train.eval_every = 25
  c.train.eval_num_prompts = 256
  c.train.checkpoint_every = 25
  c.train.export_every = 25
  if arg:
    raise ValueError(f"configs/qwen2_5_0p5b_gsm8k.py: unknown variant {arg!r}")
  return c
