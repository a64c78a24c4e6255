"""GRPO improves a real pretrained model: SmolLM2-135M-Instruct on the built-in `addition` task.

A short version of `configs/smollm2_addition.py` (variant `short`), run in-process through
`grpo_jax.train.run`. The full run, its curve and the base model's numbers: README.md and
BENCHMARKS.md, "Real-model learning" (`python bench/real_learning.py`).
"""

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


def run_short(workdir, *overrides):
  """The `short` variant with overrides; returns the metrics rows."""
  devices = jax.devices()
  cfg = resolve(load_config(CONFIG + ":short", *overrides), num_devices=len(devices))
  train.preflight(cfg, str(workdir))
  train.run(cfg, str(workdir), devices=devices)
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


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
