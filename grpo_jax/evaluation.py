"""Held-out evaluation during training: greedy accuracy and pass@k (what verl's `test_freq` and TRL's
eval give users), logged beside the training metrics.

A response counts as correct when its total reward reaches `train.eval_success_reward` (full credit
by default). pass@k is the share of prompts with at least one correct response among k samples drawn
at the rollout temperature.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any

import jax
import numpy as np

from grpo_jax import host
from grpo_jax import sharding
from grpo_jax.config import RunConfig


@functools.lru_cache(maxsize=4)
def _eval_batches(data_config, tokenizer, num_prompts: int, process_index: int,
                  process_count: int):
  """The first `num_prompts` held-out prompts, in a fixed order (same every evaluation)."""
  from grpo_jax import data as data_lib
  ds = data_lib.make_dataset(data_lib.eval_config(data_config), tokenizer, process_index=process_index,
                             process_count=process_count, drop_remainder=True)
  per_batch = data_config.batch_size
  return list(itertools.islice(iter(ds), max(num_prompts // per_batch, 1)))


def evaluate(steps, params: Any, run: RunConfig, tokenizer, reward_fn, mesh, key) -> dict[str, float]:
  """Greedy and pass@k evaluation on `run.train.eval_num_prompts` held-out prompts."""
  batches = _eval_batches(run.data, tokenizer, run.train.eval_num_prompts,
                          jax.process_index(), jax.process_count())
  k = run.train.eval_pass_k
  # Greedy rows of a prompt are identical: sample the fewest copies the mesh can split and keep one.
  multiple = sharding.batch_size_multiple(mesh)
  copies = multiple // math.gcd(run.data.batch_size // jax.process_count() * jax.process_count(),
                                multiple)
  greedy = functools.partial(steps.sample, group_size=copies, temperature=0.0)
  sampled = functools.partial(steps.sample, group_size=k)
  threshold = run.train.eval_success_reward
  greedy_rewards, greedy_correct, passk = [], [], []
  for i, batch in enumerate(batches):
    prompt_ids, prompt_mask = host.to_global((batch["prompt_ids"], batch["prompt_mask"]), mesh)
    examples = [host.example(batch, j) for j in range(len(batch["prompt_text"]))]
    prompts = list(batch["prompt_text"])

    out = greedy(params, prompt_ids, prompt_mask, jax.random.fold_in(key, 2 * i))
    texts = getattr(out, "texts", None) or host.decode(tokenizer, host.to_host(out.tokens),
                                                       host.to_host(out.mask))
    texts = list(texts)[::copies]
    r = np.asarray(reward_fn(prompts, texts, examples).total, np.float32)
    greedy_rewards.append(r)
    greedy_correct.append(r >= threshold)

    out = sampled(params, prompt_ids, prompt_mask, jax.random.fold_in(key, 2 * i + 1))
    texts = getattr(out, "texts", None) or host.decode(tokenizer, host.to_host(out.tokens),
                                                       host.to_host(out.mask))
    rep = lambda xs: [x for x in xs for _ in range(k)]
    r = np.asarray(reward_fn(rep(prompts), texts, rep(examples)).total, np.float32)
    passk.append((r.reshape(-1, k) >= threshold).any(axis=1))

  local = np.array([np.concatenate(greedy_rewards).sum(), np.concatenate(greedy_correct).sum(),
                    np.concatenate(passk).sum(), np.concatenate(passk).size], np.float64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    local = np.asarray(multihost_utils.process_allgather(local)).sum(axis=0)
  total, correct, passed, n = local
  return {"eval/greedy_mean_reward": total / n, "eval/greedy_accuracy": correct / n,
          f"eval/pass@{k}": passed / n, "eval/num_prompts": n}
