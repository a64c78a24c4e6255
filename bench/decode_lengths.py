r"""Decode cost vs generated tokens with natural stop tokens (real model, long-tailed lengths).

  python bench/decode_lengths.py                       # B = 4 chat prompts, G = 8, R = 128
  python bench/decode_lengths.py --batch 8 --new-tokens 128

SmolLM2-135M-Instruct (float32, CPU), chat-templated prompts that invite answers of very different
lengths (a one-word answer ... a story), temperature 1, EOS as the stop token: the lengths are the
model's own, long-tailed. Timed (median of `--reps` after a warm-up that compiles every bucket the
run visits; the same key each time, so the same tokens):

  compact   `sampling.generate` (finished rows leave the batch between chunks of 8 steps, the cache
            holds only the slots read so far);
  one       `generate(compact=False)`: every row steps until the longest row ends (the old way);
  forced    the same rows forced to R tokens (no stop token): the per-token cost of a full batch.

Reported: generated tokens, the rows x steps each path runs, and cost per generated token
relative to `forced` (1.0 = decode time proportional to generated tokens at full-batch efficiency).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS = [
    "Answer with one word: what colour is the sky?",
    "What is 7 times 8?",
    "Write a long story about a dragon who learns to cook. Make it detailed.",
    "List the planets of the solar system with one fact about each.",
    "Say hello.",
    "Explain in detail how a bicycle works, part by part.",
    "Give a yes or no answer: is water wet?",
    "Write a poem of at least ten lines about the sea.",
]


# BENCH_CLOCK=cpu: this process's CPU time (the work done), for a machine shared with other jobs.
_CLOCK = time.process_time if os.environ.get("BENCH_CLOCK") == "cpu" else time.perf_counter


def _median(fn, reps):
  fn()
  ts = []
  for _ in range(reps):
    t = _CLOCK()
    fn()
    ts.append(_CLOCK() - t)
  return statistics.median(ts)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--group", type=int, default=8)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--reps", type=int, default=1)
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import transformers
  from flax import nnx

  from grpo_jax import sampling
  from grpo_jax.models import from_pretrained
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from decode_step import model_dir

  path = model_dir()
  tok = transformers.AutoTokenizer.from_pretrained(path)
  model = from_pretrained(path, dtype="float32")
  graphdef, params = nnx.split(model)
  texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                   add_generation_prompt=True) for p in PROMPTS[:args.batch]]
  enc = tok(texts, padding=True, padding_side="left", return_tensors="np")
  ids = jnp.asarray(enc["input_ids"], jnp.int32)
  mask = jnp.asarray(enc["attention_mask"], jnp.int32)
  B, G, R = len(texts), args.group, args.new_tokens
  eos = tok.eos_token_id
  key = jax.random.key(0)
  kw = dict(group_size=G, max_new_tokens=R, temperature=1.0,
            pad_token_id=int(tok.pad_token_id or 0))

  def gen(compact, stops):
    return sampling.generate(graphdef, params, ids, mask, key, compact=compact,
                             stop_token_ids=stops, **kw)

  out = gen(True, (eos,))
  lengths = np.asarray(out.mask).sum(1)
  generated = int(lengths.sum())
  # Rows x steps each path runs (what the decode pays for), from the lengths alone.
  C = sampling._CHUNK
  steps_one = B * G * int(lengths.max())
  steps_compact = 0
  rows = B * G
  for t0 in range(0, int(lengths.max()), C):
    live = int((lengths > t0).sum())
    if t0:
      rows = min(rows, sampling.row_bucket(live, B * G))
    steps_compact += rows * min(C, int(lengths.max()) - t0)
  res = {"model": "SmolLM2-135M-Instruct f32", "prompts": B, "group_size": G, "max_new_tokens": R,
         "generated_tokens": generated, "length_quantiles": np.percentile(
             lengths, [0, 25, 50, 75, 90, 100]).tolist(),
         "row_steps_one_program": steps_one, "row_steps_compact": steps_compact}
  print(json.dumps(res), file=sys.stderr, flush=True)
  t_compact = _median(lambda: gen(True, (eos,)).tokens.block_until_ready(), args.reps)
  t_one = _median(lambda: gen(False, (eos,)).tokens.block_until_ready(), args.reps)
  t_forced = _median(lambda: gen(True, ()).tokens.block_until_ready(), args.reps)
  per_tok_forced = t_forced / (B * G * R)
  res.update(compact_s=t_compact, one_program_s=t_one, forced_s=t_forced,
             compact_cost_per_token_vs_forced=t_compact / generated / per_tok_forced,
             one_program_cost_per_token_vs_forced=t_one / generated / per_tok_forced)
  print(json.dumps(res, indent=1))


if __name__ == "__main__":
  main()
