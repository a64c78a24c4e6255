"""Rewards of the built-in tasks (grpo_jax.data.builtin), registered under the tasks' names."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from grpo_jax.rewards.rules import gold_answers, numeric

_DIGIT_RE = re.compile(r"\d")


def digits_reward(prompts: Sequence[str], completions: Sequence[str],
                  examples: Sequence[Mapping[str, Any]], *, correct: float = 1.0,
                  right_digit: float = 0.5, any_digit: float = 0.1) -> list[float]:
  """Shaped reward of the `digits` task (answer: one digit).

  Shaped so that a random policy already earns different rewards within a group (GRPO needs
  spread from the first step), and each level is a step towards the next:

  ==============================================  ==============
  completion (whitespace stripped) == gold        `correct` (1.0)
  its first digit is the gold digit (extra text)  `right_digit` (0.5)
  it holds some digit, a wrong one first          `any_digit` (0.1)
  no digit at all                                 0
  ==============================================  ==============
  """
  del prompts
  out = []
  for i, (c, ex) in enumerate(zip(completions, examples)):
    golds = [g.strip() for g in gold_answers(ex, i)]
    text = c.strip()
    first = _DIGIT_RE.search(text)
    if text in golds:
      out.append(float(correct))
    elif first is not None and first.group() in golds:
      out.append(float(right_digit))
    elif first is not None:
      out.append(float(any_digit))
    else:
      out.append(0.0)
  return out


def arithmetic_reward(prompts: Sequence[str], completions: Sequence[str],
                      examples: Sequence[Mapping[str, Any]]) -> list[float]:
  """Reward of the `arithmetic` task: the numeric answer (``#### n`` / ``\\boxed{n}`` / last number)."""
  return numeric(prompts, completions, examples)
