"""Device meshes and the mapping from logical axis names to mesh axes.

Model code names *logical* axes only (``("embed", "mlp")``); this module is the one place that
decides which mesh axis each logical axis lives on. A dimension whose size does not divide the
mesh axes it maps to is replicated instead (e.g. 2 KV heads on a tensor axis of 4), and a mesh
axis is never used twice in one spec (the second use is dropped), so every spec this module
returns is valid for the array it describes.

Mesh axes:
  data:   pure data parallelism (batch split, params replicated).
  fsdp:   batch split *and* params/optimizer state sharded (ZeRO-3 style).
  tensor: Megatron-style tensor parallelism over heads / MLP / vocab.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
# Training: params are sharded over fsdp (embed dim) and tensor (heads / mlp / vocab);
# activations over (data, fsdp) on the batch dimension.
TRAIN_RULES: Mapping[str, Any] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "lora_rank": None,
}

# Sampling keeps the same layout: the rollout runs on the training mesh without a reshard.
# (Dropping FSDP for sampling, as Tunix does, would trade an all-gather per step for memory;
# keep one layout until a benchmark says otherwise.)
ROLLOUT_RULES: Mapping[str, Any] = TRAIN_RULES


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Shape of the device mesh. One axis may be -1: it takes all remaining devices."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    sizes = dataclasses.asdict(self)
    autos = [k for k, v in sizes.items() if v == -1]
    if len(autos) > 1:
      raise ValueError(f"mesh: only one axis may be -1, got {autos}")
    for k, v in sizes.items():
      if not isinstance(v, int) or (v < 1 and v != -1):
        raise ValueError(f"mesh.{k}: expected a positive int or -1, got {v!r}")

  def resolve(self, num_devices: int) -> tuple[int, int, int]:
    """Returns (data, fsdp, tensor) with -1 filled; raises if it does not tile the devices."""
    sizes = [self.data, self.fsdp, self.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(
            f"mesh: {num_devices} devices are not divisible by the fixed axes "
            f"{dict(zip(MESH_AXES, sizes))}")
      sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
      raise ValueError(
          f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {num_devices} devices")
    return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh.

  Axis types are Auto on purpose: the model names logical axes and we place params and batches
  with explicit NamedShardings at jit boundaries; inside, GSPMD propagates. Explicit axes would
  make every matmul in the model spell its output sharding.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = config.resolve(len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def _mesh_axes_of(rule: Any) -> tuple[str, ...]:
  if rule is None:
    return ()
  if isinstance(rule, str):
    return (rule,)
  return tuple(rule)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None,
                    mesh: Mesh, rules: Mapping[str, Any] = TRAIN_RULES) -> P:
  """Maps logical axis names of an array to a PartitionSpec on `mesh`.

  Args:
    logical_axes: one name (or None) per dimension.
    shape: the array's shape; a dimension not divisible by its mesh axes is replicated.
      None skips the divisibility check.
    mesh: the device mesh.
    rules: logical name -> mesh axis / tuple of mesh axes / None.
  """
  if shape is not None and len(shape) != len(logical_axes):
    raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for i, name in enumerate(logical_axes):
    if name is None:
      spec.append(None)
      continue
    if name not in rules:
      raise ValueError(f"logical axis {name!r} has no sharding rule (known: {sorted(rules)})")
    axes = tuple(a for a in _mesh_axes_of(rules[name]) if a not in used and mesh.shape.get(a, 1) > 1)
    if shape is not None:
      # Keep the longest prefix of mesh axes whose product divides the dimension.
      while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def logical_sharding(logical_axes: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh,
                     rules: Mapping[str, Any] = TRAIN_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int, rules: Mapping[str, Any] = TRAIN_RULES, *,
                   shape: Sequence[int] | None = None) -> NamedSharding:
  """Sharding of an array whose leading axis is the batch (split over the data axes).

  With `shape`, batch axes that do not divide the leading dimension are dropped (e.g. 4 prompts on
  8 devices are split 4 ways and replicated twice) instead of failing.
  """
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), shape, mesh, rules))


def batch_size_multiple(mesh: Mesh, rules: Mapping[str, Any] = TRAIN_RULES) -> int:
  """The number every global batch dimension must be divisible by on this mesh."""
  return math.prod(mesh.shape.get(a, 1) for a in _mesh_axes_of(rules["batch"]))


def shard_batch(tree: Any, mesh: Mesh, rules: Mapping[str, Any] = TRAIN_RULES) -> Any:
  """Places a pytree of global (host-identical) arrays batch-sharded on the mesh."""
  return jax.tree.map(
      lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x), rules, shape=np.shape(x))),
      tree)


def host_local_to_global(tree: Any, mesh: Mesh, rules: Mapping[str, Any] = TRAIN_RULES) -> Any:
  """Turns per-process batch slices into global arrays (multi-host safe; identity layout on one host).

  Every process passes its own slice (the same leading size on each); the global leading size is
  that times the number of processes.
  """
  n = jax.process_count()

  def to_global(x):
    shape = (np.shape(x)[0] * n,) + tuple(np.shape(x)[1:])
    return jax.make_array_from_process_local_data(
        batch_sharding(mesh, np.ndim(x), rules, shape=shape), x, shape)

  return jax.tree.map(to_global, tree)
