"""Tests of the rollout sampler against the uncached training forward and NumPy re-derivations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from grpo_jax import groups, sampling
from grpo_jax import sharding as sharding_lib
from grpo_jax import update
from grpo_jax.models import Decoder, shard_model, token_logprobs
from grpo_jax.testing.models import tiny_config

PAD = 0


def _model(name="qwen2", head_scale=30.0, seed=0, **overrides):
  """A tiny model with a scaled-up LM head (peaked distributions, no argmax near-ties) and scaled
  q/k projections (sharp attention, so that a wrong position or cache slot changes the argmax)."""
  model = Decoder(tiny_config(name, **overrides), rngs=nnx.Rngs(seed))
  model.lm_head[...] = model.lm_head[...] * head_scale
  for w in (model.layers.q_proj, model.layers.k_proj):
    w[...] = w[...] * 12.0
  return model


@functools.lru_cache(maxsize=None)
def _split(name="qwen2", **overrides):
  return nnx.split(_model(name, **overrides))


def _prompts(lengths, P, seed=0, vocab=96):
  """Left-padded prompts of the given real lengths: (ids [B, P], mask [B, P]) int32."""
  rng = np.random.default_rng(seed)
  ids = np.full((len(lengths), P), PAD, np.int32)
  mask = np.zeros((len(lengths), P), np.int32)
  for b, n in enumerate(lengths):
    ids[b, P - n:] = rng.integers(1, vocab, n)
    mask[b, P - n:] = 1
  return jnp.asarray(ids), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(graphdef, params, ids, mask):
  """The uncached training forward: logits [B, T, V]."""
  return nnx.merge(graphdef, params)(ids, attention_mask=mask)


def _uncached_greedy(graphdef, params, ids, mask, R):
  """Repeated argmax of the full uncached forward over a right-growing, fixed-width buffer."""
  B, P = ids.shape
  buf = np.concatenate([np.asarray(ids), np.zeros((B, R), np.int32)], axis=1)
  bmask = np.concatenate([np.asarray(mask), np.zeros((B, R), np.int32)], axis=1)
  for t in range(R):
    logits = np.asarray(_full_logits(graphdef, params, jnp.asarray(buf), jnp.asarray(bmask)))
    buf[:, P + t] = logits[:, P + t - 1].argmax(-1)
    bmask[:, P + t] = 1
  return buf[:, P:]


def _gen(graphdef, params, ids, mask, key=0, **kw):
  kw = {"group_size": 2, "max_new_tokens": 6, "pad_token_id": PAD, **kw}
  return sampling.generate(graphdef, params, ids, mask, jax.random.key(key), **kw)


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("name", ["qwen2", "llama3"])
def test_greedy_equals_repeated_argmax_of_uncached_forward(name):
  graphdef, params = _split(name)
  ids, mask = _prompts([5, 2, 7], P=7)  # P=7 is padded to the 16 bucket inside generate.
  R = 8
  out = _gen(graphdef, params, ids, mask, group_size=2, max_new_tokens=R, temperature=0.0)
  want = _uncached_greedy(graphdef, params, ids, mask, R)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.repeat(want, 2, axis=0))
  assert np.asarray(out.mask).all() and np.asarray(out.truncated).all()


def test_logprobs_equal_training_forward():
  graphdef, params = _split()
  ids, mask = _prompts([6, 3], P=6, seed=1)
  T, R = 0.8, 10
  # Stop tokens so that some rows end early: their padding must carry logprob 0.
  out = _gen(graphdef, params, ids, mask, key=3, group_size=4, max_new_tokens=R, temperature=T,
             top_k=20, stop_token_ids=(5, 7, 11, 13, 17))
  tok, m, lp = (np.asarray(x) for x in (out.tokens, out.mask, out.logprobs))
  rep_ids, rep_mask = groups.expand_groups((ids, mask), 4)
  full = jnp.concatenate([rep_ids, out.tokens], axis=1)
  full_mask = jnp.concatenate([rep_mask, out.mask], axis=1)
  # The trainer's own function (temperature folded into the head) ...
  want = np.asarray(update.response_logprobs(graphdef, params, full, full_mask, R, temperature=T))
  np.testing.assert_allclose(lp, want * m, atol=1e-5, rtol=0)
  assert (lp[m == 0] == 0).all() and (tok[m == 0] == PAD).all()
  # ... and `token_logprobs` of the model at T = 1 against a greedy run.
  out = _gen(graphdef, params, ids, mask, group_size=1, max_new_tokens=R, temperature=0.0)
  model = nnx.merge(graphdef, params)
  full = jnp.concatenate([ids, out.tokens], axis=1)
  full_mask = jnp.concatenate([mask, out.mask], axis=1)
  want = np.asarray(token_logprobs(model, full, full_mask))[:, -R:]
  np.testing.assert_allclose(np.asarray(out.logprobs), want, atol=1e-5, rtol=0)


def test_stop_tokens_mask_and_truncation_match_a_numpy_rederivation():
  graphdef, params = _split()
  ids, mask = _prompts([4, 6, 1], P=6, seed=2)
  R = 8
  free = np.asarray(_gen(graphdef, params, ids, mask, group_size=1, max_new_tokens=R,
                         temperature=0.0).tokens)
  # Stop tokens: row 0's third token and row 1's first; row 2 may or may not hit them.
  stops = (int(free[0, 2]), int(free[1, 0]))
  out = _gen(graphdef, params, ids, mask, group_size=1, max_new_tokens=R, temperature=0.0,
             stop_token_ids=stops)
  want_tok = np.full_like(free, PAD)
  want_mask = np.zeros_like(free)
  want_trunc = np.ones(len(free), bool)
  for i, row in enumerate(free):
    hits = [t for t, x in enumerate(row) if x in stops]
    end = hits[0] + 1 if hits else R
    want_tok[i, :end], want_mask[i, :end], want_trunc[i] = row[:end], 1, not hits
  np.testing.assert_array_equal(np.asarray(out.tokens), want_tok)
  np.testing.assert_array_equal(np.asarray(out.mask), want_mask)
  np.testing.assert_array_equal(np.asarray(out.truncated), want_trunc)
  assert want_mask[0].sum() == 3 and want_mask[1].sum() == 1


def test_decode_loop_stops_when_every_row_is_done():
  graphdef, params = _split()
  ids, mask = _prompts([3, 5], P=5, seed=4)
  cache, logits = sampling.prefill(graphdef, params, ids, mask, max_len=5 + 12)
  first = np.asarray(logits).argmax(-1)
  out, cache, _ = sampling.decode(graphdef, params, cache, logits, 5, jax.random.key(0),
                                  max_new_tokens=12, temperature=0.0,
                                  stop_token_ids=tuple(int(x) for x in first))
  assert np.asarray(out.mask).sum() == 2 and not np.asarray(out.truncated).any()
  # One step ran: the loop wrote keys at slot 5 only (a loop that kept going would write keys
  # into slots 6.. too: done rows are fed at mask 0, but their keys are still stored).
  k = np.asarray(cache.k)
  assert np.abs(k[:, :, 5]).sum() > 0 and (k[:, :, 6:] == 0).all()


def test_per_row_budget_in_decode():
  graphdef, params = _split()
  ids, mask = _prompts([3, 5, 2], P=5, seed=5)
  cache, logits = sampling.prefill(graphdef, params, ids, mask, max_len=5 + 6)
  out, _, _ = sampling.decode(graphdef, params, cache, logits, 5, jax.random.key(1),
                              max_new_tokens=6, budget=jnp.array([2, 6, 4]))
  np.testing.assert_array_equal(np.asarray(out.mask).sum(1), [2, 6, 4])
  assert np.asarray(out.truncated).all()


# ----------------------------------------------------------------------------- distributions


def test_first_token_matches_softmax_chi_square():
  # A vocabulary of 8 and G = 4000 draws of the first token of one prompt.
  graphdef, params = _split(vocab_size=8, head_scale=4.0)
  ids, mask = _prompts([4], P=4, seed=6, vocab=8)
  T = 0.7
  logits = np.asarray(_full_logits(graphdef, params, ids, mask))[0, -1].astype(np.float64)
  for top_k in (0, 3):
    out = _gen(graphdef, params, ids, mask, key=11, group_size=4000, max_new_tokens=1,
               temperature=T, top_k=top_k)
    z = logits / T
    if top_k:
      z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    counts = np.bincount(np.asarray(out.tokens)[:, 0], minlength=8)
    assert (counts[p == 0] == 0).all(), "a token outside the top-k was sampled"
    keep = p > 0
    assert p[keep].min() > 0.01, "the test needs every kept token to be expected a few times"
    _, pvalue = scipy.stats.chisquare(counts[keep], 4000 * p[keep])
    assert pvalue > 1e-3, (top_k, counts, 4000 * p)


def test_inverse_cdf_draw_matches_weights_across_blocks():
  # V = 700: three 256-token blocks (the last one padded), zero weights scattered in between.
  rng = np.random.default_rng(3)
  w = rng.random(700) ** 4
  w[rng.random(700) < 0.5] = 0.0
  w[:300] = 0.0  # a whole leading block and more without mass
  n = 20000
  u = jax.random.uniform(jax.random.key(0), (n,))
  tok = np.asarray(sampling.inverse_cdf_draw(u, jnp.broadcast_to(jnp.asarray(w, jnp.float32),
                                                                    (n, 700))))
  counts = np.bincount(tok, minlength=700)
  assert (counts[w == 0] == 0).all(), "a zero-weight token was drawn"
  p = w / w.sum()
  top = np.argsort(-p)[:30]  # the 30 heaviest tokens, the rest pooled
  obs = np.append(counts[top], n - counts[top].sum())
  exp = np.append(n * p[top], n * (1 - p[top].sum()))
  assert scipy.stats.chisquare(obs, exp)[1] > 1e-3
  # The ends of [0, 1) land on the first and the last positive weight.
  edge = np.asarray(sampling.inverse_cdf_draw(jnp.array([0.0, np.nextafter(1.0, 0.0)], jnp.float32),
                                              jnp.asarray(np.stack([w, w]), jnp.float32)))
  assert edge.tolist() == [np.flatnonzero(w)[0], np.flatnonzero(w)[-1]]


def test_decode_step_equals_cached_forward():
  """decode_hidden on the per-layer layout == decoder_hidden's cached T = 1 call, cache included."""
  from grpo_jax.models import decoder as dec
  graphdef, params = _split()
  model = nnx.merge(graphdef, params)
  cfg = model.config
  ids, mask = _prompts([5, 2, 7], P=7, seed=4)
  cache = dec.init_cache(cfg, 3, 12)
  _, cache = model(ids, attention_mask=mask, cache=cache, cache_index=0, return_hidden=True)
  tok = jnp.array([3, 9, 4], jnp.int32)
  live = jnp.array([1, 0, 1], jnp.int32)
  pos = jnp.array([5, 2, 7], jnp.int32)
  want_h, want_cache = dec.decoder_hidden(cfg, model.arrays(), tok[:, None], live[:, None],
                                          pos[:, None], cache, jnp.int32(7))
  arrays = sampling._decode_arrays(model)  # unstacked layers + the LM head
  got_h, got_dc = dec.decode_hidden(cfg, arrays, tok, live, pos, dec.to_decode_cache(cache, 9),
                                    jnp.int32(7))
  np.testing.assert_allclose(got_h, want_h, rtol=1e-5, atol=1e-5)
  got_cache = dec.from_decode_cache(got_dc, cache)
  for a, b in ((got_cache.k, want_cache.k), (got_cache.v, want_cache.v),
               (got_cache.valid, want_cache.valid)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dec.head_logits(cfg, arrays, got_h), model.logits(want_h),
                             rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.8, top_k=5, top_p=0.9),
                                dict(temperature=0.0)])
def test_compacting_generate_equals_one_program(kw):
  """Finished rows leaving the batch (chunks, row buckets, growing slots) change no output."""
  graphdef, params = _split(vocab_size=24, head_scale=4.0)
  ids, mask = _prompts([5, 3, 7, 1], P=7, seed=10, vocab=24)
  # Frequent stop tokens on a small vocabulary: rows end at spread-out steps, so the 16 rows
  # shrink through several buckets over the 40 steps (device calls end early at each bucket).
  kw = dict(group_size=4, max_new_tokens=40, stop_token_ids=(5, 9, 13), **kw)
  one = _gen(graphdef, params, ids, mask, key=3, compact=False, **kw)
  chunked = _gen(graphdef, params, ids, mask, key=3, **kw)
  lengths = np.asarray(one.mask).sum(1)
  if kw["temperature"] > 0:
    assert lengths.min() < 16 and lengths.max() > 16, lengths  # rows left at different chunks
  np.testing.assert_array_equal(np.asarray(chunked.tokens), np.asarray(one.tokens))
  np.testing.assert_array_equal(np.asarray(chunked.mask), np.asarray(one.mask))
  np.testing.assert_array_equal(np.asarray(chunked.truncated), np.asarray(one.truncated))
  np.testing.assert_allclose(np.asarray(chunked.logprobs), np.asarray(one.logprobs), atol=1e-5)


def test_rows_leave_at_the_step_the_live_count_crosses_a_bucket(monkeypatch):
  """Each step runs on row_bucket(live rows) rows: a device call ends the step the live count
  falls into a smaller bucket (not at a chunk boundary), and a long chunk changes no token."""
  graphdef, params = _split(vocab_size=24, head_scale=4.0)
  ids, mask = _prompts([5, 3, 7, 1], P=7, seed=10, vocab=24)
  kw = dict(group_size=4, max_new_tokens=40, temperature=1.0, stop_token_ids=(5, 9, 13))
  one = _gen(graphdef, params, ids, mask, key=3, compact=False, **kw)
  schedule = []
  monkeypatch.setattr(sampling, "_SCHEDULE", schedule)
  monkeypatch.setattr(sampling, "_CHUNK", 32)
  out = _gen(graphdef, params, ids, mask, key=3, **kw)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(one.tokens))
  lengths = np.asarray(one.mask).sum(1)
  rows_per_step = np.concatenate([np.full(t1 - t0, rows) for t0, t1, rows, _ in schedule])
  want = [sampling.row_bucket(int((lengths > t).sum()), 16) for t in range(lengths.max())]
  assert len(set(want)) >= 4, want  # the live count visits several buckets
  np.testing.assert_array_equal(rows_per_step, want)
  # The first call holds _CHUNK slots, and no call steps past the slots it holds.
  assert schedule[0][3] == 32 and all(t1 <= slots for _, t1, _, slots in schedule), schedule


def test_a_decode_call_without_a_step_raises(monkeypatch):
  """A non-monotone bucket rule (exit below a size the host then keeps) fails loudly, not spins."""
  graphdef, params = _split(vocab_size=24, head_scale=4.0)
  ids, mask = _prompts([5, 3, 7, 1], P=7, seed=10, vocab=24)
  monkeypatch.setattr(sampling, "row_bucket", lambda n, rows, multiple=1: rows)
  monkeypatch.setattr(sampling, "_exit_live", lambda rows, n, multiple: rows - 1)
  with pytest.raises(RuntimeError, match="made no step"):
    _gen(graphdef, params, ids, mask, group_size=4, max_new_tokens=40, stop_token_ids=(5, 9, 13))


def test_row_bucket_sizes(monkeypatch):
  sizes = sorted({sampling.row_bucket(n, 1000) for n in range(1, 65)})
  assert sizes == [4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64]
  assert all(n <= sampling.row_bucket(n, 1000) < 1.25 * max(n, 4) for n in range(1, 500))
  assert sorted({sampling.row_bucket(n, 60, 8) for n in range(1, 61)}) == [8, 16, 24, 32, 40, 48,
                                                                           56, 60]
  # A batch of `rows` exits the step its live count reaches _exit_live: the next bucket down.
  assert [sampling._exit_live(r, 32, 1) for r in (32, 20, 16, 5, 4)] == [28, 16, 14, 4, 0]
  # Two per octave: the prompt buckets' sizes (the ladder before four per octave).
  monkeypatch.setattr(sampling, "_ROW_BUCKETS_PER_OCTAVE", 2)
  assert all(sampling.row_bucket(n, 1000) == sampling.bucket_length(n, minimum=4)
             for n in range(1, 500))


def _nucleus(z, top_k, top_p):
  """NumPy re-derivation of the allowed token set of one row (HF order: top-k, then top-p)."""
  order = np.argsort(-z, kind="stable")
  if top_k:
    order = order[:top_k]
  p = np.exp(z[order] - z[order].max())
  p /= p.sum()
  before = np.cumsum(p) - p
  return set(order[before < top_p].tolist())


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (10, 0.7)])
def test_top_k_top_p_never_emit_excluded_tokens(top_k, top_p):
  graphdef, params = _split(head_scale=8.0)
  ids, mask = _prompts([5, 3], P=5, seed=7)
  T, R, G = 1.3, 6, 8
  out = _gen(graphdef, params, ids, mask, key=5, group_size=G, max_new_tokens=R, temperature=T,
             top_k=top_k, top_p=top_p)
  rep_ids, rep_mask = groups.expand_groups((ids, mask), G)
  full = jnp.concatenate([rep_ids, out.tokens], axis=1)
  full_mask = jnp.concatenate([rep_mask, out.mask], axis=1)
  logits = np.asarray(_full_logits(graphdef, params, full, full_mask)).astype(np.float64) / T
  tok = np.asarray(out.tokens)
  P = ids.shape[1]
  sizes = []
  for i in range(tok.shape[0]):
    for t in range(R):
      allowed = _nucleus(logits[i, P + t - 1], top_k, top_p)
      sizes.append(len(allowed))
      assert tok[i, t] in allowed, (i, t, tok[i, t], sorted(allowed))
  assert min(sizes) < 96 and max(sizes) > 1, "the filter must be active but not degenerate"


def test_filter_logits_against_numpy():
  rng = np.random.default_rng(0)
  z = (3 * rng.standard_normal((64, 50))).astype(np.float32)
  for top_k, top_p in [(1, 1.0), (7, 1.0), (0, 0.3), (0, 0.95), (12, 0.5), (50, 0.9)]:
    got = np.asarray(sampling.filter_logits(jnp.asarray(z), top_k, top_p))
    for i in range(len(z)):
      want = _nucleus(z[i].astype(np.float64), top_k, top_p)
      assert set(np.flatnonzero(np.isfinite(got[i])).tolist()) == want, (top_k, top_p, i)


def test_same_rng_same_output_and_rows_of_a_group_differ():
  graphdef, params = _split()
  ids, mask = _prompts([4, 2], P=4, seed=8)
  kw = dict(group_size=4, max_new_tokens=8, temperature=1.0)
  a, b = _gen(graphdef, params, ids, mask, key=0, **kw), _gen(graphdef, params, ids, mask, key=0, **kw)
  c = _gen(graphdef, params, ids, mask, key=1, **kw)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
  tok = np.asarray(a.tokens).reshape(2, 4, -1)
  for g in range(2):
    assert len({row.tobytes() for row in tok[g]}) == 4, f"rows of group {g} repeat"
  # Rows are grouped a a a a b b b b: each row's first token has the logprob of its own prompt.
  first = np.asarray(_full_logits(graphdef, params, ids, mask))[:, -1]
  lp = jax.nn.log_softmax(first, axis=-1)
  gid = np.asarray(groups.group_ids(2, 4))
  want = np.asarray(lp)[gid, np.asarray(a.tokens)[:, 0]]
  np.testing.assert_allclose(np.asarray(a.logprobs)[:, 0], want, atol=1e-5)


# ----------------------------------------------------------------------------- cost and compiles


def test_prefill_flops_do_not_grow_with_group_size():
  graphdef, params = _split()
  ids, mask = _prompts([16] * 4, P=16, seed=9)

  def flops(fn, *args, **kw):
    cost = fn.lower(*args, **kw).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"]

  ours = {g: flops(sampling._prefill_groups_jit, graphdef, params, ids, mask, max_len=32,
                   group_size=g, mesh=None) for g in (1, 8)}
  assert ours[8] < 1.05 * ours[1], ours

  # The naive way (expand the prompts, then prefill) does grow: the check can tell them apart.
  naive = {g: flops(sampling._prefill_groups_jit, graphdef, params,
                    *groups.expand_groups((ids, mask), g), max_len=32, group_size=1, mesh=None)
           for g in (1, 8)}
  assert naive[8] > 4 * naive[1], naive


def test_compiles_once_per_prompt_bucket():
  graphdef, params = _split()
  kw = dict(group_size=2, max_new_tokens=4, temperature=0.9, top_k=7, stop_token_ids=(3,))
  jitted = sampling._start_jit  # the prefill; decode chunks compile per row and slot bucket
  _gen(graphdef, params, *_prompts([5, 2], P=5), key=0, **kw)
  before = jitted._cache_size()
  for key, (lengths, P) in enumerate([([3, 9], 9), ([16, 1], 16), ([4, 4], 5)]):  # bucket 16
    _gen(graphdef, params, *_prompts(lengths, P, seed=key), key=key, **kw)
  assert jitted._cache_size() == before, "generate recompiled within one prompt bucket"
  _gen(graphdef, params, *_prompts([17, 3], P=17), **kw)  # bucket 24
  assert jitted._cache_size() == before + 1


# ----------------------------------------------------------------------------- mesh


def test_eight_devices_equal_one_device():
  assert jax.device_count() == 8
  # As in test_compacting_generate_equals_one_program: rows stop at spread-out steps over 5
  # chunks, so row compaction, slot growth and the row-bucket rounding run on the mesh.
  graphdef, params = _split(vocab_size=24, head_scale=4.0)
  ids, mask = _prompts([5, 3, 7, 1], P=7, seed=10, vocab=24)
  kw = dict(group_size=4, max_new_tokens=40, temperature=1.0, top_p=0.9,
            stop_token_ids=(5, 9, 13))
  one = _gen(graphdef, params, ids, mask, key=2, **kw)
  lengths = np.asarray(one.mask).sum(1)
  assert lengths.min() < 16 and lengths.max() > 16, lengths  # rows left at different chunks
  mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  sharded_params = nnx.state(shard_model(nnx.merge(graphdef, params), mesh))
  eight = _gen(graphdef, sharded_params, ids, mask, key=2, mesh=mesh, **kw)
  np.testing.assert_array_equal(np.asarray(eight.tokens), np.asarray(one.tokens))
  np.testing.assert_array_equal(np.asarray(eight.mask), np.asarray(one.mask))
  np.testing.assert_array_equal(np.asarray(eight.truncated), np.asarray(one.truncated))
  np.testing.assert_allclose(np.asarray(eight.logprobs), np.asarray(one.logprobs), atol=1e-5)
  want = sharding_lib.batch_sharding(mesh, 2)
  assert eight.tokens.sharding.is_equivalent_to(want, 2), eight.tokens.sharding
  assert len(eight.tokens.sharding.device_set) == 8


def test_mesh_batch_multiple_is_checked():
  graphdef, params = _split()
  mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(data=8))
  with pytest.raises(ValueError, match="group_size: B\\*G = 6"):
    _gen(graphdef, params, *_prompts([2, 3, 1], P=3), group_size=2, mesh=mesh)


# ----------------------------------------------------------------------------- multi-turn pieces


def test_prefill_then_append_equals_prefill_of_concatenation():
  graphdef, params = _split()
  ids, mask = _prompts([4, 2, 6], P=6, seed=12)
  # Appended chunks of different lengths per row, right-padded (as retrieved text would be).
  extra_lens = [3, 0, 5]
  rng = np.random.default_rng(13)
  extra = np.zeros((3, 5), np.int32)
  extra_mask = np.zeros((3, 5), np.int32)
  for i, n in enumerate(extra_lens):
    extra[i, :n], extra_mask[i, :n] = rng.integers(1, 96, n), 1
  S = 6 + 5 + 8
  cache, logits = sampling.prefill(graphdef, params, ids, mask, max_len=S)
  cache, logits2 = sampling.append(graphdef, params, cache, jnp.asarray(extra),
                                   jnp.asarray(extra_mask), 6, prev_logits=logits)
  # Reference: the concatenated real tokens, left-padded, prefilled in one go.
  rows = [np.concatenate([np.asarray(ids)[i][np.asarray(mask)[i] == 1], extra[i, :n]])
          for i, n in enumerate(extra_lens)]
  cat_ids, cat_mask = np.zeros((3, 11), np.int32), np.zeros((3, 11), np.int32)
  for i, r in enumerate(rows):
    cat_ids[i, 11 - len(r):], cat_mask[i, 11 - len(r):] = r, 1
  ref_cache, ref_logits = sampling.prefill(graphdef, params, jnp.asarray(cat_ids),
                                           jnp.asarray(cat_mask), max_len=S)
  np.testing.assert_allclose(np.asarray(logits2), np.asarray(ref_logits), atol=1e-4, rtol=1e-5)
  # Row 1 appended nothing: it keeps its previous logits.
  np.testing.assert_array_equal(np.asarray(logits2)[1], np.asarray(logits)[1])
  # The same real keys, in the same order, in both caches.
  for i in range(3):
    a = np.asarray(cache.k)[:, i][:, np.asarray(cache.valid)[i]]
    b = np.asarray(ref_cache.k)[:, i][:, np.asarray(ref_cache.valid)[i]]
    np.testing.assert_allclose(a, b, atol=1e-5)
  # And decoding from either gives the same greedy continuation.
  kw = dict(max_new_tokens=8, temperature=0.0)
  a, _, _ = sampling.decode(graphdef, params, cache, logits2, 11, jax.random.key(0), **kw)
  b, _, _ = sampling.decode(graphdef, params, ref_cache, ref_logits, 11, jax.random.key(0), **kw)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


def test_multi_turn_decode_append_decode_equals_uncached_greedy():
  graphdef, params = _split()
  ids, mask = _prompts([3, 5], P=5, seed=14)
  forced = jnp.asarray([[7, 8, 9], [10, 11, 12]], jnp.int32)
  R1, R2 = 4, 5
  cache, logits = sampling.prefill(graphdef, params, ids, mask, max_len=5 + R1 + 3 + R2)
  kw = dict(temperature=0.0)
  out1, cache, logits = sampling.decode(graphdef, params, cache, logits, 5, jax.random.key(0),
                                        max_new_tokens=R1, **kw)
  cache, logits = sampling.append(graphdef, params, cache, forced, jnp.ones_like(forced),
                                  5 + R1, prev_logits=logits)
  out2, _, _ = sampling.decode(graphdef, params, cache, logits, 5 + R1 + 3, jax.random.key(1),
                               max_new_tokens=R2, **kw)
  # Reference: uncached greedy on [prompt, turn-1 tokens, forced].
  want1 = _uncached_greedy(graphdef, params, ids, mask, R1)
  np.testing.assert_array_equal(np.asarray(out1.tokens), want1)
  ctx = jnp.concatenate([ids, jnp.asarray(want1), forced], axis=1)
  ctx_mask = jnp.concatenate([mask, jnp.ones((2, R1 + 3), jnp.int32)], axis=1)
  want2 = _uncached_greedy(graphdef, params, ctx, ctx_mask, R2)
  np.testing.assert_array_equal(np.asarray(out2.tokens), want2)


def test_prefill_groups_matches_generate_layout():
  graphdef, params = _split()
  ids, mask = _prompts([4, 2], P=16, seed=15)
  kw = dict(max_new_tokens=5, temperature=1.0, top_k=9, stop_token_ids=(3,), pad_token_id=PAD)
  cache, logits = sampling.prefill(graphdef, params, ids, mask, max_len=21, group_size=3)
  out, _, _ = sampling.decode(graphdef, params, cache, logits, 16, jax.random.key(4), **kw)
  ref = sampling.generate(graphdef, params, ids, mask, jax.random.key(4), group_size=3, **kw)
  for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw,err,msg", [
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(group_size=0), ValueError, "group_size"),
    (dict(max_new_tokens=2.0), TypeError, "max_new_tokens"),
    (dict(stop_token_ids=("eos",)), TypeError, "stop_token_ids"),
])
def test_bad_arguments_name_the_argument(kw, err, msg):
  graphdef, params = _split()
  with pytest.raises(err, match=msg):
    _gen(graphdef, params, *_prompts([2], P=2), **kw)


def test_bad_prompt_shapes():
  graphdef, params = _split()
  ids, mask = _prompts([2], P=2)
  with pytest.raises(ValueError, match="prompt_mask"):
    _gen(graphdef, params, ids, mask[:, :1])
  with pytest.raises(ValueError, match="prompt_ids"):
    _gen(graphdef, params, ids[0], mask[0])
