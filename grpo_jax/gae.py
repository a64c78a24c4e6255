"""Token-level Generalized Advantage Estimation (Schulman et al. 2016) for PPO with a critic.

Kept apart from the group estimators of `advantages.py`: GAE needs a value model and token-level
rewards, the group estimators need neither. Same semantics as verl's `compute_gae_advantage_return`
(the version that skips masked tokens):

  delta_t     = r_t + gamma * V_next - V_t
  A_t         = delta_t + gamma * lam * A_next
  returns_t   = A_t + V_t

where V_next / A_next are the value / advantage of the next token *with mask 1*: tokens with mask
0 (padding, or text retrieved by a tool inside a response) are skipped, passing both through
unchanged, so a retrieved span neither bootstraps nor breaks the recursion. Past the last valid
token V_next = A_next = 0. Outputs are 0 where mask is 0. Whitening (verl whitens advantages over
the batch afterwards) is left to the caller.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_gae(rewards_BxT: jax.Array, values_BxT: jax.Array, mask_BxT: jax.Array, gamma: float,
                lam: float) -> tuple[jax.Array, jax.Array]:
  """GAE advantages and returns, one reverse `lax.scan` over T.

  Args:
    rewards_BxT: token-level rewards (typically the outcome reward on the last response token,
      minus any per-token KL penalty).
    values_BxT: critic values V(s_t).
    mask_BxT: 1 for response tokens that act, 0 to skip (padding, retrieved text).
    gamma: discount in [0, 1].
    lam: GAE lambda in [0, 1].

  Returns:
    (advantages_BxT, returns_BxT), float32, 0 where mask is 0.
  """
  for name, x in (("rewards_BxT", rewards_BxT), ("values_BxT", values_BxT),
                  ("mask_BxT", mask_BxT)):
    if jnp.ndim(x) != 2:
      raise ValueError(f"{name}: expected a 2-D [B, T] array, got shape {jnp.shape(x)}")
  if jnp.shape(values_BxT) != jnp.shape(rewards_BxT) or jnp.shape(mask_BxT) != jnp.shape(
      rewards_BxT):
    raise ValueError(f"values_BxT / mask_BxT: expected shape {jnp.shape(rewards_BxT)} like "
                     f"rewards_BxT, got {jnp.shape(values_BxT)} / {jnp.shape(mask_BxT)}")
  for name, x in (("gamma", gamma), ("lam", lam)):
    if not isinstance(x, jax.core.Tracer) and not 0.0 <= float(x) <= 1.0:
      raise ValueError(f"{name}: expected a float in [0, 1], got {x!r}")
  r_TxB = jnp.asarray(rewards_BxT, jnp.float32).T
  v_TxB = jnp.asarray(values_BxT, jnp.float32).T
  m_TxB = jnp.asarray(mask_BxT).astype(jnp.float32).T

  def step(carry, x):
    next_value_B, next_adv_B = carry
    r_B, v_B, m_B = x
    delta_B = r_B + gamma * next_value_B - v_B
    adv_B = delta_B + gamma * lam * next_adv_B
    # A skipped token hands the carry through untouched.
    carry = (m_B * v_B + (1.0 - m_B) * next_value_B, m_B * adv_B + (1.0 - m_B) * next_adv_B)
    return carry, adv_B * m_B

  zeros_B = jnp.zeros(r_TxB.shape[1:], jnp.float32)
  _, adv_TxB = jax.lax.scan(step, (zeros_B, zeros_B), (r_TxB, v_TxB, m_TxB), reverse=True)
  adv_BxT = adv_TxB.T
  m_BxT = m_TxB.T
  return adv_BxT, (adv_BxT + v_TxB.T) * m_BxT
