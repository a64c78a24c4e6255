"""GAE against a plain Python loop over tokens."""

import jax
import numpy as np
import pytest

from grpo_jax import gae


def ref_gae(rewards, values, mask, gamma, lam):
  """Backwards over tokens; masked tokens are skipped (verl's newer compute_gae_advantage_return)."""
  b, t = rewards.shape
  adv = np.zeros((b, t))
  for i in range(b):
    next_v, next_a = 0.0, 0.0
    for j in reversed(range(t)):
      if not mask[i, j]:
        continue
      delta = rewards[i, j] + gamma * next_v - values[i, j]
      next_a = delta + gamma * lam * next_a
      next_v = values[i, j]
      adv[i, j] = next_a
  return adv, (adv + values) * mask


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  b, t = 4, 9
  mask = np.ones((b, t), np.float32)
  mask[0, 6:] = 0  # right padding
  mask[1, 2:4] = 0  # a retrieved span inside the response
  mask[2, :] = 0  # empty row
  rewards = rng.normal(size=(b, t)).astype(np.float32)
  values = rng.normal(size=(b, t)).astype(np.float32)
  return rewards, values, mask


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0), (0.0, 0.7)])
def test_matches_loop(batch, gamma, lam):
  rewards, values, mask = batch
  adv, ret = gae.compute_gae(rewards, values, mask, gamma, lam)
  want_adv, want_ret = ref_gae(rewards, values, mask, gamma, lam)
  assert adv.dtype == np.float32 and ret.dtype == np.float32
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


def test_gamma_lam_one_is_reward_to_go_minus_value(batch):
  rewards, values, _ = batch
  mask = np.ones_like(rewards)
  adv, ret = gae.compute_gae(rewards, values, mask, 1.0, 1.0)
  to_go = np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1]
  np.testing.assert_allclose(ret, to_go, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(adv, to_go - values, rtol=1e-5, atol=1e-5)


def test_jit_and_vmap_agree(batch):
  rewards, values, mask = batch
  want = gae.compute_gae(rewards, values, mask, 0.9, 0.8)
  jitted = jax.jit(gae.compute_gae, static_argnums=(3, 4))(rewards, values, mask, 0.9, 0.8)
  vmapped = jax.vmap(lambda r, v, m: gae.compute_gae(r[None], v[None], m[None], 0.9, 0.8))(
      rewards, values, mask)
  for a, b, c in zip(want, jitted, vmapped):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(c[:, 0], a, rtol=1e-6, atol=1e-6)
  # gamma / lam may also be traced.
  traced = jax.jit(gae.compute_gae)(rewards, values, mask, 0.9, 0.8)
  np.testing.assert_allclose(traced[0], want[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("args, match", [
    ((np.zeros(3), np.zeros(3), np.zeros(3), 1.0, 1.0), "rewards_BxT: expected a 2-D"),
    ((np.zeros((2, 3)), np.zeros((2, 4)), np.zeros((2, 3)), 1.0, 1.0), "values_BxT"),
    ((np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)), 1.5, 1.0), "gamma"),
    ((np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)), 1.0, -0.1), "lam"),
])
def test_bad_input(args, match):
  with pytest.raises(ValueError, match=match):
    gae.compute_gae(*args)
