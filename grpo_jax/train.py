r"""`python -m grpo_jax.train --config=configs/<name>.py --workdir=DIR [--config.field=value ...]`

The one GRPO loop: data -> rollout (G responses per prompt) -> rewards (host) -> group-relative
advantages -> old / reference log-probs -> sharded policy update -> metrics, export, checkpoint.
`main` parses flags and calls `run(config, workdir)`; the pure pieces live in their own modules
(`advantages`, `losses`, `update`, `sampling`, ...) and are jitted here once, with explicit
shardings and the train state donated.
"""

from __future__ import annotations

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
from grpo_jax.config import ConfigError, RunConfig, resolve

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

  The shared prefix applies when the update's rows come in whole groups: one minibatch per step
  (several minibatches are random row subsets).
  """
  count = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))
  shape = dict(mesh.shape)
  d = run.data
  prompt_len = min([b for b in d.length_buckets if b >= d.max_prompt_len] or [d.max_prompt_len])
  grouped = run.train.shared_prefix and run.minibatch == run.rollout_batch
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
                   info_mask_NxR, rewards_N, *, group_size: int, num_groups: int, estimator: str,
                   adv_eps: float, filter_zero_std: bool, kl_on_filtered: bool):
  """Expands prompts to groups, computes advantages and the loss / KL masks of the update."""
  prompt_ids, prompt_mask = groups.expand_groups((prompt_ids_BxP, prompt_mask_BxP), group_size)
  gids_N = groups.group_ids(num_groups, group_size)
  advantages_N = adv_lib.compute_advantages(rewards_N, gids_N, num_groups, estimator=estimator,
                                            eps=adv_eps)
  mean_G, std_G, count_G = adv_lib.group_stats(rewards_N, gids_N, num_groups)
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
    self.setup = setup
    run, mesh = setup.run, setup.mesh
    rep = NamedSharding(mesh, P())
    batch_sh = lambda nd: sharding.batch_sharding(mesh, nd)
    self.batch_sh = batch_sh
    r = run.rollout
    self.generate = functools.partial(
        sampling.generate, setup.graphdef, group_size=r.group_size,
        max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
        stop_token_ids=setup.stop_token_ids, pad_token_id=setup.tokenizer.pad_token_id,
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
    train_step = jax.jit(
        functools.partial(update.train_step, graphdef=setup.graphdef, tx=setup.tx, rl=run.rl,
                          response_len=r.max_new_tokens, num_micro=num_micro, temperature=temp,
                          lm_head_chunk=run.train.lm_head_chunk, group_size=group),
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
          lm_head_chunk=run.train.lm_head_chunk, group_size=fwd_group),
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
  BM25 server started on 127.0.0.1 for `search.local_corpus`)."""

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
        max_obs_tokens=cfg.max_obs_tokens, max_doc_chars=cfg.max_doc_chars or None, topk=cfg.topk)
    self.setup = setup

  def __call__(self, policy_state, prompt_ids, prompt_mask, key, **overrides):
    from grpo_jax.rollout import search_sampler
    setup, r = self.setup, self.setup.run.rollout
    kwargs = dict(group_size=r.group_size, temperature=r.temperature, top_k=r.top_k,
                  top_p=r.top_p)
    kwargs.update(overrides)
    return search_sampler.search_generate(
        setup.graphdef, policy_state, prompt_ids, prompt_mask, key, tokenizer=setup.tokenizer,
        retriever=self.client, config=self.config, eos_token_id=setup.tokenizer.eos_token_id,
        pad_token_id=setup.tokenizer.pad_token_id, mesh=setup.mesh, **kwargs)


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
  """Checks that need files (data, tokenizer, reward functions) before anything compiles."""
  from grpo_jax import data as data_lib
  from grpo_jax import rewards as rewards_lib
  try:
    rewards_lib.make_reward_fn(run.rewards)
  except (ValueError, ImportError, AttributeError, TypeError) as e:
    msg = str(e).splitlines()[0]
    raise ConfigError(msg if msg.startswith("config.") else f"config.rewards: {msg}") from None
  try:
    data_lib.check_source(run.data)
  except data_lib.DataError as e:
    msg = str(e).splitlines()[0]
    raise ConfigError(msg if msg.startswith("config.") else f"config.data: {msg}") from None
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir: {workdir!r} exists and is not a directory")


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
  """
  from grpo_jax import data as data_lib
  from grpo_jax import rewards as rewards_lib
  from grpo_jax import export as export_lib
  from grpo_jax import evaluation

  run = run_config
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(run.mesh, devices)
  tokenizer = load_tokenizer(run)
  reward_fn = rewards_lib.make_reward_fn(run.rewards)
  dataset = data_lib.make_dataset(run.data, tokenizer, process_index=jax.process_index(),
                                  process_count=jax.process_count())
  data_iter = iter(dataset)

  setup, state, abstract_state = init_state(run, mesh, tokenizer, workdir)
  steps = Steps(setup)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       save_every=run.train.checkpoint_every,
                                       keep=run.train.keep_checkpoints)
  start = checkpointer.latest_step()
  if start is not None:
    state, data_state = checkpointer.restore(start, abstract_state, run)
    data_iter.set_state(data_state)
    logging.info("resumed from step %d of %s", start, workdir)
  start = start or 0
  if is_main:
    ckpt_lib.dump_json(os.path.join(workdir, "config.json"), ckpt_lib.config_to_json(run))

  writer = metrics_lib.MetricsWriter(workdir, total_steps=run.train.num_steps, initial_step=start,
                                     progress_bar=run.train.progress_bar)
  data_log_path = os.path.join(workdir, "data_seen.jsonl")
  data_log = None
  if is_main:  # Steps after the checkpoint we resume from are redone: drop their old lines.
    metrics_lib.truncate_jsonl(data_log_path, start)
    data_log = open(data_log_path, "a")
  pending = None  # Metrics of the previous step: fetched one step late, the device never waits.
  last = {}
  end = run.train.num_steps if stop_after is None else min(run.train.num_steps, start + stop_after)
  saved = start
  stop = _StopRequest()
  try:
    for step in range(start, end):
      t0 = time.perf_counter()
      # If this step fails before the update (a reward function raises, the retriever is down),
      # the finished steps are saved with the iterator state from before this step's batch.
      data_state_before = data_iter.get_state()
      updating = False
      try:
        batch = next(data_iter)
        seen = np.asarray(batch["index"])
        if jax.process_count() > 1:  # Every host's slice, in global-batch order (all hosts call it).
          seen = np.asarray(multihost_utils.process_allgather(seen, tiled=True))
        if data_log is not None:  # Which examples each step trained on: audits and resume tests.
          data_log.write(json.dumps({"step": step + 1, "index": seen.tolist()}) + "\n")
          data_log.flush()
        prompt_ids, prompt_mask = host.to_global((batch["prompt_ids"], batch["prompt_mask"]), mesh)
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
        sample_key, _ = jax.random.split(step_key)

        # 1. Rollout: G responses per prompt, prompt prefilled once.
        out = steps.sample(setup.policy_state(state.params), prompt_ids, prompt_mask, sample_key)
        completions_h = host.to_host(out.tokens)
        cmask_h = host.to_host(out.mask)
        t_rollout = time.perf_counter()

        # 2. Rewards on the host that holds the text.
        g = run.rollout.group_size
        texts = getattr(out, "texts", None) or host.decode(tokenizer, completions_h, cmask_h)
        prompts_rep = [p for p in batch["prompt_text"] for _ in range(g)]
        examples_rep = [host.example(batch, i) for i in range(len(batch["prompt_text"])) for _ in range(g)]
        rw = reward_fn(prompts_rep, texts, examples_rep)
        rewards_h = np.asarray(rw.total, np.float32)
        components = {k: np.asarray(v, np.float32) for k, v in rw.components.items()}
        lengths_h = cmask_h.sum(axis=1)
        if run.rl.overlong_buffer > 0:
          pen = overlong_penalty(lengths_h, run.rollout.max_new_tokens, run.rl.overlong_buffer,
                                 run.rl.overlong_penalty)
          rewards_h = rewards_h + pen
          components["overlong"] = pen
        t_reward = time.perf_counter()

        # 3. Advantages over the global batch, and the update batch.
        rewards, comps = host.to_global((rewards_h, components), mesh)
        info_mask = getattr(out, "info_mask", None)
        if info_mask is None:
          info_mask = jnp.zeros_like(out.mask)
        train_batch, gstats = steps.assemble(prompt_ids, prompt_mask, out.tokens, out.mask,
                                             info_mask, rewards)
        roll_metrics = steps.rollout_metrics(rewards, comps, train_batch["advantages"], out.mask,
                                             out.truncated, gstats["zero_spread_frac"])

        # 4. Old / reference log-probs where needed, then the update.
        n_mb = run.rollout_batch // run.minibatch
        on_policy = run.train.ppo_epochs == 1 and n_mb == 1
        if not on_policy:
          train_batch["old_logp"] = steps.logprobs(state.params, train_batch["tokens"],
                                                   train_batch["attn_mask"])
        if run.rl.loss.kl_coef > 0:
          train_batch["ref_logp"] = steps.ref_logprobs(state.params, train_batch["tokens"],
                                                       train_batch["attn_mask"])
        export_now = run.train.export_every and (step + 1) % run.train.export_every == 0
        if export_now:
          pre_update = {k: train_batch[k] for k in ("tokens", "attn_mask")}
          old_for_export = train_batch.get("old_logp")
          if old_for_export is None:
            old_for_export = steps.logprobs(state.params, train_batch["tokens"],
                                            train_batch["attn_mask"])
        upd_metrics = []
        updating = True  # The state is donated from here on: no emergency save.
        for epoch in range(run.train.ppo_epochs):
          if n_mb == 1:
            minibatches = [train_batch]
          else:
            perm = np.asarray(jax.random.permutation(
                jax.random.fold_in(step_key, 1000 + epoch), run.rollout_batch))
            minibatches = [steps.take(train_batch, perm[i * run.minibatch:(i + 1) * run.minibatch])
                           for i in range(n_mb)]
            minibatches = [jax.device_put(mb, jax.tree.map(lambda x: steps.batch_sh(x.ndim), mb))
                           for mb in minibatches]
          for mb in minibatches:
            state, m = steps.train_step(state, mb)
            upd_metrics.append(m)
        state = steps.finish_step(state)
        t_update = time.perf_counter()

        # 5. Metrics of the previous step (its arrays are ready by now), this step's timings.
        if pending is not None:
          last = _flush(writer, pending)
        lr = update.learning_rate_schedule(run.optim, run.train.num_steps * run.train.ppo_epochs
                                           * n_mb)(max((step + 1) * run.train.ppo_epochs * n_mb - 1, 0))
        pending = (step + 1, roll_metrics, upd_metrics, {
            "time/rollout_s": t_rollout - t0, "time/reward_s": t_reward - t_rollout,
            "time/update_s": t_update - t_reward, "time/step_s": t_update - t0,
            "throughput/tokens_per_s": float(lengths_h.sum()) * jax.process_count()
                                       / max(t_update - t0, 1e-9),
            "optim/learning_rate": float(lr),
          **{k if k.startswith("search/") else f"search/{k}": float(v)
             for k, v in (getattr(out, "metrics", None) or {}).items()},
        })
        writer.advance()

        # 6. Export, evaluation and checkpoint.
        if export_now:
          new_logp = steps.logprobs(state.params, pre_update["tokens"], pre_update["attn_mask"])
          export_lib.write_step(
              workdir, step + 1, tokenizer=tokenizer, run=run, texts=texts, rewards=rewards,
              components=comps, train_batch=train_batch, gstats=gstats, truncated=out.truncated,
              old_logp=old_for_export, new_logp=new_logp, info_mask=info_mask,
              retrieved=_retrieved_text(out))
        if run.train.eval_every and (step + 1) % run.train.eval_every == 0 and run.data.eval_split:
          eval_metrics = evaluation.evaluate(steps, setup.policy_state(state.params), run,
                                             tokenizer, reward_fn,
                                             mesh, step_key)
          if pending is not None:
            pending[3].update(eval_metrics)
        if jax.process_count() > 1:  # SIGTERM may reach hosts in different steps: stop together.
          stop.requested = bool(np.max(multihost_utils.process_allgather(
              np.int32(stop.requested))))
        if (checkpointer.should_save(step + 1) or step + 1 == end or stop.requested):
          if pending is not None:  # Every step a checkpoint holds has its metrics written.
            last, pending = _flush(writer, pending), None
          checkpointer.save(step + 1, state, data_iter.get_state(), run)
          saved = step + 1
      except BaseException:
        # With several processes the others are not in this handler: a save (a collective) would
        # wait for them; the last periodic checkpoint stands.
        if not updating and step > saved and jax.process_count() == 1:
          logging.error("step %d failed: saving the %d finished steps before re-raising", step + 1,
                        step)
          checkpointer.save(step, state, data_state_before, run)
        raise
      if stop.requested:
        logging.warning("stop requested (SIGTERM): checkpointed step %d, exiting", step + 1)
        break
    if pending is not None:
      last = _flush(writer, pending)
  finally:
    stop.restore()
    if steps.search is not None and steps.search.server is not None:
      steps.search.server.close()
    checkpointer.close()
    writer.close()
    if data_log is not None:
      data_log.close()
  if run.train.final_export and state is not None:
    export_model(setup, state, os.path.join(workdir, f"{run.train.final_export}_export"),
                 run.train.final_export)
  if is_main and os.path.exists(writer.path):
    rows = metrics_lib.read_metrics(writer.path)
    metrics_lib.plot_curves(rows, ("reward/mean", "eval/greedy_mean_reward"),
                            os.path.join(workdir, "reward_curve.png"), title="GRPO reward")
  return last


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


class _StopRequest:
  """Turns SIGTERM (preemption, scancel) into a checkpoint at the end of the current step."""

  def __init__(self):
    import signal
    import threading
    self.requested = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    import signal
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _retrieved_text(out) -> list[str] | None:
  """Per response, the retrieved (loss-masked) text of a search rollout; None otherwise."""
  segments = getattr(out, "segments", None)
  if segments is None:
    return None
  return ["".join(text for text, retrieved in row if retrieved) for row in segments]


def _flush(writer: metrics_lib.MetricsWriter, pending) -> dict[str, float]:
  step, roll, upd, host = pending
  out = {k: float(v) for k, v in jax.device_get(roll).items()}
  upd = jax.device_get(upd)
  for key in upd[0]:
    out[f"update/{key}" if key not in ("kl", "entropy") else key] = float(
        np.mean([m[key] for m in upd]))
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
  from grpo_jax import distributed
  distributed.initialize()
  from grpo_jax.rewards import RewardError
  from grpo_jax.rollout.retriever_client import RetrieverError
  try:
    run_config = resolve(flags.FLAGS.config, num_devices=jax.device_count())
    preflight(run_config, flags.FLAGS.workdir)
    run(run_config, flags.FLAGS.workdir)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  except (RewardError, RetrieverError) as e:  # The finished steps are checkpointed by `run`.
    sys.exit(f"error: {str(e).splitlines()[0]}")
  except jax.errors.JaxRuntimeError as e:
    msg = distributed.peer_failure_message(e)
    if msg is None:
      raise
    logging.error("%s", msg)
    sys.exit(f"error: {msg}")


def define_flags() -> None:
  """Defined only when run as a program, so importing this module defines no flags."""
  config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (:variant allowed).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
  flags.mark_flag_as_required("config")


if __name__ == "__main__":
  define_flags()
  app.run(main)
