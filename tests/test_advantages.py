"""Advantage estimators against a plain-Python re-derivation (dict of groups, float64 loops)."""

import collections
import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from grpo_jax import advantages as adv_lib
from grpo_jax import sharding


# ----------------------------------------------------------------------------------------------
# Reference: verl-style loops over a dict of groups, in float64. Written from the formulas in the
# papers / verl / TRL, not from advantages.py.
# ----------------------------------------------------------------------------------------------


def ref_advantages(estimator, rewards, ids, valid=None, eps=1e-6, std_ddof=1, lengths=None,
                   baseline=None, whiten_eps=1e-8, norm_by_std=True, f_norm=1.0):
  r = np.asarray(rewards, np.float64)
  n = len(r)
  valid = np.ones(n, bool) if valid is None else np.asarray(valid).astype(bool)
  members = collections.defaultdict(list)
  for i in range(n):
    if valid[i]:
      members[int(ids[i])].append(i)
  out = np.zeros(n)

  def centered():
    x = np.zeros(n)
    for idx in members.values():
      base = 0.0 if len(idx) == 1 else sum(r[i] for i in idx) / len(idx)
      for i in idx:
        x[i] = r[i] - base
    return x

  def std_of(vals):
    m = sum(vals) / len(vals)
    return (sum((v - m) ** 2 for v in vals) / (len(vals) - std_ddof)) ** 0.5

  if estimator == "grpo":
    for idx in members.values():
      vals = [r[i] for i in idx]
      mean, std = (0.0, 1.0) if len(idx) == 1 else (sum(vals) / len(vals), std_of(vals))
      for i in idx:
        out[i] = (r[i] - mean) / (std + eps)
  elif estimator in ("grpo_no_std", "dr_grpo"):
    out = centered()
  elif estimator == "rloo":
    for idx in members.values():
      for i in idx:
        others = [r[j] for j in idx if j != i]
        out[i] = r[i] - (sum(others) / len(others) if others else 0.0)
  elif estimator == "reinforce_pp_baseline":
    x = centered()
    w = valid.astype(np.float64) * (1.0 if lengths is None else np.asarray(lengths, np.float64))
    mean = (w * x).sum() / w.sum()
    var = (w * (x - mean) ** 2).sum() / w.sum() * w.sum() / (w.sum() - 1)
    out = (x - mean) / np.sqrt(var + whiten_eps)
  elif estimator == "grpo_batch_std":
    vals = [r[i] for i in range(n) if valid[i]]
    out = centered() / (std_of(vals) + eps)
  elif estimator == "grpo_passk":
    for idx in members.values():
      order = sorted(idx, key=lambda i: (-r[i], i))
      best, second = order[0], order[1]
      a = r[best] - r[second]
      if norm_by_std:
        a = a / (std_of([r[i] for i in idx]) + eps)
      out[best] = a
  elif estimator == "opo":
    for idx in members.values():
      if len(idx) == 1:
        base = 0.0
      else:
        base = sum(lengths[i] * r[i] for i in idx) / sum(lengths[i] for i in idx)
      for i in idx:
        out[i] = r[i] - base
  elif estimator == "remax":
    out = r - np.asarray(baseline, np.float64)
  elif estimator == "gpg":
    alpha = valid.sum() / max(sum(1 for i in range(n) if valid[i] and r[i] != 0), 1)
    out = alpha * centered() / f_norm
  else:
    raise KeyError(estimator)
  return np.where(valid, out, 0.0)


def ref_group_stats(rewards, ids, num_groups, valid=None, ddof=1):
  r = np.asarray(rewards, np.float64)
  valid = np.ones(len(r), bool) if valid is None else np.asarray(valid).astype(bool)
  mean, std, count = np.zeros(num_groups), np.zeros(num_groups), np.zeros(num_groups)
  for gid in range(num_groups):
    vals = r[(np.asarray(ids) == gid) & valid]
    count[gid] = len(vals)
    if len(vals):
      mean[gid] = vals.mean()
    if len(vals) > ddof:
      std[gid] = vals.std(ddof=ddof)
  return mean, std, count


def extra_kwargs(estimator, rng, n):
  if estimator == "opo":
    return {"lengths": rng.integers(1, 50, n).astype(np.float32)}
  if estimator == "remax":
    return {"baseline": rng.normal(size=n).astype(np.float32)}
  if estimator == "reinforce_pp_baseline":
    return {"lengths": rng.integers(1, 50, n).astype(np.float32)}
  return {}


def random_batch(rng, num_groups=12, max_size=7, allow_single=True, scale=1.0, offset=0.0):
  """Uneven, shuffled groups: some singletons, some all-equal, binary and continuous rewards."""
  lo = 1 if allow_single else 2
  sizes = rng.integers(lo, max_size + 1, num_groups)
  ids = np.repeat(np.arange(num_groups), sizes)
  r = rng.normal(size=len(ids)) * scale + offset
  r[ids % 4 == 1] = np.round(r[ids % 4 == 1] > offset)  # binary-ish groups
  r[ids % 4 == 2] = offset + 0.1  # all-equal groups
  perm = rng.permutation(len(ids))
  return r[perm].astype(np.float32), ids[perm].astype(np.int32)


ALL = sorted(adv_lib.ESTIMATORS)


@pytest.mark.parametrize("estimator", ALL)
def test_matches_reference_on_random_uneven_shuffled_padded(estimator):
  rng = np.random.default_rng(0)
  r, ids = random_batch(rng, allow_single=estimator != "grpo_passk")
  valid = rng.random(len(r)) > 0.15
  if estimator == "grpo_passk":  # Every group keeps >= 2 valid members.
    valid[:] = True
  kw = extra_kwargs(estimator, rng, len(r))
  got = adv_lib.compute_advantages(r, ids, 12, estimator=estimator, valid=valid, **kw)
  want = ref_advantages(estimator, r, ids, valid=valid, **kw)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert np.all(np.asarray(got)[~valid] == 0)


@pytest.mark.parametrize("G", [4, 16, 32])  # column chain / packed moments / row reduction
@pytest.mark.parametrize("estimator", ALL)
def test_contiguous_group_size_path_equals_segment_path(estimator, G):
  """group_size=G (reductions of [B, G]) == the segment path == the reference, jitted too."""
  rng = np.random.default_rng(7)
  B = 9
  ids = np.repeat(np.arange(B), G).astype(np.int32)
  r = rng.random(B * G).astype(np.float32)
  r[G:2 * G] = 0.5  # an all-equal group
  r[2 * G:3 * G:2] = 1.0  # ties at the max
  valid = rng.random(B * G) > 0.2
  valid[3 * G:4 * G] = False
  valid[3 * G] = True  # a group of one
  valid[4 * G:5 * G] = False  # an empty group
  if estimator == "grpo_passk":
    valid[:] = True
  kw = extra_kwargs(estimator, rng, len(r))
  seg = adv_lib.compute_advantages(r, ids, B, estimator=estimator, valid=valid, **kw)
  rows = adv_lib.compute_advantages(r, ids, B, estimator=estimator, valid=valid, group_size=G, **kw)
  np.testing.assert_allclose(rows, seg, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(rows, ref_advantages(estimator, r, ids, valid=valid, **kw),
                             rtol=2e-5, atol=2e-5)
  fn = jax.jit(adv_lib.compute_advantages,
               static_argnames=("num_groups", "estimator", "group_size"))
  np.testing.assert_allclose(fn(r, ids, num_groups=B, estimator=estimator, valid=valid,
                                group_size=G, **kw), seg, rtol=1e-6, atol=1e-6)
  for a, b in zip(adv_lib.group_stats(r, ids, B, valid=valid, group_size=G),
                  adv_lib.group_stats(r, ids, B, valid=valid)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("G", [3, 16, 32])  # column chain / packed moments / row reduction
@pytest.mark.parametrize("estimator", ["grpo", "rloo", "grpo_no_std"])
def test_contiguous_all_equal_groups_are_exactly_zero(estimator, G):
  """The shift keeps all-equal groups at exact 0 (no 1/eps blow-up) at any reward scale."""
  B = 4
  r = np.repeat(np.array([0.1, 1e6 + 0.1, -3.7, 1e6], np.float32), G)
  r[-1] += 1.0  # the last group has one different member: its advantages are not 0
  ids = np.repeat(np.arange(B), G).astype(np.int32)
  valid = np.ones(B * G, bool)
  valid[2 * G] = False  # a padded first member: the shift is then the next valid reward
  for v in (None, valid):
    got = np.asarray(adv_lib.compute_advantages(r, ids, B, estimator=estimator, valid=v,
                                                group_size=G))
    assert np.all(got[:3 * G] == 0.0)
    want = adv_lib.compute_advantages(r, ids, B, estimator=estimator, valid=v)
    np.testing.assert_allclose(got[3 * G:], np.asarray(want)[3 * G:], rtol=1e-6)
    assert np.all(got[3 * G:] != 0.0)
    mean, std, _ = adv_lib.group_stats(r, ids, B, valid=v, group_size=G)
    np.testing.assert_array_equal(np.asarray(std)[:3], 0.0)
    np.testing.assert_array_equal(np.asarray(mean)[:3], r[[0, G, 2 * G + 1]])


@pytest.mark.slow
@pytest.mark.parametrize("G", [2, 3, 8, 12, 24])  # around the chain / packing / row thresholds
def test_contiguous_path_equals_segment_path_jitted_at_more_group_sizes(G):
  """Every estimator, masked or not, jitted: the G-dependent branches of _contiguous_moments."""
  fn = jax.jit(adv_lib.compute_advantages,
               static_argnames=("num_groups", "estimator", "group_size"))
  B = 33
  rng = np.random.default_rng(G)
  ids = np.repeat(np.arange(B), G).astype(np.int32)
  r = rng.random(B * G).astype(np.float32)
  r[G:2 * G] = 0.5
  mask = rng.random(B * G) > 0.2
  for estimator in ALL:
    for valid in (None, None if estimator == "grpo_passk" else mask):
      kw = extra_kwargs(estimator, rng, len(r))
      seg = adv_lib.compute_advantages(r, ids, B, estimator=estimator, valid=valid, **kw)
      rows = fn(r, ids, num_groups=B, estimator=estimator, valid=valid, group_size=G, **kw)
      np.testing.assert_allclose(rows, seg, rtol=1e-6, atol=1e-6,
                                 err_msg=f"{estimator}, valid={valid is not None}")


def test_contiguous_group_size_checks_the_ids():
  r = np.zeros(8, np.float32)
  with pytest.raises(ValueError, match="group_ids: with group_size=4"):
    adv_lib.compute_advantages(r, np.array([0, 1] * 4, np.int32), 2, group_size=4)
  with pytest.raises(ValueError, match="group_size: 2 groups of 3"):
    adv_lib.compute_advantages(r, np.repeat(np.arange(2), 4).astype(np.int32), 2, group_size=3)


@pytest.mark.parametrize("estimator", ["grpo", "grpo_batch_std", "grpo_passk"])
def test_ddof_and_eps_are_arguments(estimator):
  rng = np.random.default_rng(1)
  r, ids = random_batch(rng, allow_single=False)
  got = adv_lib.compute_advantages(r, ids, 12, estimator=estimator, eps=1e-4, std_ddof=0)
  np.testing.assert_allclose(got, ref_advantages(estimator, r, ids, eps=1e-4, std_ddof=0),
                             rtol=2e-5, atol=2e-5)


def test_passk_without_std_and_ties():
  r = np.array([1.0, 0.0, 1.0, 0.5, 0.2, 0.1], np.float32)
  ids = np.array([0, 0, 0, 1, 1, 1], np.int32)
  got = adv_lib.compute_advantages(r, ids, 2, estimator="grpo_passk", norm_by_std=False)
  np.testing.assert_allclose(got, [0, 0, 0, 0.3, 0, 0], atol=1e-7)  # tie at the max: gap 0


def test_grpo_edge_cases():
  eps = 1e-6
  r = np.array([3.0, 0.1, 0.1, 0.1, 1.0, 1.0001, 7.0, 7.0], np.float32)
  ids = np.array([0, 1, 1, 1, 2, 2, 3, 3], np.int32)
  got = np.asarray(adv_lib.compute_advantages(r, ids, 4))
  np.testing.assert_allclose(got[0], 3.0 / (1 + eps), rtol=1e-6)  # singleton: mean 0, std 1
  assert np.all(got[1:4] == 0.0) and np.all(got[6:] == 0.0)  # all-equal: exactly 0
  # No variance floor: 1.0 vs 1.0001 still gives about +-1/sqrt(2) (n=2, unbiased std; eps=1e-6
  # against std=7e-5 takes 1.4% off). A floored variance would give ~0.007.
  d = (np.float64(r[5]) - np.float64(r[4])) / 2
  np.testing.assert_allclose(got[4:6], np.array([-d, d]) / (d * 2 ** 0.5 + eps), rtol=1e-4)
  assert np.all(np.abs(got[4:6]) > 0.69)


@pytest.mark.parametrize("estimator", ALL)
def test_large_rewards(estimator):
  rng = np.random.default_rng(2)
  r, ids = random_batch(rng, allow_single=estimator != "grpo_passk", scale=3.0, offset=1e6)
  r = np.round(r)  # integers near 1e6 are exact in float32
  kw = extra_kwargs(estimator, rng, len(r))
  got = adv_lib.compute_advantages(r, ids, 12, estimator=estimator, **kw)
  want = ref_advantages(estimator, r, ids, **kw)
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * max(1.0, np.abs(want).max() * 1e-6))


@pytest.mark.parametrize("estimator", ALL)
def test_bfloat16_rewards_give_float32(estimator):
  rng = np.random.default_rng(3)
  r, ids = random_batch(rng, allow_single=estimator != "grpo_passk")
  r_bf16 = jnp.asarray(r, jnp.bfloat16)
  kw = extra_kwargs(estimator, rng, len(r))
  got = adv_lib.compute_advantages(r_bf16, ids, 12, estimator=estimator, **kw)
  assert got.dtype == jnp.float32
  want = ref_advantages(estimator, np.asarray(r_bf16.astype(jnp.float32)), ids, **kw)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_group_stats_and_per_sample_stats():
  rng = np.random.default_rng(4)
  r, ids = random_batch(rng)
  valid = rng.random(len(r)) > 0.2
  for ddof in (0, 1):
    mean, std, count = adv_lib.group_stats(r, ids, 13, valid=valid, ddof=ddof)  # group 12 empty
    want = ref_group_stats(r, ids, 13, valid=valid, ddof=ddof)
    for g, w in zip((mean, std, count), want):
      np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
  m_N, s_N = adv_lib.per_sample_stats(r, ids, 13, valid=valid)
  mean, std, _ = ref_group_stats(r, ids, 13, valid=valid)
  np.testing.assert_allclose(m_N, mean[ids], rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(s_N, std[ids], rtol=2e-5, atol=2e-6)


def test_grpo_matches_verl_style_torch_loop():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(5)
  r, ids = random_batch(rng)
  scores = torch.tensor(r)
  id2score = collections.defaultdict(list)
  for i in range(len(r)):
    id2score[int(ids[i])].append(scores[i])
  id2mean, id2std = {}, {}
  for k, v in id2score.items():
    if len(v) == 1:
      id2mean[k], id2std[k] = torch.tensor(0.0), torch.tensor(1.0)
    else:
      id2mean[k], id2std[k] = torch.mean(torch.stack(v)), torch.std(torch.stack(v))
  want = torch.stack([(scores[i] - id2mean[int(ids[i])]) / (id2std[int(ids[i])] + 1e-6)
                      for i in range(len(r))]).numpy()
  np.testing.assert_allclose(adv_lib.compute_advantages(r, ids, 12), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Properties (fixed N = 24 and 8 groups so that one jitted function serves every example)
# ----------------------------------------------------------------------------------------------

N_PROP, G_PROP = 24, 8


@functools.partial(jax.jit, static_argnames=("estimator",))
def _jitted(r, ids, valid, lengths, estimator):
  kw = {"lengths": lengths} if estimator == "opo" else {}
  return adv_lib.compute_advantages(r, ids, G_PROP, estimator=estimator, valid=valid, **kw)


batches = st.tuples(
    st.lists(st.integers(0, G_PROP - 1), min_size=N_PROP, max_size=N_PROP),
    st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=N_PROP, max_size=N_PROP),
    st.lists(st.booleans(), min_size=N_PROP, max_size=N_PROP),
)
PROP_ESTIMATORS = [e for e in ALL if e not in ("remax", "grpo_passk")]


@hypothesis.settings(max_examples=15)
@hypothesis.given(batches, st.randoms(use_true_random=False))
def test_permuting_samples_permutes_advantages(batch, rnd):
  ids, r, valid = (np.asarray(x) for x in batch)
  perm = np.arange(N_PROP)
  rnd.shuffle(perm)
  lengths = np.arange(1, N_PROP + 1, dtype=np.float32)
  for est in PROP_ESTIMATORS:
    a = _jitted(r.astype(np.float32), ids, valid, lengths, est)
    b = _jitted(r[perm].astype(np.float32), ids[perm], valid[perm], lengths[perm], est)
    np.testing.assert_allclose(np.asarray(a)[perm], b, rtol=1e-4, atol=1e-4 * (1 + np.abs(a).max()),
                               err_msg=est)


@hypothesis.settings(max_examples=15)
@hypothesis.given(st.lists(st.integers(0, G_PROP - 1), min_size=N_PROP, max_size=N_PROP),
                  st.lists(st.integers(0, 4), min_size=N_PROP, max_size=N_PROP),
                  st.lists(st.floats(0.5, 20.0), min_size=G_PROP, max_size=G_PROP),
                  st.lists(st.floats(-100.0, 100.0), min_size=G_PROP, max_size=G_PROP))
def test_grpo_is_invariant_to_affine_rescaling_within_a_group(ids, r, scale, shift):
  ids, r = np.asarray(ids), np.asarray(r, np.float32)
  valid = np.ones(N_PROP, bool)
  # Singletons use mean 0 / std 1 by convention (not affine invariant): compare groups of >= 2.
  multi = np.bincount(ids, minlength=G_PROP)[ids] >= 2
  r2 = (r * np.asarray(scale, np.float32)[ids] + np.asarray(shift, np.float32)[ids])
  a = _jitted(r, ids, valid, r, "grpo")
  b = _jitted(r2.astype(np.float32), ids, valid, r, "grpo")
  np.testing.assert_allclose(np.asarray(a)[multi], np.asarray(b)[multi], rtol=1e-3, atol=1e-3)


@hypothesis.settings(max_examples=15)
@hypothesis.given(batches)
def test_no_std_and_rloo_sum_to_zero_per_group_and_nothing_is_nan(batch):
  ids, r, valid = (np.asarray(x) for x in batch)
  r = r.astype(np.float32)
  count = np.bincount(ids, weights=valid, minlength=G_PROP)
  lengths = np.arange(1, N_PROP + 1, dtype=np.float32)
  for est in ("grpo_no_std", "rloo"):
    a = np.asarray(_jitted(r, ids, valid, lengths, est), np.float64)
    sums = np.bincount(ids, weights=a, minlength=G_PROP)
    scale = 1 + np.bincount(ids, weights=np.abs(r) * valid, minlength=G_PROP)
    ok = count >= 2
    np.testing.assert_allclose(sums[ok] / scale[ok], 0, atol=1e-5, err_msg=est)
  for est in PROP_ESTIMATORS:
    assert np.isfinite(np.asarray(_jitted(r, ids, valid, lengths, est))).all(), est


# ----------------------------------------------------------------------------------------------
# jit / vmap / 8-device sharding give the same results
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp_baseline", "grpo_passk",
                                       "opo"])
def test_jit_vmap_and_sharded_agree(estimator):
  rng = np.random.default_rng(6)
  num_groups, size = 16, 4
  n = num_groups * size
  ids = rng.permutation(np.repeat(np.arange(num_groups), size)).astype(np.int32)
  r = rng.normal(size=(3, n)).astype(np.float32)
  lengths = rng.integers(1, 9, n).astype(np.float32)
  kw = {"lengths": lengths} if estimator == "opo" else {}
  eager = np.stack([adv_lib.compute_advantages(r[i], ids, num_groups, estimator=estimator, **kw)
                    for i in range(3)])
  want = np.stack([ref_advantages(estimator, r[i], ids, **kw) for i in range(3)])
  np.testing.assert_allclose(eager, want, rtol=2e-5, atol=2e-5)

  fn = jax.jit(functools.partial(adv_lib.compute_advantages, num_groups=num_groups,
                                 estimator=estimator))
  jitted = np.stack([fn(r[i], ids, **kw) for i in range(3)])
  np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)

  vmapped = jax.vmap(lambda x: fn(x, ids, **kw))(r)
  np.testing.assert_allclose(vmapped, eager, rtol=1e-6, atol=1e-6)

  mesh = sharding.make_mesh()
  assert mesh.devices.size == 8
  spec = NamedSharding(mesh, P(("data", "fsdp")))
  r_s, ids_s = jax.device_put(r[0], spec), jax.device_put(ids, spec)
  kw_s = {k: jax.device_put(v, spec) for k, v in kw.items()}
  sharded = fn(r_s, ids_s, **kw_s)
  np.testing.assert_allclose(sharded, eager[0], rtol=1e-5, atol=1e-6)


def test_jit_with_static_argnames_and_traced_valid():
  fn = jax.jit(adv_lib.compute_advantages, static_argnames=("num_groups", "estimator"))
  r = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
  ids = np.array([0, 0, 1, 1], np.int32)
  valid = np.array([1, 1, 1, 0])
  got = fn(r, ids, num_groups=2, estimator="grpo_no_std", valid=valid)
  np.testing.assert_allclose(got, [-0.5, 0.5, 3.0, 0.0])  # group 1 is a singleton once padded


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

R4 = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
I4 = np.array([0, 0, 1, 1], np.int32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rewards=R4[:3]), "group_ids: expected shape"),
    (dict(rewards=R4.reshape(2, 2), group_ids=I4.reshape(2, 2)), "rewards: expected a 1-D"),
    (dict(num_groups=1), "num_groups: 1 is too small for group id 1"),
    (dict(group_ids=np.array([0, -1, 1, 1], np.int32)), "group_ids: ids must be >= 0"),
    (dict(group_ids=I4.astype(np.float32)), "group_ids: expected an integer dtype"),
    (dict(estimator="ppo"), "estimator: unknown 'ppo'"),
    (dict(rewards=np.array([1.0, np.nan, 3.0, 4.0], np.float32)), "rewards: non-finite"),
    (dict(rewards=np.array([1.0, np.inf, 3.0, 4.0], np.float32)), "rewards: non-finite"),
    (dict(valid=np.ones(3)), "valid: expected shape"),
    (dict(num_groups=2.0), "num_groups: expected a static Python int"),
    (dict(estimator="opo"), "lengths: estimator 'opo' needs"),
    (dict(estimator="opo", lengths=np.ones(3)), "lengths: expected shape"),
    (dict(estimator="remax"), "baseline: estimator 'remax' needs"),
    (dict(std_ddof=1, estimator="rloo"), "std_ddof: not an option of estimator 'rloo'"),
    (dict(std_ddof=-1), "std_ddof: expected an int >= 0"),
    (dict(eps=-1.0), "eps: expected a float >= 0"),
    (dict(estimator="grpo_passk", group_ids=np.array([0, 0, 0, 1], np.int32)),
     "group_ids: estimator 'grpo_passk' needs >= 2 valid responses per group; group 1 has 1"),
])
def test_bad_input_raises_naming_the_argument(kwargs, match):
  args = dict(rewards=R4, group_ids=I4, num_groups=2)
  args.update(kwargs)
  with pytest.raises((ValueError, TypeError), match=match):
    adv_lib.compute_advantages(args.pop("rewards"), args.pop("group_ids"), args.pop("num_groups"),
                               **args)


def test_padding_may_hold_non_finite_rewards():
  r = np.array([1.0, 2.0, np.nan, 4.0], np.float32)
  got = adv_lib.compute_advantages(r, I4, 2, valid=np.array([1, 1, 0, 1]))
  assert np.isfinite(got).all() and got[2] == 0
