r"""Memory: the rollout at G in {4, 16, 64} (prefill once vs repeat), and one whole GRPO step.

  python bench/memory.py                        # compiled memory only (fast, no execution)
  python bench/memory.py --rss                  # also run each variant once in a subprocess
  python bench/memory.py --grpo-step [--trl]    # peak RSS of one GRPO step on SmolLM2-135M

--grpo-step: one step of `train.run` with configs/default.py and only the setting of issue 15
(SmolLM2-135M-Instruct, the built-in `arithmetic` task with the chat template, 8 prompts x G = 8,
prompt bucket 128, 96 new tokens; every memory-related field at its default, so the update's
micro-batch comes from `update.plan_update`) in a fresh subprocess; prints its peak RSS
(VmHWM: this program's own peak) and the plan line. `--trl` also runs one step of TRL's GRPOTrainer on the same model
folder and settings (64 completions per step, per_device_train_batch_size = 64, no gradient
accumulation or checkpointing: TRL's defaults otherwise) with fixed 128-token prompts.

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


def peak_rss_mb() -> float:
  """This process's peak resident memory in MiB.

  Linux's VmHWM belongs to the address space an `exec` creates, so it counts this program only;
  `getrusage`'s ru_maxrss survives `exec` and starts at the RSS of the process that forked us (a
  pytest worker holding a real model: seen as 12 GB for a step that peaks at 7.6 GB alone).
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024



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

  import jax
  import numpy as np
  from flax import nnx

  from grpo_jax import groups, sampling
  from grpo_jax.models import Decoder

  config = model_config(args)
  graphdef, params = nnx.split(Decoder(config, rngs=nnx.Rngs(0)))
  base = peak_rss_mb()
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
  return {"peak_rss_mb": peak_rss_mb(),
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


def grpo_step_overrides(model_dir: str, workdir: str) -> list[str]:
  """The issue-15 setting as command-line overrides of configs/default.py."""
  return [f"--config.model.path={model_dir}", "--config.data.source=builtin:arithmetic",
          "--config.data.use_chat_template=True", "--config.data.max_prompt_len=128",
          "--config.data.length_buckets=(128,)", "--config.data.batch_size=8",
          "--config.data.eval_split=", "--config.rewards=(('arithmetic', 1.0, {}),)",
          "--config.rollout.group_size=8", "--config.rollout.max_new_tokens=96",
          "--config.optim.learning_rate=1e-6", "--config.train.num_steps=1",
          "--config.train.eval_every=0", "--config.train.export_every=0",
          "--config.train.checkpoint_every=0", "--config.train.progress_bar=False"]


def grpo_step_worker(args) -> dict:
  """One GRPO step of `train.run` in this process; its peak RSS and the update plan."""
  import tempfile
  import time

  import jax
  from absl import logging

  from grpo_jax import config as config_lib
  from grpo_jax import train

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  lines = []
  logging.get_absl_handler().setFormatter(None)
  logging.set_verbosity(logging.INFO)

  class Grab(logging.logging.Handler):
    def emit(self, record):
      lines.append(record.getMessage())
  logging.get_absl_logger().addHandler(Grab())
  with tempfile.TemporaryDirectory() as workdir:
    cfg = config_lib.load_config(os.path.join(repo, "configs", "default.py"),
                                 *grpo_step_overrides(args.model_dir, workdir))
    run = config_lib.resolve(cfg, num_devices=jax.device_count())
    t0 = time.perf_counter()
    metrics = train.run(run, workdir)
    seconds = time.perf_counter() - t0
  plan = [l for l in lines if l.startswith("update: micro-batch")]
  return {"impl": "grpo_jax", "peak_rss_mb": peak_rss_mb(), "plan": plan[0] if plan else "",
          "seconds_incl_compile": seconds,
          "reward_mean": metrics.get("reward/mean")}


def trl_step_worker(args) -> dict:
  """One GRPOTrainer step on the same folder and settings; its peak RSS."""
  import tempfile
  import time

  import torch
  import transformers

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import vs_trl

  torch.manual_seed(0)
  ns = argparse.Namespace(path=args.model_dir, batch=8, group=8, new_tokens=96, prompt_len=128,
                          warmup=0, steps=1, natural=False)
  tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir)
  prompts = vs_trl.make_prompts(8, 128, tokenizer)
  with tempfile.TemporaryDirectory() as out_dir:
    trainer = vs_trl.make_trl_trainer(ns, out_dir, prompts, 8)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
  return {"impl": f"TRL {__import__('trl').__version__} GRPOTrainer",
          "peak_rss_mb": peak_rss_mb(),
          "seconds_incl_compile": seconds}


def spawn_grpo_step(model_dir: str, trl: bool = False) -> dict:
  """Runs one GRPO step (ours, or TRL's) in a fresh subprocess; returns its report."""
  cmd = [sys.executable, os.path.abspath(__file__), "--step-worker", "trl" if trl else "jax",
         "--model-dir", model_dir]
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # One CPU device, as a user runs it.
  env["JAX_PLATFORMS"] = "cpu"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
  res = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if res.returncode:
    raise RuntimeError(f"grpo step worker failed:\n{res.stderr[-4000:]}")
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
  p.add_argument("--grpo-step", action="store_true", help="peak RSS of one GRPO step (SmolLM2)")
  p.add_argument("--trl", action="store_true", help="with --grpo-step: TRL's too")
  p.add_argument("--no-ours", action="store_true", help="with --grpo-step --trl: TRL's only")
  p.add_argument("--model-dir", default="", help="SmolLM2-135M-Instruct folder (default: cached)")
  p.add_argument("--step-worker", choices=("jax", "trl"))
  args = p.parse_args()
  if args.worker:
    print(json.dumps(rss_worker(args)))
    return
  if args.step_worker:
    worker = grpo_step_worker if args.step_worker == "jax" else trl_step_worker
    print(json.dumps(worker(args)))
    return
  if args.grpo_step:
    model_dir = args.model_dir
    if not model_dir:
      try:
        from grpo_jax.testing import real_model
        model_dir = real_model.smollm2_dir()
      except ImportError:  # Until grpo_jax.testing.real_model lands: the cached folder.
        model_dir = os.path.expanduser("~/.cache/grpo_jax/SmolLM2-135M-Instruct")
    rows = ([] if args.no_ours else [spawn_grpo_step(model_dir)]) + (
        [spawn_grpo_step(model_dir, trl=True)] if args.trl else [])
    for r in rows:
      print(json.dumps(r), flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
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
