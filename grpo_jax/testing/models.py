"""Tiny model configs for tests and smoke runs, one per supported family, built in code.

`tiny_config(name)` gives a ModelConfig small enough to compile in seconds on CPU;
`tiny_hf_model(config, seed)` builds the matching transformers PyTorch model with every weight
(norms and biases included) randomised, so parity tests exercise each parameter.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from grpo_jax.models.config import ModelConfig, config_to_hf
from grpo_jax.models.decoder import init_cache

_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, max_position_embeddings=256)

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    # Qwen2: q/k/v bias, untied head.
    "qwen2": dict(_BASE, model_type="qwen2", attention_bias=True, rope_theta=1e6),
    # Qwen2.5-0.5B style: bias and tied embeddings.
    "qwen2_tied": dict(_BASE, model_type="qwen2", attention_bias=True, tie_word_embeddings=True),
    # Qwen3: per-head q/k RMSNorm, head_dim independent of hidden_size / num_heads, tied.
    "qwen3": dict(_BASE, model_type="qwen3", qk_norm=True, head_dim=16, tie_word_embeddings=True,
                  rope_theta=1e6),
    # Llama 3.1+: llama3 rope scaling (small original length so that all three bands are hit).
    "llama3": dict(_BASE, model_type="llama", rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "llama_tied": dict(_BASE, model_type="llama", num_kv_heads=4, tie_word_embeddings=True),
}


def tiny_config(name: str = "qwen2", **overrides) -> ModelConfig:
  """A tiny ModelConfig of family `name` (a key of TINY_CONFIGS), with field overrides."""
  if name not in TINY_CONFIGS:
    raise ValueError(f"tiny_config: unknown name {name!r} (known: {sorted(TINY_CONFIGS)})")
  return ModelConfig(**{**TINY_CONFIGS[name], **overrides})


def qwen2_0p5b_config(**overrides) -> ModelConfig:
  """The shape of Qwen2.5-0.5B (random weights; for benchmarks)."""
  fields = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6,
                tie_word_embeddings=True, attention_bias=True, model_type="qwen2",
                max_position_embeddings=32768)
  return ModelConfig(**{**fields, **overrides})


def tiny_hf_model(config: ModelConfig, seed: int = 0, scale: float = 0.1):
  """The transformers PyTorch model for `config`, float32, every parameter randomised.

  Norm weights are drawn around 1 and everything else around 0 with std `scale`, so a loader
  that drops a bias or a norm, or transposes a matrix, changes the logits.
  """
  import torch
  import transformers

  hf_config = transformers.AutoConfig.for_model(**config_to_hf(config.replace(param_dtype="float32")))
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + scale * torch.randn_like(p))
      else:
        p.copy_(scale * torch.randn_like(p))
  model.eval()
  return model


@functools.partial(jax.jit, static_argnums=3)
def decode_token_by_token(model, ids_BxT, mask_BxT, prompt_len):
  """Logits [B, T, V] of a cached run: prefill `prompt_len` tokens at slot 0, then feed the rest
  one token per call. Tests compare it with the full (uncached) forward."""
  B, T = ids_BxT.shape
  cache = init_cache(model.config, B, T + 2)
  logits_pre, cache = model(ids_BxT[:, :prompt_len], attention_mask=mask_BxT[:, :prompt_len],
                            cache=cache, cache_index=0)

  def step(cache, t):
    tok = jax.lax.dynamic_slice_in_dim(ids_BxT, t, 1, axis=1)
    m = jax.lax.dynamic_slice_in_dim(mask_BxT, t, 1, axis=1)
    logits, cache = model(tok, attention_mask=m, cache=cache, cache_index=t)
    return cache, logits[:, 0]

  _, logits_dec = jax.lax.scan(step, cache, jnp.arange(prompt_len, T))
  return jnp.concatenate([logits_pre, logits_dec.transpose(1, 0, 2)], axis=1)
