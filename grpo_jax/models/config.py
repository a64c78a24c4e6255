"""`ModelConfig`: the shape of a Llama 3 / Qwen2 / Qwen3 decoder, and its Hugging Face form.

One frozen dataclass describes every supported family; the family differences are three flags
(`attention_bias` for Qwen2's q/k/v bias, `qk_norm` for Qwen3's per-head RMSNorm, and
`rope_scaling` for Llama 3.1+'s frequency remapping). `config_from_hf` / `config_to_hf` translate
to and from a transformers `config.json` dict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")

# Names accepted for `dtype` / `param_dtype` (config strings, HF `torch_dtype` strings).
_DTYPES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
}

_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings")


def canonical_dtype(dtype: Any, field: str = "dtype") -> str:
  """Returns 'float32' or 'bfloat16' for any accepted spelling; raises a ValueError otherwise."""
  if isinstance(dtype, str):
    if dtype in _DTYPES:
      return jnp.dtype(_DTYPES[dtype]).name
  else:
    try:
      name = jnp.dtype(dtype).name
    except TypeError:
      name = None
    if name in ("float32", "bfloat16"):
      return name
  raise ValueError(f"{field}: expected float32 or bfloat16, got {dtype!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static description of a decoder. Validated on construction.

  Attributes:
    vocab_size: rows of the embedding / LM head.
    hidden_size: model width E.
    intermediate_size: SwiGLU width F.
    num_layers: decoder blocks L.
    num_heads: query heads H.
    num_kv_heads: key/value heads K (H % K == 0; grouped-query attention).
    head_dim: D per head (Qwen3 sets it independently of hidden_size / num_heads).
    rope_theta: RoPE base.
    rope_scaling: None, or the llama3 dict {"rope_type": "llama3", "factor", "low_freq_factor",
      "high_freq_factor", "original_max_position_embeddings"}.
    rms_norm_eps: RMSNorm epsilon.
    tie_word_embeddings: the LM head reuses the embedding matrix.
    attention_bias: q/k/v projections have a bias (Qwen2; o_proj never has one here).
    qk_norm: per-head RMSNorm on queries and keys before RoPE (Qwen3).
    model_type: "llama" | "qwen2" | "qwen3" (written back to config.json).
    max_position_embeddings: recorded for the HF config; positions are not clipped to it.
    param_dtype: storage dtype of parameters, "float32" or "bfloat16".
    dtype: compute dtype of matmuls, "float32" or "bfloat16" (norms, softmax and RoPE stay float32).
    remat: rematerialise each decoder block in the backward pass (jax.checkpoint per layer).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: Mapping[str, Any] | None = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  qk_norm: bool = False
  model_type: str = "llama"
  max_position_embeddings: int = 4096
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_position_embeddings"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"ModelConfig.{name}: expected a positive int, got {v!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                       f"num_kv_heads ({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim: RoPE needs an even head_dim, got {self.head_dim}")
    if not self.rope_theta > 0:
      raise ValueError(f"ModelConfig.rope_theta: expected > 0, got {self.rope_theta!r}")
    if not self.rms_norm_eps > 0:
      raise ValueError(f"ModelConfig.rms_norm_eps: expected > 0, got {self.rms_norm_eps!r}")
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"ModelConfig.model_type: expected one of {SUPPORTED_MODEL_TYPES}, "
                       f"got {self.model_type!r}")
    if self.rope_scaling is not None:
      rs = dict(self.rope_scaling)
      kind = rs.get("rope_type", rs.get("type"))
      if kind != "llama3":
        raise ValueError(f"ModelConfig.rope_scaling: only None or rope_type 'llama3' is supported, "
                         f"got {kind!r}")
      missing = [k for k in _LLAMA3_ROPE_KEYS if k not in rs]
      if missing:
        raise ValueError(f"ModelConfig.rope_scaling: llama3 scaling needs {missing}")
      # Frozen dataclasses must be hashable (jit static args); store the dict as sorted items.
      object.__setattr__(self, "rope_scaling", _FrozenDict(rs))
    for name in ("tie_word_embeddings", "attention_bias", "qk_norm", "remat"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"ModelConfig.{name}: expected a bool, got {getattr(self, name)!r}")
    object.__setattr__(self, "param_dtype", canonical_dtype(self.param_dtype, "ModelConfig.param_dtype"))
    object.__setattr__(self, "dtype", canonical_dtype(self.dtype, "ModelConfig.dtype"))

  @property
  def num_params(self) -> int:
    """Parameter count (embedding counted once when tied)."""
    e, f, h, k, d = (self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads,
                     self.head_dim)
    attn = e * h * d * 2 + e * k * d * 2
    if self.attention_bias:
      attn += (h + 2 * k) * d
    if self.qk_norm:
      attn += 2 * d
    per_layer = attn + 3 * e * f + 2 * e
    head = 0 if self.tie_word_embeddings else self.vocab_size * e
    return self.vocab_size * e + head + self.num_layers * per_layer + e

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


class _FrozenDict(dict):
  """A dict that hashes by content, so a config holding one stays a valid static jit argument."""

  def __hash__(self):
    return hash(tuple(sorted(self.items())))

  def _readonly(self, *a, **k):
    raise TypeError("rope_scaling is read-only")

  __setitem__ = __delitem__ = update = pop = clear = setdefault = _readonly


def config_from_hf(hf: Mapping[str, Any], *, dtype: Any = "float32",
                   param_dtype: Any = None, remat: bool = False,
                   source: str = "config.json") -> ModelConfig:
  """Builds a ModelConfig from a transformers config dict (the contents of `config.json`).

  Args:
    hf: the parsed config.json.
    dtype: compute dtype.
    param_dtype: parameter dtype; defaults to `dtype`.
    remat: rematerialise each layer.
    source: file name used in error messages.
  """
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"{source}: unsupported model_type {model_type!r} "
                     f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
  if hf.get("mlp_bias"):
    raise ValueError(f"{source}: mlp_bias=true is not supported")
  if hf.get("use_sliding_window"):
    raise ValueError(f"{source}: use_sliding_window=true is not supported")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"{source}: hidden_act must be 'silu' (SwiGLU), got {act!r}")
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads"):
    if key not in hf:
      raise ValueError(f"{source}: missing field {key!r}")
  num_heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
  # transformers 5 moved rope_theta into `rope_parameters`; older files keep it top level.
  rope_params = dict(hf.get("rope_parameters") or {})
  rope_scaling = hf.get("rope_scaling") or None
  rope_theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
  kind = rope_params.get("rope_type", rope_params.get("type", "default"))
  if rope_scaling is None and kind not in (None, "default"):
    rope_scaling = rope_params
  if rope_scaling is not None:
    rope_scaling = {k: v for k, v in dict(rope_scaling).items() if k != "rope_theta"}
    if rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
      rope_scaling = None
  try:
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
        qk_norm=model_type == "qwen3",
        model_type=model_type,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        param_dtype=dtype if param_dtype is None else param_dtype,
        dtype=dtype,
        remat=remat,
    )
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None


def config_to_hf(config: ModelConfig, **extra) -> dict[str, Any]:
  """The transformers `config.json` dict for `config` (extra keys, e.g. token ids, are merged in)."""
  arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
  rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
  if config.rope_scaling is not None:
    rope_parameters = {**dict(config.rope_scaling), "rope_type": "llama3",
                       "rope_theta": config.rope_theta}
  hf = {
      "architectures": [arch[config.model_type]],
      "model_type": config.model_type,
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings,
      "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta,
      "rope_parameters": rope_parameters,
      "tie_word_embeddings": config.tie_word_embeddings,
      "torch_dtype": config.param_dtype,
      "dtype": config.param_dtype,
      "use_cache": True,
  }
  if config.rope_scaling is not None:
    hf["rope_scaling"] = {**dict(config.rope_scaling), "rope_type": "llama3"}
  if config.model_type == "llama":
    hf["attention_bias"] = config.attention_bias
    hf["mlp_bias"] = False
  elif config.model_type == "qwen3":
    hf["attention_bias"] = config.attention_bias
    hf["use_sliding_window"] = False
  else:
    if not config.attention_bias:
      raise ValueError("config: qwen2 always has q/k/v bias; attention_bias must be True")
    hf["use_sliding_window"] = False
  hf.update(extra)
  return hf
