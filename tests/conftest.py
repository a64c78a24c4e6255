"""Test-wide JAX settings. The CPU device count is set once, here, for every test module."""

import os

# 8 host devices so that every sharding test runs on a real (data, fsdp, tensor) mesh.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# No persistent compilation cache: with it, a process that runs the same donated train step a
# second time from deserialized executables aborted inside XLA:CPU (jax 0.10.2,
# test_failing_reward_keeps_finished_steps); every process compiles for itself.
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
# Catch silent broadcasting between arrays of different rank.
jax.config.update("jax_numpy_rank_promotion", "raise")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile("ci", deadline=None, max_examples=40, derandomize=True)
hypothesis.settings.register_profile("dev", deadline=None, max_examples=40)
hypothesis.settings.load_profile("ci" if os.environ.get("CI") else "dev")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
  """The HF folder of SmolLM2-135M-Instruct (a real pretrained model), built once when absent.

  CI builds it before pytest (`.ci/run`), so tests normally only reuse the cached folder.
  """
  from grpo_jax.testing.real_model import smollm2_dir as build  # pylint: disable=import-outside-toplevel
  return build()
