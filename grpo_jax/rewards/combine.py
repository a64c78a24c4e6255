"""Weighted sums of reward functions, by name or import path, with every call checked.

A spec is ``(name_or_path, weight, kwargs)``: a built-in name (see `REGISTRY`) or ``"pkg.mod:fn"``
(any importable function). Its kwargs are checked against its signature when the reward is built
(`check_kwargs`), so a misspelt setting stops the run before anything compiles. Each function is
called on the whole batch, ``fn(prompts, completions, examples, **kwargs) -> sequence of floats`` (one per completion), and its
raw (unweighted) output is kept as a component so that every part of the reward can be logged.

Every call is checked: a function that raises, returns the wrong number of values, or returns a
non-numeric, NaN or infinite value raises `RewardError`, which names the function and shows the
offending sample. It is raised before the caller has used any of the batch, so the caller's state
(the training loop's last checkpoint) is untouched.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from grpo_jax.rewards import rules, tasks

RewardFn = Callable[..., Sequence[float]]

# name -> function, or an import path resolved on first use (keeps heavy or circular imports lazy).
REGISTRY: dict[str, RewardFn | str] = {
    "exact_match": rules.exact_match,
    "substring_match": rules.substring_match,
    "numeric": rules.numeric,
    "format": rules.format_reward,
    "digits": tasks.digits_reward,
    "arithmetic": tasks.arithmetic_reward,
    # Search-R1 (grpo_jax/rewards/search_r1.py): the function with its settings as kwargs, and
    # the presets that reproduce its published runs.
    "search_r1": "grpo_jax.rewards.search_r1:search_r1",
    "search_r1_format": "grpo_jax.rewards.search_r1:search_r1_format",
    "search_r1_subem": "grpo_jax.rewards.search_r1:search_r1_subem",
}


class RewardError(RuntimeError):
  """A reward function failed or returned bad values; the message names it and shows the sample."""


@dataclasses.dataclass(frozen=True)
class RewardOutput:
  """Rewards of a batch of N completions.

  Attributes:
    total: float32 [N], the weighted sum of the components.
    components: name -> float32 [N], each function's raw (unweighted) rewards.
  """

  total: np.ndarray
  components: dict[str, np.ndarray]


def _short(x: Any, limit: int = 300) -> str:
  text = repr(x)
  return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _sample(prompts, completions, examples, i: int) -> str:
  return (f"sample {i}: prompt={_short(prompts[i])}, completion={_short(completions[i])}, "
          f"example={_short(examples[i])}")


def resolve(name: str) -> RewardFn:
  """The function named `name`: a `REGISTRY` name or an import path ``"pkg.mod:fn"``."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"reward name: expected a registered name or 'pkg.module:fn', got {name!r}")
  target = REGISTRY.get(name, name)
  if callable(target):
    return target
  if ":" not in target:
    raise ValueError(f"reward {name!r}: unknown name (known: {', '.join(sorted(REGISTRY))}; "
                     f"or give an import path 'pkg.module:fn')")
  module_name, _, attr = target.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ImportError(f"reward {name!r}: cannot import module {module_name!r}: {e}") from None
  fn = module
  for part in attr.split("."):
    fn = getattr(fn, part, None)
    if fn is None:
      raise AttributeError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r}")
  if not callable(fn):
    raise TypeError(f"reward {name!r}: {target} is not callable ({type(fn).__name__})")
  return fn


def _call_checked(name: str, fn: RewardFn, prompts, completions, examples) -> np.ndarray:
  n = len(completions)
  try:
    values = fn(prompts, completions, examples)
  except Exception as e:  # pylint: disable=broad-except
    # Find the first sample it fails on alone, so the error shows the culprit, not the batch.
    culprit = ""
    for i in range(n):
      try:
        fn(prompts[i:i + 1], completions[i:i + 1], examples[i:i + 1])
      except Exception:  # pylint: disable=broad-except
        culprit = "; first failing " + _sample(prompts, completions, examples, i)
        break
    raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e}{culprit}") from e
  try:
    length = len(values)
  except TypeError:
    raise RewardError(f"reward {name!r} returned {type(values).__name__}, expected a sequence of "
                      f"{n} floats; " + _sample(prompts, completions, examples, 0)) from None
  if length != n:
    raise RewardError(f"reward {name!r} returned {length} values for {n} completions; "
                      + _sample(prompts, completions, examples, 0))
  out = np.empty(n, np.float32)
  for i, v in enumerate(values):
    if isinstance(v, np.ndarray) and v.ndim == 0:
      v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
      raise RewardError(f"reward {name!r} returned the non-numeric value {_short(v)} ("
                        f"{type(v).__name__}); " + _sample(prompts, completions, examples, i))
    if not np.isfinite(float(v)):
      raise RewardError(f"reward {name!r} returned {float(v)}; "
                        + _sample(prompts, completions, examples, i))
    out[i] = v
  return out


def check_kwargs(label: str, fn: RewardFn, kwargs: Mapping[str, Any]) -> None:
  """Refuses, before any work, kwargs that `fn`'s signature cannot take (``TypeError``, one line
  naming `label` and the first bad kwarg); built-in rewards also check their values."""
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):  # no introspectable signature (a C function): nothing to check
    return
  params = sig.parameters
  positional = [n for n, p in params.items()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  accepted = [n for n, p in params.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in positional[:3]]
  if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
    for key in kwargs:
      if key not in accepted:
        raise TypeError(f"{label}: unexpected kwarg {key!r} (accepted: "
                        f"{', '.join(accepted) or 'none'})")
  try:
    sig.bind([], [], [], **kwargs)
  except TypeError as e:
    raise TypeError(f"{label}: {e}") from None
  target = fn.func if isinstance(fn, functools.partial) else fn
  if getattr(target, "__module__", "").startswith("grpo_jax.rewards"):
    try:  # Built-ins validate their settings first thing: an empty batch checks the values.
      fn([], [], [], **kwargs)
    except (TypeError, ValueError) as e:
      raise type(e)(f"{label}: {str(e).splitlines()[0]}") from None


class RewardFunction:
  """Callable ``(prompts, completions, examples) -> RewardOutput``; see `make_reward_fn`."""

  def __init__(self, parts: Sequence[tuple[str, float, RewardFn]]):
    self.parts = tuple(parts)

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(name for name, _, _ in self.parts)

  def __call__(self, prompts: Sequence[str], completions: Sequence[str],
               examples: Sequence[Mapping[str, Any]]) -> RewardOutput:
    prompts, completions, examples = list(prompts), list(completions), list(examples)
    if not len(prompts) == len(completions) == len(examples):
      raise ValueError(f"rewards: prompts, completions and examples must have one entry per "
                       f"completion, got {len(prompts)}, {len(completions)}, {len(examples)}")
    total = np.zeros(len(completions), np.float32)
    components = {}
    for name, weight, fn in self.parts:
      values = _call_checked(name, fn, prompts, completions, examples)
      components[name] = values
      total = total + np.float32(weight) * values
    return RewardOutput(total=total, components=components)


def make_reward_fn(specs: Sequence[Sequence[Any]]) -> RewardFunction:
  """Builds the weighted sum of reward functions.

  Args:
    specs: ``(name_or_path, weight)`` or ``(name_or_path, weight, kwargs)`` items; kwargs are bound
      to the function (``("format", 0.1, {"tags": ("####",)})``). A name used twice gets a ``#2``
      suffix in the components.

  Returns:
    A `RewardFunction`: ``reward_fn(prompts, completions, examples) -> RewardOutput``.

  Raises:
    ValueError / ImportError / AttributeError / TypeError naming the bad spec.
  """
  if isinstance(specs, (str, bytes)) or not isinstance(specs, Sequence) or not specs:
    raise ValueError(f"rewards: expected a non-empty list of (name, weight, kwargs), got {specs!r}")
  parts, seen = [], {}
  for i, spec in enumerate(specs):
    if not (isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) in (2, 3)):
      raise ValueError(f"rewards[{i}]: expected (name, weight[, kwargs]), got {spec!r}")
    name, weight = spec[0], spec[1]
    kwargs = dict(spec[2]) if len(spec) == 3 and spec[2] else {}
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not np.isfinite(weight):
      raise ValueError(f"rewards[{i}] ({name!r}): weight must be a finite number, got {weight!r}")
    fn = resolve(name)
    check_kwargs(f"rewards[{i}] ({name!r})", fn, kwargs)  # the signature is known: fail now
    if kwargs:
      fn = functools.partial(fn, **kwargs)
    seen[name] = seen.get(name, 0) + 1
    label = name if seen[name] == 1 else f"{name}#{seen[name]}"
    parts.append((label, float(weight), fn))
  return RewardFunction(parts)
