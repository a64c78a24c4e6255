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


# Longest files first, so that neither xdist worker is left alone with a long file at the end.
# `--dist loadfile --no-loadscope-reorder` (README's test command) hands files to the workers in
# collection order; xdist's default order (most tests first) put these few-test, long files last,
# and the last 5 % of the tests took the last 7 of 34 minutes. Seconds per file from `.ci/run`
# with `--durations=40` (2026-11-30, 2 cores); files not listed follow in their usual order.
_LONGEST_FILES = ("test_multihost.py", "test_train.py", "test_real_learning.py",
                  "test_failures.py", "test_checkpoint.py", "test_update.py",
                  "test_update_real.py", "test_cli_errors.py", "test_sampling.py",
                  "test_search_sampler.py", "test_real_model.py", "test_search_train.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(_LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: files stay whole.
