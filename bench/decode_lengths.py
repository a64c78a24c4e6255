r"""Decode cost vs generated tokens with natural stop tokens (real model, long-tailed lengths).

  BENCH_CLOCK=cpu python bench/decode_lengths.py --new-tokens 64     # B = 4 chat prompts, G = 8
  BENCH_CLOCK=cpu python bench/decode_lengths.py --new-tokens 128 --sweep 4,8,16,32

SmolLM2-135M-Instruct (float32, CPU), chat-templated prompts that invite answers of very different
lengths (a one-word answer ... a story), temperature 1, EOS as the stop token: the lengths are the
model's own, long-tailed. Timed (median of `--reps` after a warm-up that compiles every bucket the
run visits; the same key each time, so the same tokens):

  compact   `sampling.generate`: a device call ends the step the live rows fall into a smaller row
            bucket, the finished rows leave, the cache holds only the slots read so far;
  one       `generate(compact=False)`: every row steps until the longest row ends (the old way);
  forced    the same rows forced to R tokens (no stop token): the per-token cost of a full batch.

Reported: generated tokens, the rows x steps each path runs (compact: as run, from
`sampling._SCHEDULE`), the decode programs compiled, and cost per generated token relative to
`forced` (1.0 = decode time proportional to generated tokens at full-batch efficiency).

`--sweep M1,M2,..`: also the CPU time of one decode step on M working rows (a chunk of 24 steps
minus one of 8, / 16), and from it `no_padding_bound`: the cost per token vs forced of a sampler
whose every step costs step(live rows) (interpolated), i.e. no padding rows and no host work at
all. On a CPU the step at few rows is mostly the weights' memory traffic, so a long tail of few
rows costs more per token than a full batch whatever the scheduling; this bound says how much.
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
  """(median time of `reps` calls after a warm-up call, the warm-up call's result)."""
  first = fn()
  ts = []
  for _ in range(reps):
    t = _CLOCK()
    fn()
    ts.append(_CLOCK() - t)
  return statistics.median(ts), first


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--group", type=int, default=8)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--reps", type=int, default=1)
  parser.add_argument("--sweep", default="", help="rows M1,M2,..: step time and no-padding bound")
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

  compiles0 = sampling._chunk_jit._cache_size()
  sampling._SCHEDULE = schedule = []
  out = gen(True, (eos,))
  sampling._SCHEDULE = None
  lengths = np.asarray(out.mask).sum(1)
  generated = int(lengths.sum())
  N = B * G
  res = {"model": "SmolLM2-135M-Instruct f32", "prompts": B, "group_size": G, "max_new_tokens": R,
         "chunk": sampling._CHUNK, "generated_tokens": generated,
         "length_quantiles": np.percentile(lengths, [0, 25, 50, 75, 90, 100]).tolist(),
         "row_steps_one_program": N * int(lengths.max()),
         "row_steps_compact": sum((t1 - t0) * rows for t0, t1, rows, _ in schedule),
         "device_calls_compact": len(schedule),
         "row_buckets_compact": sorted({rows for *_, rows, _ in schedule}, reverse=True),
         "decode_programs_compiled": sampling._chunk_jit._cache_size() - compiles0}
  print(json.dumps(res), file=sys.stderr, flush=True)
  t_compact, _ = _median(lambda: gen(True, (eos,)).tokens.block_until_ready(), args.reps)
  t_one, one = _median(lambda: jax.block_until_ready(gen(False, (eos,))), args.reps)
  t_forced, _ = _median(lambda: gen(True, ()).tokens.block_until_ready(), args.reps)
  per_tok_forced = t_forced / (N * R)
  # Same key, same tokens up to float rounding: the two paths attend over different slot counts
  # (P + R vs P + the slots held), so logits differ by ~1e-5 and a draw whose uniform falls next
  # to a CDF boundary (in practice a token of probability < 1e-5) can go the other way.
  differ_N = (np.asarray(one.tokens) != np.asarray(out.tokens)).any(1)
  first_N = np.argmax(np.asarray(one.tokens) != np.asarray(out.tokens), axis=1)
  res.update(rows_differing_from_one_program=int(differ_N.sum()),
             logprob_of_first_differing_token=[
                 float(np.asarray(one.logprobs)[n, first_N[n]]) for n in np.flatnonzero(differ_N)],
             max_logprob_diff_equal_rows=float(np.abs(
                 np.asarray(one.logprobs) - np.asarray(out.logprobs))[~differ_N].max()),
             compact_s=t_compact, one_program_s=t_one, forced_s=t_forced,
             compact_cost_per_token_vs_forced=t_compact / generated / per_tok_forced,
             one_program_cost_per_token_vs_forced=t_one / generated / per_tok_forced)
  print(json.dumps(res), file=sys.stderr, flush=True)
  if args.sweep:
    ms = sorted({int(m) for m in args.sweep.split(",")} | {N})
    steps = {m: _step_time(graphdef, params, ids, mask, G, R, m, key) for m in ms}
    step_at = lambda m: float(np.interp(m, ms, [steps[m] for m in ms]))
    live_t = [int((lengths > t).sum()) for t in range(int(lengths.max()))]
    res.update(step_s_by_rows=steps, no_padding_bound=sum(step_at(m) for m in live_t) / generated
               / (steps[N] / N))
  print(json.dumps(res, indent=1))


def _step_time(graphdef, params, ids, mask, G, R, rows, key):
  """CPU/wall seconds of one decode step on `rows` working rows (no stop: (t24 - t8) / 16)."""
  import jax
  import jax.numpy as jnp

  from grpo_jax import sampling
  P = ids.shape[1]
  params_u, st0 = sampling._start_jit(graphdef, params, ids, mask, group_size=G,
                                      max_new_tokens=R, slots=32, pad_token_id=0, mesh=None)
  config = sampling.graphdef_config(graphdef, params)
  lora = sampling.graphdef_lora(graphdef, params)
  static = dict(max_new_tokens=R, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=(),
                pad_token_id=0, mesh=None)
  sel = jnp.arange(rows, dtype=jnp.int32) % st0.done.shape[0]

  def chunk(steps):
    st = sampling._resize_jit(st0, sel, length=P + 32, mesh=None)
    jax.block_until_ready(st)
    t = _CLOCK()
    jax.block_until_ready(sampling._chunk_jit(config, lora, params_u, st, key, jnp.int32(steps),
                                              jnp.int32(0), **static))
    return _CLOCK() - t

  chunk(8)
  return (statistics.median([chunk(24) for _ in range(2)])
          - statistics.median([chunk(8) for _ in range(2)])) / 16


if __name__ == "__main__":
  main()
