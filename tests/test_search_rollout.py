"""The multi-turn search rollout with a scripted generator and the real BM25 server on loopback."""

import jax
import jax.numpy as jnp
import numpy as np
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


def test_loss_gradient_ignores_retrieved_tokens(server):
  """A masked token-mean policy loss does not see retrieved tokens: zero gradient, and changing
  their log-probs or count changes nothing."""
  r, _, _ = _run(server, ByteTokenizer())
  mask = jnp.asarray(r.loss_mask, jnp.float32)
  adv = jnp.asarray(np.arange(1, mask.shape[0] + 1) * 0.5 - 1.25, jnp.float32)  # none is 0

  def loss(logp_NxR):
    return -(logp_NxR * adv[:, None] * mask).sum() / mask.sum()

  logp = jnp.asarray(np.random.default_rng(0).normal(size=mask.shape), jnp.float32)
  grad = jax.grad(loss)(logp)
  info = jnp.asarray(r.info_mask, bool)
  assert r.info_mask.sum() > 0
  assert float(jnp.abs(jnp.where(info, grad, 0)).max()) == 0.0
  assert float(jnp.abs(jnp.where(mask > 0, grad, 0)).min(where=mask > 0, initial=1.0)) > 0
  perturbed = jnp.where(info, logp + 100.0, logp)
  assert float(loss(perturbed)) == pytest.approx(float(loss(logp)), rel=1e-6)
  # The aggregation length counts sampled tokens only.
  assert int(mask.sum()) == int(r.response_mask.sum() - r.info_mask.sum())


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
