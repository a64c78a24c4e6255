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
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from grpo_jax import losses
from grpo_jax import models
from grpo_jax.config import OptimConfig, RLConfig


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
                      lm_head_chunk: int = 0):
  """Log-prob (and entropy) of each response token under the policy at `temperature`: [N, R] f32.

  Entry t of the result is log p(response token t | everything before it), 0 where the response
  is padding (attn_mask 0). Only the R positions that predict response tokens go through the LM
  head (the prompt's logits are never computed), in chunks of `lm_head_chunk` positions (0:
  `losses.auto_chunk_size`, under 256 MB of float32 logits per chunk), log-prob and entropy from
  one pass over each chunk. Dividing the [E, V] head by the temperature divides the logits by it,
  matching the distribution the sampler drew from. `use_lora=False` is the reference policy of a
  LoRA run: the same base weights with the adapters switched off (no second copy).
  """
  model = merge(graphdef, params, frozen)
  kwargs = {} if use_lora else {"use_lora": False}
  hidden_NxLxE = model(tokens_NxL, attention_mask=attn_mask_NxL, return_hidden=True, **kwargs)
  # Position t predicts token t + 1: the R positions before the last predict the response.
  start = tokens_NxL.shape[1] - response_len
  return _head(model, hidden_NxLxE[:, start - 1:-1], tokens_NxL[:, start:],
               attn_mask_NxL[:, start:], with_entropy, temperature, lm_head_chunk)


def _head(model, pred_hidden_NxRxE, targets_NxR, mask_NxR, with_entropy, temperature,
          lm_head_chunk):
  w_ExV = model.lm_head_weight()
  if temperature != 1.0:
    w_ExV = w_ExV / jnp.asarray(temperature, w_ExV.dtype)
  logp, ent = losses.head_logprobs(pred_hidden_NxRxE, w_ExV, targets_NxR,
                                   chunk_size=lm_head_chunk or None, with_entropy=with_entropy)
  keep = mask_NxR.astype(jnp.bool_)
  logp = jnp.where(keep, logp, 0.0)
  return (logp, jnp.where(keep, ent, 0.0)) if with_entropy else logp


def batched_response_logprobs(graphdef, params, tokens_NxL, attn_mask_NxL, response_len: int,
                              microbatch: int, temperature: float = 1.0, frozen: Any = None,
                              use_lora: bool = True, lm_head_chunk: int = 0) -> jax.Array:
  """`response_logprobs` in micro-batches (bounded activation memory), for old/ref log-probs."""
  n = tokens_NxL.shape[0]
  k = n // microbatch
  # Strided micro-batches ([m, k] -> [k, m]) keep each one evenly sharded over the batch axes
  # without moving data between devices (see `_split_micro`).
  toks, mask = _split_micro(tokens_NxL, k), _split_micro(attn_mask_NxL, k)
  out = jax.lax.map(lambda tm: response_logprobs(graphdef, params, tm[0], tm[1], response_len,
                                                 temperature=temperature, frozen=frozen,
                                                 use_lora=use_lora, lm_head_chunk=lm_head_chunk),
                     (toks, mask))
  return _merge_micro(out)


def _split_micro(x: jax.Array, k: int) -> jax.Array:
  """[N, ...] -> [k, N/k, ...] where micro-batch j holds rows j, j+k, j+2k, ...

  A batch-sharded [N] axis splits into contiguous per-device blocks; reshaping to [N/k, k] keeps
  that sharding on the first axis, so each strided micro-batch is spread over every device.
  """
  return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)


def _merge_micro(x: jax.Array) -> jax.Array:
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def loss_fn(params, graphdef, batch: dict[str, jax.Array], rl: RLConfig, response_len: int,
            denominators: dict[str, jax.Array], temperature: float, frozen: Any = None,
            lm_head_chunk: int = 0):
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
                                        lm_head_chunk=lm_head_chunk)
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


def minibatch_denominators(batch: dict[str, jax.Array], rl: RLConfig) -> dict[str, jax.Array]:
  return {
      "pg": losses.aggregate_denominator(batch["loss_mask"], rl.loss.agg_mode),
      "kl": losses.aggregate_denominator(batch["kl_mask"], rl.loss.agg_mode),
  }


def train_step(state: TrainState, batch: dict[str, jax.Array], frozen: Any = None, *, graphdef,
               tx, rl: RLConfig, response_len: int, num_micro: int, temperature: float,
               lm_head_chunk: int = 0):
  """One optimizer step on a minibatch, accumulating gradients over `num_micro` micro-batches.

  `frozen` holds the base weights of a LoRA run (no gradient, no optimizer state); None otherwise.
  A step whose loss or gradients are not finite leaves params and optimizer state untouched and
  increments `state.skipped`.
  """
  denominators = minibatch_denominators(batch, rl)
  micro = jax.tree.map(lambda x: _split_micro(x, num_micro), batch)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulate(grads, mb):
    (_, metrics), g = grad_fn(state.params, graphdef, mb, rl, response_len, denominators,
                              temperature, frozen, lm_head_chunk)
    return jax.tree.map(jnp.add, grads, g), metrics

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  grads, metrics = jax.lax.scan(accumulate, zeros, micro)
  metrics = combine_micro_metrics(metrics)

  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss"])
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  state = state.replace(params=keep(new_params, state.params),
                        opt_state=keep(new_opt_state, state.opt_state),
                        skipped=state.skipped + (~finite).astype(jnp.int32))
  metrics["grad_norm"] = grad_norm
  metrics["skipped_update"] = (~finite).astype(jnp.float32)
  return state, metrics
