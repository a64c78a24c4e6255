"""The multi-turn search rollout with a scripted generator and the real BM25 server on loopback."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from grpo_jax import retriever as rt
from grpo_jax.rewards.search_r1 import search_r1_em
from grpo_jax.rollout import search_protocol as sp
from grpo_jax.rollout.retriever_client import RetrieverClient, RetrieverConfig, RetrieverError
from grpo_jax.rollout.search_rollout import SearchRolloutConfig, run_search_rollout
from grpo_jax.testing.search import (TINY_CORPUS, TINY_QA, ByteTokenizer, ScriptedGenerator,
                                     fake_logprobs, tiny_bpe_tokenizer, write_nq_parquet)

SCRIPTS = [
    # search, then answer (text after each action must be cut)
    ["<think>need facts</think><search> capital of France </search> junk",
     "<think>ok</think><answer> Paris </answer> trailing"],
    # invalid, then answer
    ["<think>hmm</think> no action", "<think>a</think><answer>Berlin</answer>"],
    # answer at once
    ["<think>easy</think><answer> Tokyo </answer>"],
    # searches forever: max_turns searches, then a last turn whose search is not executed
    ["<search>Everest</search>"] * 10,
    # a turn without an action (corrective message), then EOS (the script ran out)
    ["<think>giving up"],
]


class CountingClient:
  def __init__(self, client):
    self.client, self.calls = client, []

  def retrieve(self, queries, topk=None, return_scores=True):
    self.calls.append(list(queries))
    return self.client.retrieve(queries, topk=topk, return_scores=return_scores)


@pytest.fixture(scope="module")
def server():
  with rt.start_server(TINY_CORPUS) as s:
    yield s


@pytest.fixture(scope="module")
def bpe():
  return tiny_bpe_tokenizer()


def _run(server, tokenizer, scripts=SCRIPTS, **kw):
  config = SearchRolloutConfig(**{**dict(max_turns=2, max_response_tokens=600,
                                         max_turn_tokens=120, max_obs_tokens=300, topk=2), **kw})
  gen = ScriptedGenerator(tokenizer, scripts, with_logprobs=True)
  client = CountingClient(RetrieverClient(RetrieverConfig(url=server.url)))
  result = run_search_rollout(gen, tokenizer, client, config, len(scripts))
  return result, gen, client


@pytest.mark.parametrize("tok", ["bytes", "bpe"])
def test_rollout_masks_and_alignment(server, bpe, tok):
  tokenizer = ByteTokenizer() if tok == "bytes" else bpe
  r, gen, client = _run(server, tokenizer)
  n, width = len(SCRIPTS), 600
  assert r.response_ids.shape == r.info_mask.shape == r.loss_mask.shape == (n, width)
  np.testing.assert_array_equal(r.loss_mask, r.response_mask * (1 - r.info_mask))
  lengths = r.response_mask.sum(1)
  for i in range(n):
    ids = r.response_ids[i, :lengths[i]]
    assert gen.contexts[i][:lengths[i]] == ids.tolist()  # the generator's context, token for token
    assert (r.response_ids[i, lengths[i]:] == tokenizer.pad_token_id).all()
    # Independent reference for the info mask: re-tokenise each segment in order.
    ref_info = np.concatenate([np.full(len(tokenizer.encode(t, add_special_tokens=False))
                                       if retrieved else 0, int(retrieved))
                               for t, retrieved in r.segments[i]] or [np.zeros(0)])
    sampled = [t for t, retrieved in r.segments[i] if not retrieved]
    if r.finish_reasons[i] != "eos":  # the EOS token is in the ids but not in the text
      assert r.info_mask[i, :lengths[i]].sum() == ref_info.sum()
      assert "".join(sampled) == tokenizer.decode(ids[r.info_mask[i, :lengths[i]] == 0],
                                                  skip_special_tokens=True)
    retrieved_text = tokenizer.decode(ids[r.info_mask[i, :lengths[i]] == 1])
    assert retrieved_text == "".join(t for t, retrieved in r.segments[i] if retrieved)
    assert "junk" not in r.texts[i] and "trailing" not in r.texts[i]
  # Sampled log-probs sit on sampled tokens only.
  np.testing.assert_allclose(r.logprobs, np.where(r.loss_mask == 1,
                                                  fake_logprobs(r.response_ids), 0), rtol=1e-6)
  assert r.answers == ["Paris", "Berlin", "Tokyo", None, None]
  assert r.finish_reasons == ["answer", "answer", "answer", "max_turns", "eos"]
  np.testing.assert_array_equal(r.num_turns, [2, 2, 1, 3, 2])
  np.testing.assert_array_equal(r.num_searches, [1, 0, 0, 2, 0])
  np.testing.assert_array_equal(r.num_valid_actions, [2, 1, 1, 3, 0])
  # One batched retrieval per turn with the queries of all searching rows; none on the last turn.
  assert client.calls == [["capital of France", "Everest"], ["Everest"]]
  # Finished rows are not generated again.
  assert [req.rows.tolist() for req in gen.requests] == [[0, 1, 2, 3, 4], [0, 1, 3, 4], [3]]
  assert [req.is_last_turn for req in gen.requests] == [False, False, True]
  assert "Doc 1(Title: Paris) Paris is the capital" in r.texts[0]
  assert sp.INVALID_ACTION_OBSERVATION in r.texts[1]
  m = r.metrics
  assert m["search/turns"] == pytest.approx(10 / 5)
  assert m["search/searches_per_rollout"] == pytest.approx(3 / 5)
  assert m["search/valid_action_rate"] == pytest.approx(7 / 10)
  assert m["search/valid_search_rate"] == pytest.approx(3 / 10)
  assert m["search/answer_rate"] == pytest.approx(3 / 5)
  assert m["search/retrieved_token_share"] == pytest.approx(r.info_mask.sum() / lengths.sum())
  rewards = search_r1_em([""] * n, r.texts, [{"answer": ["Paris"]}, {"answer": ["Berlin"]},
                                             {"answer": ["Kyoto"]}, {"answer": ["x"]},
                                             {"answer": ["y"]}])
  assert rewards == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_rollout_budgets(server):
  tok = ByteTokenizer()
  # Observation cap: each information block is cut to 40 tokens (its closing tag too, as Search-R1).
  r, _, _ = _run(server, tok, scripts=[SCRIPTS[0]], max_obs_tokens=40)
  obs = r.response_ids[0][r.info_mask[0] == 1]
  assert len(obs) == 40 and "</information>" not in tok.decode(obs)
  # Character cap on documents keeps the tags whole.
  r, _, _ = _run(server, tok, scripts=[SCRIPTS[0]], max_doc_chars=10, max_obs_tokens=None)
  assert "<information>Doc 1(Titl</information>" in r.texts[0]
  # Total budget: the row stops with "length" and never exceeds max_response_tokens.
  r, gen, _ = _run(server, tok, scripts=[SCRIPTS[3]], max_response_tokens=80, max_turns=5)
  assert r.finish_reasons == ["length"] and r.response_mask.sum() == 80
  assert all((req.max_new_tokens <= 80 - req.keep - [len(f) for f in req.forced_ids]).all()
             for req in gen.requests)
  # Per-turn budget: a turn cut by max_turn_tokens has no action: invalid, corrective message.
  r, gen, _ = _run(server, tok, scripts=[["x" * 50, "<answer>a</answer>"]], max_turn_tokens=8)
  assert r.texts[0].startswith("x" * 8 + sp.INVALID_ACTION_OBSERVATION)
  # max_turns=0: a single turn without search.
  r, _, client = _run(server, tok, scripts=[SCRIPTS[0]], max_turns=0)
  assert client.calls == [] and r.finish_reasons == ["max_turns"] and r.info_mask.sum() == 0


def test_retriever_failure_propagates(server):
  tok = ByteTokenizer()
  dead = RetrieverClient(RetrieverConfig(url="http://127.0.0.1:9/retrieve", max_retries=0))
  gen = ScriptedGenerator(tok, [SCRIPTS[0]])
  with pytest.raises(RetrieverError, match="127.0.0.1:9"):
    run_search_rollout(gen, tok, dead, SearchRolloutConfig(max_turns=1), 1)


def test_generator_contract_is_checked(server):
  tok = ByteTokenizer()
  client = RetrieverClient(RetrieverConfig(url=server.url))
  with pytest.raises(ValueError, match="expected 2 token lists"):
    run_search_rollout(lambda req: [[1]], tok, client, SearchRolloutConfig(), 2)
  with pytest.raises(ValueError, match="over its max_new_tokens=4"):
    run_search_rollout(lambda req: [[1] * 5], tok, client, SearchRolloutConfig(max_turn_tokens=4), 1)
  with pytest.raises(ValueError, match="search.max_turn_tokens"):
    SearchRolloutConfig(max_turn_tokens=0)


@pytest.mark.slow
@pytest.mark.parametrize("agg_mode, ratio_level", [("token-mean", "token"),
                                                   ("seq-mean-token-mean", "sequence")])
def test_trainer_loss_ignores_retrieved_tokens(server, agg_mode, ratio_level):
  """The trainer's own loss path (train.assemble_batch -> update.loss_fn / update.train_step) on a
  real search rollout: perturbing the retrieved tokens' old and reference log-probs changes the
  gradient, and the updated parameters, by exactly 0; the same perturbation on sampled tokens
  does change them. (Advantages are one per sequence in this trainer, `losses.policy_loss`
  refuses per-token ones: a retrieved token has no advantage of its own to perturb.)"""
  from flax import nnx
  from grpo_jax import losses, train, update
  from grpo_jax.config import OptimConfig, RLConfig
  from grpo_jax.models import Decoder
  from grpo_jax.testing.models import tiny_config
  tok = ByteTokenizer()
  r, _, _ = _run(server, tok, max_response_tokens=320, max_obs_tokens=100)
  N, R = r.response_ids.shape
  assert r.info_mask.sum() > 0
  prompt = np.array([tok.encode("question: where? ")], np.int32)
  batch, _ = train.assemble_batch(
      jnp.asarray(prompt), jnp.ones_like(jnp.asarray(prompt)), jnp.asarray(r.response_ids),
      jnp.asarray(r.response_mask), jnp.asarray(r.info_mask),
      jnp.asarray([1.0, 0.0, 0.5, 0.0, 1.0], jnp.float32), group_size=N, num_groups=1,
      estimator="grpo", adv_eps=1e-6, filter_zero_std=False, kl_on_filtered=True)
  model = Decoder(tiny_config("qwen2", vocab_size=258), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  logp = update.response_logprobs(graphdef, params, batch["tokens"], batch["attn_mask"], R)
  noise = jnp.asarray(np.random.default_rng(0).normal(scale=0.3, size=(N, R)), jnp.float32)
  batch["old_logp"] = logp + noise  # off-policy: ratios away from 1, some clipped
  batch["ref_logp"] = logp - noise
  rl = RLConfig(loss=losses.LossConfig(agg_mode=agg_mode, ratio_level=ratio_level, kl_coef=0.1,
                                       entropy_coef=0.01, max_len=R))
  info = jnp.asarray(r.info_mask, bool)
  sampled = jnp.asarray(r.loss_mask, bool)

  def perturbed(where):
    return {**batch, "old_logp": jnp.where(where, batch["old_logp"] + 7.0, batch["old_logp"]),
            "ref_logp": jnp.where(where, batch["ref_logp"] - 5.0, batch["ref_logp"])}

  @jax.jit
  def grads(b):
    g = jax.grad(lambda p: update.loss_fn(p, graphdef, b, rl, R,
                                          update.minibatch_denominators(b, rl), 1.0)[0])(params)
    return jax.tree.leaves(g)

  base = grads(batch)
  for a, b in zip(base, grads(perturbed(info))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  changed = grads(perturbed(sampled & (jnp.arange(R)[None, :] % 5 == 0)))
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(base, changed))

  # One optimizer step of update.train_step (2 micro-batches): bit-identical parameters.
  tx = update.make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0), 10)

  @jax.jit
  def step(b):
    state = update.TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                              rng=jax.random.PRNGKey(0), skipped=jnp.zeros((), jnp.int32))
    b = {k: v[:4] for k, v in b.items()}  # 4 rows: 2 micro-batches of 2
    new, _ = update.train_step(state, b, graphdef=graphdef, tx=tx, rl=rl, response_len=R,
                               num_micro=2, temperature=1.0)
    return jax.tree.leaves(new.params)

  for a, b in zip(step(batch), step(perturbed(info))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # The trainer's default path: the 4 responses (one prompt) packed into one row after their
  # shared prompt, retrieved tokens attended but out of the loss. The same invariance, and the
  # gradient of the unpacked shared-prefix step (an "optimizer" that keeps the gradient).
  extent = np.asarray(update._response_extent(batch["attn_mask"][:4], R))
  assert extent.sum() < 4 * extent.max()  # ragged: the packed row is the cheapest branch
  packing = update.Packing((int(extent.sum()),), keys_per_token=1e9)
  keep = optax.GradientTransformation(
      lambda p: jax.tree.map(jnp.zeros_like, p),
      lambda g, state, p=None: (jax.tree.map(jnp.zeros_like, g), g))

  @functools.partial(jax.jit, static_argnums=1)
  def grads_of_step(b, packed):
    state = update.TrainState(params=params, opt_state=keep.init(params),
                              step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0),
                              skipped=jnp.zeros((), jnp.int32))
    new, _ = update.train_step(
        state, {k: v[:4] for k, v in b.items()}, graphdef=graphdef, tx=keep, rl=rl,
        response_len=R, num_micro=1, temperature=1.0, group_size=4,
        buckets=update.response_buckets(R) if packed else None,
        packing=packing if packed else None)
    return jax.tree.leaves(new.opt_state)

  packed = grads_of_step(batch, True)
  for a, b in zip(packed, grads_of_step(perturbed(info), True)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(packed, grads_of_step(batch, False)):
    scale = float(np.max(np.abs(b)))
    assert scale > 0
    np.testing.assert_allclose(a, b, atol=1e-4 * scale)


@pytest.mark.slow
def test_end_to_end_tiny(tmp_path, server):
  """Parquet → prompts → scripted policy that searches the question → server → EM reward."""
  import pyarrow.parquet as pq
  path = write_nq_parquet(tmp_path / "train.parquet")
  table = pq.read_table(path).to_pylist()
  assert len(table) == len(TINY_QA) and set(table[0]) == {"id", "question", "golden_answers"}
  processed = pq.read_table(write_nq_parquet(tmp_path / "p.parquet", style="search_r1"))
  row = processed.to_pylist()[0]
  assert row["prompt"][0]["content"] == sp.make_prompt(TINY_QA[0][0])
  assert row["reward_model"]["ground_truth"]["target"] == ["Paris"]
  tok = ByteTokenizer()
  # A "policy" that searches the question and answers with the title of the top document.
  client = RetrieverClient(RetrieverConfig(url=server.url, topk=1))
  titles = [client.retrieve([ex["question"]])[0][0]["document"]["contents"].split("\n")[0]
            for ex in table]
  scripts = [[f"<think>search</think><search>{ex['question']}</search>",
              f"<think>found</think><answer>{t}</answer>"] for ex, t in zip(table, titles)]
  r, _, _ = _run(server, tok, scripts=scripts)
  rewards = search_r1_em([sp.make_prompt(ex["question"]) for ex in table], r.texts,
                         [{"answer": ex["golden_answers"]} for ex in table])
  assert np.mean(rewards) >= 0.75, (rewards, titles)
  assert r.metrics["search/answer_rate"] == 1.0


# ----------------------------------------------------------------------------- turn semantics

EOS = ScriptedGenerator.EOS


@pytest.mark.parametrize("text, ours, theirs", [
    # The two cases where our first-closing-tag cut and Search-R1's </search>-first cut differ.
    ("<search>a</answer> b</search>", sp.Action("invalid"), sp.Action("search", "a</answer> b")),
    ("<search>q <answer>x</answer> more</search>", sp.Action("answer", "x"),
     sp.Action("search", "q <answer>x</answer> more")),
    # parse_action's nesting rule holds before the cut only.
    ("<search> a <answer> b </answer> </search>", sp.Action("answer", "b"),
     sp.Action("search", "a <answer> b </answer>")),
])
def test_cut_cases_ours_vs_search_r1(server, text, ours, theirs):
  def search_r1_cut(t):  # Search-R1's _postprocess_responses, verbatim in logic
    return (t.split("</search>")[0] + "</search>" if "</search>" in t
            else t.split("</answer>")[0] + "</answer>" if "</answer>" in t else t)
  assert sp.parse_action(sp.cut_at_action(text)) == ours
  assert sp.parse_action(search_r1_cut(text)) == theirs
  assert sp.parse_action(text) == theirs  # the nesting rule, on the uncut text
  # In a rollout: the answer case ends the episode with that answer, the others do not.
  r, _, client = _run(server, ByteTokenizer(), scripts=[[text, "<answer>z</answer>"]])
  if ours.kind == "answer":
    assert r.finish_reasons == ["answer"] and r.answers == [ours.content] and client.calls == []
    assert r.texts[0] == sp.cut_at_action(text)
  else:
    assert r.answers == ["z"] and sp.INVALID_ACTION_OBSERVATION in r.texts[0]


@pytest.mark.parametrize("tok", ["bytes", "bpe"])
def test_eos_without_action_end_vs_invalid(server, bpe, tok):
  """Ours ends the row and keeps (trains on) the EOS; Search-R1's drops it and corrects."""
  tokenizer = ByteTokenizer() if tok == "bytes" else bpe
  eos = tokenizer.eos_token_id
  scripts = [["<think>no action" + EOS, "<think>ok</think><answer>Paris</answer>"],
             ["<think>hm" + EOS, "<search>Everest</search>", "still nothing" + EOS],
             ["<answer>a</answer>" + EOS],  # EOS after an action: cut away in both modes
             [EOS, "<answer>b</answer>"]]  # EOS alone
  end, gen_end, _ = _run(server, tokenizer, scripts=scripts)
  inv, gen_inv, client = _run(server, tokenizer, scripts=scripts, eos_without_action="invalid")
  n_end, n_inv = end.response_mask.sum(1), inv.response_mask.sum(1)
  # "end": rows 0, 1, 3 stop at their first turn, the EOS is the last response token, sampled.
  assert end.finish_reasons == ["eos", "eos", "answer", "eos"]
  for i in (0, 1, 3):
    assert end.response_ids[i, n_end[i] - 1] == eos and end.loss_mask[i, n_end[i] - 1] == 1
  assert end.texts[0] == "<think>no action" and end.texts[3] == ""
  # "invalid": no EOS anywhere in the responses; the corrective observation follows instead.
  assert inv.finish_reasons == ["answer", "max_turns", "answer", "answer"]
  assert inv.answers == ["Paris", None, "a", "b"]
  for i in range(4):
    assert eos not in inv.response_ids[i, :n_inv[i]].tolist()
  assert inv.texts[0] == ("<think>no action" + sp.INVALID_ACTION_OBSERVATION
                          + "<think>ok</think><answer>Paris</answer>")
  assert inv.texts[3] == sp.INVALID_ACTION_OBSERVATION + "<answer>b</answer>"
  # Row 1: invalid (EOS), search, then the last turn's EOS: dropped, the row ends "max_turns".
  assert inv.texts[1].startswith("<think>hm" + sp.INVALID_ACTION_OBSERVATION + "<search>Everest")
  assert inv.texts[1].endswith("still nothing") and inv.num_valid_actions[1] == 1
  assert client.calls == [["Everest"]]
  # The generator's context was rewound past each dropped EOS (the contract's `keep`).
  for i in range(4):
    assert gen_inv.contexts[i][:n_inv[i]] == inv.response_ids[i, :n_inv[i]].tolist()
  # The corrective observation is forced: masked out of the loss like retrieved text.
  obs = tokenizer.encode(sp.INVALID_ACTION_OBSERVATION, add_special_tokens=False)
  assert inv.info_mask[3, :len(obs)].all() and inv.loss_mask[3, :len(obs)].sum() == 0
  with pytest.raises(ValueError, match="search.eos_without_action"):
    SearchRolloutConfig(eos_without_action="drop")


# ----------------------------------------------------------------------------- budgets


def test_budgets_and_truncation_counts_per_kind(server):
  tok = ByteTokenizer()
  obs = len(tok.encode(sp.INVALID_ACTION_OBSERVATION))  # 191 bytes
  kinds = lambda r: {k: r.metrics[f"search/truncated_{k}"] for k in  # noqa: E731
                     ("turn", "sampled_total", "obs", "obs_total", "response")}
  zero = dict(turn=0, sampled_total=0, obs=0, obs_total=0, response=0)
  # Per-turn: 20 per turn: "x" * 50 and "y" * 50 are cut (turns 0, 1), the last turn answers.
  r, _, _ = _run(server, tok, scripts=[["x" * 50, "y" * 50, "<answer>a</answer>"]],
                 max_turn_tokens=20)
  assert kinds(r) == {**zero, "turn": 2} and r.finish_reasons == ["answer"]
  # Total sampled: 20 tokens in all; turn 0 keeps 12, turn 1 may sample 8 and is cut: "length".
  r, gen, _ = _run(server, tok, scripts=[["x" * 12, "y" * 50]], max_turn_tokens=16,
                   max_sampled_tokens=20)
  assert [int(q.max_new_tokens[0]) for q in gen.requests] == [16, 8]
  assert kinds(r) == {**zero, "sampled_total": 1} and r.finish_reasons == ["length"]
  assert r.loss_mask.sum() == 20 and r.info_mask.sum() == obs
  # Per observation: the corrective message cut to 40 tokens, twice.
  r, _, _ = _run(server, tok, scripts=[["a", "b", "<answer>c</answer>"]], max_obs_tokens=40)
  assert kinds(r) == {**zero, "obs": 2} and r.info_mask.sum() == 80
  # Total observation: 250 forced tokens in all: the first message whole, the second cut to 59.
  r, _, _ = _run(server, tok, scripts=[["a", "b", "<answer>c</answer>"]], max_obs_tokens=None,
                 max_obs_total_tokens=250)
  assert kinds(r) == {**zero, "obs_total": 1} and r.info_mask.sum() == 250
  assert r.finish_reasons == ["answer"]
  # Whole response: R = 100 cuts the first observation, the row ends "length".
  r, _, _ = _run(server, tok, scripts=[["a" * 10, "b"]], max_response_tokens=100,
                 max_obs_tokens=None)
  assert kinds(r) == {**zero, "response": 1} and r.finish_reasons == ["length"]
  assert r.response_mask.sum() == 100
  # A turn cut by R (sampled budget left = R left): counted as "response".
  r, _, _ = _run(server, tok, scripts=[["a" * 10]], max_response_tokens=8, max_turn_tokens=8)
  assert kinds(r) == {**zero, "response": 1}


# ----------------------------------------------------------------------------- retrieval batching


def test_one_retrieval_request_per_turn_for_all_rows(server):
  """64 rows searching in the same turn: one HTTP request carries all their queries."""
  tok = ByteTokenizer()
  questions = [q for q, _ in TINY_QA] * 8
  scripts = [[f"<search>{q}</search>", "<answer>x</answer>"] for q in questions]
  client = RetrieverClient(RetrieverConfig(url=server.url))
  gen = ScriptedGenerator(tok, scripts)
  r = run_search_rollout(gen, tok, client, SearchRolloutConfig(max_turns=2, topk=1),
                         len(scripts))
  assert client.num_requests == 1 and r.num_searches.sum() == len(scripts)
  assert r.metrics["time/retrieval_s"] > 0
  for i, q in enumerate(questions):  # each row got its own query's documents
    want = client.retrieve([q], topk=1)[0][0]["document"]["contents"].split("\n")[0]
    assert f"Doc 1(Title: {want})" in r.texts[i]


def test_lockstep_calls_the_generator_on_every_turn(server):
  tok = ByteTokenizer()
  gen = ScriptedGenerator(tok, [["<answer>a</answer>"]])
  client = RetrieverClient(RetrieverConfig(url=server.url))
  run_search_rollout(gen, tok, client, SearchRolloutConfig(max_turns=3), 1, lockstep=True)
  assert [len(q.rows) for q in gen.requests] == [1, 0, 0, 0]
  gen = ScriptedGenerator(tok, [["<answer>a</answer>"]])
  run_search_rollout(gen, tok, client, SearchRolloutConfig(max_turns=3), 1)
  assert [len(q.rows) for q in gen.requests] == [1]
