"""GRPO improves a real pretrained model: SmolLM2-135M-Instruct on the built-in `addition` task.

A short version of `configs/smollm2_addition.py` (variant `short`), run in-process through
`grpo_jax.train.run`. The full run, its curve and the base model's numbers: README.md and
BENCHMARKS.md, "Real-model learning" (`python bench/real_learning.py`).
"""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from grpo_jax import train
from grpo_jax.config import load_config, resolve

try:  # The project's builder of the cached model folder (grpo_jax/testing/real_model.py).
  from grpo_jax.testing.real_model import smollm2_dir as _smollm2_dir
except ImportError:  # Not merged yet: the folder the lead built, or $GRPO_JAX_SMOLLM2.
  _smollm2_dir = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = f"{ROOT}/configs/smollm2_addition.py"


@pytest.fixture(scope="module")
def model_dir():
  """The SmolLM2-135M-Instruct HF folder: $GRPO_JAX_SMOLLM2, else built (once, cached) by
  `grpo_jax.testing.real_model.smollm2_dir`, else the cache path where the lead built it."""
  path = os.environ.get("GRPO_JAX_SMOLLM2")
  if not path and _smollm2_dir is not None:
    path = _smollm2_dir()
  path = path or os.path.join(os.path.expanduser("~"), ".cache", "grpo_jax", "SmolLM2-135M-Instruct")
  if not os.path.isfile(os.path.join(path, "model.safetensors")):
    pytest.skip(f"no SmolLM2-135M-Instruct folder at {path}")
  return path


def run_short(workdir, *overrides, arg="short"):
  """The config's variant `arg` with overrides, on ONE device; returns the metrics rows.

  One device, not the 8 the test session has: data parallelism would replicate the 135M
  parameters and their AdamW state (1.6 GB) on each of the 8 host devices.
  """
  devices = jax.devices()[:1]
  cfg = resolve(load_config(f"{CONFIG}:{arg}", *overrides), num_devices=len(devices))
  train.preflight(cfg, str(workdir))
  train.run(cfg, str(workdir), devices=devices)
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.mark.slow
def test_grpo_improves_smollm2_on_addition(tmp_path, model_dir):
  """Six GRPO steps (4 prompts x G = 8, 12 new tokens, full fine-tuning at lr 5e-5) raise the
  training reward and the held-out sampled accuracy of the real model, and teach it to stop, by
  far more than noise.

  Measured (2026-11-29, 2 shared CPU cores, 1 device), same code and prompts; "gain" = mean reward
  of steps 4-6 minus that of steps 1-2, "cut drop" = the same difference (steps 1-2 minus 4-6) of
  the share of responses cut at the budget, pass@1 = held-out accuracy at T = 1 on the first 32
  test prompts:
    seed 0:                          rewards 0.12 0.25 0.31 0.53 0.44 0.66, gain +0.36, cut drop
                                     +0.37, pass@1 0.53, greedy accuracy 0.75
    seed 1:                          rewards 0.06 0.31 0.28 0.66 0.44 0.25, gain +0.26, cut drop
                                     +0.53, pass@1 0.41, greedy accuracy 0.41
    seed 2:                          rewards 0.06 0.09 0.28 0.31 0.28 0.47, gain +0.28, cut drop
                                     +0.27, pass@1 0.44, greedy accuracy 0.69
    learning off (lr 1e-12, seed 0): rewards 0.12 0.25 0.12 0.00 0.22 0.12, gain -0.07, cut drop
                                     -0.11, pass@1 0.12, greedy accuracy 0.44 (the base model's)
    merged main, CI (seed 0, shared-prefix update): rewards 0.06 0.22 0.31 0.22 0.56 0.63, gain
                                     +0.33, cut drop -0.19, pass@1 0.59, greedy accuracy 0.62
  Whether it learns to stop within 6 steps is not stable (the CI run learned the answer but ran
  on past it), so the cut share is reported, not asserted. The learning-off run fails every
  assertion below. Greedy accuracy is NOT asserted: after 6
  small steps it rose for seeds 0 and 2 and not for seed 1. (The thresholds were set after these runs.)
  ~25 min on 2 cores shared with 5 other jobs, ~8 min on a quieter machine.
  """
  rows = run_short(tmp_path, f"--config.model.path={model_dir}")
  rewards = [r["reward/mean"] for r in rows]
  cut = [r["response/truncated_frac"] for r in rows]
  assert len(rewards) == 6, rewards
  gain = np.mean(rewards[3:]) - np.mean(rewards[:2])
  assert gain >= 0.12, (
      f"GRPO no longer improves SmolLM2 on addition: rewards by step {rewards}; see README.md "
      f"'Real-model learning' for the expected curve")
  print("share of responses cut at the budget by step:", cut)
  assert rows[-1]["eval/pass@1"] >= 0.3, rows[-1]  # held-out accuracy at T = 1; the base: 0.12


def _bench():
  spec = importlib.util.spec_from_file_location("real_learning",
                                                os.path.join(ROOT, "bench", "real_learning.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_lora_peft_export_of_a_real_run_loads_in_peft(tmp_path, model_dir):
  """LoRA on the real model through the trainer (2 steps, r=16 on every projection), then its
  `train.final_export=peft` adapters loaded by `peft.PeftModel` over the same base folder with
  transformers: the same logits as our merged model (measured 2026-11-29: max |logit
  difference| 3.5e-6 of the max |logit|, while the 2 steps moved the logits by 6.3e-3 of it).
  ~18 min on 2 busy shared cores (start-up and compiles dominate)."""
  pytest.importorskip("peft")
  run_short(tmp_path, f"--config.model.path={model_dir}", "--config.train.num_steps=2",
            "--config.train.eval_every=0", arg="lora,short")
  diff, moved = _bench().peft_parity(model_dir, str(tmp_path / "peft_export"))
  assert moved > 1e-3, f"the adapters did not move the logits ({moved:.1e}): B stayed ~0?"
  assert diff <= 1e-4, f"peft over the base gives other logits than our merged model ({diff:.1e})"


def test_addition_task_gold_is_right_and_splits_are_disjoint_pairs(tmp_path):
  """The `addition` task: every gold is the sum, the numeric reward accepts it, and no unordered
  pair {a, b} is in both splits (a test sum is never trained on with its operands swapped)."""
  import re
  from grpo_jax import data
  from grpo_jax.rewards import numeric
  cfg = data.DataConfig(source="builtin:addition", data_dir=str(tmp_path), max_prompt_len=64,
                        length_buckets=(64,))
  train_src, test_src = data.open_source(cfg, "train"), data.open_source(cfg, "test")
  assert (len(train_src), len(test_src)) == (321, 79)
  pairs = {}
  for split, src in (("train", train_src), ("test", test_src)):
    for r in src.get_many(range(len(src))):
      a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\? Answer with the number only\.",
                                   r["prompt"]).groups())
      assert r["answer"] == str(a + b) and 0 <= a <= 19 and 0 <= b <= 19
      assert numeric([""], [f"{a} + {b} = {a + b}."], [r]) == [1.0]
      assert numeric([""], [f"{a + b + 1}"], [r]) == [0.0]
      pairs.setdefault(frozenset((a, b)), set()).add(split)
  assert len(pairs) == 210 and all(len(s) == 1 for s in pairs.values())
