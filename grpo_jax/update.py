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
holds it: padding beyond the longest real response costs nothing. `plan_update` picks the
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
from grpo_jax.models.decoder import decoder_hidden_shared_prefix


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
                      lm_head_chunk: int = 0, group_size: int | None = None):
  """Log-prob (and entropy) of each response token under the policy at `temperature`: [N, R] f32.

  With `group_size` G the rows are groups of G responses to one prompt (a a a b b b, the prompt
  part of the G rows identical): each prompt's forward then runs once, not G times
  (`decoder_hidden_shared_prefix`; equal results, fewer FLOPs). Without it, every row runs whole.

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
                              buckets: tuple[int, ...] | None = None) -> jax.Array:
  """`response_logprobs` in micro-batches (bounded activation memory), for old/ref log-probs.

  With `group_size` each micro-batch holds whole groups and runs their prompts once. With
  `buckets` (`response_buckets`) the rows are ordered by response length into the micro-batches
  and each runs on its responses trimmed to the smallest bucket that holds them (`_trimmed`):
  the same log-probs, padding costs nothing.
  """
  n = tokens_NxL.shape[0]
  k = n // microbatch
  buckets = _worth_trimming(buckets, response_len)
  batch = {"tokens": tokens_NxL, "attn_mask": attn_mask_NxL}
  rows_N = None
  if buckets and k > 1:
    batch, rows_N = _order_by_length(batch, k, group_size, response_len)
  micro = jax.tree.map(lambda x: _split_micro(x, k, group_size), batch)

  def forward(mb, r):
    logp_MxR = response_logprobs(graphdef, params, mb["tokens"], mb["attn_mask"], r,
                                 temperature=temperature, frozen=frozen, use_lora=use_lora,
                                 lm_head_chunk=lm_head_chunk, group_size=group_size)
    return jnp.pad(logp_MxR, ((0, 0), (0, response_len - r)))  # Padding's log-prob is 0.

  out = jax.lax.map(lambda mb: _trimmed(forward, mb, response_len, buckets), micro)
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
             buckets: tuple[int, ...] | None):
  """`fn(batch, response_len)`, or with `buckets` `fn(trimmed batch, r)` for the smallest bucket r
  that holds every real response token of the batch (one `lax.switch`: each bucket is compiled
  once, only the chosen one runs). Right of a row's last real token there is only padding
  (attn_mask 0, loss / KL masks 0), which no real token attends to: the results are equal."""
  if not buckets:
    return fn(batch, response_len)
  if buckets[-1] != response_len:
    raise ValueError(f"buckets: the last must be the response length {response_len}, got "
                     f"{buckets}")
  extent = jnp.max(_response_extent(batch["attn_mask"], response_len))
  index = jnp.minimum(jnp.searchsorted(jnp.asarray(buckets), extent), len(buckets) - 1)
  branches = [functools.partial(lambda r, b: fn(_trim(b, response_len, r), r), r)
              for r in buckets]
  return jax.lax.switch(index, branches, batch)


def _order_by_length(batch: dict[str, jax.Array], k: int, group_size: int | None,
                     response_len: int):
  """The batch's rows reordered so that `_split_micro(., k)` gives micro-batches of similar
  response lengths (whole groups, by their longest response), shortest first; returns (batch,
  rows_N), row i of the new batch being row rows_N[i] of the old. Ties keep today's strided
  micro-batches: a batch of equal lengths is not moved at all."""
  g = group_size or 1
  n = batch["attn_mask"].shape[0]
  units, m = n // g, n // g // k
  extent_U = _response_extent(batch["attn_mask"], response_len).reshape(units, g).max(axis=1)
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
            lm_head_chunk: int = 0, group_size: int | None = None):
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
                                        lm_head_chunk=lm_head_chunk, group_size=group_size)
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
               buckets: tuple[int, ...] | None = None):
  """One optimizer step on a minibatch, accumulating gradients over `num_micro` micro-batches.

  With `group_size` G the minibatch's rows are whole groups (a a a b b b) and every micro-batch
  holds whole groups: each prompt's forward and backward run once per group (shared prefix).
  With `buckets` (`response_buckets`) the rows (whole groups with G) are ordered by response
  length into the micro-batches and each micro-batch runs trimmed to the smallest bucket that
  holds its responses: the cost follows the real lengths, the results are equal.

  `frozen` holds the base weights of a LoRA run (no gradient, no optimizer state); None otherwise.
  A step whose loss or gradients are not finite leaves params and optimizer state untouched and
  increments `state.skipped`.
  """
  denominators = minibatch_denominators(batch, rl)
  buckets = _worth_trimming(buckets, response_len)
  if rl.loss.max_len is None:  # The norm aggregation's L stays R when a micro-batch is trimmed.
    rl = dataclasses.replace(rl, loss=dataclasses.replace(rl.loss, max_len=response_len))
  if buckets and num_micro > 1:
    batch, _ = _order_by_length(batch, num_micro, group_size, response_len)
  micro = jax.tree.map(lambda x: _split_micro(x, num_micro, group_size), batch)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro_grad(mb, r):
    (_, metrics), g = grad_fn(state.params, graphdef, mb, rl, r, denominators, temperature,
                              frozen, lm_head_chunk, group_size)
    return g, metrics

  def accumulate(grads, mb):
    g, metrics = _trimmed(micro_grad, mb, response_len, buckets)
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
