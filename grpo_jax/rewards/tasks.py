"""Rewards of the built-in tasks (grpo_jax.data.builtin), registered under the tasks' names."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from grpo_jax.rewards.rules import gold_answers, numeric

_DIGIT_RE = re.compile(r"\d")


def digits_reward(prompts: Sequence[str], completions: Sequence[str],
                  examples: Sequence[Mapping[str, Any]], *, right_digit: float = 0.5,
                  one_token: float = 0.5) -> list[float]:
  """Shaped reward of the `digits` task (answer: one digit, then stop).

  The sum of two independent parts, so that each response token gets its own credit and a random
  policy already earns different rewards within a group (GRPO needs spread from the first step):

  =======================================================  ==============
  the completion (whitespace stripped) starts with the gold  `right_digit` (0.5)
  the completion is a single character (the model stopped)   `one_token` (0.5)
  =======================================================  ==============

  The exact answer earns both (1.0). Rewarding any digit anywhere, as a first version did, made
  the policy collapse onto one digit token before it learned to copy the right one.
  """
  del prompts
  out = []
  for i, (c, ex) in enumerate(zip(completions, examples)):
    golds = [g.strip() for g in gold_answers(ex, i)]
    text = c.strip()
    r = right_digit if text and any(g and text[0] == g[0] for g in golds) else 0.0
    r += one_token if len(text) == 1 else 0.0
    out.append(float(r))
  return out


def arithmetic_reward(prompts: Sequence[str], completions: Sequence[str],
                      examples: Sequence[Mapping[str, Any]]) -> list[float]:
  """Reward of the `arithmetic` task: the numeric answer (``#### n`` / ``\\boxed{n}`` / last number)."""
  return numeric(prompts, completions, examples)
