"""Multi-host start-up: `jax.distributed.initialize` before any device is touched.

Every host runs the same `python -m grpo_jax.train ...`; the environment says how they find each
other (`launch/` sets it):

- TPU pod slices and SLURM: `GRPO_JAX_DISTRIBUTED=auto`; JAX finds the coordinator, the process id
  and count itself (TPU metadata server; SLURM_* variables, one process per GPU).
- Any other cluster, and the localhost tests: `GRPO_JAX_COORDINATOR=host:port`,
  `GRPO_JAX_NUM_PROCESSES=N`, `GRPO_JAX_PROCESS_ID=i` (0 <= i < N; process 0 hosts the
  coordinator), optionally `GRPO_JAX_LOCAL_DEVICE_IDS=0,1` (devices this process drives).
- One host: nothing set, nothing done.

Failure detection (any mode): a process that dies stops sending heartbeats to the coordination
service; after `GRPO_JAX_HEARTBEAT_TIMEOUT_S` (JAX's default 100 s) every other process is told and
exits with an error naming the dead task, instead of waiting forever in a collective.
`GRPO_JAX_INIT_TIMEOUT_S` bounds the wait for all processes to join (JAX's default 300 s) and
`GRPO_JAX_SHUTDOWN_TIMEOUT_S` the wait at exit for the others to finish.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax

_initialized = False


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """How this process joins the others; built from the environment by `from_env`.

  Attributes:
    auto: let JAX detect the cluster (TPU pod, SLURM); the three fields below stay None.
    coordinator: `host:port` of process 0's coordination service.
    num_processes: processes in the run.
    process_id: this process, 0 <= process_id < num_processes.
    local_device_ids: the local devices this process drives (None: all, or JAX's cluster default).
    init_timeout_s: seconds to wait for every process to join.
    heartbeat_timeout_s: seconds without a heartbeat after which a process counts as dead.
    shutdown_timeout_s: seconds a finishing process waits for the others at exit.
  """

  auto: bool = False
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  init_timeout_s: int | None = None
  heartbeat_timeout_s: int | None = None
  shutdown_timeout_s: int | None = None

  def initialize_kwargs(self) -> dict:
    """Keyword arguments of `jax.distributed.initialize` (unset ones keep JAX's defaults)."""
    kwargs = {}
    if not self.auto:
      kwargs.update(coordinator_address=self.coordinator, num_processes=self.num_processes,
                    process_id=self.process_id)
    if self.local_device_ids is not None:
      kwargs["local_device_ids"] = list(self.local_device_ids)
    for key, value in (("initialization_timeout", self.init_timeout_s),
                       ("heartbeat_timeout_seconds", self.heartbeat_timeout_s),
                       ("shutdown_timeout_seconds", self.shutdown_timeout_s)):
      if value is not None:
        kwargs[key] = value
    return kwargs


def _int_env(environ: Mapping[str, str], name: str, *, minimum: int) -> int | None:
  raw = environ.get(name, "").strip()
  if not raw:
    return None
  try:
    value = int(raw)
  except ValueError:
    raise ValueError(f"{name}: expected an integer >= {minimum}, got {raw!r}") from None
  if value < minimum:
    raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
  return value


def from_env(environ: Mapping[str, str] | None = None) -> DistributedConfig | None:
  """Reads the GRPO_JAX_* variables; None when this is a one-process run.

  Raises:
    ValueError: a variable is malformed or a required companion is missing (the message names it).
  """
  environ = os.environ if environ is None else environ
  coordinator = environ.get("GRPO_JAX_COORDINATOR", "").strip()
  mode = environ.get("GRPO_JAX_DISTRIBUTED", "").strip().lower()
  if mode not in ("", "0", "false", "auto", "1", "true"):
    raise ValueError(f"GRPO_JAX_DISTRIBUTED: expected auto (or unset), got {mode!r}")
  auto = mode in ("auto", "1", "true")
  if not coordinator and not auto:
    return None
  timeouts = dict(
      init_timeout_s=_int_env(environ, "GRPO_JAX_INIT_TIMEOUT_S", minimum=1),
      heartbeat_timeout_s=_int_env(environ, "GRPO_JAX_HEARTBEAT_TIMEOUT_S", minimum=1),
      shutdown_timeout_s=_int_env(environ, "GRPO_JAX_SHUTDOWN_TIMEOUT_S", minimum=1))
  local = environ.get("GRPO_JAX_LOCAL_DEVICE_IDS", "").strip()
  local_ids = None
  if local:
    try:
      local_ids = tuple(int(x) for x in local.split(","))
    except ValueError:
      raise ValueError(f"GRPO_JAX_LOCAL_DEVICE_IDS: expected comma-separated integers, got "
                       f"{local!r}") from None
  if not coordinator:
    return DistributedConfig(auto=True, local_device_ids=local_ids, **timeouts)
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"GRPO_JAX_COORDINATOR: expected host:port, got {coordinator!r}")
  num = _int_env(environ, "GRPO_JAX_NUM_PROCESSES", minimum=1)
  pid = _int_env(environ, "GRPO_JAX_PROCESS_ID", minimum=0)
  if num is None or pid is None:
    raise ValueError("GRPO_JAX_COORDINATOR is set: GRPO_JAX_NUM_PROCESSES and GRPO_JAX_PROCESS_ID "
                     "must be set too")
  if pid >= num:
    raise ValueError(f"GRPO_JAX_PROCESS_ID: expected 0 <= id < GRPO_JAX_NUM_PROCESSES={num}, "
                     f"got {pid}")
  return DistributedConfig(coordinator=coordinator, num_processes=num, process_id=pid,
                           local_device_ids=local_ids, **timeouts)


def initialize(environ: Mapping[str, str] | None = None) -> bool:
  """Joins the distributed runtime when the environment asks for it; idempotent.

  Must run before anything touches a device (`jax.devices()`, the first array).

  Returns:
    Whether this is a multi-process run.

  Raises:
    SystemExit: a malformed GRPO_JAX_* variable (one line naming it).
  """
  global _initialized
  try:
    config = from_env(environ)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  if config is None:
    return False
  if _initialized:
    return True
  if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
    # Cross-process collectives between CPU devices (the localhost runs) need an implementation;
    # gloo ships with jaxlib.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**config.initialize_kwargs())
  _initialized = True
  return True


# What XLA's collectives and JAX's coordination service say when another process has gone.
_PEER_LOST_MARKERS = ("Connection reset by peer", "Connection closed by peer", "heartbeat timeout",
                      "tasks are unhealthy", "another task died", "Gloo", "NCCL")


def peer_failure_message(exc: BaseException, *, process_index: int | None = None,
                         process_count: int | None = None) -> str | None:
  """One line for a failure caused by another process of the run dying; None for anything else.

  `main` prints it instead of a traceback from deep inside a collective, so the survivor's log says
  what happened and what to do.
  """
  process_count = jax.process_count() if process_count is None else process_count
  process_index = jax.process_index() if process_index is None else process_index
  if process_count < 2 or not isinstance(exc, jax.errors.JaxRuntimeError):
    return None
  text = str(exc)
  if not any(marker in text for marker in _PEER_LOST_MARKERS):
    return None
  cause = " ".join(text.split())[:300]
  return (f"process {process_index} of {process_count}: another process of this run died or became "
          f"unreachable (see its log); rerun the same command on every host to resume from the last "
          f"checkpoint. Cause: {cause}")
