"""LoRA adapters: exact base at B = 0, forward and merge vs NumPy, gradients reach only adapters,
cached = uncached, sharded = unsharded, and HF / PEFT export and import against PyTorch peft."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from grpo_jax import sharding
from grpo_jax.models import (Decoder, LoraConfig, LoraParam, add_lora, has_lora, hf_tensors,
                             init_cache, init_sharded, merge_lora, shard_model,
                             trainable, without_lora)
from grpo_jax.models.lora import TARGETS
from grpo_jax.testing.models import decode_token_by_token, tiny_config

LORA = LoraConfig(rank=4, alpha=8.0, target_modules=("all-linear",))


def _batch(B=3, T=12, V=96, seed=0):
  ids = np.random.RandomState(seed).randint(0, V, (B, T))
  mask = np.ones((B, T), np.int32)
  mask[0, :4] = 0
  mask[1, :1] = 0
  return jnp.asarray(ids), jnp.asarray(mask)


def _randomize(model, seed=0, scale=0.2):
  """Gives every adapter factor random values (B != 0), as after some training."""
  rs = np.random.RandomState(seed)
  for _, v in nnx.iter_graph(model):
    if isinstance(v, LoraParam):
      v[...] = jnp.asarray(scale * rs.randn(*v.get_value().shape), jnp.float32)
  return model


def _np_merged(model):
  """NumPy reference of W + (alpha / r) A B for every adapted projection: {name: [L, ...]}."""
  s = model.lora_config.alpha / model.lora_config.rank
  out = {}
  for name, pair in vars(model.lora).items():
    if not isinstance(pair, nnx.Module):
      continue
    a = np.asarray(pair.a[...], np.float64)
    b = np.asarray(pair.b[...], np.float64)
    w = np.asarray(getattr(model.layers, name)[...], np.float64)
    L, r = a.shape[0], a.shape[-1]
    n_in = TARGETS[name][1]
    ab = np.stack([a[i].reshape(-1, r) @ b[i].reshape(r, -1) for i in range(L)])
    out[name] = w + s * ab.reshape(w.shape)
    assert w.shape[1:1 + n_in] == a.shape[1:-1]
  return out


@functools.partial(jax.jit, static_argnames="use_lora")
def _logits(model, ids, mask, rng=None, use_lora=True):
  """The forward, jitted: one compile per model structure instead of eager op-by-op dispatch."""
  return model(ids, attention_mask=mask, use_lora=use_lora, lora_dropout_rng=rng)


@pytest.fixture(scope="module")
def pair():
  """(plain model, the same base with random adapters) for the qwen2 tiny shape."""
  cfg = tiny_config("qwen2")
  plain = Decoder(cfg, rngs=nnx.Rngs(1))
  adapted = _randomize(Decoder(cfg, rngs=nnx.Rngs(1), lora=LORA), seed=3)
  return plain, adapted


# ----------------------------------------------------------------------------- config


def test_config_targets_and_validation():
  assert LoraConfig(rank=8, target_modules=("q_proj", "v_proj")).targets == ("q_proj", "v_proj")
  assert LoraConfig(rank=8, target_modules="k_proj").target_modules == ("k_proj",)
  assert LoraConfig(rank=8, target_modules=(".*_proj",)).targets == tuple(TARGETS)
  assert LoraConfig(rank=8, target_modules=(r"self_attn\..*",)).targets == (
      "q_proj", "k_proj", "v_proj", "o_proj")
  assert LoraConfig(rank=8, target_modules=["mlp.up_proj", "(gate|down)_proj"]).targets == (
      "gate_proj", "up_proj", "down_proj")
  assert LoraConfig(rank=16, alpha=32).scale == 2.0
  assert LoraConfig(rank=16, alpha=32, use_rslora=True).scale == 8.0
  assert not LoraConfig().enabled and not LoraConfig(rank=0).enabled
  assert LoraConfig(rank=4).saved == ()
  assert LoraConfig(rank=4, modules_to_save="final_norm").modules_to_save == ("final_norm",)
  assert LoraConfig(rank=4, modules_to_save=["model.norm", "post_attention_layernorm"]).saved == (
      "final_norm", "mlp_norm")
  assert LoraConfig(rank=4, modules_to_save=(".*norm",)).saved == (
      "final_norm", "attn_norm", "mlp_norm", "q_norm", "k_norm")
  hash(LORA)  # a static attribute of the model graph
  for kwargs, msg in [
      (dict(rank=-1), "LoraConfig.rank: expected an int >= 0"),
      (dict(rank=2.0), "LoraConfig.rank"),
      (dict(rank=4, alpha=0), "LoraConfig.alpha: expected a number > 0"),
      (dict(rank=4, dropout=1.0), r"LoraConfig.dropout: expected a probability in \[0, 1\)"),
      (dict(rank=4, target_modules=("qproj",)), "'qproj' matches no projection"),
      (dict(rank=4, target_modules=("q_proj(",)), "not a valid regex"),
      (dict(rank=4, target_modules=()), "LoraConfig.target_modules: expected a non-empty"),
      (dict(rank=4, init="zeros"), "LoraConfig.init"),
      (dict(rank=4, modules_to_save=("embed",)), "'embed' matches no trainable module"),
      (dict(rank=4, modules_to_save=("lm_head",)), "embeddings and the LM head are not supported"),
      (dict(rank=4, modules_to_save=(3,)), "LoraConfig.modules_to_save: expected a tuple"),
  ]:
    with pytest.raises(ValueError, match=msg):
      LoraConfig(**kwargs)
  with pytest.raises(TypeError, match="lora: expected a LoraConfig"):
    Decoder(tiny_config("qwen2"), rngs=nnx.Rngs(0), lora={"rank": 4})


def test_rank_zero_is_full_fine_tuning():
  cfg = tiny_config("qwen3")
  model = Decoder(cfg, rngs=nnx.Rngs(0), lora=LoraConfig(rank=0))
  assert not has_lora(model) and trainable(model) is nnx.Param
  assert not jax.tree.leaves(nnx.state(model, LoraParam))
  plain_state = nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)))
  assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(plain_state)


def test_init_and_only_targets_adapted():
  cfg = tiny_config("qwen3")
  model = Decoder(cfg, rngs=nnx.Rngs(0), lora=LoraConfig(rank=3, target_modules=("q_proj",
                                                                                  "down_proj")))
  assert trainable(model) is LoraParam
  assert sorted(nnx.to_pure_dict(nnx.state(model, LoraParam))["lora"]) == ["down_proj", "q_proj"]
  a, b = model.lora.q_proj.a[...], model.lora.q_proj.b[...]
  assert a.shape == (2, 32, 3) and b.shape == (2, 3, 4, 16) and a.dtype == jnp.float32
  assert not np.any(np.asarray(b))
  bound = 1 / np.sqrt(32)  # PEFT's kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  assert np.abs(np.asarray(a)).max() <= bound and np.abs(np.asarray(a)).max() > 0.8 * bound
  assert np.abs(np.asarray(model.lora.down_proj.a[...])).max() <= 1 / np.sqrt(64)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_zero_b_gives_exactly_the_base_logits(name):
  cfg = tiny_config(name)
  ids, mask = _batch()
  plain = Decoder(cfg, rngs=nnx.Rngs(7))
  adapted = Decoder(cfg, rngs=nnx.Rngs(7), lora=LoraConfig(rank=4, alpha=16, dropout=0.1))
  base = np.asarray(_logits(plain, ids, mask))
  np.testing.assert_array_equal(np.asarray(_logits(adapted, ids, mask)), base)
  # Dropout acts on the adapter branch only: at B = 0 it changes nothing either.
  np.testing.assert_array_equal(np.asarray(_logits(adapted, ids, mask, jax.random.key(0))), base)


def test_adapters_off_is_the_base_without_a_copy(pair):
  plain, adapted = pair
  ids, mask = _batch()
  base = np.asarray(_logits(plain, ids, mask))
  assert np.abs(np.asarray(_logits(adapted, ids, mask)) - base).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(_logits(adapted, ids, mask, use_lora=False)), base)
  ref = without_lora(adapted)
  assert not has_lora(ref) and has_lora(adapted)
  np.testing.assert_array_equal(np.asarray(_logits(ref, ids, mask)), base)
  # The reference policy reads the very same buffers.
  assert ref.layers.q_proj[...] is adapted.layers.q_proj[...]
  assert ref.embed[...] is adapted.embed[...]


def test_forward_and_merge_match_numpy_merged_weights(pair):
  plain, adapted = pair
  ids, mask = _batch()
  reference = Decoder(plain.config, rngs=nnx.Rngs(1))
  for name, w in _np_merged(adapted).items():
    getattr(reference.layers, name)[...] = jnp.asarray(w, jnp.float32)
  want = np.asarray(_logits(reference, ids, mask))
  valid = np.asarray(mask, bool)
  got = np.asarray(_logits(adapted, ids, mask))
  np.testing.assert_allclose(got[valid], want[valid], atol=1e-5)
  merged = merge_lora(adapted)
  assert not has_lora(merged) and has_lora(adapted)  # the input model is left as it was
  for name in TARGETS:
    np.testing.assert_allclose(np.asarray(getattr(merged.layers, name)[...]),
                               np.asarray(getattr(reference.layers, name)[...]), atol=1e-6)
  assert merged.embed[...] is adapted.embed[...]  # untargeted weights are shared, not copied
  np.testing.assert_allclose(np.asarray(_logits(merged, ids, mask))[valid], want[valid],
                             atol=1e-5)


def test_dropout_needs_a_key_and_is_deterministic_per_key(pair):
  _, adapted = pair
  ids, mask = _batch()
  graphdef, state = nnx.split(adapted)
  dropping = nnx.merge(graphdef, state)
  dropping.lora_config = adapted.lora_config.replace(dropout=0.5)
  no_key = np.asarray(_logits(dropping, ids, mask))
  np.testing.assert_array_equal(no_key, np.asarray(_logits(adapted, ids, mask)))
  k1 = np.asarray(_logits(dropping, ids, mask, jax.random.key(1)))
  k1_again = np.asarray(_logits(dropping, ids, mask, jax.random.key(1)))
  k2 = np.asarray(_logits(dropping, ids, mask, jax.random.key(2)))
  np.testing.assert_array_equal(k1, k1_again)
  assert np.abs(k1 - no_key).max() > 1e-3 and np.abs(k1 - k2).max() > 1e-3
  # dropout = 0 ignores the key.
  np.testing.assert_array_equal(np.asarray(_logits(adapted, ids, mask, jax.random.key(1))), no_key)


SAVING = LoraConfig(rank=4, alpha=8.0, modules_to_save=("final_norm", "attn_norm", "q_norm"))


def test_modules_to_save_are_trained_copies_and_the_reference_keeps_the_originals():
  """A copy of each saved norm starts equal to the base (so logits are exactly the base's), is
  what the adapted forward uses, receives the gradient; the base with adapters off (the reference
  policy) and the frozen state keep the originals."""
  cfg = tiny_config("qwen3")
  ids, mask = _batch()
  plain = Decoder(cfg, rngs=nnx.Rngs(7))
  model = Decoder(cfg, rngs=nnx.Rngs(7), lora=SAVING)
  base = np.asarray(_logits(plain, ids, mask))
  np.testing.assert_array_equal(np.asarray(_logits(model, ids, mask)), base)
  assert sorted(model.lora.saved_arrays()) == ["attn_norm", "final_norm", "q_norm"]
  np.testing.assert_array_equal(np.asarray(model.lora.attn_norm[...]),
                                np.asarray(model.layers.attn_norm[...]))
  graphdef, trained, frozen = nnx.split(model, trainable(model), ...)
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      nnx.to_pure_dict(trained))[0]]
  assert "['lora']['final_norm']" in names and "['lora']['q_norm']" in names
  assert not any("mlp_norm" in n or "k_norm" in n for n in names)

  def loss(trained):
    logits = nnx.merge(graphdef, trained, frozen)(ids, attention_mask=mask)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 5] * mask)

  grads = nnx.to_pure_dict(jax.jit(jax.grad(loss))(trained))["lora"]
  assert np.abs(np.asarray(grads["final_norm"])).max() > 1e-4
  assert np.abs(np.asarray(grads["attn_norm"])).max() > 1e-4
  # Training moves the copies only: the forward follows them, the reference does not.
  model.lora.final_norm[...] = model.lora.final_norm[...] * 3.0
  model.lora.attn_norm[...] = model.lora.attn_norm[...] + 0.5
  moved = np.asarray(_logits(model, ids, mask))
  assert np.abs(moved - base).max() > 1e-2
  np.testing.assert_array_equal(np.asarray(_logits(model, ids, mask, use_lora=False)), base)
  np.testing.assert_array_equal(np.asarray(_logits(without_lora(model), ids, mask)), base)
  # merge_lora writes the copies into the plain model it returns.
  merged = merge_lora(model)
  np.testing.assert_array_equal(np.asarray(merged.final_norm[...]),
                                np.asarray(model.lora.final_norm[...]))
  np.testing.assert_allclose(np.asarray(_logits(merged, ids, mask)), moved, atol=1e-5)
  # Checking a model without per-head q/k norms: the error names the module.
  with pytest.raises(ValueError, match="lora.modules_to_save: this model has no 'q_norm'"):
    Decoder(tiny_config("qwen2"), rngs=nnx.Rngs(0), lora=SAVING)


def test_modules_to_save_born_sharded_like_their_base():
  cfg = tiny_config("qwen3")
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  born = init_sharded(cfg, mesh, seed=2, lora=SAVING)
  for name, owner in (("final_norm", born), ("attn_norm", born.layers), ("q_norm", born.layers)):
    assert getattr(born.lora, name)[...].sharding == getattr(owner, name)[...].sharding, name
  plain = shard_model(Decoder(cfg, rngs=nnx.Rngs(2)), mesh)
  added = add_lora(plain, SAVING, seed=4, mesh=mesh)
  np.testing.assert_array_equal(np.asarray(added.lora.q_norm[...]),
                                np.asarray(added.layers.q_norm[...]))


_decode_all = decode_token_by_token


def test_cached_decode_with_adapters_equals_full_forward(pair):
  _, adapted = pair
  ids, mask = _batch()
  full = np.asarray(_logits(adapted, ids, mask))
  cached = np.asarray(_decode_all(adapted, ids, mask, 6))
  valid = np.asarray(mask, bool)
  np.testing.assert_allclose(cached[valid], full[valid], atol=1e-5)


# ----------------------------------------------------------------------------- gradients


def test_gradient_reaches_only_adapters_and_matches_chain_rule(pair):
  """dL/dA = s dL/dW' B^T and dL/dB = s A^T dL/dW' with W' = W + s A B (the merged weight)."""
  _, adapted = pair
  ids, mask = _batch()
  graphdef, lora_state, base_state = nnx.split(adapted, LoraParam, ...)

  def loss(lora_state):
    logits = nnx.merge(graphdef, lora_state, base_state)(ids, attention_mask=mask)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 5] * mask)

  grads = jax.jit(jax.grad(loss))(lora_state)
  assert jax.tree.structure(grads) == jax.tree.structure(lora_state)
  assert all(isinstance(v, LoraParam) for v in jax.tree.leaves(
      grads, is_leaf=lambda x: isinstance(x, nnx.Variable)))
  # The optimizer state covers the adapters alone.
  opt_state = optax.adamw(1e-3).init(lora_state)
  n_lora = sum(x.size for x in jax.tree.leaves(lora_state))
  assert sum(x.size for x in jax.tree.leaves(opt_state)) == 2 * n_lora + 1  # mu, nu, count

  merged = merge_lora(adapted)
  mg, mparams, mrest = nnx.split(merged, nnx.Param, ...)

  def merged_loss(mparams):
    logits = nnx.merge(mg, mparams, mrest)(ids, attention_mask=mask)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 5] * mask)

  g_w = nnx.to_pure_dict(jax.jit(jax.grad(merged_loss))(mparams))["layers"]
  s = adapted.lora_config.scale
  g = nnx.to_pure_dict(grads)["lora"]
  for name in TARGETS:
    a = np.asarray(getattr(adapted.lora, name).a[...], np.float64)
    b = np.asarray(getattr(adapted.lora, name).b[...], np.float64)
    gw = np.asarray(g_w[name], np.float64)
    L, r = a.shape[0], a.shape[-1]
    gw2 = gw.reshape(L, a[0].size // r, -1)
    want_a = s * np.einsum("lio,lro->lir", gw2, b.reshape(L, r, -1)).reshape(a.shape)
    want_b = s * np.einsum("lir,lio->lro", a.reshape(L, -1, r), gw2).reshape(b.shape)
    np.testing.assert_allclose(np.asarray(g[name]["a"]), want_a, atol=2e-5, err_msg=name)
    np.testing.assert_allclose(np.asarray(g[name]["b"]), want_b, atol=2e-5, err_msg=name)
    assert np.abs(want_b).max() > 1e-4


# ----------------------------------------------------------------------------- sharding


def _assert_consistent(model):
  """A shares W's input-axis sharding, B its output-axis sharding; the rank axis is replicated."""
  for name, (_, n_in) in TARGETS.items():
    w_spec = tuple(getattr(model.layers, name)[...].sharding.spec)
    w_spec = w_spec + (None,) * (getattr(model.layers, name)[...].ndim - len(w_spec))
    pair_ = getattr(model.lora, name)
    a_spec, b_spec = tuple(pair_.a[...].sharding.spec), tuple(pair_.b[...].sharding.spec)
    a_spec = a_spec + (None,) * (pair_.a[...].ndim - len(a_spec))
    b_spec = b_spec + (None,) * (pair_.b[...].ndim - len(b_spec))
    assert a_spec == w_spec[:1 + n_in] + (None,), (name, a_spec, w_spec)
    assert b_spec == (w_spec[0], None) + w_spec[1 + n_in:], (name, b_spec, w_spec)


def test_sharded_8_devices_consistent_and_equal(pair):
  _, adapted = pair
  ids, mask = _batch(B=4)
  ref = np.asarray(_logits(adapted, ids, mask))
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
  sharded = shard_model(adapted, mesh)
  _assert_consistent(sharded)
  P = jax.sharding.PartitionSpec
  assert sharded.lora.q_proj.a[...].sharding.spec == P(None, "fsdp", None)
  assert sharded.lora.q_proj.b[...].sharding.spec == P(None, None, "tensor", None)
  assert sharded.lora.down_proj.a[...].sharding.spec == P(None, "tensor", None)
  graphdef, lora_state, base_state = nnx.split(sharded, LoraParam, ...)

  @jax.jit
  def fwd(lora_state, base_state, ids, mask):
    return nnx.merge(graphdef, lora_state, base_state)(ids, attention_mask=mask)

  out = fwd(lora_state, base_state, *sharding.shard_batch((ids, mask), mesh))
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_adapters_born_sharded(pair):
  plain, _ = pair
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  born = init_sharded(plain.config, mesh, seed=2, lora=LORA)
  _assert_consistent(born)
  base = shard_model(plain, mesh)
  added = add_lora(without_lora(base), LORA, seed=4, mesh=mesh)
  _assert_consistent(added)
  # The same draws as an unsharded add_lora.
  local = add_lora(without_lora(plain), LORA, seed=4)
  for a, b in zip(jax.tree.leaves(nnx.state(added, LoraParam)),
                  jax.tree.leaves(nnx.state(local, LoraParam))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="already has LoRA adapters"):
    add_lora(added, LORA)


# ----------------------------------------------------------------------------- HF / PEFT

try:
  import peft
  import torch
  import transformers
except ImportError:  # The JAX-side tests above still run.
  peft = torch = transformers = None

needs_torch = pytest.mark.skipif(peft is None, reason="needs torch, transformers and peft")

from grpo_jax.models import (from_pretrained, load_peft_adapters, save_peft_adapters,  # noqa: E402
                             save_pretrained)
from grpo_jax.models.hf import read_hf_config  # noqa: E402
from grpo_jax.testing.models import tiny_hf_model  # noqa: E402


def _torch_logits(hf_model, ids, mask):
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    out = hf_model(input_ids=torch.tensor(np.asarray(ids)), attention_mask=torch.tensor(
        np.asarray(mask)), position_ids=torch.tensor(pos))
  return out.logits.float().numpy()


def _max_diff(a, b, mask):
  return float(np.abs((np.asarray(a) - np.asarray(b))[np.asarray(mask, bool)]).max())


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def hf_base(request, tmp_path_factory):
  """(folder of an HF tiny model, a fresh-loader for its torch model)."""
  cfg = tiny_config(request.param)
  folder = tmp_path_factory.mktemp(request.param)
  tiny_hf_model(cfg, seed=11).save_pretrained(folder)
  load = lambda: transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  return str(folder), load


@needs_torch
def test_merged_hf_export_equals_transformers(hf_base, tmp_path):
  folder, _ = hf_base
  model = _randomize(from_pretrained(folder, lora=LoraConfig(rank=4, alpha=6.0)), seed=5)
  ids, mask = _batch(T=20)
  ours = _logits(model, ids, mask)
  with pytest.raises(ValueError, match="has LoRA adapters"):
    hf_tensors(model)
  save_pretrained(merge_lora(model), tmp_path / "merged")
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
  assert _max_diff(ours, _torch_logits(hf, ids, mask), mask) <= 1e-4


@needs_torch
def test_peft_export_loads_in_peft_and_matches(hf_base, tmp_path):
  folder, load = hf_base
  qk = read_hf_config(folder)["model_type"] == "qwen3"
  lora = LoraConfig(rank=4, alpha=12.0, target_modules=("q_proj", "v_proj", "o_proj", "down_proj"),
                    modules_to_save=("final_norm", "mlp_norm") + (("k_norm",) if qk else ()))
  model = _randomize(from_pretrained(folder, lora=lora), seed=6)
  ids, mask = _batch(T=20)
  ours = _logits(model, ids, mask)
  save_peft_adapters(model, tmp_path / "peft", base_model_name_or_path=folder)
  cfg = json.load(open(tmp_path / "peft" / "adapter_config.json"))
  assert cfg["base_model_name_or_path"] == folder and cfg["r"] == 4
  assert cfg["modules_to_save"] == ["model.norm", "post_attention_layernorm"] + (
      ["self_attn.k_norm"] if qk else [])
  peft_model = peft.PeftModel.from_pretrained(load(), tmp_path / "peft")
  peft_model.eval()
  # Every adapter tensor was consumed: PEFT would keep its own random A / zero B otherwise.
  n_lora = sum(1 for k in peft_model.state_dict() if "lora_" in k)
  assert n_lora == 2 * 4 * model.config.num_layers
  saved_sd = {k: v.numpy() for k, v in peft_model.state_dict().items()
              if "modules_to_save.default" in k}
  assert len(saved_sd) == 1 + model.config.num_layers * (2 if qk else 1)
  np.testing.assert_array_equal(
      saved_sd["base_model.model.model.norm.modules_to_save.default.weight"],
      np.asarray(model.lora.final_norm[...]))
  assert _max_diff(ours, _torch_logits(peft_model, ids, mask), mask) <= 1e-4
  # PEFT's own merge equals ours, weight by weight.
  merged_sd = {k: v.numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}
  ours_merged = hf_tensors(merge_lora(model))
  for k, v in ours_merged.items():
    np.testing.assert_allclose(v, merged_sd[k], atol=1e-6, err_msg=k)
  # And back: load_peft_adapters gives the adapters we wrote, bit for bit.
  again = load_peft_adapters(from_pretrained(folder), tmp_path / "peft")
  assert again.lora_config.targets == lora.targets
  assert again.lora_config.saved == lora.saved
  for a, b in zip(jax.tree.leaves(nnx.state(again, LoraParam)),
                  jax.tree.leaves(nnx.state(model, LoraParam))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_torch
def test_adapters_written_by_peft_load_into_ours(hf_base, tmp_path):
  """The other direction: PEFT's own writer (random non-zero B), read by load_peft_adapters."""
  folder, load = hf_base
  torch.manual_seed(0)
  config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["k_proj", "gate_proj", "up_proj"],
                           init_lora_weights=False, task_type="CAUSAL_LM", use_rslora=True,
                           modules_to_save=["model.norm", "input_layernorm"])
  peft_model = peft.get_peft_model(load(), config)
  with torch.no_grad():  # trained copies differ from the base norms they shadow
    for name, p in peft_model.named_parameters():
      if "modules_to_save" in name:
        p.add_(0.3 * torch.randn_like(p))
  peft_model.eval()
  peft_model.save_pretrained(tmp_path / "theirs")
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=4))
  model = load_peft_adapters(from_pretrained(folder, mesh=mesh), tmp_path / "theirs", mesh=mesh)
  assert model.lora_config.targets == ("k_proj", "gate_proj", "up_proj")
  assert model.lora_config.use_rslora and model.lora_config.rank == 3
  assert model.lora_config.saved == ("final_norm", "attn_norm")
  _assert_consistent_subset(model)
  ids, mask = _batch(T=20)
  ours = jax.jit(lambda m, i, k: m(i, attention_mask=k))(model, ids, mask)
  assert _max_diff(ours, _torch_logits(peft_model, ids, mask), mask) <= 1e-4


def _assert_consistent_subset(model):
  for name in model.lora_config.targets:
    n_in = TARGETS[name][1]
    w = getattr(model.layers, name)[...]
    w_spec = tuple(w.sharding.spec) + (None,) * (w.ndim - len(w.sharding.spec))
    a = getattr(model.lora, name).a[...]
    assert tuple(a.sharding.spec) + (None,) * (a.ndim - len(a.sharding.spec)) == (
        w_spec[:1 + n_in] + (None,))


@needs_torch
def test_peft_folder_errors(hf_base, tmp_path):
  folder, _ = hf_base
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    load_peft_adapters(from_pretrained(folder), tmp_path)
  model = _randomize(from_pretrained(folder, lora=LORA))
  save_peft_adapters(model, tmp_path / "p")
  cfg_file = tmp_path / "p" / "adapter_config.json"
  cfg = json.load(open(cfg_file))
  json.dump({**cfg, "use_dora": True}, open(cfg_file, "w"))
  with pytest.raises(ValueError, match="use_dora=True is not supported"):
    load_peft_adapters(from_pretrained(folder), tmp_path / "p")
  json.dump({**cfg, "r": 5}, open(cfg_file, "w"))
  with pytest.raises(ValueError, match=r"lora_A.weight' has shape \(4, 32\), expected \(5, 32\)"):
    load_peft_adapters(from_pretrained(folder), tmp_path / "p")
  json.dump({**cfg, "modules_to_save": ["embed_tokens"]}, open(cfg_file, "w"))
  with pytest.raises(ValueError, match="modules_to_save 'embed_tokens' is not supported"):
    load_peft_adapters(from_pretrained(folder), tmp_path / "p")
  json.dump({**cfg, "modules_to_save": ["model.norm"]}, open(cfg_file, "w"))
  with pytest.raises(KeyError, match="model.norm.weight' \\(modules_to_save\\) is missing"):
    load_peft_adapters(from_pretrained(folder), tmp_path / "p")
  os.remove(tmp_path / "p" / "adapter_model.safetensors")
  with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
    load_peft_adapters(from_pretrained(folder), tmp_path / "p")
