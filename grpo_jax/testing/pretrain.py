"""A small "pretrained" policy for LoRA tests and benchmarks: the default tiny model, fitted on mixed labels.

LoRA adapts a model that already knows a lot; a random-init tiny model knows nothing, and with its
embedding and LM head frozen (std 0.02, tied) the adapters can barely move its logits. GRPO, for
its part, sharpens what a policy already samples now and then (pass@k into pass@1).
`pretrain_digits_base` gives LoRA tests a base like that: it fits the default config's tiny model
with cross-entropy on the `digits` prompts ("repeat the last digit: a b c") answered with one digit
then EOS, the digit drawn from a mix: e.g. {"first": 0.45, "last": 0.3} labels 45 % of rows with the
first digit (a wrong habit), 30 % with the last (the right answer) and the rest with a random digit.
That base knows the format, answers right about a third of the time greedily and three times in
four within four samples (BENCHMARKS.md, "LoRA learning"), the way a pretrained model does on a
new task; GRPO with adapters must turn that into the right habit.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from grpo_jax import models
from grpo_jax.testing import tokenizer as tiny_tok


def digits_base_config(vocab_size: int) -> models.ModelConfig:
  """The tiny model of `configs/default.py` (hidden 64, 2 layers, 4 heads, 2 KV heads, tied)."""
  return models.ModelConfig(
      vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=16, rope_theta=10000.0, tie_word_embeddings=True,
      max_position_embeddings=4096)


def _batch(rng: np.random.RandomState, tokenizer, batch_size: int, mix: dict[str, float]):
  """Left-padded [prompt, answer digit, EOS] rows and the mask of the two target positions."""
  rows, targets = [], []
  for _ in range(batch_size):
    a, b, c = rng.randint(0, 10, size=3)
    prompt = tokenizer.encode(f"repeat the last digit: {a} {b} {c}", add_special_tokens=False)
    digits = {"first": a, "middle": b, "last": c}
    u, gold = rng.rand(), rng.randint(0, 10)  # a random digit unless a mix entry takes u
    for name, p in mix.items():
      if u < p:
        gold = digits[name]
        break
      u -= p
    rows.append(prompt + tokenizer.encode(str(gold), add_special_tokens=False)
                + [tokenizer.eos_token_id])
    targets.append(2)
  width = max(len(r) for r in rows)
  ids = np.full((batch_size, width), tokenizer.pad_token_id, np.int32)
  attn = np.zeros((batch_size, width), np.int32)
  loss_mask = np.zeros((batch_size, width), np.float32)
  for i, (r, n) in enumerate(zip(rows, targets)):
    ids[i, width - len(r):] = r
    attn[i, width - len(r):] = 1
    loss_mask[i, width - n:] = 1.0
  return ids, attn, loss_mask


def pretrain_digits_base(path: str | os.PathLike, *, mix: dict[str, float] | None = None,
                         steps: int = 300,
                         batch_size: int = 64, learning_rate: float = 3e-3, seed: int = 0) -> str:
  """Fits the default tiny model on `digits` prompts answered with digits drawn from `mix`; saves it.

  Args:
    path: output folder: an HF checkpoint (config.json + safetensors) plus the tiny tokenizer,
      i.e. what `--config.model.path` takes.
    mix: {"first" | "middle" | "last": probability} of each row's label being that digit of
      the prompt; the rest of the mass is a uniformly random digit, so that the base samples
      every digit (GRPO learns only from groups whose rewards differ). Default {"last": 0.2}.
    steps: Adam steps of supervised cross-entropy on the answer digit and the EOS after it.
    batch_size: prompts per step (fresh random digits each step).
    learning_rate: Adam learning rate.
    seed: seeds the initialisation and the digits.

  Returns:
    `path`.
  """
  mix = dict({"last": 0.2} if mix is None else mix)
  if set(mix) - {"first", "middle", "last"} or any(p < 0 for p in mix.values()) or sum(
      mix.values()) > 1:
    raise ValueError(f"mix: expected probabilities (summing to <= 1) of 'first' / 'middle' / "
                     f"'last', got {mix!r}")
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_tok.default_tokenizer_dir())
  model = models.Decoder(digits_base_config(len(tokenizer)), rngs=nnx.Rngs(params=seed))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adam(learning_rate)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, ids, attn, loss_mask):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(ids[:, :-1], attn[:, :-1])
      logp = jax.nn.log_softmax(logits, axis=-1)
      target_logp = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
      mask = loss_mask[:, 1:]
      return -(target_logp * mask).sum() / mask.sum()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.RandomState(seed)
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state, *_batch(rng, tokenizer, batch_size, mix))
  model = nnx.merge(graphdef, params)
  models.save_pretrained(model, path)
  tokenizer.save_pretrained(path)
  return os.fspath(path)
