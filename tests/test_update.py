"""The policy update: chunked LM head on the trainer's path, micro-batch metrics, memory plan."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
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
