"""Orbax checkpoints of a run: the whole train state, the data iterator state, and the config.

Layout: `<workdir>/checkpoints/<step>/{state, data, meta}`. Orbax writes each checkpoint into a
temporary directory and renames it into place only once every item (and, with several hosts, every
process) has finished, so a run killed at any moment - including mid-save - leaves only complete
checkpoints behind, and `latest_step()` never names a half-written one.

`meta` holds the resolved config and the shape of every parameter; a restore first compares them
with the current run and refuses a mismatch with one clear line, instead of failing deep in Orbax.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from grpo_jax.config import ConfigError


def _shapes(tree: Any) -> dict[str, list[int]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): list(np.shape(leaf)) for path, leaf in flat}


def config_to_json(config: Any) -> dict:
  """A JSON-able view of a (nested) frozen dataclass config."""
  def convert(x):
    if dataclasses.is_dataclass(x):
      return {f.name: convert(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, (list, tuple)):
      return [convert(v) for v in x]
    if isinstance(x, dict):
      return {str(k): convert(v) for k, v in x.items()}
    return x
  return convert(config)


class Checkpointer:
  """Saves and restores (train state, data iterator state, meta) with an Orbax CheckpointManager.

  Args:
    directory: where checkpoints live (created if absent).
    save_every: save when `step % save_every == 0` (0: only when `force=True`, e.g. at the end).
    keep: number of checkpoints kept on disk.
    async_save: write in a background thread while training goes on.
  """

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        # We decide when to save (save_every, force at the end): Orbax saves whenever asked.
        save_interval_steps=1)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.save_every > 0 and step % self.save_every == 0

  def save(self, step: int, state: Any, data_state: Any, config: Any) -> bool:
    """Starts an (async) save of `step`; returns whether a save was started."""
    if step in self._manager.all_steps():
      return False
    meta = {"config": config_to_json(config), "param_shapes": _shapes(state.params), "step": step}
    return self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"iterator": data_state}),
            meta=ocp.args.JsonSave(meta)),
        force=True)

  def restore(self, step: int, abstract_state: Any, config: Any) -> tuple[Any, Any]:
    """Restores (state, data_state) of `step` onto the shardings of `abstract_state`.

    Raises:
      ConfigError: the checkpoint was written by a run with other parameter shapes or another
        model.
    """
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    self._check_compatible(step, meta, abstract_state, config)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]["iterator"]

  def _check_compatible(self, step: int, meta: dict, abstract_state: Any, config: Any) -> None:
    where = os.path.join(self.directory, str(step))
    saved_model = meta.get("config", {}).get("model", {})
    current_model = config_to_json(config).get("model", {})
    for key in sorted(set(saved_model) | set(current_model)):
      if key in ("dtype", "remat"):  # Compute dtype and remat do not change the parameters.
        continue
      if saved_model.get(key) != current_model.get(key):
        raise ConfigError(
            f"config.model.{key}: the checkpoint {where} was written with "
            f"{key}={saved_model.get(key)!r}, this run has {current_model.get(key)!r}; use "
            f"another --workdir or the same model")
    saved, current = meta.get("param_shapes", {}), _shapes(abstract_state.params)
    for name in sorted(set(saved) | set(current)):
      if saved.get(name) != current.get(name):
        raise ConfigError(
            f"config.model: the checkpoint {where} has parameter {name} of shape "
            f"{saved.get(name)}, this run expects {current.get(name)}; use another --workdir")

  def wait(self) -> None:
    """Blocks until any async save has been committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def dump_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (tmp file + rename), so a crash never leaves a half-written file."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)
