"""The Search-R1 rollout on the KV-cache sampler, against the training forward and a scripted model.

The scripted model is a real `Decoder` made into a (mostly) bigram model: one-hot embeddings and an
LM head whose entry [u, next(u)] carries a large bias, so greedy decoding walks a chain of tokens
we choose, while the attention layers (kept random, scaled up) still move every log-prob, so a
wrong cache (bad rewind, bad positions, stale logits) shows in the log-prob comparison.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grpo_jax import groups, sampling, update
from grpo_jax import retriever as rt
from grpo_jax.models import Decoder
from grpo_jax.rollout import search_protocol as sp
from grpo_jax.rollout import search_sampler as ss
from grpo_jax.rollout.retriever_client import RetrieverClient, RetrieverConfig
from grpo_jax.rollout.search_rollout import SearchRolloutConfig
from grpo_jax.testing import tokenizer as tiny_tok
from grpo_jax.testing.models import tiny_config
from grpo_jax.testing.search import TINY_CORPUS

HIDDEN = 192  # >= the tiny tokenizer's 180 ids: one-hot embeddings


@pytest.fixture(scope="module")
def tok():
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(tiny_tok.default_tokenizer_dir())


@pytest.fixture(scope="module")
def server():
  with rt.start_server(TINY_CORPUS) as s:
    yield s


@pytest.fixture(scope="module")
def client(server):
  return RetrieverClient(RetrieverConfig(url=server.url, max_retries=0))


def _id(tok, piece):
  ids = tok.encode(piece, add_special_tokens=False)
  assert len(ids) == 1, (piece, ids)
  return ids[0]


def _chains(tok):
  """next-token map of the scripted model, as strings (each one token of the tiny tokenizer).

  "\\n" (what prompts of kind "search" and every observation end with) -> a think block and a
  search whose closing tag is spelled in single characters (a multi-token stop string, caught on
  the host), then junk ("coins" forever) that the sampler over-generates and must rewind.
  "?" -> an answer closed by the single-token "</answer>" (stopped on device). "." -> EOS.
  "," -> "shells" forever: an invalid turn that spends its budget.
  """
  search = ["\n", "<think>", "think", "</think>", "<search>", "apples", *"</search>", "coins"]
  pairs = list(zip(search[:-1], search[1:])) + [("coins", "coins")]
  pairs += [("?", "<answer>"), ("<answer>", "pears"), ("pears", "</answer>")]
  pairs += [(".", "stones"), ("stones", tok.eos_token), (",", "shells"), ("shells", "shells")]
  return {_id(tok, a): _id(tok, b) for a, b in pairs}


@functools.lru_cache(maxsize=None)
def _scripted(bias: float, seed: int = 0):
  """(graphdef, params, chain) of the bigram-biased tiny model (see the module docstring)."""
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(tiny_tok.default_tokenizer_dir())
  V = len(tok)
  model = Decoder(tiny_config("qwen2", vocab_size=V, hidden_size=HIDDEN), rngs=nnx.Rngs(seed))
  model.embed[...] = jnp.eye(V, HIDDEN, dtype=model.embed[...].dtype)
  chain = _chains(tok)
  head = np.array(model.lm_head[...])
  for u, w in chain.items():
    head[u, w] += bias
  model.lm_head[...] = jnp.asarray(head)
  for w in (model.layers.q_proj, model.layers.k_proj):
    w[...] = w[...] * 4.0
  graphdef, params = nnx.split(model)
  return graphdef, params, chain


PROMPTS = ("what is the answer?", "search the apples\n", "the books,", "copy the cards.")


def _prompts(tok, texts=PROMPTS):
  enc = [tok.encode(t, add_special_tokens=False) for t in texts]
  P = max(map(len, enc))
  ids = np.full((len(enc), P), tok.pad_token_id, np.int32)
  mask = np.zeros((len(enc), P), np.int32)
  for b, e in enumerate(enc):
    ids[b, P - len(e):] = e
    mask[b, P - len(e):] = 1
  return ids, mask


def _run(tok, client, bias, rng=0, group_size=2, temperature=0.0, **kw):
  config = SearchRolloutConfig(**{**dict(max_turns=2, max_response_tokens=384, max_turn_tokens=24,
                                         max_obs_tokens=None, topk=2), **kw})
  graphdef, params, _ = _scripted(bias)
  ids, mask = _prompts(tok)
  out = ss.search_generate(graphdef, params, ids, mask, jax.random.key(rng), group_size=group_size,
                           tokenizer=tok, retriever=client, config=config,
                           temperature=temperature, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
  return out, config, (graphdef, params, ids, mask)


def _training_logprobs(graphdef, params, ids, mask, out, group_size, R, temperature):
  rep_ids, rep_mask = groups.expand_groups((jnp.asarray(ids), jnp.asarray(mask)), group_size)
  full = jnp.concatenate([rep_ids, out.tokens], axis=1)
  full_mask = jnp.concatenate([rep_mask, out.mask], axis=1)
  return np.asarray(update.response_logprobs(graphdef, params, full, full_mask, R,
                                             temperature=temperature))


# ----------------------------------------------------------------------------- scripted greedy


def _walk(tok, chain, start, budget):
  """The chain from token `start` as the protocol keeps it: cut after the first stop string, at
  EOS, or at the budget (an independent re-derivation of the sampler's stops)."""
  ids, cur = [], start
  while len(ids) < budget:
    cur = chain[cur]
    ids.append(cur)
    if cur == tok.eos_token_id:
      break
    if sp.action_end(tok.decode(ids, skip_special_tokens=True)) is not None:
      break
  return ids


def test_scripted_rollout_lines_up_with_an_independent_tokenisation(tok, client):
  out, config, (graphdef, params, ids, mask) = _run(tok, client, bias=1.0)
  _, _, chain = _scripted(1.0)
  T, R = config.max_turn_tokens, config.max_response_tokens
  nl = _id(tok, "\n")
  hits = client.retrieve(["apples"], topk=config.topk)[0]
  info = tok.encode(sp.information_block(sp.format_documents(hits)), add_special_tokens=False)
  invalid = tok.encode(sp.INVALID_ACTION_OBSERVATION, add_special_tokens=False)
  search = _walk(tok, chain, nl, T)
  assert tok.decode(search).endswith("<search>apples</search>") and len(search) % 8 != 0
  # (pieces, is_info) per prompt kind: answer / search x3 (the last not executed) / invalid / EOS.
  want = [
      [(_walk(tok, chain, _id(tok, "?"), T), 0)],
      [(search, 0), (info, 1), (search, 0), (info, 1), (search, 0)],
      [(_walk(tok, chain, _id(tok, ","), T), 0), (invalid, 1), (search, 0), (info, 1),
       (search, 0)],
      [(_walk(tok, chain, _id(tok, "."), T), 0)],
  ]
  assert want[2][0][0] == [_id(tok, "shells")] * T and want[3][0][0][-1] == tok.eos_token_id
  toks, m, im, lp = (np.asarray(x) for x in (out.tokens, out.mask, out.info_mask, out.logprobs))
  for b, pieces in enumerate(want):
    ref_ids = [t for p, _ in pieces for t in p]
    ref_info = [f for p, f in pieces for _ in p]
    for g in range(2):
      row = 2 * b + g
      n = len(ref_ids)
      assert n <= R
      np.testing.assert_array_equal(toks[row, :n], ref_ids, err_msg=f"row {row}")
      np.testing.assert_array_equal(im[row, :n], ref_info)
      assert m[row, :n].all() and not m[row, n:].any() and not im[row, n:].any()
      assert (toks[row, n:] == tok.pad_token_id).all()
      assert (lp[row][im[row] == 1] == 0).all() and (lp[row, n:] == 0).all()
      assert (lp[row][(im[row] == 0) & (m[row] == 1)] < 0).all()
  assert out.finish_reasons == ["answer"] * 2 + ["max_turns"] * 4 + ["eos"] * 2
  assert out.answers[:2] == ["pears"] * 2
  assert out.metrics["search/searches_per_rollout"] == pytest.approx((2 + 2 + 1 + 1) / 8)
  # Segments mark the retrieved text.
  assert [s for s, r in out.segments[2] if r][0] == tok.decode(info)
  # The cached log-probs are those of the training forward over the final sequences.
  want_lp = _training_logprobs(graphdef, params, ids, mask, out, 2, R, 1.0)
  np.testing.assert_allclose(lp, want_lp * m * (1 - im), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the key test


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cached_logprobs_equal_the_training_forward(tok, client, temperature):
  # A weaker bias: rows mostly follow the chains but often leave them, so the run mixes answers,
  # searches (with over-generation to rewind), invalid turns and token-level observation cuts.
  out, config, (graphdef, params, ids, mask) = _run(
      tok, client, bias=0.5, rng=1, group_size=4, temperature=temperature,
      max_response_tokens=160, max_obs_tokens=40, max_turns=3)
  R = config.max_response_tokens
  m, im, lp = (np.asarray(x) for x in (out.mask, out.info_mask, out.logprobs))
  want = _training_logprobs(graphdef, params, ids, mask, out, 4, R, temperature)
  np.testing.assert_allclose(lp, want * m * (1 - im), atol=1e-5, rtol=0)
  # The run did exercise what the test is about.
  assert im.sum() > 0 and out.num_append_tokens > 0
  assert out.metrics["search/searches_per_rollout"] > 0
  assert len(set(out.finish_reasons)) >= 2, out.finish_reasons


# ----------------------------------------------------------------------------- determinism, compiles


def test_same_rng_same_output_and_bounded_compiles(tok, client):
  kw = dict(bias=0.5, group_size=2, temperature=1.0, max_response_tokens=160, max_obs_tokens=40)
  a, _, _ = _run(tok, client, rng=5, **kw)
  jitted = (sampling._prefill_groups_jit, sampling._append_jit, sampling._decode_jit, ss._compact)
  sizes = [f._cache_size() for f in jitted]
  b, _, _ = _run(tok, client, rng=5, **kw)
  for field in ("tokens", "mask", "info_mask", "logprobs", "truncated"):
    np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)))
  assert a.texts == b.texts
  c, _, _ = _run(tok, client, rng=6, **kw)
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
  # Other draws reuse the compiled functions: at most one more shape per row bucket (8, 4, 2, 1)
  # and observation width bucket, never one per call.
  for _ in range(2):
    _run(tok, client, rng=7 + _, **kw)
  grown = [f._cache_size() - s for f, s in zip(jitted, sizes)]
  assert grown[0] == 0 and all(g <= 4 for g in grown), grown


def test_counters_show_no_re_prefill(tok, client):
  out, _, (_, _, ids, _) = _run(tok, client, bias=1.0)
  B, G = ids.shape[0], 2
  assert out.num_prefill_tokens == B * sampling.bucket_length(ids.shape[1])
  real_prompt = int(ids.astype(bool).sum())  # no prompt token is the pad id here
  assert out.num_append_real_tokens < out.num_append_tokens
  ours_real = real_prompt + out.num_append_real_tokens
  hist = np.asarray(out.mask).sum() - np.asarray(out.info_mask).sum()
  # One re-fed token per row and later turn (4 rows x 2 turns) is all the history recomputed.
  assert out.num_append_real_tokens == np.asarray(out.info_mask).sum() + 2 * 4
  assert out.num_naive_prefill_tokens > 1.5 * ours_real, (out.num_naive_prefill_tokens, ours_real)
  assert out.metrics["search/naive_prefill_tokens"] == out.num_naive_prefill_tokens
  print(f"naive {out.num_naive_prefill_tokens} real prefill tokens vs ours {ours_real} real "
        f"({out.num_prefill_tokens} + {out.num_append_tokens} padded), sampled {hist}")


def test_bad_arguments(tok, client):
  graphdef, params, _ = _scripted(1.0)
  ids, mask = _prompts(tok)
  call = functools.partial(ss.search_generate, graphdef, params, ids, mask, jax.random.key(0),
                           group_size=2, tokenizer=tok, retriever=client,
                           config=SearchRolloutConfig(max_response_tokens=32))
  with pytest.raises(ValueError, match="eos_token_id"):
    call(eos_token_id=tok.eos_token_id + 1, pad_token_id=tok.pad_token_id)
  with pytest.raises(TypeError, match="config"):
    ss.search_generate(graphdef, params, ids, mask, jax.random.key(0), group_size=2,
                       tokenizer=tok, retriever=client, config={}, eos_token_id=1, pad_token_id=0)
  with pytest.raises(ValueError, match="prompt_mask"):
    ss.search_generate(graphdef, params, ids, mask * 0, jax.random.key(0), group_size=2,
                       tokenizer=tok, retriever=client, config=SearchRolloutConfig(),
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def test_row_bucket():
  assert [ss._row_bucket(a, 8, 1) for a in (8, 5, 4, 3, 2, 1)] == [8, 8, 4, 4, 2, 1]
  assert [ss._row_bucket(a, 6, 2) for a in (6, 5, 3, 1)] == [6, 6, 4, 2]


def test_generator_stops_after_the_token_that_completes_a_stop_string(tok):
  # The orchestrator cuts again, so this checks the generator's own contract directly.
  graphdef, params, chain = _scripted(1.0)
  ids, mask = _prompts(tok)
  config = SearchRolloutConfig(max_turns=1, max_response_tokens=64, max_turn_tokens=24)
  gen = ss.CacheTurnGenerator(graphdef, params, ids, mask, jax.random.key(0), group_size=1,
                              tokenizer=tok, config=config, temperature=0.0,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  from grpo_jax.rollout.search_rollout import TurnRequest
  out = gen(TurnRequest(rows=np.arange(4), keep=np.zeros(4, np.int64), forced_ids=[[]] * 4,
                        max_new_tokens=np.array([24, 24, 5, 24]), stop_strings=sp.STOP_STRINGS,
                        turn=0, is_last_turn=False))
  texts = [tok.decode(t) for t in out.token_ids]
  assert texts[0] == "<answer>pears</answer>"  # one-token stop, on device
  assert texts[1] == "<think>think</think><search>apples</search>"  # spelled out, on the host
  assert out.token_ids[2] == [_id(tok, "shells")] * 5  # its budget
  assert out.token_ids[3] == [_id(tok, "stones"), tok.eos_token_id]
  assert [len(lp) for lp in out.logprobs] == [len(t) for t in out.token_ids]


def test_eight_devices_equal_one_device(tok, client):
  from grpo_jax import sharding as sharding_lib
  from grpo_jax.models import shard_model
  kw = dict(bias=0.5, rng=3, group_size=2, temperature=1.0, max_response_tokens=96,
            max_obs_tokens=24)
  one, config, (graphdef, params, ids, mask) = _run(tok, client, **kw)
  mesh = sharding_lib.make_mesh(sharding_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  sharded = nnx.state(shard_model(nnx.merge(graphdef, params), mesh))
  eight = ss.search_generate(graphdef, sharded, ids, mask, jax.random.key(3), group_size=2,
                             tokenizer=tok, retriever=client, config=config, temperature=1.0,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             mesh=mesh)
  for field in ("tokens", "mask", "info_mask", "truncated"):
    np.testing.assert_array_equal(np.asarray(getattr(eight, field)),
                                  np.asarray(getattr(one, field)))
  np.testing.assert_allclose(np.asarray(eight.logprobs), np.asarray(one.logprobs), atol=1e-5)
  assert len(eight.tokens.sharding.device_set) == 8


def test_search_r1_eos_semantics_on_the_cache(tok, client):
  """eos_without_action="invalid" on the real sampler: the EOS a row sampled is dropped from its
  cache (rewound) and the corrective observation follows; the cached log-probs still equal the
  training forward, and no response holds an EOS."""
  out, config, (graphdef, params, ids, mask) = _run(
      tok, client, bias=8.0, group_size=2, max_response_tokens=160, max_obs_tokens=40,
      max_turns=2, eos_without_action="invalid")
  R = config.max_response_tokens
  m, im, lp, toks = (np.asarray(x) for x in (out.mask, out.info_mask, out.logprobs, out.tokens))
  assert not (toks[m == 1] == tok.eos_token_id).any()
  # Prompt "copy the cards." walks "." -> "stones" -> EOS (with "end": finish "eos", see the
  # scripted test above); here the EOS is dropped and the (40-token) correction follows at once.
  obs = tok.decode(tok.encode(sp.INVALID_ACTION_OBSERVATION, add_special_tokens=False)[:40])
  assert out.texts[6] == out.texts[7] and out.texts[6].startswith("stones" + obs)
  assert out.finish_reasons[6] != "eos"
  want = _training_logprobs(graphdef, params, ids, mask, out, 2, R, 1.0)  # greedy: T=1 log-probs
  np.testing.assert_allclose(lp, want * m * (1 - im), atol=1e-5, rtol=0)
