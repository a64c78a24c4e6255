"""Forward+backward throughput and MFU of the policy model (Qwen2.5-0.5B shape, random weights).

  python bench/model.py --batch 1 --seq 128 --steps 3                 # CPU
  python bench/model.py --batch 16 --seq 1024 --dtype bfloat16        # GPU (H100 target: >= 45% MFU)

FLOPs per step = 6 * N * tokens + 12 * L * H * D * T * tokens (PaLM appendix B convention:
causal attention not halved), N = parameters that take part in matmuls (the input embedding
lookup is excluded unless it is the tied LM head). The loss is `sum(token_logprobs)` with a chunked
LM head, as the trainer's update chunks (`losses.head_logprobs`). MFU divides by the
accelerator's dense peak; on CPU there is
no published peak, so the script measures a large float32 matmul and uses that as the "peak".
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grpo_jax.models import Decoder, token_logprobs
from grpo_jax.testing.models import qwen2_0p5b_config

# Dense bf16 peaks (TFLOP/s) by device kind substring.
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5e": 197.0,
                "TPU v5p": 459.0, "TPU v6": 918.0}


def _cpu_matmul_tflops(n: int = 2048, reps: int = 3) -> float:
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    f(a).block_until_ready()
  return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--dtype", default=None, help="compute/param dtype (default: bf16 on GPU/TPU, f32 on CPU)")
  p.add_argument("--chunk", type=int, default=256, help="token_logprobs chunk size")
  p.add_argument("--remat", action="store_true")
  p.add_argument("--layers", type=int, default=None, help="override layer count (quick runs)")
  args = p.parse_args()

  dev = jax.devices()[0]
  on_cpu = dev.platform == "cpu"
  dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
  overrides = dict(dtype=dtype, param_dtype=dtype, remat=args.remat)
  if args.layers:
    overrides["num_layers"] = args.layers
  cfg = qwen2_0p5b_config(**overrides)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  B, T = args.batch, args.seq
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (B, T)), jnp.int32)
  mask = jnp.ones((B, T), jnp.int32)

  @jax.jit
  def step(state, tokens, mask):
    def loss(s):
      return jnp.sum(token_logprobs(nnx.merge(graphdef, s), tokens, mask, chunk_size=args.chunk))
    return jax.value_and_grad(loss)(state)

  t0 = time.perf_counter()
  jax.block_until_ready(step(state, tokens, mask))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    jax.block_until_ready(step(state, tokens, mask))
    times.append(time.perf_counter() - t)
  step_s = float(np.median(times))

  n_matmul = cfg.num_params - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
  flops_per_token = 6 * n_matmul + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * T
  achieved = flops_per_token * B * T / step_s / 1e12
  if on_cpu:
    peak, peak_src = _cpu_matmul_tflops(), "measured f32 2048^3 matmul"
  else:
    peak = next((v for k, v in _PEAK_TFLOPS.items() if k in dev.device_kind), float("nan"))
    peak_src = f"dense bf16 peak of {dev.device_kind}"
  print(json.dumps({
      "device": dev.device_kind, "n_devices": 1, "dtype": dtype, "batch": B, "seq": T,
      "layers": cfg.num_layers, "params": cfg.num_params, "remat": args.remat,
      "compile_s": round(compile_s, 1), "step_s": round(step_s, 4),
      "tokens_per_s": round(B * T / step_s, 1), "model_tflops_per_s": round(achieved, 4),
      "peak_tflops": round(peak, 3), "peak_source": peak_src, "mfu": round(achieved / peak, 4),
  }))


if __name__ == "__main__":
  main()
