"""Group expansion and group ids: B prompts -> B*G responses, G per prompt.

GRPO samples G responses per prompt. The rollout batch is laid out *interleaved*: the G copies of
prompt b sit at rows b*G .. b*G+G-1 (a a a b b b), which is what `jnp.repeat` gives and what
verl's `DataProto.repeat(interleave=True)` and TRL's `RepeatSampler` produce. Group ids are
then `repeat(arange(B), G)`; every estimator in `advantages.py` also accepts ids in any order.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _check_static_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise TypeError(f"{name}: expected a Python int (static), got {type(value).__name__} {value!r}")
  if value < minimum:
    raise ValueError(f"{name}: expected >= {minimum}, got {value}")
  return value


def expand_groups(tree: Any, group_size: int) -> Any:
  """Repeats every leaf of `tree` `group_size` times along axis 0, interleaved (a a a b b b).

  Args:
    tree: a pytree of arrays whose leading axis is the prompt batch [B, ...].
    group_size: G, responses per prompt (a static Python int >= 1).

  Returns:
    The same pytree with every leaf of shape [B*G, ...]; row b*G + j is a copy of row b.
  """
  _check_static_int("group_size", group_size, 1)

  def repeat(x):
    if jnp.ndim(x) == 0:
      raise ValueError(f"tree: every leaf needs a leading batch axis, got a scalar {x!r}")
    return jnp.repeat(x, group_size, axis=0, total_repeat_length=x.shape[0] * group_size)

  return jax.tree.map(repeat, tree)


def group_ids(num_prompts: int, group_size: int, offset: int = 0) -> jax.Array:
  """Group id of every response of an interleaved batch: int32 [num_prompts * group_size].

  Args:
    num_prompts: B, prompts in this (host's) batch.
    group_size: G, responses per prompt.
    offset: added to every id; on host h of a multi-host run pass `h * num_prompts` so that ids
      stay unique across hosts once the host batches are joined into one global array.

  Returns:
    `[offset]*G + [offset+1]*G + ...`, int32.
  """
  _check_static_int("num_prompts", num_prompts, 0)
  _check_static_int("group_size", group_size, 1)
  _check_static_int("offset", offset, 0)
  if offset + num_prompts > jnp.iinfo(jnp.int32).max:
    raise ValueError(f"offset: ids up to {offset + num_prompts} do not fit in int32")
  ids = jnp.arange(num_prompts, dtype=jnp.int32) + jnp.int32(offset)
  return jnp.repeat(ids, group_size, total_repeat_length=num_prompts * group_size)
