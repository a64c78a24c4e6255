"""Decoder invariants: cached = uncached, sharded = one device, chunked log-probs = reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax import sharding
from grpo_jax.models import (Decoder, ModelConfig, config_from_hf, config_to_hf, init_cache,
                             init_sharded, logical_axes_tree, repeat_cache, shard_model,
                             token_logprobs, token_logprobs_and_entropy)
from grpo_jax.testing.models import decode_token_by_token, tiny_config


def _left_padded(B=3, T=12, V=96, seed=0):
  ids = np.random.RandomState(seed).randint(0, V, (B, T))
  mask = np.ones((B, T), np.int32)
  mask[0, :4] = 0
  mask[1, :1] = 0
  return jnp.asarray(ids), jnp.asarray(mask)


@pytest.fixture(scope="module")
def models():
  return {name: Decoder(tiny_config(name), rngs=nnx.Rngs(1))
          for name in ("qwen2", "qwen3", "llama3")}


_decode_all = decode_token_by_token


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "llama3"])
def test_cached_decoding_equals_full_forward(models, name):
  model = models[name]
  ids, mask = _left_padded()
  full = model(ids, attention_mask=mask)
  cached = _decode_all(model, ids, mask, 6)
  valid = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(cached)[valid], np.asarray(full)[valid], atol=1e-5)


def test_explicit_positions_and_repeat_cache(models):
  """Prefill once, repeat the cache G times (a a b b), decode: equals the repeated full forward."""
  model, G = models["qwen3"], 2
  ids, mask = _left_padded(B=2, T=9)
  full = model(jnp.repeat(ids, G, 0), attention_mask=jnp.repeat(mask, G, 0))
  cache = init_cache(model.config, 2, 12)
  pos = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
  _, cache = model(ids[:, :7], attention_mask=mask[:, :7], positions=pos[:, :7], cache=cache,
                   cache_index=jnp.int32(0))
  cache = repeat_cache(cache, G)
  assert cache.k.shape[1] == 4 and cache.valid.shape == (4, 12)
  outs = []
  for t in (7, 8):
    logits, cache = model(jnp.repeat(ids[:, t:t + 1], G, 0), attention_mask=jnp.ones((4, 1)),
                          positions=jnp.repeat(pos[:, t:t + 1], G, 0), cache=cache,
                          cache_index=jnp.int32(t))
    outs.append(logits[:, 0])
  np.testing.assert_allclose(np.stack(outs, 1), np.asarray(full)[:, 7:9], atol=1e-5)


def test_padding_does_not_leak(models):
  """Changing the pad tokens of a left-padded row leaves its real-token logits unchanged."""
  model = models["llama3"]
  ids, mask = _left_padded()
  other = jnp.where(mask == 0, (ids + 7) % 96, ids)
  a, b = model(ids, attention_mask=mask), model(other, attention_mask=mask)
  valid = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(a)[valid], np.asarray(b)[valid], atol=1e-6)
  # And a row padded by 4 equals the same tokens unpadded.
  solo = model(ids[:1, 4:], attention_mask=mask[:1, 4:])
  np.testing.assert_allclose(np.asarray(a)[0, 4:], np.asarray(solo)[0], atol=1e-5)


def _log_softmax_ref(logits_BxTxV, tokens_BxT, mask_BxT):
  """NumPy reference: entry t = log softmax(logits[t-1])[tokens[t]], 0 at t=0 and at pads."""
  x = np.asarray(logits_BxTxV, np.float64)
  logp = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
  B, T = tokens_BxT.shape
  out = np.zeros((B, T))
  ent = np.zeros((B, T))
  for b in range(B):
    for t in range(1, T):
      if mask_BxT[b, t]:
        out[b, t] = logp[b, t - 1, tokens_BxT[b, t]]
        ent[b, t] = -(np.exp(logp[b, t - 1]) * logp[b, t - 1]).sum()
  return out, ent


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 5])
def test_token_logprobs_alignment_and_chunking(models, chunk_size):
  model = models["qwen2"]
  ids, mask = _left_padded()
  ref, ref_ent = _log_softmax_ref(model(ids, attention_mask=mask), np.asarray(ids), np.asarray(mask))
  lp = token_logprobs(model, ids, mask, chunk_size=chunk_size)
  assert lp.shape == ids.shape and lp.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(lp), ref, atol=2e-5)
  lp2, ent = token_logprobs_and_entropy(model, ids, mask, chunk_size=chunk_size)
  np.testing.assert_allclose(np.asarray(lp2), ref, atol=2e-5)
  np.testing.assert_allclose(np.asarray(ent), ref_ent, atol=2e-5)


def test_token_logprobs_gradient_chunked_equals_unchunked(models):
  model = models["qwen3"]
  ids, mask = _left_padded()
  graphdef, state = nnx.split(model)

  def loss(state, chunk):
    return jnp.sum(token_logprobs(nnx.merge(graphdef, state), ids, mask, chunk_size=chunk))

  g1 = jax.grad(loss)(state, None)
  g2 = jax.grad(loss)(state, 3)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_remat_same_gradients():
  cfg = tiny_config("llama3")
  ids, mask = _left_padded()
  grads = []
  for remat in (False, True):
    model = Decoder(cfg.replace(remat=remat), rngs=nnx.Rngs(3))
    graphdef, state = nnx.split(model)
    f = lambda s: jnp.sum(token_logprobs(nnx.merge(graphdef, s), ids, mask))
    grads.append(jax.grad(f)(state))
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_sharded_8_devices_equals_one_device(models):
  model = models["qwen2"]
  ids, mask = _left_padded(B=4)
  ref = model(ids, attention_mask=mask)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
  sharded = shard_model(model, mesh)
  assert sharded.layers.gate_proj[...].sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor")
  graphdef, state = nnx.split(sharded)

  @jax.jit
  def fwd(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, attention_mask=mask)

  out = fwd(state, *sharding.shard_batch((ids, mask), mesh))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_init_sharded_matches_plain_init_and_axes_named():
  cfg = tiny_config("qwen3")
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  sharded = init_sharded(cfg, mesh, seed=5)
  plain = Decoder(cfg, rngs=nnx.Rngs(5))
  # Same random draws; jit may fuse the init scaling differently, hence rtol not equality.
  for a, b in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(plain))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)
  assert sharded.embed[...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  state = nnx.state(plain)
  axes = logical_axes_tree(state)
  for names, v in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
                      jax.tree.leaves(state)):
    assert len(names) == v.ndim and all(n in sharding.TRAIN_RULES for n in names)


def test_bfloat16_compute_close_to_float32(models):
  model = models["qwen2"]
  ids, mask = _left_padded()
  graphdef, state = nnx.split(model)
  bf = nnx.merge(graphdef, state)
  bf.config = model.config.replace(dtype="bfloat16")
  out = bf(ids, attention_mask=mask)
  assert out.dtype == jnp.float32
  ref = model(ids, attention_mask=mask)
  assert float(jnp.max(jnp.abs(out - ref))) < 0.1


def test_config_validation_and_hf_round_trip():
  cfg = tiny_config("llama3")
  assert config_from_hf(config_to_hf(cfg)) == cfg
  assert config_from_hf(config_to_hf(tiny_config("qwen3"))) == tiny_config("qwen3")
  hash(cfg)  # static jit argument
  base = dataclasses.asdict(tiny_config("qwen2"))
  with pytest.raises(ValueError, match="num_heads .* multiple of num_kv_heads"):
    ModelConfig(**{**base, "num_kv_heads": 3})
  with pytest.raises(ValueError, match="ModelConfig.dtype: expected float32 or bfloat16"):
    ModelConfig(**{**base, "dtype": "float16"})
  with pytest.raises(ValueError, match="model_type"):
    ModelConfig(**{**base, "model_type": "mistral"})
  with pytest.raises(ValueError, match="rope_scaling"):
    ModelConfig(**{**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
  with pytest.raises(ValueError, match="hidden_size: expected a positive int"):
    ModelConfig(**{**base, "hidden_size": 0})
