"""Rewards: rule-based verifiable rewards and weighted sums of reward functions.

Public API:
  normalize_answer, extract_tag, extract_number, parse_number, gold_answers   (rules.py)
  exact_match, substring_match, numeric, format_reward                         (rules.py)
  digits_reward, arithmetic_reward                       (tasks.py: the built-in tasks' rewards)
  make_reward_fn, RewardOutput, RewardError, RewardFunction, REGISTRY          (combine.py)
"""

from grpo_jax.rewards.rules import (exact_match, extract_number, extract_tag, format_reward,
                                    gold_answers, normalize_answer, numeric, parse_number,
                                    substring_match)
from grpo_jax.rewards.tasks import arithmetic_reward, digits_reward
from grpo_jax.rewards.combine import (REGISTRY, RewardError, RewardFunction, RewardOutput,
                                      make_reward_fn, resolve)

__all__ = [
    "REGISTRY", "RewardError", "RewardFunction", "RewardOutput", "arithmetic_reward",
    "digits_reward", "exact_match", "extract_number", "extract_tag", "format_reward",
    "gold_answers", "make_reward_fn", "normalize_answer", "numeric", "parse_number", "resolve",
    "substring_match",
]
