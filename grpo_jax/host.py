"""Host-side helpers of the loop: moving batches between processes and devices, decoding text.

Multi-host rule: a process holds the prompts (text, answers) of its own slice of the global batch;
its rows of any batch-sharded global array are the ones `to_host` returns, in the same order.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from grpo_jax import sharding


def to_host(x) -> np.ndarray:
  """This process's rows of a batch-sharded global array (the whole array on one host)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  mesh = x.sharding.mesh
  return np.asarray(multihost_utils.global_array_to_host_local_array(
      x, mesh, P(("data", "fsdp"))))


def to_global(tree, mesh):
  """Host-local batch slices -> global batch-sharded arrays."""
  return sharding.host_local_to_global(tree, mesh)


def decode(tokenizer, ids_NxR: np.ndarray, mask_NxR: np.ndarray) -> list[str]:
  rows = [row[m.astype(bool)].tolist() for row, m in zip(ids_NxR, mask_NxR)]
  return tokenizer.batch_decode(rows, skip_special_tokens=True)


def example(batch: dict, i: int) -> dict:
  ex = dict(batch["example"][i]) if "example" in batch else {}
  ex["answer"] = batch["answer"][i]
  return ex


