"""Search-R1's rewards: exact match of the last ``<answer>``, optionally with format credit.

Re-derived from Search-R1's ``verl/utils/reward_score/qa_em.py`` (EM, substring EM) and
``qa_em_format.py`` (EM with partial credit for a well-formed trajectory). Every reward here has the
project's signature ``fn(prompts, completions, examples) -> list[float]`` where
``examples[i]["answer"]`` is the list of gold answers (a single str is accepted too).

Answers are compared after SQuAD normalisation (lower-case, punctuation and articles removed,
whitespace collapsed). The answer is the content of the *last* ``<answer>`` block of the completion
(the completion excludes the prompt, so unlike Search-R1, which skips the prompt's example answer by
requiring two blocks, one block suffices).

Format credit (:func:`make_search_r1_reward` with non-zero scores), as ``qa_em_format``:

==========================================  ===================================
answer correct, trajectory well formed      ``score``                    (1.0)
answer correct, trajectory malformed        ``score - structure_format_score`` (0.8)
answer wrong or missing, well formed,       ``structure_format_score + retrieval_score`` (0.3)
  a gold answer appears in an <information>
answer wrong or missing, well formed        ``structure_format_score``   (0.2)
answer wrong, malformed                     ``final_format_score``       (0.1)
no answer, malformed                        0
==========================================  ===================================

(the numbers in brackets are those noted in Search-R1's code: structure_format_score=0.2,
final_format_score=0.1, retrieval_score=0.1). "Well formed" means the completion is, up to
whitespace between blocks, ``(<think>..</think> <search>..</search> <information>..</information>)*
<think>..</think> <answer>..</answer>`` (:func:`is_valid_sequence`). All defaults are 0, which gives
plain EM, Search-R1's default reward.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from grpo_jax.rollout.search_protocol import extract_answer

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[Mapping[str, Any]]], list[float]]

try:  # The shared normaliser, once grpo_jax.rewards provides it.
  from grpo_jax.rewards import normalize_answer  # type: ignore[attr-defined]
except ImportError:
  _PUNCTUATION = frozenset(string.punctuation)
  _ARTICLES_RE = re.compile(r"\b(a|an|the)\b")

  def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES_RE.sub(" ", text).split())


_TAGS = ("think", "search", "information", "answer")
_TAG_RE = re.compile(r"(</?(?:think|search|information|answer)>)")
_INFO_RE = re.compile(r"<information>(.*?)</information>", re.DOTALL)

# (state, tag) -> next state of the well-formedness automaton.
_TRANSITIONS = {
    ("start", "<think>"): "in_think",
    ("information", "<think>"): "in_think",
    ("in_think", "</think>"): "after_think",
    ("after_think", "<search>"): "in_search",
    ("in_search", "</search>"): "after_search",
    ("after_search", "<information>"): "in_information",
    ("in_information", "</information>"): "information",
    ("after_think", "<answer>"): "in_answer",
    ("in_answer", "</answer>"): "end",
}
_INSIDE = frozenset({"in_think", "in_search", "in_information", "in_answer"})


def is_valid_sequence(completion: str) -> bool:
  """Whether `completion` follows think → (search → information → think)* → answer, nothing else.

  Text is allowed only inside blocks (whitespace between them is fine); tags must balance and
  nothing but whitespace may follow ``</answer>``.
  """
  for tag in _TAGS:
    if completion.count(f"<{tag}>") != completion.count(f"</{tag}>"):
      return False
  state = "start"
  for part in _TAG_RE.split(completion):
    if not part.strip():
      continue
    if _TAG_RE.fullmatch(part):
      state = _TRANSITIONS.get((state, part))
      if state is None:
        return False
    elif state not in _INSIDE:
      return False
  return state == "end"


def _gold_answers(example: Mapping[str, Any], index: int) -> list[str]:
  if not isinstance(example, Mapping) or "answer" not in example:
    raise ValueError(f"examples[{index}]: expected a mapping with an 'answer' field")
  gold = example["answer"]
  if isinstance(gold, str):
    return [gold]
  gold = list(gold)  # lists, tuples, NumPy arrays from Parquet
  if not all(isinstance(g, str) for g in gold):
    raise TypeError(f"examples[{index}]['answer']: expected a str or a list of str, got {gold!r}")
  return gold


def em_check(prediction: str, golden_answers: Sequence[str]) -> bool:
  """Normalised prediction equals any normalised gold answer."""
  pred = normalize_answer(prediction)
  return any(normalize_answer(g) == pred for g in golden_answers)


def subem_check(prediction: str, golden_answers: Sequence[str]) -> bool:
  """Any normalised gold answer is a substring of the normalised prediction."""
  pred = normalize_answer(prediction)
  return any(normalize_answer(g) in pred for g in golden_answers)


def retrieval_contains_answer(completion: str, golden_answers: Sequence[str]) -> bool:
  """Any normalised gold answer occurs in a normalised ``<information>`` block."""
  blocks = [normalize_answer(b) for b in _INFO_RE.findall(completion)]
  return any(normalize_answer(g) in b for b in blocks for g in golden_answers)


def score_completion(completion: str, golden_answers: Sequence[str], *, match: str = "em",
                     score: float = 1.0, structure_format_score: float = 0.0,
                     final_format_score: float = 0.0, retrieval_score: float = 0.0) -> float:
  """Reward of one completion; see the module docstring for the table of values."""
  check = {"em": em_check, "subem": subem_check}.get(match)
  if check is None:
    raise ValueError(f"match: expected 'em' or 'subem', got {match!r}")
  answer = extract_answer(completion)
  correct = answer is not None and check(answer, golden_answers)
  if not (structure_format_score or final_format_score or retrieval_score):
    return float(score) if correct else 0.0  # Search-R1's qa_em: no format check at all.
  well_formed = is_valid_sequence(completion)
  if correct:
    return float(score if well_formed else score - structure_format_score)
  if well_formed:
    bonus = retrieval_score if retrieval_contains_answer(completion, golden_answers) else 0.0
    return float(structure_format_score + bonus)
  return float(final_format_score) if answer is not None else 0.0


def make_search_r1_reward(match: str = "em", *, score: float = 1.0,
                          structure_format_score: float = 0.0, final_format_score: float = 0.0,
                          retrieval_score: float = 0.0) -> RewardFn:
  """A reward ``fn(prompts, completions, examples) -> list[float]`` with the given settings.

  Args:
    match: "em" (exact match) or "subem" (a gold answer is a substring of the answer).
    score: reward for a correct answer.
    structure_format_score, final_format_score, retrieval_score: format credit (module docstring);
      all 0 gives plain (sub)EM.
  """
  if match not in ("em", "subem"):
    raise ValueError(f"match: expected 'em' or 'subem', got {match!r}")
  kwargs = dict(match=match, score=score, structure_format_score=structure_format_score,
                final_format_score=final_format_score, retrieval_score=retrieval_score)

  def reward(prompts: Sequence[str], completions: Sequence[str],
             examples: Sequence[Mapping[str, Any]]) -> list[float]:
    del prompts  # The answer is judged on the completion alone.
    if len(completions) != len(examples):
      raise ValueError(f"completions/examples: expected equal lengths, got {len(completions)} "
                       f"and {len(examples)}")
    return [score_completion(c, _gold_answers(ex, i), **kwargs)
            for i, (c, ex) in enumerate(zip(completions, examples))]

  reward.__name__ = f"search_r1_{match}"
  return reward


search_r1_em = make_search_r1_reward("em")
search_r1_subem = make_search_r1_reward("subem")
search_r1_em_format = make_search_r1_reward(
    "em", structure_format_score=0.2, final_format_score=0.1, retrieval_score=0.1)
