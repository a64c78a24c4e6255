"""Sampler vs training log-probs against a float64 truth, on SmolLM2-135M-Instruct.

  python bench/logprob_precision.py        # ~5 minutes on 2 CPU cores

Samples 2 responses to each of 3 chat prompts (temperature 0.8, 40 new tokens) with
`sampling.generate` (float32), recomputes their log-probs with the training forward
(`update.response_logprobs`) in float32 and in float64 (the same weights, jax_enable_x64), and prints
the largest differences, overall and by response position. Measured 2026-11-29: sampler vs training
1.5e-4, training vs float64 3.8e-5, sampler vs float64 1.6e-4 (tests/test_real_model.py says what
follows from that).
"""
import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

import grpo_jax.models.config as model_config
from grpo_jax import sampling, update
from grpo_jax.data.pipeline import left_pad
from grpo_jax.models import from_pretrained
from grpo_jax.testing.real_model import smollm2_dir

QUESTIONS = ("What is 17 + 25? Answer with the number only.", "Name three colours.",
             "Write a haiku about rain.")
T, G, R, P = 0.8, 2, 40, 64


def main():
  folder = smollm2_dir()
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  ids = [tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                     add_generation_prompt=True),
             add_special_tokens=False)["input_ids"] for q in QUESTIONS]
  ids, mask = left_pad(ids, P, tok.pad_token_id)
  g32, p32 = nnx.split(from_pretrained(folder))
  out = sampling.generate(g32, p32, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(1),
                          group_size=G, max_new_tokens=R, temperature=T,
                          stop_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id,
                          bucket=False)
  tokens = jnp.concatenate([jnp.repeat(jnp.asarray(ids), G, 0), out.tokens], 1)
  masks = jnp.concatenate([jnp.repeat(jnp.asarray(mask), G, 0), out.mask], 1)
  forward = jax.jit(update.response_logprobs, static_argnums=(0, 4),
                    static_argnames=("temperature",))
  train32 = np.asarray(forward(g32, p32, tokens, masks, R, temperature=T))
  # The float64 truth: x64 switched on after the float32 sampling (the sampler's int32 cache
  # indices do not mix with x64 defaults), float64 admitted as a model dtype for this script only.
  jax.config.update("jax_enable_x64", True)
  model_config._DTYPES["float64"] = jnp.float64
  g64, p64 = nnx.split(from_pretrained(folder, dtype="float64"))
  truth = np.asarray(forward(g64, p64, tokens, masks, R, temperature=T))
  valid = np.asarray(out.mask).astype(bool)
  sampler = np.asarray(out.logprobs)
  print(f"tokens compared: {valid.sum()}")
  print(f"sampler f32 vs training f32: {np.abs(sampler - train32)[valid].max():.2e}")
  print(f"sampler f32 vs float64:      {np.abs(sampler - truth)[valid].max():.2e}")
  print(f"training f32 vs float64:     {np.abs(train32 - truth)[valid].max():.2e}")
  by_pos = lambda x: np.round(np.where(valid, np.abs(x - truth), 0).max(0) * 1e5, 1).tolist()
  print("sampler error by response position (1e-5):", by_pos(sampler))
  print("training error by response position (1e-5):", by_pos(train32))


if __name__ == "__main__":
  main()
