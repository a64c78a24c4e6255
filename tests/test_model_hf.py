"""The decoder against transformers' PyTorch models, and HF checkpoint round trips."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from grpo_jax import sharding  # noqa: E402
from grpo_jax.models import from_pretrained, hf_tensors, save_pretrained  # noqa: E402
from grpo_jax.testing.models import TINY_CONFIGS, tiny_config, tiny_hf_model  # noqa: E402


def _batch():
  """A left-padded batch: rows with 5, 17 and 0 pads, long enough to reach all llama3 bands."""
  ids = np.random.RandomState(0).randint(0, 96, (3, 40))
  mask = np.ones((3, 40), np.int64)
  mask[0, :5] = 0
  mask[1, :17] = 0
  return ids, mask


def _torch_logits(hf_model, ids, mask):
  # HF does not derive positions from the mask; pass them (cumsum - 1) as our default does.
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    out = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   position_ids=torch.tensor(pos))
  return out.logits.float().numpy()


def _max_diff(a, b, mask):
  return float(np.abs((np.asarray(a) - np.asarray(b))[mask.astype(bool)]).max())


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """name -> (folder written by transformers, torch model)."""
  out = {}
  for name in TINY_CONFIGS:
    model = tiny_hf_model(tiny_config(name), seed=len(name))
    folder = tmp_path_factory.mktemp(name)
    # One family saved sharded, to exercise model.safetensors.index.json.
    model.save_pretrained(folder, max_shard_size="40KB" if name == "qwen3" else "1GB")
    out[name] = (str(folder), model)
  assert os.path.exists(os.path.join(out["qwen3"][0], "model.safetensors.index.json"))
  return out


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_match_transformers(hf_dirs, name):
  folder, hf_model = hf_dirs[name]
  ids, mask = _batch()
  model = from_pretrained(folder)
  assert model.config == tiny_config(name)
  logits = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  assert logits.shape == (3, 40, 96) and logits.dtype == jnp.float32
  assert _max_diff(logits, _torch_logits(hf_model, ids, mask), mask) <= 1e-4


def test_save_then_transformers_loads_same_logits(hf_dirs, tmp_path):
  ids, mask = _batch()
  for name in ("qwen2", "qwen3", "llama3"):
    model = from_pretrained(hf_dirs[name][0])
    out = tmp_path / name
    save_pretrained(model, out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(reloaded).__name__ == type(hf_dirs[name][1]).__name__
    ours = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert _max_diff(ours, _torch_logits(reloaded, ids, mask), mask) <= 1e-4


def test_load_save_load_is_exact(hf_dirs, tmp_path):
  folder, hf_model = hf_dirs["qwen2"]
  first = from_pretrained(folder)
  save_pretrained(first, tmp_path / "a", max_shard_bytes=30_000)  # forces several shards
  assert os.path.exists(tmp_path / "a" / "model.safetensors.index.json")
  second = from_pretrained(tmp_path / "a")
  for a, b in zip(jax.tree.leaves(first.arrays()), jax.tree.leaves(second.arrays())):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Byte-exact against the tensors transformers wrote in the first place.
  theirs = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  ours = hf_tensors(second)
  assert set(ours) == set(theirs)
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)


def test_bfloat16_round_trip_is_exact(hf_dirs, tmp_path):
  model = from_pretrained(hf_dirs["llama3"][0], dtype="bfloat16")
  assert model.layers.q_proj[...].dtype == jnp.bfloat16
  save_pretrained(model, tmp_path / "bf16")
  again = from_pretrained(tmp_path / "bf16", dtype="bfloat16")
  for a, b in zip(jax.tree.leaves(model.arrays()), jax.tree.leaves(again.arrays())):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
  assert hf.model.embed_tokens.weight.dtype == torch.bfloat16


def test_load_onto_mesh_places_shards_and_matches(hf_dirs):
  folder, hf_model = hf_dirs["qwen2"]
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
  model = from_pretrained(folder, mesh=mesh)
  q = model.layers.q_proj[...]  # [L, E=32, H=4, D=8] -> (None, fsdp, tensor, None)
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (2, 8, 2, 8)
  ids, mask = _batch()
  logits = jax.jit(lambda m, i, k: m(i, attention_mask=k))(model, jnp.asarray(ids),
                                                           jnp.asarray(mask))
  assert _max_diff(logits, _torch_logits(hf_model, ids, mask), mask) <= 1e-4


def test_folder_with_tokenizer_files_loads(hf_dirs, tmp_path):
  folder, _ = hf_dirs["llama_tied"]
  for f in os.listdir(folder):
    (tmp_path / f).write_bytes(open(os.path.join(folder, f), "rb").read())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
  (tmp_path / "tokenizer.json").write_text("{}")
  (tmp_path / "generation_config.json").write_text("{}")
  assert from_pretrained(tmp_path).config.tie_word_embeddings


def _copy_with(tmp_path, folder, *, config_edit=None, tensors_edit=None):
  cfg = json.load(open(os.path.join(folder, "config.json")))
  if config_edit:
    config_edit(cfg)
  tmp_path.mkdir(exist_ok=True)
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  tensors = load_file(os.path.join(folder, "model.safetensors"))
  if tensors_edit:
    tensors_edit(tensors)
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  return tmp_path


def test_errors_name_the_file_and_tensor(hf_dirs, tmp_path):
  folder, _ = hf_dirs["qwen2"]
  bad = _copy_with(tmp_path / "t", folder, config_edit=lambda c: c.update(model_type="gemma2"))
  with pytest.raises(ValueError, match=r"config\.json: unsupported model_type 'gemma2'"):
    from_pretrained(bad)

  name = "model.layers.1.self_attn.k_proj.bias"
  bad = _copy_with(tmp_path / "m", folder, tensors_edit=lambda t: t.pop(name))
  with pytest.raises(KeyError, match=rf"model\.safetensors.*{name}|{name}.*model\.safetensors"):
    from_pretrained(bad)

  name = "model.layers.0.mlp.up_proj.weight"
  bad = _copy_with(tmp_path / "s", folder,
                   tensors_edit=lambda t: t.update({name: t[name][:, :-1].copy()}))
  with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{name}' has shape \(64, 31\)"):
    from_pretrained(bad)

  name = "model.norm.weight"
  bad = _copy_with(tmp_path / "i", folder,
                   tensors_edit=lambda t: t.update({name: t[name].astype(np.int8)}))
  with pytest.raises(ValueError, match=rf"tensor '{name}' has dtype I8"):
    from_pretrained(bad)

  with pytest.raises(ValueError, match="dtype: expected float32 or bfloat16"):
    from_pretrained(folder, dtype="float16")
  with pytest.raises(FileNotFoundError, match="config.json"):
    from_pretrained(tmp_path / "nowhere")
