"""Hugging Face checkpoints in and out: `config.json` + `*.safetensors` <-> `Decoder`.

`from_pretrained` reads a local folder (one `model.safetensors`, or shards listed in
`model.safetensors.index.json`). With a mesh, every parameter is created by
`jax.make_array_from_callback`: each device's callback reads only its own slice of the file with
safetensors' `get_slice`, so a large model is never materialised whole on one host.
`save_pretrained` writes what `transformers.AutoModelForCausalLM.from_pretrained` loads unchanged.
LoRA adapters go out either merged (`save_pretrained(merge_lora(model), path)`) or in PEFT's own
format (`save_peft_adapters`, which `peft.PeftModel.from_pretrained(base, path)` loads), and come
back with `load_peft_adapters`.

Layout mapping (ours <- HF, per layer; ours are stacked over layers):
  q/k/v_proj [E, N, D] <- self_attn.{q,k,v}_proj.weight [N*D, E]
  o_proj     [H, D, E] <- self_attn.o_proj.weight [E, H*D]
  gate/up    [E, F]    <- mlp.{gate,up}_proj.weight [F, E];  down [F, E] <- mlp.down_proj.weight [E, F]
  lm_head    [E, V]    <- lm_head.weight [V, E]   (absent when tied)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from grpo_jax import sharding as sharding_lib
from grpo_jax.models import lora as lora_lib
from grpo_jax.models.config import ModelConfig, canonical_dtype, config_from_hf, config_to_hf
from grpo_jax.models.decoder import LAYER_PARAM_NAMES, Decoder, state_shardings

# name -> (HF name (with {i} for the layer), groups). `groups[j]` lists which of our (per-layer)
# axes make up HF dimension j, outermost first: ((1, 2), (0,)) means HF dim 0 = our axes 1 and 2
# flattened, HF dim 1 = our axis 0.
_TOP = {
    "embed": ("model.embed_tokens.weight", ((0,), (1,))),
    "final_norm": ("model.norm.weight", ((0,),)),
    "lm_head": ("lm_head.weight", ((1,), (0,))),
}
_LAYER = {
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", ((0,),)),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", ((0,),)),
    "q_proj": ("model.layers.{i}.self_attn.q_proj.weight", ((1, 2), (0,))),
    "k_proj": ("model.layers.{i}.self_attn.k_proj.weight", ((1, 2), (0,))),
    "v_proj": ("model.layers.{i}.self_attn.v_proj.weight", ((1, 2), (0,))),
    "o_proj": ("model.layers.{i}.self_attn.o_proj.weight", ((2,), (0, 1))),
    "q_bias": ("model.layers.{i}.self_attn.q_proj.bias", ((0, 1),)),
    "k_bias": ("model.layers.{i}.self_attn.k_proj.bias", ((0, 1),)),
    "v_bias": ("model.layers.{i}.self_attn.v_proj.bias", ((0, 1),)),
    "q_norm": ("model.layers.{i}.self_attn.q_norm.weight", ((0,),)),
    "k_norm": ("model.layers.{i}.self_attn.k_norm.weight", ((0,),)),
    "gate_proj": ("model.layers.{i}.mlp.gate_proj.weight", ((1,), (0,))),
    "up_proj": ("model.layers.{i}.mlp.up_proj.weight", ((1,), (0,))),
    "down_proj": ("model.layers.{i}.mlp.down_proj.weight", ((1,), (0,))),
}
assert set(_LAYER) == set(LAYER_PARAM_NAMES)

_FLOAT_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}


def _hf_shape(groups, shape) -> tuple[int, ...]:
  return tuple(math.prod(shape[a] for a in g) for g in groups)


def _to_ours(block: np.ndarray, groups, shape, index: tuple[slice, ...]) -> np.ndarray:
  """Turns an HF block (already cut to the outer ranges) into our layout, cut to `index`."""
  split, inner = [], []
  for g in groups:
    split.append(index[g[0]].stop - index[g[0]].start)
    inner.append(slice(None))
    for a in g[1:]:
      split.append(shape[a])
      inner.append(index[a])
  block = block.reshape(split)[tuple(inner)]
  order = [a for g in groups for a in g]
  return block.transpose([order.index(j) for j in range(len(order))])


def _hf_index(groups, shape, index: tuple[slice, ...]) -> tuple[slice, ...]:
  """The contiguous HF ranges covering `index` (inner axes of a group are read whole)."""
  out = []
  for g in groups:
    inner = math.prod(shape[a] for a in g[1:])
    out.append(slice(index[g[0]].start * inner, index[g[0]].stop * inner))
  return tuple(out)


def _from_ours(ours: np.ndarray, groups) -> np.ndarray:
  order = [a for g in groups for a in g]
  return ours.transpose(order).reshape(_hf_shape(groups, ours.shape))


class _Checkpoint:
  """Open safetensors files of one folder, tensor name -> file, with checked reads."""

  def __init__(self, path: str, stack: contextlib.ExitStack):
    from safetensors import safe_open
    self.path = path
    index_file = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index_file):
      with open(index_file) as f:
        self.where = dict(json.load(f)["weight_map"])
      files = sorted(set(self.where.values()))
    elif os.path.exists(single):
      files = ["model.safetensors"]
      self.where = None
    else:
      found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
      if not found:
        raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or "
                                f"*.safetensors file")
      files, self.where = found, None
    self.handles = {}
    for fname in files:
      full = os.path.join(path, fname)
      if not os.path.exists(full):
        raise FileNotFoundError(f"{index_file}: lists {fname}, which does not exist")
      self.handles[fname] = stack.enter_context(safe_open(full, framework="numpy"))
    if self.where is None:
      self.where = {k: f for f, h in self.handles.items() for k in h.keys()}

  def has(self, name: str) -> bool:
    return name in self.where

  def slice(self, name: str, expected_shape: tuple[int, ...]):
    if name not in self.where:
      raise KeyError(f"{self.path}: tensor {name!r} is missing from "
                     f"{', '.join(sorted(self.handles))}")
    fname = self.where[name]
    if name not in self.handles[fname].keys():
      raise KeyError(f"{os.path.join(self.path, fname)}: tensor {name!r} is missing (the index "
                     f"says it is there)")
    sl = self.handles[fname].get_slice(name)
    shape, dt = tuple(sl.get_shape()), sl.get_dtype()
    if shape != tuple(expected_shape):
      raise ValueError(f"{os.path.join(self.path, fname)}: tensor {name!r} has shape {shape}, "
                       f"expected {tuple(expected_shape)} from config.json")
    if dt not in _FLOAT_DTYPES:
      raise ValueError(f"{os.path.join(self.path, fname)}: tensor {name!r} has dtype {dt}; only "
                       f"{sorted(_FLOAT_DTYPES)} can be loaded (quantised weights are not supported)")
    return sl


def _norm_index(index, shape) -> tuple[slice, ...]:
  return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _read_param(ckpt: _Checkpoint, name: str, shape, dtype, index) -> np.ndarray:
  """Reads our parameter `name` (full stacked shape `shape`), cut to `index`, as `dtype`."""
  index = _norm_index(index, shape)
  if name in _TOP:
    hf_name, groups = _TOP[name]
    sl = ckpt.slice(hf_name, _hf_shape(groups, shape))
    block = sl[_hf_index(groups, shape, index)]
    return _to_ours(np.asarray(block), groups, shape, index).astype(dtype)
  template, groups = _LAYER[name]
  per_layer, sub = shape[1:], index[1:]
  blocks = []
  for i in range(index[0].start, index[0].stop):
    sl = ckpt.slice(template.format(i=i), _hf_shape(groups, per_layer))
    block = sl[_hf_index(groups, per_layer, sub)]
    blocks.append(_to_ours(np.asarray(block), groups, per_layer, sub).astype(dtype))
  if not blocks:
    return np.zeros((0,) + tuple(s.stop - s.start for s in sub), dtype)
  return np.stack(blocks)


def read_hf_config(path: str) -> dict[str, Any]:
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise FileNotFoundError(f"{cfg_file}: not found (from_pretrained needs a local HF model folder)")
  with open(cfg_file) as f:
    return json.load(f)


def from_pretrained(path: str | os.PathLike, *, dtype: Any = "float32", param_dtype: Any = None,
                    mesh: Mesh | None = None,
                    rules: Mapping[str, Any] = sharding_lib.TRAIN_RULES,
                    remat: bool = False, lora: lora_lib.LoraConfig | None = None,
                    lora_seed: int = 0) -> Decoder:
  """Loads a Llama / Qwen2 / Qwen3 checkpoint from a local HF folder into a Decoder.

  Args:
    path: folder with config.json and safetensors (tokenizer files may sit beside them).
    dtype: compute dtype ("float32" / "bfloat16").
    param_dtype: parameter dtype; defaults to `dtype`. The file's dtype is cast to it.
    mesh: when given, each parameter is placed straight onto its sharding (per-device reads).
    rules: logical axis rules for the mesh.
    remat: rematerialise each layer in the backward pass.
    lora: when given (rank > 0), fresh adapters (B = 0, A drawn from `lora_seed`) are attached,
      sharded like their base weights on `mesh`.
    lora_seed: seed of the adapters' A.
  """
  path = os.fspath(path)
  dtype = canonical_dtype(dtype, "dtype")
  param_dtype = canonical_dtype(dtype if param_dtype is None else param_dtype, "param_dtype")
  config = config_from_hf(read_hf_config(path), dtype=dtype, param_dtype=param_dtype, remat=remat,
                          source=os.path.join(path, "config.json"))
  abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules) if mesh is not None else None
  np_dtype = np.dtype(jnp.dtype(param_dtype))
  pure = nnx.to_pure_dict(abstract_state)

  with contextlib.ExitStack() as stack:
    ckpt = _Checkpoint(path, stack)

    def load(keypath, leaf):
      name = keypath[-1].key
      shape = tuple(leaf.shape)
      if mesh is None:
        full = tuple(slice(0, n) for n in shape)
        return jnp.asarray(_read_param(ckpt, name, shape, np_dtype, full))
      sharding = _lookup(shardings, keypath)
      return jax.make_array_from_callback(
          shape, sharding, lambda idx: _read_param(ckpt, name, shape, np_dtype, idx))

    arrays = jax.tree_util.tree_map_with_path(load, pure)
  nnx.replace_by_pure_dict(abstract_state, arrays)
  model = nnx.merge(graphdef, abstract_state)
  if lora is not None:
    lora_lib.add_lora(model, lora, seed=lora_seed, mesh=mesh, rules=rules)
  return model


def _lookup(tree, keypath):
  for k in keypath:
    tree = tree[k.key]
  return tree


def hf_tensors(model: Decoder) -> dict[str, np.ndarray]:
  """The model's parameters as host NumPy arrays under their HF names, in the parameter dtype."""
  def host(x):
    # On several processes a sharded array must be gathered first.
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))

  if lora_lib.has_lora(model):
    raise ValueError("model: has LoRA adapters, which an HF checkpoint cannot hold; export "
                     "merge_lora(model) or write the adapters with save_peft_adapters")
  arrays = model.arrays()
  out = {}
  for name, (hf_name, groups) in _TOP.items():
    if name == "lm_head":
      if model.config.tie_word_embeddings:
        continue
      value = model.lm_head[...]
    else:
      value = arrays[name]
    # safetensors writes the raw buffer: a transposed view must be made contiguous first.
    out[hf_name] = np.ascontiguousarray(_from_ours(host(value), groups))
  for name, w in arrays["layers"].items():
    template, groups = _LAYER[name]
    w = host(w)
    for i in range(w.shape[0]):
      out[template.format(i=i)] = np.ascontiguousarray(_from_ours(w[i], groups))
  return out


def save_pretrained(model: Decoder, path: str | os.PathLike, *,
                    max_shard_bytes: int = 5 * 2**30,
                    hf_config_extra: Mapping[str, Any] | None = None) -> None:
  """Writes config.json + safetensors (sharded with an index above `max_shard_bytes`).

  The result loads with `transformers.AutoModelForCausalLM.from_pretrained(path)` and with
  `from_pretrained(path)`. Tensors are written in the parameter dtype. Only process 0 writes.

  Args:
    model: the Decoder.
    path: output folder (created).
    max_shard_bytes: largest safetensors file.
    hf_config_extra: extra config.json keys (e.g. bos_token_id / eos_token_id).
  """
  from safetensors.numpy import save_file

  path = os.fspath(path)
  tensors = hf_tensors(model)
  if jax.process_index() != 0:
    return
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(model.config, **dict(hf_config_extra or {})), f, indent=2, sort_keys=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, t in tensors.items():
    if shards[-1] and size + t.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = t
    size += t.nbytes
  # transformers refuses safetensors without format=pt metadata.
  meta = {"format": "pt"}
  for stale in os.listdir(path):
    if stale.endswith(".safetensors") or stale == "model.safetensors.index.json":
      os.remove(os.path.join(path, stale))
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, "model.safetensors"), metadata=meta)
    return
  weight_map = {}
  for k, shard in enumerate(shards):
    fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(path, fname), metadata=meta)
    weight_map.update({name: fname for name in shard})
  total = sum(t.nbytes for t in tensors.values())
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# ----------------------------------------------------------------------------- PEFT adapters

_PEFT_KEY = "base_model.model.model.layers.{i}.{module}.lora_{ab}.weight"


def _peft_saved_key(name: str, layer: int | None = None) -> str:
  """PEFT's key of a `modules_to_save` weight (saved without its `modules_to_save.default` part)."""
  module, per_layer = lora_lib.SAVABLE[name]
  if per_layer:
    return f"base_model.model.model.layers.{layer}.{module}.weight"
  return f"base_model.model.{module}.weight"


def peft_tensors(model: Decoder) -> dict[str, np.ndarray]:
  """The adapters under PEFT's key names: lora_A.weight [r, in], lora_B.weight [out, r] per layer.

  Our A [L, *in, r] / B [L, r, *out] flatten their in / out axes in HF's order (see `_LAYER`:
  heads outer, head_dim inner), so they line up with the HF weight they adapt. Trained copies of
  `modules_to_save` norms go under PEFT's keys for them (e.g. base_model.model.model.norm.weight).
  """
  if not lora_lib.has_lora(model):
    raise ValueError("model: has no LoRA adapters to export")
  out = {}
  for name, ab in model.lora.arrays().items():
    module = lora_lib.TARGETS[name][0]
    a, b = np.asarray(jax.device_get(ab["a"])), np.asarray(jax.device_get(ab["b"]))
    num_layers, r = a.shape[0], a.shape[-1]
    for i in range(num_layers):
      out[_PEFT_KEY.format(i=i, module=module, ab="A")] = np.ascontiguousarray(
          a[i].reshape(-1, r).T)
      out[_PEFT_KEY.format(i=i, module=module, ab="B")] = np.ascontiguousarray(
          b[i].reshape(r, -1).T)
  for name, value in model.lora.saved_arrays().items():
    value = np.asarray(jax.device_get(value), np.float32)
    if lora_lib.SAVABLE[name][1]:
      for i in range(value.shape[0]):
        out[_peft_saved_key(name, i)] = np.ascontiguousarray(value[i])
    else:
      out[_peft_saved_key(name)] = value
  return out


def save_peft_adapters(model: Decoder, path: str | os.PathLike, *,
                       base_model_name_or_path: str | None = None) -> None:
  """Writes `adapter_config.json` + `adapter_model.safetensors` in PEFT's LoRA format.

  `peft.PeftModel.from_pretrained(base_hf_model, path)` loads it onto the base model; the
  adapters stay in float32. Only process 0 writes.

  Args:
    model: a Decoder with adapters.
    path: output folder (created).
    base_model_name_or_path: recorded in the config as the pointer to the base weights.
  """
  from safetensors.numpy import save_file

  path = os.fspath(path)
  tensors = peft_tensors(model)
  if jax.process_index() != 0:
    return
  lora = model.lora_config
  config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "r": lora.rank,
      "lora_alpha": lora.alpha,
      "lora_dropout": lora.dropout,
      "use_rslora": lora.use_rslora,
      # Bare module names: PEFT matches a name against the end of each module's path.
      "target_modules": [name for name in lora.targets],
      "bias": "none",
      "fan_in_fan_out": False,
      "inference_mode": True,
      "init_lora_weights": True,
      # Full module paths: PEFT matches `key == name or key.endswith("." + name)`.
      "modules_to_save": [lora_lib.SAVABLE[n][0] for n in lora.saved] or None,
      "layers_to_transform": None,
      "use_dora": False,
  }
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})


def load_peft_adapters(model: Decoder, path: str | os.PathLike, *, mesh: Mesh | None = None,
                       rules: Mapping[str, Any] = sharding_lib.TRAIN_RULES) -> Decoder:
  """Attaches the LoRA adapters of a PEFT folder to a Decoder without adapters; returns it.

  Supports what `save_peft_adapters` writes and what PEFT writes for plain LoRA on the seven
  projections of every layer (no DoRA, no per-layer ranks, no bias training, no
  layers_to_transform), with `modules_to_save` limited to the norms of `lora.SAVABLE`. The
  adapted projections are read from the tensors present.
  """
  from safetensors.numpy import load_file

  path = os.fspath(path)
  cfg_file = os.path.join(path, "adapter_config.json")
  if not os.path.exists(cfg_file):
    raise FileNotFoundError(f"{cfg_file}: not found (load_peft_adapters needs a PEFT folder)")
  with open(cfg_file) as f:
    cfg = json.load(f)
  if cfg.get("peft_type") != "LORA":
    raise ValueError(f"{cfg_file}: peft_type must be 'LORA', got {cfg.get('peft_type')!r}")
  unsupported = {
      "use_dora": bool(cfg.get("use_dora")),
      "bias": cfg.get("bias", "none") != "none",
      "layers_to_transform": cfg.get("layers_to_transform") is not None,
      "rank_pattern": bool(cfg.get("rank_pattern")),
      "alpha_pattern": bool(cfg.get("alpha_pattern")),
      "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
  }
  for key, bad in unsupported.items():
    if bad:
      raise ValueError(f"{cfg_file}: {key}={cfg[key]!r} is not supported")
  weights = os.path.join(path, "adapter_model.safetensors")
  if not os.path.exists(weights):
    raise FileNotFoundError(f"{weights}: not found")
  tensors = load_file(weights)
  targets = tuple(n for n, (module, _) in lora_lib.TARGETS.items()
                  if _PEFT_KEY.format(i=0, module=module, ab="A") in tensors)
  if not targets:
    example = _PEFT_KEY.format(i=0, module="self_attn.q_proj", ab="A")
    raise ValueError(f"{weights}: no LoRA tensors named like {example!r}")
  saved = []
  for module in cfg.get("modules_to_save") or ():
    names = [n for n, (hf_name, _) in lora_lib.SAVABLE.items()
             if hf_name == module or hf_name.endswith("." + module) or n == module]
    if not names:
      raise ValueError(f"{cfg_file}: modules_to_save {module!r} is not supported (supported: "
                       f"{', '.join(hf for hf, _ in lora_lib.SAVABLE.values())})")
    saved.extend(names)
  lora = lora_lib.LoraConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                             dropout=float(cfg.get("lora_dropout") or 0.0),
                             target_modules=targets, use_rslora=bool(cfg.get("use_rslora", False)),
                             modules_to_save=tuple(dict.fromkeys(saved)))
  lora_lib.add_lora(model, lora, mesh=mesh, rules=rules)
  num_layers, r = model.config.num_layers, lora.rank
  for name in targets:
    module = lora_lib.TARGETS[name][0]
    pair = getattr(model.lora, name)
    for ab, var in (("A", pair.a), ("B", pair.b)):
      per_layer = tuple(var.get_value().shape[1:])
      stacked = []
      for i in range(num_layers):
        key = _PEFT_KEY.format(i=i, module=module, ab=ab)
        if key not in tensors:
          raise KeyError(f"{weights}: tensor {key!r} is missing")
        t = np.asarray(tensors[key], np.float32)
        # PEFT: A [r, in], B [out, r]; ours per layer: A [*in, r], B [r, *out].
        expected = (r, math.prod(per_layer[:-1])) if ab == "A" else (math.prod(per_layer[1:]), r)
        if t.shape != expected:
          raise ValueError(f"{weights}: tensor {key!r} has shape {t.shape}, expected {expected}")
        stacked.append(t.T.reshape(per_layer))
      value = jnp.asarray(np.stack(stacked))
      old = var.get_value()
      if isinstance(getattr(old, "sharding", None), jax.sharding.NamedSharding):
        value = jax.device_put(value, old.sharding)
      var[...] = value
  for name in lora.saved:
    var = getattr(model.lora, name)
    shape = tuple(var.get_value().shape)
    if lora_lib.SAVABLE[name][1]:
      keys = [_peft_saved_key(name, i) for i in range(num_layers)]
    else:
      keys = [_peft_saved_key(name)]
    for key in keys:
      if key not in tensors:
        raise KeyError(f"{weights}: tensor {key!r} (modules_to_save) is missing")
    parts = [np.asarray(tensors[k], np.float32) for k in keys]
    value = np.stack(parts) if lora_lib.SAVABLE[name][1] else parts[0]
    if value.shape != shape:
      raise ValueError(f"{weights}: {keys[0]!r} and the rest give shape {value.shape}, "
                       f"expected {shape}")
    value = jnp.asarray(value)
    old = var.get_value()
    if isinstance(getattr(old, "sharding", None), jax.sharding.NamedSharding):
      value = jax.device_put(value, old.sharding)
    var[...] = value
  return model
