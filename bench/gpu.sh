#!/usr/bin/env bash
# One prepared GPU check of issue 18 (< 8 minutes on one H200), printed as one JSON line per figure:
#   * update MFU of the SmolLM2-135M and Qwen2.5-0.5B shapes in bfloat16 (random weights): one
#     jitted policy-gradient step (token log-probs forward + backward + AdamW) on 16 x 512 tokens,
#     FLOPs counted from the shapes (XLA's cost analysis counts the layer scan once), MFU =
#     FLOPs / time / peak (PEAK_TFLOPS, default 989 = H200 dense bf16);
#   * decode tokens/s of `sampling.generate` at G = 8 and 16 (SmolLM2 shape, bf16, no stop token:
#     every row decodes R tokens; prefill included);
#   * the trainer's own update (`update.train_step`: clipped surrogate, chunked LM head on response
#     positions, AdamW) on the SmolLM2 shape in bfloat16 at P = 256, G = 8, R = 128, plain vs
#     shared prefix: seconds per update, speed-up, and MFU counted on the IDEAL FLOPs (prompt once
#     per group, no padding: bench/update_flops.py) -- the useful work rate;
#   * the advantage kernel (group_size=G, the trainer's contiguous ids) vs a copy of the same bytes
#     at N = 1e6 and 1e7;
#   * peak device memory (jax memory_stats) after everything.
# No model files, no downloads: shapes are built from their HF config fields. Each figure is its own
# section: one that fails prints {"what": ..., "error": ...} and the script goes on.
#
#   bash bench/gpu.sh            # on the GPU machine, from the repository root
#   bash bench/gpu.sh --tiny     # tiny shapes: checks the script end to end on CPU in ~1 minute
#   SECTIONS=trainer_update,decode_rate bash bench/gpu.sh   # only these figures
#
# Set-up on a fresh GPU machine (operator; this script installs nothing):
#   pip install -e .
#   # pip install -U "jax[cuda12]"      # the JAX CUDA wheels, if `pip install -e .` gave CPU jax
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
exec "${PYTHON:-python3}" - "$@" <<'EOF'
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from grpo_jax import advantages as adv_lib
from grpo_jax import sampling
from grpo_jax.models import Decoder, config_from_hf, token_logprobs

TINY = "--tiny" in sys.argv
PEAK = float(os.environ.get("PEAK_TFLOPS", "989")) * 1e12
T_START = time.perf_counter()


def emit(**kw):
  kw["elapsed_s"] = round(time.perf_counter() - T_START, 1)
  print(json.dumps(kw), flush=True)


def timed(fn, reps):
  fn()  # compile + warm-up
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def section(fn, *args):
  """Runs one figure; a failure is printed as one JSON line and the script goes on."""
  if os.environ.get("SECTIONS") and fn.__name__ not in os.environ["SECTIONS"].split(","):
    return
  try:
    fn(*args)
  except Exception as e:  # noqa: BLE001 -- one prepared run: report, do not lose the others.
    emit(what=fn.__name__, args=repr(args)[:200], error=f"{type(e).__name__}: {e}"[:2000])


SMOLLM2 = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
               num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
QWEN05 = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
              num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
              rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
if TINY:
  for shape in (SMOLLM2, QWEN05):
    shape.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128, vocab_size=512,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16)
  SMOLLM2.update(num_hidden_layers=3)

dev = jax.devices()[0]
emit(what="device", platform=dev.platform, kind=dev.device_kind, jax=jax.__version__,
     tiny=TINY)


def model_of(hf, seed=0, remat=False):
  cfg = config_from_hf(dict(hf), dtype="bfloat16", param_dtype="float32", remat=remat)
  return Decoder(cfg, rngs=nnx.Rngs(seed))


# ------------------------------------------------------------------------------- update MFU
def _update_flops():
  sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
  import update_flops
  return update_flops


def update_mfu(name, hf, rows, seq):
  model = model_of(hf)
  graphdef, params = nnx.split(model)
  tx = optax.adamw(1e-6)
  opt = tx.init(params)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, hf["vocab_size"], (rows, seq)), jnp.int32)
  mask = jnp.ones_like(tokens)
  adv = jnp.asarray(rng.standard_normal(rows), jnp.float32)

  def loss(p):
    logp = token_logprobs(nnx.merge(graphdef, p), tokens, mask)
    ratio = jnp.exp(logp - jax.lax.stop_gradient(logp))
    return -jnp.mean(ratio * adv[:, None])

  @jax.jit
  def step(p, o):
    l, g = jax.value_and_grad(loss)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, l

  compiled = step.lower(params, opt).compile()
  # FLOPs counted from the shapes (bench/update_flops.py's formula with no prompt: every position
  # a "response" with the LM head; forward + backward = 3x forward). XLA's cost analysis counts
  # the layer scan's body once, so its figure is ~1/L of the work.
  flops = _update_flops().ideal_flops(model.config, rows, 0, 1, seq)
  state = {"p": params, "o": opt}

  def run():
    state["p"], state["o"], l = compiled(state["p"], state["o"])
    l.block_until_ready()
  t = timed(run, 3 if TINY else 5)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  emit(what="update_mfu", model=name, dtype="bfloat16", rows=rows, seq=seq, params=n_params,
       step_s=round(t, 4), flops=flops, tflops_per_s=round(flops / t / 1e12, 2),
       mfu=round(flops / t / PEAK, 4), tokens_per_s=round(rows * seq / t))


if TINY:
  section(update_mfu, "smollm2-135m-shape", SMOLLM2, 4, 32)
  section(update_mfu, "qwen2.5-0.5b-shape", QWEN05, 4, 32)
else:
  # 8-16 k tokens per step: the whole-vocabulary float32 logits of `token_logprobs` and the
  # activations of 64 x 512 tokens asked 93 GB on the H200 (out of memory, 2026-11-29).
  section(update_mfu, "smollm2-135m-shape", SMOLLM2, 16, 512)
  section(update_mfu, "qwen2.5-0.5b-shape", QWEN05, 16, 512)


# ------------------------------------------------------------------------------- trainer update
def trainer_update(name, hf, B, P, G, R, remat=False):
  """`update.train_step` (the trainer's update) plain vs shared prefix, one micro-batch."""
  import functools
  update_flops = _update_flops()
  from grpo_jax import update
  from grpo_jax.config import OptimConfig, RLConfig
  model = model_of(hf, remat=remat)
  graphdef, params = nnx.split(model)
  tx = update.make_optimizer(OptimConfig(learning_rate=1e-6, warmup_steps=0), 100)
  rng = np.random.RandomState(0)
  n = B * G
  prompt = rng.randint(3, hf["vocab_size"], (B, P))
  batch = {
      "tokens": jnp.asarray(np.concatenate([np.repeat(prompt, G, 0),
                                            rng.randint(3, hf["vocab_size"], (n, R))], 1),
                            jnp.int32),
      "attn_mask": jnp.ones((n, P + R), jnp.int32),
      "loss_mask": jnp.ones((n, R), jnp.float32), "kl_mask": jnp.ones((n, R), jnp.float32),
      "advantages": jnp.asarray(rng.normal(size=n), jnp.float32),
  }
  state = update.TrainState(params=params, opt_state=tx.init(params), step=jnp.int32(0),
                            rng=jax.random.PRNGKey(0), skipped=jnp.int32(0))
  ideal = update_flops.ideal_flops(model.config, B, P, G, R)
  times = {}
  for path, g in (("plain", None), ("shared", G)):
    step = jax.jit(functools.partial(update.train_step, graphdef=graphdef, tx=tx, rl=RLConfig(),
                                     response_len=R, num_micro=1, temperature=1.0, group_size=g))
    times[path] = timed(lambda: jax.block_until_ready(step(state, batch)), 3 if TINY else 5)
    emit(what="trainer_update", model=name, dtype="bfloat16", path=path, remat=remat, prompts=B,
         group_size=G,
         prompt_len=P, new_tokens=R, step_s=round(times[path], 4), ideal_flops=ideal,
         useful_mfu=round(ideal / times[path] / PEAK, 4),
         tokens_per_s=round(n * (P + R) / times[path]))
  emit(what="trainer_update_speedup", model=name, prompts=B, remat=remat, shared_over_plain=round(
      times["plain"] / times["shared"], 3))


if TINY:
  section(trainer_update, "smollm2-135m-shape", SMOLLM2, 2, 16, 4, 8)
  section(trainer_update, "smollm2-135m-shape", SMOLLM2, 2, 16, 4, 8, True)
else:
  section(trainer_update, "smollm2-135m-shape", SMOLLM2, 4, 256, 8, 128)  # 32 rows, 12 k tokens
  # 128 rows, 49 k tokens: the activations of a 30-layer scan do not fit without remat (114 GB).
  section(trainer_update, "smollm2-135m-shape", SMOLLM2, 16, 256, 8, 128, True)
  section(trainer_update, "qwen2.5-0.5b-shape", QWEN05, 4, 256, 8, 128)


# ------------------------------------------------------------------------------- decode tokens/s
# Bigger chunks than on CPU: fewer slot buckets to compile, and a GPU step is short next to a
# host round trip.
sampling._CHUNK = 8 if TINY else 32


def decode_rate(name, hf, B, P, R, G):
  model = model_of(hf)
  graphdef, params = nnx.split(model)
  ids = jnp.asarray(np.random.default_rng(1).integers(3, hf["vocab_size"], (B, P)), jnp.int32)
  mask = jnp.ones_like(ids)
  key = jax.random.key(0)

  def run():
    out = sampling.generate(graphdef, params, ids, mask, key, group_size=G, max_new_tokens=R,
                            temperature=1.0, pad_token_id=0)
    out.tokens.block_until_ready()
  t0 = time.perf_counter()
  run()
  first = time.perf_counter() - t0
  t = timed(run, 2)
  emit(what="decode", model=name, dtype="bfloat16", prompts=B, group_size=G, rows=B * G,
       prompt_len=P, new_tokens=R, first_call_s=round(first, 2), call_s=round(t, 4),
       tokens_per_s=round(B * G * R / t))


for G in (8, 16):
  if TINY:
    section(decode_rate, "smollm2-135m-shape", SMOLLM2, 2, 16, 16, G)
  else:
    section(decode_rate, "smollm2-135m-shape", SMOLLM2, 32, 128, 128, G)


# ------------------------------------------------------------------------------- advantages
adv = jax.jit(adv_lib.compute_advantages, static_argnames=("num_groups", "estimator", "group_size"))
copy = jax.jit(lambda x: x * 1.0)
def advantages(n, G=16):
  r = jax.device_put(np.random.default_rng(2).random(n).astype(np.float32))
  ids = jax.device_put(np.repeat(np.arange(n // G, dtype=np.int32), G))
  t_adv = timed(lambda: adv(r, ids, num_groups=n // G, group_size=G).block_until_ready(), 20)
  t_copy = timed(lambda: copy(r).block_until_ready(), 20)
  emit(what="advantages", n=n, group_size=G, kernel_ms=round(t_adv * 1e3, 4),
       copy_ms=round(t_copy * 1e3, 4), ratio=round(t_adv / t_copy, 2))


for n in ((10**4, 10**5) if TINY else (10**6, 10**7)):
  section(advantages, n)


# ------------------------------------------------------------------------------- memory
stats = dev.memory_stats() or {}
emit(what="peak_memory", peak_bytes_in_use=stats.get("peak_bytes_in_use"),
     bytes_limit=stats.get("bytes_limit"),
     peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2**30, 2))
EOF
