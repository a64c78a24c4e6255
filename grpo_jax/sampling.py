"""The rollout sampler: jitted KV-cache generation that prefills each prompt once per group.

GRPO draws G responses per prompt. Repeating the prompts G times before the forward (what a plain
`expand_groups` + `generate` does) pays G prefills of the same tokens. Here each of the B prompts
is prefilled once into a KV cache of B rows, then the cache and the last-position logits are
repeated G times along the batch (a a a b b b, the `grpo_jax.groups.expand_groups` order, so that
`group_ids` line up) and the B*G rows decode together.

  out = generate(graphdef, params, prompt_ids_BxP, prompt_mask_BxP, rng, group_size=G,
                 max_new_tokens=R, temperature=1.0, top_k=0, top_p=1.0,
                 stop_token_ids=(eos_id,), pad_token_id=pad_id, mesh=None)
  out.tokens     int32 [B*G, R]  sampled ids; pad_token_id after a row stops
  out.mask       int32 [B*G, R]  1 on generated tokens, the stop token included
  out.logprobs   f32   [B*G, R]  log softmax(logits / T) at the sampled token (T = 1 when greedy);
                                 the unfiltered distribution (top-k / top-p only choose the support),
                                 i.e. what `token_logprobs` of the training forward recomputes
  out.truncated  bool  [B*G]     the row spent R tokens without emitting a stop token

Compilation: prompts are left-padded to `bucket_length(P)` (powers of two and 1.5x powers of two,
at least 16) outside the jit, so the prefill compiles once per prompt-length bucket. The decode
calls compile once per (row bucket, slot bucket) pair: row buckets are four sizes per octave
(`row_bucket`), slots powers of two, and within one call rows only shrink while slots only grow, so
one `generate` visits at most (row buckets + slot buckets - 1) pairs, about 4 log2(B*G) + log2(R)
(11 programs for 32 rows and R = 128 in bench/decode_lengths.py); later calls reuse them and
compile only pairs not seen yet (at most row buckets x slot buckets in all).

Decode loop (`generate`): the prefill makes a per-layer cache of P_bucket + `_CHUNK` slots, then
the host runs device calls of at most `_CHUNK` = 8 steps, each a `lax.while_loop` whose condition
also counts the live rows: a call ends at the step the live count falls into a smaller row bucket
or the held slots are used up. The host then reads one [M] bool (which rows are done) and the step
reached, moves to a working batch of `row_bucket(live rows)` rows (the finished rows leave, the
rest keep their order) and, when the slots were used up, to a cache of twice the slots. So a
step costs what its live rows (plus under 1/4 padding rows) and filled slots cost: decode time
follows the tokens generated, not rows x the longest row, and not the slots preallocated.
`generate(compact=False)` is the same decode as one program over all rows and P_bucket + R slots
(the same draws; for tests and compiled-memory analysis). Inside a call, each step samples one token
per working row, writes it into column t of the [N, R] outputs (a scatter of M entries) and feeds
it through the model at cache slot P_bucket + t; rows that finished inside the call ride along
at mask 0 and write invalid slots that no query reads. Every sampled token, the last included, is
fed, so after `decode` the cache holds the whole context and its `last_logits` predict the next
token: multi-turn rollouts continue from it (`append` then `decode` again) without re-prefilling.

The decode step (`grpo_jax.models.decoder.decode_hidden`) runs on weights unstacked once per call
and a cache of one [N, K, S, D] buffer per layer, updated in place: a layer scan would copy every
layer's weights and whole K/V out of the stacked arrays at every step (bench/decode_step.py).

Sampling: temperature 0 is greedy (argmax). Otherwise logits / T, then top-k (0 = off), then
top-p over what top-k kept (1.0 = off; HF's warper order), then one inverse-CDF draw per row
(`inverse_cdf_draw`: one uniform per row, a two-level cumulative sum; exact in distribution, and
no argmax over the vocabulary). The uniform of output row n at step t is
`uniform(fold_in(rng, t), [N])[n]`: with `jax_threefry_partitionable` it does not depend on how the
batch is sharded or which rows are still working, so 1 device and 8 devices, and compacted and
one-program decodes, draw with the same uniforms. Their tokens are the same up to float32
rounding: attention over a different number of cache slots sums in another order, the logits
move by ~1e-5, and now and then that moves a cumulative-probability boundary past a row's uniform.
On the tiny test models they are identical (tests/test_sampling.py); on SmolLM2-135M-Instruct
(2026-11-29) 1 of 6 rows x 40 tokens split at token 37, and 4 of 32 rows x 64 tokens, each at a
token of probability < 1e-5, with log-probs equal to 3.6e-5 before the split; the old, one-chunk-
per-8-steps code splits on the same rows at the same steps.

Sharding: with `mesh`, prompts and outputs are sharded over the batch axes
(`grpo_jax.sharding.batch_sharding`), the cache like the activations (`cache_logical_axes`),
parameters as given (the training layout). B*G and every row bucket divide by the mesh's batch
multiple.

Lower-level pieces for multi-turn rollouts (Search-R1): `prefill` (prompt -> cache, next-token
logits), `append` (extend a cache with given tokens, e.g. retrieved text, without re-prefilling
the history) and `decode` (sample from a cache until stop tokens or the budget; one program on the
stacked `KVCache`, converted to the per-layer layout for the loop and back, reading only a
power-of-two prefix of the slots when `cache_index` is a Python int).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from grpo_jax import sharding as sharding_lib
from grpo_jax.models import decoder as decoder_lib


@flax.struct.dataclass
class SampleOutput:
  """Generated tokens of N rows with a budget of R tokens. See the module docstring."""

  tokens: jax.Array  # int32 [N, R]
  mask: jax.Array  # int32 [N, R]
  logprobs: jax.Array  # float32 [N, R]
  truncated: jax.Array  # bool [N]


# ----------------------------------------------------------------------------- argument checks


def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name}: expected a Python int, got {type(value).__name__} {value!r}")
  if value < minimum:
    raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
  return int(value)


def _check_sampling(temperature, top_k, top_p, stop_token_ids, pad_token_id):
  """Validates the static sampling settings; returns them normalised (hashable, Python types)."""
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)):
    raise TypeError(f"temperature: expected a float >= 0, got {temperature!r}")
  temperature = float(temperature)
  if not temperature >= 0 or math.isinf(temperature):
    raise ValueError(f"temperature: expected a finite float >= 0 (0 = greedy), got {temperature}")
  top_k = _check_int("top_k", top_k, 0)
  if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating)):
    raise TypeError(f"top_p: expected a float in (0, 1], got {top_p!r}")
  top_p = float(top_p)
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p: expected a float in (0, 1] (1.0 = off), got {top_p}")
  if isinstance(stop_token_ids, (int, np.integer)):
    stop_token_ids = (stop_token_ids,)
  if stop_token_ids is None:
    stop_token_ids = ()
  stop_token_ids = tuple(_check_int("stop_token_ids[]", s, 0) for s in stop_token_ids)
  pad_token_id = _check_int("pad_token_id", pad_token_id, 0)
  return temperature, top_k, top_p, stop_token_ids, pad_token_id


def _check_prompts(prompt_ids, prompt_mask):
  if np.ndim(prompt_ids) != 2:
    raise ValueError(f"prompt_ids: expected int [B, P], got shape {np.shape(prompt_ids)}")
  if np.shape(prompt_mask) != np.shape(prompt_ids):
    raise ValueError(f"prompt_mask: expected shape {np.shape(prompt_ids)} (as prompt_ids), got "
                     f"{np.shape(prompt_mask)}")
  if not jnp.issubdtype(jnp.result_type(prompt_ids), jnp.integer):
    raise TypeError(f"prompt_ids: expected integer token ids, got {jnp.result_type(prompt_ids)}")


# ----------------------------------------------------------------------------- prompt buckets


def bucket_length(n: int, minimum: int = 16) -> int:
  """Smallest bucket >= n among {minimum} ∪ {2^k, 3·2^(k-1)}: at most 1/3 of a bucket is padding."""
  n = _check_int("prompt length", n, 1)
  b = max(int(minimum), 1)
  while b < n:
    b = b * 3 // 2 if (b & (b - 1)) == 0 and b >= 2 else 1 << b.bit_length()
  return b


@functools.partial(jax.jit, static_argnames=("length", "pad_token_id"))
def _left_pad(ids_BxP, mask_BxP, *, length: int, pad_token_id: int):
  extra = length - ids_BxP.shape[1]
  ids = jnp.pad(ids_BxP.astype(jnp.int32), ((0, 0), (extra, 0)), constant_values=pad_token_id)
  mask = jnp.pad(mask_BxP.astype(jnp.int32), ((0, 0), (extra, 0)))
  return ids, mask


# ----------------------------------------------------------------------------- sampling math


def filter_logits(logits_NxV: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets every logit outside the top-k / top-p (nucleus) support to -inf.

  top-p keeps the smallest prefix of the tokens sorted by probability whose mass reaches `top_p`
  (the token that crosses `top_p` included), computed over what top-k kept, as HF's warpers do.
  Tokens tied with the last kept one are kept too.

  Args:
    logits_NxV: float logits (already divided by the temperature).
    top_k: keep the k largest (0 = off).
    top_p: nucleus mass in (0, 1] (1.0 = off).
  """
  V = logits_NxV.shape[-1]
  use_k = 0 < top_k < V
  if not use_k and top_p >= 1.0:
    return logits_NxV
  # Sorted candidate logits, descending: the top k, or the whole vocabulary for top-p alone (a
  # full sort per step: O(V log V) per row, the price of an exact nucleus).
  if use_k:
    cand_NxC, _ = jax.lax.top_k(logits_NxV, top_k)
  else:
    cand_NxC = jnp.flip(jnp.sort(logits_NxV, axis=-1), axis=-1)
  if top_p < 1.0:
    probs_NxC = jax.nn.softmax(cand_NxC.astype(jnp.float32), axis=-1)
    mass_before_NxC = jnp.cumsum(probs_NxC, axis=-1) - probs_NxC
    keep_N = jnp.maximum(jnp.sum(mass_before_NxC < top_p, axis=-1), 1)
  else:
    keep_N = jnp.full(logits_NxV.shape[:-1], cand_NxC.shape[-1])
  threshold_N = jnp.take_along_axis(cand_NxC, (keep_N - 1)[..., None], axis=-1)
  return jnp.where(logits_NxV < threshold_N, -jnp.inf, logits_NxV)


# Vocabulary block of the two-level inverse-CDF draw: a cumulative sum over V/C block masses,
# then over the C tokens of the chosen block (O(V) work, no full-vocabulary scan or argmax).
_DRAW_BLOCK = 256


def _first_max(x_NxV: jax.Array) -> jax.Array:
  """argmax (first index of the max) as two plain reductions; XLA:CPU's variadic argmax is slow."""
  V = x_NxV.shape[-1]
  m_N = jnp.max(x_NxV, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, x_NxV.shape, x_NxV.ndim - 1)
  return jnp.min(jnp.where(x_NxV == m_N, iota, V), axis=-1).astype(jnp.int32)


def inverse_cdf_draw(u_N: jax.Array, weights_NxV: jax.Array) -> jax.Array:
  """Token i with probability w_i / sum(w), by inverting the CDF at u * sum(w), u ~ U[0, 1).

  Exact in distribution up to float32 rounding of the cumulative sums, and never a token of
  weight 0 (the search is clamped to the first / last positive weight). Two levels: block masses
  of `_DRAW_BLOCK` tokens, then the tokens of the chosen block.

  Args:
    u_N: one uniform in [0, 1) per row.
    weights_NxV: non-negative float32 weights, at least one positive per row.
  """
  N, V = weights_NxV.shape
  C = min(_DRAW_BLOCK, V)
  nb = -(-V // C)
  w_NxBxC = jnp.pad(weights_NxV, ((0, 0), (0, nb * C - V))).reshape(N, nb, C)
  bsum_NxB = jnp.sum(w_NxBxC, axis=-1)
  cum_NxB = jnp.cumsum(bsum_NxB, axis=-1)
  target_N = u_N.astype(jnp.float32) * cum_NxB[:, -1]

  def clamp_to_support(i_N, w_NxK):
    K = w_NxK.shape[-1]
    pos_NxK = w_NxK > 0
    iota = jax.lax.broadcasted_iota(jnp.int32, w_NxK.shape, 1)
    first_N = jnp.min(jnp.where(pos_NxK, iota, K), axis=-1)
    last_N = jnp.max(jnp.where(pos_NxK, iota, -1), axis=-1)
    return jnp.clip(i_N, first_N, last_N)

  blk_N = clamp_to_support(jnp.sum(cum_NxB <= target_N[:, None], axis=-1, dtype=jnp.int32),
                           bsum_NxB)
  before_N = (jnp.take_along_axis(cum_NxB, blk_N[:, None], axis=1)
              - jnp.take_along_axis(bsum_NxB, blk_N[:, None], axis=1))[:, 0]
  wb_NxC = jnp.take_along_axis(w_NxBxC, blk_N[:, None, None], axis=1)[:, 0]
  cumb_NxC = jnp.cumsum(wb_NxC, axis=-1)
  j_N = jnp.sum(cumb_NxC <= (target_N - before_N)[:, None], axis=-1, dtype=jnp.int32)
  return blk_N * C + clamp_to_support(j_N, wb_NxC)


def sample_tokens_uniform(u_N: jax.Array, logits_NxV: jax.Array, temperature: float,
                          top_k: int = 0, top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """`sample_tokens` with the row's uniform given: an inverse-CDF draw over the filtered support.

  The exponentials of the tempered logits serve both the draw (zeroed outside the top-k / top-p
  support) and the log-normaliser of the unfiltered distribution, so a step costs one pass of exp
  over [N, V], a max, two sums and small cumulative sums.
  """
  logits_NxV = logits_NxV.astype(jnp.float32)
  if temperature == 0.0:
    tok_N = _first_max(logits_NxV)
    scaled_NxV = logits_NxV
    m_N = jnp.max(scaled_NxV, axis=-1)
    e_NxV = jnp.exp(scaled_NxV - m_N[:, None])
  else:
    scaled_NxV = logits_NxV / jnp.float32(temperature)
    m_N = jnp.max(scaled_NxV, axis=-1)
    e_NxV = jnp.exp(scaled_NxV - m_N[:, None])
    filtered_NxV = filter_logits(scaled_NxV, top_k, top_p)
    w_NxV = e_NxV if filtered_NxV is scaled_NxV else jnp.where(
        filtered_NxV > -jnp.inf, e_NxV, 0.0)
    tok_N = inverse_cdf_draw(u_N, w_NxV)
  logz_N = m_N + jnp.log(jnp.sum(e_NxV, axis=-1))
  picked_N = jnp.take_along_axis(scaled_NxV, tok_N[:, None], axis=-1)[:, 0]
  return tok_N, picked_N - logz_N


def sample_tokens(key: jax.Array, logits_NxV: jax.Array, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """One token per row and its log-probability under softmax(logits / T).

  Args:
    key: PRNG key (unused when greedy); one uniform per row is drawn from it.
    logits_NxV: float32 logits of the next token.
    temperature: 0 = greedy (argmax; log-prob at T = 1).
    top_k, top_p: support filters, see `filter_logits`.

  Returns:
    (tokens_N int32, logprobs_N float32); the log-prob is of the unfiltered tempered distribution.
  """
  u_N = jax.random.uniform(key, logits_NxV.shape[:1], jnp.float32)
  return sample_tokens_uniform(u_N, logits_NxV, temperature, top_k, top_p)


# ----------------------------------------------------------------------------- sharding helpers


def _constrain(x: jax.Array, logical_axes: Sequence[str | None], mesh: Mesh | None) -> jax.Array:
  if mesh is None:
    return x
  spec = sharding_lib.logical_to_spec(logical_axes, x.shape, mesh, sharding_lib.ROLLOUT_RULES)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _constrain_cache(cache: decoder_lib.KVCache, mesh: Mesh | None) -> decoder_lib.KVCache:
  if mesh is None:
    return cache
  axes = decoder_lib.cache_logical_axes()
  return jax.tree.map(lambda x, a: _constrain(x, a, mesh), cache, axes,
                      is_leaf=lambda a: isinstance(a, tuple))


def _batch(x: jax.Array, mesh: Mesh | None) -> jax.Array:
  return _constrain(x, ("batch",) + (None,) * (x.ndim - 1), mesh)


# ----------------------------------------------------------------------------- pure pieces


def _last_valid(hidden_BxTxE: jax.Array, mask_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Hidden state at each row's last real token [B, 1, E], and whether the row has one [B]."""
  T = mask_BxT.shape[1]
  valid_BxT = mask_BxT.astype(jnp.bool_)
  last_B = T - 1 - jnp.argmax(valid_BxT[:, ::-1], axis=1)
  h_Bx1xE = jnp.take_along_axis(hidden_BxTxE, last_B[:, None, None], axis=1)
  return h_Bx1xE, jnp.any(valid_BxT, axis=1)


def _extend(model, cache, ids_BxT, mask_BxT, cache_index, prev_logits_BxV, mesh):
  """Writes ids at slots [cache_index, +T) and returns (cache, next-token logits [B, V])."""
  hidden_BxTxE, cache = model(ids_BxT, attention_mask=mask_BxT, cache=cache,
                              cache_index=cache_index, return_hidden=True)
  h_Bx1xE, has_B = _last_valid(hidden_BxTxE, mask_BxT)
  # Only the last position goes through the LM head: [B, P, V] float32 prompt logits are never
  # built (10 GB for 64 prompts of 256 tokens at a 150k vocabulary).
  logits_BxV = model.logits(h_Bx1xE)[:, 0]
  if prev_logits_BxV is not None:
    logits_BxV = jnp.where(has_B[:, None], logits_BxV, prev_logits_BxV.astype(jnp.float32))
  return _constrain_cache(cache, mesh), _batch(logits_BxV, mesh)


def _prefill(model, ids_BxP, mask_BxP, max_len: int, mesh):
  B, P = ids_BxP.shape
  if max_len < P:
    raise ValueError(f"max_len: expected >= the prompt length {P}, got {max_len}")
  cache = _constrain_cache(decoder_lib.init_cache(model.config, B, max_len), mesh)
  return _extend(model, cache, ids_BxP, mask_BxP, jnp.int32(0), None, mesh)


@flax.struct.dataclass
class _DecodeState:
  """The decode loop's carry: M working rows (a subset of the N output rows), see `_decode_steps`.

  rows_M maps a working row to its output row (N = a padding row, whose writes are dropped);
  cache slot of step t is idx0 + t; outputs are the full [N, R] arrays.
  """

  t: jax.Array  # int32 scalar, the next step
  idx0: jax.Array  # int32 scalar, the cache slot of step 0
  cache: decoder_lib.DecodeCache  # M rows
  logits: jax.Array  # float32 [M, V]
  done: jax.Array  # bool [M]
  stopped: jax.Array  # bool [M]
  pos: jax.Array  # int32 [M], the next token's position
  budget: jax.Array  # int32 [M]
  rows: jax.Array  # int32 [M]
  tokens: jax.Array  # int32 [N, R]
  mask: jax.Array  # int32 [N, R]
  logprobs: jax.Array  # float32 [N, R]
  truncated: jax.Array  # bool [N]


def _constrain_state(st: _DecodeState, mesh: Mesh | None) -> _DecodeState:
  if mesh is None:
    return st
  axes = decoder_lib.decode_cache_logical_axes(len(st.cache.k))
  cache = jax.tree.map(lambda x, a: _constrain(x, a, mesh), st.cache, axes,
                       is_leaf=lambda a: isinstance(a, tuple) and isinstance(a[0], str))
  return st.replace(cache=cache, logits=_batch(st.logits, mesh), done=_batch(st.done, mesh),
                    stopped=_batch(st.stopped, mesh), pos=_batch(st.pos, mesh),
                    budget=_batch(st.budget, mesh), rows=_batch(st.rows, mesh),
                    tokens=_batch(st.tokens, mesh), mask=_batch(st.mask, mesh),
                    logprobs=_batch(st.logprobs, mesh), truncated=_batch(st.truncated, mesh))


def _decode_steps(config, lora, params_u, st: _DecodeState, rng, t_end, exit_live=0, *,
                  max_new_tokens, temperature, top_k, top_p, stop_token_ids, pad_token_id,
                  mesh) -> _DecodeState:
  """Decodes steps t in [st.t, min(t_end, R)) while more than `exit_live` working rows are live
  (0: until every working row is done). See the module docstring.

  Every live row's token (the stop token too: it is context for a later turn) is fed at cache slot
  idx0 + t; rows that are done ride along at mask 0 and write invalid slots no query reads. The
  uniform of output row n at step t is uniform(fold_in(rng, t), [N])[n], whatever the working
  batch, so compaction and sharding do not change the draws.
  """
  N, R = st.tokens.shape
  stops = jnp.asarray(stop_token_ids if stop_token_ids else (-1,), jnp.int32)
  t_stop = jnp.minimum(jnp.asarray(t_end, jnp.int32), R)
  exit_live = jnp.asarray(exit_live, jnp.int32)

  def cond(st):
    # Live rows only ever decrease: the loop also ends the step after they fall to `exit_live`,
    # when the host can move to a smaller working batch.
    return (st.t < t_stop) & (jnp.sum(~st.done, dtype=jnp.int32) > exit_live)

  def body(st):
    t = st.t
    u_N = jax.random.uniform(jax.random.fold_in(rng, t), (N,), jnp.float32)
    u_M = jnp.take(u_N, st.rows, mode="clip")
    tok_M, logp_M = sample_tokens_uniform(u_M, st.logits, temperature, top_k, top_p)
    live_M = ~st.done
    tok_M = jnp.where(live_M, tok_M, jnp.int32(pad_token_id))
    hit_M = live_M & jnp.any(tok_M[:, None] == stops[None, :], axis=1)
    # Only live rows write: a done row's output columns already hold pad / 0.
    rows_M = jnp.where(live_M, st.rows, N)
    tokens = st.tokens.at[rows_M, t].set(tok_M, mode="drop")
    mask = st.mask.at[rows_M, t].set(1, mode="drop")
    logprobs = st.logprobs.at[rows_M, t].set(logp_M, mode="drop")
    hidden_Mx1xE, cache = decoder_lib.decode_hidden(config, params_u, tok_M, live_M, st.pos,
                                                    st.cache, st.idx0 + t, lora=lora)
    logits_MxV = decoder_lib.head_logits(config, params_u, hidden_Mx1xE)[:, 0]
    stopped = st.stopped | hit_M
    st = st.replace(t=t + 1, cache=cache, logits=logits_MxV, stopped=stopped,
                    done=st.done | hit_M | (t + 1 >= st.budget), pos=st.pos + live_M,
                    tokens=tokens, mask=mask, logprobs=logprobs)
    return _constrain_state(st, mesh)

  st = jax.lax.while_loop(cond, body, st)
  truncated = st.truncated.at[st.rows].set(~st.stopped, mode="drop")
  return st.replace(truncated=truncated)


def _init_state(cache, logits_NxV, idx0, budget_N, *, max_new_tokens, pad_token_id, mesh):
  """A fresh `_DecodeState` of all N rows (cache already in the per-layer layout)."""
  N = logits_NxV.shape[0]
  R = max_new_tokens
  if budget_N is None:
    budget_N = jnp.full((N,), R, jnp.int32)
  budget_N = jnp.minimum(jnp.asarray(budget_N, jnp.int32), R)
  st = _DecodeState(
      t=jnp.int32(0), idx0=jnp.asarray(idx0, jnp.int32), cache=cache,
      logits=logits_NxV.astype(jnp.float32), done=budget_N <= 0,
      stopped=jnp.zeros((N,), jnp.bool_),
      # The next position of a row is its number of real tokens so far (any padding side).
      pos=jnp.sum(cache.valid, axis=1, dtype=jnp.int32), budget=budget_N,
      rows=jnp.arange(N, dtype=jnp.int32), tokens=jnp.full((N, R), pad_token_id, jnp.int32),
      mask=jnp.zeros((N, R), jnp.int32), logprobs=jnp.zeros((N, R), jnp.float32),
      truncated=jnp.ones((N,), jnp.bool_))
  return _constrain_state(st, mesh)


def _output(st: _DecodeState, mesh) -> SampleOutput:
  return SampleOutput(tokens=_batch(st.tokens, mesh), mask=_batch(st.mask, mesh),
                      logprobs=_batch(st.logprobs, mesh), truncated=_batch(st.truncated, mesh))


def _decode_arrays(model, use_lora: bool = True) -> dict[str, Any]:
  """The model's arrays in the decode layout: layers unstacked (one copy), the LM head."""
  params = model.arrays(use_lora)
  if not model.config.tie_word_embeddings:
    params["lm_head"] = model.lm_head[...]
  return decoder_lib.unstack_layers(params, model.config.num_layers)


def _decode(model, cache, logits_NxV, cache_index, rng, *, max_new_tokens, temperature, top_k,
            top_p, stop_token_ids, pad_token_id, budget_N, mesh, length=None):
  """All R steps in one loop on a stacked cache. Returns (SampleOutput, cache, last logits).

  Only the first `length` slots (all if None) are read and written: a caller that knows the
  cache index passes what the R steps reach, so the step time follows the context, not the
  preallocated slots.
  """
  dcache = decoder_lib.to_decode_cache(cache, length)
  st = _init_state(dcache, logits_NxV, cache_index, budget_N, max_new_tokens=max_new_tokens,
                   pad_token_id=pad_token_id, mesh=mesh)
  st = _decode_steps(model.config, getattr(model, "lora_config", None), _decode_arrays(model), st,
                     rng, max_new_tokens, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_k=top_k, top_p=top_p, stop_token_ids=stop_token_ids,
                     pad_token_id=pad_token_id, mesh=mesh)
  cache = _constrain_cache(decoder_lib.from_decode_cache(st.cache, cache), mesh)
  return _output(st, mesh), cache, st.logits


def _prefill_groups(model, ids_BxP, mask_BxP, max_len: int, group_size: int, mesh):
  """Prefills the B prompts once, then repeats each cache row and its logits G times (a a a b b b).

  The copy costs memory traffic (the repeated prompt keys/values), not FLOPs: the forward runs on
  B rows whatever G is (`test_prefill_flops_do_not_grow_with_group_size`).
  """
  cache, logits_BxV = _prefill(model, ids_BxP, mask_BxP, max_len, mesh)
  if group_size == 1:
    return cache, logits_BxV
  cache = _constrain_cache(decoder_lib.repeat_cache(cache, group_size), mesh)
  logits_NxV = jnp.repeat(logits_BxV, group_size, axis=0,
                          total_repeat_length=logits_BxV.shape[0] * group_size)
  return cache, _batch(logits_NxV, mesh)


# ----------------------------------------------------------------------------- jitted entry points

_SAMPLING_STATIC = ("max_new_tokens", "temperature", "top_k", "top_p", "stop_token_ids",
                    "pad_token_id", "mesh")


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("max_len", "group_size", "mesh"))
def _prefill_groups_jit(graphdef, params, ids_BxP, mask_BxP, *, max_len, group_size, mesh):
  return _prefill_groups(nnx.merge(graphdef, params), ids_BxP, mask_BxP, max_len, group_size,
                         mesh)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("mesh",))
def _append_jit(graphdef, params, cache, ids_BxT, mask_BxT, cache_index, prev_logits, *, mesh):
  return _extend(nnx.merge(graphdef, params), cache, ids_BxT, mask_BxT, cache_index, prev_logits,
                 mesh)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=_SAMPLING_STATIC + ("length",))
def _decode_jit(graphdef, params, cache, logits_NxV, cache_index, rng, budget_N, **static):
  return _decode(nnx.merge(graphdef, params), cache, logits_NxV, cache_index, rng,
                 budget_N=budget_N, **static)


# The most steps per device call of `generate`. A call also ends when the live rows fall into a
# smaller row bucket (the loop condition counts them) or the held cache slots are used up, so
# finished rows leave at the step they cross a bucket, whatever this is; it only bounds how long
# the device runs without the host (and sets the first call's slots). bench/gpu.sh sets 32.
_CHUNK = 8

# Benchmarks and tests: a list here gets one (first step, step reached, working rows, decode
# slots) per device call of `generate`.
_SCHEDULE: list | None = None


# Row buckets per octave of `row_bucket` (a power of two). More: less padding, more programs.
_ROW_BUCKETS_PER_OCTAVE = 4


def row_bucket(num_active: int, num_rows: int, multiple: int = 1) -> int:
  """Working rows for `num_active` live rows: `_ROW_BUCKETS_PER_OCTAVE` = 4 sizes per octave
  (2^k x 1, 1.25, 1.5, 1.75; minimum 4, under 1/4 padding) rounded up to the mesh's batch
  multiple, at most `num_rows`.

  Four per octave rather than `bucket_length`'s two: rows that finished wait in the batch until
  the live count reaches the next size down, so the padding is what a step pays for nothing
  (bench/decode_lengths.py, with the calls' early exit: rows x steps 1.09-1.10 x the tokens
  generated, 1.20-1.23 with two per octave and 8-step chunks), for up to twice the decode
  programs (each (row, slot) bucket pair a run visits compiles once).
  """
  n = max(int(num_active), 4)
  step = 1 << max((n - 1).bit_length() - 1 - (_ROW_BUCKETS_PER_OCTAVE.bit_length() - 1), 0)
  b = -(-n // step) * step
  return min(-(-b // multiple) * multiple, num_rows)


def _exit_live(rows: int, num_rows: int, multiple: int) -> int:
  """The most live rows at which a batch of `rows` would move to a smaller bucket (0: none)."""
  return _exit_live_cached(rows, num_rows, multiple, _ROW_BUCKETS_PER_OCTAVE)


@functools.lru_cache(maxsize=1024)
def _exit_live_cached(rows: int, num_rows: int, multiple: int, per_octave: int) -> int:
  del per_octave  # part of the cache key: row_bucket reads it
  live = rows - 1
  while live > 0 and row_bucket(live, num_rows, multiple) >= rows:
    live -= 1
  return live


def _slot_bucket(steps: int, max_new_tokens: int) -> int:
  """Decode slots held for the first `steps` steps: a power of two >= steps, at most R."""
  return min(1 << max(steps - 1, 0).bit_length(), max_new_tokens)


@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=("group_size", "max_new_tokens", "slots", "pad_token_id",
                                    "mesh"))
def _start_jit(graphdef, params, ids_BxP, mask_BxP, *, group_size, max_new_tokens, slots,
               pad_token_id, mesh):
  """Prefill once per prompt, repeat G times, per-layer cache of P + slots; unstacked weights."""
  model = nnx.merge(graphdef, params)
  P = ids_BxP.shape[1]
  cache, logits_NxV = _prefill_groups(model, _batch(ids_BxP, mesh), _batch(mask_BxP, mesh), P,
                                      group_size, mesh)
  dcache = decoder_lib.resize_decode_cache(decoder_lib.to_decode_cache(cache), None, P + slots)
  st = _init_state(dcache, logits_NxV, P, None, max_new_tokens=max_new_tokens,
                   pad_token_id=pad_token_id, mesh=mesh)
  return _decode_arrays(model), st


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,),
                   static_argnames=_SAMPLING_STATIC)
def _chunk_jit(config, lora, params_u, st, rng, t_end, exit_live, **static):
  st = _decode_steps(config, lora, params_u, st, rng, t_end, exit_live, **static)
  # Replicated copies of `done` and the step reached for the host: every process can read them
  # (multi-host meshes).
  return st, _constrain(st.done, (None,), static["mesh"]), st.t


@functools.partial(jax.jit, static_argnames=("length", "mesh"))
def _resize_jit(st, sel_M, *, length, mesh):
  """Keeps working rows sel_M (-1 = a padding row, done) and holds `length` cache slots."""
  keep_M = sel_M >= 0
  src_M = jnp.maximum(sel_M, 0)
  take = lambda x: jnp.take(x, src_M, axis=0)
  N = st.tokens.shape[0]
  st = st.replace(cache=decoder_lib.resize_decode_cache(st.cache, src_M, length),
                  logits=take(st.logits), done=take(st.done) | ~keep_M,
                  stopped=take(st.stopped) & keep_M, pos=take(st.pos), budget=take(st.budget),
                  rows=jnp.where(keep_M, take(st.rows), N))
  return _constrain_state(st, mesh)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=_SAMPLING_STATIC + ("group_size",))
def _generate_jit(graphdef, params, ids_BxP, mask_BxP, rng, *, group_size, max_new_tokens,
                  mesh, **static):
  """The whole of `generate(compact=False)` in one program: every row, P + R slots, R steps."""
  model = nnx.merge(graphdef, params)
  P = ids_BxP.shape[1]
  cache, logits_NxV = _prefill_groups(model, _batch(ids_BxP, mesh), _batch(mask_BxP, mesh),
                                      P + max_new_tokens, group_size, mesh)
  out, _, _ = _decode(model, cache, logits_NxV, jnp.int32(P), rng, max_new_tokens=max_new_tokens,
                      budget_N=None, mesh=mesh, **static)
  return out


def fetch(tree: Any) -> Any:
  """Device arrays -> NumPy, whole on every process (a global array is gathered first: on several
  processes it spans devices this process cannot read)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def _place(tree, mesh):
  """Batch-shards host or device arrays on `mesh` (a no-op for arrays already laid out so)."""
  if mesh is None:
    return tree
  return jax.tree.map(
      lambda x: jax.device_put(x, sharding_lib.batch_sharding(
          mesh, np.ndim(x), sharding_lib.ROLLOUT_RULES, shape=np.shape(x))), tree)


# ----------------------------------------------------------------------------- public API


def generate(graphdef: nnx.GraphDef, params: Any, prompt_ids: jax.Array, prompt_mask: jax.Array,
             rng: jax.Array, *, group_size: int, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, stop_token_ids: Sequence[int] = (),
             pad_token_id: int = 0, mesh: Mesh | None = None, bucket: bool = True,
             compact: bool = True) -> SampleOutput:
  """G sampled responses per prompt, each prompt prefilled once.

  Args:
    graphdef, params: `nnx.split(model)` of a `grpo_jax.models.Decoder` (params may be sharded).
    prompt_ids: int [B, P] prompts, left-padded (right padding also works).
    prompt_mask: [B, P], 1 on real prompt tokens.
    rng: PRNG key; the same key gives the same output.
    group_size: G, responses per prompt; output rows are ordered as `expand_groups` orders them.
    max_new_tokens: R, the response budget (and the output width).
    temperature: 0 = greedy.
    top_k: keep the k most likely tokens (0 = off).
    top_p: nucleus mass (1.0 = off).
    stop_token_ids: a row stops after emitting any of these (the stop token is kept, mask 1).
    pad_token_id: written after a row stops, and used to pad prompts to their bucket.
    mesh: the training mesh; prompts and outputs are sharded over its batch axes.
    bucket: left-pad P to `bucket_length(P)` so that varying prompt lengths share compiles.
    compact: decode in chunks that drop finished rows and hold only the slots read so far (see
      the module docstring); False runs one program over all rows and P + R slots (same draws,
      for tests and memory analysis).

  Returns:
    A `SampleOutput` with [B*G, R] tokens / mask / logprobs and [B*G] truncated.
  """
  _check_prompts(prompt_ids, prompt_mask)
  group_size = _check_int("group_size", group_size, 1)
  max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
  temperature, top_k, top_p, stop_token_ids, pad_token_id = _check_sampling(
      temperature, top_k, top_p, stop_token_ids, pad_token_id)
  if mesh is not None:
    multiple = sharding_lib.batch_size_multiple(mesh, sharding_lib.ROLLOUT_RULES)
    n = np.shape(prompt_ids)[0] * group_size
    if n % multiple:
      raise ValueError(f"group_size: B*G = {n} responses are not divisible by the mesh batch "
                       f"multiple {multiple}")
  prompt_ids, prompt_mask = _place((prompt_ids, prompt_mask), mesh)
  P = np.shape(prompt_ids)[1]
  if bucket and bucket_length(P) != P:
    prompt_ids, prompt_mask = _left_pad(prompt_ids, prompt_mask, length=bucket_length(P),
                                        pad_token_id=pad_token_id)
  P = np.shape(prompt_ids)[1]
  if not compact:
    return _generate_jit(graphdef, params, prompt_ids, prompt_mask, rng, group_size=group_size,
                         max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, stop_token_ids=stop_token_ids, pad_token_id=pad_token_id,
                         mesh=mesh)
  static = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                stop_token_ids=stop_token_ids, pad_token_id=pad_token_id, mesh=mesh)
  R = max_new_tokens
  slots = _slot_bucket(_CHUNK, R)
  params_u, st = _start_jit(graphdef, params, prompt_ids, prompt_mask, group_size=group_size,
                            max_new_tokens=R, slots=slots, pad_token_id=pad_token_id, mesh=mesh)
  config = graphdef_config(graphdef, params)
  lora = graphdef_lora(graphdef, params)
  N = np.shape(prompt_ids)[0] * group_size
  multiple = 1 if mesh is None else sharding_lib.batch_size_multiple(mesh,
                                                                     sharding_lib.ROLLOUT_RULES)
  rows, t = N, 0
  while True:
    t_end = min(t + _CHUNK, slots)
    st, done_M, t_dev = _chunk_jit(config, lora, params_u, st, rng, jnp.int32(t_end),
                                   jnp.int32(_exit_live(rows, N, multiple)), **static)
    # The only host round trip: which rows are done and the step reached (the loop may end early).
    done_M, t_reached = fetch((done_M, t_dev))
    if _SCHEDULE is not None:
      _SCHEDULE.append((t, int(t_reached), rows, slots))
    if int(t_reached) <= t and (~done_M).any():
      # row_bucket must be monotone (then a call after a move always steps); never spin.
      raise RuntimeError(f"generate: a decode call made no step at t = {t} ({rows} rows)")
    t = int(t_reached)
    live_M = ~done_M
    if t >= R or not live_M.any():
      break
    # Finished rows leave the batch and the cache doubles once its slots are used up.
    new_rows = row_bucket(int(live_M.sum()), N, multiple)
    new_slots = _slot_bucket(t + 1, R) if t >= slots else slots
    if new_rows < rows or new_slots > slots:
      sel = np.full((new_rows,), -1, np.int32)
      if new_rows < rows:
        live_idx = np.flatnonzero(live_M)
        sel[:live_idx.size] = live_idx
      else:
        sel[:rows] = np.arange(rows)
      st = _resize_jit(st, _place(sel, mesh), length=P + new_slots, mesh=mesh)
      rows, slots = new_rows, new_slots
  return _output(st, None)


def graphdef_config(graphdef: nnx.GraphDef, params: Any):
  """The ModelConfig of a split Decoder (read from the graph definition, no arrays touched)."""
  return _model_meta(graphdef, params)[0]


def graphdef_lora(graphdef: nnx.GraphDef, params: Any):
  """The LoraConfig of a split Decoder, or None."""
  return _model_meta(graphdef, params)[1]


def _model_meta(graphdef, params):
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), params)
  model = nnx.merge(graphdef, abstract)
  return model.config, getattr(model, "lora_config", None)


def prefill(graphdef: nnx.GraphDef, params: Any, ids: jax.Array, mask: jax.Array, max_len: int,
            *, group_size: int = 1, mesh: Mesh | None = None):
  """Runs prompts through the model into a fresh KV cache of `max_len` slots.

  Args:
    graphdef, params: `nnx.split(model)`.
    ids, mask: int [B, T] prompts (any padding) and their mask.
    max_len: cache slots S >= T (the prompt plus everything later appended or decoded).
    group_size: repeat each prompt's cache and logits G times afterwards (a a a b b b); the
      prefill itself runs on the B prompts only.
    mesh: shard the cache over the batch axes of this mesh.

  Returns:
    (cache, last_logits): a `KVCache` with B*G rows whose slots [0, T) hold the prompts, and the
    float32 [B*G, V] logits of each row's next token. Continue with `decode` or `append` at
    cache_index = T.
  """
  _check_prompts(ids, mask)
  max_len = _check_int("max_len", max_len, np.shape(ids)[1])
  group_size = _check_int("group_size", group_size, 1)
  return _prefill_groups_jit(graphdef, params, ids, mask, max_len=max_len, group_size=group_size,
                             mesh=mesh)


def append(graphdef: nnx.GraphDef, params: Any, cache: decoder_lib.KVCache, ids: jax.Array,
           mask: jax.Array, cache_index: Any, prev_logits: jax.Array | None = None, *,
           mesh: Mesh | None = None):
  """Extends a cache with given tokens (e.g. retrieved `<information>` text) without sampling.

  The T new tokens go to slots [cache_index, cache_index + T); each row's tokens get positions
  after the real tokens already in its cache, and slots at mask 0 stay invalid, so rows may append
  different numbers of tokens (pad them on either side). The history is not recomputed.

  Args:
    graphdef, params: `nnx.split(model)`.
    cache: the cache after `prefill` / `decode` / `append`; needs cache_index + T <= its slots.
    ids, mask: int [N, T] tokens to append and their mask.
    cache_index: first slot to write (int or int32 scalar): the previous call's end.
    prev_logits: [N, V] next-token logits before this call; rows that append nothing keep them
      (without it, such rows get meaningless logits).
    mesh: shard the cache over the batch axes of this mesh.

  Returns:
    (cache, last_logits [N, V] float32): the next-token logits after each row's appended tokens.
  """
  _check_prompts(ids, mask)
  if np.shape(ids)[0] != cache.valid.shape[0]:
    raise ValueError(f"ids: expected {cache.valid.shape[0]} rows (the cache's batch), got "
                     f"{np.shape(ids)[0]}")
  if isinstance(cache_index, (int, np.integer)) and cache_index + np.shape(ids)[1] > cache.valid.shape[1]:
    raise ValueError(f"cache_index: {cache_index} + {np.shape(ids)[1]} tokens exceed the cache's "
                     f"{cache.valid.shape[1]} slots")
  return _append_jit(graphdef, params, cache, ids, mask, jnp.asarray(cache_index, jnp.int32),
                     prev_logits, mesh=mesh)


def decode(graphdef: nnx.GraphDef, params: Any, cache: decoder_lib.KVCache, last_logits: jax.Array,
           cache_index: Any, rng: jax.Array, *, max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, stop_token_ids: Sequence[int] = (),
           pad_token_id: int = 0, budget: jax.Array | None = None, mesh: Mesh | None = None):
  """Samples up to `max_new_tokens` per row, continuing from a cache.

  Every sampled token (the stop token included) is written into the cache at slots
  [cache_index, cache_index + R); after a row stops, its remaining slots stay invalid. So the
  returned cache and logits continue the context exactly: `append` / `decode` again at
  cache_index + max_new_tokens.

  Args:
    graphdef, params: `nnx.split(model)`.
    cache: needs cache_index + max_new_tokens <= its slots.
    last_logits: float32 [N, V] next-token logits (from `prefill`, `append` or `decode`).
    cache_index: first free slot (int or int32 scalar).
    rng: PRNG key.
    max_new_tokens: R (static).
    temperature, top_k, top_p, stop_token_ids, pad_token_id: as in `generate`.
    budget: optional int [N] per-row budget <= R; a row that spends it stops (truncated).
    mesh: shard the batch over this mesh's batch axes.

  Returns:
    (SampleOutput [N, R], cache, last_logits [N, V]).
  """
  max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
  temperature, top_k, top_p, stop_token_ids, pad_token_id = _check_sampling(
      temperature, top_k, top_p, stop_token_ids, pad_token_id)
  if isinstance(cache_index, (int, np.integer)) and cache_index + max_new_tokens > cache.valid.shape[1]:
    raise ValueError(f"cache_index: {cache_index} + max_new_tokens {max_new_tokens} exceed the "
                     f"cache's {cache.valid.shape[1]} slots")
  if last_logits.shape[0] != cache.valid.shape[0]:
    raise ValueError(f"last_logits: expected {cache.valid.shape[0]} rows (the cache's batch), got "
                     f"{last_logits.shape[0]}")
  length = None
  if isinstance(cache_index, (int, np.integer)):
    # Slots past cache_index + R are never read: decode on a power-of-two prefix of the cache.
    end = int(cache_index) + max_new_tokens
    length = min(1 << (end - 1).bit_length(), cache.valid.shape[1])
  return _decode_jit(graphdef, params, cache, last_logits, jnp.asarray(cache_index, jnp.int32), rng,
                     budget, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                     top_p=top_p, stop_token_ids=stop_token_ids, pad_token_id=pad_token_id,
                     mesh=mesh, length=length)
