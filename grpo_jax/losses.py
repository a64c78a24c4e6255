"""GRPO / PPO losses: log-probs (chunked LM head), clipped surrogate, KL, entropy, aggregation.

Symbols: for response i and token t, pi = current policy, pi_old = rollout policy, pi_ref =
frozen reference; ratio rho_it = pi(y_it) / pi_old(y_it); A_i the response's advantage
(`advantages.py`); m_it the loss mask (1 = a generated token that counts; padding and text
retrieved by a tool are 0).

The loss of one batch (DeepSeekMath's GRPO objective, with DAPO's and GSPO's variants) is

  L = agg_it[ max(-A_i rho_it, -A_i clip(rho_it, 1 - eps_low, 1 + eps_high)) ]   (dual clip below)
      + beta * agg_it[ KL_it(pi || pi_ref) ] - c_ent * agg_it[ H_it ]

with `agg` one of the aggregation modes of `aggregate`. Everything is float32, whatever the input
dtype, and every function is a pure jnp function (jittable, vmappable).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3", "low_var_kl")
RATIO_LEVELS = ("token", "sequence")

# verl clamps log-ratios before exp: +-20 for the token ratio and the low-variance KL, 10 (upper
# only) for GSPO's sequence ratio, and the low-variance KL itself to [-10, 10].
_LOG_RATIO_CLAMP = 20.0
_SEQ_LOG_RATIO_MAX = 10.0
_LOW_VAR_KL_CLAMP = 10.0


def _check_2d(name: str, x, shape=None):
  if jnp.ndim(x) != 2:
    raise ValueError(f"{name}: expected a 2-D [B, T] array, got shape {jnp.shape(x)}")
  if shape is not None and tuple(jnp.shape(x)) != tuple(shape):
    raise ValueError(f"{name}: expected shape {tuple(shape)}, got {jnp.shape(x)}")


# ----------------------------------------------------------------------------------------------
# From logits
# ----------------------------------------------------------------------------------------------


@jax.custom_jvp
def _logsumexp_f32(x_BxTxV: Array) -> Array:
  """float32 logsumexp over the last axis in ONE pass (online max / rescaled sum).

  A variadic `lax.reduce` keeps the bf16 -> f32 upcast inside the reduction: the two-reduction
  form (max, then sum of exp) made XLA:CPU materialise a float32 [B, T, V] copy of bf16 logits
  shared by both reductions (caught by tests/test_losses.py).
  """
  x = x_BxTxV.astype(jnp.float32)

  def combine(a, b):
    (m1, s1), (m2, s2) = a, b
    m = jnp.maximum(m1, m2)
    # m1 == m covers -inf == -inf, where exp(m1 - m) would be NaN.
    return m, (s1 * jnp.where(m1 == m, 1.0, jnp.exp(m1 - m))
               + s2 * jnp.where(m2 == m, 1.0, jnp.exp(m2 - m)))

  m, s = jax.lax.reduce((x, jnp.ones_like(x)), (jnp.float32(-jnp.inf), jnp.float32(0.0)),
                        combine, (x.ndim - 1,))
  return m + jnp.log(s)


@_logsumexp_f32.defjvp
def _logsumexp_f32_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  lse = _logsumexp_f32(x)
  p = jnp.exp(x.astype(jnp.float32) - lse[..., None])
  return lse, jnp.sum(p * dx.astype(jnp.float32), axis=-1)


def _online_moments_f32(x: Array) -> tuple[Array, Array, Array]:
  """One online reduction over the last axis: max m, s = sum e^(x-m), t = sum e^(x-m) x."""

  def combine(a, b):
    (m1, s1, t1), (m2, s2, t2) = a, b
    m = jnp.maximum(m1, m2)
    e1 = jnp.where(m1 == m, 1.0, jnp.exp(m1 - m))
    e2 = jnp.where(m2 == m, 1.0, jnp.exp(m2 - m))
    return m, s1 * e1 + s2 * e2, t1 * e1 + t2 * e2

  m, s, t = jax.lax.reduce((x, jnp.ones_like(x), x), (jnp.float32(-jnp.inf), jnp.float32(0.0),
                                                      jnp.float32(0.0)),
                           combine, (x.ndim - 1,))
  return m, s, t


@jax.custom_jvp
def _entropy_f32(x_BxTxV: Array) -> Array:
  """Entropy in ONE pass: online (max m, sum e^(x-m), sum e^(x-m) x); H = m + log s - t / s.

  One reduction for the same reason as `_logsumexp_f32` (a separate logsumexp and sum shared a
  materialised float32 copy of bf16 logits).
  """
  x = x_BxTxV.astype(jnp.float32)
  m, s, t = _online_moments_f32(x)
  # H = lse - E_p[x] with lse = m + log s and E_p[x] = t / s.
  return m + jnp.log(s) - t / s


@_entropy_f32.defjvp
def _entropy_f32_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  h = _entropy_f32(x)
  xf = x.astype(jnp.float32)
  p = jnp.exp(xf - _logsumexp_f32(x)[..., None])
  mu = jnp.sum(p * xf, axis=-1)
  # dH/dx_v = -p_v (x_v - E_p[x]).
  return h, -jnp.sum(p * (xf - mu[..., None]) * dx.astype(jnp.float32), axis=-1)


def token_logprobs_from_logits(logits_BxTxV: Array, targets_BxT: Array) -> Array:
  """log softmax(logits)[target] = logit[target] - logsumexp(logits), float32 [B, T].

  Only the (one-pass) logsumexp reduction reads the logits in float32, the upcast fused into it;
  the target logit is gathered in the input dtype and upcast alone. No [B, T, V] float32
  log_softmax is materialised.
  """
  if jnp.ndim(logits_BxTxV) != 3:
    raise ValueError(f"logits_BxTxV: expected a 3-D [B, T, V] array, got {jnp.shape(logits_BxTxV)}")
  _check_2d("targets_BxT", targets_BxT, jnp.shape(logits_BxTxV)[:2])
  if not jnp.issubdtype(jnp.result_type(targets_BxT), jnp.integer):
    raise TypeError(f"targets_BxT: expected an integer dtype, got {jnp.result_type(targets_BxT)}")
  lse_BxT = _logsumexp_f32(logits_BxTxV)
  target_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None].astype(jnp.int32),
                                   axis=-1)[..., 0]
  return target_BxT.astype(jnp.float32) - lse_BxT


def entropy_from_logits(logits_BxTxV: Array) -> Array:
  """Entropy of softmax(logits), H = logsumexp(x) - sum_v p_v x_v, float32 [B, T]."""
  if jnp.ndim(logits_BxTxV) != 3:
    raise ValueError(f"logits_BxTxV: expected a 3-D [B, T, V] array, got {jnp.shape(logits_BxTxV)}")
  return _entropy_f32(logits_BxTxV)


@jax.custom_jvp
def _lse_and_entropy_f32(x_BxTxV: Array) -> tuple[Array, Array]:
  """(logsumexp, entropy) over the last axis from ONE online reduction (m, s, t as in
  `_entropy_f32`): the update needs both from the same logits chunk, and a second pass would read
  the chunk again."""
  x = x_BxTxV.astype(jnp.float32)
  m, s, t = _online_moments_f32(x)
  lse = m + jnp.log(s)
  return lse, lse - t / s


@_lse_and_entropy_f32.defjvp
def _lse_and_entropy_f32_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  lse, h = _lse_and_entropy_f32(x)
  xf, dxf = x.astype(jnp.float32), dx.astype(jnp.float32)
  p = jnp.exp(xf - lse[..., None])
  mu = jnp.sum(p * xf, axis=-1)
  # dlse/dx_v = p_v; dH/dx_v = -p_v (x_v - E_p[x]).
  return (lse, h), (jnp.sum(p * dxf, axis=-1),
                    -jnp.sum(p * (xf - mu[..., None]) * dxf, axis=-1))


# f32 logits of one LM-head chunk: large enough that the [rows * C, E] x [E, V] matmul runs at full
# rate, small enough to be a minor term next to the activations (Qwen2.5's 152k vocabulary: ~440
# positions x rows per chunk; SmolLM2's 49k: ~1,365).
AUTO_CHUNK_BYTES = 256 * 2**20


def auto_chunk_size(rows: int, length: int, vocab_size: int, max_bytes: int | None = None) -> int:
  """Positions per LM-head chunk so that [rows, C, V] float32 logits stay under `max_bytes`
  (default `AUTO_CHUNK_BYTES`).

  The chunks are then evened out (C = ceil(length / ceil(length / C_max))), so that the padding
  of the last chunk is at most one position per chunk.
  """
  max_bytes = AUTO_CHUNK_BYTES if max_bytes is None else max_bytes
  c_max = max(1, int(max_bytes // max(rows * vocab_size * 4, 1)))
  num_chunks = -(-length // c_max)
  return -(-length // num_chunks)


def _head_chunk(hidden_BxCxE, targets_BxC, w_ExV, with_entropy: bool, temperature: float = 1.0):
  logits_BxCxV = jnp.einsum("bce,ev->bcv", hidden_BxCxE, w_ExV,
                            preferred_element_type=jnp.float32)
  if temperature != 1.0:
    # The float32 logits divided by T, exactly as the sampler divides them before its draw
    # (`sampling.sample_tokens_uniform`): dividing the head's weight instead rounds differently.
    logits_BxCxV = logits_BxCxV / jnp.float32(temperature)
  tgt_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[:, :, None], axis=-1)[:, :, 0]
  if with_entropy:
    lse_BxC, ent_BxC = _lse_and_entropy_f32(logits_BxCxV)
    return tgt_BxC - lse_BxC, ent_BxC
  return tgt_BxC - _logsumexp_f32(logits_BxCxV), None


def head_logprobs(hidden_BxTxE: Array, w_ExV: Array, targets_BxT: Array, *,
                  chunk_size: int | None = None, with_entropy: bool = False,
                  temperature: float = 1.0) -> tuple[Array, Array | None]:
  """log softmax(hidden[t] @ W / T)[targets[t]] (and the entropy), float32 [B, T], LM head chunked.

  The [B, T, V] logits are never built: `lax.map` walks chunks of `chunk_size` positions (None:
  `auto_chunk_size`), each under `jax.checkpoint`, so the forward holds one [B, C, V] chunk and
  the backward recomputes each chunk's logits instead of storing them. Log-prob and entropy come
  from one pass over each chunk (`_lse_and_entropy_f32`). Note the alignment: hidden[t] predicts
  targets[t] (shift before calling). Pass only the positions whose predictions are needed (the
  response's): the head costs 2 E V flops per position.

  Returns:
    (logp_BxT, entropy_BxT or None without `with_entropy`).
  """
  B, T, E = hidden_BxTxE.shape
  if jnp.shape(targets_BxT) != (B, T):
    raise ValueError(f"targets_BxT: expected shape {(B, T)}, got {jnp.shape(targets_BxT)}")
  V = w_ExV.shape[-1]
  c = auto_chunk_size(B, T, V) if not chunk_size else max(1, min(int(chunk_size), T))
  num_chunks = -(-T // c)
  pad = num_chunks * c - T
  h_BxNxE = jnp.pad(hidden_BxTxE, ((0, 0), (0, pad), (0, 0)))
  tgt_BxN = jnp.pad(jnp.asarray(targets_BxT).astype(jnp.int32), ((0, 0), (0, pad)))
  w_ExV = w_ExV.astype(hidden_BxTxE.dtype)
  fn = jax.checkpoint(lambda h, t: _head_chunk(h, t, w_ExV, with_entropy, temperature))
  if num_chunks == 1:
    logp_BxN, ent_BxN = fn(h_BxNxE, tgt_BxN)
  else:
    # [num_chunks, B, C, ...]: lax.map walks the leading axis; B (the sharded one) stays whole.
    h_KxBxCxE = h_BxNxE.reshape(B, num_chunks, c, E).transpose(1, 0, 2, 3)
    tgt_KxBxC = tgt_BxN.reshape(B, num_chunks, c).transpose(1, 0, 2)
    logp, ent = jax.lax.map(lambda xs: fn(xs[0], xs[1]), (h_KxBxCxE, tgt_KxBxC))
    unchunk = lambda x: x.transpose(1, 0, 2).reshape(B, num_chunks * c)
    logp_BxN = unchunk(logp)
    ent_BxN = unchunk(ent) if with_entropy else None
  logp_BxT = logp_BxN[:, :T]
  ent_BxT = ent_BxN[:, :T] if with_entropy else None
  return logp_BxT, ent_BxT


# ----------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence", 2020) of KL(pi || pi_ref), sampled
# from pi, per token with log r = log pi_ref - log pi:
#   k1 = -log r = logp - ref_logp                        (verl "kl"; unbiased, high variance)
#   k2 = (log r)^2 / 2                                   (verl "mse"; biased, low variance)
#   k3 = (r - 1) - log r, log r clamped to [-20, 20], result clamped to [-10, 10]
#        (unbiased, >= 0, low variance; verl "low_var_kl" == "k3", DeepSeekMath's GRPO KL)
# ----------------------------------------------------------------------------------------------


def kl_penalty(logp_BxT: Array, ref_logp_BxT: Array, kind: str = "low_var_kl") -> Array:
  """Per-token KL estimate of pi vs pi_ref (formulas above), float32 [B, T]."""
  if kind not in KL_KINDS:
    raise ValueError(f"kind: unknown KL estimator {kind!r} (known: {', '.join(KL_KINDS)})")
  if jnp.shape(logp_BxT) != jnp.shape(ref_logp_BxT):
    raise ValueError(f"ref_logp_BxT: expected shape {jnp.shape(logp_BxT)} like logp_BxT, got "
                     f"{jnp.shape(ref_logp_BxT)}")
  diff_BxT = jnp.asarray(logp_BxT, jnp.float32) - jnp.asarray(ref_logp_BxT, jnp.float32)
  if kind == "k1":
    return diff_BxT
  if kind == "k2":
    return 0.5 * jnp.square(diff_BxT)
  log_r_BxT = jnp.clip(-diff_BxT, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
  k3_BxT = jnp.exp(log_r_BxT) - log_r_BxT - 1.0
  return jnp.clip(k3_BxT, -_LOW_VAR_KL_CLAMP, _LOW_VAR_KL_CLAMP)


# ----------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------


def aggregate_denominator(mask_BxT: Array, mode: str) -> Array:
  """The normaliser `aggregate` uses for this (full) batch, float32 scalar.

  token-mean: the number of valid tokens; every seq-mean mode: the number of sequences with at
  least one valid token (fully masked rows, e.g. filtered groups, do not dilute the mean).
  Compute it on the whole minibatch and pass it to `aggregate` of each micro-batch: the sum of the
  micro-batch values is then the minibatch value, and so is the sum of their gradients.
  """
  if mode not in AGG_MODES:
    raise ValueError(f"mode: unknown aggregation {mode!r} (known: {', '.join(AGG_MODES)})")
  _check_2d("mask_BxT", mask_BxT)
  m_BxT = jnp.asarray(mask_BxT).astype(jnp.float32)
  if mode == "token-mean":
    return jnp.sum(m_BxT)
  return jnp.sum((jnp.sum(m_BxT, axis=-1) > 0).astype(jnp.float32))


def aggregate(values_BxT: Array, mask_BxT: Array, mode: str, *, denominator=None,
              max_len: int | None = None) -> Array:
  """Reduces per-token values to a scalar (verl `agg_loss` modes), float32.

  With S = sum_t m_bt v_bt (token sum of row b), n_b = sum_t m_bt and D the denominator:
    token-mean:               sum_b S_b / D,          D = total valid tokens      (DAPO)
    seq-mean-token-sum:       sum_b S_b / D,          D = non-empty sequences
    seq-mean-token-mean:      sum_b (S_b / n_b) / D,  D = non-empty sequences     (GRPO paper)
    seq-mean-token-sum-norm:  sum_b S_b / (D * L),    D = non-empty sequences, L = max_len
                              (Dr. GRPO; TRL `dr_grpo` = sum / (B * max_completion_length)).
                              verl divides the micro-batch sum by L only (no 1/B): a constant
                              factor B away; we keep the per-sequence mean so that the scale
                              does not depend on the batch size.
  Args:
    values_BxT: per-token values (any float dtype).
    mask_BxT: loss mask; masked values are ignored even if NaN.
    mode: one of `AGG_MODES`.
    denominator: D; None computes it from this batch (`aggregate_denominator`). Pass the full
      batch's D when aggregating micro-batches for gradient accumulation. D = 0 gives 0.
    max_len: L of the norm mode (a constant, e.g. the max response length); None uses T.
  """
  if mode not in AGG_MODES:
    raise ValueError(f"mode: unknown aggregation {mode!r} (known: {', '.join(AGG_MODES)})")
  _check_2d("values_BxT", values_BxT)
  _check_2d("mask_BxT", mask_BxT, jnp.shape(values_BxT))
  if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int)
                              or max_len < 1):
    raise ValueError(f"max_len: expected None or an int >= 1, got {max_len!r}")
  m_BxT = jnp.asarray(mask_BxT).astype(jnp.float32)
  v_BxT = jnp.where(m_BxT != 0, jnp.asarray(values_BxT, jnp.float32) * m_BxT, 0.0)
  if denominator is None:
    denominator = aggregate_denominator(m_BxT, mode)
  denominator = jnp.asarray(denominator, jnp.float32)
  if jnp.ndim(denominator) != 0:
    raise ValueError(f"denominator: expected a scalar, got shape {jnp.shape(denominator)}")
  if mode == "seq-mean-token-mean":
    n_B = jnp.sum(m_BxT, axis=-1)
    total = jnp.sum(jnp.sum(v_BxT, axis=-1) / jnp.maximum(n_B, 1.0))
  else:
    total = jnp.sum(v_BxT)
  if mode == "seq-mean-token-sum-norm":
    denominator = denominator * float(max_len if max_len is not None else v_BxT.shape[-1])
  return jnp.where(denominator > 0, total / jnp.where(denominator > 0, denominator, 1.0), 0.0)


# ----------------------------------------------------------------------------------------------
# Policy loss
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static settings of the GRPO loss (hashable: usable as a static jit argument).

  Attributes:
    clip_low: eps_low, ratio >= 1 - clip_low on the clipped branch (PPO 0.2).
    clip_high: eps_high, ratio <= 1 + clip_high (DAPO clip-higher uses 0.28).
    dual_clip: None, or c > 1: for A < 0 the loss is at most -c A (Ye et al. 2020; verl
      clip_ratio_c = 3.0).
    ratio_level: "token" (PPO/GRPO) or "sequence" (GSPO: the length-normalised sequence ratio
      exp(mean_t log rho_it) replaces rho_it, with per-token gradients; pair it with
      agg_mode "seq-mean-token-mean" as the paper and verl do).
    agg_mode: one of `AGG_MODES`.
    kl_coef: beta of the KL to the reference policy; 0 = no KL term and no reference needed.
    kl_kind: one of `KL_KINDS`.
    entropy_coef: weight of the entropy bonus (subtracted from the loss).
    max_len: L of "seq-mean-token-sum-norm" (None: the padded response length T).
  """

  clip_low: float = 0.2
  clip_high: float = 0.2
  dual_clip: float | None = None
  ratio_level: str = "token"
  agg_mode: str = "token-mean"
  kl_coef: float = 0.0
  kl_kind: str = "low_var_kl"
  entropy_coef: float = 0.0
  max_len: int | None = None

  def __post_init__(self):
    def number(name):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"LossConfig.{name}: expected a number, got {v!r}")
      return float(v)

    if not 0.0 <= number("clip_low") < 1.0:
      raise ValueError(f"LossConfig.clip_low: expected a float in [0, 1), got {self.clip_low}")
    if not number("clip_high") >= 0.0:
      raise ValueError(f"LossConfig.clip_high: expected a float >= 0, got {self.clip_high}")
    if self.dual_clip is not None and not number("dual_clip") > 1.0:
      raise ValueError(f"LossConfig.dual_clip: expected None or a float > 1, got {self.dual_clip}")
    if self.ratio_level not in RATIO_LEVELS:
      raise ValueError(f"LossConfig.ratio_level: expected one of {RATIO_LEVELS}, got "
                       f"{self.ratio_level!r}")
    if self.agg_mode not in AGG_MODES:
      raise ValueError(f"LossConfig.agg_mode: expected one of {AGG_MODES}, got {self.agg_mode!r}")
    if not number("kl_coef") >= 0.0:
      raise ValueError(f"LossConfig.kl_coef: expected a float >= 0, got {self.kl_coef}")
    if self.kl_kind not in KL_KINDS:
      raise ValueError(f"LossConfig.kl_kind: expected one of {KL_KINDS}, got {self.kl_kind!r}")
    if not number("entropy_coef") >= 0.0:
      raise ValueError(f"LossConfig.entropy_coef: expected a float >= 0, got {self.entropy_coef}")
    if self.max_len is not None and (isinstance(self.max_len, bool)
                                     or not isinstance(self.max_len, int) or self.max_len < 1):
      raise ValueError(f"LossConfig.max_len: expected None or an int >= 1, got {self.max_len!r}")


def _masked_mean(x_BxT, m_BxT):
  return jnp.sum(jnp.where(m_BxT != 0, x_BxT * m_BxT, 0.0)) / jnp.maximum(jnp.sum(m_BxT), 1.0)


def policy_loss(logp_BxT: Array, old_logp_BxT: Array, advantages_B: Array, mask_BxT: Array,
                config: LossConfig, *, denominator=None) -> tuple[Array, dict[str, Array]]:
  """PPO-clipped policy-gradient loss with DAPO clip-higher, optional dual clip, token or
  sequence (GSPO) ratio, aggregated with `config.agg_mode`.

  Per token (A = advantages_B broadcast over T):
    rho   = exp(clamp(logp - old_logp, -20, 20))                      (token level)
          = exp(min(sg(mean_t(logp - old_logp)) + logp - sg(logp), 10)) (sequence level, GSPO)
    l     = max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high))
    l     = min(l, -c A) where A < 0                                   (if dual_clip = c)
  as verl's `compute_policy_loss_vanilla` / `compute_policy_loss_gspo`.

  Returns:
    (loss, metrics). Metrics are token means over this call's mask, without gradient:
    pg_loss; clip_frac_high (A > 0 and rho > 1 + clip_high); clip_frac_low (A < 0 and
    rho < 1 - clip_low); clip_frac (their sum: verl's pg_clipfrac); dual_clip_frac (verl's
    pg_clipfrac_lower); approx_kl = mean(rho_tok - 1 - log rho_tok), the k3 estimate of
    KL(pi_old || pi) from the rollout samples; ppo_kl = mean(old_logp - logp) (verl's k1);
    ratio_mean, ratio_max.
  """
  if not isinstance(config, LossConfig):
    raise TypeError(f"config: expected a LossConfig, got {type(config).__name__}")
  _check_2d("logp_BxT", logp_BxT)
  shape = jnp.shape(logp_BxT)
  _check_2d("old_logp_BxT", old_logp_BxT, shape)
  _check_2d("mask_BxT", mask_BxT, shape)
  if jnp.shape(advantages_B) != shape[:1]:
    raise ValueError(f"advantages_B: expected shape {shape[:1]} (one per sequence), got "
                     f"{jnp.shape(advantages_B)}")
  m_BxT = jnp.asarray(mask_BxT).astype(jnp.float32)
  logp_BxT = jnp.asarray(logp_BxT, jnp.float32)
  old_BxT = jnp.asarray(old_logp_BxT, jnp.float32)
  a_Bx1 = jnp.asarray(advantages_B, jnp.float32)[:, None]

  tok_log_ratio_BxT = jnp.clip(logp_BxT - old_BxT, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
  if config.ratio_level == "token":
    log_ratio_BxT = tok_log_ratio_BxT
  else:
    n_B = jnp.maximum(jnp.sum(m_BxT, axis=-1), 1.0)
    seq_log_ratio_B = jnp.sum(jnp.where(m_BxT != 0, (logp_BxT - old_BxT) * m_BxT, 0.0),
                              axis=-1) / n_B
    log_ratio_BxT = (logp_BxT - jax.lax.stop_gradient(logp_BxT)
                     + jax.lax.stop_gradient(seq_log_ratio_B)[:, None])
    log_ratio_BxT = jnp.minimum(log_ratio_BxT, _SEQ_LOG_RATIO_MAX)
  ratio_BxT = jnp.exp(log_ratio_BxT)

  loss1_BxT = -a_Bx1 * ratio_BxT
  loss2_BxT = -a_Bx1 * jnp.clip(ratio_BxT, 1.0 - config.clip_low, 1.0 + config.clip_high)
  clipped_BxT = jnp.maximum(loss1_BxT, loss2_BxT)
  if config.dual_clip is not None:
    loss3_BxT = -a_Bx1 * config.dual_clip
    pg_BxT = jnp.where(a_Bx1 < 0, jnp.minimum(clipped_BxT, loss3_BxT), clipped_BxT)
    dual_BxT = (a_Bx1 < 0) & (clipped_BxT > loss3_BxT)
  else:
    pg_BxT = clipped_BxT
    dual_BxT = jnp.zeros(shape, bool)
  loss = aggregate(pg_BxT, m_BxT, config.agg_mode, denominator=denominator,
                   max_len=config.max_len)

  sg = jax.lax.stop_gradient
  ratio_sg = sg(ratio_BxT)
  high_BxT = (a_Bx1 > 0) & (ratio_sg > 1.0 + config.clip_high)
  low_BxT = (a_Bx1 < 0) & (ratio_sg < 1.0 - config.clip_low)
  tok_lr_BxT = sg(tok_log_ratio_BxT)
  f32 = lambda b: b.astype(jnp.float32)
  metrics = {
      "pg_loss": sg(loss),
      "clip_frac_high": _masked_mean(f32(high_BxT), m_BxT),
      "clip_frac_low": _masked_mean(f32(low_BxT), m_BxT),
      "clip_frac": _masked_mean(f32(high_BxT | low_BxT), m_BxT),
      "dual_clip_frac": _masked_mean(f32(sg(dual_BxT)), m_BxT),
      "approx_kl": _masked_mean(jnp.expm1(tok_lr_BxT) - tok_lr_BxT, m_BxT),
      "ppo_kl": _masked_mean(-tok_lr_BxT, m_BxT),
      "ratio_mean": _masked_mean(ratio_sg, m_BxT),
      "ratio_max": jnp.max(jnp.where(m_BxT != 0, ratio_sg, 0.0)),
  }
  return loss, metrics


def grpo_loss(logp_BxT: Array, old_logp_BxT: Array, ref_logp_BxT: Array | None,
              advantages_B: Array, mask_BxT: Array, config: LossConfig, *,
              entropy_BxT: Array | None = None, denominator=None
              ) -> tuple[Array, dict[str, Array]]:
  """pg + kl_coef * agg(KL(pi || pi_ref)) - entropy_coef * agg(entropy), one aggregation mode.

  Args:
    ref_logp_BxT: reference log-probs; required when config.kl_coef > 0 (else, if given, the KL is
      only logged).
    entropy_BxT: per-token entropies (`entropy_from_logits`); required when entropy_coef > 0.
    denominator: the full batch's `aggregate_denominator` (gradient accumulation), or None.

  Returns:
    (total loss, metrics): those of `policy_loss` plus kl, entropy (when available) and loss.
  """
  loss, metrics = policy_loss(logp_BxT, old_logp_BxT, advantages_B, mask_BxT, config,
                              denominator=denominator)
  agg = lambda x: aggregate(x, mask_BxT, config.agg_mode, denominator=denominator,
                            max_len=config.max_len)
  total = loss
  if config.kl_coef > 0 and ref_logp_BxT is None:
    raise ValueError("ref_logp_BxT: config.kl_coef > 0 needs the reference log-probs, got None")
  if ref_logp_BxT is not None:
    kl = agg(kl_penalty(logp_BxT, ref_logp_BxT, config.kl_kind))
    if config.kl_coef > 0:
      total = total + config.kl_coef * kl
    metrics["kl"] = jax.lax.stop_gradient(kl)
  if config.entropy_coef > 0 and entropy_BxT is None:
    raise ValueError("entropy_BxT: config.entropy_coef > 0 needs per-token entropies, got None")
  if entropy_BxT is not None:
    _check_2d("entropy_BxT", entropy_BxT, jnp.shape(logp_BxT))
    entropy = agg(entropy_BxT)
    if config.entropy_coef > 0:
      total = total - config.entropy_coef * entropy
    metrics["entropy"] = jax.lax.stop_gradient(entropy)
  metrics["loss"] = jax.lax.stop_gradient(total)
  return total, metrics
