r"""`python -m grpo_jax.train --config=configs/<name>.py --workdir=DIR [--config.field=value ...]`

The one GRPO loop: data -> rollout (G responses per prompt) -> rewards (host) -> group-relative
advantages -> old / reference log-probs -> sharded policy update -> metrics, export, checkpoint.
`main` parses flags and calls `run(config, workdir)`; the pure pieces live in their own modules
(`advantages`, `losses`, `update`, `sampling`, ...) and are jitted here once, with explicit
shardings and the train state donated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from grpo_jax import advantages as adv_lib
from grpo_jax import checkpoint as ckpt_lib
from grpo_jax import groups
from grpo_jax import host
from grpo_jax import metrics as metrics_lib
from grpo_jax import sharding
from grpo_jax import update
from grpo_jax.config import ConfigError, RunConfig, resolve, user_config

# Keys split per step must not depend on how arrays are sharded: 1 device == 8 devices.
jax.config.update("jax_threefry_partitionable", True)


# ----------------------------------------------------------------------------------------------
# Set-up: tokenizer, model, mesh, state
# ----------------------------------------------------------------------------------------------


def load_tokenizer(run: RunConfig):
  import transformers
  path = run.tokenizer
  if not path:
    from grpo_jax.testing import tokenizer as tiny_tok
    path = tiny_tok.default_tokenizer_dir()
  return transformers.AutoTokenizer.from_pretrained(path)


def model_config(run: RunConfig, tokenizer):
  from grpo_jax import models
  spec = run.model
  if not spec.is_tiny:
    from grpo_jax.models import hf
    return models.config_from_hf(hf.read_hf_config(spec.path), dtype=spec.dtype,
                                 param_dtype=spec.param_dtype, remat=spec.remat,
                                 source=os.path.join(spec.path, "config.json"))
  vocab = spec.vocab_size or len(tokenizer)
  return models.ModelConfig(
      vocab_size=vocab, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
      num_layers=spec.num_layers, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
      head_dim=spec.head_dim, rope_theta=spec.rope_theta,
      tie_word_embeddings=spec.tie_word_embeddings, dtype=spec.dtype, param_dtype=spec.param_dtype,
      remat=spec.remat, max_position_embeddings=4096)


@dataclasses.dataclass
class Setup:
  """What the loop holds besides the train state: static pieces and the jitted functions."""
  run: RunConfig
  mesh: Any
  tokenizer: Any
  graphdef: Any
  tx: Any
  state_shardings: Any
  stop_token_ids: tuple[int, ...]
  ref_params: Any = None  # A copy of the initial weights, only for full fine-tuning with beta > 0.
  frozen: Any = None  # LoRA: the base weights (not trained, no optimizer state); None otherwise.
  plan: Any = None  # update.UpdatePlan: micro-batch, remat, shared prefix.

  def policy_state(self, params):
    """The whole policy state for the sampler: trained params plus frozen base weights."""
    return params if self.frozen is None else nnx.merge_state(params, self.frozen)


def init_state(run: RunConfig, mesh, tokenizer, workdir: str):
  """Builds the policy directly sharded (eval_shape -> shardings -> jit(init, out_shardings))."""
  from grpo_jax import models
  mcfg = model_config(run, tokenizer)
  total_updates = run.train.num_steps * run.train.ppo_epochs * (run.rollout_batch // run.minibatch)
  tx = update.make_optimizer(run.optim, total_updates)

  lora = run.lora if run.lora.enabled else None

  def make_model(cfg):
    return models.Decoder(cfg, rngs=nnx.Rngs(params=run.seed), lora=lora)

  # The optimizer sees only what `trainable` selects: every parameter, or with LoRA the adapters;
  # the frozen rest (the LoRA base) is held once and shared by policy, reference and sampler.
  filt = models.trainable(nnx.eval_shape(lambda: make_model(mcfg)))
  _, abstract_params, abstract_frozen = nnx.split(nnx.eval_shape(lambda: make_model(mcfg)), filt,
                                                  ...)
  plan = update_plan(run, mesh, mcfg, abstract_params, abstract_frozen)
  logging.info("%s", plan.describe(run.minibatch))
  # Remat lives in the model config (static in the graphdef): set it before building the model.
  mcfg = mcfg.replace(remat=plan.remat)
  abstract_model = nnx.eval_shape(lambda: make_model(mcfg))
  graphdef, abstract_params, abstract_frozen = nnx.split(abstract_model, filt, ...)
  param_shardings = models.state_shardings(abstract_params, mesh, sharding.TRAIN_RULES)
  frozen_shardings = models.state_shardings(abstract_frozen, mesh, sharding.TRAIN_RULES)
  if run.model.is_tiny:
    params, frozen = jax.jit(lambda: nnx.split(make_model(mcfg), filt, ...)[1:],
                             out_shardings=(param_shardings, frozen_shardings))()
  else:  # Each tensor is read straight onto its sharding: no full copy on one host.
    _, params, frozen = nnx.split(models.from_pretrained(
        run.model.path, dtype=run.model.dtype, param_dtype=run.model.param_dtype, mesh=mesh,
        rules=sharding.TRAIN_RULES, remat=plan.remat, lora=lora, lora_seed=run.seed),
        filt, ...)
  frozen = frozen if lora is not None else None

  def build_state(params):
    return update.TrainState(params=params, opt_state=tx.init(params),
                             step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(run.seed),
                             skipped=jnp.zeros((), jnp.int32))

  # Optimizer moments inherit their parameter's sharding through propagation; scalars replicate.
  state = jax.jit(build_state)(params)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)

  stop_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
  for s in run.rollout.stop_strings:
    ids = tokenizer.encode(s, add_special_tokens=False)
    if len(ids) != 1:
      raise ConfigError(f"config.rollout.stop_strings: {s!r} is {len(ids)} tokens for this "
                        f"tokenizer; each stop string must be exactly one token")
    stop_ids.add(ids[0])
  setup = Setup(run=run, mesh=mesh, tokenizer=tokenizer, graphdef=graphdef, tx=tx,
                state_shardings=state_shardings, stop_token_ids=tuple(sorted(stop_ids)),
                frozen=frozen, plan=plan)
  if run.rl.loss.kl_coef > 0 and lora is None:
    # The frozen reference policy: a copy of the initial parameters (no copy when beta = 0).
    setup.ref_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                               out_shardings=param_shardings)(state.params)
  return setup, state, abstract_state


def update_plan(run: RunConfig, mesh, mcfg, abstract_params, abstract_frozen) -> update.UpdatePlan:
  """The update's micro-batch / remat / shared-prefix plan for this run (`update.plan_update`).

  The shared prefix applies when the update's rows come in whole groups: the minibatch is a
  whole number of groups (several minibatches then shuffle whole groups, `update_policy`).
  """
  count = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))
  shape = dict(mesh.shape)
  d = run.data
  prompt_len = min([b for b in d.length_buckets if b >= d.max_prompt_len] or [d.max_prompt_len])
  grouped = run.train.shared_prefix and run.minibatch % run.rollout.group_size == 0
  budget = None
  if run.train.memory_budget_gb:
    budget = (run.train.memory_budget_gb * 2**30, "train.memory_budget_gb",
              jax.devices()[0].platform != "cpu")
  return update.plan_update(
      mcfg, minibatch=run.minibatch, prompt_len=prompt_len,
      response_len=run.rollout.max_new_tokens,
      group_size=run.rollout.group_size if grouped else None,
      batch_div=shape.get("data", 1) * shape.get("fsdp", 1),
      model_div=shape.get("fsdp", 1) * shape.get("tensor", 1),
      trainable_params=count(abstract_params),
      frozen_params=count(abstract_frozen) if run.lora.enabled else 0,
      microbatch=run.train.microbatch_size, force_remat=run.model.remat, budget=budget,
      lm_head_chunk=run.train.lm_head_chunk)


# ----------------------------------------------------------------------------------------------
# Pure, jitted pieces of a step (module level; jitted in `Steps`)
# ----------------------------------------------------------------------------------------------


def assemble_batch(prompt_ids_BxP, prompt_mask_BxP, completions_NxR, completion_mask_NxR,
                   info_mask_NxR, rewards_N, baseline_N=None, *, group_size: int, num_groups: int,
                   estimator: str, adv_eps: float, filter_zero_std: bool, kl_on_filtered: bool):
  """Expands prompts to groups, computes advantages and the loss / KL masks of the update.

  `baseline_N` is ReMax's baseline (the reward of each prompt's greedy response, repeated over
  its group); OPO's response lengths count the generated tokens of each row (retrieved
  `<information>` tokens, info mask 1, excluded).
  """
  prompt_ids, prompt_mask = groups.expand_groups((prompt_ids_BxP, prompt_mask_BxP), group_size)
  gids_N = groups.group_ids(num_groups, group_size)
  extra = {}
  if estimator == "opo":
    extra["lengths"] = (completion_mask_NxR * (1 - info_mask_NxR)).sum(axis=1).astype(jnp.float32)
  if estimator == "remax":
    extra["baseline"] = baseline_N
  # The ids are repeat(arange(B), G): row reductions of [B, G], no scatter (advantages.py).
  advantages_N = adv_lib.compute_advantages(rewards_N, gids_N, num_groups, estimator=estimator,
                                            eps=adv_eps, group_size=group_size, **extra)
  mean_G, std_G, count_G = adv_lib.group_stats(rewards_N, gids_N, num_groups,
                                               group_size=group_size)
  spread_G = (std_G > 0).astype(jnp.float32)
  keep_N = spread_G[gids_N] if filter_zero_std else jnp.ones_like(rewards_N)
  response_mask = completion_mask_NxR.astype(jnp.float32)
  loss_mask = response_mask * (1.0 - info_mask_NxR.astype(jnp.float32)) * keep_N[:, None]
  kl_mask = loss_mask if not kl_on_filtered else (
      response_mask * (1.0 - info_mask_NxR.astype(jnp.float32)))
  batch = {
      "tokens": jnp.concatenate([prompt_ids, completions_NxR], axis=1).astype(jnp.int32),
      "attn_mask": jnp.concatenate([prompt_mask, completion_mask_NxR], axis=1).astype(jnp.int32),
      "loss_mask": loss_mask,
      "kl_mask": kl_mask,
      "advantages": advantages_N,
  }
  stats = {
      "group_mean": mean_G[gids_N], "group_std": std_G[gids_N], "group_ids": gids_N,
      "zero_spread_frac": 1.0 - spread_G.mean(),
  }
  return batch, stats


def rollout_metrics(rewards_N, components, advantages_N, completion_mask_NxR, truncated_N,
                    zero_spread_frac):
  lengths = completion_mask_NxR.sum(axis=1).astype(jnp.float32)
  out = {
      "reward/mean": rewards_N.mean(), "reward/std": rewards_N.std(),
      "reward/min": rewards_N.min(), "reward/max": rewards_N.max(),
      "advantage/mean": advantages_N.mean(), "advantage/std": advantages_N.std(),
      "groups/zero_spread_frac": zero_spread_frac,
      "response/length_mean": lengths.mean(), "response/length_max": lengths.max(),
      "response/truncated_frac": truncated_N.astype(jnp.float32).mean(),
  }
  for name, value in components.items():
    out[f"reward/{name}"] = value.mean()
  return out


class Steps:
  """The jitted functions of a run, compiled once per input shape (prompt length bucket)."""

  def __init__(self, setup: Setup):
    from grpo_jax import sampling
    from grpo_jax.data.pipeline import pad_id_of
    self.setup = setup
    run, mesh = setup.run, setup.mesh
    rep = NamedSharding(mesh, P())
    batch_sh = lambda nd: sharding.batch_sharding(mesh, nd)
    self.batch_sh = batch_sh
    r = run.rollout
    self.generate = functools.partial(
        sampling.generate, setup.graphdef, group_size=r.group_size,
        max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
        stop_token_ids=setup.stop_token_ids, pad_token_id=pad_id_of(setup.tokenizer),
        mesh=mesh, bucket=False)  # The data pipeline already pads prompts to length buckets.
    self.search = None
    if run.search.enabled:
      self.search = SearchRollouts(setup)
    self.assemble = jax.jit(functools.partial(
        assemble_batch, group_size=r.group_size, num_groups=run.data.batch_size,
        estimator=run.rl.estimator, adv_eps=run.rl.adv_eps,
        filter_zero_std=run.rl.filter_zero_std_groups,
        kl_on_filtered=run.rl.kl_on_filtered_groups))
    self.rollout_metrics = jax.jit(rollout_metrics, out_shardings=rep)
    plan = setup.plan
    num_micro = run.minibatch // plan.microbatch
    temp = r.temperature if r.temperature > 0 else 1.0
    group = r.group_size if plan.shared_prefix else None
    # Micro-batches trimmed to their responses' lengths: padding past the longest costs nothing.
    buckets = update.response_buckets(r.max_new_tokens) if run.train.trim_responses else None
    # ... and each group's responses packed into one row where they fit (shared prefix only).
    packing = (update.response_packing(
        model_config(run, setup.tokenizer).replace(remat=plan.remat), r.max_new_tokens,
        r.group_size)
               if run.train.trim_responses and run.train.pack_responses else None)
    train_step = jax.jit(
        functools.partial(update.train_step, graphdef=setup.graphdef, tx=setup.tx, rl=run.rl,
                          response_len=r.max_new_tokens, num_micro=num_micro, temperature=temp,
                          lm_head_chunk=run.train.lm_head_chunk, group_size=group,
                          buckets=buckets, packing=packing),
        in_shardings=(setup.state_shardings, None, None), out_shardings=(setup.state_shardings, rep),
        donate_argnums=0)
    self.train_step = lambda state, batch: train_step(state, batch, setup.frozen)

    # The old / reference forwards run over the whole rollout batch, always in whole groups.
    fwd_group = (r.group_size if run.train.shared_prefix and plan.microbatch % r.group_size == 0
                 else None)

    def logprobs(use_lora):
      return jax.jit(functools.partial(
          update.batched_response_logprobs, setup.graphdef, response_len=r.max_new_tokens,
          microbatch=plan.microbatch, temperature=temp, use_lora=use_lora,
          lm_head_chunk=run.train.lm_head_chunk, group_size=fwd_group, buckets=buckets,
          packing=packing),
          out_shardings=batch_sh(2))
    policy_logprobs, base_logprobs = logprobs(True), logprobs(False)
    self.logprobs = lambda params, toks, mask: policy_logprobs(params, toks, mask,
                                                               frozen=setup.frozen)
    if setup.frozen is not None:
      # LoRA: the reference policy is the base with adapters off (no second copy of the weights).
      self.ref_logprobs = lambda params, toks, mask: base_logprobs(params, toks, mask,
                                                                   frozen=setup.frozen)
    else:
      self.ref_logprobs = lambda _, toks, mask: policy_logprobs(setup.ref_params, toks, mask)
    self.take = jax.jit(lambda tree, idx: jax.tree.map(lambda x: x[idx], tree),
                        out_shardings=None)
    self.finish_step = jax.jit(lambda s: s.replace(step=s.step + 1),
                               in_shardings=(setup.state_shardings,),
                               out_shardings=setup.state_shardings, donate_argnums=0)


  def sample(self, policy_state, prompt_ids, prompt_mask, key, *, group_size=None,
             temperature=None):
    """G responses per prompt: single-turn, or Search-R1 multi-turn when search is enabled."""
    overrides = {k: v for k, v in (("group_size", group_size), ("temperature", temperature))
                 if v is not None}
    if self.search is not None:
      return self.search(policy_state, prompt_ids, prompt_mask, key, **overrides)
    return self.generate(policy_state, prompt_ids, prompt_mask, key, **overrides)


class SearchRollouts:
  """Search-R1 rollouts on the KV-cache sampler, against a retriever (remote, or the built-in
  BM25 server started on 127.0.0.1 for `search.local_corpus`, one per process).

  Its output's `texts` are this process's rows, in the order of this process's prompts (the
  tensors are global arrays, as those of `sampling.generate`)."""

  def __init__(self, setup: Setup):
    from grpo_jax.rollout import retriever_client, search_rollout
    cfg, r = setup.run.search, setup.run.rollout
    self.server = None
    url = cfg.url
    if cfg.local_corpus:
      from grpo_jax import retriever
      self.server = retriever.start_server(cfg.local_corpus, host="127.0.0.1", port=0,
                                           topk=cfg.topk)
      url = self.server.url
    self.client = retriever_client.RetrieverClient(retriever_client.RetrieverConfig(
        url=url, topk=cfg.topk, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
        backoff_s=cfg.backoff_s))
    self.config = search_rollout.SearchRolloutConfig(
        max_turns=cfg.max_turns, max_response_tokens=r.max_new_tokens,
        max_turn_tokens=min(cfg.max_turn_tokens, r.max_new_tokens),
        max_obs_tokens=cfg.max_obs_tokens, max_doc_chars=cfg.max_doc_chars or None, topk=cfg.topk,
        max_sampled_tokens=cfg.max_sampled_tokens or None,
        max_obs_total_tokens=cfg.max_obs_total_tokens or None,
        eos_without_action=cfg.eos_without_action)
    self.setup = setup

  def __call__(self, policy_state, prompt_ids, prompt_mask, key, **overrides):
    from grpo_jax.data.pipeline import pad_id_of
    from grpo_jax.rollout import search_sampler
    setup, r = self.setup, self.setup.run.rollout
    kwargs = dict(group_size=r.group_size, temperature=r.temperature, top_k=r.top_k,
                  top_p=r.top_p)
    kwargs.update(overrides)
    # Each process drives the rollout rows of its own prompts (their text, their retrieval
    # calls); the sampler runs the device work of the whole batch in step with the others.
    prompt_ids, prompt_mask = host.to_host(prompt_ids), host.to_host(prompt_mask)
    return search_sampler.search_generate(
        setup.graphdef, policy_state, prompt_ids, prompt_mask, key, tokenizer=setup.tokenizer,
        retriever=self.client, config=self.config, eos_token_id=setup.tokenizer.eos_token_id,
        pad_token_id=pad_id_of(setup.tokenizer), mesh=setup.mesh, **kwargs)


# ----------------------------------------------------------------------------------------------
# Host-side pieces
# ----------------------------------------------------------------------------------------------


def overlong_penalty(lengths_N: np.ndarray, max_len: int, buffer: int, factor: float) -> np.ndarray:
  """DAPO's soft overlong punishment: 0 up to max_len - buffer, then linear down to -factor."""
  if buffer <= 0:
    return np.zeros_like(lengths_N, dtype=np.float32)
  over = np.clip(lengths_N - (max_len - buffer), 0, buffer).astype(np.float32)
  return -factor * over / buffer


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def preflight(run: RunConfig, workdir: str) -> None:
  """Checks that need files (workdir, model, tokenizer, reward functions, data) before anything
  compiles or data is prepared: each failure is a `ConfigError` of one line naming the field."""
  from grpo_jax import data as data_lib
  from grpo_jax import rewards as rewards_lib
  check_workdir(workdir)
  tokenizer = _checked_tokenizer(run)
  mcfg = _checked_model_config(run, tokenizer)
  prompt_len = max(run.data.length_buckets or (run.data.max_prompt_len,))
  positions = prompt_len + run.rollout.max_new_tokens
  if positions > mcfg.max_position_embeddings:
    raise ConfigError(
        f"config.rollout.max_new_tokens: prompts of up to {prompt_len} tokens "
        f"(data.length_buckets) + {run.rollout.max_new_tokens} new tokens = {positions} positions, "
        f"beyond the model's max_position_embeddings={mcfg.max_position_embeddings}")
  try:
    rewards_lib.make_reward_fn(run.rewards)
  except Exception as e:  # noqa: BLE001 -- a user module may raise anything at import.
    msg = _one_line(e)
    raise ConfigError(msg if msg.startswith("config.") else f"config.rewards: {msg}") from None
  try:
    data_lib.check_source(run.data)
    _check_every_row(run.data)
  except (data_lib.DataError, ValueError) as e:
    msg = str(e).splitlines()[0]
    raise ConfigError(msg if msg.startswith("config.") else f"config.data: {msg}") from None


def _check_every_row(data_config) -> None:
  """A local file (JSONL / Parquet) is in memory anyway: every row has the prompt and answer
  fields, so a bad row is an error now, not a crash at the step that reaches it."""
  from grpo_jax import data as data_lib
  from grpo_jax.data.sources import get_field
  if data_config.kind not in ("jsonl", "parquet"):
    return  # TFDS data sets can be large: `check_source` checks their first row.
  splits = [data_config.split] + ([data_config.eval_split] if data_config.eval_split else [])
  for split in splits:
    source = data_lib.open_source(data_config, split)
    try:
      for i in range(len(source)):
        get_field(source[i], data_config.prompt_field, field="prompt_field", index=i)
        get_field(source[i], data_config.answer_field, field="answer_field", index=i)
    except data_lib.DataError as e:
      raise data_lib.DataError(f"{e} ({source.origin})") from None


def check_workdir(workdir: str) -> None:
  """The workdir can be created and written (not under a file, not read-only); creates nothing,
  so a run refused later leaves no trace."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir: {workdir!r} exists and is not a directory")
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(f"--workdir: cannot create {workdir!r}: {existing!r} is a file")
  if not os.access(existing, os.W_OK | os.X_OK):
    read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
    reason = "Read-only file system" if read_only else "Permission denied"
    raise ConfigError(f"--workdir: cannot write to {workdir!r} ({reason})")


def _checked_tokenizer(run: RunConfig):
  field = "config.model.path" if run.tokenizer and run.tokenizer == run.model.path else (
      "config.tokenizer")
  try:
    return load_tokenizer(run)
  except Exception as e:  # noqa: BLE001 -- transformers raises many kinds for a bad folder.
    raise ConfigError(f"{field}: cannot load a tokenizer from {run.tokenizer!r} "
                      f"({_one_line(e)})") from None


def _checked_model_config(run: RunConfig, tokenizer):
  if not run.model.is_tiny:
    import glob
    if not glob.glob(os.path.join(run.model.path, "*.safetensors")):
      raise ConfigError(f"config.model.path: no *.safetensors weights in {run.model.path!r}")
  try:
    return model_config(run, tokenizer)
  except Exception as e:  # noqa: BLE001 -- a broken or unsupported config.json.
    msg = _one_line(e)
    raise ConfigError(msg if msg.startswith("config.") else (
        f"config.model.path: {os.path.join(run.model.path, 'config.json')}: {msg}")) from None


def _one_line(e: BaseException) -> str:
  msg = (str(e).strip().splitlines() or [""])[0]
  if isinstance(e, (ValueError, TypeError, KeyError, OSError, ConfigError)) and msg:
    return msg.strip("'\"") if isinstance(e, KeyError) else msg
  return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# Exit status of a run stopped by SIGTERM / SIGINT after checkpointing: a scheduler tells it apart
# from success (0) and from failure (1); rerunning the same command resumes. 75 is EX_TEMPFAIL.
EXIT_PREEMPTED = 75


class Preempted(Exception):
  """SIGTERM / SIGINT stopped the run at the end of a step, after a checkpoint."""


class NonFiniteError(RuntimeError):
  """`train.max_nonfinite_steps` consecutive steps had their update skipped as non-finite."""


@dataclasses.dataclass
class Loop:
  """What lives across the steps of `run`: the set-up, the train state, the data iterator and the
  bookkeeping (metrics one step late, the last saved step, a stop request)."""
  run: RunConfig
  workdir: str
  setup: Setup
  steps: Steps
  state: Any
  data_iter: Any
  reward_fn: Any
  checkpointer: ckpt_lib.Checkpointer
  writer: metrics_lib.MetricsWriter
  data_log: Any  # data_seen.jsonl, open on process 0 only.
  start: int  # The step this call resumed from (0 on a fresh workdir).
  stop: "StopRequest"
  lock: Any = None  # The workdir lock (process 0).
  pending: Any = None  # Metrics of the previous step: fetched one step late, the device never waits.
  last: dict = dataclasses.field(default_factory=dict)  # The metrics of the last written step.
  saved: int = 0  # The last step checkpointed.
  updating: bool = False  # True while the state is donated to the update: no emergency save.
  nonfinite_streak: int = 0  # Consecutive steps with a skipped (non-finite) update.
  t_start: float = dataclasses.field(default_factory=time.perf_counter)

  @property
  def mesh(self):
    return self.setup.mesh

  @property
  def tokenizer(self):
    return self.setup.tokenizer

  @property
  def updates_per_step(self) -> int:
    return self.run.train.ppo_epochs * (self.run.rollout_batch // self.run.minibatch)

  def flush_metrics(self) -> None:
    """Writes the pending metrics row (blocks until its arrays are ready)."""
    if self.pending is not None:
      pending, self.pending = self.pending, None
      self.last = _flush(self.writer, pending)

  @contextlib.contextmanager
  def failure_guard(self, step: int):
    """A step that fails writes the metrics row of the step before it; a failure before the
    update (a reward function raises, the retriever is down) also checkpoints the finished steps
    with the iterator state from before this step's batch. After a failure in the update the
    state is donated (maybe gone): nothing is saved, the last checkpoint stands."""
    data_state_before = self.data_iter.get_state()
    self.updating = False
    try:
      yield
    except BaseException as e:
      disk_full = is_disk_full(e)
      if not disk_full:
        _quietly(self.flush_metrics, "writing the metrics of step %d" % step)
      # With several processes the others are not in this handler: a save (a collective) would
      # wait for them; the last periodic checkpoint stands.
      if (not self.updating and not disk_full and step > self.saved and jax.process_count() == 1
          and not isinstance(e, (KeyboardInterrupt, NonFiniteError))
          and _intact(self.state)):
        ckpt_lib.warn(f"step {step + 1} failed: saving the {step} finished steps")
        if _quietly(lambda: (self.checkpointer.save(step, self.state, data_state_before, self.run),
                             self.checkpointer.wait()), f"saving step {step}"):
          self.saved = step
      raise

  def close(self) -> None:
    """Stops the retriever, finishes pending saves, closes files, releases the workdir lock.

    Everything is attempted; the first failure is raised unless an exception is already on its
    way (then it is only logged, so the original error is the one reported; a full disk met again,
    e.g. by a checkpoint still being written, is not: the run's one line already says it)."""
    closers = [self.stop.restore]
    if self.steps.search is not None and self.steps.search.server is not None:
      closers.append(self.steps.search.server.close)
    closers += [self.checkpointer.close, self.writer.close]
    if self.data_log is not None:
      closers.append(self.data_log.close)
    if self.lock is not None:
      closers.append(self.lock.release)
    on_its_way = sys.exc_info()[1]
    failing = on_its_way is not None
    first = None
    for closer in closers:
      try:
        closer()
      except Exception as e:  # noqa: BLE001
        if failing and not (is_disk_full(e, until=on_its_way) and is_disk_full(on_its_way)):
          logging.error("while closing after a failure: %s", _one_line(e))
        first = first or e
    if first is not None and not failing:
      raise first


@dataclasses.dataclass
class StepData:
  """What one step's phases hand each other: batch -> rollout -> rewards -> update batch."""
  step: int  # 0-based; metrics, checkpoints and exports name it step + 1.
  batch: dict | None = None  # The data pipeline's batch (host-local).
  prompt_ids: Any = None  # [B, P] global arrays.
  prompt_mask: Any = None
  step_key: Any = None
  out: Any = None  # The sampler's output (tokens, mask, truncated; search: info_mask, texts, ...).
  completions_h: np.ndarray | None = None  # [N, R] response tokens on this host.
  cmask_h: np.ndarray | None = None  # [N, R] their mask.
  texts: list[str] | None = None
  lengths_h: np.ndarray | None = None  # [N] response lengths on this host.
  rewards: Any = None  # [N] global.
  comps: Any = None  # reward components, [N] global each.
  baseline: Any = None  # [N] global: ReMax's greedy-response rewards (other estimators: None).
  info_mask: Any = None  # [N, R] 1 on retrieved (loss-masked) tokens.
  train_batch: dict | None = None
  gstats: dict | None = None
  roll_metrics: Any = None
  upd_metrics: list = dataclasses.field(default_factory=list)
  export_inputs: tuple | None = None  # (tokens and mask before the update, old log-probs).
  times: dict = dataclasses.field(default_factory=dict)  # perf_counter at each phase boundary.


def open_loop(run: RunConfig, workdir: str, devices=None) -> Loop | None:
  """Set-up of `run`: mesh, tokenizer, data, model, jitted steps; resumes from `workdir`.

  Returns None when the workdir already holds a checkpoint of the last step (nothing compiled).
  """
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  lock = ckpt_lib.WorkdirLock(workdir) if is_main else None
  stop = StopRequest()
  try:
    return _open_loop(run, workdir, devices, lock, stop)
  except BaseException:
    stop.restore()
    if lock is not None:
      lock.release()
    raise


def _open_loop(run: RunConfig, workdir: str, devices, lock, stop) -> Loop | None:
  from grpo_jax import data as data_lib
  from grpo_jax import rewards as rewards_lib
  is_main = jax.process_index() == 0
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       save_every=run.train.checkpoint_every,
                                       keep=run.train.keep_checkpoints)
  latest = checkpointer.latest_step()
  if latest is not None and latest >= run.train.num_steps:
    checkpointer.check_model(latest, run)
    checkpointer.close()
    if lock is not None:
      lock.release()
    stop.restore()
    return None

  mesh = sharding.make_mesh(run.mesh, devices)
  tokenizer = load_tokenizer(run)
  reward_fn = rewards_lib.make_reward_fn(run.rewards)
  dataset = data_lib.make_dataset(run.data, tokenizer, process_index=jax.process_index(),
                                  process_count=jax.process_count())
  data_iter = iter(dataset)

  setup, state, abstract_state = init_state(run, mesh, tokenizer, workdir)
  steps = Steps(setup)

  def set_data_state(data_state):  # A fresh iterator per attempt: a refused state leaves none.
    nonlocal data_iter
    data_iter = iter(dataset)
    data_iter.set_state(data_state)

  start = 0
  restored = checkpointer.restore_latest(abstract_state, run, set_data_state)
  if restored is not None:
    start, state = restored
    logging.info("resumed from step %d of %s", start, workdir)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    missing = metrics_lib.missing_steps(metrics_path,
                                        [t + 1 for t in range(start) if _logged(run, t)])
    if missing and is_main:
      ckpt_lib.warn(f"{metrics_path} has no rows for steps {metrics_lib.ranges(missing)} "
                    f"(deleted or truncated?): those steps stay missing from the curves")
  if is_main:  # Laid out as the user wrote it (resolved): it can be fed back to `resolve`.
    ckpt_lib.dump_json(os.path.join(workdir, "config.json"), user_config(run))

  writer = metrics_lib.MetricsWriter(workdir, total_steps=run.train.num_steps, initial_step=start,
                                     progress_bar=run.train.progress_bar)
  data_log_path = os.path.join(workdir, "data_seen.jsonl")
  data_log = None
  if is_main:  # Steps after the checkpoint we resume from are redone: drop their old lines.
    metrics_lib.truncate_jsonl(data_log_path, start)
    data_log = open(data_log_path, "a")
  return Loop(run=run, workdir=workdir, setup=setup, steps=steps, state=state,
              data_iter=data_iter, reward_fn=reward_fn, checkpointer=checkpointer, writer=writer,
              data_log=data_log, start=start, stop=stop, lock=lock, saved=start)


def run(run_config: RunConfig, workdir: str, *, devices=None,
        stop_after: int | None = None) -> dict[str, float]:
  """Trains `run_config.train.num_steps` GRPO steps in `workdir`, resuming from its checkpoints.

  Args:
    run_config: the validated config.
    workdir: checkpoints, metrics, exports; a workdir with checkpoints is resumed.
    devices: the devices of the mesh (default: all).
    stop_after: run at most this many steps in this call, then checkpoint and return, as a
      preempted job would (tests of resume use it).

  Returns:
    The metrics of the last step.

  Raises:
    Preempted: SIGTERM or SIGINT arrived; the step it arrived in was finished and checkpointed.
    NonFiniteError: `train.max_nonfinite_steps` steps in a row were skipped as non-finite.
  """
  loop = open_loop(run_config, workdir, devices)
  if loop is None:
    return _already_complete(run_config, workdir)
  num_steps = run_config.train.num_steps
  end = num_steps if stop_after is None else min(num_steps, loop.start + stop_after)
  try:
    for step in range(loop.start, end):
      if loop.stop.requested:  # Arrived during set-up: nothing new to save.
        break
      s = StepData(step=step)
      with loop.failure_guard(step):
        next_batch(loop, s)
        rollout(loop, s)
        score(loop, s)
        assemble(loop, s)
        update_policy(loop, s)
        record(loop, s, last_step=step + 1 == end)
        export_and_evaluate(loop, s)
        checkpoint(loop, s, last_step=step + 1 == end)
      if loop.stop.requested:
        break
    loop.flush_metrics()
  finally:
    loop.close()
  if loop.stop.requested:
    raise Preempted(f"stopped by {loop.stop.signal_name} at step {loop.saved}/{num_steps}, "
                    f"checkpointed in {loop.checkpointer.directory}; rerun the same command to "
                    f"resume")
  finish(loop)
  return loop.last


# The phases of one step, in order. Each reads and fills the step's `StepData`.


def next_batch(loop: Loop, s: StepData) -> None:
  """The next prompts (logged to data_seen.jsonl) as global arrays, and the step's PRNG key."""
  s.times["start"] = time.perf_counter()
  batch = next(loop.data_iter)
  seen = np.asarray(batch["index"])
  if jax.process_count() > 1:  # Every host's slice, in global-batch order (all hosts call it).
    seen = np.asarray(multihost_utils.process_allgather(seen, tiled=True))
  if loop.data_log is not None:  # Which examples each step trained on: audits and resume tests.
    loop.data_log.write(json.dumps({"step": s.step + 1, "index": seen.tolist()}) + "\n")
    loop.data_log.flush()
  s.batch = batch
  s.prompt_ids, s.prompt_mask = host.to_global((batch["prompt_ids"], batch["prompt_mask"]),
                                               loop.mesh)
  s.step_key = jax.random.fold_in(jax.random.wrap_key_data(loop.state.rng), s.step)


def rollout(loop: Loop, s: StepData) -> None:
  """G responses per prompt (the prompt prefilled once)."""
  sample_key, _ = jax.random.split(s.step_key)
  s.out = loop.steps.sample(loop.setup.policy_state(loop.state.params), s.prompt_ids,
                            s.prompt_mask, sample_key)
  s.completions_h = host.to_host(s.out.tokens)  # Waits for the sampler: the timing is honest.
  s.cmask_h = host.to_host(s.out.mask)
  s.times["rollout"] = time.perf_counter()


def score(loop: Loop, s: StepData) -> None:
  """Rewards on the host that holds the text (+ DAPO's overlong penalty; ReMax's baseline)."""
  run, out, batch = loop.run, s.out, s.batch
  completions_h, cmask_h = s.completions_h, s.cmask_h
  g = run.rollout.group_size
  texts = getattr(out, "texts", None) or host.decode(loop.tokenizer, completions_h, cmask_h)
  prompts_rep = [p for p in batch["prompt_text"] for _ in range(g)]
  # Search rollouts return this process's texts only: they pair with this process's
  # prompts (and the rows of `completions_h`) one to one.
  assert len(texts) == len(prompts_rep) == len(completions_h), (len(texts), len(prompts_rep))
  examples_rep = [host.example(batch, i) for i in range(len(batch["prompt_text"]))
                  for _ in range(g)]
  rw = loop.reward_fn(prompts_rep, texts, examples_rep)
  rewards_h = np.asarray(rw.total, np.float32)
  components = {k: np.asarray(v, np.float32) for k, v in rw.components.items()}
  lengths_h = cmask_h.sum(axis=1)
  if run.rl.overlong_buffer > 0:
    pen = overlong_penalty(lengths_h, run.rollout.max_new_tokens, run.rl.overlong_buffer,
                           run.rl.overlong_penalty)
    rewards_h = rewards_h + pen
    components["overlong"] = pen
  s.texts, s.lengths_h = texts, lengths_h
  s.rewards, s.comps = host.to_global((rewards_h, components), loop.mesh)
  if run.rl.estimator == "remax":
    s.baseline = host.to_global(np.repeat(greedy_rewards(loop, s), g), loop.mesh)
  s.times["reward"] = time.perf_counter()


def greedy_rewards(loop: Loop, s: StepData) -> np.ndarray:
  """ReMax's baseline: the reward of each prompt's greedy response (this host's prompts)."""
  import math
  run = loop.run
  # Greedy rows of a prompt are identical: sample the fewest copies the mesh can split, keep one.
  multiple = sharding.batch_size_multiple(loop.mesh, sharding.ROLLOUT_RULES)
  copies = multiple // math.gcd(run.data.batch_size, multiple)
  out = loop.steps.sample(loop.setup.policy_state(loop.state.params), s.prompt_ids, s.prompt_mask,
                          jax.random.fold_in(s.step_key, 7), group_size=copies, temperature=0.0)
  texts = getattr(out, "texts", None) or host.decode(loop.tokenizer, host.to_host(out.tokens),
                                                     host.to_host(out.mask))
  examples = [host.example(s.batch, i) for i in range(len(s.batch["prompt_text"]))]
  rw = loop.reward_fn(list(s.batch["prompt_text"]), list(texts)[::copies], examples)
  return np.asarray(rw.total, np.float32)


def assemble(loop: Loop, s: StepData) -> None:
  """Advantages over the global batch, the update batch, and the old / reference log-probs."""
  run, steps, state, out = loop.run, loop.steps, loop.state, s.out
  info_mask = getattr(out, "info_mask", None)
  s.info_mask = jnp.zeros_like(out.mask) if info_mask is None else info_mask
  s.train_batch, s.gstats = steps.assemble(s.prompt_ids, s.prompt_mask, out.tokens, out.mask,
                                           s.info_mask, s.rewards, s.baseline)
  s.roll_metrics = steps.rollout_metrics(s.rewards, s.comps, s.train_batch["advantages"], out.mask,
                                         out.truncated, s.gstats["zero_spread_frac"])
  tb = s.train_batch
  n_mb = run.rollout_batch // run.minibatch
  on_policy = run.train.ppo_epochs == 1 and n_mb == 1
  if not on_policy:
    tb["old_logp"] = steps.logprobs(state.params, tb["tokens"], tb["attn_mask"])
  if run.rl.loss.kl_coef > 0:
    tb["ref_logp"] = steps.ref_logprobs(state.params, tb["tokens"], tb["attn_mask"])
  if _due(run.train.export_every, s.step):
    old = tb.get("old_logp")
    if old is None:
      old = steps.logprobs(state.params, tb["tokens"], tb["attn_mask"])
    s.export_inputs = ({k: tb[k] for k in ("tokens", "attn_mask")}, old)


def update_policy(loop: Loop, s: StepData) -> None:
  """`ppo_epochs` passes over the rollout batch in minibatches; the state is donated."""
  run, steps = loop.run, loop.steps
  n_mb = run.rollout_batch // run.minibatch
  loop.updating = True  # The state is donated from here on: no emergency save.
  state = loop.state
  # The shared-prefix update needs whole groups in each minibatch: shuffle groups, not rows.
  group = run.rollout.group_size if loop.setup.plan.shared_prefix else None
  for epoch in range(run.train.ppo_epochs):
    if n_mb == 1:
      minibatches = [s.train_batch]
    else:
      rows = update.minibatch_indices(jax.random.fold_in(s.step_key, 1000 + epoch),
                                      run.rollout_batch, run.minibatch, group)
      minibatches = [steps.take(s.train_batch, idx) for idx in rows]
      minibatches = [jax.device_put(mb, jax.tree.map(lambda x: steps.batch_sh(x.ndim), mb))
                     for mb in minibatches]
    for mb in minibatches:
      state, m = steps.train_step(state, mb)
      s.upd_metrics.append(m)
  # Wait for the update before reading the clock: dispatch returns at once, and the time would
  # otherwise be paid (and logged) somewhere else. An error in the update surfaces here too.
  loop.state = jax.block_until_ready(steps.finish_step(state))
  s.times["update"] = time.perf_counter()


def record(loop: Loop, s: StepData, *, last_step: bool) -> None:
  """Stops a run whose updates keep being non-finite; queues this step's metrics row (written
  one step late) when the step is logged, and writes the previous one."""
  run, t = loop.run, s.times
  skipped = any(float(m["skipped_update"]) > 0 for m in s.upd_metrics)  # Ready: the update is.
  loop.nonfinite_streak = loop.nonfinite_streak + 1 if skipped else 0
  limit = run.train.max_nonfinite_steps
  if limit and loop.nonfinite_streak >= limit:
    raise NonFiniteError(
        f"config.train.max_nonfinite_steps: the update of {loop.nonfinite_streak} steps in a row "
        f"(up to step {s.step + 1}) had a non-finite loss or gradient and was skipped; stopped. "
        f"The last checkpoint in {loop.checkpointer.directory} (step {loop.saved}) is kept; lower "
        f"optim.learning_rate or check the rewards")
  loop.flush_metrics()
  loop.writer.advance()
  if not (_logged(run, s.step) or last_step):
    return
  n_updates = loop.updates_per_step
  lr = update.learning_rate_schedule(run.optim, run.train.num_steps * n_updates)(
      max((s.step + 1) * n_updates - 1, 0))
  loop.pending = (s.step + 1, s.roll_metrics, s.upd_metrics, {
      "time/rollout_s": t["rollout"] - t["start"], "time/reward_s": t["reward"] - t["rollout"],
      "time/update_s": t["update"] - t["reward"], "time/step_s": t["update"] - t["start"],
      "throughput/tokens_per_s": float(s.lengths_h.sum()) * jax.process_count()
                                 / max(t["update"] - t["start"], 1e-9),
      "optim/learning_rate": float(lr),
      **{k if k.startswith(("search/", "time/")) else f"search/{k}": float(v)
         for k, v in (getattr(s.out, "metrics", None) or {}).items()},
  })


def export_and_evaluate(loop: Loop, s: StepData) -> None:
  """The advantage export (every `export_every`) and held-out evaluation (every `eval_every`)."""
  from grpo_jax import evaluation
  from grpo_jax import export as export_lib
  run, steps, state, step = loop.run, loop.steps, loop.state, s.step
  if s.export_inputs is not None:
    pre_update, old_logp = s.export_inputs
    new_logp = steps.logprobs(state.params, pre_update["tokens"], pre_update["attn_mask"])
    export_lib.write_step(
        loop.workdir, step + 1, tokenizer=loop.tokenizer, run=run, texts=s.texts,
        rewards=s.rewards, components=s.comps, train_batch=s.train_batch, gstats=s.gstats,
        truncated=s.out.truncated, old_logp=old_logp, new_logp=new_logp, info_mask=s.info_mask,
        retrieved=_retrieved_text(s.out))
  if _due(run.train.eval_every, step) and run.data.eval_split:
    eval_metrics = evaluation.evaluate(steps, loop.setup.policy_state(state.params), run,
                                       loop.tokenizer, loop.reward_fn, loop.mesh, s.step_key)
    if loop.pending is not None:
      loop.pending[3].update(eval_metrics)


def checkpoint(loop: Loop, s: StepData, *, last_step: bool) -> None:
  """Saves every `checkpoint_every` steps, at the last step of this call, and on a stop request."""
  if jax.process_count() > 1:  # SIGTERM may reach hosts in different steps: stop together.
    loop.stop.requested = bool(np.max(multihost_utils.process_allgather(
        np.int32(loop.stop.requested))))
  step = s.step + 1
  if loop.checkpointer.should_save(step) or last_step or loop.stop.requested:
    loop.flush_metrics()  # Every step a checkpoint holds has its metrics written.
    loop.checkpointer.save(step, loop.state, loop.data_iter.get_state(), loop.run)
    loop.saved = step


def finish(loop: Loop) -> None:
  """After the loop: the final export (of a finished run only), the reward-curve PNG, a summary."""
  run, workdir = loop.run, loop.workdir
  finished = loop.saved >= run.train.num_steps
  export_path = None
  if run.train.final_export and finished:
    export_path = export_model(loop.setup, loop.state,
                               os.path.join(workdir, f"{run.train.final_export}_export"),
                               run.train.final_export)
  if jax.process_index() != 0 or not os.path.exists(loop.writer.path):
    return
  rows = metrics_lib.read_metrics(loop.writer.path)
  curve = metrics_lib.plot_curves(rows, ("reward/mean", "eval/greedy_mean_reward"),
                                  os.path.join(workdir, "reward_curve.png"), title="GRPO reward")
  print(summary(loop, rows, curve, export_path), flush=True)


def summary(loop: Loop, rows: list[dict], curve: str, export_path: str | None) -> str:
  """The end-of-run lines: steps, final reward, evaluation, where everything is."""
  run = loop.run
  minutes, seconds = divmod(int(time.perf_counter() - loop.t_start), 60)
  head = (f"done: step {loop.saved}/{run.train.num_steps}"
          f"{' (run finished)' if loop.saved >= run.train.num_steps else ''}, "
          f"{loop.saved - loop.start} steps in {minutes}m{seconds:02d}s")
  rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
  if rewards:
    tail = rewards[-10:]
    head += f"; final reward {rewards[-1]:.3g} (mean of the last {len(tail)}: {np.mean(tail):.3g})"
  evals = [r for r in rows if "eval/greedy_accuracy" in r]
  if evals:
    e = evals[-1]
    passk = [k for k in e if k.startswith("eval/pass@")]
    head += (f"; eval at step {e['step']}: greedy accuracy {e['eval/greedy_accuracy']:.3g}"
             + (f", {passk[0][5:]} {e[passk[0]]:.3g}" if passk else ""))
  lines = [head, f"  checkpoints: {loop.checkpointer.directory}",
           f"  metrics: {loop.writer.path} (TensorBoard: {os.path.join(loop.workdir, 'tensorboard')})",
           f"  reward curve: {curve}"]
  if run.train.export_every:
    lines.append(f"  advantage exports: {os.path.join(loop.workdir, 'export')} "
                 f"(python -m grpo_jax.inspect {loop.workdir})")
  if export_path:
    lines.append(f"  {run.train.final_export} export: {export_path}")
  return "\n".join(lines)


def _already_complete(run: RunConfig, workdir: str) -> dict[str, float]:
  """A rerun on a finished workdir: says so, returns the last metrics row, compiles nothing."""
  path = os.path.join(workdir, "metrics.jsonl")
  rows = metrics_lib.read_metrics(path) if os.path.exists(path) else []
  if jax.process_index() == 0:
    print(f"already complete: {workdir} holds a checkpoint of step {run.train.num_steps}/"
          f"{run.train.num_steps}; nothing to do (raise --config.train.num_steps to train on)",
          flush=True)
  return {k: v for k, v in rows[-1].items() if k != "step"} if rows else {}


def _due(every: int, step: int) -> bool:
  """Whether a periodic action (every `every` steps, 0 = never) falls on 0-based `step`."""
  return bool(every) and (step + 1) % every == 0


def _logged(run: RunConfig, step: int) -> bool:
  """Whether 0-based `step` writes a metrics row: every `log_every` steps, at evaluations and at
  the last step."""
  return (_due(run.train.log_every, step) or step + 1 == run.train.num_steps
          or (_due(run.train.eval_every, step) and bool(run.data.eval_split)))


def _intact(state: Any) -> bool:
  """Whether every array of `state` is still there and computed (not donated to a failed update)."""
  try:
    leaves = jax.tree.leaves(state)
    if any(x.is_deleted() for x in leaves if isinstance(x, jax.Array)):
      return False
    jax.block_until_ready(state)
    return True
  except Exception:  # noqa: BLE001 -- an array whose computation failed raises here.
    return False


def _quietly(fn, what: str) -> bool:
  """Runs `fn` while handling another failure: its own failure is one logged line, not a second
  traceback. Returns whether it succeeded."""
  try:
    fn()
    return True
  except Exception as e:  # noqa: BLE001
    logging.error("%s failed too: %s", what, _one_line(e))
    return False


def is_disk_full(e: BaseException, until: BaseException | None = None) -> bool:
  """Whether `e` (or an exception it was raised from, up to `until`) is a full disk or exceeded
  quota."""
  import errno
  seen = set()
  while e is not None and e is not until and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def export_model(setup: Setup, state: update.TrainState, path: str, kind: str) -> str:
  """Writes the trained policy for transformers: "hf" = a full (LoRA-merged) checkpoint with the
  tokenizer, "peft" = only the adapters in the format `peft.PeftModel.from_pretrained` loads."""
  from grpo_jax import models
  from grpo_jax.models import hf, lora
  model = update.merge(setup.graphdef, state.params, setup.frozen)
  if kind == "peft":
    base = "" if setup.run.model.is_tiny else os.path.abspath(setup.run.model.path)
    hf.save_peft_adapters(model, path, base_model_name_or_path=base or None)
  else:
    if lora.has_lora(model):
      model = lora.merge_lora(model)
    models.save_pretrained(model, path)
    if jax.process_index() == 0:
      setup.tokenizer.save_pretrained(path)
  return path


class StopRequest:
  """SIGTERM (preemption, scancel) or SIGINT (Ctrl-C) -> a checkpoint at the end of the current
  step, then `Preempted` (exit status `EXIT_PREEMPTED`). A second signal ends the process at once
  (status 128 + signal number), whatever the loop is waiting for: finished checkpoints are
  complete on disk whenever that happens (Orbax renames a checkpoint into place only once written).
  """

  def __init__(self):
    import signal
    import threading
    self.requested = False
    self.signal_name = ""
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    import signal
    del frame
    name = signal.Signals(signum).name
    if self.requested:
      # os.write: a signal handler may interrupt a print in progress; os._exit: no cleanup that
      # could wait on the very thing that is stuck.
      os.write(2, f"error: second {name}: exiting now without waiting for the step to end\n"
               .encode())
      os._exit(128 + signum)
    self.requested = True
    self.signal_name = name
    os.write(2, f"{name}: finishing this step and checkpointing (send it again to exit at once)\n"
             .encode())

  def restore(self):
    import signal
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}


def _retrieved_text(out) -> list[str] | None:
  """Per response of the global batch, the retrieved (loss-masked) text of a search rollout
  (every process's rows: all processes call it); None otherwise."""
  if getattr(out, "segments", None) is None:
    return None
  from grpo_jax.rollout import search_sampler
  return search_sampler.gather_retrieved_text(out)


def _flush(writer: metrics_lib.MetricsWriter, pending) -> dict[str, float]:
  step, roll, upd, host = pending
  out = {k: float(v) for k, v in jax.device_get(roll).items()}
  # Several optimizer updates per step (minibatches x epochs): extremes stay extremes.
  for key, value in update.combine_step_metrics(jax.device_get(upd)).items():
    out[f"update/{key}" if key not in ("kl", "entropy") else key] = value
  out.update(host)
  writer.write(step, out)
  return out


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def main(argv) -> None:
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  if not flags.FLAGS.workdir:
    sys.exit("error: --workdir: required (where checkpoints, metrics and exports go)")
  _quiet_libraries(flags.FLAGS["verbosity"].present)
  from grpo_jax import distributed
  distributed.initialize()
  from grpo_jax.rewards import RewardError
  from grpo_jax.rollout.retriever_client import RetrieverError
  workdir = flags.FLAGS.workdir
  try:
    run_config = resolve(flags.FLAGS.config, num_devices=jax.device_count())
    preflight(run_config, workdir)
    run(run_config, workdir)
  except Preempted as e:
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(EXIT_PREEMPTED)
  except (ConfigError, ckpt_lib.CheckpointError, NonFiniteError) as e:
    sys.exit(f"error: {e}")
  except (RewardError, RetrieverError) as e:  # The finished steps are checkpointed by `run`.
    sys.exit(f"error: {str(e).splitlines()[0]}")
  except KeyboardInterrupt:  # Ctrl-C before the loop took over SIGINT (set-up, compile).
    sys.exit("error: interrupted")
  except Exception as e:  # noqa: BLE001 -- the failures a user can act on get one line.
    msg = failure_message(e, workdir)
    if msg is None:
      raise
    sys.exit(f"error: {msg}")


def failure_message(e: BaseException, workdir: str) -> str | None:
  """One line for a full disk, an out-of-memory device or a lost peer process; None otherwise."""
  from grpo_jax import distributed
  if is_disk_full(e):
    return (f"no space left on device (workdir {os.path.abspath(workdir)}): free space or use "
            f"another --workdir, then rerun to resume from the last complete checkpoint")
  if isinstance(e, jax.errors.JaxRuntimeError):
    msg = distributed.peer_failure_message(e)
    if msg is not None:
      return msg
  # XLA raises JaxRuntimeError; an error inside a host callback comes back as another type.
  if "RESOURCE_EXHAUSTED" in str(e) and "memory" in str(e).lower():
    return (f"out of device memory ({' '.join(str(e).split())[:200]}); lower "
            f"train.microbatch_size, or set model.remat=True; the last checkpoint in "
            f"{os.path.join(os.path.abspath(workdir), 'checkpoints')} is kept")
  return None


def _drop_closed_loop_callbacks(hook):
  """An unraisable-exception hook that drops "Event loop is closed" and passes the rest to `hook`.

  When an async checkpoint save fails (a full disk), Orbax closes the save's asyncio loop while
  TensorStore writes of the same save are still in flight; each one completes on a TensorStore
  thread, calls `loop.call_soon_threadsafe` on the closed loop, and the RuntimeError is printed as
  a bare traceback (an unraisable exception without an object) before the run's one error line.
  The save's failure itself is reported by the loop.
  """
  def drop(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    hook(unraisable)
  return drop


def _quiet_libraries(verbose: bool) -> None:
  """Library INFO chatter (Orbax writes ~50 lines per save) off unless --verbosity is given."""
  if verbose:
    return
  import logging as py_logging
  logging.set_verbosity(logging.WARNING)
  # Orbax reports a failed async save from its threads (a traceback per thread) and then raises
  # the same error in the loop, which prints one line for it: keep only that line.
  logging.get_absl_handler().addFilter(
      lambda record: "/orbax/" not in record.pathname.replace(os.sep, "/")
      or record.levelno >= py_logging.CRITICAL)
  # The same failed save's other write tasks are garbage-collected at exit with their errors
  # unread; asyncio logs each ("Task exception was never retrieved", the task's Orbax coroutine
  # named in the message) after the run's one line.
  logging.get_absl_handler().addFilter(
      lambda record: record.name != "asyncio" or "/orbax/" not in record.getMessage())
  for name in ("absl", "orbax", "jax", "grain", "transformers", "tensorflow_datasets"):
    py_logging.getLogger(name).setLevel(py_logging.WARNING)
  sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    import transformers
    transformers.logging.set_verbosity_error()
  except ImportError:
    pass


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every bad `--config` (missing file, unknown variant, unknown
  field, bad value) as one line instead of a traceback."""
  try:
    rest = flags.FLAGS(argv)
    flags.FLAGS.config.to_dict()  # config_flags loads the file lazily: fail here, not in `main`.
    return rest
  except Exception as e:  # noqa: BLE001 -- config_flags raises whatever the config file raises.
    sys.exit(f"error: {_flag_error(e, argv)}")


def _flag_error(e: BaseException, argv: list[str]) -> str:
  """One line for a command-line error: the flag, and what is wrong with it."""
  import difflib
  from grpo_jax.config import load_config
  import ml_collections
  path = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
  if path is not None:
    file = path.split(":", 1)[0]
    if not os.path.isfile(file):
      return f"--config: no such file {file!r}"
    try:
      config = load_config(path)
    except Exception as load_error:  # noqa: BLE001 -- the config file itself fails.
      text = str(load_error)
      if "Traceback" in text:  # config_flags wraps the config file's own exception.
        text = [line for line in text.strip().splitlines() if line.strip()][-1]
      return f"--config={path}: {text.strip()}"
    for arg in argv[1:]:
      if not arg.startswith("--config."):
        continue
      node, walked = config, "config"
      for part in arg[len("--"):].split("=", 1)[0].split(".")[1:]:
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
          keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
          close = difflib.get_close_matches(part, keys, n=1)
          hint = f"did you mean {close[0]!r}?" if close else (
              f"known: {', '.join(sorted(keys))}" if keys else f"{walked} is not a section")
          return f"{arg.split('=', 1)[0]}: {walked} has no field {part!r} ({hint})"
        node, walked = node[part], f"{walked}.{part}"
  text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  return text[len("flag "):] if text.startswith("flag ") else text


def define_flags() -> None:
  """Defined only when run as a program, so importing this module defines no flags."""
  config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (:variant allowed).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
  flags.mark_flag_as_required("config")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=_parse_flags)
