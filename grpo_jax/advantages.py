"""Outcome advantage estimators over groups of responses (GRPO and its relatives).

Every response i has one scalar reward r_i and a group id g(i) (the prompt it answers). An
estimator turns rewards into one advantage per response, using statistics of the response's
group. All group statistics are computed with segment reductions (`jax.ops.segment_sum`, plus one
`segment_max` for the shift below), so ids may come in any order, groups may have uneven sizes,
and nothing loops over groups in Python. `num_groups` is static (it sizes the segment outputs).

The trainer's own layout is the special case of contiguous equal groups, ids =
`repeat(arange(num_groups), G)` (`grpo_jax.groups`). Pass `group_size=G` and the same statistics
are reductions of the rewards reshaped to [num_groups, G]: no scatter, no gather; the mean/std
estimators make two fused passes over [N], one for the [num_groups] statistics and one for the
output (`_contiguous_moments`; bench/advantages.py measures it against a memory copy). Results
equal the segment path (tests/test_advantages.py).

Notation: G_g is the set of *valid* members of group g, n = |G_g|, mean_g and std_g its mean and
standard deviation; std uses `std_ddof` (1 = unbiased, as `torch.std`, verl and TRL; 0 = population).

Conventions shared by every estimator (and where peers differ):
  * Padding: samples with `valid == 0` get advantage 0 and are ignored by every statistic
    (group and batch).
  * Groups of one: baseline 0 and std 1, as verl does (`id2mean = 0, id2std = 1`); so `grpo` gives
    r / (1 + eps) and `rloo` gives r. TRL never has such groups (fixed G >= 2).
  * All-equal groups: exactly 0, never NaN. Sums are taken over d_i = r_i - max_g r (a shifted
    data algorithm; contiguous groups of G <= 16 shift by their first valid reward instead): a
    group of equal rewards has d = 0 exactly, so mean and deviation are exact zeros whatever the
    magnitude of r, and rewards of 1e6 scale keep their small differences.
  * No variance floor: (r - mean) / (std + eps) only. (A vectorised verl variant once used
    sqrt(max(var, eps)) and shrank the advantages of a group {1.0, 1.0001} a hundredfold.)
  * eps: verl and Tunix use 1e-6 (our default), TRL uses 1e-4; pass `eps=1e-4` for TRL parity.

Estimators (`ESTIMATORS`, selected by name in the config):
  grpo                  (r - mean_g) / (std_g + eps)          DeepSeekMath (Shao et al. 2024);
                        verl `compute_grpo_outcome_advantage`, TRL `scale_rewards="group"`.
  grpo_no_std, dr_grpo  r - mean_g                              Dr. GRPO (Liu et al. 2025); verl
                        `norm_adv_by_std_in_grpo=False`, TRL `scale_rewards="none"`.
  rloo                  r - (sum_g - r) / (n - 1) = n/(n-1) (r - mean_g)
                        RLOO (Ahmadian et al. 2024); verl `compute_rloo_outcome_advantage`.
  reinforce_pp_baseline x = r - mean_g, then (x - mean(x)) / sqrt(var(x) + whiten_eps) over the
                        batch (unbiased var, whiten_eps 1e-8 as verl `masked_whiten`).
                        REINFORCE++ (Hu 2025). verl whitens over *tokens*, i.e. weights each
                        response by its length: pass `lengths` to reproduce that exactly.
  grpo_batch_std        (r - mean_g) / (std(r over the whole batch) + eps); TRL
                        `scale_rewards="batch"` (std of the raw rewards, unbiased), as in
                        "Tricks or Traps" (Liu et al. 2025).
  grpo_passk            only the best response of a group is credited: A = r_max - r_second
                        (divided by std_g + eps if `norm_by_std`, verl's default), others 0.
                        Pass@k training (Chen et al. 2025); verl `compute_grpo_passk_outcome_advantage`.
                        Ties for the max credit the lowest index (A = 0 then anyway).
  opo                   r - sum_g(l r) / sum_g(l), l = response length (`lengths`, required).
                        OPO (Hao et al. 2025); verl `compute_opo_outcome_advantage`.
  remax                 r - b, b = reward of the greedy response (`baseline`, required).
                        ReMax (Li et al. 2023); verl `compute_remax_outcome_advantage`.
  gpg                   alpha (r - mean_g) / f_norm, alpha = n_valid / #(r != 0).
                        GPG (Chu et al. 2025); verl `compute_gpg_outcome_advantage`.

Token-level estimators with a critic live in `gae.py`, apart from these.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Contiguous groups up to this size reduce as a chain over their columns, larger ones as rows.
_COLUMN_REDUCE_MAX = 16
# Contiguous groups from this size materialise their mean/variance from one pass (see
# `_contiguous_moments`).
_PACK_MOMENTS_MIN = 8


class _Groups:
  """Group reductions over [N] samples: segment ops for any ids, row reductions for contiguous.

  `group_size=None`: ids in any order (`jax.ops.segment_*`, scatters). `group_size=G`: sample i
  belongs to group i // G (ids = repeat(arange(num_groups), G)), so x_N.reshape(num_groups, G)
  holds one group per row and every statistic is a row reduction XLA fuses with its inputs.
  (The mean/std moments of contiguous groups bypass these: `_contiguous_moments`.)
  """

  def __init__(self, gids_N: Array, num_groups: int, group_size: int | None = None,
               masked: bool = True):
    self.gids_N, self.num_groups, self.group_size = gids_N, num_groups, group_size
    self.masked = masked  # False: every sample is valid (`valid=None`), known statically.

  def _reduce(self, x_N, op, jnp_op):
    x_BxG = x_N.reshape(self.num_groups, self.group_size)
    if self.group_size > _COLUMN_REDUCE_MAX:
      acc_B = jnp_op(x_BxG, axis=1)
    else:
      # Small groups: XLA:CPU's row reduction over a minor axis of 4-16 is 5-30x slower
      # than an elementwise chain over the G columns, which fuses into one pass.
      acc_B = x_BxG[:, 0]
      for j in range(1, self.group_size):
        acc_B = op(acc_B, x_BxG[:, j])
    # Materialise the [B] statistic: fused into its consumers, XLA would recompute each group's
    # max / mean inside every later reduction (O(G^2) work per group, 90x a copy at G = 4).
    return jax.lax.optimization_barrier(acc_B)

  def sum(self, x_N: Array) -> Array:
    if self.group_size is None:
      return jax.ops.segment_sum(x_N, self.gids_N, num_segments=self.num_groups)
    return self._reduce(x_N, jnp.add, jnp.sum)

  def max(self, x_N: Array) -> Array:
    if self.group_size is None:
      return jax.ops.segment_max(x_N, self.gids_N, num_segments=self.num_groups)
    return self._reduce(x_N, jnp.maximum, jnp.max)

  def min(self, x_N: Array) -> Array:
    if self.group_size is None:
      return jax.ops.segment_min(x_N, self.gids_N, num_segments=self.num_groups)
    return self._reduce(x_N, jnp.minimum, jnp.min)

  def expand(self, x_G: Array) -> Array:
    """Each sample's entry of a per-group array: x_G[g(i)]."""
    if self.group_size is None:
      return x_G[self.gids_N]
    n = self.num_groups * self.group_size
    return jnp.broadcast_to(x_G[:, None], (self.num_groups, self.group_size)).reshape(n)



# ----------------------------------------------------------------------------------------------
# Group statistics
# ----------------------------------------------------------------------------------------------


def _moments(r_N: Array, seg: _Groups, w_N: Array):
  """Per-group count, shift, mean of the shifted values and sum of squared deviations.

  Returns (count_G, shift_G, dmean_G, m2_G, dev_N) with dev_N = (r_N - shift[g]) - dmean[g]
  (0 where invalid), mean_g = shift_g + dmean_g and var_g = m2_g / (count_g - ddof).
  """
  if seg.group_size is not None:
    return _contiguous_moments(r_N, seg.num_groups, seg.group_size, w_N, seg.masked)
  valid_N = w_N > 0
  # Shift by the group max: exact zeros for all-equal groups, and small numbers to square.
  shift_G = seg.max(jnp.where(valid_N, r_N, -jnp.inf))
  shift_G = jnp.where(jnp.isfinite(shift_G), shift_G, 0.0)
  d_N = jnp.where(valid_N, r_N - seg.expand(shift_G), 0.0)
  # Separate [N] reductions: on CPU one scatter of stacked [N, 2] rows costs more than two.
  count_G = seg.sum(w_N)
  s1_G = seg.sum(d_N)
  dmean_G = s1_G / jnp.maximum(count_G, 1.0)
  # Second pass on deviations from the mean (two-pass variance: no cancellation).
  dev_N = jnp.where(valid_N, d_N - seg.expand(dmean_G), 0.0)
  m2_G = seg.sum(dev_N * dev_N)
  return count_G, shift_G, dmean_G, m2_G, dev_N


def _contiguous_moments(r_N: Array, num_groups: int, group_size: int, w_N: Array,
                        masked: bool):
  """`_moments` of contiguous equal groups: rewards as [B, G], no [N] intermediate.

  The same two-pass statistics, written so that XLA makes two passes over the rewards: one
  computing the [B] statistics, one writing dev_N (its consumers fuse into it). No [N] array
  between them (each one costs a write and a read more than the copy floor) and no barrier on
  each statistic: through `_Groups.sum/max` the grpo kernel compiled to 4 fusions at G = 4
  (one writing d as [N]) and 8 at G = 64, now 2 and 1 (bench/advantages.py, BENCHMARKS.md).

  For G <= 16 the shift is the group's first valid reward instead of its max: any member gives
  d = 0 exactly for an all-equal group and small d to square; the first one is a select chain
  (a plain slice without `valid`), while a max chain made the kernel 1.4-2.2x slower with
  `jnp.maximum` (NaN-propagating) and 1.2-1.4x as a plain compare-select.
  """
  B, G = num_groups, group_size
  r_BxG, w_BxG = r_N.reshape(B, G), w_N.reshape(B, G)
  valid_BxG = w_BxG > 0
  if G > _COLUMN_REDUCE_MAX:
    # Row reductions: XLA:CPU runs the whole kernel (reductions, broadcasts, output) as one
    # fused pass (YNNPACK) at these sizes; a column chain would read with a stride of G. The
    # shift is the max, as on the segment path: the first valid member of a row would need a
    # gather, and the max costs nothing measurable here.
    count_B = jnp.sum(w_BxG, axis=1)
    shift_B = jnp.max(jnp.where(valid_BxG, r_BxG, -jnp.inf), axis=1)
    shift_B = jnp.where(count_B > 0, shift_B, 0.0)
    d_BxG = jnp.where(valid_BxG, r_BxG - shift_B[:, None], 0.0)
    dmean_B = jnp.sum(d_BxG, axis=1) / jnp.maximum(count_B, 1.0)
    dev_BxG = jnp.where(valid_BxG, d_BxG - dmean_B[:, None], 0.0)
    m2_B = jnp.sum(dev_BxG * dev_BxG, axis=1)
    return count_B, shift_B, dmean_B, m2_B, dev_BxG.reshape(-1)
  # Small groups: XLA:CPU's row reduction over a minor axis of 4-16 is 5-30x slower than an
  # elementwise chain over the G columns, which LLVM vectorises over 8 groups at a time.
  r_j = [r_BxG[:, j] for j in range(G)]
  v_j = [valid_BxG[:, j] for j in range(G)]
  shift_B = jnp.zeros((B,), jnp.float32)
  for j in reversed(range(G)):  # the first valid reward (0 for an empty group)
    shift_B = jnp.where(v_j[j], r_j[j], shift_B)
  # d_0 is 0 (the shift is r_0 where member 0 is valid): the chains start at column 1, which
  # saves XLA the r_0 - r_0 it cannot fold (NaN semantics).
  d_j = [jnp.where(v, r - shift_B, 0.0) for r, v in zip(r_j[1:], v_j[1:])]
  count_B = _chain_sum([w_BxG[:, j] for j in range(G)])
  s1_B = _chain_sum(d_j) if d_j else jnp.zeros((B,), jnp.float32)
  dmean_B = s1_B / jnp.maximum(count_B, 1.0)
  m2_B = _chain_sum([jnp.where(v_j[0], dmean_B * dmean_B, 0.0)] +
                    [jnp.where(v, (d - dmean_B) ** 2, 0.0) for d, v in zip(d_j, v_j[1:])])
  if G >= _PACK_MOMENTS_MIN:
    # Materialise both [B] moments from one pass ([B, 2]). Left to XLA, the output pass
    # recomputes dmean per group (G scalar adds): at G = 4 that is 1.0-1.3x faster than
    # packing, at G = 8-16 1.1-1.5x slower.
    packed_Bx2 = jax.lax.optimization_barrier(jnp.stack([dmean_B, m2_B], axis=1))
    dmean_B, m2_B = packed_Bx2[:, 0], packed_Bx2[:, 1]
  if masked:
    # With a traced mask, XLA:CPU (jax 0.10.2) miscompiled the broadcast form below at G = 16
    # inside reinforce_pp_baseline with lengths (a whitened output off by up to 1.8, right with
    # the HLO pass "fusion" disabled; tests/test_advantages.py caught it). Stacking the columns
    # computes the same values and compiles right; it costs about 2x at N = 1e6, but the
    # trainer passes no mask (`valid=None`) and takes the broadcast form.
    dev_j = [jnp.where(v_j[0], -dmean_B, 0.0)]
    dev_j += [jnp.where(v, d - dmean_B, 0.0) for d, v in zip(d_j, v_j[1:])]
    dev_BxG = jnp.stack(dev_j, axis=1)
  else:
    dev_BxG = (r_BxG - shift_B[:, None]) - dmean_B[:, None]
  return count_B, shift_B, dmean_B, m2_B, dev_BxG.reshape(-1)


def _chain_sum(cols_B: list[Array]) -> Array:
  acc_B = cols_B[0]
  for c in cols_B[1:]:
    acc_B = acc_B + c
  return acc_B


def _std(m2_G: Array, count_G: Array, ddof: int) -> Array:
  denom_G = count_G - ddof
  return jnp.where(denom_G > 0, jnp.sqrt(m2_G / jnp.maximum(denom_G, 1.0)), 0.0)


def _centered(r_N, seg, w_N):
  """r - mean_g with verl's baseline 0 for groups of one; also returns the moments."""
  count_G, shift_G, dmean_G, m2_G, dev_N = _moments(r_N, seg, w_N)
  single_N = seg.expand(count_G) <= 1
  centered_N = jnp.where(single_N, r_N, dev_N)
  return centered_N, count_G, m2_G, single_N


def group_stats(rewards: Any, group_ids: Any, num_groups: int, *, valid: Any = None,
                ddof: int = 1, group_size: int | None = None) -> tuple[Array, Array, Array]:
  """Mean, std and count of the valid rewards of each group, for metrics and export.

  Unlike the estimators' internal convention, these are the plain statistics: a group of one has
  its own reward as mean and std 0; an empty group (no valid member) has mean 0, std 0, count 0;
  std is 0 wherever count <= ddof.

  Args:
    rewards: [N] rewards (any float dtype; computed in float32).
    group_ids: [N] int ids in [0, num_groups).
    num_groups: static number of groups.
    valid: optional [N] mask; 0 entries are ignored.
    ddof: 1 for the unbiased std (torch.std), 0 for the population std.
    group_size: G when ids are contiguous equal groups (see `compute_advantages`).

  Returns:
    (mean_G, std_G, count_G), float32 [num_groups] each.
  """
  if isinstance(ddof, bool) or not isinstance(ddof, int) or ddof < 0:
    raise ValueError(f"ddof: expected an int >= 0, got {ddof!r}")
  r_N, seg, w_N = _check_inputs(rewards, group_ids, num_groups, valid, group_size)
  count_G, shift_G, dmean_G, m2_G, _ = _moments(r_N, seg, w_N)
  mean_G = jnp.where(count_G > 0, shift_G + dmean_G, 0.0)
  return mean_G, _std(m2_G, count_G, ddof), count_G


def per_sample_stats(rewards: Any, group_ids: Any, num_groups: int, *, valid: Any = None,
                     ddof: int = 1, group_size: int | None = None) -> tuple[Array, Array]:
  """Each sample's group mean and std ([N] each, float32), as `group_stats` defines them."""
  mean_G, std_G, _ = group_stats(rewards, group_ids, num_groups, valid=valid, ddof=ddof,
                                 group_size=group_size)
  seg = _Groups(jnp.asarray(group_ids), int(num_groups), group_size)
  return seg.expand(mean_G), seg.expand(std_G)


# ----------------------------------------------------------------------------------------------
# Estimators: fn(r_N, seg, w_N, *, eps, **kwargs) -> adv_N (float32, unmasked)
# ----------------------------------------------------------------------------------------------


def _check_ddof(std_ddof):
  if isinstance(std_ddof, bool) or not isinstance(std_ddof, int) or std_ddof < 0:
    raise ValueError(f"std_ddof: expected an int >= 0, got {std_ddof!r}")


def grpo(r_N, seg, w_N, *, eps, std_ddof: int = 1):
  """(r - mean_g) / (std_g + eps); groups of one use mean 0, std 1 (verl)."""
  _check_ddof(std_ddof)
  centered_N, count_G, m2_G, single_N = _centered(r_N, seg, w_N)
  std_N = jnp.where(single_N, 1.0, seg.expand(_std(m2_G, count_G, std_ddof)))
  return centered_N / (std_N + eps)


def grpo_no_std(r_N, seg, w_N, *, eps):
  """r - mean_g (Dr. GRPO); groups of one keep r."""
  del eps
  return _centered(r_N, seg, w_N)[0]


def rloo(r_N, seg, w_N, *, eps):
  """r - mean of the other members = n/(n-1) (r - mean_g); groups of one keep r (verl)."""
  del eps
  centered_N, count_G, _, single_N = _centered(r_N, seg, w_N)
  n_N = seg.expand(count_G)
  return jnp.where(single_N, centered_N, centered_N * n_N / jnp.maximum(n_N - 1.0, 1.0))


def _whiten(x_N, weight_N, whiten_eps):
  """(x - mean) / sqrt(var + whiten_eps) with weighted mean and unbiased var (verl masked_whiten)."""
  total = jnp.sum(weight_N)
  mean = jnp.sum(weight_N * x_N) / jnp.maximum(total, 1e-12)
  dev_N = x_N - mean
  var = jnp.sum(weight_N * dev_N * dev_N) / jnp.maximum(total, 1e-12)
  var = var * total / jnp.maximum(total - 1.0, 1e-12)  # Bessel correction, as verl.
  return dev_N * jax.lax.rsqrt(var + whiten_eps)


def reinforce_pp_baseline(r_N, seg, w_N, *, eps, lengths=None,
                          whiten_eps: float = 1e-8):
  """r - mean_g, then whitened over the valid samples (token-weighted if `lengths` is given)."""
  del eps
  centered_N = _centered(r_N, seg, w_N)[0]
  weight_N = w_N if lengths is None else w_N * lengths
  return _whiten(centered_N, weight_N, whiten_eps)


def grpo_batch_std(r_N, seg, w_N, *, eps, std_ddof: int = 1):
  """(r - mean_g) / (std of all valid rewards of the batch + eps) (TRL scale_rewards="batch")."""
  _check_ddof(std_ddof)
  centered_N = _centered(r_N, seg, w_N)[0]
  n = jnp.sum(w_N)
  # Shift by one valid reward before squaring, for the same reason as in `_moments`.
  ref = jnp.max(jnp.where(w_N > 0, r_N, -jnp.inf))
  ref = jnp.where(jnp.isfinite(ref), ref, 0.0)
  d_N = jnp.where(w_N > 0, r_N - ref, 0.0)
  dev_N = jnp.where(w_N > 0, d_N - jnp.sum(d_N) / jnp.maximum(n, 1.0), 0.0)
  denom = n - std_ddof
  std = jnp.where(denom > 0, jnp.sqrt(jnp.sum(dev_N * dev_N) / jnp.maximum(denom, 1.0)), 0.0)
  return centered_N / (std + eps)


def grpo_passk(r_N, seg, w_N, *, eps, norm_by_std: bool = True,
               std_ddof: int = 1):
  """Pass@k: the group's best response gets r_max - r_second (/ (std_g + eps)), the rest 0."""
  _check_ddof(std_ddof)
  valid_N = w_N > 0
  n_samples = r_N.shape[0]
  count_G, shift_G, _, m2_G, _ = _moments(r_N, seg, w_N)
  # The segment path shifts by the max; contiguous small groups shift by their first member.
  max_G = shift_G if seg.group_size is None else seg.max(jnp.where(valid_N, r_N, -jnp.inf))
  idx_N = jnp.arange(n_samples, dtype=jnp.int32)
  is_max_N = valid_N & (r_N == seg.expand(max_G))
  winner_G = seg.min(jnp.where(is_max_N, idx_N, n_samples))
  winner_N = valid_N & (idx_N == seg.expand(winner_G))
  second_G = seg.max(jnp.where(valid_N & ~winner_N, r_N, -jnp.inf))
  gap_G = jnp.where(count_G >= 2, max_G - second_G, 0.0)
  if norm_by_std:
    gap_G = gap_G / (_std(m2_G, count_G, std_ddof) + eps)
  return jnp.where(winner_N, seg.expand(gap_G), 0.0)


def opo(r_N, seg, w_N, *, eps, lengths=None):
  """r - length-weighted group mean sum(l r)/sum(l); groups of one keep r (verl)."""
  del eps
  if lengths is None:
    raise ValueError("lengths: estimator 'opo' needs the response lengths ([N] array)")
  l_N = lengths * w_N
  # Weighted mean of d = r - max_g (as in `_moments`): l*r at 1e6 scale would lose the digits.
  shift_G = seg.max(jnp.where(w_N > 0, r_N, -jnp.inf))
  shift_G = jnp.where(jnp.isfinite(shift_G), shift_G, 0.0)
  d_N = jnp.where(w_N > 0, r_N - seg.expand(shift_G), 0.0)
  count_G = seg.sum(w_N)
  lsum_G = seg.sum(l_N)
  ldsum_G = seg.sum(l_N * d_N)
  dbase_G = ldsum_G / jnp.where(lsum_G > 0, lsum_G, 1.0)
  multi_N = seg.expand(count_G > 1) & seg.expand(lsum_G > 0)
  return jnp.where(multi_N, d_N - seg.expand(dbase_G), r_N)


def remax(r_N, seg, w_N, *, eps, baseline=None):
  """r - b, b the reward of the greedy response to the same prompt (given per sample)."""
  del seg, w_N, eps
  if baseline is None:
    raise ValueError("baseline: estimator 'remax' needs the greedy responses' rewards ([N] array)")
  return r_N - baseline


def gpg(r_N, seg, w_N, *, eps, f_norm: float = 1.0):
  """alpha (r - mean_g) / f_norm with alpha = valid samples / nonzero rewards (verl's GPG)."""
  del eps
  centered_N = _centered(r_N, seg, w_N)[0]
  nonzero = jnp.sum(jnp.where((w_N > 0) & (r_N != 0), 1.0, 0.0))
  alpha = jnp.sum(w_N) / jnp.maximum(nonzero, 1.0)
  return alpha * centered_N / f_norm


ESTIMATORS: dict[str, Callable[..., Array]] = {
    "grpo": grpo,
    "grpo_no_std": grpo_no_std,
    "dr_grpo": grpo_no_std,
    "rloo": rloo,
    "reinforce_pp_baseline": reinforce_pp_baseline,
    "grpo_batch_std": grpo_batch_std,
    "grpo_passk": grpo_passk,
    "opo": opo,
    "remax": remax,
    "gpg": gpg,
}

# Keyword arguments that are per-sample [N] arrays (validated and cast like `rewards`).
_ARRAY_KWARGS = ("lengths", "baseline")


# ----------------------------------------------------------------------------------------------
# Entry point and input validation
# ----------------------------------------------------------------------------------------------


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_inputs(rewards, group_ids, num_groups, valid, group_size=None):
  """Shape/dtype checks always; value checks only where values are concrete (outside jit).

  Returns (r_N float32 with padding zeroed, the `_Groups` of the ids, w_N float32 0/1).
  """
  if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)):
    raise TypeError(f"num_groups: expected a static Python int, got {type(num_groups).__name__}"
                    " (mark it static under jit)")
  num_groups = int(num_groups)
  if num_groups < 1:
    raise ValueError(f"num_groups: expected >= 1, got {num_groups}")
  r = jnp.asarray(rewards)
  if r.ndim != 1:
    raise ValueError(f"rewards: expected a 1-D [N] array, got shape {r.shape}")
  if not (jnp.issubdtype(r.dtype, jnp.floating) or jnp.issubdtype(r.dtype, jnp.integer)
          or r.dtype == jnp.bool_):
    raise TypeError(f"rewards: expected a real dtype, got {r.dtype}")
  g = jnp.asarray(group_ids)
  if g.shape != r.shape:
    raise ValueError(f"group_ids: expected shape {r.shape} like rewards, got {g.shape}")
  if not jnp.issubdtype(g.dtype, jnp.integer):
    raise TypeError(f"group_ids: expected an integer dtype, got {g.dtype}")
  if valid is None:
    w = jnp.ones(r.shape, jnp.float32)
  else:
    w = jnp.asarray(valid)
    if w.shape != r.shape:
      raise ValueError(f"valid: expected shape {r.shape} like rewards, got {w.shape}")
    w = (w != 0).astype(jnp.float32)
  if _is_concrete(g) and g.size:
    g_np = np.asarray(g)
    lo, hi = int(g_np.min()), int(g_np.max())
    if lo < 0:
      raise ValueError(f"group_ids: ids must be >= 0, got {lo}")
    if hi >= num_groups:
      raise ValueError(f"num_groups: {num_groups} is too small for group id {hi} "
                       f"(ids must be < num_groups)")
  if _is_concrete(r) and _is_concrete(w) and r.size:
    r_np = np.asarray(r, np.float32)
    bad = ~np.isfinite(r_np) & (np.asarray(w) > 0)
    if bad.any():
      i = int(np.flatnonzero(bad)[0])
      raise ValueError(f"rewards: non-finite value {r_np[i]} at index {i} "
                       f"({int(bad.sum())} non-finite valid rewards)")
  if group_size is not None:
    if (isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer))
        or group_size < 1):
      raise ValueError(f"group_size: expected a static int >= 1 or None, got {group_size!r}")
    group_size = int(group_size)
    if r.shape[0] != num_groups * group_size:
      raise ValueError(f"group_size: {num_groups} groups of {group_size} are "
                       f"{num_groups * group_size} samples, got {r.shape[0]}")
    if _is_concrete(g) and g.size and not np.array_equal(
        np.asarray(g), np.repeat(np.arange(num_groups), group_size)):
      raise ValueError(f"group_ids: with group_size={group_size} the ids must be "
                       f"repeat(arange(num_groups), group_size) (contiguous equal groups)")
  # Padding may hold anything (NaN included): zero it so that no statistic can see it.
  r = jnp.where(w > 0, r.astype(jnp.float32), 0.0)
  return r, _Groups(g.astype(jnp.int32), num_groups, group_size, masked=valid is not None), w


def compute_advantages(rewards: Any, group_ids: Any, num_groups: int, *, estimator: str = "grpo",
                       eps: float = 1e-6, valid: Any = None, group_size: int | None = None,
                       **estimator_kwargs) -> Array:
  """One advantage per response from its reward and its group (see the module docstring).

  Jittable with `num_groups`, `estimator` and non-array keyword arguments static, e.g.
  `jax.jit(compute_advantages, static_argnames=("num_groups", "estimator"))`.

  Args:
    rewards: [N] rewards (float32, bfloat16, int...; computed in float32).
    group_ids: [N] int group ids in [0, num_groups), in any order, groups of any size.
    num_groups: number of groups (static; sizes the segment reductions).
    estimator: a name in `ESTIMATORS`.
    eps: added to std in std-normalised estimators (verl/Tunix 1e-6, TRL 1e-4).
    valid: optional [N] mask; invalid (padding) samples get 0 and count in no statistic.
    group_size: static G when the ids are `repeat(arange(num_groups), G)` (the trainer's layout,
      `grpo_jax.groups.group_ids`): statistics become row reductions of [num_groups, G] instead
      of scatters. Checked against the ids where they are concrete; under jit it is a promise.
    **estimator_kwargs: per-estimator options: `std_ddof` (grpo, grpo_batch_std, grpo_passk),
      `norm_by_std` (grpo_passk), `lengths` [N] (opo required, reinforce_pp_baseline optional),
      `whiten_eps` (reinforce_pp_baseline), `baseline` [N] (remax), `f_norm` (gpg).

  Returns:
    float32 [N] advantages, 0 where `valid` is 0.

  Raises:
    ValueError / TypeError naming the argument for unknown estimators, unknown options, bad
    shapes or dtypes, and (outside jit, where values are known) negative ids, ids >= num_groups,
    non-finite valid rewards and groups too small for `grpo_passk`.
  """
  if not isinstance(estimator, str) or estimator not in ESTIMATORS:
    raise ValueError(f"estimator: unknown {estimator!r} (known: {', '.join(ESTIMATORS)})")
  fn = ESTIMATORS[estimator]
  accepted = [p for p in inspect.signature(fn).parameters
              if inspect.signature(fn).parameters[p].kind == inspect.Parameter.KEYWORD_ONLY
              and p != "eps"]
  for key in estimator_kwargs:
    if key not in accepted:
      raise TypeError(f"{key}: not an option of estimator {estimator!r} "
                      f"(options: {', '.join(accepted) or 'none'})")
  if _is_concrete(eps) and not (isinstance(eps, (int, float, np.floating)) and eps >= 0):
    raise ValueError(f"eps: expected a float >= 0, got {eps!r}")
  r_N, seg, w_N = _check_inputs(rewards, group_ids, num_groups, valid, group_size)
  kwargs = dict(estimator_kwargs)
  for key in _ARRAY_KWARGS:
    if kwargs.get(key) is not None:
      x = jnp.asarray(kwargs[key])
      if x.shape != r_N.shape:
        raise ValueError(f"{key}: expected shape {r_N.shape} like rewards, got {x.shape}")
      if _is_concrete(x) and x.size and not np.isfinite(np.asarray(x, np.float32)).all():
        raise ValueError(f"{key}: contains non-finite values")
      kwargs[key] = x.astype(jnp.float32)
  if estimator == "grpo_passk" and _is_concrete(seg.gids_N) and _is_concrete(w_N):
    counts = np.bincount(np.asarray(seg.gids_N), weights=np.asarray(w_N),
                         minlength=int(num_groups))
    small = np.flatnonzero((counts > 0) & (counts < 2))
    if small.size:
      raise ValueError(f"group_ids: estimator 'grpo_passk' needs >= 2 valid responses per group; "
                       f"group {int(small[0])} has {int(counts[small[0]])}")
  adv_N = fn(r_N, seg, w_N, eps=eps, **kwargs)
  return jnp.where(w_N > 0, adv_N, 0.0).astype(jnp.float32)
