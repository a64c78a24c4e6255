"""The policy decoder: Llama 3 / Qwen2 / Qwen3 in Flax NNX, with a KV cache.

Contract (the sampler and the trainer build on exactly this):

  model = Decoder(config, rngs=nnx.Rngs(0))
  logits_BxTxV = model(input_ids_BxT, attention_mask=mask_BxT)
      Left-padded batches. `positions` defaults to cumsum(mask) - 1 clipped at 0, which is what
      HF computes for left padding. Logits are float32 whatever the compute dtype.
  hidden_BxTxE = model(input_ids_BxT, attention_mask=mask_BxT, return_hidden=True)
      Final-norm hidden states (before the LM head); `lm_head_weight(model)` gives the [E, V] head.

  cache = init_cache(config, batch_size, max_len, dtype=None)
      A `KVCache` pytree: k, v [L, B, S, K, D] and valid [B, S] (bool). Nothing host-side, so it
      can be a `lax.while_loop` carry; batch is the axis right after the layer axis.
  logits_BxTxV, cache = model(input_ids_BxT, attention_mask=mask_BxT, positions=pos_BxT,
                              cache=cache, cache_index=idx)
      Writes the T new keys/values at slots [idx, idx + T) (idx: traced int32 scalar,
      lax.dynamic_update_slice), marks them valid where mask_BxT is 1, and each query attends to
      valid slots <= its own slot. Prefill = one call with the whole prompt at idx 0; decode = T=1
      calls at idx = prompt_len, prompt_len + 1, ... Without `positions`, a cached call numbers its
      tokens after the valid slots already in the cache.
  cache = repeat_cache(cache, group_size)     # a a a b b b, as jnp.repeat along the batch.

  Decode step (the sampler's hot loop; see "decode step" below): `to_decode_cache(cache, length)`
  gives a `DecodeCache` (one [B, K, S, D] buffer per layer), `unstack_layers(arrays, L)` the
  weights per layer, and `decode_hidden(config, arrays_u, ids_B, live_B, pos_B, dcache, idx)`
  feeds one token per row, equal to the cached T = 1 call above; `from_decode_cache` goes back.

Functional use inside jit: `graphdef, state = nnx.split(model)`, then `nnx.merge(graphdef, state)`
inside the jitted function.

Sharding: every parameter is an `nnx.Param` carrying logical axis names in the metadata key
`logical_axes` (e.g. ("embed", "mlp")), never mesh axes, so building a model needs no mesh.
`logical_axes_tree(state)` gives those names as a tree, `state_shardings(abstract_state, mesh,
rules)` maps them through `grpo_jax.sharding.logical_to_spec`, and `init_sharded(config, mesh)`
initialises a model directly sharded (eval_shape -> shardings -> jit(init, out_shardings=...)),
so no device ever holds the whole model.

LoRA (`grpo_jax.models.lora`): `Decoder(config, rngs=..., lora=LoraConfig(rank=16, ...))` adds
adapters as `LoraParam` variables (`nnx.split(model, LoraParam, ...)` isolates them for the
optimizer); the forward adds s · x A B to each adapted projection inside the same layer scan, and
`model(..., use_lora=False)` is the base model (the reference policy) on the same arrays.

Layers are stacked (leading "layers" axis on every block parameter) and run with `lax.scan`:
compile time stays flat in depth, which matters for CPU tests and for 28+ layer models alike.
With `config.remat`, each scanned block is wrapped in `jax.checkpoint`, so the backward pass keeps
only the residual stream between layers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from grpo_jax import sharding as sharding_lib
from grpo_jax.models import lora as lora_lib
from grpo_jax.models.config import ModelConfig

_INIT_STD = 0.02


@flax.struct.dataclass
class KVCache:
  """Decoding cache. k, v: [L, B, S, K, D]; valid: [B, S] bool (slot holds a real token)."""

  k: jax.Array
  v: jax.Array
  valid: jax.Array


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype: Any = None) -> KVCache:
  """An empty cache for `batch_size` sequences of up to `max_len` tokens (prompt + response).

  Args:
    config: the model config.
    batch_size: B.
    max_len: S, number of slots.
    dtype: storage dtype of k/v; defaults to the compute dtype.
  """
  if batch_size < 1 or max_len < 1:
    raise ValueError(f"init_cache: batch_size and max_len must be >= 1, got {batch_size}, {max_len}")
  dtype = jnp.dtype(config.dtype if dtype is None else dtype)
  shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                 valid=jnp.zeros((batch_size, max_len), jnp.bool_))


def repeat_cache(cache: KVCache, group_size: int) -> KVCache:
  """Repeats every sequence's cache `group_size` times along the batch (a a a b b b)."""
  return KVCache(k=jnp.repeat(cache.k, group_size, axis=1),
                 v=jnp.repeat(cache.v, group_size, axis=1),
                 valid=jnp.repeat(cache.valid, group_size, axis=0))


def cache_logical_axes() -> KVCache:
  """Logical axis names of the cache arrays (for sharding it like the activations)."""
  kv = ("layers", "batch", "length", "kv_heads", "head_dim")
  return KVCache(k=kv, v=kv, valid=("batch", "length"))


# ----------------------------------------------------------------------------- parameters


def _param(rngs: nnx.Rngs | None, shape, dtype, axes, kind: str) -> nnx.Param:
  if kind == "ones":
    value = jnp.ones(shape, dtype)
  elif kind == "zeros":
    value = jnp.zeros(shape, dtype)
  else:
    value = (_INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, logical_axes=tuple(axes))


class Layers(nnx.Module):
  """All decoder blocks, stacked: every parameter has a leading layer axis."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    L, E, F, H, K, D = (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads,
                        c.num_kv_heads, c.head_dim)
    pd = jnp.dtype(c.param_dtype)
    self.attn_norm = _param(rngs, (L, E), pd, ("layers", "norm"), "ones")
    self.q_proj = _param(rngs, (L, E, H, D), pd, ("layers", "embed", "heads", "head_dim"), "normal")
    self.k_proj = _param(rngs, (L, E, K, D), pd, ("layers", "embed", "kv_heads", "head_dim"),
                         "normal")
    self.v_proj = _param(rngs, (L, E, K, D), pd, ("layers", "embed", "kv_heads", "head_dim"),
                         "normal")
    self.o_proj = _param(rngs, (L, H, D, E), pd, ("layers", "heads", "head_dim", "embed"), "normal")
    if c.attention_bias:
      self.q_bias = _param(rngs, (L, H, D), pd, ("layers", "heads", "head_dim"), "zeros")
      self.k_bias = _param(rngs, (L, K, D), pd, ("layers", "kv_heads", "head_dim"), "zeros")
      self.v_bias = _param(rngs, (L, K, D), pd, ("layers", "kv_heads", "head_dim"), "zeros")
    if c.qk_norm:
      self.q_norm = _param(rngs, (L, D), pd, ("layers", "head_dim"), "ones")
      self.k_norm = _param(rngs, (L, D), pd, ("layers", "head_dim"), "ones")
    self.mlp_norm = _param(rngs, (L, E), pd, ("layers", "norm"), "ones")
    self.gate_proj = _param(rngs, (L, E, F), pd, ("layers", "embed", "mlp"), "normal")
    self.up_proj = _param(rngs, (L, E, F), pd, ("layers", "embed", "mlp"), "normal")
    self.down_proj = _param(rngs, (L, F, E), pd, ("layers", "mlp", "embed"), "normal")


LAYER_PARAM_NAMES = ("attn_norm", "q_proj", "k_proj", "v_proj", "o_proj", "q_bias", "k_bias",
                     "v_bias", "q_norm", "k_norm", "mlp_norm", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- math


def rms_norm(x_BxTxE: jax.Array, weight_E: jax.Array, eps: float) -> jax.Array:
  """HF RMSNorm: normalise in float32, cast back, then scale (in that order, for parity)."""
  x32 = x_BxTxE.astype(jnp.float32)
  var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
  y = (x32 * jax.lax.rsqrt(var + eps)).astype(x_BxTxE.dtype)
  w = weight_E.reshape((1,) * (y.ndim - 1) + weight_E.shape)
  return (w.astype(jnp.float32) * y.astype(jnp.float32)).astype(x_BxTxE.dtype)


def rope_inv_freq(config: ModelConfig) -> jax.Array:
  """[D/2] inverse frequencies, with llama3 scaling as in transformers' _compute_llama3_parameters."""
  d = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  rs = config.rope_scaling
  if rs is None:
    return inv_freq
  factor = float(rs["factor"])
  low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
  old_len = float(rs["original_max_position_embeddings"])
  low_freq_wavelen = old_len / low
  high_freq_wavelen = old_len / high
  wavelen = 2 * math.pi / inv_freq
  inv_freq_llama = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(is_medium, smoothed, inv_freq_llama)


def rope_cos_sin(positions_BxT: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, T, D] in float32 (HF layout: the half-frequencies repeated twice)."""
  freqs_BxTxD2 = positions_BxT.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
  emb_BxTxD = jnp.concatenate([freqs_BxTxD2, freqs_BxTxD2], axis=-1)
  return jnp.cos(emb_BxTxD), jnp.sin(emb_BxTxD)


def apply_rope(x_BxTxNxD: jax.Array, cos_BxTxD: jax.Array, sin_BxTxD: jax.Array) -> jax.Array:
  """Rotary embedding, rotate_half convention (first half / second half of each head)."""
  x = x_BxTxNxD.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_BxTxD[:, :, None, :] + rotated * sin_BxTxD[:, :, None, :]
  return out.astype(x_BxTxNxD.dtype)


def attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array,
              mask_BxTxS: jax.Array) -> jax.Array:
  """Grouped-query attention with a float32 softmax. Returns [B, T, H, D] in q's dtype.

  Query head h reads KV head h // (H / K), as HF's repeat_kv does. A row with no visible key
  (a left-pad query) gets uniform weights instead of NaN; its output is never used.
  """
  B, T, H, D = q_BxTxHxD.shape
  K = k_BxSxKxD.shape[2]
  q_BxTxKxGxD = q_BxTxHxD.reshape(B, T, K, H // K, D)
  scores_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD,
                                preferred_element_type=jnp.float32) / math.sqrt(D)
  big_neg = jnp.finfo(jnp.float32).min
  scores_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None, :, :], scores_BxKxGxTxS, big_neg)
  probs = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxD.dtype)
  out_BxTxKxGxD = jnp.einsum("bkgts,bskd->btkgd", probs, v_BxSxKxD)
  return out_BxTxKxGxD.reshape(B, T, H, D)


def _block(config: ModelConfig, w: Mapping[str, Any], x_BxTxE: jax.Array,
           cos_BxTxD: jax.Array, sin_BxTxD: jax.Array, kv_fn,
           lora: lora_lib.LoraConfig | None = None, attend=None) -> jax.Array:
  """One pre-norm decoder block. `kv_fn(k, v) -> (keys, values, mask_BxTxS)` hides the cache.

  `attend(q, k, v) -> [B, T, H, D]` (when given) replaces `kv_fn` and the dense attention: the
  decode step's per-layer cache and attention (`decode_hidden`).

  With `w["lora"]` ({projection: {"a", "b"}}, one layer's factors) each adapted projection adds
  `lora_delta`; `w["lora_rng"]` (one key per layer) switches the adapter dropout on.
  """
  dt = jnp.dtype(config.dtype)
  cast = lambda name: w[name].astype(dt)
  adapters = w.get("lora", {})
  layer_rng = w.get("lora_rng")

  def proj(name, spec, x):
    y = jnp.einsum(spec, x, cast(name))
    if name not in adapters:
      return y
    rng = None
    if layer_rng is not None:
      rng = jax.random.fold_in(layer_rng, list(lora_lib.TARGETS).index(name))
    ab = adapters[name]
    return y + lora_lib.lora_delta(x, ab["a"], ab["b"], lora_lib.TARGETS[name][1], lora.scale, dt,
                                   lora.dropout, rng)

  h_BxTxE = rms_norm(x_BxTxE, w["attn_norm"], config.rms_norm_eps)
  q = proj("q_proj", "bte,ehd->bthd", h_BxTxE)
  k = proj("k_proj", "bte,ekd->btkd", h_BxTxE)
  v = proj("v_proj", "bte,ekd->btkd", h_BxTxE)
  if config.attention_bias:
    q = q + cast("q_bias")[None, None]
    k = k + cast("k_bias")[None, None]
    v = v + cast("v_bias")[None, None]
  if config.qk_norm:
    q = rms_norm(q, w["q_norm"], config.rms_norm_eps)
    k = rms_norm(k, w["k_norm"], config.rms_norm_eps)
  q = apply_rope(q, cos_BxTxD, sin_BxTxD)
  k = apply_rope(k, cos_BxTxD, sin_BxTxD)
  if attend is not None:
    attn_BxTxHxD = attend(q, k, v)
  else:
    keys, values, mask_BxTxS = kv_fn(k, v)
    attn_BxTxHxD = attention(q, keys.astype(dt), values.astype(dt), mask_BxTxS)
  x_BxTxE = x_BxTxE + proj("o_proj", "bthd,hde->bte", attn_BxTxHxD)
  h_BxTxE = rms_norm(x_BxTxE, w["mlp_norm"], config.rms_norm_eps)
  # The MLP runs on [B*T, E] rows: with 3-D einsums XLA:CPU wrote a transposed [F, B*T] copy of
  # the SiLU derivative per layer in the backward (bench/profile_step.py: 1.4-2x slower update).
  B, T, E = h_BxTxE.shape
  h_MxE = h_BxTxE.reshape(B * T, E)
  gate_MxF = proj("gate_proj", "me,ef->mf", h_MxE)
  up_MxF = proj("up_proj", "me,ef->mf", h_MxE)
  act_MxF = (jax.nn.silu(gate_MxF.astype(jnp.float32)) * up_MxF.astype(jnp.float32)).astype(dt)
  return x_BxTxE + proj("down_proj", "mf,fe->me", act_MxF).reshape(B, T, E)


def default_positions(mask_BxT: jax.Array) -> jax.Array:
  """cumsum(mask) - 1 clipped at 0: position 0 is the first real token of a left-padded row."""
  return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=1) - 1, 0)


def decoder_hidden(config: ModelConfig, params: Mapping[str, Any], input_ids_BxT: jax.Array,
                   mask_BxT: jax.Array | None = None, positions_BxT: jax.Array | None = None,
                   cache: KVCache | None = None, cache_index: Any = None, *,
                   lora: lora_lib.LoraConfig | None = None, lora_dropout_rng: Any = None):
  """Pure forward to the final-norm hidden states.

  Args:
    config: the model config.
    params: {"embed": [V, E], "final_norm": [E], "layers": {name: [L, ...]}} (arrays), and
      optionally "lora": {projection: {"a": [L, *in, r], "b": [L, r, *out]}} adapters.
    input_ids_BxT: int token ids.
    mask_BxT: 1 for real tokens, 0 for padding; all ones when None.
    positions_BxT: RoPE positions; see the module docstring for the default.
    cache: optional KVCache; then `cache_index` (int32 scalar) is the first slot to write.
    lora: the adapters' config (scale, dropout); required when params hold "lora".
    lora_dropout_rng: PRNG key; adapter dropout is applied only when it is given.

  Returns:
    hidden_BxTxE (compute dtype), and the updated cache (None without a cache).
  """
  if input_ids_BxT.ndim != 2:
    raise ValueError(f"input_ids: expected [B, T], got shape {input_ids_BxT.shape}")
  B, T = input_ids_BxT.shape
  if mask_BxT is None:
    mask_BxT = jnp.ones((B, T), jnp.int32)
  if mask_BxT.shape != (B, T):
    raise ValueError(f"attention_mask: expected shape {(B, T)}, got {mask_BxT.shape}")
  valid_BxT = mask_BxT.astype(jnp.bool_)
  dt = jnp.dtype(config.dtype)

  if cache is not None:
    if cache_index is None:
      raise ValueError("cache_index: required when a cache is given")
    S = cache.valid.shape[1]
    idx = jnp.asarray(cache_index, jnp.int32)
    if positions_BxT is None:
      before_B = jnp.sum(cache.valid & (jnp.arange(S)[None, :] < idx), axis=1, dtype=jnp.int32)
      positions_BxT = before_B[:, None] + default_positions(mask_BxT)
    valid_BxS = jax.lax.dynamic_update_slice(cache.valid, valid_BxT, (0, idx))
    slot_T = idx + jnp.arange(T, dtype=jnp.int32)
    causal_TxS = jnp.arange(S, dtype=jnp.int32)[None, :] <= slot_T[:, None]
    mask_BxTxS = causal_TxS[None, :, :] & valid_BxS[:, None, :]
  else:
    if positions_BxT is None:
      positions_BxT = default_positions(mask_BxT)
    causal_TxT = jnp.tril(jnp.ones((T, T), jnp.bool_))
    mask_BxTxS = causal_TxT[None, :, :] & valid_BxT[:, None, :]

  cos_BxTxD, sin_BxTxD = rope_cos_sin(positions_BxT, rope_inv_freq(config))
  x_BxTxE = jnp.take(params["embed"], input_ids_BxT, axis=0).astype(dt)
  layer_w = params["layers"]
  if params.get("lora"):
    if lora is None:
      raise ValueError("lora: params hold LoRA adapters but no LoraConfig was given")
    # The adapters ride through the layer scan with the base weights: one layer's A, B per step.
    layer_w = dict(layer_w, lora=params["lora"])
    if lora_dropout_rng is not None and lora.dropout > 0:
      layer_w["lora_rng"] = jax.random.split(lora_dropout_rng, config.num_layers)

  if cache is None:
    def body(x, w):
      kv_fn = lambda k, v: (k, v, mask_BxTxS)
      return _block(config, w, x, cos_BxTxD, sin_BxTxD, kv_fn, lora), None
    if config.remat:
      body = jax.checkpoint(body, prevent_cse=False)
    x_BxTxE, _ = jax.lax.scan(body, x_BxTxE, layer_w)
    new_cache = None
  else:
    # The whole cache rides in the carry and each layer updates only its T new slots in place;
    # scanning the cache as xs/ys would copy all S slots of every layer per decode step.
    def body(carry, xs):
      x, k_all, v_all = carry
      w, layer = xs

      def kv_fn(k_BxTxKxD, v_BxTxKxD):
        nonlocal k_all, v_all
        start = (layer, jnp.int32(0), idx, jnp.int32(0), jnp.int32(0))
        k_all = jax.lax.dynamic_update_slice(k_all, k_BxTxKxD[None].astype(k_all.dtype), start)
        v_all = jax.lax.dynamic_update_slice(v_all, v_BxTxKxD[None].astype(v_all.dtype), start)
        keys = jax.lax.dynamic_index_in_dim(k_all, layer, axis=0, keepdims=False)
        values = jax.lax.dynamic_index_in_dim(v_all, layer, axis=0, keepdims=False)
        return keys, values, mask_BxTxS

      x = _block(config, w, x, cos_BxTxD, sin_BxTxD, kv_fn, lora)
      return (x, k_all, v_all), None

    layers_idx = jnp.arange(config.num_layers, dtype=jnp.int32)
    (x_BxTxE, k_all, v_all), _ = jax.lax.scan(body, (x_BxTxE, cache.k, cache.v),
                                              (layer_w, layers_idx))
    new_cache = KVCache(k=k_all, v=v_all, valid=valid_BxS)

  hidden_BxTxE = rms_norm(x_BxTxE, params["final_norm"], config.rms_norm_eps)
  return hidden_BxTxE, new_cache


# ----------------------------------------------------------------------------- decode step
#
# One token per row, the hot loop of rollouts. Two things make the layer-scan forward above slow
# there (bench/decode_step.py profiles both): a scan reads layer l's weights and cache with a
# dynamic slice, which XLA materialises (a copy of every weight and of every row's whole K/V per
# layer and step), and a dense [B, S, K, D] cache makes the score einsum transpose K per layer.
# So the decode step runs on its own layout: the weights unstacked once per rollout
# (`unstack_layers`: one copy per call, not per step), the layer loop unrolled in Python, and
# each layer's cache a separate [N, K, S, D] buffer updated in place in the decode loop's carry,
# heads-major so that both attention einsums are plain batched matmuls over (row, kv head).


@flax.struct.dataclass
class DecodeCache:
  """Per-layer decode cache: k, v tuples of L arrays [N, K, S, D]; valid [N, S] bool."""

  k: tuple
  v: tuple
  valid: jax.Array


def decode_cache_logical_axes(num_layers: int) -> DecodeCache:
  """Logical axis names of a `DecodeCache` (sharded like `cache_logical_axes`)."""
  kv = ("batch", "kv_heads", "length", "head_dim")
  return DecodeCache(k=(kv,) * num_layers, v=(kv,) * num_layers, valid=("batch", "length"))


def to_decode_cache(cache: KVCache, length: int | None = None) -> DecodeCache:
  """The first `length` slots (all by default) of a stacked cache, in the per-layer layout."""
  S = cache.valid.shape[1] if length is None else length
  if S > cache.valid.shape[1]:
    raise ValueError(f"length: {S} exceeds the cache's {cache.valid.shape[1]} slots")
  per_layer = lambda a: tuple(jnp.transpose(a[l, :, :S], (0, 2, 1, 3)) for l in range(a.shape[0]))
  return DecodeCache(k=per_layer(cache.k), v=per_layer(cache.v), valid=cache.valid[:, :S])


def from_decode_cache(dcache: DecodeCache, cache: KVCache | None = None) -> KVCache:
  """Back to the stacked layout; with `cache`, written over its first slots (the rest kept)."""
  stack = lambda xs: jnp.stack([jnp.transpose(x, (0, 2, 1, 3)) for x in xs])
  k, v = stack(dcache.k), stack(dcache.v)
  if cache is None:
    return KVCache(k=k, v=v, valid=dcache.valid)
  zero = jnp.int32(0)
  return KVCache(k=jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (zero,) * 5),
                 v=jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (zero,) * 5),
                 valid=jax.lax.dynamic_update_slice(cache.valid, dcache.valid, (zero, zero)))


def resize_decode_cache(dcache: DecodeCache, rows_M: jax.Array | None, length: int) -> DecodeCache:
  """Gathers rows `rows_M` (all if None) and pads or cuts the slots to `length`.

  Padded slots are invalid; a cut must only drop slots that no query will read.
  """
  def fix(a, axis):
    if rows_M is not None:
      a = jnp.take(a, rows_M, axis=0, mode="clip")
    S = a.shape[axis]
    if length <= S:
      return jax.lax.slice_in_dim(a, 0, length, axis=axis)
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, length - S)
    return jnp.pad(a, pad)
  return DecodeCache(k=tuple(fix(a, 2) for a in dcache.k), v=tuple(fix(a, 2) for a in dcache.v),
                     valid=fix(dcache.valid, 1))


def unstack_layers(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
  """`params` (as `Decoder.arrays()`) with "layers" a tuple of L per-layer dicts.

  LoRA factors ride along in each layer's dict under "lora", as the layer scan sees them.
  """
  layer_w = dict(params["layers"])
  if params.get("lora"):
    layer_w["lora"] = params["lora"]
  out = {k: v for k, v in params.items() if k not in ("layers", "lora")}
  out["layers"] = tuple(jax.tree.map(lambda a, l=l: a[l], layer_w) for l in range(num_layers))
  return out


def decode_attention(q_Bx1xHxD: jax.Array, k_BxKxSxD: jax.Array, v_BxKxSxD: jax.Array,
                     mask_BxS: jax.Array) -> jax.Array:
  """One query per row against a heads-major cache; same math as `attention` (float32 softmax)."""
  B, _, H, D = q_Bx1xHxD.shape
  K = k_BxKxSxD.shape[1]
  q_BxKxGxD = q_Bx1xHxD.reshape(B, K, H // K, D)
  scores_BxKxGxS = jnp.einsum("bkgd,bksd->bkgs", q_BxKxGxD, k_BxKxSxD.astype(q_BxKxGxD.dtype),
                              preferred_element_type=jnp.float32) / math.sqrt(D)
  scores_BxKxGxS = jnp.where(mask_BxS[:, None, None, :], scores_BxKxGxS,
                             jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores_BxKxGxS, axis=-1).astype(q_BxKxGxD.dtype)
  out_BxKxGxD = jnp.einsum("bkgs,bksd->bkgd", probs, v_BxKxSxD.astype(q_BxKxGxD.dtype))
  return out_BxKxGxD.reshape(B, 1, H, D)


def decode_hidden(config: ModelConfig, params: Mapping[str, Any], ids_B: jax.Array,
                  live_B: jax.Array, positions_B: jax.Array, dcache: DecodeCache,
                  cache_index: Any, *, lora: lora_lib.LoraConfig | None = None):
  """One decode step on the per-layer layout: feeds token ids_B at slot `cache_index`.

  Equals `decoder_hidden(..., ids[:, None], mask=live[:, None], positions=positions[:, None],
  cache=..., cache_index=...)` (tests/test_model.py) on the `to_decode_cache` layout.

  Args:
    config: the model config.
    params: `unstack_layers(Decoder.arrays(), L)`.
    ids_B, live_B, positions_B: the token, whether it is real (else its slot stays invalid), and
      its RoPE position.
    dcache: the per-layer cache; slot `cache_index` must exist.
    cache_index: int32 scalar slot. Each query reads valid slots <= its slot.
    lora: the adapters' config when params hold LoRA factors.

  Returns:
    (hidden_Bx1xE, dcache).
  """
  dt = jnp.dtype(config.dtype)
  S = dcache.valid.shape[1]
  idx = jnp.asarray(cache_index, jnp.int32)
  zero = jnp.int32(0)
  valid_BxS = jax.lax.dynamic_update_slice(dcache.valid, live_B.astype(jnp.bool_)[:, None],
                                           (zero, idx))
  mask_BxS = valid_BxS & (jnp.arange(S, dtype=jnp.int32) <= idx)[None, :]
  cos_Bx1xD, sin_Bx1xD = rope_cos_sin(positions_B[:, None], rope_inv_freq(config))
  x_Bx1xE = jnp.take(params["embed"], ids_B[:, None], axis=0).astype(dt)
  ks, vs = list(dcache.k), list(dcache.v)
  for l, w in enumerate(params["layers"]):
    def attend(q, k_Bx1xKxD, v_Bx1xKxD, l=l):
      start = (zero, zero, idx, zero)
      ks[l] = jax.lax.dynamic_update_slice(
          ks[l], jnp.transpose(k_Bx1xKxD, (0, 2, 1, 3)).astype(ks[l].dtype), start)
      vs[l] = jax.lax.dynamic_update_slice(
          vs[l], jnp.transpose(v_Bx1xKxD, (0, 2, 1, 3)).astype(vs[l].dtype), start)
      return decode_attention(q, ks[l], vs[l], mask_BxS)
    x_Bx1xE = _block(config, w, x_Bx1xE, cos_Bx1xD, sin_Bx1xD, None, lora, attend=attend)
  hidden = rms_norm(x_Bx1xE, params["final_norm"], config.rms_norm_eps)
  return hidden, DecodeCache(k=tuple(ks), v=tuple(vs), valid=valid_BxS)


def head_logits(config: ModelConfig, params: Mapping[str, Any],
                hidden_BxTxE: jax.Array) -> jax.Array:
  """`Decoder.logits` on arrays: params hold "embed" (tied) or "lm_head" [E, V]. float32."""
  dt = hidden_BxTxE.dtype
  if config.tie_word_embeddings:
    # Contract with the [V, E] embedding as stored: no transposed copy of it per call.
    return jnp.einsum("bte,ve->btv", hidden_BxTxE, params["embed"].astype(dt),
                      preferred_element_type=jnp.float32)
  return jnp.einsum("bte,ev->btv", hidden_BxTxE, params["lm_head"].astype(dt),
                    preferred_element_type=jnp.float32)


def decoder_hidden_shared_prefix(config: ModelConfig, params: Mapping[str, Any],
                                 prompt_ids_BxP: jax.Array, prompt_mask_BxP: jax.Array,
                                 response_ids_NxR: jax.Array, response_mask_NxR: jax.Array, *,
                                 lora: lora_lib.LoraConfig | None = None):
  """Final-norm hidden states of B prompts and their N = B * G responses, each prompt run ONCE.

  Equal to `decoder_hidden` on the N rows [prompt_b, response_n] (the prompt repeated G times,
  a a a b b b) at the prompt's last position and the response positions, but the prompt's layers
  run on [B, P] instead of [N, P]: in every layer the prompt block runs first and its keys /
  values are repeated G times for the responses' attention. Under autodiff the gradients of
  all G responses flow back into the one prompt computation. Positions continue each prompt's
  (cumsum of the mask, as for the concatenated row).

  Args:
    config: the model config (`remat` wraps each layer's two blocks in one `jax.checkpoint`).
    params: as for `decoder_hidden` (LoRA adapters included; no adapter dropout).
    prompt_ids_BxP, prompt_mask_BxP: left-padded prompts, once per group.
    response_ids_NxR, response_mask_NxR: the responses, group b at rows b*G ... b*G + G - 1.

  Returns:
    (prompt_last_BxE, response_hidden_NxRxE): the hidden state at each prompt's last position
    (which predicts the first response token) and at every response position.
  """
  B, P = prompt_ids_BxP.shape
  N, R = response_ids_NxR.shape
  if N % B:
    raise ValueError(f"response_ids: {N} rows are not a whole number of groups of the {B} prompts")
  G = N // B
  pvalid_BxP = prompt_mask_BxP.astype(jnp.bool_)
  rvalid_NxR = response_mask_NxR.astype(jnp.bool_)
  # A response query sees every real prompt token and the real response tokens up to itself.
  rmask_NxRxR = jnp.tril(jnp.ones((R, R), jnp.bool_))[None] & rvalid_NxR[:, None, :]
  plen_N = jnp.repeat(jnp.sum(prompt_mask_BxP.astype(jnp.int32), axis=1), G)
  rpos_NxR = jnp.maximum(plen_N[:, None] + jnp.cumsum(response_mask_NxR.astype(jnp.int32), axis=1)
                         - 1, 0)
  return _prefix_then_responses(config, params, prompt_ids_BxP, pvalid_BxP, response_ids_NxR,
                                rmask_NxRxR, rpos_NxR, G, lora)


def decoder_hidden_packed(config: ModelConfig, params: Mapping[str, Any],
                          prompt_ids_BxP: jax.Array, prompt_mask_BxP: jax.Array,
                          packed_ids_BxT: jax.Array, segment_BxT: jax.Array,
                          position_BxT: jax.Array, valid_BxT: jax.Array, *,
                          lora: lora_lib.LoraConfig | None = None):
  """`decoder_hidden_shared_prefix` with each group's responses packed into one row: no padding.

  Row b of `packed_ids_BxT` holds prompt b's responses one after the other (response g at
  segment id g, positions `position_BxT` continuing the prompt's); a response token sees every
  real prompt token and the real tokens of its own segment up to itself (`valid_BxT`), never
  another response. Padding (segment -1) is seen by nothing; a not-valid position inside a
  segment is seen by nothing and sees its segment's earlier real tokens, as in the unpacked
  layout (its hidden state predicts the token after it). The layers run on
  [B, P] + [B, T] tokens (T = the packed length) instead of [B, P] + [N, R]: with responses of
  unequal lengths T is about their sum, not G times the longest.

  Returns (prompt_last_BxE, packed_hidden_BxTxE).
  """
  T = packed_ids_BxT.shape[1]
  same_BxTxT = segment_BxT[:, :, None] == segment_BxT[:, None, :]
  key_BxT = valid_BxT.astype(jnp.bool_) & (segment_BxT >= 0)
  rmask_BxTxT = jnp.tril(jnp.ones((T, T), jnp.bool_))[None] & same_BxTxT & key_BxT[:, None, :]
  return _prefix_then_responses(config, params, prompt_ids_BxP,
                                prompt_mask_BxP.astype(jnp.bool_), packed_ids_BxT, rmask_BxTxT,
                                position_BxT, 1, lora)


def _prefix_then_responses(config, params, prompt_ids_BxP, pvalid_BxP, response_ids_NxR,
                           rmask_NxRxR, rpos_NxR, G, lora):
  """The layer scan of the shared-prefix forwards: in each layer the prompt block [B, P] runs
  first; the response block [N = B*G, R] attends to its prompt's keys / values (repeated G times)
  and to the response keys allowed by `rmask_NxRxR`."""
  B, P = prompt_ids_BxP.shape
  N, R = response_ids_NxR.shape
  dt = jnp.dtype(config.dtype)
  pmask_BxPxP = jnp.tril(jnp.ones((P, P), jnp.bool_))[None] & pvalid_BxP[:, None, :]
  rmask_NxRxS = jnp.concatenate([
      jnp.broadcast_to(jnp.repeat(pvalid_BxP, G, axis=0)[:, None, :], (N, R, P)), rmask_NxRxR],
      axis=2)
  ppos_BxP = default_positions(pvalid_BxP)
  inv_freq = rope_inv_freq(config)
  pcos, psin = rope_cos_sin(ppos_BxP, inv_freq)
  rcos, rsin = rope_cos_sin(rpos_NxR, inv_freq)
  xp_BxPxE = jnp.take(params["embed"], prompt_ids_BxP, axis=0).astype(dt)
  xr_NxRxE = jnp.take(params["embed"], response_ids_NxR, axis=0).astype(dt)
  layer_w = params["layers"]
  if params.get("lora"):
    if lora is None:
      raise ValueError("lora: params hold LoRA adapters but no LoraConfig was given")
    layer_w = dict(layer_w, lora=params["lora"])

  def body(carry, w):
    xp, xr = carry
    prompt_kv = {}

    def kv_prompt(k, v):
      prompt_kv["k"], prompt_kv["v"] = k, v
      return k, v, pmask_BxPxP

    def kv_response(k, v):
      keys = jnp.concatenate([jnp.repeat(prompt_kv["k"], G, axis=0), k], axis=1)
      values = jnp.concatenate([jnp.repeat(prompt_kv["v"], G, axis=0), v], axis=1)
      return keys, values, rmask_NxRxS

    xp = _block(config, w, xp, pcos, psin, kv_prompt, lora)
    xr = _block(config, w, xr, rcos, rsin, kv_response, lora)
    return (xp, xr), None

  if config.remat:
    body = jax.checkpoint(body, prevent_cse=False)
  (xp_BxPxE, xr_NxRxE), _ = jax.lax.scan(body, (xp_BxPxE, xr_NxRxE), layer_w)
  last_BxE = rms_norm(xp_BxPxE[:, -1], params["final_norm"], config.rms_norm_eps)
  return last_BxE, rms_norm(xr_NxRxE, params["final_norm"], config.rms_norm_eps)


class Decoder(nnx.Module):
  """Decoder-only transformer (Llama 3 / Qwen2 / Qwen3). See the module docstring for the API.

  With `lora` (a `LoraConfig` with rank > 0) the model also holds adapters (`self.lora`, of
  `LoraParam` variables, drawn after the base so the base weights equal a plain model's with the
  same rngs) and the forward adds them unless `use_lora=False`; see `grpo_jax.models.lora`.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs,
               lora: lora_lib.LoraConfig | None = None):
    if not isinstance(config, ModelConfig):
      raise TypeError(f"config: expected a ModelConfig, got {type(config).__name__}")
    if lora is not None and not isinstance(lora, lora_lib.LoraConfig):
      raise TypeError(f"lora: expected a LoraConfig or None, got {type(lora).__name__}")
    self.config = config
    pd = jnp.dtype(config.param_dtype)
    V, E = config.vocab_size, config.hidden_size
    self.embed = _param(rngs, (V, E), pd, ("vocab", "embed"), "normal")
    self.layers = Layers(config, rngs=rngs)
    self.final_norm = _param(rngs, (E,), pd, ("norm",), "ones")
    if not config.tie_word_embeddings:
      self.lm_head = _param(rngs, (E, V), pd, ("embed", "vocab"), "normal")
    if lora is not None and lora.enabled:
      self.lora = lora_lib.LoraAdapters(lora, lora_lib.base_specs(self.layers), rngs=rngs,
                                        saved=lora_lib.saved_sources(self, lora))
      self.lora_config = lora

  def arrays(self, use_lora: bool = True) -> dict[str, Any]:
    """The parameters as plain arrays in the layout `decoder_hidden` takes.

    With adapters (and `use_lora`), also "lora": {projection: {"a", "b"}}, and the trained
    copies of `modules_to_save` parameters in place of the base ones (in the base's dtype).
    """
    layers = {n: getattr(self.layers, n)[...] for n in LAYER_PARAM_NAMES
              if hasattr(self.layers, n)}
    out = {"embed": self.embed[...], "final_norm": self.final_norm[...], "layers": layers}
    if use_lora and lora_lib.has_lora(self):
      out["lora"] = self.lora.arrays()
      for name, value in self.lora.saved_arrays().items():
        if name == "final_norm":
          out[name] = value.astype(out[name].dtype)
        else:
          layers[name] = value.astype(layers[name].dtype)
    return out

  def __call__(self, input_ids_BxT: jax.Array, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None, cache: KVCache | None = None,
               cache_index: Any = None, return_hidden: bool = False, *, use_lora: bool = True,
               lora_dropout_rng: Any = None):
    """Logits [B, T, V] float32 (or hidden states with `return_hidden`); with a cache, also the cache.

    `use_lora=False` runs the base model (the reference policy: same weights, adapters off).
    `lora_dropout_rng` switches the adapter dropout on (training); without it the forward is
    deterministic.
    """
    hidden_BxTxE, new_cache = decoder_hidden(
        self.config, self.arrays(use_lora), input_ids_BxT, attention_mask, positions, cache,
        cache_index, lora=getattr(self, "lora_config", None), lora_dropout_rng=lora_dropout_rng)
    out = hidden_BxTxE if return_hidden else self.logits(hidden_BxTxE)
    return out if cache is None else (out, new_cache)

  def lm_head_weight(self) -> jax.Array:
    """[E, V] LM head (the transposed embedding when tied)."""
    if self.config.tie_word_embeddings:
      return self.embed[...].T
    return self.lm_head[...]

  def logits(self, hidden_BxTxE: jax.Array) -> jax.Array:
    """LM head in the compute dtype, accumulated and returned in float32."""
    w_ExV = self.lm_head_weight().astype(hidden_BxTxE.dtype)
    return jnp.einsum("bte,ev->btv", hidden_BxTxE, w_ExV, preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- sharding


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def logical_axes_tree(state: Any) -> Any:
  """Same tree as `state` (an nnx.State), leaves = tuples of logical axis names (None if unnamed)."""
  def axes(v):
    names = v.get_metadata().get("logical_axes")
    return tuple(names) if names is not None else (None,) * len(v.get_value().shape)
  return jax.tree.map(axes, state, is_leaf=_is_var)


def state_shardings(abstract_state: Any, mesh: Mesh,
                    rules: Mapping[str, Any] = sharding_lib.TRAIN_RULES) -> Any:
  """NamedSharding per parameter (a tree prefix of `abstract_state`, usable as jit in/out_shardings).

  Args:
    abstract_state: nnx.State of arrays or ShapeDtypeStructs (from `nnx.eval_shape`).
    mesh: the device mesh.
    rules: logical axis -> mesh axes (grpo_jax.sharding.TRAIN_RULES by default).
  """
  def shard(v):
    names = v.get_metadata().get("logical_axes")
    shape = v.get_value().shape
    names = tuple(names) if names is not None else (None,) * len(shape)
    return NamedSharding(mesh, sharding_lib.logical_to_spec(names, shape, mesh, rules))
  return jax.tree.map(shard, abstract_state, is_leaf=_is_var)


def init_sharded(config: ModelConfig, mesh: Mesh,
                 rules: Mapping[str, Any] = sharding_lib.TRAIN_RULES, seed: int = 0,
                 lora: lora_lib.LoraConfig | None = None) -> Decoder:
  """Initialises a Decoder whose parameters are born sharded on `mesh` (never gathered on one device).

  With `lora`, the adapters are created too, sharded like their base weights.
  """
  abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(seed), lora=lora))
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    return nnx.state(Decoder(config, rngs=nnx.Rngs(seed), lora=lora))

  return nnx.merge(graphdef, init())


def shard_model(model: Decoder, mesh: Mesh,
                rules: Mapping[str, Any] = sharding_lib.TRAIN_RULES) -> Decoder:
  """Places an existing model's parameters onto `mesh` (for small models or tests)."""
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, state_shardings(state, mesh, rules))
  return nnx.merge(graphdef, state)
