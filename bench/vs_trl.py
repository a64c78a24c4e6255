r"""End-to-end GRPO step time: grpo_jax against TRL's `GRPOTrainer` and Tunix's `GRPOLearner`.

  python bench/vs_trl.py                          # B=4 prompts, G=8, P=32, R=32, 2 rounds
  python bench/vs_trl.py --group 16 --rounds 3 --steps 6
  # The real model (SmolLM2-135M-Instruct folder), issue 18's two settings, all three trainers:
  python bench/vs_trl.py --real --impls jax,trl,tunix --batch 4 --group 4 --prompt-len 96 \
      --new-tokens 48 --steps 2 --warmup 1 --rounds 2
  python bench/vs_trl.py --real --impls jax,trl,tunix --batch 2 --group 8 --prompt-len 256 \
      --new-tokens 128 --natural --steps 2 --warmup 1 --rounds 2
  # A Qwen2.5-0.5B-shaped random model (494 M parameters; forced lengths), micro-batches of a group:
  python bench/vs_trl.py --shape qwen2.5-0.5b --impls jax,trl,tunix --batch 1 --group 8 \
      --prompt-len 256 --new-tokens 64 --steps 1 --warmup 1 --warmup-trl 0 --rounds 2 \
      --tunix-micro 1 --trl-micro 8

`--real` loads the cached SmolLM2-135M-Instruct folder (its weights and tokenizer) in every
worker instead of writing a random model; `--model-path DIR` any HF folder. `--natural` lets
responses stop at the tokenizer's EOS (ours: the trainer's stop tokens; TRL: no
`min_new_tokens`; Tunix: its sampler's EOS), R becomes the cap: lengths are the model's own, so
the frameworks generate different numbers of tokens (the table reports them per step).

`--impls` picks the workers and their order in each round (jax first: it writes the parity batch).
Tunix (`google-tunix` 0.1.7, JAX) runs in its own virtual environment, never in the CI one
(`--tunix-python`, default /work/venvs/tunix/bin/python, or $TUNIX_PYTHON), made with
  python3 -m venv /work/venvs/tunix
  /work/venvs/tunix/bin/pip install -c constraints.txt jax flax optax orbax-checkpoint \
      transformers safetensors numpy
  /work/venvs/tunix/bin/pip install --no-deps google-tunix==0.1.7
  /work/venvs/tunix/bin/pip install -c constraints.txt google-metrax jaxtyping sentencepiece \
      perfetto pandas pillow jinja2
(same jax/flax pins as ours; its declared safetensors<0.8 is not needed for this path). The
Tunix worker builds its Llama3 model from the same safetensors (`llama3.params.
create_model_from_safe_tensors`, tied embeddings, float32), one `RLCluster` with actor, rollout
and reference on one CPU device (colocated: the rollout shares the actor's weights, no sync, no
reference model at beta 0), the vanilla rollout engine (its `Sampler`: KV cache of P + R slots,
every prompt repeated G times and prefilled G times) and `GRPOLearner` with
`loss_agg_mode="token-mean"`, one mini-batch = one micro-batch = the B prompts (one optimizer
step per rollout, B*G rows at once). Differences that remain: Tunix's advantages divide by
std + 1e-6 (ours and TRL's 1e-4); its completion mask ends before the EOS (pad = EOS for
SmolLM2) where ours and TRL's include it; its forced-length mode is a stop id outside the
vocabulary. Two fixes make it run the same model: its Llama3 attention ignores the config's
rope_theta (always 1e6; SmolLM2's is 1e5), so the worker binds the config's value into
`apply_rope`; and its sampler prepends the tokenizer's BOS to every prompt, so the worker hands it
a tokenizer without one (our prompts and TRL's have none).

What is compared (without `--real`). One small Qwen2-shaped decoder (q/k/v bias, tied embeddings,
GQA) with random weights is built with grpo_jax and written with `grpo_jax.models.save_pretrained`,
together with the built-in tiny tokenizer, into one folder; both trainers load that folder (ours
through `train.init_state` with `model.path=<folder>`, TRL through
`AutoModelForCausalLM.from_pretrained`). Both then run GRPO steps on the same B fixed prompts
(equal token lengths, so nobody pads), G responses per prompt of exactly R tokens (ours: no stop
token; TRL: `min_new_tokens=R`), temperature 1 with top-k / top-p off, the same trivial reward
function (below), group-normalised advantages (r - mean) / (std + 1e-4) with the unbiased std (TRL
`scale_rewards="group"`), the token-mean clipped surrogate over the whole batch (TRL
`loss_type="dapo"`, ours `agg_mode="token-mean"`), KL beta = 0, one epoch and one minibatch per
step (on-policy: both skip the old-policy forward), AdamW (lr 1e-5 constant, no warm-up, betas
0.9/0.999, eps 1e-8, no weight decay, global-norm clip 1.0), float32, no gradient checkpointing,
one optimizer step per rollout. TRL runs with `use_vllm=False` (transformers `generate`), on CPU.

How it is timed. Each framework runs in its own subprocess (their thread pools would fight) with
the same thread count (`--threads`: torch.set_num_threads, OMP/MKL threads; XLA:CPU's pool is the
process's CPU count, which `os.sched_setaffinity` pins to the same number of cores). Rounds
alternate jax, trl, tunix, jax, trl, tunix, ... so a change in the machine's load hits all. In each
worker the first `--warmup` steps (our compiles, torch's first-call costs) are dropped, then
`--steps` steps are timed; the report gives the median over all rounds. The split:
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
`_compute_loss` on the same batch under the same weights before training, the Tunix worker its
`common.compute_per_token_logps`, and the report gives the largest differences
(tests/test_bench_parity.py checks the TRL side on a tiny model).

Tunix's phases: generation = `RLCluster.generate` (tokenise, sample, detokenise); scoring = the
rest of `GRPOLearner._generate_and_compute_advantage` (masks, rewards, advantages); update = the
rest of its global step (the jitted train step over the B*G rows + AdamW), with a block on the
actor's weights at the end of each step.

The reward (shared, pure Python): the fraction of completion characters that are digits, so
groups have spread and the advantages are not all zero.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

LR = 1e-5
ADV_EPS = 1e-4  # TRL's (r - mean) / (std + 1e-4).



def _phase_timer(phase: dict, name: str, fn):
  """`fn` wrapped to add its wall time to phase[name] (TRL and Tunix return host data: synced)."""
  def wrapper(*a, **k):
    t = time.perf_counter()
    try:
      return fn(*a, **k)
    finally:
      phase[name] += time.perf_counter() - t
  return wrapper

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
  """This process's peak RSS (VmHWM: ru_maxrss would carry the forking parent's peak)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
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
  # Micro-batches of --trl-micro rows (gradient accumulation); the rollout stays one batch of n
  # rows and one optimizer step (steps_per_generation = the accumulation count).
  micro = getattr(args, "trl_micro", 0) or n
  if n % micro:
    raise ValueError(f"--trl-micro: expected a divisor of B*G = {n}, got {micro}")
  return trl.GRPOConfig(
      output_dir=output_dir, report_to="none", save_strategy="no", logging_steps=10**6,
      disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
      seed=0, data_seed=0, shuffle_dataset=False, dataloader_num_workers=0,
      per_device_train_batch_size=micro, gradient_accumulation_steps=n // micro,
      steps_per_generation=n // micro,
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

    timed = functools.partial(_phase_timer, phase)
    generate = timed("generation", trainer._generate)

    def counted_generate(*a, **k):
      out = generate(*a, **k)
      phase["tokens"] = sum(len(ids) for ids in out[1])  # completion_ids (EOS included).
      return out

    trainer._generate = counted_generate
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
                        "update": total - phase["gen_and_score"], "total": total,
                        "tokens": phase.get("tokens", 0)})

    trainer.add_callback(StepTimer())
    trainer.train()
  return {"records": records, "peak_rss_mb": _peak_rss_mb(), "parity": parity,
          "torch_threads": torch.get_num_threads(), "cores": len(os.sched_getaffinity(0)),
          "trl": trl.__version__, "torch": torch.__version__}


# ---------------------------------------------------------------------------------------- Tunix


class _PlainTokenizer:
  """The HF tokenizer for Tunix without the BOS it would prepend (our prompts have none).

  Tunix's sampler prepends `bos_id()` to every prompt when it is truthy; SmolLM2's BOS is
  `<|im_start|>`, which the other two workers do not see. Returning None keeps the prompts equal.
  """

  def __init__(self, tok, eos_id: int | None):
    self._tok = tok
    self._eos = eos_id

  def encode(self, text, **kwargs):
    del kwargs
    return self._tok(str(text), add_special_tokens=False)["input_ids"]

  def decode(self, ids, **kwargs):
    return self._tok.decode(ids, **kwargs)

  def bos_id(self):
    return None

  def eos_id(self):
    return self._tok.eos_token_id if self._eos is None else self._eos

  def pad_id(self):
    return self._tok.pad_token_id


def tunix_model_config(path: str):
  """Tunix's Llama3 config from the HF config.json (SmolLM2 is a Llama with tied embeddings)."""
  from tunix.models.llama3 import model as llama_lib
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  if hf.get("model_type") != "llama":
    raise ValueError(f"--worker tunix: only Llama-architecture folders load, got "
                     f"model_type={hf.get('model_type')!r} in {path}/config.json")
  rope = hf.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default":
    raise ValueError(f"--worker tunix: Tunix's Llama3 has plain RoPE, {path} has {rope}")
  return llama_lib.ModelConfig(
      num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
      embed_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
      num_heads=hf["num_attention_heads"], head_dim=hf.get("head_dim") or (
          hf["hidden_size"] // hf["num_attention_heads"]),
      num_kv_heads=hf["num_key_value_heads"],
      rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
      norm_eps=hf["rms_norm_eps"], weight_tying=bool(hf.get("tie_word_embeddings")))


def tunix_parity(model, tokenizer, path: str) -> dict:
  """Tunix's per-token log-probs of our first rollout batch under the same initial weights."""
  import jax.numpy as jnp
  from flax import nnx
  from tunix.rl import common
  b = np.load(path)
  P = int(b["prompt_len"])
  tokens = b["tokens"].astype(np.int32)
  pad = tokenizer.pad_id()
  completion = np.where(b["attn_mask"][:, P:] > 0, tokens[:, P:], pad)
  graphdef, state = nnx.split(model)
  logp = common.compute_per_token_logps(
      graphdef, state, prompt_tokens=jnp.asarray(tokens[:, :P]),
      completion_tokens=jnp.asarray(completion), pad_id=pad, eos_id=tokenizer.eos_id(),
      stop_gradient=True)
  # Tunix masks from the first EOS on (its completion mask is ids != pad, pad = EOS here).
  mask = (b["loss_mask"] > 0) & (completion != pad)
  return {"logp_max_abs_diff": float(np.abs(np.asarray(logp) - b["logp"])[mask].max())}


def worker_tunix(args) -> dict:
  import jax
  import optax
  import transformers
  from flax import nnx
  from tunix.models.llama3 import params as llama_params
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl.grpo import grpo_learner
  from tunix.rl.rollout import base_rollout

  import importlib.metadata
  hf_tok = transformers.AutoTokenizer.from_pretrained(args.path)
  prompts = make_prompts(args.batch, args.prompt_len, hf_tok)
  # Forced lengths: a stop id outside the vocabulary, so every response runs R tokens
  # (ours: no stop token, TRL: min_new_tokens=R).
  eos = None if args.natural else hf_tok.vocab_size + len(hf_tok) + 1
  tokenizer = _PlainTokenizer(hf_tok, eos)
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)

  import jax.numpy as jnp
  from tunix.models.llama3 import model as llama_lib
  config = tunix_model_config(args.path)
  # Tunix's Llama3 attention calls `apply_rope(x, pos, head_dim=...)` without the config's
  # rope_theta, so every model runs at the default theta 1e6 (0.1.7 and its main of 2026-08).
  # SmolLM2's is 1e5: unpatched, its log-probs differ from transformers' by up to 1.3 nats.
  llama_lib.apply_rope = functools.partial(llama_lib.apply_rope, rope_theta=config.rope_theta)
  model = llama_params.create_model_from_safe_tensors(args.path, config, mesh,
                                                      dtype=jnp.float32)
  parity = tunix_parity(model, tokenizer, args.parity_in) if args.parity_in else None
  total_steps = args.warmup + args.steps
  optimizer = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))
  rollout = base_rollout.RolloutConfig(
      max_tokens_to_generate=args.new_tokens, max_prompt_length=args.prompt_len,
      kv_cache_size=args.prompt_len + args.new_tokens, temperature=1.0, top_p=1.0, top_k=None,
      eos_tokens=None if args.natural else [eos], data_type=jnp.float32)
  cluster_config = rl_cluster_lib.ClusterConfig(
      role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                    rl_cluster_lib.Role.ROLLOUT: mesh},
      rollout_engine="vanilla", offload_to_cpu=False,
      training_config=rl_cluster_lib.RLTrainingConfig(
          actor_optimizer=optimizer, eval_every_n_steps=10**9, max_steps=total_steps,
          mini_batch_size=args.batch,
          # Gradient accumulation over micro-batches of whole groups (ours: `update.plan_update`
          # picks one group per micro-batch on this setting); the rollout stays one call.
          train_micro_batch_size=getattr(args, "tunix_micro", 0) or args.batch,
          rollout_micro_batch_size=args.batch, compute_logps_micro_batch_size=args.batch),
      rollout_config=rollout)
  cluster = rl_cluster_lib.RLCluster(actor=model, reference=None, tokenizer=tokenizer,
                                     cluster_config=cluster_config)
  algo = grpo_learner.GRPOConfig(
      num_generations=args.group, num_iterations=1, beta=0.0, epsilon=0.2,
      loss_agg_mode="token-mean")
  learner = grpo_learner.GRPOLearner(rl_cluster=cluster, algo_config=algo,
                                     reward_fns=[digit_fraction_reward])

  phase = {"generation": 0.0, "gen_and_score": 0.0}
  records = []

  timed = functools.partial(_phase_timer, phase)
  generate = timed("generation", cluster.generate)

  def counted_generate(*a, **k):
    out = generate(*a, **k)
    phase["tokens"] = sum(len(t) for t in out.tokens)  # Up to the first EOS (not counted).
    return out

  cluster.generate = counted_generate
  learner._generate_and_compute_advantage = timed("gen_and_score",
                                                  learner._generate_and_compute_advantage)
  run_global_step = learner._run_global_step

  def timed_step(*a, **k):
    phase["generation"] = phase["gen_and_score"] = 0.0
    t0 = time.perf_counter()
    out = run_global_step(*a, **k)
    jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
    total = time.perf_counter() - t0
    records.append({"step": len(records), "generation": phase["generation"],
                    "scoring": phase["gen_and_score"] - phase["generation"],
                    "update": total - phase["gen_and_score"], "total": total,
                    "tokens": phase.get("tokens", 0)})
    return out

  learner._run_global_step = timed_step
  # Batches as numpy arrays, the way its grain pipelines deliver them (lists get repeated
  # element-wise by its tree_map).
  learner.train([{"prompts": np.array(prompts)} for _ in range(total_steps)])
  return {"records": records, "peak_rss_mb": _peak_rss_mb(), "parity": parity,
          "cores": len(os.sched_getaffinity(0)), "jax": jax.__version__,
          "tunix": importlib.metadata.version("google-tunix")}


# ---------------------------------------------------------------------------------------- parent


def write_model(args) -> dict:
  """The shared model + tokenizer folder: grpo_jax weights, written for transformers."""
  import jax
  import transformers
  from flax import nnx

  from grpo_jax.models import Decoder, ModelConfig, save_pretrained
  from grpo_jax.testing import tokenizer as tiny_tok

  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_tok.default_tokenizer_dir())
  if args.shape == "qwen2.5-0.5b":
    # Qwen2.5-0.5B's sizes (24 layers, E = 896, MLP 4864, 14 q / 2 kv heads of 64, tied
    # 151,936-row embedding) as a Llama (no q/k/v bias: 27.6 K of 494 M parameters), so that
    # Tunix's Llama3 loader reads it too. Its vocabulary is the real model's: the LM head is 28 %
    # of the parameters. The tiny tokenizer's 180 ids write the prompts; the ids the random model
    # samples beyond them decode to nothing (every trainer's reward sees the same kind of text).
    config = ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_layers=args.layers or 24, num_heads=14, num_kv_heads=2, head_dim=64,
                         rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         attention_bias=False, model_type="llama", max_position_embeddings=32768)
  else:
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=args.hidden,
                         intermediate_size=4 * args.hidden, num_layers=args.layers or 4,
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


def _safetensors_params(path: str) -> int:
  """Parameter count from the safetensors headers (no framework needed)."""
  import glob
  import struct
  n = 0
  for name in glob.glob(os.path.join(path, "*.safetensors")):
    with open(name, "rb") as f:
      header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    n += sum(int(np.prod(v["shape"])) for k, v in header.items() if k != "__metadata__")
  return n


def _warmup(args, kind: str) -> int:
  """Untimed steps of a worker: --warmup-trl for TRL (no compile: its first step is no slower)."""
  if kind == "trl" and args.warmup_trl is not None:
    return args.warmup_trl
  return args.warmup


def _spawn(kind: str, args, extra: list[str]) -> dict:
  python = args.tunix_python if kind == "tunix" else sys.executable
  cmd = [python, os.path.abspath(__file__), "--worker", kind, "--path", args.path,
         "--batch", str(args.batch), "--group", str(args.group),
         "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
         "--steps", str(args.steps), "--warmup", str(_warmup(args, kind)),
         "--threads", str(args.threads), "--tunix-micro", str(args.tunix_micro),
         "--trl-micro", str(args.trl_micro)] + (
             ["--natural"] if args.natural else []) + extra
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # One CPU device, not the test suite's eight.
  env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
  if args.threads:
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
  t = time.perf_counter()
  if kind == "tunix":
    env.pop("PYTHONPATH", None)  # Its own venv: nothing of ours or of the CI venv.
  res = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if res.returncode == -signal.SIGKILL:
    # The kernel's OOM killer (or a person): a result, not a crash of the benchmark. The other
    # workers go on; the table says which one never finished.
    return {"killed_after_s": time.perf_counter() - t, "records": []}
  if res.returncode:
    raise RuntimeError(f"{kind} worker failed:\n{res.stderr[-6000:]}")
  out = json.loads(res.stdout.strip().splitlines()[-1])
  out["process_s"] = time.perf_counter() - t
  return out


def summarise(results: dict[str, list[dict]], warmup) -> dict[str, dict[str, float]]:
  """Median of each phase over every timed step of every round (`warmup`: int or per name)."""
  out = {}
  for name, runs in results.items():
    w = warmup[name] if isinstance(warmup, dict) else warmup
    timed = [r for run in runs for r in run["records"][w:]]
    out[name] = {k: statistics.median(r[k] for r in timed)
                 for k in ("generation", "scoring", "update", "total")}
    out[name]["n"] = len(timed)
    out[name]["tokens"] = statistics.mean(r.get("tokens", 0) for r in timed)
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
  p.add_argument("--warmup-trl", type=int, default=None,
                 help="untimed first steps of the TRL worker (default: --warmup)")
  p.add_argument("--rounds", type=int, default=2, help="jax/trl worker pairs, alternated")
  p.add_argument("--threads", type=int, default=2, help="threads/cores per worker (0: all)")
  p.add_argument("--layers", type=int, default=0, help="layers of the random model (0: 4, or "
                 "the --shape's)")
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--shape", choices=["small", "qwen2.5-0.5b"], default="small",
                 help="the random model: small (--layers/--hidden, Qwen2-like) or Qwen2.5-0.5B's "
                 "sizes")
  p.add_argument("--json", help="write the raw results here")
  p.add_argument("--real", action="store_true", help="use SmolLM2-135M-Instruct (cached folder)")
  p.add_argument("--model-path", default=None, help="use this HF model folder")
  p.add_argument("--natural", action="store_true", help="stop at EOS; R is the cap")
  # Internal: one worker.
  p.add_argument("--impls", default="jax,trl",
                  help="workers per round, in order: jax, trl, tunix (comma-separated)")
  p.add_argument("--tunix-python", default=os.environ.get("TUNIX_PYTHON",
                                                          "/work/venvs/tunix/bin/python"),
                 help="python of the separate venv with google-tunix (for --impls ...,tunix)")
  p.add_argument("--from-log", help="print the table of a run's log instead (pass its "
                 "--warmup and settings; rounds are counted from the log)")
  p.add_argument("--tunix-micro", type=int, default=0,
                 help="prompts per Tunix training micro-batch (0: all B at once)")
  p.add_argument("--trl-micro", type=int, default=0,
                 help="rows per TRL training micro-batch (0: all B*G at once)")
  p.add_argument("--worker", choices=["jax", "trl", "tunix"])
  p.add_argument("--path")
  p.add_argument("--parity-out")
  p.add_argument("--parity-in")
  args = p.parse_args()

  if args.worker:
    _pin_threads(args.threads)
    result = {"jax": worker_jax, "trl": worker_trl, "tunix": worker_tunix}[args.worker](args)
    print(json.dumps(result))
    return

  if args.from_log:
    from_log(args)
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
              "vocab": hf["vocab_size"], "params": _safetensors_params(args.path)}
    else:
      args.path = os.path.join(tmp, "model")
      info = write_model(args)
    print(json.dumps({"model": info}), flush=True)
    parity_file = os.path.join(tmp, "parity.npz")
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    if impls[0] != "jax":  # Only the jax worker writes the parity batch.
      print(f"no parity check: --impls {args.impls} does not start with jax", flush=True)
    names = {"jax": "grpo_jax", "trl": "trl", "tunix": "tunix"}
    results = {names[k]: [] for k in impls}
    parity, killed = {}, {}
    for rnd in range(args.rounds):
      for kind in impls:
        extra = []
        if rnd == 0 and impls[0] == "jax":
          extra = ["--parity-out" if kind == "jax" else "--parity-in", parity_file]
        r = _spawn(kind, args, extra)
        if "killed_after_s" in r:
          print(json.dumps({"round": rnd, "impl": names[kind], "killed_after_s":
                            round(r["killed_after_s"], 1)}), flush=True)
          killed.setdefault(names[kind], []).append(round(r["killed_after_s"], 1))
          continue
        results[names[kind]].append(r)
        if r.get("parity"):
          parity[names[kind]] = r["parity"]
        print(json.dumps({"round": rnd, "impl": names[kind], "peak_rss_mb": r["peak_rss_mb"],
                          "parity": r.get("parity"), "records": r["records"]}), flush=True)
  results = {k: v for k, v in results.items() if v}
  report(args, info, results, parity)
  for name, times in killed.items():
    print(f"{name}: killed (SIGKILL: the OOM killer, see `dmesg`) after {times} s")


def from_log(args) -> None:
  """The table from the per-round lines of a run's log (a run stopped before its last round)."""
  results, parity, info = {}, {}, {"params": 0}
  with open(args.from_log) as f:
    for line in f:
      if not line.startswith("{"):
        continue
      rec = json.loads(line)
      if "model" in rec:
        info = rec["model"]
      elif "round" in rec and "records" in rec:
        results.setdefault(rec["impl"], []).append(rec)
        if rec.get("parity"):
          parity[rec["impl"]] = rec["parity"]
  args.rounds = max(len(v) for v in results.values())
  report(args, info, results, parity)


def report(args, info: dict, results: dict, parity: dict) -> None:
  summary = summarise(results, {name: _warmup(args, name) for name in results})
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "model": info, "summary": summary, "parity": parity,
                 "raw": results}, f, indent=1)
  ours = summary.get("grpo_jax") or next(iter(summary.values()))
  print(f"\nB={args.batch} G={args.group} P={args.prompt_len} R={args.new_tokens} "
        f"natural={args.natural} model={info.get('path', 'random')} "
        f"params={info['params']:,} threads={args.threads} rounds={args.rounds} "
        f"timed steps per impl={ours['n']}")
  print("| impl | step (s) | generation (s) | scoring (s) | update (s) | first step (s) | "
        "step min–max (s) | peak RSS (MB) | generated tokens per step |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name, s in summary.items():
    print(f"| {name} | {s['total']:.3f} | {s['generation']:.3f} | {s['scoring']:.4f} | "
          f"{s['update']:.3f} | {s['first_step']:.2f} | {s['total_spread'][0]:.2f}–"
          f"{s['total_spread'][1]:.2f} | {s['peak_rss_mb']:.0f} | {s['tokens']:.0f} |")
  for name, s in summary.items():
    if name != "grpo_jax" and "grpo_jax" in summary:
      print(f"| {name} / grpo_jax | {s['total'] / ours['total']:.2f}× | "
            f"{s['generation'] / ours['generation']:.2f}× | "
            f"{s['scoring'] / ours['scoring']:.1f}× | {s['update'] / ours['update']:.2f}× "
            f"| | | {s['peak_rss_mb'] / ours['peak_rss_mb']:.2f}× | |")
  print("parity (first batch, initial weights):", json.dumps(parity))


if __name__ == "__main__":
  main()
