"""Multi-turn Search-R1 rollouts on the host: turns, one batched retrieval per turn, the info mask.

The loop (Search-R1's ``LLMGenerationManager.run_llm_loop``, re-derived)::

  for turn in 0 .. max_turns:                       # max_turns + 1 generations at most
    out = generate_turn(TurnRequest(active rows, observation tokens to force, budgets))
    per row: cut the new tokens after the first </search> / </answer> (or at EOS), parse the action
      answer  -> row done
      EOS before any action -> row done ("end"), or EOS dropped and invalid ("invalid")
      search  -> query queued (on the last turn nothing is executed: row done)
      invalid -> corrective observation (on the last turn: row done)
    ONE retriever call with the queued queries of all rows
    per searching row: "\\n\\n<information>Doc 1(Title: ..) ..</information>\\n\\n", tokenised,
      cut to the observation budgets and to the remaining response budget, appended with
      info_mask = 1   (budgets and their truncation counts: SearchRolloutConfig)

The generator contract (what the real KV-cache sampler must implement as `generate_turn`):

* The generator owns one context per rollout row ``i`` in ``0..N-1``: the prompt of row ``i``
  (prefilled by the sampler before the first call; the orchestrator never sees prompts) followed by
  the row's *response so far*. It is called once per turn with a :class:`TurnRequest` ``req`` over
  the active rows only (``req.rows``, ascending); finished rows are never passed again, so they
  cost nothing.
* For the ``j``-th active row ``i = req.rows[j]`` the generator must, in this order:
  1. drop every response token of its context past position ``req.keep[j]`` (the orchestrator cut
     tokens that were generated after the action; always a no-op for a sampler that honours the
     stop strings, so the KV cache just rewinds its length);
  2. append ``req.forced_ids[j]`` to the context without sampling them (the observation; one
     prefill chunk over the existing KV cache, no re-prefill of the history);
  3. sample at most ``req.max_new_tokens[j]`` tokens, stopping after the token that completes one
     of ``req.stop_strings`` (:data:`~grpo_jax.rollout.search_protocol.STOP_STRINGS`) or after EOS.
  It returns a :class:`TurnOutput` (or just the list of token-id lists) with, per active row in the
  same order, the sampled ids (stop string / EOS token included) and optionally their sampling
  log-probabilities.
* After the call the orchestrator keeps a prefix of each row's new tokens (up to and including the
  token that completes the first closing action tag, or the first EOS), so ``keep`` of the next call
  is ``previous keep + len(forced_ids) + len(kept)``.

Token alignment of the outputs: ``response_ids[i, :L_i]`` is exactly the token sequence that
followed the prompt in the generator's context of row ``i`` (sampled tokens and forced observation
tokens interleaved), right-padded to ``max_response_tokens``. For every position ``t``:
``response_mask = t < L_i``; ``info_mask = 1`` iff the token was forced (observation, retrieved
documents or the corrective message, as in Search-R1); ``loss_mask = response_mask * (1 -
info_mask)``: the tokens the policy sampled, the only ones that enter the policy loss, the KL, the
entropy and the token count of loss aggregation. ``logprobs[i, t]`` is the generator's sampling
log-probability of sampled tokens and 0 on forced tokens and padding.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from grpo_jax.rollout import search_protocol as sp


class Tokenizer(Protocol):
  """What the rollout needs of a tokenizer (a HF ``PreTrainedTokenizerFast`` qualifies)."""

  eos_token_id: int | None
  pad_token_id: int | None

  def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class Retriever(Protocol):
  """What the rollout needs of a retriever (:class:`~grpo_jax.rollout.retriever_client.RetrieverClient`)."""

  def retrieve(self, queries: Sequence[str], topk: int | None = None,
               return_scores: bool = True) -> list[list[dict[str, Any]]]: ...


EOS_WITHOUT_ACTION = ("end", "invalid")

# Truncation kinds counted in the metrics (`search/truncated_<kind>`), see SearchRolloutConfig.
TRUNCATION_KINDS = ("turn", "sampled_total", "obs", "obs_total", "response")


@dataclasses.dataclass(frozen=True)
class SearchRolloutConfig:
  """Limits and turn semantics of a search rollout.

  Budgets, all in tokens of one rollout row (Search-R1's names in brackets):

  ======================  =====================================================================
  max_turn_tokens         sampled per turn (``max_response_length``, 500 in its scripts)
  max_sampled_tokens      sampled over the whole response (no Search-R1 counterpart; None: R)
  max_obs_tokens          per observation (``max_obs_length``, 500); None: no cap
  max_obs_total_tokens    forced (observation) tokens over the whole response (None: R)
  max_response_tokens     R, the whole response, sampled + forced: the output width
                          (Search-R1 cuts the response at ``max_prompt_length``, 4096)
  ======================  =====================================================================

  A turn that spends its sampling budget without an action or EOS is cut: the turn is invalid
  (corrective observation) if only ``max_turn_tokens`` ran out, and the row ends ("length") if
  ``max_sampled_tokens`` or R did. An observation is cut to the smallest of ``max_obs_tokens``,
  what is left of ``max_obs_total_tokens`` and what is left of R (a token-level cut may cut the
  closing ``</information>``, as in Search-R1); the row goes on (it ends when R is spent). Each
  cut is counted by the binding limit in ``metrics["search/truncated_<kind>"]``, kinds
  :data:`TRUNCATION_KINDS`: "turn", "sampled_total", "obs", "obs_total", "response" (ties
  go to the later kind in that list).

  Attributes:
    max_turns: turns whose search is executed (Search-R1's ``max_turns``); one more, final turn
      runs without search, so a row generates at most ``max_turns + 1`` times.
    max_response_tokens: R (table above).
    max_turn_tokens: table above.
    max_obs_tokens: table above.
    max_doc_chars: optional cap in characters on the documents inside ``<information>`` (the tags
      are kept whole); None: no cap.
    topk: documents per search.
    max_sampled_tokens: table above.
    max_obs_total_tokens: table above.
    eos_without_action: what a turn that ends with EOS before any closing action tag does.
      "end" (ours): the row ends ("eos", reward as the text stands) and the EOS token is part of
      the response, trained on like any sampled token. "invalid" (Search-R1): the EOS token is
      dropped (Search-R1 decodes with ``skip_special_tokens`` and re-tokenises the text, so it
      never trains on it) and the turn is an invalid action: the corrective
      :data:`~grpo_jax.rollout.search_protocol.INVALID_ACTION_OBSERVATION` follows and the row
      goes on; on the last turn the row ends ("max_turns"), as any last turn without an answer.
  """

  max_turns: int = 4
  max_response_tokens: int = 1024
  max_turn_tokens: int = 512
  max_obs_tokens: int | None = 512
  max_doc_chars: int | None = None
  topk: int = 3
  max_sampled_tokens: int | None = None
  max_obs_total_tokens: int | None = None
  eos_without_action: str = "end"

  def __post_init__(self):
    for name in ("max_turns", "max_response_tokens", "max_turn_tokens", "topk"):
      value = getattr(self, name)
      low = 0 if name == "max_turns" else 1
      if not isinstance(value, int) or value < low:
        raise ValueError(f"search.{name}: expected an int >= {low}, got {value!r}")
    for name in ("max_obs_tokens", "max_doc_chars", "max_obs_total_tokens"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 0):
        raise ValueError(f"search.{name}: expected an int >= 0 or None, got {value!r}")
    value = self.max_sampled_tokens
    if value is not None and (not isinstance(value, int) or value < 1):
      raise ValueError(f"search.max_sampled_tokens: expected an int >= 1 or None, got {value!r}")
    if self.eos_without_action not in EOS_WITHOUT_ACTION:
      raise ValueError(f"search.eos_without_action: expected one of {EOS_WITHOUT_ACTION}, got "
                       f"{self.eos_without_action!r}")

  @property
  def sampled_budget(self) -> int:
    """Sampled tokens a row may hold in all (R when `max_sampled_tokens` is None)."""
    R = self.max_response_tokens
    return R if self.max_sampled_tokens is None else min(self.max_sampled_tokens, R)

  @property
  def obs_budget(self) -> int:
    """Forced tokens a row may hold in all (R when `max_obs_total_tokens` is None)."""
    R = self.max_response_tokens
    return R if self.max_obs_total_tokens is None else min(self.max_obs_total_tokens, R)


@dataclasses.dataclass(frozen=True)
class TurnRequest:
  """One call of `generate_turn` (see the module docstring for the contract).

  Attributes:
    rows: [A] indices of the active rollout rows, ascending.
    keep: [A] response tokens of each row's context to keep before appending `forced_ids`.
    forced_ids: A lists of observation token ids to append without sampling (empty on turn 0).
    max_new_tokens: [A] sampling budget of each row for this turn (>= 1).
    stop_strings: generation stops after the token that completes one of these.
    turn: 0-based turn index.
    is_last_turn: True on the final turn, whose searches are not executed.
  """

  rows: np.ndarray
  keep: np.ndarray
  forced_ids: list[list[int]]
  max_new_tokens: np.ndarray
  stop_strings: tuple[str, ...]
  turn: int
  is_last_turn: bool


@dataclasses.dataclass(frozen=True)
class TurnOutput:
  """What `generate_turn` returns: per active row, the sampled ids and optionally their log-probs."""

  token_ids: Sequence[Sequence[int]]
  logprobs: Sequence[Sequence[float]] | None = None


GenerateTurn = Callable[[TurnRequest], "TurnOutput | Sequence[Sequence[int]]"]


@dataclasses.dataclass(frozen=True)
class SearchRolloutResult:
  """Outputs of :func:`run_search_rollout` for N rows and R = max_response_tokens.

  Attributes:
    response_ids: [N, R] int32, right-padded with the pad id.
    response_mask: [N, R] int32, 1 on real tokens (sampled and forced).
    info_mask: [N, R] int32, 1 on forced (retrieved / corrective) tokens.
    loss_mask: [N, R] int32, response_mask * (1 - info_mask).
    logprobs: [N, R] float32 sampling log-probs (0 on forced tokens and padding), or None if the
      generator did not return them.
    texts: N decoded responses (special tokens skipped).
    segments: per row, the response as (text, is_retrieved) pieces, for export and inspection.
    answers: per row the content of the answer action, or None.
    finish_reasons: per row "answer", "eos", "length" (budget spent) or "max_turns".
    num_turns, num_searches, num_valid_actions: [N] int32 per-row counts (Search-R1's
      turns_stats, valid_search_stats, valid_action_stats; a search on the last turn counts as a
      valid action but not as a search, since it is not executed).
    metrics: scalar summaries (see :func:`search_metrics`).
  """

  response_ids: np.ndarray
  response_mask: np.ndarray
  info_mask: np.ndarray
  loss_mask: np.ndarray
  logprobs: np.ndarray | None
  texts: list[str]
  segments: list[list[tuple[str, bool]]]
  answers: list[str | None]
  finish_reasons: list[str]
  num_turns: np.ndarray
  num_searches: np.ndarray
  num_valid_actions: np.ndarray
  metrics: dict[str, float]


@dataclasses.dataclass
class _Row:
  ids: list[int] = dataclasses.field(default_factory=list)
  info: list[int] = dataclasses.field(default_factory=list)
  logp: list[float] = dataclasses.field(default_factory=list)
  segments: list[tuple[str, bool]] = dataclasses.field(default_factory=list)
  keep: int = 0  # response tokens the generator's context shares with `ids`
  done: bool = False
  finish: str = ""
  answer: str | None = None
  turns: int = 0
  searches: int = 0
  valid: int = 0
  sampled: int = 0  # sampled tokens kept
  retrieved: int = 0  # forced tokens kept

  def append(self, ids: Sequence[int], text: str, retrieved: bool,
             logp: Sequence[float] | None = None) -> None:
    self.ids.extend(ids)
    if retrieved:
      self.retrieved += len(ids)
    else:
      self.sampled += len(ids)
    self.info.extend([int(retrieved)] * len(ids))
    self.logp.extend([0.0] * len(ids) if logp is None else logp)
    if text:
      self.segments.append((text, retrieved))


def _decode(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
  return tokenizer.decode(list(ids), skip_special_tokens=True)


def _action_cut(tokenizer: Tokenizer, ids: Sequence[int]) -> int:
  """Smallest k such that the decoding of ids[:k] holds a closing action tag; len(ids) if none.

  Binary search over prefixes: decodings grow with k, so "contains the tag" is monotone; this
  costs O(log T) decodes per row and never re-tokenises the sampled text.
  """
  if sp.action_end(_decode(tokenizer, ids)) is None:
    return len(ids)
  lo, hi = 1, len(ids)
  while lo < hi:
    mid = (lo + hi) // 2
    if sp.action_end(_decode(tokenizer, ids[:mid])) is not None:
      hi = mid
    else:
      lo = mid + 1
  return lo


def _check_output(out: Any, num_active: int, budgets: np.ndarray
                  ) -> tuple[list[list[int]], list[list[float]] | None]:
  if not isinstance(out, TurnOutput):
    out = TurnOutput(token_ids=out)
  token_ids = [list(map(int, ids)) for ids in out.token_ids]
  if len(token_ids) != num_active:
    raise ValueError(f"generate_turn: expected {num_active} token lists (one per active row), got "
                     f"{len(token_ids)}")
  for j, ids in enumerate(token_ids):
    if len(ids) > budgets[j]:
      raise ValueError(f"generate_turn: row {j} returned {len(ids)} tokens, over its "
                       f"max_new_tokens={int(budgets[j])}")
  logprobs = None
  if out.logprobs is not None:
    logprobs = [list(map(float, lp)) for lp in out.logprobs]
    if [len(lp) for lp in logprobs] != [len(ids) for ids in token_ids]:
      raise ValueError("generate_turn: logprobs must have one value per returned token")
  return token_ids, logprobs


def run_search_rollout(generate_turn: GenerateTurn, tokenizer: Tokenizer, retriever: Retriever,
                       config: SearchRolloutConfig, num_rows: int, *,
                       lockstep: bool = False) -> SearchRolloutResult:
  """Runs the Search-R1 multi-turn loop for `num_rows` rollouts (prompts live in the generator).

  Args:
    generate_turn: the per-turn generator; contract in the module docstring.
    tokenizer: encodes observations (no special tokens) and decodes sampled ids.
    retriever: called once per turn with the queries of all rows that searched (one request,
      whatever the number of rows).
    config: the :class:`SearchRolloutConfig`.
    num_rows: N, the number of rollout rows (prompts × group size).
    lockstep: call `generate_turn` on each of the ``max_turns + 1`` turns, with an empty request
      once no row is active, instead of stopping early: generators of several processes that run
      their device work together (``search_sampler`` on a multi-process mesh) must be called the
      same number of times.

  Raises:
    RetrieverError: from the retriever, unchanged: the caller's state is untouched.
    ValueError: the generator broke its contract.
  """
  if not isinstance(num_rows, int) or num_rows < 1:
    raise ValueError(f"num_rows: expected a positive int, got {num_rows!r}")
  eos_id = getattr(tokenizer, "eos_token_id", None)
  budget_total = config.max_response_tokens
  rows = [_Row() for _ in range(num_rows)]
  saw_logprobs: bool | None = None
  truncations = dict.fromkeys(TRUNCATION_KINDS, 0)
  retrieval_s = 0.0

  for turn in range(config.max_turns + 1):
    is_last = turn == config.max_turns
    active = [i for i, r in enumerate(rows) if not r.done]
    if not active and not lockstep:
      break
    caps = [{"turn": config.max_turn_tokens,
             "sampled_total": config.sampled_budget - rows[i].sampled,
             "response": budget_total - len(rows[i].ids)} for i in active]
    budgets = np.array([min(c.values()) for c in caps], np.int64)
    request = TurnRequest(
        rows=np.asarray(active, np.int64),
        keep=np.array([rows[i].keep for i in active], np.int64),
        forced_ids=[rows[i].ids[rows[i].keep:] for i in active],
        max_new_tokens=budgets, stop_strings=sp.STOP_STRINGS, turn=turn, is_last_turn=is_last)
    token_ids, logprobs = _check_output(generate_turn(request), len(active), budgets)
    if not active:
      continue
    if saw_logprobs is None:
      saw_logprobs = logprobs is not None
    elif saw_logprobs != (logprobs is not None):
      raise ValueError("generate_turn: return logprobs on every turn or on none")

    queued: list[tuple[int, str]] = []  # (row, query) in row order
    for j, i in enumerate(active):
      row, new = rows[i], token_ids[j]
      stop_at_eos = eos_id is not None and eos_id in new
      limit = new.index(eos_id) + 1 if stop_at_eos else len(new)
      k = _action_cut(tokenizer, new[:limit])
      hit_eos = stop_at_eos and k == limit  # EOS before any closing action tag
      if hit_eos and config.eos_without_action == "invalid":
        # Search-R1: the EOS is not kept (nor trained on); the turn is an invalid action.
        k, hit_eos = k - 1, False
      elif k == len(new) == budgets[j] and not stop_at_eos:
        # The budget ran out before an action: count the limit that cut the turn.
        truncations[_binding(caps[j])] += 1
      kept_text = _decode(tokenizer, new[:k])
      row.append(new[:k], kept_text, retrieved=False, logp=None if logprobs is None else
                 logprobs[j][:k])
      row.keep = len(row.ids)
      row.turns += 1
      action = sp.parse_action(sp.cut_at_action(kept_text))
      row.valid += action.is_valid
      if action.kind == "answer":
        row.done, row.finish, row.answer = True, "answer", action.content
      elif hit_eos:
        row.done, row.finish = True, "eos"
      elif len(row.ids) >= budget_total or row.sampled >= config.sampled_budget:
        row.done, row.finish = True, "length"
      elif is_last:
        row.done, row.finish = True, "max_turns"
      elif action.kind == "search":
        row.searches += 1
        queued.append((i, action.content))
      else:
        _append_observation(row, sp.INVALID_ACTION_OBSERVATION, tokenizer, config, truncations)

    if queued:
      t0 = time.perf_counter()
      results = retriever.retrieve([q for _, q in queued], topk=config.topk, return_scores=True)
      retrieval_s += time.perf_counter() - t0
      if len(results) != len(queued):
        raise ValueError(f"retriever: expected {len(queued)} result lists, got {len(results)}")
      for (i, _), hits in zip(queued, results):
        observation = sp.information_block(sp.format_documents(hits), config.max_doc_chars)
        _append_observation(rows[i], observation, tokenizer, config, truncations)

    for row in rows:
      if not row.done and len(row.ids) >= budget_total:
        row.done, row.finish = True, "length"

  # The last turn finishes every row it runs, so no row is left open here.
  result = _assemble(rows, tokenizer, config, bool(saw_logprobs))
  result.metrics.update({f"search/truncated_{k}": float(v) for k, v in truncations.items()})
  result.metrics["time/retrieval_s"] = retrieval_s
  return result


def _binding(caps: dict[str, int]) -> str:
  """The limit that cut: the smallest cap, ties to the later kind of TRUNCATION_KINDS."""
  low = min(caps.values())
  return [k for k in TRUNCATION_KINDS if caps.get(k) == low][-1]


def _append_observation(row: _Row, text: str, tokenizer: Tokenizer, config: SearchRolloutConfig,
                        truncations: dict[str, int]) -> None:
  full = list(tokenizer.encode(text, add_special_tokens=False))
  caps = {"obs": len(full) if config.max_obs_tokens is None else config.max_obs_tokens,
          "obs_total": config.obs_budget - row.retrieved,
          "response": config.max_response_tokens - len(row.ids)}
  ids = full[:max(min(caps.values()), 0)]
  if len(ids) < len(full):  # the text shown in `segments` must be that of the tokens kept
    truncations[_binding(caps)] += 1
    text = _decode(tokenizer, ids)
  row.append(ids, text, retrieved=True)


def _assemble(rows: list[_Row], tokenizer: Tokenizer, config: SearchRolloutConfig,
              with_logprobs: bool) -> SearchRolloutResult:
  n, width = len(rows), config.max_response_tokens
  pad_id = getattr(tokenizer, "pad_token_id", None)
  pad_id = 0 if pad_id is None else pad_id
  lengths_N = np.array([len(r.ids) for r in rows], np.int64)
  response_mask_NxR = (np.arange(width)[None, :] < lengths_N[:, None]).astype(np.int32)
  flat_ids = np.array([t for r in rows for t in r.ids], np.int32)
  flat_info = np.array([t for r in rows for t in r.info], np.int32)
  flat_logp = np.array([t for r in rows for t in r.logp], np.float32)
  ids_NxR = np.full((n, width), pad_id, np.int32)
  info_NxR = np.zeros((n, width), np.int32)
  logp_NxR = np.zeros((n, width), np.float32)
  where = response_mask_NxR.astype(bool)  # row-major order matches the flattened lists
  ids_NxR[where] = flat_ids
  info_NxR[where] = flat_info
  logp_NxR[where] = flat_logp
  loss_NxR = response_mask_NxR * (1 - info_NxR)
  num_turns = np.array([r.turns for r in rows], np.int32)
  num_searches = np.array([r.searches for r in rows], np.int32)
  num_valid = np.array([r.valid for r in rows], np.int32)
  finish = [r.finish for r in rows]
  return SearchRolloutResult(
      response_ids=ids_NxR, response_mask=response_mask_NxR, info_mask=info_NxR,
      loss_mask=loss_NxR, logprobs=logp_NxR if with_logprobs else None,
      texts=[_decode(tokenizer, r.ids) for r in rows], segments=[r.segments for r in rows],
      answers=[r.answer for r in rows], finish_reasons=finish, num_turns=num_turns,
      num_searches=num_searches, num_valid_actions=num_valid,
      metrics=search_metrics(num_turns, num_searches, num_valid, finish,
                             response_mask_NxR.sum(axis=1),
                             (info_NxR * response_mask_NxR).sum(axis=1)))


def search_metrics(num_turns: np.ndarray, num_searches: np.ndarray, num_valid: np.ndarray,
                   finish_reasons: Sequence[str], num_response_tokens: np.ndarray,
                   num_forced_tokens: np.ndarray) -> dict[str, float]:
  """Scalar rollout metrics from per-row counts (so that several processes can pool their rows).

  Args:
    num_turns, num_searches, num_valid: [N] per-row counts (:class:`SearchRolloutResult`).
    finish_reasons: N finish reasons.
    num_response_tokens, num_forced_tokens: [N] response tokens, and forced tokens among them.

  Returns:
    ``search/turns`` (mean generations per rollout), ``search/searches_per_rollout``,
    ``search/valid_action_rate`` (turns with a search or answer block / all turns),
    ``search/valid_search_rate`` (executed searches / all turns), ``search/answer_rate`` (rollouts
    that gave an answer), ``search/retrieved_token_share`` (forced tokens / response tokens), and
    ``search/finish_<reason>`` shares.
  """
  total_turns = max(int(num_turns.sum()), 1)
  n = max(len(finish_reasons), 1)
  metrics = {
      "search/turns": float(num_turns.mean()),
      "search/searches_per_rollout": float(num_searches.mean()),
      "search/valid_action_rate": float(num_valid.sum()) / total_turns,
      "search/valid_search_rate": float(num_searches.sum()) / total_turns,
      "search/answer_rate": sum(f == "answer" for f in finish_reasons) / n,
      "search/retrieved_token_share": float(np.sum(num_forced_tokens))
                                      / max(int(np.sum(num_response_tokens)), 1),
  }
  for reason in ("answer", "eos", "length", "max_turns"):
    metrics[f"search/finish_{reason}"] = sum(f == reason for f in finish_reasons) / n
  return metrics
