"""Rollout throughput: `grpo_jax.sampling.generate` against transformers' `generate`, same weights.

  python bench/sampling.py                                   # CPU, G in {4, 16}
  python bench/sampling.py --groups 4 16 64 --reps 3         # more group sizes

A small Qwen2-shaped model (q/k/v bias, tied embeddings, GQA; random weights) is written once with
`grpo_jax.models.save_pretrained`; each measurement then runs in its own subprocess (so that peak
memory is that framework's alone) and loads the same folder: ours with
`grpo_jax.models.from_pretrained`, transformers with `AutoModelForCausalLM.from_pretrained`
(PyTorch, float32, CPU). Both draw B*G responses of exactly R tokens (no stop token; HF with
`min_new_tokens=R`) at temperature 1, top-k and top-p off, from the same B prompts of P tokens:
transformers through `num_return_sequences=G` (it repeats the prompts, so it prefills each one G
times), ours with `group_size=G` (one prefill per prompt, KV cache repeated). "ours, naive" is our
sampler fed prompts that were repeated before the call (group_size=1), to show what prefilling
once saves.

tokens/s = B*G*R generated tokens / wall time of one generate call (prefill included), median of
`--reps` calls after a warm-up call (the warm-up, which compiles, is reported apart). Peak memory is
the subprocess's peak resident set size (ru_maxrss) and, on an accelerator, JAX's peak device bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def _prompts(batch: int, length: int, vocab: int) -> np.ndarray:
  return np.random.default_rng(0).integers(1, vocab, (batch, length)).astype(np.int32)


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB.


def _time(fn, reps: int) -> tuple[float, list[float]]:
  t = time.perf_counter()
  fn()
  first = time.perf_counter() - t
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return first, times


def worker_jax(args) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from grpo_jax import groups, sampling
  from grpo_jax.models import from_pretrained

  model = from_pretrained(args.path, dtype=args.dtype)
  graphdef, params = nnx.split(model)
  ids = jnp.asarray(_prompts(args.batch, args.prompt_len, model.config.vocab_size))
  mask = jnp.ones_like(ids)
  g = args.group
  if args.naive:
    ids, mask = groups.expand_groups((ids, mask), g)
    g = 1
  key = jax.random.key(0)

  def run():
    out = sampling.generate(graphdef, params, ids, mask, key, group_size=g,
                            max_new_tokens=args.new_tokens, temperature=1.0, pad_token_id=0)
    out.tokens.block_until_ready()
    assert int(out.mask.sum()) == ids.shape[0] * g * args.new_tokens
    return out

  first, times = _time(run, args.reps)
  stats = jax.devices()[0].memory_stats() or {}
  return {"first_s": first, "times_s": times, "peak_rss_mb": _peak_rss_mb(),
          "peak_device_mb": stats.get("peak_bytes_in_use", 0) / 2**20 or None,
          "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform}


def worker_torch(args) -> dict:
  import torch
  import transformers

  torch.set_num_threads(args.torch_threads or os.cpu_count())
  model = transformers.AutoModelForCausalLM.from_pretrained(args.path, dtype=torch.float32)
  model.eval()
  ids = torch.from_numpy(_prompts(args.batch, args.prompt_len, model.config.vocab_size)).long()
  mask = torch.ones_like(ids)
  R = args.new_tokens

  def run():
    torch.manual_seed(0)
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                           top_k=0, top_p=1.0, num_return_sequences=args.group,
                           max_new_tokens=R, min_new_tokens=R, pad_token_id=0, eos_token_id=None)
    assert out.shape == (ids.shape[0] * args.group, ids.shape[1] + R), out.shape
    return out

  first, times = _time(run, args.reps)
  return {"first_s": first, "times_s": times, "peak_rss_mb": _peak_rss_mb(), "peak_device_mb": None,
          "device": "cpu", "platform": "torch", "torch_threads": torch.get_num_threads()}


def _spawn(kind: str, args, group: int, naive: bool = False) -> dict:
  cmd = [sys.executable, __file__, "--worker", kind, "--path", args.path, "--group", str(group),
         "--batch", str(args.batch), "--prompt-len", str(args.prompt_len),
         "--new-tokens", str(args.new_tokens), "--reps", str(args.reps), "--dtype", args.dtype,
         "--torch-threads", str(args.torch_threads)]
  if naive:
    cmd.append("--naive")
  env = dict(os.environ)
  if kind == "torch":
    env["CUDA_VISIBLE_DEVICES"] = ""
  res = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if res.returncode:
    raise RuntimeError(f"{kind} worker failed:\n{res.stderr[-4000:]}")
  return json.loads(res.stdout.strip().splitlines()[-1])


def _write_model(args) -> dict:
  from flax import nnx

  from grpo_jax.models import Decoder, ModelConfig, save_pretrained

  config = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=args.hidden * 4, num_layers=args.layers,
                       num_heads=args.hidden // 64, num_kv_heads=max(args.hidden // 256, 1),
                       head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       attention_bias=True, model_type="qwen2", max_position_embeddings=4096)
  model = Decoder(config, rngs=nnx.Rngs(0))
  save_pretrained(model, args.path)
  n = sum(x.size for x in __import__("jax").tree.leaves(nnx.state(model)))
  return {"params": int(n), "config": {k: getattr(config, k) for k in (
      "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
      "num_kv_heads", "head_dim")}}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--groups", type=int, nargs="+", default=[4, 16])
  p.add_argument("--batch", type=int, default=4, help="prompts B")
  p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens P")
  p.add_argument("--new-tokens", type=int, default=128, help="generated tokens R per response")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--vocab", type=int, default=32768)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--torch-threads", type=int, default=0, help="0: one per CPU core")
  p.add_argument("--no-naive", action="store_true", help="skip the repeated-prompt variant")
  p.add_argument("--no-torch", action="store_true", help="skip transformers (e.g. on GPU reruns)")
  # Internal: run one measurement in this process.
  p.add_argument("--worker", choices=["jax", "torch"])
  p.add_argument("--path")
  p.add_argument("--group", type=int)
  p.add_argument("--naive", action="store_true")
  args = p.parse_args()

  if args.worker:
    result = (worker_jax if args.worker == "jax" else worker_torch)(args)
    print(json.dumps(result))
    return

  with tempfile.TemporaryDirectory() as tmp:
    args.path = os.path.join(tmp, "model")
    info = _write_model(args)
    print(json.dumps(info))
    rows = []
    for g in args.groups:
      runs = {"ours": _spawn("jax", args, g)}
      if not args.no_naive:
        runs["ours, naive"] = _spawn("jax", args, g, naive=True)
      if not args.no_torch:
        runs["transformers"] = _spawn("torch", args, g)
      tokens = args.batch * g * args.new_tokens
      for name, r in runs.items():
        med = statistics.median(r["times_s"])
        rows.append({"G": g, "impl": name, "tokens": tokens, "median_s": med,
                     "tokens_per_s": tokens / med, "first_call_s": r["first_s"],
                     "peak_rss_mb": r["peak_rss_mb"], "peak_device_mb": r["peak_device_mb"],
                     "device": r["device"]})
        print(json.dumps(rows[-1]), flush=True)

  print(f"\nB={args.batch} P={args.prompt_len} R={args.new_tokens} params={info['params']:,}")
  print("| G | impl | device | tokens | median s | tokens/s | vs transformers | first call s | "
        "peak RSS MB | peak device MB |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    hf = [x for x in rows if x["G"] == r["G"] and x["impl"] == "transformers"]
    ratio = f"{r['tokens_per_s'] / hf[0]['tokens_per_s']:.2f}×" if hf else "—"
    dev = f"{r['peak_device_mb']:.0f}" if r["peak_device_mb"] else "—"
    print(f"| {r['G']} | {r['impl']} | {r['device']} | {r['tokens']} | {r['median_s']:.3f} | "
          f"{r['tokens_per_s']:.0f} | {ratio} | {r['first_call_s']:.2f} | "
          f"{r['peak_rss_mb']:.0f} | {dev} |")


if __name__ == "__main__":
  main()
