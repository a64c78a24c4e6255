"""Multi-host start-up: `jax.distributed.initialize` before any device is touched.

- TPU pods and SLURM: JAX finds the coordinator, process id and count itself; set
  `GRPO_JAX_DISTRIBUTED=auto` (the launch scripts do) or pass them explicitly.
- Other clusters (and the localhost tests): `GRPO_JAX_COORDINATOR=host:port`,
  `GRPO_JAX_NUM_PROCESSES=N`, `GRPO_JAX_PROCESS_ID=i`.
- One host: nothing to do (no variable set).
"""

from __future__ import annotations

import os

import jax

_initialized = False


def initialize() -> None:
  """Initialises JAX's distributed runtime when the environment asks for it; idempotent."""
  global _initialized
  if _initialized:
    return
  coordinator = os.environ.get("GRPO_JAX_COORDINATOR")
  mode = os.environ.get("GRPO_JAX_DISTRIBUTED", "").lower()
  if coordinator:
    try:
      num = int(os.environ["GRPO_JAX_NUM_PROCESSES"])
      pid = int(os.environ["GRPO_JAX_PROCESS_ID"])
    except (KeyError, ValueError):
      raise SystemExit("error: GRPO_JAX_COORDINATOR is set: GRPO_JAX_NUM_PROCESSES and "
                       "GRPO_JAX_PROCESS_ID must be integers too") from None
    kwargs = {}
    timeout = os.environ.get("GRPO_JAX_INIT_TIMEOUT_S")
    if timeout:
      kwargs["initialization_timeout"] = int(timeout)
    if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS",
                                                                        "") == "cpu":
      # CPU collectives across processes (the localhost tests) go through gloo.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num,
                               process_id=pid, **kwargs)
  elif mode in ("auto", "1", "true"):
    jax.distributed.initialize()
  _initialized = True
