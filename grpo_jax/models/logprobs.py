"""Per-token log-probabilities (and entropies) of a sequence under the policy, chunked over time.

Alignment: entry t of the result is log p(tokens[t] | tokens[<t]), computed from the hidden state
at t - 1. Entry 0 has no context and is 0, and so is every entry whose token is padding
(attention_mask 0). So `logprobs_BxT * response_mask_BxT` lines up with the response tokens
directly; no shifting in the loss.

Memory: the [B, T, V] float32 logits are the largest tensor of a training step (a 150k vocab at
B*T = 16k tokens is ~10 GB). With `chunk_size` set they are never built: the final hidden states
are split into chunks of `chunk_size` positions and `lax.map` runs LM head + logsumexp + gather per
chunk, under `jax.checkpoint`, so the forward holds one [B, C, V] chunk at a time and the backward
recomputes each chunk's logits instead of storing them all. Without it (the default here) one
chunk holds all of them. The trainer does not use this module: `update.response_logprobs` runs
`losses.head_logprobs` on the response positions only, chunked automatically.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from grpo_jax.models.decoder import Decoder


def _chunk_stats(hidden_BxCxE, targets_BxC, w_ExV, with_entropy: bool):
  logits_BxCxV = jnp.einsum("bce,ev->bcv", hidden_BxCxE, w_ExV,
                            preferred_element_type=jnp.float32)
  lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
  tgt_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[:, :, None], axis=-1)[:, :, 0]
  logp_BxC = tgt_BxC - lse_BxC
  if not with_entropy:
    return logp_BxC, jnp.zeros_like(logp_BxC)
  probs_BxCxV = jnp.exp(logits_BxCxV - lse_BxC[:, :, None])
  ent_BxC = lse_BxC - jnp.sum(probs_BxCxV * logits_BxCxV, axis=-1)
  return logp_BxC, ent_BxC


def logprobs_from_hidden(hidden_BxTxE: jax.Array, w_ExV: jax.Array, tokens_BxT: jax.Array,
                         attention_mask_BxT: jax.Array, *, chunk_size: int | None = None,
                         with_entropy: bool = False):
  """Chunked next-token log-probs (and entropies) from final hidden states and an [E, V] head.

  Returns:
    (logprobs_BxT, entropy_BxT) float32, aligned as in the module docstring; entropy_BxT[t] is
    the entropy of the distribution that predicted tokens[t] (zeros unless `with_entropy`).
  """
  B, T, E = hidden_BxTxE.shape
  if tokens_BxT.shape != (B, T) or attention_mask_BxT.shape != (B, T):
    raise ValueError(f"tokens / attention_mask: expected shape {(B, T)}, got "
                     f"{tokens_BxT.shape} / {attention_mask_BxT.shape}")
  if T < 2:
    z = jnp.zeros((B, T), jnp.float32)
    return z, z
  n = T - 1
  c = n if chunk_size is None else max(1, min(int(chunk_size), n))
  num_chunks = -(-n // c)
  pad = num_chunks * c - n
  prev_BxNxE = jnp.pad(hidden_BxTxE[:, :-1], ((0, 0), (0, pad), (0, 0)))
  tgt_BxN = jnp.pad(tokens_BxT[:, 1:].astype(jnp.int32), ((0, 0), (0, pad)))
  w_ExV = w_ExV.astype(hidden_BxTxE.dtype)
  # [num_chunks, B, C, ...]: lax.map walks the leading axis.
  prev_NxBxCxE = prev_BxNxE.reshape(B, num_chunks, c, E).transpose(1, 0, 2, 3)
  tgt_NxBxC = tgt_BxN.reshape(B, num_chunks, c).transpose(1, 0, 2)
  fn = jax.checkpoint(functools.partial(_chunk_stats, with_entropy=with_entropy))
  logp, ent = jax.lax.map(lambda xs: fn(xs[0], xs[1], w_ExV), (prev_NxBxCxE, tgt_NxBxC))
  logp_BxN = logp.transpose(1, 0, 2).reshape(B, num_chunks * c)[:, :n]
  ent_BxN = ent.transpose(1, 0, 2).reshape(B, num_chunks * c)[:, :n]
  keep_BxN = attention_mask_BxT[:, 1:].astype(jnp.bool_)
  zero_Bx1 = jnp.zeros((B, 1), jnp.float32)
  logp_BxT = jnp.concatenate([zero_Bx1, jnp.where(keep_BxN, logp_BxN, 0.0)], axis=1)
  ent_BxT = jnp.concatenate([zero_Bx1, jnp.where(keep_BxN, ent_BxN, 0.0)], axis=1)
  return logp_BxT, ent_BxT


def token_logprobs(model: Decoder, tokens_BxT: jax.Array, attention_mask_BxT: jax.Array, *,
                   chunk_size: int | None = None) -> jax.Array:
  """log p(tokens[t] | tokens[<t]) as float32 [B, T]; entry 0 and padded entries are 0.

  Args:
    model: the Decoder (use inside jit via nnx.merge for the functional form).
    tokens_BxT: left-padded prompt + response tokens.
    attention_mask_BxT: 1 for real tokens.
    chunk_size: positions per LM-head chunk (None: one chunk). 256-1024 keeps the logits of a
      150k vocab small while the matmul stays large.
  """
  hidden_BxTxE = model(tokens_BxT, attention_mask=attention_mask_BxT, return_hidden=True)
  logp_BxT, _ = logprobs_from_hidden(hidden_BxTxE, model.lm_head_weight(), tokens_BxT,
                                     attention_mask_BxT, chunk_size=chunk_size)
  return logp_BxT


def token_logprobs_and_entropy(model: Decoder, tokens_BxT: jax.Array,
                               attention_mask_BxT: jax.Array, *,
                               chunk_size: int | None = None) -> tuple[jax.Array, jax.Array]:
  """(logprobs_BxT, entropy_BxT) float32, same alignment as `token_logprobs`."""
  hidden_BxTxE = model(tokens_BxT, attention_mask=attention_mask_BxT, return_hidden=True)
  return logprobs_from_hidden(hidden_BxTxE, model.lm_head_weight(), tokens_BxT,
                              attention_mask_BxT, chunk_size=chunk_size, with_entropy=True)
