"""Qwen2.5-7B-Instruct on GSM8K with LoRA: adapters only are trained and checkpointed; the reference
policy is the base with adapters off (no second copy of 7B weights).

Weights and data as in configs/qwen2_5_0p5b_gsm8k.py (download Qwen/Qwen2.5-7B-Instruct instead).
Memory (BENCHMARKS.md, "## LoRA"): params + AdamW state ~15 GiB in bf16 at r=16 against ~71 GiB
for full fine-tuning with a reference copy; sized for one 80 GB GPU or a v5e-8 slice (fsdp).
  python -m grpo_jax.train --config=configs/qwen2_5_7b_lora_gsm8k.py --workdir=/tmp/qwen7b_lora \
    --config.model.path=$HOME/models/Qwen2.5-7B-Instruct
At the end, train.final_export="peft" writes adapters that peft.PeftModel.from_pretrained loads.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "grpo_gsm8k_config",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen2_5_0p5b_gsm8k.py"))
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)


def get_config(arg: str | None = None):
  c = base.get_config()
  c.model.path = os.path.expanduser("~/models/Qwen2.5-7B-Instruct")  # local HF folder.
  c.model.param_dtype = "bfloat16"  # frozen base in bf16; adapters are kept in float32.
  c.lora.rank = 32  # adapter rank r.
  c.lora.alpha = 64.0  # scale alpha / r = 2.
  c.lora.dropout = 0.0  # no adapter dropout (deterministic forward).
  c.lora.target_modules = ("all-linear",)  # q/k/v/o and the three MLP projections.
  c.optim.learning_rate = 1e-5  # LoRA wants ~10x the full fine-tuning lr.
  c.rl.kl_coef = 0.001  # beta; the reference is the base with adapters off.
  c.train.microbatch_size = 8  # responses per forward/backward.
  c.mesh.data = 1  # shard the frozen base over every device.
  c.mesh.fsdp = -1
  c.train.final_export = "peft"  # adapters in PEFT format at the end.
  if arg:
    raise ValueError(f"configs/qwen2_5_7b_lora_gsm8k.py: unknown variant {arg!r}")
  return c
