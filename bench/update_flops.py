r"""Update FLOPs (XLA cost analysis) of the plain and the shared-prefix GRPO update vs the ideal,
and the wall time of one update on the real model.

  python bench/update_flops.py                      # FLOPs only (compiles small-depth programs)
  python bench/update_flops.py --time               # also time one update on SmolLM2-135M
  python bench/update_flops.py --ragged [--time]    # long-tailed lengths: trimmed vs untrimmed

What is counted. `jax.value_and_grad(update.loss_fn)` over one micro-batch holding the whole batch
(B prompts x G responses, every prompt P tokens and every response R tokens: no padding), float32,
full fine-tuning, in the SmolLM2-135M shape (30 layers, E = 576, F = 1536, 9 q / 3 kv heads, tied
49,152 vocabulary). `flops` from `jit(...).lower(...).compile().cost_analysis()`. XLA counts a
while loop's body once, so the layer scan is unrolled for the count (`lax.scan(unroll=True)`) on
1- and 2-layer copies of the shape, and the 30-layer figure is extrapolated linearly (exact: every
layer is the same program): flops(30) = flops(1) + 29 (flops(2) - flops(1)). The LM head runs as
one chunk here (its `lax.map` would be a loop too; chunking does not change its FLOPs).

The ideal: matmul FLOPs of the forward + backward (3x the forward) of each prompt ONCE per group
and each response token once, no padding: per token and layer 2 (E H D + 2 E K D + H D E + 3 E F),
attention 4 H D S per query over its S visible positions (the prompt's P for prompt queries, P + R
for response queries, as the dense masked attention computes them), and the LM head 2 E V on the
response positions only. Expected saving of the shared prefix ~ (G - 1) / G x P / (P + R).

--ragged: responses of natural, long-tailed lengths (P = 256, G = 8, R = 128; each prompt draws a
typical length 8-64 tokens, log-uniform, and its G responses scatter around it, lognormal
sigma 0.6, capped at R), the update in micro-batches of one group, plain (micro-batches of 4
rows) and shared. Counted: the XLA FLOPs of the programs that run, i.e. per micro-batch the
program of its bucket (`update.response_buckets(R)`), against every micro-batch at R
(untrimmed) and the ideal on the real lengths. With --time also the wall time of one
`train_step` (shared, AdamW, SmolLM2-135M weights) with and without `buckets`.

Packed: the shared path with `update.response_packing` as well: each group runs the cheapest
branch that holds it (`update.branch_costs`): trimmed to a bucket r that holds its longest
response, or its responses one after the other in one packed row of T that holds their sum;
"packed_micro_buckets" lists each group's choice (rN: trimmed to N, TN: packed in N).

--time: one update (`update.train_step`, jitted, AdamW) on the real SmolLM2-135M-Instruct weights,
plain vs shared, B prompts as below, after a warm-up call, `block_until_ready` before reading the
clock; interleaved rounds, median. Micro-batches of 4 rows (plain) and of one group (shared)
keep the activations to a few GB.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

SETTINGS = ((256, 8, 128), (96, 4, 48))  # (P, G, R)


def smollm2_shape(**overrides):
  from grpo_jax.models import ModelConfig
  fields = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True,
                rope_theta=100000.0, rms_norm_eps=1e-5, model_type="llama",
                max_position_embeddings=8192)
  return ModelConfig(**{**fields, **overrides})


def ragged_lengths(B, G, R, seed=0):
  """[B, G] response lengths: a typical length per prompt (8..R/2, log-uniform), the G responses
  lognormal around it (sigma 0.6), at least 1, capped at R (truncated)."""
  import numpy as np
  rng = np.random.RandomState(seed)
  typical_B = np.exp(rng.uniform(np.log(8), np.log(R / 2), B))
  lengths = np.ceil(typical_B[:, None] * np.exp(0.6 * rng.normal(size=(B, G))))
  return np.clip(lengths, 1, R).astype(np.int64)


def ideal_ragged_flops(cfg, P, lengths_BxG) -> float:
  """`ideal_flops` on real lengths: each prompt once, each real response token once (attending
  to the prompt and the response tokens before it, dense over the visible window)."""
  E, F, H, K, D, V, L = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                         cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.num_layers)
  linear = 2 * (E * H * D + 2 * E * K * D + H * D * E + 3 * E * F)
  B = lengths_BxG.shape[0]
  n = lengths_BxG.reshape(-1).astype(float)
  per_layer = B * P * (linear + 4 * H * D * P) + (n * (linear + 4 * H * D * (P + n))).sum()
  return 3.0 * (L * per_layer + n.sum() * 2 * E * V)


def ragged_flops(cfg, P, G, R, lengths_BxG, rows_per_micro_plain=4) -> dict:
  """XLA FLOPs of the micro-batch programs that run on `lengths_BxG`: untrimmed (every
  micro-batch at R) and trimmed (each micro-batch in its bucket, micro-batches by length as
  `update._order_by_length` forms them), for the shared path (one group per micro-batch) and the
  plain path (`rows_per_micro_plain` rows per micro-batch)."""
  import numpy as np

  from grpo_jax import update
  buckets = update.response_buckets(R)
  bucket = lambda n: next(b for b in buckets if b >= n)
  B = lengths_BxG.shape[0]
  # Shared: micro-batch = one group, its extent the group's longest response.
  shared_buckets = [bucket(int(m)) for m in lengths_BxG.max(axis=1)]
  # Plain: rows sorted by length, runs of `rows_per_micro_plain`, extent the run's longest.
  rows = np.sort(lengths_BxG.reshape(-1))
  plain_buckets = [bucket(int(r[-1])) for r in rows.reshape(-1, rows_per_micro_plain)]
  out = {"buckets": buckets}
  for name, used, (b, g) in (("shared", shared_buckets, (1, G)),
                             ("plain", plain_buckets, (rows_per_micro_plain, 1))):
    per = {r: extrapolated_flops(cfg, b, P, g, r, shared=name == "shared")
           for r in sorted(set(used) | {R})}
    out[name] = {"untrimmed": len(used) * per[R], "trimmed": sum(per[r] for r in used),
                 "micro_buckets": used}
  # Packed (shared, `update.response_packing`): of the buckets that hold the group's longest
  # response and the packed lengths that hold the sum of its lengths, the cheapest by
  # `update.branch_costs` runs (as `update._trimmed` chooses).
  packing = update.response_packing(cfg, R, G)
  lengths = update.packed_lengths(packing, P, G, R)
  costs = update.branch_costs(packing, buckets, lengths, P, G)
  choices = [(r, 0) for r in buckets] + [(R, t) for t in lengths]
  packed = []
  for g in lengths_BxG:
    holds = [g.max() <= r for r in buckets] + [g.sum() <= t for t in lengths]
    packed.append(min((c, i) for i, (c, h) in enumerate(zip(costs, holds)) if h)[1])
  per = {i: (extrapolated_flops(cfg, 1, P, G, R, shared=True, packed=choices[i][1])
             if choices[i][1] else extrapolated_flops(cfg, 1, P, G, choices[i][0], shared=True))
         for i in set(packed)}
  out["packed"] = {"untrimmed": out["shared"]["untrimmed"], "trimmed": sum(per[i] for i in packed),
                   "micro_buckets": [f"T{choices[i][1]}" if choices[i][1] else f"r{choices[i][0]}"
                                     for i in packed]}
  out["ideal"] = ideal_ragged_flops(cfg, P, lengths_BxG)
  return out


def time_ragged(model_dir: str, P: int, G: int, R: int, lengths_BxG, rounds: int) -> dict:
  """Median seconds of one jitted shared-prefix train_step (one group per micro-batch, AdamW,
  real weights) on ragged responses: untrimmed, trimmed to buckets, and packed."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from grpo_jax import models, update
  from grpo_jax.config import OptimConfig, RLConfig

  model = models.from_pretrained(model_dir)
  graphdef, params = nnx.split(model)
  tx = update.make_optimizer(OptimConfig(learning_rate=1e-6, warmup_steps=0), 100)
  B = lengths_BxG.shape[0]
  n = B * G
  rng = np.random.RandomState(0)
  prompt = rng.randint(10, 40000, (B, P))
  rmask = (np.arange(R)[None, :] < lengths_BxG.reshape(-1, 1)).astype(np.int32)
  batch = {
      "tokens": jnp.asarray(np.concatenate([np.repeat(prompt, G, 0),
                                            rng.randint(10, 40000, (n, R))], 1), jnp.int32),
      "attn_mask": jnp.asarray(np.concatenate([np.ones((n, P), np.int32), rmask], 1)),
      "loss_mask": jnp.asarray(rmask, jnp.float32), "kl_mask": jnp.asarray(rmask, jnp.float32),
      "advantages": jnp.asarray(rng.normal(size=n), jnp.float32),
  }
  buckets, packing = update.response_buckets(R), update.response_packing(model.config, R, G)
  steps = {name: jax.jit(functools.partial(
      update.train_step, graphdef=graphdef, tx=tx, rl=RLConfig(), response_len=R, num_micro=B,
      temperature=1.0, group_size=G, buckets=b, packing=pk))
      for name, b, pk in (("untrimmed", None, None), ("trimmed", buckets, None),
                          ("packed", buckets, packing))}
  state = update.TrainState(params=params, opt_state=tx.init(params), step=jnp.int32(0),
                            rng=jax.random.PRNGKey(0), skipped=jnp.int32(0))
  times = {k: [] for k in steps}
  for name, step in steps.items():  # compile + warm-up
    t0 = time.perf_counter()
    jax.block_until_ready(step(state, batch))
    times[f"{name}_first"] = time.perf_counter() - t0
  for _ in range(rounds):
    for name, step in steps.items():
      t0 = time.perf_counter()
      jax.block_until_ready(step(state, batch))
      times[name].append(time.perf_counter() - t0)
  return {k: statistics.median(v) if isinstance(v, list) else v for k, v in times.items()}


def ragged_main(args):
  import jax
  import numpy as np
  cfg = smollm2_shape()
  P, G, R = 256, 8, 128
  lengths = ragged_lengths(args.ragged_batch, G, R)
  flat = lengths.reshape(-1)
  row = {"P": P, "G": G, "R": R, "B": args.ragged_batch, "length_mean": float(flat.mean()),
         "length_p50": float(np.median(flat)), "length_p90": float(np.percentile(flat, 90)),
         "truncated_frac": float((flat >= R).mean()),
         "group_max": lengths.max(axis=1).tolist()}
  print(json.dumps(row), flush=True)
  if not args.no_flops:
    jax.lax.scan = functools.partial(jax.lax.scan, unroll=True)
    f = ragged_flops(cfg, P, G, R, lengths)
    jax.lax.scan = jax.lax.scan.func
    for name in ("shared", "plain", "packed"):
      u, t = f[name]["untrimmed"], f[name]["trimmed"]
      row.update({f"{name}_untrimmed_tflop": u / 1e12, f"{name}_trimmed_tflop": t / 1e12,
                  f"{name}_saving": 1 - t / u, f"{name}_trimmed_over_ideal": t / f["ideal"],
                  f"{name}_untrimmed_over_ideal": u / f["ideal"],
                  f"{name}_micro_buckets": f[name]["micro_buckets"]})
    row["ideal_tflop"] = f["ideal"] / 1e12
    print(json.dumps(row), flush=True)
  if args.time:
    timed = lengths[:args.ragged_time_batch]
    if args.time_group_lengths:  # Every response of group b this long.
      timed = np.repeat(np.array(args.time_group_lengths)[:, None], G, axis=1)
    B = timed.shape[0]
    t = time_ragged(args.model_dir, P, G, R, timed, args.rounds)
    row.update({"time_B": B, "time_group_max": timed.max(axis=1).tolist(),
                **{f"{k}_s": v for k, v in t.items()}})
    print(json.dumps(row), flush=True)
  if args.json:
    with open(args.json, "w") as fh:
      json.dump({"args": vars(args), "rows": [row]}, fh, indent=1)


def _batch_shapes(n, P, R):
  import jax
  import jax.numpy as jnp
  L = P + R
  return {"tokens": jax.ShapeDtypeStruct((n, L), jnp.int32),
          "attn_mask": jax.ShapeDtypeStruct((n, L), jnp.int32),
          "loss_mask": jax.ShapeDtypeStruct((n, R), jnp.float32),
          "kl_mask": jax.ShapeDtypeStruct((n, R), jnp.float32),
          "advantages": jax.ShapeDtypeStruct((n,), jnp.float32)}


def xla_flops(cfg, B, P, G, R, shared: bool, packed: int = 0) -> float:
  """Compiled FLOPs of value_and_grad(loss_fn) on abstract params (layer scan unrolled)."""
  import jax
  from flax import nnx

  from grpo_jax import update
  from grpo_jax.config import RLConfig
  from grpo_jax.models import Decoder

  graphdef, params = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  rl = RLConfig()

  def f(p, batch):
    den = update.minibatch_denominators(batch, rl)
    return jax.value_and_grad(update.loss_fn, has_aux=True)(
        p, graphdef, batch, rl, R, den, 1.0, lm_head_chunk=max(R, packed),
        group_size=G if shared else None, packed=packed)

  cost = jax.jit(f).lower(params, _batch_shapes(B * G, P, R)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"])


def extrapolated_flops(cfg, B, P, G, R, shared: bool, packed: int = 0) -> float:
  f1 = xla_flops(cfg.replace(num_layers=1), B, P, G, R, shared, packed)
  f2 = xla_flops(cfg.replace(num_layers=2), B, P, G, R, shared, packed)
  return f1 + (cfg.num_layers - 1) * (f2 - f1)


def ideal_flops(cfg, B, P, G, R) -> float:
  E, F, H, K, D, V, L = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                         cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.num_layers)
  linear = 2 * (E * H * D + 2 * E * K * D + H * D * E + 3 * E * F)
  prompt_tokens, response_tokens = B * P, B * G * R
  per_layer = (prompt_tokens * (linear + 4 * H * D * P)
               + response_tokens * (linear + 4 * H * D * (P + R)))
  forward = L * per_layer + response_tokens * 2 * E * V
  return 3.0 * forward


def time_updates(model_dir: str, B: int, P: int, G: int, R: int, rounds: int) -> dict:
  """Median seconds of one jitted train_step, plain vs shared, on the real weights."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from grpo_jax import models, update
  from grpo_jax.config import OptimConfig, RLConfig

  model = models.from_pretrained(model_dir)
  graphdef, params = nnx.split(model)
  tx = update.make_optimizer(OptimConfig(learning_rate=1e-6, warmup_steps=0), 100)
  rng = np.random.RandomState(0)
  n = B * G
  prompt = rng.randint(10, 40000, (B, P))
  batch = {
      "tokens": jnp.asarray(np.concatenate([np.repeat(prompt, G, 0),
                                            rng.randint(10, 40000, (n, R))], 1), jnp.int32),
      "attn_mask": jnp.ones((n, P + R), jnp.int32),
      "loss_mask": jnp.ones((n, R), jnp.float32), "kl_mask": jnp.ones((n, R), jnp.float32),
      "advantages": jnp.asarray(rng.normal(size=n), jnp.float32),
  }
  rl = RLConfig()
  steps = {}
  # Micro-batches keep the activations a few GB: 4 rows for the plain path, one group (G rows)
  # for the shared one.
  for name, g, micro in (("plain", None, n // 4), ("shared", G, B)):
    steps[name] = jax.jit(functools.partial(
        update.train_step, graphdef=graphdef, tx=tx, rl=rl, response_len=R, num_micro=micro,
        temperature=1.0, group_size=g))
  state = update.TrainState(params=params, opt_state=tx.init(params), step=jnp.int32(0),
                            rng=jax.random.PRNGKey(0), skipped=jnp.int32(0))
  times = {k: [] for k in steps}
  for name, step in steps.items():  # compile + warm-up
    jax.block_until_ready(step(state, batch))
  for _ in range(rounds):
    for name, step in steps.items():
      t0 = time.perf_counter()
      jax.block_until_ready(step(state, batch))
      times[name].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=2,
                 help="prompts B per update (FLOPs are linear in B)")
  p.add_argument("--time", action="store_true", help="also time one update on SmolLM2-135M")
  p.add_argument("--time-batch", type=int, nargs=2, default=(1, 4),
                 help="B for the timing of each setting in SETTINGS order (0: not timed)")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--model-dir",
                 default=os.path.expanduser("~/.cache/grpo_jax/SmolLM2-135M-Instruct"))
  p.add_argument("--json")
  p.add_argument("--no-flops", action="store_true", help="with --time: skip the FLOP counts")
  p.add_argument("--ragged", action="store_true",
                 help="long-tailed response lengths: trimmed vs untrimmed update (see above)")
  p.add_argument("--ragged-batch", type=int, default=16, help="--ragged: prompts B")
  p.add_argument("--time-group-lengths", type=lambda v: [int(x) for x in v.split(",")],
                 help="--ragged --time: time these groups instead (every response of group b "
                      "this long), e.g. 32,128,20,60")
  p.add_argument("--ragged-time-batch", type=int, default=2,
                 help="--ragged --time: the first B prompts of the batch are timed")
  args = p.parse_args()
  if args.ragged:
    return ragged_main(args)

  import jax
  # Count every layer: XLA's cost analysis counts a while loop's body once.
  jax.lax.scan = functools.partial(jax.lax.scan, unroll=True)
  cfg = smollm2_shape()
  rows = []
  for (P, G, R) in SETTINGS:
    B = args.batch
    if args.no_flops:
      rows.append({"P": P, "G": G, "R": R})
      continue
    plain = extrapolated_flops(cfg, B, P, G, R, shared=False)
    shared = extrapolated_flops(cfg, B, P, G, R, shared=True)
    ideal = ideal_flops(cfg, B, P, G, R)
    row = {"P": P, "G": G, "R": R, "B": B, "plain_tflop": plain / 1e12,
           "shared_tflop": shared / 1e12, "ideal_tflop": ideal / 1e12,
           "plain_over_ideal": plain / ideal, "shared_over_ideal": shared / ideal,
           "saving": 1 - shared / plain, "expected_saving": (G - 1) / G * P / (P + R)}
    rows.append(row)
    print(json.dumps(row), flush=True)
  if args.time:
    jax.lax.scan = jax.lax.scan.func  # Time the real (rolled) program.
    for (P, G, R), B in zip(SETTINGS, args.time_batch):
      if not B:
        continue
      t = time_updates(args.model_dir, B, P, G, R, args.rounds)
      row = next(r for r in rows if (r["P"], r["G"], r["R"]) == (P, G, R))
      row.update({"time_B": B, "plain_s": t["plain"], "shared_s": t["shared"],
                  "speedup": t["plain"] / t["shared"]})
      print(json.dumps(row), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "rows": rows}, f, indent=1)
  print("| P | G | R | plain / ideal | shared / ideal | FLOPs saved | expected (G-1)/G·P/(P+R) |"
        " plain s | shared s | speed-up |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    if "plain_tflop" not in r:
      r.update(plain_over_ideal=float("nan"), shared_over_ideal=float("nan"),
               saving=float("nan"), expected_saving=(r["G"] - 1) / r["G"] * r["P"] / (r["P"] + r["R"]))
    t = (f"{r['plain_s']:.2f} | {r['shared_s']:.2f} | {r['speedup']:.2f}x" if "plain_s" in r
         else "— | — | —")
    print(f"| {r['P']} | {r['G']} | {r['R']} | {r['plain_over_ideal']:.2f} | "
          f"{r['shared_over_ideal']:.2f} | {100 * r['saving']:.0f} % | "
          f"{100 * r['expected_saving']:.0f} % | {t} |")


if __name__ == "__main__":
  main()
