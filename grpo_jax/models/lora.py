"""LoRA adapters on the stacked-layer decoder: config, parameters, forward term, merge.

    y = x W + s · dropout(x) A B,    s = alpha / rank  (alpha / sqrt(rank) with `use_rslora`)

(Hu et al. 2021, "LoRA"; rsLoRA: Kalajdzievski 2023). For every targeted projection W of
per-layer shape [*in, *out] (our layouts: q/k/v [E, N, D], o [H, D, E], gate/up [E, F],
down [F, E]) the adapter holds

    A  [L, *in, r]   logical axes (layers, <W's in axes>, "lora_rank")
    B  [L, r, *out]  logical axes (layers, "lora_rank", <W's out axes>)

so `grpo_jax.sharding` shards A like W's input dims and B like W's output dims, and the product
x A B needs no more communication than x W. "lora_rank" is replicated (TRAIN_RULES).

Why our own module and not qwix (what Tunix uses): qwix finds the matmuls to adapt by
intercepting `nnx.Linear` / `nnx.Einsum` calls under a module path. Our decoder keeps each
projection as one stacked [L, ...] `nnx.Param` and runs every layer's einsums inside one pure
function under `lax.scan` (`decoder_hidden`), so there is no per-projection module for qwix to
match, and rewriting the decoder around qwix would lose the pure-arrays forward the sampler and
the trainer share. The adapter is two einsums and a zero-initialised parameter; ~200 lines of our
own, tested against `peft`, are cheaper than that.

Adapters are `LoraParam` variables (a subclass of `nnx.Param`), so

    graphdef, lora_state, base_state = nnx.split(model, LoraParam, ...)

separates what is trained (and carries optimizer state) from the frozen base. Gradients are taken
with respect to `lora_state` only; the base enters the step as a constant, so no base gradient is
ever formed. The reference policy is the same model with `use_lora=False` (or `without_lora`):
the same arrays, no copy.

Initialisation follows PEFT's default (`init_lora_weights=True`): B = 0 and A ~ kaiming-uniform
with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = prod(in). With B = 0 the
adapted model equals the base exactly. `init="gaussian"` draws A ~ N(0, 1/r) instead (PEFT's
"gaussian"). Adapters are stored in float32 whatever the base's dtype: they are small, and the
optimizer updates them in full precision; the forward casts them to the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from grpo_jax import sharding as sharding_lib

# Our projection name -> (the HF / PEFT module name inside a decoder layer, number of leading
# per-layer axes of our weight that are inputs). The remaining axes are outputs.
TARGETS: Mapping[str, tuple[str, int]] = {
    "q_proj": ("self_attn.q_proj", 1),
    "k_proj": ("self_attn.k_proj", 1),
    "v_proj": ("self_attn.v_proj", 1),
    "o_proj": ("self_attn.o_proj", 2),
    "gate_proj": ("mlp.gate_proj", 1),
    "up_proj": ("mlp.up_proj", 1),
    "down_proj": ("mlp.down_proj", 1),
}

# Parameters that can be trained whole next to the adapters (PEFT's `modules_to_save`): our name
# -> (the HF / PEFT module name, True when it lives inside each decoder layer). The frozen base
# keeps the original; the adapters hold a trained copy, used whenever the adapters are on.
SAVABLE: Mapping[str, tuple[str, bool]] = {
    "final_norm": ("model.norm", False),
    "attn_norm": ("input_layernorm", True),
    "mlp_norm": ("post_attention_layernorm", True),
    "q_norm": ("self_attn.q_norm", True),
    "k_norm": ("self_attn.k_norm", True),
}

ALL_LINEAR = "all-linear"
_INITS = ("kaiming_uniform", "gaussian")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyper-parameters. Validated on construction; `rank=0` means full fine-tuning (no adapters).

  Attributes:
    rank: r, the adapter rank; 0 turns LoRA off.
    alpha: scaling numerator: the update is (alpha / rank) · A B (PEFT's `lora_alpha`).
    dropout: dropout probability on the adapter's input (PEFT's `lora_dropout`); applied only
      when the forward is given a `lora_dropout_rng`.
    target_modules: which projections get adapters. Each entry is a regular expression
      full-matched against our names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
      down_proj) and against the HF names inside a layer (self_attn.q_proj, mlp.up_proj, ...);
      "all-linear" picks all seven (as in PEFT). Every entry must match something.
    use_rslora: scale by alpha / sqrt(rank) instead (rank-stabilised LoRA).
    init: "kaiming_uniform" (PEFT's default) or "gaussian" for A; B always starts at 0.
    modules_to_save: norm weights trained whole next to the adapters (PEFT's `modules_to_save`):
      regular expressions full-matched against our names (final_norm, attn_norm, mlp_norm,
      q_norm, k_norm) and the HF ones (model.norm, input_layernorm, post_attention_layernorm,
      self_attn.q_norm, self_attn.k_norm). The adapters hold a trained copy; the base (the
      reference policy) keeps the original. With a frozen tied embedding the final norm's scale
      bounds how peaked the policy can get, so training it (E numbers) matters on small models.
  """

  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  target_modules: tuple[str, ...] = (ALL_LINEAR,)
  use_rslora: bool = False
  init: str = "kaiming_uniform"
  modules_to_save: tuple[str, ...] = ()

  def __post_init__(self):
    if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
      raise ValueError(f"LoraConfig.rank: expected an int >= 0 (0 = off), got {self.rank!r}")
    if (not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool)
        or not self.alpha > 0):
      raise ValueError(f"LoraConfig.alpha: expected a number > 0, got {self.alpha!r}")
    object.__setattr__(self, "alpha", float(self.alpha))
    if (not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool)
        or not 0 <= self.dropout < 1):
      raise ValueError(f"LoraConfig.dropout: expected a probability in [0, 1), got {self.dropout!r}")
    object.__setattr__(self, "dropout", float(self.dropout))
    self._set_patterns("target_modules", _matches, allow_empty=False,
                       known=f"projection (known: {', '.join(TARGETS)}, or {ALL_LINEAR!r})")
    if not isinstance(self.use_rslora, bool):
      raise ValueError(f"LoraConfig.use_rslora: expected a bool, got {self.use_rslora!r}")
    if self.init not in _INITS:
      raise ValueError(f"LoraConfig.init: expected one of {_INITS}, got {self.init!r}")
    self._set_patterns("modules_to_save", _matches_saved, allow_empty=True,
                       known=f"trainable module (known: {', '.join(SAVABLE)}; embeddings and the "
                             f"LM head are not supported)")

  def _set_patterns(self, field: str, matches, *, allow_empty: bool, known: str):
    """Normalises a str / list of name patterns to a tuple; each must match something."""
    value = getattr(self, field)
    patterns = (value,) if isinstance(value, str) else value
    if (not isinstance(patterns, (tuple, list)) or (not patterns and not allow_empty)
        or not all(isinstance(p, str) for p in patterns)):
      kind = "a tuple" if allow_empty else "a non-empty tuple"
      raise ValueError(f"LoraConfig.{field}: expected {kind} of name patterns, got {value!r}")
    object.__setattr__(self, field, tuple(patterns))
    for pattern in patterns:
      if not matches(pattern):
        raise ValueError(f"LoraConfig.{field}: {pattern!r} matches no {known}")

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    """s in y = x W + s · x A B."""
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

  @property
  def targets(self) -> tuple[str, ...]:
    """Our names of the adapted projections, in `TARGETS` order."""
    return tuple(n for n in TARGETS if any(n in _matches(p) for p in self.target_modules))

  @property
  def saved(self) -> tuple[str, ...]:
    """Our names of the parameters trained whole (`modules_to_save`), in `SAVABLE` order."""
    return tuple(n for n in SAVABLE if any(n in _matches_saved(p) for p in self.modules_to_save))

  def replace(self, **changes) -> "LoraConfig":
    return dataclasses.replace(self, **changes)


def _match_names(field: str, pattern: str, table: Mapping[str, tuple[str, Any]]) -> tuple[str, ...]:
  """Our names in `table` whose own or HF name `pattern` (a regex) full-matches."""
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"LoraConfig.{field}: {pattern!r} is not a valid regex ({e})") from None
  return tuple(n for n, (hf_name, _) in table.items()
               if regex.fullmatch(n) or regex.fullmatch(hf_name))


def _matches(pattern: str) -> tuple[str, ...]:
  if pattern == ALL_LINEAR:
    return tuple(TARGETS)
  return _match_names("target_modules", pattern, TARGETS)


def _matches_saved(pattern: str) -> tuple[str, ...]:
  return _match_names("modules_to_save", pattern, SAVABLE)


class LoraParam(nnx.Param):
  """A trainable adapter parameter; `nnx.split(model, LoraParam, ...)` puts these apart."""


class LoraPair(nnx.Module):
  """The A [L, *in, r] and B [L, r, *out] factors of one projection's adapter."""

  def __init__(self, a: LoraParam, b: LoraParam):
    self.a = a
    self.b = b


class LoraAdapters(nnx.Module):
  """One `LoraPair` per targeted projection, as attributes named after the projection, and a
  trained copy of each `modules_to_save` parameter, as an attribute named after it."""

  def __init__(self, lora: LoraConfig, base: Mapping[str, tuple[tuple[int, ...], tuple[Any, ...]]],
               *, rngs: nnx.Rngs,
               saved: Mapping[str, tuple[jax.Array, tuple[Any, ...]]] | None = None):
    """Draws the adapters.

    Args:
      lora: the (enabled) config.
      base: projection name -> (stacked shape, logical axes) of its base weight.
      rngs: draws A.
      saved: `modules_to_save` name -> (current base value, logical axes); copied in float32
        (see `saved_sources`). Required when `lora.saved` is not empty.
    """
    saved = saved or {}
    for name in lora.saved:
      if name not in saved:
        raise ValueError(f"LoraAdapters: no base value given for modules_to_save {name!r}")
      value, axes = saved[name]
      setattr(self, name, LoraParam(jnp.asarray(value, jnp.float32), logical_axes=tuple(axes)))
    r = lora.rank
    for name in lora.targets:
      shape, axes = base[name]
      n_in = TARGETS[name][1]
      in_shape, out_shape = tuple(shape[1:1 + n_in]), tuple(shape[1 + n_in:])
      a_shape = (shape[0],) + in_shape + (r,)
      if lora.init == "kaiming_uniform":
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound, bound)
      else:
        a = jax.random.normal(rngs.params(), a_shape, jnp.float32) / r
      b = jnp.zeros((shape[0], r) + out_shape, jnp.float32)
      a_axes = tuple(axes[:1 + n_in]) + ("lora_rank",)
      b_axes = (axes[0], "lora_rank") + tuple(axes[1 + n_in:])
      setattr(self, name, LoraPair(LoraParam(a, logical_axes=a_axes),
                                   LoraParam(b, logical_axes=b_axes)))

  def arrays(self) -> dict[str, dict[str, jax.Array]]:
    """{projection: {"a": A, "b": B}} as plain arrays (the layout `decoder_hidden` takes)."""
    out = {}
    for name in TARGETS:
      pair = getattr(self, name, None)
      if pair is not None:
        out[name] = {"a": pair.a[...], "b": pair.b[...]}
    return out

  def saved_arrays(self) -> dict[str, jax.Array]:
    """{name: trained copy} of the `modules_to_save` parameters (float32)."""
    return {name: getattr(self, name)[...] for name in SAVABLE if hasattr(self, name)}


def base_specs(layers: nnx.Module) -> dict[str, tuple[tuple[int, ...], tuple[Any, ...]]]:
  """Projection name -> (shape, logical axes) of the stacked base weights of a `Layers` module."""
  out = {}
  for name in TARGETS:
    v = getattr(layers, name)
    out[name] = (tuple(v.get_value().shape), tuple(v.get_metadata()["logical_axes"]))
  return out


def saved_sources(model: nnx.Module, lora: LoraConfig) -> dict[str, tuple[jax.Array, tuple[Any, ...]]]:
  """`modules_to_save` name -> (the base value, its logical axes) of a `Decoder` (for `LoraAdapters`).

  Raises:
    ValueError: naming the module when the model has no such parameter (q_norm / k_norm exist
      only with qk_norm, as in Qwen3).
  """
  out = {}
  for name in lora.saved:
    owner = model if name == "final_norm" else model.layers
    var = getattr(owner, name, None)
    if var is None:
      raise ValueError(f"lora.modules_to_save: this model has no {name!r} "
                       f"({SAVABLE[name][0]}) to train")
    out[name] = (var[...], tuple(var.get_metadata()["logical_axes"]))
  return out


# ----------------------------------------------------------------------------- math


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, n_in: int, scale: float, dtype: Any,
               dropout: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
  """s · dropout(x) A B for one layer, never forming the [*in, *out] product A B.

  Args:
    x: [B, T, *in] input of the projection.
    a: [*in, r]; b: [r, *out] (one layer's factors).
    n_in: number of input axes.
    scale: s.
    dtype: compute dtype (the factors are cast to it, as the base weights are).
    dropout: drop probability; used only with `rng`.
    rng: PRNG key for the dropout mask.

  Returns:
    [B, T, *out] in `dtype`.
  """
  if dropout > 0 and rng is not None:
    keep = jax.random.bernoulli(rng, 1.0 - dropout, x.shape)
    x = jnp.where(keep, x / jnp.asarray(1.0 - dropout, x.dtype), jnp.zeros((), x.dtype))
  # Contract x's trailing input axes with A's leading ones: [B, T, r], the smallest tensor here,
  # so the scale is applied there.
  xa = jnp.tensordot(x, a.astype(dtype), axes=n_in)
  xa = xa * jnp.asarray(scale, xa.dtype)
  return jnp.tensordot(xa, b.astype(dtype), axes=1)


def merged_weight(w: jax.Array, a: jax.Array, b: jax.Array, n_in: int, scale: float) -> jax.Array:
  """W + s · A B for stacked [L, *in, *out] weights, accumulated in float32, in W's dtype."""
  in_letters = "ijkl"[:n_in]
  out_letters = "mnop"[:w.ndim - 1 - n_in]
  spec = f"z{in_letters}r,zr{out_letters}->z{in_letters}{out_letters}"
  ab = jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32),
                  precision=jax.lax.Precision.HIGHEST)
  return (w.astype(jnp.float32) + scale * ab).astype(w.dtype)


@functools.partial(jax.jit, static_argnames=("n_in", "scale"))
def _merged_weight_jit(w, a, b, n_in, scale):
  return merged_weight(w, a, b, n_in, scale)


# ----------------------------------------------------------------------------- model surgery


def has_lora(model: nnx.Module) -> bool:
  return getattr(model, "lora_config", None) is not None


def trainable(model: nnx.Module) -> Any:
  """The nnx filter of what the optimizer should update: `LoraParam` with LoRA, else `nnx.Param`.

  Use it as `graphdef, trained, frozen = nnx.split(model, trainable(model), ...)`.
  """
  return LoraParam if has_lora(model) else nnx.Param


def add_lora(model: nnx.Module, lora: LoraConfig, *, seed: int = 0, mesh: Mesh | None = None,
             rules: Mapping[str, Any] = sharding_lib.TRAIN_RULES) -> nnx.Module:
  """Attaches fresh adapters (B = 0) to a `Decoder` without them, in place; returns the model.

  `Decoder(config, rngs=..., lora=lora)` does the same at construction; this is for a model that
  already exists (e.g. just loaded by `from_pretrained`). With `mesh`, the adapters are created
  directly sharded by their logical axes (like their base weights). `rank=0` is a no-op.
  """
  if not isinstance(lora, LoraConfig):
    raise TypeError(f"lora: expected a LoraConfig, got {type(lora).__name__}")
  if has_lora(model):
    raise ValueError("add_lora: the model already has LoRA adapters")
  if not lora.enabled:
    return model
  specs = base_specs(model.layers)
  sources = saved_sources(model, lora)
  values = {name: value for name, (value, _) in sources.items()}

  def make(values):
    saved = {name: (values[name], axes) for name, (_, axes) in sources.items()}
    return LoraAdapters(lora, specs, rngs=nnx.Rngs(seed), saved=saved)

  if mesh is None:
    adapters = make(values)
  else:
    graphdef, abstract = nnx.split(nnx.eval_shape(make, values))
    shardings = jax.tree.map(
        lambda v: sharding_lib.logical_sharding(v.get_metadata()["logical_axes"],
                                                v.get_value().shape, mesh, rules),
        abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
    state = jax.jit(lambda values: nnx.state(make(values)), out_shardings=shardings)(values)
    adapters = nnx.merge(graphdef, state)
  model.lora = adapters
  model.lora_config = lora
  return model


def _copy_without_lora(model: nnx.Module) -> nnx.Module:
  """A new model object over the same arrays, with the adapters detached."""
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, state)
  if has_lora(copy):
    del copy.lora
    copy.lora_config = None
  return copy


def without_lora(model: nnx.Module) -> nnx.Module:
  """The base model: the same parameter arrays (no copy), adapters detached.

  This is the reference policy; `model(..., use_lora=False)` is the same thing without a new
  object. Works inside jit too (on the model from `nnx.merge`).
  """
  return _copy_without_lora(model)


def merge_lora(model: nnx.Module) -> nnx.Module:
  """A plain Decoder whose targeted weights are W + s · A B (for HF export or fast sampling).

  Untargeted parameters are shared with `model`, not copied; each merged weight is a new array
  (so memory grows by the targeted weights while both models live), sharded like W. The trained
  copies of `modules_to_save` parameters replace their originals (cast to the base dtype).
  Dropout plays no part in merging. A model without adapters is returned as a detached copy.
  """
  merged = _copy_without_lora(model)
  if not has_lora(model):
    return merged
  lora = model.lora_config
  for name, ab in model.lora.arrays().items():
    w = getattr(merged.layers, name)
    w[...] = _merged_weight_jit(w[...], ab["a"], ab["b"], n_in=TARGETS[name][1],
                                scale=lora.scale)
  for name, value in model.lora.saved_arrays().items():
    owner = merged if name == "final_norm" else merged.layers
    var = getattr(owner, name)
    var[...] = value.astype(var[...].dtype)
  return merged
