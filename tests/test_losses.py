"""Losses against plain NumPy re-derivations (loops over sequences and tokens, float64)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from grpo_jax import losses, sharding
from grpo_jax.losses import LossConfig

B, T, V = 8, 6, 11


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(B, T, V)) * 3).astype(np.float32)
  targets = rng.integers(0, V, (B, T)).astype(np.int32)
  old = rng.normal(-1.5, 0.5, (B, T)).astype(np.float32)
  # New log-probs spread around old ones so that both clip sides and the dual clip are hit.
  logp = (old + rng.normal(0, 0.4, (B, T))).astype(np.float32)
  ref = (old + rng.normal(0, 0.3, (B, T))).astype(np.float32)
  adv = rng.normal(size=B).astype(np.float32)
  mask = (rng.random((B, T)) > 0.25).astype(np.float32)
  mask[3] = 0  # an empty row (e.g. a filtered group)
  mask[5, :] = 1
  return dict(logits=logits, targets=targets, old=old, logp=logp, ref=ref, adv=adv, mask=mask)


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------


def ref_logprobs(logits, targets):
  x = np.asarray(logits, np.float64)
  out = np.zeros(targets.shape)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      row = x[b, t]
      lse = row.max() + np.log(np.sum(np.exp(row - row.max())))
      out[b, t] = row[targets[b, t]] - lse
  return out


def ref_entropy(logits):
  x = np.asarray(logits, np.float64)
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return -(p * np.log(p)).sum(-1)


def ref_kl(logp, ref, kind):
  out = np.zeros(logp.shape)
  for idx in np.ndindex(logp.shape):
    d = float(logp[idx]) - float(ref[idx])
    if kind == "k1":
      out[idx] = d
    elif kind == "k2":
      out[idx] = d * d / 2
    else:  # verl low_var_kl
      kl = min(max(-d, -20.0), 20.0)
      out[idx] = min(max(np.exp(kl) - kl - 1, -10.0), 10.0)
  return out


def ref_aggregate(values, mask, mode, max_len=None):
  rows = []
  for b in range(values.shape[0]):
    toks = [values[b, t] for t in range(values.shape[1]) if mask[b, t]]
    if toks:
      rows.append(toks)
  if not rows:
    return 0.0
  if mode == "token-mean":
    return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
  if mode == "seq-mean-token-sum":
    return sum(sum(r) for r in rows) / len(rows)
  if mode == "seq-mean-token-mean":
    return sum(sum(r) / len(r) for r in rows) / len(rows)
  return sum(sum(r) for r in rows) / len(rows) / (max_len or values.shape[1])


def ref_policy_loss(logp, old, adv, mask, cfg):
  """Token loop; GSPO's sequence ratio is the geometric mean of the token ratios."""
  logp, old = np.asarray(logp, np.float64), np.asarray(old, np.float64)
  loss = np.zeros(logp.shape)
  ratio = np.zeros(logp.shape)
  for b in range(logp.shape[0]):
    toks = [t for t in range(logp.shape[1]) if mask[b, t]]
    seq = np.mean([logp[b, t] - old[b, t] for t in toks]) if toks else 0.0
    for t in range(logp.shape[1]):
      if cfg.ratio_level == "token":
        rho = np.exp(np.clip(logp[b, t] - old[b, t], -20, 20))
      else:
        rho = np.exp(min(seq, 10.0))
      a = float(adv[b])
      unclipped, clipped = -a * rho, -a * np.clip(rho, 1 - cfg.clip_low, 1 + cfg.clip_high)
      val = max(unclipped, clipped)
      if cfg.dual_clip is not None and a < 0:
        val = min(val, -a * cfg.dual_clip)
      loss[b, t], ratio[b, t] = val, rho
  return ref_aggregate(loss, mask, cfg.agg_mode, cfg.max_len), ratio


# ----------------------------------------------------------------------------------------------
# From logits
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_logprobs_and_entropy(data, dtype):
  logits = jnp.asarray(data["logits"], dtype)
  as_f64 = np.asarray(logits.astype(jnp.float32), np.float64)
  got = losses.token_logprobs_from_logits(logits, data["targets"])
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref_logprobs(as_f64, data["targets"]), rtol=1e-5, atol=1e-5)
  ent = losses.entropy_from_logits(logits)
  assert ent.dtype == jnp.float32
  np.testing.assert_allclose(ent, ref_entropy(as_f64), rtol=1e-5, atol=1e-5)


def test_token_logprobs_gradient_is_onehot_minus_softmax(data):
  g = jax.grad(lambda x: jnp.sum(losses.token_logprobs_from_logits(x, data["targets"])))(
      data["logits"])
  x = data["logits"].astype(np.float64)
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(g, np.eye(V)[data["targets"]] - p, atol=1e-5)


def test_token_logprobs_make_no_float32_copy_of_bf16_logits():
  b, t, v = 4, 64, 4096
  logits = jax.ShapeDtypeStruct((b, t, v), jnp.bfloat16)
  targets = jax.ShapeDtypeStruct((b, t), jnp.int32)
  compiled = jax.jit(losses.token_logprobs_from_logits).lower(logits, targets).compile()
  mem = compiled.memory_analysis()
  if mem is None:
    pytest.skip("no memory analysis on this backend")
  # A float32 [B,T,V] temporary would be 4 MiB; the bf16 input itself is 2 MiB.
  assert mem.temp_size_in_bytes < b * t * v * 4 // 4, mem


# ----------------------------------------------------------------------------------------------
# KL and aggregation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", losses.KL_KINDS)
def test_kl_penalty(data, kind):
  logp = data["logp"].copy()
  logp[0, 0] = data["ref"][0, 0] - 30.0  # exercises both clamps of low_var_kl
  got = losses.kl_penalty(logp, data["ref"], kind)
  np.testing.assert_allclose(got, ref_kl(logp, data["ref"], kind), rtol=1e-5, atol=1e-6)


def test_k3_is_low_var_kl_and_clamped(data):
  a = losses.kl_penalty(data["logp"] - 50, data["ref"], "k3")
  np.testing.assert_array_equal(a, losses.kl_penalty(data["logp"] - 50, data["ref"], "low_var_kl"))
  assert float(jnp.max(a)) == 10.0


@pytest.mark.parametrize("mode", losses.AGG_MODES)
def test_aggregate_matches_loops(data, mode):
  values = data["logp"].copy()
  values[data["mask"] == 0] = np.nan  # masked values never leak, even NaN
  got = losses.aggregate(values, data["mask"], mode)
  np.testing.assert_allclose(got, ref_aggregate(data["logp"], data["mask"], mode), rtol=1e-5)
  got = losses.aggregate(values, data["mask"], mode, max_len=20)
  np.testing.assert_allclose(got, ref_aggregate(data["logp"], data["mask"], mode, 20), rtol=1e-5)
  assert float(losses.aggregate(values, np.zeros((B, T)), mode)) == 0.0


@pytest.mark.parametrize("mode", losses.AGG_MODES)
def test_micro_batches_with_global_denominator_sum_to_full_batch(data, mode):
  cfg = LossConfig(agg_mode=mode, clip_high=0.28, dual_clip=3.0, kl_coef=0.1)

  def loss_fn(logp, sl, denominator):
    return losses.grpo_loss(logp, data["old"][sl], data["ref"][sl], data["adv"][sl],
                            data["mask"][sl], cfg, denominator=denominator)[0]

  full, full_grad = jax.value_and_grad(loss_fn)(data["logp"], slice(None), None)
  denom = losses.aggregate_denominator(data["mask"], mode)
  parts = [jax.value_and_grad(loss_fn)(data["logp"][s:s + 2], slice(s, s + 2), denom)
           for s in range(0, B, 2)]
  np.testing.assert_allclose(sum(p[0] for p in parts), full, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), full_grad, rtol=1e-5,
                             atol=1e-7)
  # Without the global denominator the micro-batch means do not add up (the property has teeth).
  naive = sum(loss_fn(data["logp"][s:s + 2], slice(s, s + 2), None) for s in range(0, B, 2))
  assert not np.isclose(naive, full, rtol=1e-3)


# ----------------------------------------------------------------------------------------------
# Policy loss
# ----------------------------------------------------------------------------------------------

CONFIGS = [
    LossConfig(),
    LossConfig(clip_low=0.2, clip_high=0.28, agg_mode="seq-mean-token-sum"),
    LossConfig(clip_low=0.1, clip_high=0.3, dual_clip=1.5, agg_mode="seq-mean-token-mean"),
    LossConfig(dual_clip=3.0, agg_mode="seq-mean-token-sum-norm", max_len=10),
    LossConfig(ratio_level="sequence", agg_mode="seq-mean-token-mean", clip_low=3e-4,
               clip_high=4e-4),
    LossConfig(ratio_level="sequence", dual_clip=1.2, clip_low=0.05, clip_high=0.05),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.ratio_level}-{c.agg_mode}-{c.dual_clip}")
def test_policy_loss_matches_loops(data, cfg):
  loss, metrics = losses.policy_loss(data["logp"], data["old"], data["adv"], data["mask"], cfg)
  want, ratio = ref_policy_loss(data["logp"], data["old"], data["adv"], data["mask"], cfg)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  m = data["mask"].astype(bool)
  a = np.broadcast_to(data["adv"][:, None], (B, T))
  high = (a > 0) & (ratio > 1 + cfg.clip_high)
  low = (a < 0) & (ratio < 1 - cfg.clip_low)
  np.testing.assert_allclose(metrics["clip_frac_high"], high[m].mean(), atol=1e-6)
  np.testing.assert_allclose(metrics["clip_frac_low"], low[m].mean(), atol=1e-6)
  np.testing.assert_allclose(metrics["clip_frac"], (high | low)[m].mean(), atol=1e-6)
  tok_lr = (data["logp"].astype(np.float64) - data["old"])[m]
  np.testing.assert_allclose(metrics["approx_kl"], np.mean(np.exp(tok_lr) - 1 - tok_lr), rtol=1e-5)
  np.testing.assert_allclose(metrics["ppo_kl"], np.mean(-tok_lr), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["ratio_mean"], ratio[m].mean(), rtol=1e-5)
  if cfg.dual_clip is not None:
    clipped = np.maximum(-a * ratio, -a * np.clip(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high))
    dual = (a < 0) & (clipped > -a * cfg.dual_clip)
    np.testing.assert_allclose(metrics["dual_clip_frac"], dual[m].mean(), atol=1e-6)
  if cfg == CONFIGS[2] or cfg == CONFIGS[0]:
    assert 0 < float(metrics["clip_frac_low"]) and 0 < float(metrics["clip_frac_high"])


def test_policy_loss_matches_verl_formulas_in_torch(data):
  """verl compute_policy_loss_vanilla (token-mean, dual clip 3.0, clip-higher), as we read it."""
  torch = pytest.importorskip("torch")
  cfg = LossConfig(clip_low=0.2, clip_high=0.28, dual_clip=3.0)
  logp, old = torch.tensor(data["logp"]), torch.tensor(data["old"])
  adv = torch.tensor(data["adv"])[:, None].expand(B, T)
  mask = torch.tensor(data["mask"])
  ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
  l1, l2 = -adv * ratio, -adv * torch.clamp(ratio, 1 - 0.2, 1 + 0.28)
  c1 = torch.maximum(l1, l2)
  l3 = -adv * 3.0
  pg = torch.where(adv < 0, torch.min(l3, c1), c1)
  want = (pg * mask).sum() / mask.sum()
  clipfrac = (torch.gt(l2, l1).float() * mask).sum() / mask.sum()
  lower = ((torch.gt(c1, l3) * (adv < 0)).float() * mask).sum() / mask.sum()
  loss, metrics = losses.policy_loss(data["logp"], data["old"], data["adv"], data["mask"], cfg)
  np.testing.assert_allclose(loss, want.item(), rtol=1e-5)
  np.testing.assert_allclose(metrics["clip_frac"], clipfrac.item(), atol=1e-6)
  np.testing.assert_allclose(metrics["dual_clip_frac"], lower.item(), atol=1e-6)


def test_gspo_gradient_is_per_token_with_sequence_ratio(data):
  """d loss / d logp_bt = -A_b s_b m_bt / D where unclipped (the GSPO-token form)."""
  cfg = LossConfig(ratio_level="sequence", clip_low=10.0 ** -6, clip_high=100.0,
                   agg_mode="token-mean")
  cfg = dataclasses.replace(cfg, clip_low=0.999)  # nothing clips
  grad = jax.grad(lambda lp: losses.policy_loss(lp, data["old"], data["adv"], data["mask"],
                                                cfg)[0])(data["logp"])
  m = data["mask"]
  lr = (data["logp"].astype(np.float64) - data["old"]) * m
  s = np.exp(lr.sum(-1) / np.maximum(m.sum(-1), 1))
  want = -data["adv"][:, None] * s[:, None] * m / m.sum()
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


def test_grpo_loss_composes_terms(data):
  cfg = LossConfig(kl_coef=0.05, entropy_coef=0.01, agg_mode="seq-mean-token-mean")
  ent = np.abs(data["ref"])
  total, metrics = losses.grpo_loss(data["logp"], data["old"], data["ref"], data["adv"],
                                    data["mask"], cfg, entropy_BxT=ent)
  pg, _ = ref_policy_loss(data["logp"], data["old"], data["adv"], data["mask"], cfg)
  kl = ref_aggregate(ref_kl(data["logp"], data["ref"], "low_var_kl"), data["mask"], cfg.agg_mode)
  h = ref_aggregate(ent, data["mask"], cfg.agg_mode)
  np.testing.assert_allclose(total, pg + 0.05 * kl - 0.01 * h, rtol=1e-5)
  np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-5)
  np.testing.assert_allclose(metrics["entropy"], h, rtol=1e-5)
  # beta = 0 needs no reference.
  total0, m0 = losses.grpo_loss(data["logp"], data["old"], None, data["adv"], data["mask"],
                                LossConfig())
  assert "kl" not in m0 and np.isfinite(total0)


def test_bf16_inputs_give_float32(data):
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  loss, metrics = losses.grpo_loss(bf(data["logp"]), bf(data["old"]), bf(data["ref"]),
                                   bf(data["adv"]), data["mask"], LossConfig(kl_coef=0.1),
                                   entropy_BxT=bf(np.abs(data["ref"])))
  assert loss.dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in metrics.values())
  want, _ = ref_policy_loss(np.asarray(bf(data["logp"]), np.float32),
                            np.asarray(bf(data["old"]), np.float32),
                            np.asarray(bf(data["adv"]), np.float32), data["mask"], LossConfig())
  np.testing.assert_allclose(metrics["pg_loss"], want, rtol=1e-5, atol=1e-6)


def test_jit_vmap_and_sharded_agree(data):
  cfg = LossConfig(clip_high=0.28, dual_clip=3.0, kl_coef=0.1, agg_mode="seq-mean-token-mean")
  args = (data["logp"], data["old"], data["ref"], data["adv"], data["mask"])
  fn = functools.partial(losses.grpo_loss, config=cfg)
  eager = fn(*args)[0]
  jitted = jax.jit(fn)(*args)[0]
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)
  # vmap over an outer axis of two copies of the batch.
  stacked = [np.stack([x, x]) for x in args]
  vmapped = jax.vmap(lambda *a: fn(*a)[0])(*stacked)
  np.testing.assert_allclose(vmapped, [eager, eager], rtol=1e-6)
  mesh = sharding.make_mesh()
  put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
  sharded = jax.jit(fn)(*(put(x) for x in args))[0]
  np.testing.assert_allclose(sharded, eager, rtol=1e-5)
  logits = put(data["logits"])
  np.testing.assert_allclose(jax.jit(losses.token_logprobs_from_logits)(logits, put(data["targets"])),
                             losses.token_logprobs_from_logits(data["logits"], data["targets"]),
                             rtol=1e-6, atol=1e-6)
  assert isinstance(logits.sharding, NamedSharding) and logits.sharding.spec[0] == "data"


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(clip_low=1.0), "LossConfig.clip_low"),
    (dict(clip_high=-0.1), "LossConfig.clip_high"),
    (dict(dual_clip=1.0), "LossConfig.dual_clip"),
    (dict(ratio_level="seq"), "LossConfig.ratio_level"),
    (dict(agg_mode="mean"), "LossConfig.agg_mode"),
    (dict(kl_coef=-1.0), "LossConfig.kl_coef"),
    (dict(kl_kind="k4"), "LossConfig.kl_kind"),
    (dict(entropy_coef=-0.1), "LossConfig.entropy_coef"),
    (dict(max_len=0), "LossConfig.max_len"),
    (dict(clip_low="0.2"), "LossConfig.clip_low"),
])
def test_loss_config_validates(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    LossConfig(**kwargs)


def test_bad_arrays_name_the_argument(data):
  cfg = LossConfig()
  with pytest.raises(ValueError, match="advantages_B"):
    losses.policy_loss(data["logp"], data["old"], data["adv"][:3], data["mask"], cfg)
  with pytest.raises(ValueError, match="old_logp_BxT"):
    losses.policy_loss(data["logp"], data["old"][:, :2], data["adv"], data["mask"], cfg)
  with pytest.raises(ValueError, match="mask_BxT"):
    losses.aggregate(data["logp"], data["mask"][:2], "token-mean")
  with pytest.raises(ValueError, match="mode: unknown"):
    losses.aggregate(data["logp"], data["mask"], "sum")
  with pytest.raises(ValueError, match="kind: unknown"):
    losses.kl_penalty(data["logp"], data["ref"], "full")
  with pytest.raises(ValueError, match="ref_logp_BxT"):
    losses.grpo_loss(data["logp"], data["old"], None, data["adv"], data["mask"],
                     LossConfig(kl_coef=0.1))
  with pytest.raises(ValueError, match="entropy_BxT"):
    losses.grpo_loss(data["logp"], data["old"], None, data["adv"], data["mask"],
                     LossConfig(entropy_coef=0.1))
  with pytest.raises(ValueError, match="targets_BxT"):
    losses.token_logprobs_from_logits(data["logits"], data["targets"][:, :2])
  with pytest.raises(TypeError, match="config"):
    losses.policy_loss(data["logp"], data["old"], data["adv"], data["mask"], {"clip_low": 0.2})


def test_entropy_makes_no_float32_copy_of_bf16_logits():
  b, t, v = 4, 64, 4096
  compiled = jax.jit(losses.entropy_from_logits).lower(
      jax.ShapeDtypeStruct((b, t, v), jnp.bfloat16)).compile()
  mem = compiled.memory_analysis()
  if mem is None:
    pytest.skip("no memory analysis on this backend")
  assert mem.temp_size_in_bytes < b * t * v * 4 // 4


def test_logprobs_of_extreme_logits_are_finite():
  logits = np.array([[[1e4, -1e4, 0.0], [-np.inf, 0.0, 0.0]]], np.float32)
  got = losses.token_logprobs_from_logits(logits, np.array([[1, 2]], np.int32))
  np.testing.assert_allclose(got, [[-2e4, np.log(0.5)]], rtol=1e-6)


def test_entropy_gradient_matches_autodiff_of_the_plain_formula(data):
  def plain(x):
    logp = jax.nn.log_softmax(x, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  w = np.random.default_rng(1).normal(size=(B, T)).astype(np.float32)
  got = jax.grad(lambda x: jnp.sum(losses.entropy_from_logits(x) * w))(data["logits"])
  want = jax.grad(lambda x: jnp.sum(plain(x) * w))(data["logits"])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Chunked LM head (the trainer's path)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 1, 4, 5, 6])
def test_head_logprobs_chunked_match_loops(data, chunk):
  rng = np.random.default_rng(1)
  E = 7
  hidden = rng.normal(size=(B, T, E)).astype(np.float32)
  w = (rng.normal(size=(E, V)) * 0.7).astype(np.float32)
  logits = np.einsum("bte,ev->btv", hidden, w)
  logp, ent = losses.head_logprobs(jnp.asarray(hidden), jnp.asarray(w), data["targets"],
                                   chunk_size=chunk, with_entropy=True)
  np.testing.assert_allclose(logp, ref_logprobs(logits, data["targets"]), atol=2e-5)
  np.testing.assert_allclose(ent, ref_entropy(logits), atol=2e-5)
  alone, none = losses.head_logprobs(jnp.asarray(hidden), jnp.asarray(w), data["targets"],
                                     chunk_size=chunk)
  assert none is None
  np.testing.assert_allclose(alone, logp, atol=1e-6)


def test_head_logprobs_gradients_equal_the_unchunked_formula(data):
  """d/d(hidden, W) of sum(logp) + 0.3 sum(entropy), chunked in 4s, vs plain jnp on full logits."""
  rng = np.random.default_rng(2)
  hidden = jnp.asarray(rng.normal(size=(B, T, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(5, V)), jnp.float32)
  tgt = jnp.asarray(data["targets"])

  def chunked(h, w):
    lp, ent = losses.head_logprobs(h, w, tgt, chunk_size=4, with_entropy=True)
    return jnp.sum(lp) + 0.3 * jnp.sum(ent)

  def plain(h, w):
    logits = jnp.einsum("bte,ev->btv", h, w)
    logsm = jax.nn.log_softmax(logits, -1)
    lp = jnp.take_along_axis(logsm, tgt[..., None], -1)[..., 0]
    ent = -jnp.sum(jnp.exp(logsm) * logsm, -1)
    return jnp.sum(lp) + 0.3 * jnp.sum(ent)

  got, want = jax.grad(chunked, (0, 1))(hidden, w), jax.grad(plain, (0, 1))(hidden, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5)


def test_auto_chunk_size_bounds_the_logits_and_evens_out_chunks():
  # 8 rows x 49152 vocab: 1.5 MB of f32 logits per position -> at most 170 positions per 256 MB.
  c = losses.auto_chunk_size(8, 96, 49152)
  assert c == 96
  c = losses.auto_chunk_size(64, 96, 49152)  # 21 positions max -> 5 chunks of 20 (not 21+21+...+12)
  assert 64 * c * 49152 * 4 <= losses.AUTO_CHUNK_BYTES and c == 20
  assert losses.auto_chunk_size(10**6, 3, 10**6) == 1
