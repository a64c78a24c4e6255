r"""End-to-end GRPO step time: grpo_jax against TRL's `GRPOTrainer`, same model, data and settings.

  python bench/vs_trl.py                          # B=4 prompts, G=8, P=32, R=32, 2 rounds
  python bench/vs_trl.py --group 16 --rounds 3 --steps 6
  # The real model (SmolLM2-135M-Instruct folder), issue 18's two settings:
  python bench/vs_trl.py --real --batch 4 --group 4 --prompt-len 96 --new-tokens 48
  python bench/vs_trl.py --real --batch 4 --group 8 --prompt-len 256 --new-tokens 128 --natural

`--real` loads the cached SmolLM2-135M-Instruct folder (its weights and tokenizer) in both
workers instead of writing a random model; `--model-path DIR` any HF folder. `--natural` lets
responses stop at the tokenizer's EOS (ours: the trainer's stop tokens; TRL: no
`min_new_tokens`), R becomes the cap: lengths are the model's own.

What is compared. One small Qwen2-shaped decoder (q/k/v bias, tied embeddings, GQA) with random
weights is built with grpo_jax and written with `grpo_jax.models.save_pretrained`, together with
the built-in tiny tokenizer, into one folder; both trainers load that folder (ours through
`train.init_state` with `model.path=<folder>`, TRL through `AutoModelForCausalLM.from_pretrained`).
Both then run GRPO steps on the same B fixed prompts (equal token lengths, so nobody pads), G
responses per prompt of exactly R tokens (ours: no stop token; TRL: `min_new_tokens=R`),
temperature 1 with top-k / top-p off, the same trivial reward function (below), group-normalised
advantages (r - mean) / (std + 1e-4) with the unbiased std (TRL `scale_rewards="group"`), the
token-mean clipped surrogate over the whole batch (TRL `loss_type="dapo"`, ours
`agg_mode="token-mean"`), KL beta = 0, one epoch and one minibatch per step (on-policy: both skip
the old-policy forward), AdamW (lr 1e-5 constant, no warm-up, betas 0.9/0.999, eps 1e-8, no weight
decay, global-norm clip 1.0), float32, no gradient checkpointing, one optimizer step per rollout.
TRL runs with `use_vllm=False` (transformers `generate`), on CPU.

How it is timed. Each framework runs in its own subprocess (their thread pools would fight) with the
same thread count (`--threads`: torch.set_num_threads, OMP/MKL threads; XLA:CPU's pool is the
process's CPU count, which `os.sched_setaffinity` pins to the same number of cores). Rounds
alternate jax, trl, jax, trl, ... so a change in the machine's load hits both. In each worker the
first `--warmup` steps (our compiles, torch's first-call costs) are dropped, then `--steps` steps
are timed; the report gives the median over all rounds. The split:
  generation  ours: `sampling.generate` until the tokens are on the host.
              TRL: `GRPOTrainer._generate` (tokenise prompts, transformers generate, unpad).
  scoring     ours: decode text, reward function, `train.assemble_batch` (advantages, masks).
              TRL: the rest of `_generate_and_score_completions` (padding, rewards, advantages).
  update      ours: `update.train_step` (forward + backward + AdamW) + `finish_step`.
              TRL: the rest of the trainer step (loss forward + backward + optimizer step).
Our loop drives the trainer's own jitted pieces (`train.init_state`, `train.Steps`) the way
`train.run` does, with a block at each phase boundary so the split is honest (run() itself
overlaps the end of an update with the next step's dispatch; blocking costs us, not TRL).

Parity (a benchmark of the wrong computation is worth nothing): the jax worker of the first round
writes its first rollout batch (tokens, masks, advantages) with its per-token log-probs and loss
under the initial weights; the TRL worker computes `_get_per_token_logps_and_entropies` and
`_compute_loss` on the same batch under the same weights before training, and the report gives
the largest differences (tests/test_bench_parity.py checks the same on a tiny model).

The reward (shared, pure Python): the fraction of completion characters that are digits, so
groups have spread and the advantages are not all zero.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

LR = 1e-5
ADV_EPS = 1e-4  # TRL's (r - mean) / (std + 1e-4).


def digit_fraction_reward(prompts, completions, **kwargs):
  """The shared trivial reward: fraction of the completion's characters that are digits."""
  del prompts, kwargs
  return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def make_prompts(batch: int, prompt_len: int, tokenizer) -> list[str]:
  """B prompts of exactly `prompt_len` tokens each (digits are one token each)."""
  rng = np.random.default_rng(0)
  head = "copy the digits "
  n_head = len(tokenizer(head, add_special_tokens=False)["input_ids"])
  if n_head >= prompt_len:
    raise ValueError(f"--prompt-len: expected > {n_head}, got {prompt_len}")
  prompts = [head + "".join(map(str, rng.integers(0, 10, prompt_len - n_head)))
             for _ in range(batch)]
  lengths = {len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts}
  assert lengths == {prompt_len}, lengths
  return prompts


def _pin_threads(threads: int) -> None:
  """Both workers see the same number of cores: XLA sizes its pool from the affinity mask."""
  cpus = sorted(os.sched_getaffinity(0))
  if threads and threads < len(cpus):
    os.sched_setaffinity(0, cpus[:threads])


def _peak_rss_mb() -> float:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------- ours


def jax_run_config(args):
  """The RunConfig of the comparison (configs/default.py with the shared settings)."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
  import default as default_config  # configs/default.py
  from grpo_jax.config import resolve
  c = default_config.get_config()
  c.model.path = args.path
  c.tokenizer = args.path
  c.data.batch_size = args.batch
  c.rollout.group_size = args.group
  c.rollout.max_new_tokens = args.new_tokens
  c.rollout.temperature, c.rollout.top_k, c.rollout.top_p = 1.0, 0, 1.0
  c.rl.estimator, c.rl.adv_eps, c.rl.agg_mode = "grpo", ADV_EPS, "token-mean"
  c.rl.kl_coef, c.rl.entropy_coef = 0.0, 0.0
  c.rl.clip_low = c.rl.clip_high = 0.2
  c.optim.learning_rate, c.optim.warmup_steps, c.optim.decay = LR, 0, "constant"
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
  c.optim.weight_decay, c.optim.max_grad_norm = 0.0, 1.0
  c.train.num_steps = args.warmup + args.steps
  c.train.ppo_epochs, c.train.minibatch_size, c.train.microbatch_size = 1, 0, 0
  c.train.eval_every = c.train.export_every = c.train.checkpoint_every = 0
  return resolve(c, num_devices=1)


def worker_jax(args) -> dict:
  import jax
  import jax.numpy as jnp
  import transformers

  from grpo_jax import host, sharding, train, update

  run = jax_run_config(args)
  tokenizer = transformers.AutoTokenizer.from_pretrained(args.path)
  prompts = make_prompts(args.batch, args.prompt_len, tokenizer)
  enc = tokenizer(prompts, add_special_tokens=False, return_tensors="np")
  mesh = sharding.make_mesh(run.mesh, jax.devices()[:1])
  setup, state, _ = train.init_state(run, mesh, tokenizer, workdir="")
  if not args.natural:
    setup.stop_token_ids = ()  # Every response is exactly R tokens, as TRL's min_new_tokens=R.
  steps = train.Steps(setup)
  g = run.rollout.group_size
  prompts_rep = [p for p in prompts for _ in range(g)]
  prompt_ids, prompt_mask = host.to_global(
      (enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)), mesh)
  records, parity = [], None
  for step in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
    out = steps.generate(state.params, prompt_ids, prompt_mask, jax.random.split(key)[0])
    tokens_h, mask_h = host.to_host(out.tokens), host.to_host(out.mask)
    t1 = time.perf_counter()
    texts = host.decode(tokenizer, tokens_h, mask_h)
    rewards_h = np.asarray(digit_fraction_reward(prompts_rep, texts), np.float32)
    rewards = host.to_global(rewards_h, mesh)
    batch, _ = steps.assemble(prompt_ids, prompt_mask, out.tokens, out.mask,
                              jnp.zeros_like(out.mask), rewards)
    jax.block_until_ready(batch)
    t2 = time.perf_counter()
    if step == 0 and args.parity_out:
      logp = update.response_logprobs(setup.graphdef, state.params, batch["tokens"],
                                       batch["attn_mask"], run.rollout.max_new_tokens)
      parity = {k: np.asarray(v) for k, v in batch.items()}
      parity["logp"] = np.asarray(logp)
    state, metrics = steps.train_step(state, batch)
    state = steps.finish_step(state)
    jax.block_until_ready((state, metrics))
    t3 = time.perf_counter()
    if parity is not None and step == 0:
      parity["loss"] = np.asarray(metrics["loss"])
      parity["grad_norm"] = np.asarray(metrics["grad_norm"])
      np.savez(args.parity_out, prompt_len=args.prompt_len, **parity)
    records.append({"step": step, "generation": t1 - t0, "scoring": t2 - t1, "update": t3 - t2,
                    "total": t3 - t0, "loss": float(metrics["loss"]), "tokens": int(mask_h.sum()),
                    "reward_mean": float(rewards_h.mean())})
  return {"records": records, "peak_rss_mb": _peak_rss_mb(),
          "cores": len(os.sched_getaffinity(0)), "device": jax.devices()[0].device_kind}


# ---------------------------------------------------------------------------------------- TRL


def trl_config(args, output_dir: str):
  import trl
  n = args.batch * args.group
  return trl.GRPOConfig(
      output_dir=output_dir, report_to="none", save_strategy="no", logging_steps=10**6,
      disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
      seed=0, data_seed=0, shuffle_dataset=False, dataloader_num_workers=0,
      per_device_train_batch_size=n, gradient_accumulation_steps=1, steps_per_generation=1,
      num_generations=args.group, num_iterations=1, max_steps=args.warmup + args.steps,
      max_completion_length=args.new_tokens,
      generation_kwargs={} if args.natural else {"min_new_tokens": args.new_tokens},
      temperature=1.0, top_k=0, top_p=1.0, use_vllm=False, beta=0.0, epsilon=0.2,
      loss_type="dapo", scale_rewards="group", mask_truncated_completions=False,
      learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
      adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
      pad_to_multiple_of=None)


def make_trl_trainer(args, output_dir: str, prompts: list[str], num_rows: int):
  import datasets
  import torch
  import transformers
  import trl

  tokenizer = transformers.AutoTokenizer.from_pretrained(args.path)
  model = transformers.AutoModelForCausalLM.from_pretrained(args.path, dtype=torch.float32)
  data = datasets.Dataset.from_dict({"prompt": [prompts[i % len(prompts)]
                                                for i in range(num_rows)]})
  return trl.GRPOTrainer(model=model, reward_funcs=[digit_fraction_reward],
                         args=trl_config(args, output_dir), train_dataset=data,
                         processing_class=tokenizer)


def trl_parity(trainer, path: str) -> dict:
  """TRL's log-probs and loss on our first rollout batch, under the same initial weights."""
  import torch
  b = np.load(path)
  P = int(b["prompt_len"])
  tokens, attn = torch.from_numpy(b["tokens"]).long(), torch.from_numpy(b["attn_mask"]).long()
  inputs = {"prompt_ids": tokens[:, :P], "prompt_mask": attn[:, :P],
            "completion_ids": tokens[:, P:], "completion_mask": attn[:, P:],
            "advantages": torch.from_numpy(b["advantages"]).float(),
            "num_items_in_batch": attn[:, P:].sum()}
  trainer.current_gradient_accumulation_steps = 1
  model = trainer.model
  model.train()
  logp, _, _ = trainer._get_per_token_logps_and_entropies(
      model, tokens, attn, tokens.shape[1] - P, compute_entropy=True)
  loss = trainer._compute_loss(model, inputs)
  loss.backward()
  grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()
                             if p.grad is not None))
  model.zero_grad(set_to_none=True)
  mask = b["loss_mask"] > 0
  return {"logp_max_abs_diff": float(np.abs(logp.detach().numpy() - b["logp"])[mask].max()),
          "loss_ours": float(b["loss"]), "loss_trl": float(loss.detach()),
          "grad_norm_ours": float(b["grad_norm"]), "grad_norm_trl": float(grad_norm)}


def worker_trl(args) -> dict:
  import torch
  import transformers
  import trl

  torch.set_num_threads(args.threads or os.cpu_count())
  torch.manual_seed(0)
  tokenizer = transformers.AutoTokenizer.from_pretrained(args.path)
  prompts = make_prompts(args.batch, args.prompt_len, tokenizer)
  total_steps = args.warmup + args.steps
  with tempfile.TemporaryDirectory() as out_dir:
    trainer = make_trl_trainer(args, out_dir, prompts, args.batch * total_steps)
    parity = trl_parity(trainer, args.parity_in) if args.parity_in else None

    # Phase timers: wrap the trainer's own methods on this instance.
    phase = {"generation": 0.0, "gen_and_score": 0.0}

    def timed(name, fn):
      def wrapper(*a, **k):
        t = time.perf_counter()
        try:
          return fn(*a, **k)
        finally:
          phase[name] += time.perf_counter() - t
      return wrapper

    trainer._generate = timed("generation", trainer._generate)
    trainer._generate_and_score_completions = timed("gen_and_score",
                                                    trainer._generate_and_score_completions)
    records = []

    class StepTimer(transformers.TrainerCallback):
      def on_step_begin(self, targs, tstate, control, **kw):
        phase["generation"] = phase["gen_and_score"] = 0.0
        self.t0 = time.perf_counter()

      def on_step_end(self, targs, tstate, control, **kw):
        total = time.perf_counter() - self.t0
        records.append({"step": len(records), "generation": phase["generation"],
                        "scoring": phase["gen_and_score"] - phase["generation"],
                        "update": total - phase["gen_and_score"], "total": total})

    trainer.add_callback(StepTimer())
    trainer.train()
  return {"records": records, "peak_rss_mb": _peak_rss_mb(), "parity": parity,
          "torch_threads": torch.get_num_threads(), "cores": len(os.sched_getaffinity(0)),
          "trl": trl.__version__, "torch": torch.__version__}


# ---------------------------------------------------------------------------------------- parent


def write_model(args) -> dict:
  """The shared model + tokenizer folder: grpo_jax weights, written for transformers."""
  import jax
  import transformers
  from flax import nnx

  from grpo_jax.models import Decoder, ModelConfig, save_pretrained
  from grpo_jax.testing import tokenizer as tiny_tok

  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_tok.default_tokenizer_dir())
  config = ModelConfig(vocab_size=len(tokenizer), hidden_size=args.hidden,
                       intermediate_size=4 * args.hidden, num_layers=args.layers,
                       num_heads=args.hidden // 64, num_kv_heads=max(args.hidden // 256, 1),
                       head_dim=64, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       attention_bias=True, model_type="qwen2", max_position_embeddings=4096)
  model = Decoder(config, rngs=nnx.Rngs(0))
  save_pretrained(model, args.path, hf_config_extra={
      "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
      "bos_token_id": None})
  tokenizer.save_pretrained(args.path)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
  return {"params": int(n), "vocab": config.vocab_size, "hidden": config.hidden_size,
          "layers": config.num_layers, "heads": config.num_heads, "kv_heads": config.num_kv_heads}


def _spawn(kind: str, args, extra: list[str]) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--path", args.path,
         "--batch", str(args.batch), "--group", str(args.group),
         "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
         "--steps", str(args.steps), "--warmup", str(args.warmup),
         "--threads", str(args.threads)] + (["--natural"] if args.natural else []) + extra
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # One CPU device, not the test suite's eight.
  env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
  if args.threads:
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
  t = time.perf_counter()
  res = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if res.returncode:
    raise RuntimeError(f"{kind} worker failed:\n{res.stderr[-6000:]}")
  out = json.loads(res.stdout.strip().splitlines()[-1])
  out["process_s"] = time.perf_counter() - t
  return out


def summarise(results: dict[str, list[dict]], warmup: int) -> dict[str, dict[str, float]]:
  """Median of each phase over every timed step of every round."""
  out = {}
  for name, runs in results.items():
    timed = [r for run in runs for r in run["records"][warmup:]]
    out[name] = {k: statistics.median(r[k] for r in timed)
                 for k in ("generation", "scoring", "update", "total")}
    out[name]["n"] = len(timed)
    out[name]["first_step"] = statistics.median(run["records"][0]["total"] for run in runs)
    out[name]["peak_rss_mb"] = max(run["peak_rss_mb"] for run in runs)
    out[name]["total_spread"] = (min(r["total"] for r in timed), max(r["total"] for r in timed))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=4, help="prompts B per step")
  p.add_argument("--group", type=int, default=8, help="responses G per prompt")
  p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens P")
  p.add_argument("--new-tokens", type=int, default=32, help="response tokens R")
  p.add_argument("--steps", type=int, default=5, help="timed steps per worker")
  p.add_argument("--warmup", type=int, default=2, help="untimed first steps per worker")
  p.add_argument("--rounds", type=int, default=2, help="jax/trl worker pairs, alternated")
  p.add_argument("--threads", type=int, default=2, help="threads/cores per worker (0: all)")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--json", help="write the raw results here")
  p.add_argument("--real", action="store_true", help="use SmolLM2-135M-Instruct (cached folder)")
  p.add_argument("--model-path", default=None, help="use this HF model folder")
  p.add_argument("--natural", action="store_true", help="stop at EOS; R is the cap")
  # Internal: one worker.
  p.add_argument("--worker", choices=["jax", "trl"])
  p.add_argument("--path")
  p.add_argument("--parity-out")
  p.add_argument("--parity-in")
  args = p.parse_args()

  if args.worker:
    _pin_threads(args.threads)
    result = (worker_jax if args.worker == "jax" else worker_trl)(args)
    print(json.dumps(result))
    return

  if args.real and not args.model_path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from decode_step import model_dir
    args.model_path = model_dir()
  with tempfile.TemporaryDirectory() as tmp:
    if args.model_path:
      args.path = args.model_path
      with open(os.path.join(args.path, "config.json")) as f:
        hf = json.load(f)
      info = {"path": args.path, "hidden": hf["hidden_size"], "layers": hf["num_hidden_layers"],
              "vocab": hf["vocab_size"], "params": 0}
    else:
      args.path = os.path.join(tmp, "model")
      info = write_model(args)
    print(json.dumps({"model": info}), flush=True)
    parity_file = os.path.join(tmp, "parity.npz")
    results = {"grpo_jax": [], "trl": []}
    parity = None
    for rnd in range(args.rounds):
      first = rnd == 0
      r = _spawn("jax", args, ["--parity-out", parity_file] if first else [])
      results["grpo_jax"].append(r)
      print(json.dumps({"round": rnd, "impl": "grpo_jax", "records": r["records"]}), flush=True)
      r = _spawn("trl", args, ["--parity-in", parity_file] if first else [])
      results["trl"].append(r)
      parity = parity or r["parity"]
      print(json.dumps({"round": rnd, "impl": "trl", "records": r["records"]}), flush=True)

  summary = summarise(results, args.warmup)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "model": info, "summary": summary, "parity": parity,
                 "raw": results}, f, indent=1)
  ours, trl_ = summary["grpo_jax"], summary["trl"]
  print(f"\nB={args.batch} G={args.group} P={args.prompt_len} R={args.new_tokens} "
        f"natural={args.natural} model={info.get('path', 'random')} "
        f"params={info['params']:,} threads={args.threads} rounds={args.rounds} "
        f"timed steps per impl={ours['n']}")
  print("| impl | step (s) | generation (s) | scoring (s) | update (s) | first step (s) | "
        "step min–max (s) | peak RSS (MB) |")
  print("|---|---|---|---|---|---|---|---|")
  for name, s in summary.items():
    print(f"| {name} | {s['total']:.3f} | {s['generation']:.3f} | {s['scoring']:.4f} | "
          f"{s['update']:.3f} | {s['first_step']:.2f} | {s['total_spread'][0]:.2f}–"
          f"{s['total_spread'][1]:.2f} | {s['peak_rss_mb']:.0f} |")
  print(f"| TRL / grpo_jax | {trl_['total'] / ours['total']:.1f}× | "
        f"{trl_['generation'] / ours['generation']:.1f}× | "
        f"{trl_['scoring'] / ours['scoring']:.1f}× | {trl_['update'] / ours['update']:.1f}× | | | |")
  print("parity (first batch, initial weights):", json.dumps(parity))


if __name__ == "__main__":
  main()
