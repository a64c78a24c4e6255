"""Orbax checkpoints of a run: the whole train state, the data iterator state, and the config.

Layout: `<workdir>/checkpoints/<step>/{state, data, meta}`. Orbax writes each checkpoint into a
temporary directory and renames it into place only once every item (and, with several hosts, every
process) has finished, so a run killed at any moment - including mid-save - leaves only complete
checkpoints behind, and `latest_step()` never names a half-written one.

`meta` holds the resolved config, the shape of every parameter and a digest of every array of the
state (two position-weighted 32-bit sums of its bits, computed on the devices) and of the data
iterator state. A restore first compares config and shapes with the current run and refuses a
mismatch with one clear line; it then checks the restored arrays against the digest and that every
float is finite. A damaged latest checkpoint (overwritten or truncated files, missing metadata,
junk iterator state) is moved aside to `<workdir>/checkpoints.corrupt/` with a warning naming it,
and the run resumes from the previous complete one (`Checkpointer.restore_latest`). A state with a
non-finite value is never saved, so the last good checkpoint is never rotated away.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from grpo_jax.config import ConfigError, config_to_json


def _shapes(tree: Any) -> dict[str, list[int]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): list(np.shape(leaf)) for path, leaf in flat}


class CheckpointError(RuntimeError):
  """No usable checkpoint, or a state that must not be saved; the message is one line."""


def _leaf_digest(x: jax.Array) -> jax.Array:
  """uint32[3]: two position-weighted sums (mod 2^32) of the bits of `x`, and whether it is all
  finite.

  Integer sums are exact and associative, so the digest does not depend on the sharding; the
  positions come from iotas over the array's own shape, so nothing is gathered or reshaped. Any
  single changed word changes the first sum (its weight is odd); the second uses other weights.
  """
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 4:
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif x.dtype.itemsize < 4:
    small = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x, small).astype(jnp.uint32)
  else:  # 8 bytes: two words per element (a trailing axis).
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  pos = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    pos = pos + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= words.shape[axis]
  w1 = pos * jnp.uint32(2654435761) | jnp.uint32(1)
  w2 = (pos ^ jnp.uint32(0x5BD1E995)) * jnp.uint32(2246822519) | jnp.uint32(1)
  a = jnp.sum(words * w1, dtype=jnp.uint32)
  b = jnp.sum((words ^ jnp.uint32(0x27D4EB2F)) * w2, dtype=jnp.uint32)
  return jnp.stack([a, b, finite.astype(jnp.uint32)])


@jax.jit
def _tree_digest(tree: Any):
  return jax.tree.map(_leaf_digest, tree)


def state_digest(state: Any) -> tuple[dict[str, str], list[str]]:
  """({leaf path: 16 hex digits}, [paths of leaves with a non-finite value]) of a pytree."""
  flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(_tree_digest(state)))
  digest, bad = {}, []
  for path, (a, b, finite) in flat:
    name = jax.tree_util.keystr(path)
    digest[name] = f"{int(a):08x}{int(b):08x}"
    if not bool(finite):
      bad.append(name)
  return digest, bad


def _json_digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def warn(msg: str) -> None:
  """A warning the user must see, one line on stderr (process 0), whatever the log verbosity."""
  if jax.process_index() == 0:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


_LOAD_DAMAGED, _LOAD_FAILED = 1, 2
# What a damaged checkpoint raises: our digest/finite checks, missing files or metadata, bad JSON,
# and Orbax/TensorStore read errors on truncated or missing data (a ValueError carrying the
# TensorStore status, a pytree mismatch when _METADATA is gone, a bare Exception on a short read).
_DAMAGE_TYPES = (CheckpointError, FileNotFoundError, KeyError, json.JSONDecodeError)
_DAMAGE_VALUE_ERRORS = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE", "pytree structure error")


def _is_damage(e: BaseException) -> bool:
  if isinstance(e, _DAMAGE_TYPES):
    return True
  if isinstance(e, ValueError):
    return str(e).startswith(_DAMAGE_VALUE_ERRORS)
  return type(e) is Exception and "error while reading" in str(e)


def _agree(code: int) -> int:
  """The largest of every process's load outcome (0 ok, damaged, failed)."""
  if jax.process_count() == 1:
    return code
  from jax.experimental import multihost_utils
  return int(np.max(multihost_utils.process_allgather(np.int32(code))))


def _one_line(e: BaseException) -> str:
  msg = (str(e).strip().splitlines() or [""])[0][:300]
  return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


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
        save_interval_steps=1,
        # A save cut short (killed, disk full) leaves a `*.orbax-checkpoint-tmp` folder: removed
        # when the next run starts.
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.save_every > 0 and step % self.save_every == 0

  def save(self, step: int, state: Any, data_state: Any, config: Any) -> bool:
    """Starts an (async) save of `step`; returns whether a save was started.

    Raises:
      CheckpointError: the state holds a non-finite value (it is not saved, so the last good
        checkpoint stays).
    """
    if step in self._manager.all_steps():
      return False
    digest, bad = state_digest(state)
    if bad:
      raise CheckpointError(
          f"step {step}: the train state has non-finite values in {bad[0]}"
          f"{f' (and {len(bad) - 1} more arrays)' if len(bad) > 1 else ''}; not saved, the last "
          f"good checkpoint in {self.directory} is kept")
    meta = {"config": config_to_json(config), "param_shapes": _shapes(state.params), "step": step,
            "state_digest": digest, "data_digest": _json_digest({"iterator": data_state})}
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
    self._check_integrity(step, meta, restored["state"], restored["data"])
    return restored["state"], restored["data"]["iterator"]

  def restore_latest(self, abstract_state: Any, config: Any,
                     set_data_state: Callable[[Any], None]) -> tuple[int, Any] | None:
    """Restores the newest usable checkpoint: (step, state), or None when there is none.

    `set_data_state(data_state)` hands the iterator state to the data pipeline (it may refuse it).
    A damaged checkpoint (one that fails to verify, or whose files are missing, truncated or
    unreadable on any process) is moved to `<directory>.corrupt/` with a warning naming it, and
    the previous one is tried; all processes agree on each step.

    Raises:
      ConfigError: the checkpoints belong to another model (nothing is moved).
      CheckpointError: there are checkpoints but none is usable (nothing is moved), or one failed
        to load for a reason other than damage, e.g. out of memory (it is not moved).
    """
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      error = None
      try:
        state, data_state = self.restore(step, abstract_state, config)
        set_data_state(data_state)
      except ConfigError:
        raise
      except Exception as e:  # noqa: BLE001 -- sorted below: damage, or a failure to report.
        error = e
      # Every process resumes from the same step: the worst outcome of all of them counts.
      code = _agree(0 if error is None else _LOAD_DAMAGED if _is_damage(error) else _LOAD_FAILED)
      if code == _LOAD_FAILED:
        where = os.path.join(self.directory, str(step))
        why = _one_line(error) if error is not None else "another process failed to load it"
        raise CheckpointError(f"checkpoints: could not load {where} ({why}); it is not damaged "
                              f"and was left in place")
      if code == _LOAD_DAMAGED:
        why = _one_line(error) if error is not None else "another process found it damaged"
        damaged.append((step, why))
        continue
      for bad_step, reason in damaged:
        where = os.path.join(self.directory, str(bad_step))
        moved = self._quarantine(bad_step)
        warn(f"checkpoint {where} is unusable ({reason}); moved to {moved}, resuming from step "
             f"{step}")
      if damaged:
        self._manager.reload()
      return step, state
    if damaged:
      step, reason = damaged[0]
      raise CheckpointError(
          f"checkpoints: no usable checkpoint in {self.directory} (the latest, step {step}: "
          f"{reason}); move the folder away to start afresh")
    return None

  def _quarantine(self, step: int) -> str:
    """Moves checkpoint `step` out of Orbax's sight (kept for a post-mortem); returns where."""
    dest_dir = f"{self.directory}.corrupt"
    dest = os.path.join(dest_dir, str(step))
    if jax.process_index() == 0:
      os.makedirs(dest_dir, exist_ok=True)
      if os.path.exists(dest):
        shutil.rmtree(dest)
      os.replace(os.path.join(self.directory, str(step)), dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"grpo_jax_quarantine_{step}")
    return dest

  def _check_integrity(self, step: int, meta: dict, state: Any, data: Any) -> None:
    """The restored arrays match the digest written with them, and every float is finite."""
    digest, bad = state_digest(state)
    saved = meta.get("state_digest")
    if saved is not None:  # Checkpoints written before digests existed: the finite check only.
      for name in sorted(set(saved) | set(digest)):
        if saved.get(name) != digest.get(name):
          raise CheckpointError(f"{name} does not match the digest written with it")
    if bad:
      raise CheckpointError(f"{bad[0]} has non-finite values")
    if "data_digest" in meta and meta["data_digest"] != _json_digest(data):
      raise CheckpointError("the data iterator state does not match the digest written with it")

  def check_model(self, step: int, config: Any) -> None:
    """Refuses (ConfigError) a checkpoint written for another model, from its meta alone."""
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    self._check_compatible(step, meta, None, config)

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
    if abstract_state is None:
      return
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


class WorkdirLock:
  """Holds `<workdir>/.lock` (an exclusive `flock`) for the life of a run: a second run on the same
  workdir refuses with one line naming the process and host that hold it.

  The kernel drops a `flock` when its process dies, however it dies, so the lock of a killed run
  is never stale: the next run takes it over (the file's old contents are only informative). On
  network file systems without `flock` support the lock is best effort.
  """

  def __init__(self, workdir: str):
    import fcntl
    import socket
    import time
    self.path = os.path.join(workdir, ".lock")
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.read(self._fd, 4096).decode("utf-8", "replace")
      os.close(self._fd)
      try:
        info = json.loads(holder)
        who = f"pid {info['pid']} on host {info['host']}, since {info['started']}"
      except (json.JSONDecodeError, KeyError, TypeError):
        who = "another process"
      raise ConfigError(f"--workdir: {workdir} is in use by another run ({who}); wait for it to "
                        f"end or use another --workdir") from None
    os.ftruncate(self._fd, 0)
    os.write(self._fd, json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())

  def release(self) -> None:
    import fcntl
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
