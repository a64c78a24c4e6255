"""LoRA vs full fine-tuning: bytes of params+grads+AdamW (analytic), compiled step memory (0.5B,
CPU), merge time and decode-step overhead of unmerged adapters (0.5B, CPU)."""
import argparse, json, math, time
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from grpo_jax.models import Decoder, LoraConfig, LoraParam, ModelConfig, init_cache, token_logprobs, merge_lora
from grpo_jax.models.lora import TARGETS, _merged_weight_jit
from grpo_jax.testing.models import qwen2_0p5b_config

def qwen25(size):
  common = dict(vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6, attention_bias=True,
                model_type="qwen2", max_position_embeddings=32768)
  shapes = {
      "0.5B": dict(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
      "3B": dict(hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16, num_kv_heads=2, head_dim=128, tie_word_embeddings=True),
      "7B": dict(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, tie_word_embeddings=False)}
  return ModelConfig(**common, **shapes[size])

def lora_params(cfg, lora):
  e, f, h, k, d, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
  io = {"q_proj": (e, h*d), "k_proj": (e, k*d), "v_proj": (e, k*d), "o_proj": (h*d, e),
        "gate_proj": (e, f), "up_proj": (e, f), "down_proj": (f, e)}
  return L * sum(lora.rank * (i + o) for n, (i, o) in io.items() if n in lora.targets)

def analytic():
  rows = []
  for size in ("0.5B", "3B", "7B"):
    cfg = qwen25(size)
    P = cfg.num_params
    for pb, pname in ((2, "bf16"), (4, "f32")):
      # full FT: policy params + grads + AdamW mu, nu (param dtype) + a frozen reference copy.
      full = P * pb * 4 + P * pb
      for r in (16, 64):
        lora = LoraConfig(rank=r, alpha=2 * r)
        n = lora_params(cfg, lora)
        # LoRA: base (also the reference) + f32 adapters, their grads, mu, nu.
        lo = P * pb + n * 4 * 4
        rows.append((size, P, pname, r, n, full / 2**30, lo / 2**30, full / lo))
  print("| shape | params | base dtype | rank | adapter params | full FT GiB | LoRA GiB | ratio |")
  print("|---|---|---|---|---|---|---|---|")
  for s, P, pn, r, n, f, l, ratio in rows:
    print(f"| Qwen2.5-{s} | {P/1e9:.2f} B | {pn} | {r} | {n/1e6:.1f} M ({100*n/P:.2f} %) | {f:.1f} | {l:.1f} | {ratio:.1f}x |")

def train_step(graphdef, opt):
  """grad of -sum(token log-probs) w.r.t. the trainable split + the optimizer update."""
  def step(train, opt_state, frozen, ids):
    def loss(train):
      m = nnx.merge(graphdef, train, frozen)
      return -jnp.sum(token_logprobs(m, ids, jnp.ones_like(ids), chunk_size=256))
    g = jax.grad(loss)(train)
    upd, opt_state = opt.update(g, opt_state, train)
    return optax.apply_updates(train, upd), opt_state
  return step

def step_memory(batch, seq, rank, layers):
  cfg = qwen2_0p5b_config(**({"num_layers": layers} if layers else {}))
  lora = LoraConfig(rank=rank, alpha=2 * rank) if rank else None
  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), lora=lora))
  filt = LoraParam if lora else nnx.Param
  graphdef, train, frozen = nnx.split(abstract, filt, ...)
  opt = optax.adamw(1e-5)
  opt_state = jax.eval_shape(opt.init, train)
  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

  step = train_step(graphdef, opt)
  t = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(train, opt_state, frozen, ids).compile()
  ma = compiled.memory_analysis()
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  return dict(rank=rank, compile_s=round(time.perf_counter() - t, 1),
              trainable_MiB=nbytes(train) / 2**20, frozen_MiB=nbytes(frozen) / 2**20,
              opt_MiB=nbytes(opt_state) / 2**20,
              args_MiB=ma.argument_size_in_bytes / 2**20, out_MiB=ma.output_size_in_bytes / 2**20,
              alias_MiB=ma.alias_size_in_bytes / 2**20, temp_MiB=ma.temp_size_in_bytes / 2**20)

def step_time(rank, batch, seq, reps):
  cfg = qwen2_0p5b_config()
  lora = LoraConfig(rank=rank, alpha=2 * rank) if rank else None
  model = Decoder(cfg, rngs=nnx.Rngs(0), lora=lora)
  graphdef, train, frozen = nnx.split(model, LoraParam if lora else nnx.Param, ...)
  opt = optax.adamw(1e-5)
  opt_state = opt.init(train)
  ids = jnp.ones((batch, seq), jnp.int32)

  step = train_step(graphdef, opt)
  f = jax.jit(step, donate_argnums=(0, 1))
  train, opt_state = jax.block_until_ready(f(train, opt_state, frozen, ids))
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    train, opt_state = jax.block_until_ready(f(train, opt_state, frozen, ids))
    ts.append(time.perf_counter() - t)
  return dict(rank=rank, step_s=float(np.median(ts)), all=[round(x, 2) for x in ts])


def merge_and_decode(rank, batch, reps):
  cfg = qwen2_0p5b_config()
  lora = LoraConfig(rank=rank, alpha=2 * rank)
  t = time.perf_counter()
  model = Decoder(cfg, rngs=nnx.Rngs(0), lora=lora)
  for _, v in nnx.iter_graph(model):  # B != 0
    if isinstance(v, LoraParam):
      v[...] = jnp.full(v.get_value().shape, 0.01, jnp.float32)
  print("init s", round(time.perf_counter() - t, 1), flush=True)
  merged = merge_lora(model)  # compiles the 7 merge kernels
  jax.block_until_ready(jax.tree.leaves(nnx.state(merged)))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    merged = merge_lora(model)
    jax.block_until_ready(jax.tree.leaves(nnx.state(merged)))
    times.append(time.perf_counter() - t)
  out = dict(merge_s=float(np.median(times)))
  S = 64
  @jax.jit
  def decode(model, cache, tok, idx):
    return model(tok, cache=cache, cache_index=idx)

  @jax.jit
  def decode_base(model, cache, tok, idx):
    return model(tok, cache=cache, cache_index=idx, use_lora=False)

  cases = (("base (use_lora=False)", decode_base, model), ("unmerged adapters", decode, model),
           ("merged", decode, merged))
  tok = jnp.ones((batch, 1), jnp.int32)
  cache = init_cache(cfg, batch, S)
  for _, fn, m in cases:
    jax.block_until_ready(fn(m, cache, tok, jnp.int32(0)))
  ts = {name: [] for name, _, _ in cases}
  for i in range(reps):  # interleaved rounds: the shared machine's load hits all three alike
    for name, fn, m in cases:
      t = time.perf_counter()
      jax.block_until_ready(fn(m, cache, tok, jnp.int32(i + 1)))
      ts[name].append(time.perf_counter() - t)
  res = {name: float(np.median(v)) for name, v in ts.items()}
  out["decode_step_s"] = res
  return out

if __name__ == "__main__":
  p = argparse.ArgumentParser()
  p.add_argument("--part", default="all")
  p.add_argument("--layers", type=int, default=None)
  args = p.parse_args()
  if args.part in ("all", "analytic"):
    analytic()
  if args.part in ("all", "step"):
    for r in (0, 16):
      print(json.dumps(step_memory(1, 128, r, args.layers)), flush=True)
  if args.part in ("all", "steptime"):
    for r in (0, 16):
      print(json.dumps(step_time(r, 1, 128, 3)), flush=True)
  if args.part in ("all", "merge"):
    print(json.dumps(merge_and_decode(16, 8, 21)), flush=True)
