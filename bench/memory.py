r"""Rollout memory at G in {4, 16, 64}: prefill each prompt once (grpo_jax) vs repeat-the-prompt.

  python bench/memory.py                        # compiled memory only (fast, no execution)
  python bench/memory.py --rss                  # also run each variant once in a subprocess

GRPO samples G responses per prompt. The naive way repeats every prompt G times and prefills the
B*G rows (transformers' `num_return_sequences`, TRL's default path); `grpo_jax.sampling.generate`
prefills the B prompts once and repeats their KV cache G times just before decoding. Measured
for the same small Qwen2-shaped model (random weights, abstract: nothing is materialised for the
compiled numbers) and the same B prompts of P tokens, R new tokens:

  prefill   the jitted prefill alone (prompt forward -> KV cache of P + R slots + last logits):
            ours `sampling._prefill_groups_jit(group_size=1)` on [B, P] (the cache that exists
            before decoding starts), naive the same function on the [B*G, P] repeated prompts.
  generate  the whole jitted sampler `sampling._generate_jit`: ours group_size=G on [B, P],
            naive group_size=1 on [B*G, P].

Numbers come from XLA's compiled memory analysis
(`jax.jit(f).lower(...).compile().memory_analysis()`): temp (scratch the program needs at its
peak, buffers reused) + output; the arguments (weights, prompts) are the same for both and listed
once. With `--rss` each (G, variant) also runs one real generate call in its own subprocess and
reports that process's peak resident set size (includes the ~0.5 GB runtime and the weights).

Analytic prompt KV bytes = 2 (k, v) * L * rows * P * K * D * 4 (float32); ours holds B rows of it
until the repeat, the naive variant B*G rows from the start.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MB = 2**20


def model_config(args):
  from grpo_jax.models import ModelConfig
  return ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                     intermediate_size=4 * args.hidden, num_layers=args.layers,
                     num_heads=args.hidden // 64, num_kv_heads=max(args.hidden // 256, 1),
                     head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                     attention_bias=True, model_type="qwen2", max_position_embeddings=8192)


def _abstract_model(args):
  import jax
  from flax import nnx

  from grpo_jax.models import Decoder
  config = model_config(args)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  return config, graphdef, params


def compiled_memory(args, group: int, naive: bool) -> dict:
  """temp / output / argument bytes of the compiled prefill and generate programs."""
  import jax
  import jax.numpy as jnp

  from grpo_jax import sampling

  config, graphdef, params = _abstract_model(args)
  rows = args.batch * group if naive else args.batch
  ids = jax.ShapeDtypeStruct((rows, args.prompt_len), jnp.int32)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  out = {}
  prefill = sampling._prefill_groups_jit.lower(
      graphdef, params, ids, ids, max_len=args.prompt_len + args.new_tokens, group_size=1,
      mesh=None).compile().memory_analysis()
  gen = sampling._generate_jit.lower(
      graphdef, params, ids, ids, key, group_size=1 if naive else group,
      max_new_tokens=args.new_tokens, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=(),
      pad_token_id=0, mesh=None).compile().memory_analysis()
  for name, m in (("prefill", prefill), ("generate", gen)):
    out[name] = {"temp_mb": m.temp_size_in_bytes / MB, "output_mb": m.output_size_in_bytes / MB,
                 "argument_mb": m.argument_size_in_bytes / MB,
                 "alias_mb": m.alias_size_in_bytes / MB}
  kv_bytes = 2 * config.num_layers * rows * args.prompt_len * config.num_kv_heads * \
      config.head_dim * 4
  out["prompt_kv_mb"] = kv_bytes / MB
  return out


def rss_worker(args) -> dict:
  """Runs one generate call for real and returns this process's peak RSS."""
  import resource

  import jax
  import numpy as np
  from flax import nnx

  from grpo_jax import groups, sampling
  from grpo_jax.models import Decoder

  config = model_config(args)
  graphdef, params = nnx.split(Decoder(config, rngs=nnx.Rngs(0)))
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  ids = jax.numpy.asarray(np.random.default_rng(0).integers(
      1, config.vocab_size, (args.batch, args.prompt_len)), jax.numpy.int32)
  mask = jax.numpy.ones_like(ids)
  g = args.group
  if args.naive:
    ids, mask = groups.expand_groups((ids, mask), g)
    g = 1
  out = sampling.generate(graphdef, params, ids, mask, jax.random.key(0), group_size=g,
                          max_new_tokens=args.new_tokens, temperature=1.0, pad_token_id=0,
                          bucket=False)
  out.tokens.block_until_ready()
  return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "rss_before_mb": base}


def _spawn_rss(args, group: int, naive: bool) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--group", str(group),
         "--batch", str(args.batch), "--prompt-len", str(args.prompt_len),
         "--new-tokens", str(args.new_tokens), "--layers", str(args.layers),
         "--hidden", str(args.hidden), "--vocab", str(args.vocab)] + (["--naive"] if naive else [])
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  res = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if res.returncode:
    raise RuntimeError(f"rss worker failed:\n{res.stderr[-4000:]}")
  return json.loads(res.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--groups", type=int, nargs="+", default=[4, 16, 64])
  p.add_argument("--batch", type=int, default=4, help="prompts B")
  p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens P")
  p.add_argument("--new-tokens", type=int, default=64, help="response tokens R")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--vocab", type=int, default=32768)
  p.add_argument("--rss", action="store_true", help="also measure peak RSS (runs the sampler)")
  p.add_argument("--json", help="write the raw results here")
  p.add_argument("--worker", action="store_true")
  p.add_argument("--group", type=int)
  p.add_argument("--naive", action="store_true")
  args = p.parse_args()
  if args.worker:
    print(json.dumps(rss_worker(args)))
    return

  rows = []
  for g in args.groups:
    for naive in (False, True):
      r = {"G": g, "impl": "naive repeat" if naive else "grpo_jax", **compiled_memory(args, g, naive)}
      if args.rss:
        r.update(_spawn_rss(args, g, naive))
      rows.append(r)
      print(json.dumps(r), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "rows": rows}, f, indent=1)
  print(f"\nB={args.batch} P={args.prompt_len} R={args.new_tokens} layers={args.layers} "
        f"E={args.hidden} V={args.vocab}; weights (argument) "
        f"{rows[0]['generate']['argument_mb']:.1f} MB, same for every row")
  print("| G | impl | prompt KV before decode (MB) | prefill temp + out (MB) | "
        "generate temp + out (MB) | peak RSS (MB) |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    pf, gen = r["prefill"], r["generate"]
    rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "—"
    print(f"| {r['G']} | {r['impl']} | {r['prompt_kv_mb']:.1f} | "
          f"{pf['temp_mb'] + pf['output_mb']:.1f} | {gen['temp_mb'] + gen['output_mb']:.1f} | "
          f"{rss} |")


if __name__ == "__main__":
  main()
