r"""Decode step on the real model: per-step time at 64 rows vs the matmul floor, and vs cache slots.

  python bench/decode_step.py                                   # this checkout
  python bench/decode_step.py --src /tmp/grpo_old --label old   # another checkout's sampler
  python bench/decode_step.py --profile /tmp/trace              # + a jax.profiler trace summary

Model: SmolLM2-135M-Instruct (`grpo_jax.testing.real_model.smollm2_dir()` if present, else
~/.cache/grpo_jax/SmolLM2-135M-Instruct), float32, one CPU device. B = 8 prompts of P = 96 random
tokens, G = 8: 64 rows. Measured, each the median of `--reps` after a warm-up:

  * step(S): `sampling.decode` of R = 24 and of R = 8 steps from a prefilled cache of S slots
    (no stop tokens), (t24 - t8) / 16 = the time of one step, for S in `--slots` (the cache is
    preallocated with S slots; only 96 + 24 are ever filled);
  * floor: one jitted program with the same matmuls as a step on 64 rows (per layer [64, E] x
    q/k/v/o, gate/up, down; the [64, E] x [E, V] head), weights as separate arrays, looped 16
    times in a `lax.fori_loop` like the decode loop: the FLOPs no decoder can skip, at this CPU's
    matmul rate. Attention over the cache is not in the floor (it is memory traffic, ~S x 46 KB
    per row and step for this model);
  * generate: `sampling.generate` of 64 rows x 48 tokens (no stop), whole call incl. prefill.

Prints one JSON object. `BENCH_CLOCK=cpu` times with the process's CPU time instead of wall
time (on a shared machine, the work done rather than the neighbours' load).
`--src DIR` runs the sampler of another checkout (e.g. the commit before
this change, `git archive <rev> | tar -x -C DIR`), for old/new ratios measured the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


# On a machine shared with other jobs, wall time measures the neighbours as much as the program:
# BENCH_CLOCK=cpu times with this process's CPU time (all threads), i.e. the work done.
_CLOCK = time.process_time if os.environ.get("BENCH_CLOCK") == "cpu" else time.perf_counter


def _median(fn, reps: int) -> float:
  fn()
  times = []
  for _ in range(reps):
    t = _CLOCK()
    fn()
    times.append(_CLOCK() - t)
  return statistics.median(times)


def model_dir() -> str:
  try:
    from grpo_jax.testing.real_model import smollm2_dir
    return smollm2_dir()
  except ImportError:
    return os.path.expanduser("~/.cache/grpo_jax/SmolLM2-135M-Instruct")


def matmul_floor(config, rows: int, steps: int, reps: int) -> tuple[float, float]:
  """Seconds per step of the step's matmuls alone, and the GFLOP of one step."""
  import jax
  import jax.numpy as jnp

  E, F, H, K, D, V = (config.hidden_size, config.intermediate_size, config.num_heads,
                      config.num_kv_heads, config.head_dim, config.vocab_size)
  key = jax.random.key(0)
  shapes = [(E, H * D), (E, K * D), (E, K * D), (H * D, E), (E, F), (E, F), (F, E)]
  ws = [[0.02 * jax.random.normal(jax.random.fold_in(key, 100 * l + i), s, jnp.float32)
         for i, s in enumerate(shapes)] for l in range(config.num_layers)]
  head = 0.02 * jax.random.normal(key, (V, E), jnp.float32)
  flops = 2 * rows * (config.num_layers * sum(a * b for a, b in shapes) + E * V)

  @jax.jit
  def run(x, ws, head):
    def body(i, carry):
      x, acc = carry
      for q, k, v, o, g, u, d in ws:
        h = x @ q + jnp.pad(x @ k + x @ v, ((0, 0), (0, H * D - K * D)))
        x = x + h @ o
        x = x + (jax.nn.silu(x @ g) * (x @ u)) @ d
        x = x * 0.5
      logits = jnp.einsum("ne,ve->nv", x, head)
      return x, acc + logits[:, :1]
    return jax.lax.fori_loop(0, steps, body, (x, jnp.zeros((x.shape[0], 1))))[1]

  x = jnp.ones((rows, E), jnp.float32) * 0.01
  t = _median(lambda: run(x, ws, head).block_until_ready(), reps)
  return t / steps, flops / 1e9


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--src", default=None, help="import grpo_jax from this checkout")
  parser.add_argument("--label", default="this checkout")
  parser.add_argument("--slots", default="160,352,1120")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--group", type=int, default=8)
  parser.add_argument("--prompt-len", type=int, default=96)
  parser.add_argument("--no-floor", action="store_true")
  parser.add_argument("--no-generate", action="store_true")
  parser.add_argument("--profile", default=None, help="trace dir: profile 16 steps at S=160")
  args = parser.parse_args()
  if args.src:
    sys.path.insert(0, os.path.abspath(args.src))
  else:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import grpo_jax
  from grpo_jax import sampling
  from grpo_jax.models import from_pretrained

  model = from_pretrained(model_dir(), dtype="float32")
  graphdef, params = nnx.split(model)
  cfg = model.config
  B, G, P = args.batch, args.group, args.prompt_len
  N = B * G
  ids = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (B, P)), jnp.int32)
  mask = jnp.ones_like(ids)
  key = jax.random.key(0)
  out = {"label": args.label, "clock": os.environ.get("BENCH_CLOCK", "wall"),
         "grpo_jax": os.path.dirname(grpo_jax.__file__),
         "model": "SmolLM2-135M-Instruct f32", "rows": N, "prompt_len": P,
         "cpus": os.cpu_count(), "jax": jax.__version__}

  def step_time(S):
    cache, logits = sampling.prefill(graphdef, params, ids, mask, S, group_size=G)
    jax.block_until_ready(cache)

    def run(R):
      o, c, l = sampling.decode(graphdef, params, cache, logits, P, key, max_new_tokens=R,
                                temperature=1.0, pad_token_id=0)
      jax.block_until_ready((o.tokens, c.k, l))
    t8 = _median(lambda: run(8), args.reps)
    t24 = _median(lambda: run(24), args.reps)
    return (t24 - t8) / 16, run

  out["step_s"] = {}
  for S in [int(s) for s in args.slots.split(",")]:
    out["step_s"][S], run = step_time(S)
    print(f"[{args.label}] S={S}: {out['step_s'][S] * 1e3:.1f} ms/step", file=sys.stderr,
          flush=True)
    if args.profile and S == min(int(s) for s in args.slots.split(",")):
      sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
      import profile_step
      with jax.profiler.trace(args.profile):
        run(16)
      out["profile"] = profile_step.summarise_trace(args.profile)
  if not args.no_floor:
    floor, gflop = matmul_floor(cfg, N, 16, args.reps)
    out["floor_s"], out["step_gflop"] = floor, gflop
    out["floor_gflops"] = gflop / floor
    out["step_over_floor"] = {S: t / floor for S, t in out["step_s"].items()}
  if not args.no_generate:
    R = 48
    gen = lambda: sampling.generate(graphdef, params, ids, mask, key, group_size=G,
                                    max_new_tokens=R, pad_token_id=0).tokens.block_until_ready()
    t = _median(gen, args.reps)
    out["generate_s"] = t
    out["generate_tok_per_s"] = N * R / t
  print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
  main()
