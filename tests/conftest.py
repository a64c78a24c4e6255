"""Test-wide JAX settings. The CPU device count is set once, here, for every test module."""

import os

# 8 host devices so that every sharding test runs on a real (data, fsdp, tensor) mesh.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
# Catch silent broadcasting between arrays of different rank.
jax.config.update("jax_numpy_rank_promotion", "raise")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile("ci", deadline=None, max_examples=40, derandomize=True)
hypothesis.settings.register_profile("dev", deadline=None, max_examples=40)
hypothesis.settings.load_profile("ci" if os.environ.get("CI") else "dev")
