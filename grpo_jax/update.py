"""The policy update: train state, optimizer, GRPO loss over the policy, and the jitted train step.

Everything here is a pure function of arrays and static config; `train.py` jits these functions
once with explicit `NamedSharding`s (state donated) and drives them from the loop.

Batch layout (one row per response, N = prompts x G):
  tokens_NxL      int32  prompt (left-padded, length P) followed by the response (length R), L = P + R
  attn_mask_NxL   int32  1 on real prompt and response tokens
  loss_mask_NxR   f32    1 on response tokens that count in the loss (not padding, not retrieved text)
  kl_mask_NxR     f32    1 on response tokens that count in the KL term (loss_mask, or more: see
                         `RLConfig.kl_on_filtered_groups`)
  advantages_N    f32    one advantage per response, broadcast over its tokens
  old_logp_NxR    f32    log-probs of the rollout policy (absent when fully on-policy)
  ref_logp_NxR    f32    log-probs of the reference policy (absent when kl_coef = 0)

With `group_size` G (the shared-prefix path) the rows come in groups of G responses to one prompt
(a a a b b b, the prompt part of a group's rows identical): each prompt then runs once per group
and micro-batches hold whole groups. With `buckets` (`response_buckets`) the micro-batches are
formed by response length and each runs with its response axis trimmed to the smallest bucket that
holds it: padding beyond the longest real response costs nothing. With `packing` as well
(`response_packing`, shared prefix only) a micro-batch whose groups' responses fit packs each
group's responses into one row, one after the other (`decoder_hidden_packed`): a group then costs
the sum of its lengths, not G times its longest. `plan_update` picks the
micro-batch (and remat) from a memory budget.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from grpo_jax import losses
from grpo_jax.config import OptimConfig, RLConfig
from grpo_jax.models.decoder import decoder_hidden_packed, decoder_hidden_shared_prefix


@flax.struct.dataclass
class TrainState:
  """Everything the update changes: one pytree, checkpointed whole by Orbax."""
  params: Any  # nnx.State of the trained parameters (all of them, or only the LoRA adapters).
  opt_state: Any  # optax state (same sharding as params).
  step: jax.Array  # int32 scalar: GRPO steps done.
  rng: jax.Array  # uint32[2] raw PRNG key; per-step keys are fold_in(rng, step).
  skipped: jax.Array  # int32 scalar: optimizer steps skipped for non-finite loss/grads.


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warm-up to the peak, then cosine / linear decay to peak * end_lr_factor, or constant."""
  peak, end = config.learning_rate, config.learning_rate * config.end_lr_factor
  decay_steps = max(total_steps - config.warmup_steps, 1)
  if config.decay == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_lr_factor)
  elif config.decay == "linear":
    after = optax.linear_schedule(peak, end, decay_steps)
  else:
    after = optax.constant_schedule(peak)
  if config.warmup_steps == 0:
    return after
  warm = optax.linear_schedule(0.0, peak, config.warmup_steps)
  return optax.join_schedules([warm, after], [config.warmup_steps])


def make_optimizer(config: OptimConfig, total_updates: int) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; the schedule counts optimizer updates."""
  chain = []
  if config.max_grad_norm > 0:
    chain.append(optax.clip_by_global_norm(config.max_grad_norm))
  chain.append(optax.adamw(learning_rate_schedule(config, total_updates), b1=config.b1,
                           b2=config.b2, eps=config.eps, weight_decay=config.weight_decay))
  return optax.chain(*chain)


def merge(graphdef: nnx.GraphDef, params: Any, frozen: Any = None) -> nnx.Module:
  """The policy from its trained parameters and, with LoRA, the frozen base weights."""
  return nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)


def response_logprobs(graphdef: nnx.GraphDef, params: Any, tokens_NxL: jax.Array,
                      attn_mask_NxL: jax.Array, response_len: int, *, with_entropy: bool = False,
                      temperature: float = 1.0, frozen: Any = None, use_lora: bool = True,
                      lm_head_chunk: int = 0, group_size: int | None = None, packed: int = 0):
  """Log-prob (and entropy) of each response token under the policy at `temperature`: [N, R] f32.

  With `group_size` G the rows are groups of G responses to one prompt (a a a b b b, the prompt
  part of the G rows identical): each prompt's forward then runs once, not G times
  (`decoder_hidden_shared_prefix`; equal results, fewer FLOPs). Without it, every row runs whole.
  With `packed` = T as well, each group's responses run packed into one row of T positions
  (`decoder_hidden_packed`); the sum of a group's response extents must be at most T.

  Entry t of the result is log p(response token t | everything before it), 0 where the response
  is padding (attn_mask 0). Only the R positions that predict response tokens go through the LM
  head (the prompt's logits are never computed), in chunks of `lm_head_chunk` positions (0:
  `losses.auto_chunk_size`, under 256 MB of float32 logits per chunk), log-prob and entropy from
  one pass over each chunk. The float32 logits are divided by the temperature as the sampler
  divides them, so these are the log-probs of the distribution it drew from. `use_lora=False` is the reference policy of a
  LoRA run: the same base weights with the adapters switched off (no second copy).
  """
  model = merge(graphdef, params, frozen)
  start = tokens_NxL.shape[1] - response_len
  if group_size:
    N, L = tokens_NxL.shape
    B, G = N // group_size, group_size
    if N % G:
      raise ValueError(f"group_size: {N} rows are not whole groups of {G}")
    first = lambda x: x[:, :start].reshape(B, G, start)[:, 0]  # The group's prompt, once.
    if packed:
      return _packed_logprobs(model, use_lora, first(tokens_NxL), first(attn_mask_NxL),
                              tokens_NxL[:, start:], attn_mask_NxL[:, start:], G, packed,
                              with_entropy, temperature, lm_head_chunk)
    last_BxE, resp_NxRxE = decoder_hidden_shared_prefix(
        model.config, model.arrays(use_lora), first(tokens_NxL), first(attn_mask_NxL),
        tokens_NxL[:, start:], attn_mask_NxL[:, start:],
        lora=getattr(model, "lora_config", None))
    # The prompt's last position predicts each response's first token; then response t predicts
    # response t + 1.
    pred_NxRxE = jnp.concatenate([jnp.repeat(last_BxE, G, axis=0)[:, None], resp_NxRxE[:, :-1]],
                                 axis=1)
  else:
    kwargs = {} if use_lora else {"use_lora": False}
    hidden_NxLxE = model(tokens_NxL, attention_mask=attn_mask_NxL, return_hidden=True, **kwargs)
    # Position t predicts token t + 1: the R positions before the last predict the response.
    pred_NxRxE = hidden_NxLxE[:, start - 1:-1]
  return _head(model, pred_NxRxE, tokens_NxL[:, start:], attn_mask_NxL[:, start:], with_entropy,
               temperature, lm_head_chunk)


def _packed_logprobs(model, use_lora, prompt_BxP, pmask_BxP, resp_NxR, rmask_NxR, G, T,
                     with_entropy, temperature, lm_head_chunk):
  """`response_logprobs` of whole groups with each group's responses packed into one row of T:
  response g of group b occupies row b from offset (sum of the extents of responses 0..g-1) on,
  for its extent (up to its last real token). The LM head runs on the T packed positions; the
  results are scattered back to [N, R] (0 on padding, as the other paths)."""
  N, R = resp_NxR.shape
  B = N // G
  t_R = jnp.arange(R)
  extent_BxG = _response_extent(rmask_NxR, R).reshape(B, G)
  offset_BxG = jnp.cumsum(extent_BxG, axis=1) - extent_BxG
  inside_BxGxR = t_R[None, None, :] < extent_BxG[:, :, None]
  dest_BxGR = jnp.where(inside_BxGxR, offset_BxG[:, :, None] + t_R[None, None, :], T).reshape(B, G * R)
  plen_B = jnp.sum(pmask_BxP.astype(jnp.int32), axis=1)
  rpos_BxGxR = (plen_B[:, None, None] + jnp.cumsum(rmask_NxR.astype(jnp.int32), axis=1)
                .reshape(B, G, R) - 1)

  def pack(x_BxGxR, fill):  # Positions past T (outside every extent) are dropped.
    flat_BxGR = x_BxGxR.reshape(B, G * R)
    out_BxT = jnp.full((B, T), fill, flat_BxGR.dtype)
    return jax.vmap(lambda o, d, x: o.at[d].set(x, mode="drop"))(out_BxT, dest_BxGR, flat_BxGR)

  ids_BxT = pack(resp_NxR.reshape(B, G, R), 0)
  valid_BxT = pack(rmask_NxR.reshape(B, G, R), 0)
  segment_BxT = pack(jnp.broadcast_to(jnp.arange(G)[None, :, None], (B, G, R)), -1)
  position_BxT = jnp.maximum(pack(rpos_BxGxR, 0), 0)
  first_BxT = pack(jnp.broadcast_to(t_R == 0, (B, G, R)), False)
  last_BxE, hidden_BxTxE = decoder_hidden_packed(
      model.config, model.arrays(use_lora), prompt_BxP, pmask_BxP, ids_BxT, segment_BxT,
      position_BxT, valid_BxT, lora=getattr(model, "lora_config", None))
  # A response's first token is predicted by its prompt's last position, token t + 1 by t.
  shifted_BxTxE = jnp.concatenate([last_BxE[:, None], hidden_BxTxE[:, :-1]], axis=1)
  pred_BxTxE = jnp.where(first_BxT[:, :, None], last_BxE[:, None], shifted_BxTxE)
  out = _head(model, pred_BxTxE, ids_BxT, valid_BxT, with_entropy, temperature, lm_head_chunk)

  def unpack(x_BxT):
    got_BxGR = jnp.take_along_axis(x_BxT, jnp.minimum(dest_BxGR, T - 1), axis=1)
    got_NxR = got_BxGR.reshape(N, R)
    return jnp.where(inside_BxGxR.reshape(N, R) & (rmask_NxR != 0), got_NxR, 0.0)

  return tuple(map(unpack, out)) if with_entropy else unpack(out)


def _head(model, pred_hidden_NxRxE, targets_NxR, mask_NxR, with_entropy, temperature,
          lm_head_chunk):
  logp, ent = losses.head_logprobs(pred_hidden_NxRxE, model.lm_head_weight(), targets_NxR,
                                   chunk_size=lm_head_chunk or None, with_entropy=with_entropy,
                                   temperature=temperature)
  keep = mask_NxR.astype(jnp.bool_)
  logp = jnp.where(keep, logp, 0.0)
  return (logp, jnp.where(keep, ent, 0.0)) if with_entropy else logp


def batched_response_logprobs(graphdef, params, tokens_NxL, attn_mask_NxL, response_len: int,
                              microbatch: int, temperature: float = 1.0, frozen: Any = None,
                              use_lora: bool = True, lm_head_chunk: int = 0,
                              group_size: int | None = None,
                              buckets: tuple[int, ...] | None = None,
                              packing: Packing | None = None) -> jax.Array:
  """`response_logprobs` in micro-batches (bounded activation memory), for old/ref log-probs.

  With `group_size` each micro-batch holds whole groups and runs their prompts once. With
  `buckets` (`response_buckets`) the rows are ordered by response length into the micro-batches
  and each runs on its responses trimmed to the smallest bucket that holds them (`_trimmed`):
  the same log-probs, padding costs nothing. With `packing` too (and `group_size`), groups whose
  responses fit run packed (`response_packing`).
  """
  n = tokens_NxL.shape[0]
  k = n // microbatch
  buckets = _worth_trimming(buckets, response_len)
  packing = _packing_for(packing, buckets, group_size)
  batch = {"tokens": tokens_NxL, "attn_mask": attn_mask_NxL}
  rows_N = None
  if buckets and k > 1:
    batch, rows_N = _order_by_length(batch, k, group_size, response_len, packing is not None)
  micro = jax.tree.map(lambda x: _split_micro(x, k, group_size), batch)

  def forward(mb, r, packed):
    logp_MxR = response_logprobs(graphdef, params, mb["tokens"], mb["attn_mask"], r,
                                 temperature=temperature, frozen=frozen, use_lora=use_lora,
                                 lm_head_chunk=lm_head_chunk, group_size=group_size,
                                 packed=packed)
    return jnp.pad(logp_MxR, ((0, 0), (0, response_len - r)))  # Padding's log-prob is 0.

  out = jax.lax.map(lambda mb: _trimmed(forward, mb, response_len, buckets, packing, group_size),
                    micro)
  out = _merge_micro(out, group_size)
  return out if rows_N is None else out[jnp.argsort(rows_N)]


# ----------------------------------------------------------------------------------------------
# Response trimming: the update costs the responses' real lengths, not rollout.max_new_tokens
# ----------------------------------------------------------------------------------------------

# Keys of an update batch by axis: [N, P + R] sequence arrays and [N, R] response arrays.
_SEQUENCE_KEYS = ("tokens", "attn_mask")
_RESPONSE_KEYS = ("loss_mask", "kl_mask", "old_logp", "ref_logp")
TRIM_BUCKETS = 4  # Compiled lengths per program: R, R/2, R/4, R/8.
TRIM_ALIGN = 16


def response_buckets(response_len: int, num: int = TRIM_BUCKETS,
                     align: int = TRIM_ALIGN) -> tuple[int, ...]:
  """The response lengths a micro-batch is trimmed to: R, R/2, ..., R/2^(num-1), each rounded up
  to a multiple of `align` and capped at R. Each is one branch of the compiled program (compile
  time grows with `num`); a micro-batch wastes less than half its bucket on padding."""
  out = {min(response_len, -(-max(response_len >> i, 1) // align) * align) for i in range(num)}
  return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class Packing:
  """Packed lengths for the shared-prefix update (`response_packing`).

  lengths: the packed row lengths T that may be compiled as branches (multiples of `TRIM_ALIGN`;
    `packed_lengths` keeps those that pay, and fit, for a given prompt length).
  keys_per_token: the cost model choosing between a packed and the padded branch: a response
    token costs 1 + keys / keys_per_token, keys being the positions its attention reads (the
    matmul FLOPs of a token through the layers and the LM head over the attention FLOPs of one
    key).
  model_config: for the memory check (`activation_bytes`); None: no check.
  """
  lengths: tuple[int, ...]
  keys_per_token: float
  model_config: Any = None


def response_packing(model_config, response_len: int, group_size: int,
                     align: int = TRIM_ALIGN) -> Packing | None:
  """The packed lengths for groups of `group_size` responses of up to `response_len` tokens:
  G*R/16 * (2, 3, 4, 5, 6, 7, 8, 10, 12, 14), rounded up to `align` (a packed group wastes at most
  a third of its row, at most a fifth from G*R/4 on); None for a single response per group. Each
  kept length is one more branch compiled into the update (compile time). `model_config`
  sets the cost model and the memory check (use the one the update runs: remat included)."""
  if group_size < 2:
    return None
  full = group_size * response_len
  rounded = {-(-int(full * f) // align) * align
             for f in (2 / 16, 3 / 16, 4 / 16, 5 / 16, 6 / 16, 7 / 16, 8 / 16, 10 / 16, 12 / 16,
                       14 / 16)
             if full * f >= align}
  lengths = sorted(t for t in rounded if t < full)
  c = model_config
  E, H, K, D, F = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size)
  linear = 2 * (2 * E * H * D + 2 * E * K * D + 3 * E * F) + 2 * E * c.vocab_size / c.num_layers
  return (Packing(tuple(lengths), keys_per_token=linear / (4 * H * D), model_config=model_config)
          if lengths else None)


def packed_lengths(packing: Packing, prompt_len: int, group_size: int,
                   response_len: int) -> tuple[int, ...]:
  """The lengths of `packing` whose packed row costs less than the group's G padded rows of
  `response_len` (`Packing.keys_per_token`) and whose activations (`activation_bytes`: a packed
  row's attention is [T, P + T]) are no larger than theirs (the memory `plan_update` sized the
  micro-batch for): the packed branches `_trimmed` compiles next to the trimmed buckets (where a
  bucket holds the batch for less, it runs instead)."""
  P, G, R = prompt_len, group_size, response_len
  cost = functools.partial(_cost, packing)
  mcfg = packing.model_config
  fits = lambda t: mcfg is None or (activation_bytes(mcfg, 1, P, t, group_size=1, remat=mcfg.remat)
                                    <= activation_bytes(mcfg, G, P, R, group_size=G,
                                                        remat=mcfg.remat))
  return tuple(t for t in packing.lengths if cost(t, P + t) < cost(G * R, P + R) and fits(t))


def branch_costs(packing: Packing, buckets: tuple[int, ...], lengths: tuple[int, ...],
                 prompt_len: int, group_size: int) -> list[float]:
  """Cost per group of each branch of `_trimmed` (buckets, then packed lengths), in units of a
  token's matmuls: bucket r is G rows of r tokens over P + r keys, packed T one row of T tokens
  over P + T keys."""
  P, G = prompt_len, group_size
  cost = functools.partial(_cost, packing)
  return [cost(G * r, P + r) for r in buckets] + [cost(t, P + t) for t in lengths]


def _cost(packing: Packing, tokens: int, keys: int) -> float:
  """`tokens` response positions, each attending to `keys` positions (`Packing.keys_per_token`)."""
  return tokens * (1 + keys / packing.keys_per_token)


def _packing_for(packing: Packing | None, buckets, group_size) -> Packing | None:
  """Packing applies where trimming does, to whole groups (the shared-prefix path)."""
  return packing if packing and buckets and group_size and group_size > 1 else None


def _worth_trimming(buckets: tuple[int, ...] | None,
                    response_len: int) -> tuple[int, ...] | None:
  """`buckets`, or None when the only bucket is R itself: nothing to trim, nothing to reorder."""
  return None if not buckets or tuple(buckets) == (response_len,) else buckets


def _response_extent(attn_mask_NxL: jax.Array, response_len: int) -> jax.Array:
  """Per row, 1 + the last response position that is a real token (0 for an empty response)."""
  real_NxR = attn_mask_NxL[:, attn_mask_NxL.shape[1] - response_len:] != 0
  return jnp.max(jnp.where(real_NxR, jnp.arange(1, response_len + 1)[None, :], 0), axis=1)


def _trim(batch: dict[str, jax.Array], response_len: int, r: int) -> dict[str, jax.Array]:
  """The batch with its response axis cut to the first r positions."""
  out = {}
  for key, x in batch.items():
    if key in _SEQUENCE_KEYS:
      x = x[:, :x.shape[1] - response_len + r]
    elif key in _RESPONSE_KEYS:
      x = x[:, :r]
    elif x.ndim > 1:
      raise ValueError(f"batch[{key!r}]: unknown [N, ...] array, cannot trim its response axis")
    out[key] = x
  return out


def _trimmed(fn, batch: dict[str, jax.Array], response_len: int,
             buckets: tuple[int, ...] | None, packing: Packing | None = None,
             group_size: int | None = None):
  """`fn(batch, response_len, 0)`, or with `buckets` `fn(trimmed batch, r, 0)` for the smallest
  bucket r that holds every real response token of the batch (one `lax.switch`: each bucket is
  compiled once, only the chosen one runs). Right of a row's last real token there is only
  padding (attn_mask 0, loss / KL masks 0), which no real token attends to: the results are equal.

  With `packing` (whole groups of `group_size`) the packed lengths T of `packed_lengths` are
  branches too, `fn(batch, R, T)`: of the branches that hold the batch (a bucket r >= every
  response's extent, a T >= every group's sum of extents) the cheapest by the cost model of
  `Packing.keys_per_token` runs."""
  if not buckets:
    return fn(batch, response_len, 0)
  if buckets[-1] != response_len:
    raise ValueError(f"buckets: the last must be the response length {response_len}, got "
                     f"{buckets}")
  extent_N = _response_extent(batch["attn_mask"], response_len)
  extent = jnp.max(extent_N)
  branches = [functools.partial(lambda r, b: fn(_trim(b, response_len, r), r, 0), r)
              for r in buckets]
  lengths = ()
  if packing:
    G, R, P = group_size, response_len, batch["tokens"].shape[1] - response_len
    lengths = packed_lengths(packing, P, G, R)
  if not lengths:
    index = jnp.minimum(jnp.searchsorted(jnp.asarray(buckets), extent), len(buckets) - 1)
    return jax.lax.switch(index, branches, batch)
  costs = jnp.asarray(branch_costs(packing, buckets, lengths, P, G))
  need = jnp.max(jnp.sum(extent_N.reshape(-1, G), axis=1))
  holds = jnp.concatenate([extent <= jnp.asarray(buckets), need <= jnp.asarray(lengths)])
  index = jnp.argmin(jnp.where(holds, costs, jnp.inf))  # Bucket R always holds.
  branches += [functools.partial(lambda t, b: fn(b, R, t), t) for t in lengths]
  return jax.lax.switch(index, branches, batch)


def _order_by_length(batch: dict[str, jax.Array], k: int, group_size: int | None,
                     response_len: int, packed: bool = False):
  """The batch's rows reordered so that `_split_micro(., k)` gives micro-batches of similar
  response lengths (whole groups, by their longest response, or with `packed` by the sum of their
  responses' lengths), shortest first; returns (batch,
  rows_N), row i of the new batch being row rows_N[i] of the old. Ties keep today's strided
  micro-batches: a batch of equal lengths is not moved at all."""
  g = group_size or 1
  n = batch["attn_mask"].shape[0]
  units, m = n // g, n // g // k
  extent_UxG = _response_extent(batch["attn_mask"], response_len).reshape(units, g)
  extent_U = extent_UxG.sum(axis=1) if packed else extent_UxG.max(axis=1)
  strided_U = jnp.arange(units).reshape(m, k).T.reshape(-1)  # Micro-batch j: units j, j + k, ...
  order_U = strided_U[jnp.argsort(extent_U[strided_U], stable=True)]
  # Micro-batch j takes units j, j + k, ...: put the j-th run of m sorted units there.
  units_U = order_U.reshape(k, m).T.reshape(-1)
  rows_N = (units_U[:, None] * g + jnp.arange(g)[None, :]).reshape(-1)
  return jax.tree.map(lambda x: x[rows_N], batch), rows_N


def _split_micro(x: jax.Array, k: int, group_size: int | None = None) -> jax.Array:
  """[N, ...] -> [k, N/k, ...] where micro-batch j holds rows j, j+k, j+2k, ...

  A batch-sharded [N] axis splits into contiguous per-device blocks; reshaping to [N/k, k] keeps
  that sharding on the first axis, so each strided micro-batch is spread over every device.
  With `group_size` G the same holds for whole groups: micro-batch j holds groups j, j+k, ...
  (rows in groups of G), so that each keeps its groups' prompts shared.
  """
  g = group_size or 1
  x = x.reshape((x.shape[0] // (k * g), k, g) + x.shape[1:])
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape((k, x.shape[1] * g) + x.shape[3:])


def _merge_micro(x: jax.Array, group_size: int | None = None) -> jax.Array:
  """Inverse of `_split_micro`."""
  g = group_size or 1
  k, m = x.shape[:2]
  x = jnp.swapaxes(x.reshape((k, m // g, g) + x.shape[2:]), 0, 1)
  return x.reshape((k * m,) + x.shape[3:])


def loss_fn(params, graphdef, batch: dict[str, jax.Array], rl: RLConfig, response_len: int,
            denominators: dict[str, jax.Array], temperature: float, frozen: Any = None,
            lm_head_chunk: int = 0, group_size: int | None = None, packed: int = 0):
  """GRPO loss of one micro-batch, normalised by the whole minibatch's denominators.

  Returns (loss, metrics); summing the losses of all micro-batches of a minibatch gives the
  minibatch loss, so their summed gradients are the minibatch gradient. Metrics that are token
  means over this micro-batch come with "tokens" (its loss-mask count) so that `train_step` can
  weight them.

  The entropy is always computed here, because it is logged every step: it comes out of the same
  one-pass reduction over each logits chunk as the log-prob (a few flops per logit next to the
  2E of the head's matmul), and it carries a gradient only when entropy_coef > 0. The old /
  reference forwards never compute it.
  """
  cfg = rl.loss
  logp_NxR, ent_NxR = response_logprobs(graphdef, params, batch["tokens"], batch["attn_mask"],
                                        response_len, with_entropy=True,
                                        temperature=temperature, frozen=frozen,
                                        lm_head_chunk=lm_head_chunk, group_size=group_size,
                                        packed=packed)
  if cfg.entropy_coef == 0:
    ent_NxR = jax.lax.stop_gradient(ent_NxR)
  old_logp_NxR = batch.get("old_logp")
  if old_logp_NxR is None:  # Fully on-policy: the rollout policy is the current one.
    old_logp_NxR = jax.lax.stop_gradient(logp_NxR)
  loss_mask, kl_mask = batch["loss_mask"], batch["kl_mask"]

  pg_loss, metrics = losses.policy_loss(logp_NxR, old_logp_NxR, batch["advantages"], loss_mask,
                                        cfg, denominator=denominators["pg"])
  total = pg_loss
  if cfg.kl_coef > 0:
    kl_NxR = losses.kl_penalty(logp_NxR, batch["ref_logp"], cfg.kl_kind)
    kl = losses.aggregate(kl_NxR, kl_mask, cfg.agg_mode, denominator=denominators["kl"],
                          max_len=cfg.max_len)
    total = total + cfg.kl_coef * kl
    metrics["kl"] = kl
  entropy = losses.aggregate(ent_NxR, loss_mask, cfg.agg_mode, denominator=denominators["pg"],
                             max_len=cfg.max_len)
  if cfg.entropy_coef > 0:
    total = total - cfg.entropy_coef * entropy
  metrics["entropy"] = jax.lax.stop_gradient(entropy)
  metrics["loss"] = total
  metrics["tokens"] = jnp.sum(loss_mask.astype(jnp.float32))
  return total, metrics


# How `train_step` combines the per-micro-batch metrics of `loss_fn` into the minibatch's:
# normalised by the minibatch denominators already (sum), extremes (max), and token means over
# each micro-batch (weighted by its tokens, so that a micro-batch of 3 tokens does not count as
# much as one of 300).
_SUM_METRICS = ("loss", "pg_loss", "kl", "entropy")
_MAX_METRICS = ("ratio_max",)


def combine_micro_metrics(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-micro-batch metrics (leading axis k) -> the minibatch's, as `loss_fn` on it would give."""
  tokens_K = metrics["tokens"]
  total = jnp.sum(tokens_K)
  out = {}
  for k, v in metrics.items():
    if k == "tokens":
      continue
    if k in _SUM_METRICS:
      out[k] = v.sum()
    elif k in _MAX_METRICS:
      out[k] = v.max()
    else:
      out[k] = jnp.sum(v * tokens_K) / jnp.maximum(total, 1.0)
  return out


def combine_step_metrics(metrics: list[dict[str, Any]]) -> dict[str, float]:
  """The metrics of one GRPO step's optimizer updates (minibatches x epochs, as NumPy) -> one
  row: extremes stay extremes (`*_max` the max, `*_min` the min), the rest are means."""
  out = {}
  for key in metrics[0]:
    values = np.asarray([m[key] for m in metrics], np.float64)
    if key in _MAX_METRICS or key.endswith("_max"):
      out[key] = float(values.max())
    elif key.endswith("_min"):
      out[key] = float(values.min())
    else:
      out[key] = float(values.mean())
  return out


def minibatch_indices(key: jax.Array, num_rows: int, minibatch: int,
                      group_size: int | None = None) -> np.ndarray:
  """Row indices of each minibatch of one epoch: [num_rows / minibatch, minibatch].

  Without `group_size`: a random permutation of the rows. With `group_size` G (the shared-prefix
  update) a random permutation of the GROUPS, each group's G rows kept contiguous and in order,
  so that every minibatch holds whole groups (a a a b b b) and runs each prompt once.
  """
  if not group_size:
    perm = np.asarray(jax.random.permutation(key, num_rows))
  else:
    if num_rows % group_size or minibatch % group_size:
      raise ValueError(f"group_size: {num_rows} rows in minibatches of {minibatch} are not whole "
                       f"groups of {group_size}")
    groups = np.asarray(jax.random.permutation(key, num_rows // group_size))
    perm = (groups[:, None] * group_size + np.arange(group_size)).reshape(-1)
  return perm.reshape(num_rows // minibatch, minibatch)


def minibatch_denominators(batch: dict[str, jax.Array], rl: RLConfig) -> dict[str, jax.Array]:
  return {
      "pg": losses.aggregate_denominator(batch["loss_mask"], rl.loss.agg_mode),
      "kl": losses.aggregate_denominator(batch["kl_mask"], rl.loss.agg_mode),
  }


def train_step(state: TrainState, batch: dict[str, jax.Array], frozen: Any = None, *, graphdef,
               tx, rl: RLConfig, response_len: int, num_micro: int, temperature: float,
               lm_head_chunk: int = 0, group_size: int | None = None,
               buckets: tuple[int, ...] | None = None, packing: Packing | None = None):
  """One optimizer step on a minibatch, accumulating gradients over `num_micro` micro-batches.

  With `group_size` G the minibatch's rows are whole groups (a a a b b b) and every micro-batch
  holds whole groups: each prompt's forward and backward run once per group (shared prefix).
  With `buckets` (`response_buckets`) the rows (whole groups with G) are ordered by response
  length into the micro-batches and each micro-batch runs trimmed to the smallest bucket that
  holds its responses: the cost follows the real lengths, the results are equal. With `packing`
  as well (shared prefix) a micro-batch whose groups fit runs each group's responses packed.

  `frozen` holds the base weights of a LoRA run (no gradient, no optimizer state); None otherwise.
  A step whose loss or gradients are not finite leaves params and optimizer state untouched and
  increments `state.skipped`.
  """
  denominators = minibatch_denominators(batch, rl)
  buckets = _worth_trimming(buckets, response_len)
  packing = _packing_for(packing, buckets, group_size)
  if rl.loss.max_len is None:  # The norm aggregation's L stays R when a micro-batch is trimmed.
    rl = dataclasses.replace(rl, loss=dataclasses.replace(rl.loss, max_len=response_len))
  if buckets and num_micro > 1:
    batch, _ = _order_by_length(batch, num_micro, group_size, response_len, packing is not None)
  micro = jax.tree.map(lambda x: _split_micro(x, num_micro, group_size), batch)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro_grad(mb, r, packed):
    (_, metrics), g = grad_fn(state.params, graphdef, mb, rl, r, denominators, temperature,
                              frozen, lm_head_chunk, group_size, packed)
    return g, metrics

  def accumulate(grads, mb):
    g, metrics = _trimmed(micro_grad, mb, response_len, buckets, packing, group_size)
    return jax.tree.map(jnp.add, grads, g), metrics

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  grads, metrics = jax.lax.scan(accumulate, zeros, micro)
  metrics = combine_micro_metrics(metrics)

  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss"])
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  # A skipped update keeps the moments, but the schedule's counter still advances: the learning
  # rate stays a function of the update index (else every skip would delay the schedule by one).
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
  new_opt_state = jax.tree.map(lambda new, old: new if is_schedule(new) else keep(new, old),
                               new_opt_state, state.opt_state, is_leaf=is_schedule)
  state = state.replace(params=keep(new_params, state.params),
                        opt_state=new_opt_state,
                        skipped=state.skipped + (~finite).astype(jnp.int32))
  metrics["grad_norm"] = grad_norm
  metrics["skipped_update"] = (~finite).astype(jnp.float32)
  return state, metrics


# ----------------------------------------------------------------------------------------------
# Memory plan: micro-batch size and remat from a memory budget
# ----------------------------------------------------------------------------------------------

# On CPU more memory buys no speed: micro-batches of a few thousand tokens already run the matmuls
# at the machine's rate. The cap keeps the default far from the host's limit (the sampler, the
# data pipeline and other processes share the RAM) and makes the plan the same on big hosts.
CPU_BUDGET_FRACTION = 0.35
CPU_BUDGET_CAP_BYTES = 6 * 2**30
ACCELERATOR_BUDGET_FRACTION = 0.9


def memory_budget(device: Any = None) -> tuple[float, str, bool]:
  """(bytes, where they come from, per_device) for the update on `device` (default: the first).

  Accelerators: 90% of `device.memory_stats()["bytes_limit"]`, per device. CPU (no memory
  stats): 35% of the host's RAM, at most 6 GiB, shared by all CPU devices of the process.
  """
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # Some backends raise instead of returning None.
    stats = None
  if stats and stats.get("bytes_limit"):
    return (ACCELERATOR_BUDGET_FRACTION * stats["bytes_limit"],
            f"90% of one {device.device_kind}'s {stats['bytes_limit'] / 2**30:.1f} GiB", True)
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  budget = min(CPU_BUDGET_FRACTION * ram, CPU_BUDGET_CAP_BYTES)
  return budget, f"35% of {ram / 2**30:.1f} GiB host RAM, at most 6 GiB", False


def activation_bytes(mcfg, rows: int, prompt_len: int, response_len: int, *,
                     group_size: int | None = None, remat: bool = False,
                     lm_head_chunk: int = 0) -> float:
  """Estimated peak bytes of one micro-batch's forward + backward (activations kept for the
  backward, plus the LM head's working chunk), for `rows` responses of `response_len` tokens after
  prompts of `prompt_len` (shared by groups of `group_size` rows, or repeated per row).

  Per token and layer the backward keeps ~10 E + 5 F values in the compute dtype (norms,
  projections, residuals, the SwiGLU branch) and 3 H S float32 attention values (scores,
  probabilities) over its S visible positions: on SmolLM2-135M (64 rows x 224 tokens, no remat)
  this gives 33.5 GB against the 31.5 GB XLA compiled (issue 15): a slight overestimate, on
  purpose. With remat only each layer's input is kept, plus one layer's values in its backward.
  """
  E, F, H, L = mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_heads, mcfg.num_layers
  K, D, V = mcfg.num_kv_heads, mcfg.head_dim, mcfg.vocab_size
  b = jnp.dtype(mcfg.dtype).itemsize
  P, R = prompt_len, response_len

  def layer(tokens, context):
    return tokens * (10 * E + 5 * F) * b + 3 * H * tokens * context * 4

  if group_size:
    groups = rows // group_size
    tokens = groups * P + rows * R
    per_layer = layer(groups * P, P) + layer(rows * R, P + R) + rows * P * 2 * K * D * b
  else:
    tokens = rows * (P + R)
    per_layer = layer(tokens, P + R)
  body = L * tokens * E * b + per_layer if remat else L * per_layer
  chunk = lm_head_chunk or losses.auto_chunk_size(rows, R, V)
  head = 3 * rows * min(chunk, R) * V * 4 + rows * R * E * b * 2
  return float(body + head)


def state_bytes(trainable_params: int, frozen_params: int, param_dtype: Any) -> float:
  """Params, gradient accumulator and micro-batch gradient, AdamW moments, the new params and
  updates of the trained parameters (~7 copies), plus one copy of the frozen ones."""
  b = jnp.dtype(param_dtype).itemsize
  return float((7 * trainable_params + frozen_params) * b)


@dataclasses.dataclass(frozen=True)
class UpdatePlan:
  """How the update runs: micro-batch rows, remat, shared prefix, and the memory estimate."""
  microbatch: int
  remat: bool
  shared_prefix: bool
  automatic: bool
  budget_bytes: float
  budget_source: str
  state_bytes: float
  activation_bytes: float

  def describe(self, minibatch: int) -> str:
    gb = lambda x: f"{x / 2**30:.1f}"
    how = "sized from the memory budget" if self.automatic else "train.microbatch_size"
    return (f"update: micro-batch {self.microbatch} of {minibatch} responses ({how}), "
            f"shared prefix {'on' if self.shared_prefix else 'off'}, "
            f"remat {'on' if self.remat else 'off'}; estimated peak "
            f"{gb(self.state_bytes + self.activation_bytes)} GiB "
            f"(state {gb(self.state_bytes)} + activations {gb(self.activation_bytes)}) of "
            f"{gb(self.budget_bytes)} GiB ({self.budget_source})")


def plan_update(mcfg, *, minibatch: int, prompt_len: int, response_len: int,
                group_size: int | None, batch_div: int = 1, model_div: int = 1,
                trainable_params: int, frozen_params: int = 0, microbatch: int = 0,
                force_remat: bool = False, budget: tuple[float, str, bool] | None = None,
                lm_head_chunk: int = 0) -> UpdatePlan:
  """Picks the largest micro-batch (a divisor of `minibatch`, whole groups when `group_size` is
  given, divisible by the mesh's batch axes `batch_div`) whose estimated peak fits the budget;
  remat only when even the smallest does not fit without it.

  Args:
    mcfg: the ModelConfig.
    minibatch: responses per optimizer step.
    prompt_len, response_len: the longest padded prompt and the response budget (tokens).
    group_size: G when the update shares each prompt across its group, else None.
    batch_div, model_div: devices the batch / the parameters are split over (per-device budgets).
    trainable_params, frozen_params: parameter counts (LoRA: adapters / base).
    microbatch: an explicit micro-batch (train.microbatch_size); 0 = choose.
    force_remat: model.remat was set.
    budget: `memory_budget()` (default: from the first local device).
  """
  budget_bytes, source, per_device = budget if budget is not None else memory_budget()
  state = state_bytes(trainable_params, frozen_params, mcfg.param_dtype) / (
      model_div if per_device else 1)

  def act(rows, remat, shared):
    a = activation_bytes(mcfg, rows, prompt_len, response_len,
                         group_size=group_size if shared else None, remat=remat,
                         lm_head_chunk=lm_head_chunk)
    return a / (batch_div if per_device else 1)

  def plan(rows, remat, automatic):
    shared = bool(group_size) and rows % group_size == 0
    return UpdatePlan(microbatch=rows, remat=remat, shared_prefix=shared, automatic=automatic,
                      budget_bytes=budget_bytes, budget_source=source, state_bytes=state,
                      activation_bytes=act(rows, remat, shared))

  if microbatch:
    return plan(microbatch, force_remat, False)
  unit = math.lcm(batch_div, group_size or 1)
  sizes = [m for m in range(minibatch, 0, -1) if minibatch % m == 0 and m % unit == 0]
  if not sizes:  # No divisor holds whole groups on every device: one micro-batch.
    sizes = [minibatch]
  for remat in ((True,) if force_remat else (False, True)):
    for rows in sizes:
      if state + act(rows, remat, bool(group_size)) <= budget_bytes:
        return plan(rows, remat, True)
  return plan(sizes[-1], True, True)  # Nothing fits: the smallest, rematerialised (logged).
