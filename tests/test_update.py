"""The policy update: chunked LM head on the trainer's path, micro-batch metrics, memory plan."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from grpo_jax import losses, update
from grpo_jax.config import RLConfig
from grpo_jax.models import Decoder
from grpo_jax.testing.models import tiny_config

P, R, G, NG = 6, 5, 4, 2  # prompt, response, group size, groups
N = NG * G


def _tiny(vocab=96, **kw):
  model = Decoder(tiny_config("qwen2", vocab_size=vocab, **kw), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  return graphdef, params


def _batch(vocab=96, seed=0, n_groups=NG):
  """A grouped batch (a a a a b b b b): left-padded prompts repeated G times, ragged responses."""
  rng = np.random.RandomState(seed)
  n = n_groups * G
  prompt = rng.randint(1, vocab, (n_groups, P))
  pmask = np.ones((n_groups, P), np.int32)
  pmask[0, :2] = 0
  resp = rng.randint(1, vocab, (n, R))
  rmask = np.ones((n, R), np.int32)
  for i in range(n):
    rmask[i, rng.randint(1, R + 1):] = 0  # responses end early (stop token, then padding)
  tokens = np.concatenate([np.repeat(prompt, G, 0), resp], 1)
  attn = np.concatenate([np.repeat(pmask, G, 0), rmask], 1)
  loss_mask = rmask.astype(np.float32)
  loss_mask[1] = 0  # a row outside the loss (filtered) keeps its KL
  return {
      "tokens": jnp.asarray(tokens, jnp.int32), "attn_mask": jnp.asarray(attn, jnp.int32),
      "loss_mask": jnp.asarray(loss_mask), "kl_mask": jnp.asarray(rmask, jnp.float32),
      "advantages": jnp.asarray(rng.normal(size=n), jnp.float32),
  }


def _arrays(jaxpr):
  """Every array shape produced anywhere in `jaxpr`, sub-jaxprs (scan, map, checkpoint) included."""
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield tuple(getattr(v.aval, "shape", ()))
    for p in eqn.params.values():
      subs = p if isinstance(p, (list, tuple)) else [p]
      for sub in subs:
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          yield from _arrays(getattr(inner, "jaxpr", inner))


@pytest.mark.parametrize("chunk", [0, 2])
def test_update_never_builds_full_logits(chunk, monkeypatch):
  """The gradient of the GRPO loss holds at most one [rows, C, V] chunk of logits, never the
  [N, R, V] (or [N, L, V]) tensor; with the automatic chunk on a large vocabulary, C < R."""
  vocab = 6000
  graphdef, params = _tiny(vocab)
  batch = _batch(vocab)
  rl = RLConfig()
  den = update.minibatch_denominators(batch, rl)
  if chunk == 0:  # Force the automatic size below R: 8 rows x 6000 x 4 B = 192 KB per position.
    monkeypatch.setattr(losses, "AUTO_CHUNK_BYTES", 2 * N * vocab * 4)
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: update.loss_fn(
      p, graphdef, batch, rl, R, den, 1.0, lm_head_chunk=chunk)[0]))(params)
  sizes = [int(np.prod(s)) for s in _arrays(jaxpr.jaxpr) if s and s[-1] == vocab and len(s) >= 3]
  assert sizes, "no logits at all?"
  assert max(sizes) <= N * 2 * vocab, f"a logits tensor of {max(sizes)} elements, chunk 2 has " \
                                      f"{N * 2 * vocab}"


def _off_policy(batch, seed):
  """old_logp spread around the current ones so that ratios differ per micro-batch."""
  rng = np.random.RandomState(seed)
  return dict(batch, old_logp=jnp.asarray(rng.normal(-4.6, 0.5, batch["loss_mask"].shape),
                                          jnp.float32))


def test_micro_batch_metrics_equal_the_whole_minibatch():
  """ratio_max is the max over micro-batches (not their mean); clip fractions, KL estimates and
  ratio_mean are token-weighted, so 4 micro-batches report what one pass over the batch does."""
  graphdef, params = _tiny()
  batch = _off_policy(_batch(), 1)
  rl = RLConfig(loss=losses.LossConfig(clip_low=0.1, clip_high=0.1))
  tx = update.make_optimizer(update.OptimConfig(learning_rate=0.0, warmup_steps=0), 10)
  state = update.TrainState(params=params, opt_state=tx.init(params), step=jnp.int32(0),
                            rng=jax.random.PRNGKey(0), skipped=jnp.int32(0))
  den = update.minibatch_denominators(batch, rl)
  loss = jax.jit(lambda b: update.loss_fn(params, graphdef, b, rl, R, den, 1.0)[1])
  want = loss(batch)
  _, got = jax.jit(lambda s, b: update.train_step(
      s, b, graphdef=graphdef, tx=tx, rl=rl, response_len=R, num_micro=4, temperature=1.0))(
          state, batch)
  # The micro-batches really differ (else the test could not tell mean from max).
  per_micro = [loss(jax.tree.map(lambda x: x[j::4], batch)) for j in range(4)]
  assert len({round(float(m["ratio_max"]), 4) for m in per_micro}) > 1
  assert len({float(m["tokens"]) for m in per_micro}) > 1
  for key in ("ratio_max", "ratio_mean", "clip_frac", "clip_frac_high", "clip_frac_low",
              "approx_kl", "ppo_kl", "pg_loss", "loss", "entropy"):
    np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=1e-6, err_msg=key)


# ----------------------------------------------------------------------------------------------
# Shared-prefix update: each prompt's forward once per group, equal to the plain rows
# ----------------------------------------------------------------------------------------------


def _lora_model():
  from grpo_jax.models import LoraConfig, trainable
  lora = LoraConfig(rank=4, alpha=8.0, target_modules=("all-linear",))
  model = Decoder(tiny_config("llama3"), rngs=nnx.Rngs(0), lora=lora)
  # B is zero-initialised: give the adapters a value so that they change the forward.
  for path, v in nnx.iter_graph(model):
    if isinstance(v, nnx.Variable) and "lora" in str(path) and path[-1] == "b":
      v.set_value(0.05 * jax.random.normal(jax.random.PRNGKey(len(path)), v.get_value().shape))
  graphdef, params, frozen = nnx.split(model, trainable(model), ...)
  return graphdef, params, frozen


def _rl():
  return RLConfig(loss=losses.LossConfig(clip_low=0.1, clip_high=0.1, kl_coef=0.05,
                                         entropy_coef=0.01))


def _grad_keeper():
  """An "optimizer" whose state is the last gradient (and whose update is zero): the train step
  then hands back the gradient it accumulated over its micro-batches."""
  return optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def _step_fn(graphdef, rl, tx, frozen, num_micro, group_size):
  return jax.jit(lambda state, batch: update.train_step(
      state, batch, frozen, graphdef=graphdef, tx=tx, rl=rl, response_len=R, num_micro=num_micro,
      temperature=0.7, group_size=group_size))


def _model_for(kind):
  """(graphdef, params, frozen, vocab) of the tiny model, with LoRA adapters when kind says so."""
  if "lora" in kind:
    graphdef, params, frozen = _lora_model()
    return graphdef, params, frozen, tiny_config("llama3").vocab_size
  graphdef, params = _tiny()
  return graphdef, params, None, 96


@pytest.mark.parametrize("kind", ["full", pytest.param("lora", marks=pytest.mark.slow),
                                  "sharded_lora"])
def test_shared_prefix_equals_plain(kind):
  """Log-probs, entropies, old/ref log-probs, loss, gradients, the updated params and every metric
  of the shared-prefix path equal the plain path's (float32 tolerance): unsharded and on the
  8-device mesh, full fine-tuning and LoRA, with 2 micro-batches of whole groups."""
  graphdef, params, frozen, vocab = _model_for(kind)
  batch = _off_policy(_batch(vocab, seed=3, n_groups=4), 2)
  batch["ref_logp"] = batch["old_logp"] + 0.1
  rl = _rl()
  tx = _grad_keeper()  # The step hands back its gradient (accumulated over the micro-batches).
  state = update.TrainState(params=params, opt_state=tx.init(params), step=jnp.int32(0),
                            rng=jax.random.PRNGKey(0), skipped=jnp.int32(0))
  if kind.startswith("sharded"):
    from grpo_jax import sharding
    mesh = sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=2))
    assert mesh.size == 8
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    state = jax.device_put(state, jax.tree.map(
        lambda x: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), state))
  logp = jax.jit(lambda p, b, g, use_lora: update.batched_response_logprobs(
      graphdef, p, b["tokens"], b["attn_mask"], R, microbatch=2 * G, temperature=0.7,
      frozen=frozen, use_lora=use_lora, group_size=g), static_argnums=(2, 3))
  for use_lora in ((True, False) if frozen is not None else (True,)):
    np.testing.assert_allclose(logp(params, batch, G, use_lora),
                               logp(params, batch, None, use_lora), rtol=1e-5, atol=1e-5)

  want_state, want = _step_fn(graphdef, rl, tx, frozen, 2, None)(state, batch)
  want_g = want_state.opt_state
  got_state, got = _step_fn(graphdef, rl, tx, frozen, 2, G)(state, batch)
  got_g = got_state.opt_state
  assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(want_g)) > 1e-3  # gradients flow
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))))
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_group_micro_batches_hold_whole_groups():
  x = jnp.arange(4 * G)  # 4 groups of G
  micro = update._split_micro(x, 2, G)
  assert micro.shape == (2, 2 * G)
  # micro-batch 0: groups 0 and 2; micro-batch 1: groups 1 and 3 (strided, whole groups).
  np.testing.assert_array_equal(micro[0] // G, [0] * G + [2] * G)
  np.testing.assert_array_equal(micro[1] // G, [1] * G + [3] * G)
  np.testing.assert_array_equal(update._merge_micro(micro, G), x)
  np.testing.assert_array_equal(update._merge_micro(update._split_micro(x, 4), None), x)


# ----------------------------------------------------------------------------------------------
# Memory plan
# ----------------------------------------------------------------------------------------------


def _smollm2_config():
  from grpo_jax.models import ModelConfig
  return ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                     num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True,
                     model_type="llama")


GiB = 2**30
_OOM_SETTING = dict(minibatch=64, prompt_len=128, response_len=96, trainable_params=134_515_008)


def test_estimate_is_close_to_what_xla_compiled_for_smollm2():
  """Issue 15 measured 31.5 GB of XLA temporaries for SmolLM2 at 64 rows x 224 tokens (no remat,
  LM head chunked): the estimate must be at or a little above that, never far below."""
  est = update.activation_bytes(_smollm2_config(), 64, 128, 96)
  assert 31.5e9 <= est <= 1.15 * 31.5e9


@pytest.mark.parametrize("group", [None, 8])
def test_plan_fits_the_oom_setting_in_the_budget(group):
  """The setting that ran out of memory (8 prompts x G = 8, P = 128, R = 96 on SmolLM2) gets a
  micro-batch whose estimated peak fits 8 GiB; whole groups when the prefix is shared."""
  plan = update.plan_update(_smollm2_config(), **_OOM_SETTING, group_size=group,
                            budget=(8 * GiB, "test", False))
  assert plan.automatic and not plan.remat
  assert plan.microbatch < 64 and 64 % plan.microbatch == 0
  assert plan.state_bytes + plan.activation_bytes <= 8 * GiB
  assert plan.shared_prefix == (group is not None)
  if group:
    assert plan.microbatch % group == 0
  # The next larger micro-batch would not have fit.
  bigger = min(m for m in range(plan.microbatch + 1, 65) if 64 % m == 0 and m % (group or 1) == 0)
  assert plan.state_bytes + update.activation_bytes(
      _smollm2_config(), bigger, 128, 96, group_size=group) > 8 * GiB


def test_plan_remat_only_when_nothing_fits_and_explicit_wins():
  cfg = _smollm2_config()
  roomy = update.plan_update(cfg, **_OOM_SETTING, group_size=8, budget=(1000 * GiB, "test", False))
  assert roomy.microbatch == 64 and not roomy.remat
  tight = update.plan_update(cfg, **_OOM_SETTING, group_size=8, budget=(5 * GiB, "test", False))
  assert tight.remat and tight.microbatch >= 8  # one group no longer fits without remat
  explicit = update.plan_update(cfg, **_OOM_SETTING, group_size=8, microbatch=32,
                                budget=(5 * GiB, "test", False))
  assert explicit.microbatch == 32 and not explicit.remat and not explicit.automatic
  # Per-device budgets (accelerators) divide activations over the batch axes, state over fsdp.
  per_dev = update.plan_update(cfg, **_OOM_SETTING, group_size=8, batch_div=8, model_div=8,
                               budget=(2 * GiB, "test", True))
  assert per_dev.microbatch % 8 == 0 and per_dev.state_bytes < 1 * GiB
  assert "micro-batch" in roomy.describe(64)


# ----------------------------------------------------------------------------------------------
# Several minibatches per step: whole groups shuffled, the shared prefix still applies
# ----------------------------------------------------------------------------------------------


def test_group_shuffle_is_a_permutation_of_whole_groups():
  """With a group size every minibatch holds whole groups (G contiguous rows, in order) and the
  minibatches together hold each row once; without one, the row shuffle is what it always was."""
  key = jax.random.PRNGKey(3)
  rows = update.minibatch_indices(key, 8 * G, 2 * G, G)
  assert rows.shape == (4, 2 * G)
  np.testing.assert_array_equal(np.sort(rows.reshape(-1)), np.arange(8 * G))
  blocks = rows.reshape(-1, G)  # Each run of G rows is one group, in order.
  np.testing.assert_array_equal(blocks % G, np.broadcast_to(np.arange(G), blocks.shape))
  np.testing.assert_array_equal(blocks // G, np.broadcast_to(blocks[:, :1] // G, blocks.shape))
  assert list(blocks[:, 0] // G) != list(range(8))  # The groups really are shuffled.
  np.testing.assert_array_equal(update.minibatch_indices(key, 8 * G, 2 * G),
                                np.asarray(jax.random.permutation(key, 8 * G)).reshape(4, 2 * G))
  with pytest.raises(ValueError, match="group_size"):
    update.minibatch_indices(key, 8 * G, 6, G)


@pytest.mark.parametrize("kind", ["full", "sharded_lora"])
def test_shared_prefix_equals_plain_over_minibatches_and_epochs(kind):
  """2 epochs x 2 minibatches (whole groups, shuffled per epoch) x 2 micro-batches with AdamW:
  every step's metrics and the final params of the shared-prefix path equal the plain path's on
  the same split, unsharded and on the 8-device mesh with LoRA."""
  graphdef, params, frozen, vocab = _model_for(kind)
  n_groups, minibatch = 8, 4 * G
  batch = _off_policy(_batch(vocab, seed=5, n_groups=n_groups), 4)
  batch["ref_logp"] = batch["old_logp"] + 0.1
  tx = update.make_optimizer(update.OptimConfig(learning_rate=3e-3, warmup_steps=0), 8)
  state = update.TrainState(params=params, opt_state=tx.init(params), step=jnp.int32(0),
                            rng=jax.random.PRNGKey(0), skipped=jnp.int32(0))
  put = lambda tree: tree
  if kind.startswith("sharded"):
    from grpo_jax import sharding
    mesh = sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=2))
    put = lambda tree: {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim))
                        for k, v in tree.items()}
    state = jax.device_put(state, jax.tree.map(
        lambda x: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), state))
  steps = {g: _step_fn(graphdef, _rl(), tx, frozen, 2, g) for g in (None, G)}
  states = {g: jax.tree.map(jnp.copy, state) for g in steps}
  for epoch in range(2):
    rows = update.minibatch_indices(jax.random.PRNGKey(epoch), n_groups * G, minibatch, G)
    for idx in rows:
      mb = put(jax.tree.map(lambda x: x[idx], batch))
      metrics = {}
      for g, step in steps.items():
        states[g], metrics[g] = step(states[g], mb)
      for key in metrics[None]:
        np.testing.assert_allclose(metrics[G][key], metrics[None][key], rtol=2e-5, atol=1e-6,
                                   err_msg=f"epoch {epoch}: {key}")
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(states[None].params),
                                                            jax.tree.leaves(params)))
  assert moved > 1e-3  # The params did move (4 AdamW steps).
  for a, b in zip(jax.tree.leaves(states[G].params), jax.tree.leaves(states[None].params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_step_metrics_keep_extremes():
  """The metrics row of a step with several optimizer updates: max of `*_max`, min of `*_min`,
  mean of the rest (train._flush writes them)."""
  from grpo_jax import train

  class Writer:
    def write(self, step, row):
      self.row = (step, row)

  upd = [{"ratio_max": jnp.float32(1.5), "ratio_min": jnp.float32(0.5), "loss": jnp.float32(1.0),
          "kl": jnp.float32(0.2)},
         {"ratio_max": jnp.float32(3.0), "ratio_min": jnp.float32(0.25), "loss": jnp.float32(2.0),
          "kl": jnp.float32(0.4)},
         {"ratio_max": jnp.float32(1.0), "ratio_min": jnp.float32(0.75), "loss": jnp.float32(3.0),
          "kl": jnp.float32(0.6)}]
  writer = Writer()
  out = train._flush(writer, (7, {"reward/mean": jnp.float32(0.5)}, upd, {"time/step_s": 1.0}))
  assert writer.row[0] == 7 and writer.row[1] is out
  assert out["update/ratio_max"] == 3.0 and out["update/ratio_min"] == 0.25
  np.testing.assert_allclose([out["update/loss"], out["kl"]], [2.0, 0.4], rtol=1e-6)
  assert out["reward/mean"] == 0.5 and out["time/step_s"] == 1.0


# ----------------------------------------------------------------------------------------------
# Responses trimmed to their real lengths: micro-batches by length, each in its own bucket
# ----------------------------------------------------------------------------------------------

RT, BUCKETS = 12, (4, 8, 12)  # a longer response budget and its trimmed lengths
# Longest response of each group (rows of a group are shorter or equal): one row runs to RT,
# two end one token past a bucket (a trim one token short would cut them).
GROUP_LENGTHS = (5, 12, 9, 2)


def _ragged_batch(vocab=96, seed=0, lengths=GROUP_LENGTHS):
  """Groups whose responses end at very different positions; random tokens, old and reference
  log-probs in the padding (which must not matter)."""
  rng = np.random.RandomState(seed)
  n_groups = len(lengths)
  n = n_groups * G
  prompt = rng.randint(1, vocab, (n_groups, P))
  pmask = np.ones((n_groups, P), np.int32)
  pmask[1, :3] = 0
  rmask = np.zeros((n, RT), np.int32)
  for b, length in enumerate(lengths):
    for i in range(G):
      rmask[b * G + i, :length if i == 1 else rng.randint(1, length + 1)] = 1
  tokens = np.concatenate([np.repeat(prompt, G, 0), rng.randint(1, vocab, (n, RT))], 1)
  attn = np.concatenate([np.repeat(pmask, G, 0), rmask], 1)
  loss_mask = rmask.astype(np.float32)
  loss_mask[5] = 0
  old = rng.normal(-4.6, 0.5, (n, RT))
  return {
      "tokens": jnp.asarray(tokens, jnp.int32), "attn_mask": jnp.asarray(attn, jnp.int32),
      "loss_mask": jnp.asarray(loss_mask), "kl_mask": jnp.asarray(rmask, jnp.float32),
      "advantages": jnp.asarray(rng.normal(size=n), jnp.float32),
      "old_logp": jnp.asarray(old, jnp.float32), "ref_logp": jnp.asarray(old + 0.1, jnp.float32),
  }


def test_response_buckets():
  assert update.response_buckets(128) == (16, 32, 64, 128)
  assert update.response_buckets(48) == (16, 32, 48)
  assert update.response_buckets(5) == (5,)
  assert update.response_buckets(1000)[-1] == 1000 and len(update.response_buckets(1000)) == 4


@pytest.mark.parametrize("group", [None, G])
def test_micro_batches_by_length_pick_their_own_bucket(group):
  """Micro-batches (whole groups with G) come shortest first, each trimmed to the smallest
  bucket that holds its longest response; a batch of equal lengths is not reordered."""
  batch = _ragged_batch()
  k = 4
  ordered, rows = update._order_by_length(batch, k, group, RT)
  np.testing.assert_array_equal(np.sort(np.asarray(rows)), np.arange(len(rows)))
  micro = jax.tree.map(lambda x: update._split_micro(x, k, group), ordered)
  if group:  # Whole groups, in order.
    blocks = np.asarray(update._split_micro(rows, k, group)).reshape(-1, G)
    np.testing.assert_array_equal(blocks % G, np.broadcast_to(np.arange(G), blocks.shape))
  chosen = [int(update._trimmed(lambda b, r, t: jnp.int32(r), jax.tree.map(lambda x: x[j], micro),
                                RT, BUCKETS)) for j in range(k)]
  assert chosen == ([4, 8, 12, 12] if group else [4, 4, 8, 12]), chosen
  full = dict(batch, attn_mask=batch["attn_mask"].at[:, P:].set(1))
  np.testing.assert_array_equal(update._order_by_length(full, k, group, RT)[1],
                                np.arange(len(rows)))


def test_packed_or_trimmed_whichever_costs_less():
  """SmolLM2, P = 256, G = 8, R = 128: a group of equal 16-token responses runs trimmed to the
  16 bucket (8 x 16 tokens over 272 keys) rather than packed into the smallest row (128 tokens
  over 384 keys); one long and seven short responses run packed; every response at 128 runs the
  full bucket."""
  P8, G8, R8 = 256, 8, 128
  packing = update.response_packing(_smollm2_config(), R8, G8)

  def chosen(lengths):
    rmask = (np.arange(R8)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    batch = {"tokens": jnp.zeros((G8, P8 + R8), jnp.int32),
             "attn_mask": jnp.asarray(np.concatenate([np.ones((G8, P8), np.int32), rmask], 1))}
    r, t = update._trimmed(lambda b, r, t: (jnp.int32(r), jnp.int32(t)), batch, R8,
                           update.response_buckets(R8), packing, G8)
    return int(r), int(t)

  assert chosen([16] * 8) == (16, 0)
  assert chosen([60] + [5] * 7) == (128, 128)
  assert chosen([128] * 8) == (128, 0)


@pytest.mark.parametrize("kind", ["full", pytest.param("sharded_lora", marks=pytest.mark.slow)])
def test_trimmed_update_equals_untrimmed(kind):
  """On ragged responses, the update with micro-batches ordered by length and trimmed to buckets
  gives the untrimmed update's gradients, metrics and old/ref log-probs, shared prefix and plain
  (1 device; 8 devices with LoRA: shared prefix, packed); with every response at full length, the
  same numbers. With the shared prefix also packed (`packing`: every group but one fills its
  packed row exactly, the other runs padded; red with rows packed one position short or segments
  that see each other); the full-length batch then fits no packed row and takes the padded
  branch."""
  graphdef, params, frozen, vocab = _model_for(kind)
  tx = _grad_keeper()
  state = update.TrainState(params=params, opt_state=tx.init(params), step=jnp.int32(0),
                            rng=jax.random.PRNGKey(0), skipped=jnp.int32(0))
  ragged = _ragged_batch(vocab, seed=2)
  full = _ragged_batch(vocab, seed=2, lengths=(RT,) * 4)
  full["attn_mask"] = full["attn_mask"].at[:, P:].set(1)
  full["loss_mask"] = full["loss_mask"].at[:, :].set(1.0)
  if kind.startswith("sharded"):
    from grpo_jax import sharding
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    put = lambda b: {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim))
                     for k, v in b.items()}
    ragged, full = put(ragged), put(full)
    state = jax.device_put(state, jax.tree.map(
        lambda x: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), state))
  rl = _rl()

  def step(group, buckets, num_micro, packing=None):
    return jax.jit(lambda s, b: update.train_step(
        s, b, frozen, graphdef=graphdef, tx=tx, rl=rl, response_len=RT, num_micro=num_micro,
        temperature=0.7, group_size=group, buckets=buckets, packing=packing))

  logp = jax.jit(lambda p, b, g, buckets, packing=None: update.batched_response_logprobs(
      graphdef, p, b["tokens"], b["attn_mask"], RT, microbatch=G, temperature=0.7,
      frozen=frozen, group_size=g, buckets=buckets, packing=packing), static_argnums=(2, 3, 4))
  packing = _exact_packing(_ragged_batch(vocab, seed=2))
  sharded = kind.startswith("sharded")
  # On the mesh, only the trainer's default (shared prefix, trimmed and packed): each variant is
  # two more compiled programs, and the others are the same code as on one device.
  for group in ((G,) if sharded else (None, G)):
    num_micro = 4 if group else 2  # Plain: 8 rows (2 per device on the mesh) per micro-batch.
    untrimmed = step(group, None, num_micro)
    variants = ([(BUCKETS, packing)] if sharded else
                [(BUCKETS, None)] + ([(BUCKETS, packing)] if group else []))
    for buckets, pack in variants:
      trimmed = step(group, buckets, num_micro, pack)
      for batch in (ragged, full):
        want_state, want = untrimmed(state, batch)
        got_state, got = trimmed(state, batch)
        leaves = jax.tree.leaves(want_state.opt_state)
        assert max(float(np.max(np.abs(g))) for g in leaves) > 1e-3  # gradients flow
        for a, b in zip(jax.tree.leaves(got_state.opt_state), leaves):
          np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))))
        assert set(got) == set(want)
        for key in want:
          np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(logp(params, batch, group, buckets, pack),
                                   logp(params, batch, group, None), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Packed responses: a group's responses one after the other in one row, no padding between them
# ----------------------------------------------------------------------------------------------

def _group_sums(batch):
  extent = np.asarray(update._response_extent(batch["attn_mask"], RT))
  return extent.reshape(-1, G).sum(axis=1)


def _exact_packing(batch):
  """Packed lengths equal to the sums of all groups but the largest: each of those groups fills
  its packed row exactly (one position short would cut its last token), the largest group takes
  the padded branch."""
  sums = sorted(set(_group_sums(batch).tolist()))
  return update.Packing(tuple(sums[:-1]), keys_per_token=1e9)


def test_response_packing_lengths_and_cost():
  cfg = _smollm2_config()
  packing = update.response_packing(cfg, 128, 8)
  assert packing.lengths == (128, 192, 256, 320, 384, 448, 512, 640, 768, 896)
  # SmolLM2: a token's matmuls through 30 layers and the head weigh ~3,900 attention keys.
  assert 3000 < packing.keys_per_token < 5000
  assert update.response_packing(cfg, 128, 1) is None
  # Kept for P = 256: up to 640; at 768 a packed row's activations ([768, 1024] attention)
  # outgrow the 8 padded rows' (`activation_bytes`), which the memory plan sized for.
  assert update.packed_lengths(packing, 256, 8, 128) == (128, 192, 256, 320, 384, 448, 512, 640)
  # Long responses: a packed row's attention over its T keys costs more than the padded rows'
  # over P + R long before memory runs out; rows past 1/4 of G * R cost more than they save.
  long = update.response_packing(cfg, 8192, 16)
  assert update.packed_lengths(dataclasses.replace(long, model_config=None), 256, 16, 8192) == (
      16384, 24576, 32768)


def test_packed_micro_batches_pick_the_smallest_row_that_holds_their_groups():
  batch = _ragged_batch(seed=2)
  sums = _group_sums(batch)
  packing = _exact_packing(batch)
  k = len(sums)
  ordered, rows = update._order_by_length(batch, k, G, RT, packed=True)
  micro = jax.tree.map(lambda x: update._split_micro(x, k, G), ordered)
  chosen = [tuple(int(v) for v in update._trimmed(
      lambda b, r, t: (jnp.int32(r), jnp.int32(t)), jax.tree.map(lambda x: x[j], micro), RT,
      BUCKETS, packing, G)) for j in range(k)]
  # Shortest sums first; each packed at its own sum, the largest on the padded branch (R, 0).
  assert chosen == [(RT, int(t)) for t in sorted(sums)[:-1]] + [(RT, 0)], (chosen, sums)


def test_packed_logprobs_and_entropy_equal_the_plain_forward():
  """`response_logprobs` with packed groups: log-probs and entropies of every response token
  (0 on padding) equal the plain forward's, rows of very different lengths side by side, two of
  them with a hole in their mask (the token after the hole is predicted from the hole's hidden
  state, which sees its response's earlier tokens in both layouts)."""
  graphdef, params = _tiny()
  batch = _ragged_batch(seed=2)
  # Rows 1 and 5 run to their group's length (5 and 12): a hole at response positions 1 and 6.
  batch["attn_mask"] = batch["attn_mask"].at[1, P + 1].set(0).at[5, P + 6].set(0)
  fn = jax.jit(lambda g, t: update.response_logprobs(
      graphdef, params, batch["tokens"], batch["attn_mask"], RT, with_entropy=True,
      temperature=0.7, group_size=g, packed=t), static_argnums=(0, 1))
  want_logp, want_ent = fn(None, 0)
  got_logp, got_ent = fn(G, int(_group_sums(batch).max()))
  assert float(jnp.sum(want_logp != 0)) == float(jnp.sum(batch["attn_mask"][:, P:]))
  np.testing.assert_allclose(got_logp, want_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_ent, want_ent, rtol=1e-5, atol=1e-5)
