"""Search-R1's rewards: exact match of the last ``<answer>``, optionally with format credit.

Re-derived from Search-R1's ``verl/utils/reward_score/qa_em.py`` (EM, substring EM, ``format_score``
for a wrong answer) and ``qa_em_format.py`` (v0.3: EM with partial credit for a well-formed
trajectory). The reward is :func:`search_r1`, with the project's signature
``fn(prompts, completions, examples, **settings) -> list[float]`` where ``examples[i]["answer"]`` is
the list of gold answers (a single str is accepted too). Its settings are keyword arguments, so a
config sets them directly: ``("search_r1", 1.0, {"structure_format_score": 0.2, ...})``.

Presets (:data:`PRESETS`, each also a reward name in ``grpo_jax.rewards.REGISTRY``) reproduce every
setting Search-R1 publishes in its training scripts:

====================  ========================================================================
name                  Search-R1 setting
====================  ========================================================================
``search_r1``         ``main_ppo`` (qa_em ``compute_score_em``, ``format_score=0``): the root
                      ``train_grpo.sh`` / ``train_ppo.sh`` and ``scripts/nq_hotpotqa/v0.1``,
                      ``v0.2``; also v0.3's validation reward (its ``val_reward_fn`` has all
                      format scores 0, which is plain EM).
``search_r1_format``  ``main_ppo_format`` as run by ``scripts/nq_hotpotqa/v0.3/train_*_format.sh``:
                      ``structure_format_score=0.2, final_format_score=0.1, retrieval_score=0``.
``search_r1_subem``   qa_em ``compute_score_subem`` (a gold answer inside the answer); no script
                      trains with it.
====================  ========================================================================

Answers are compared after SQuAD normalisation (lower-case, punctuation and articles removed,
whitespace collapsed). The answer is the content of the *last* ``<answer>`` block.

Completion-only scoring (a deliberate difference): Search-R1 decodes *prompt + response* and takes
the last of at least two ``<answer>`` blocks, counting on its prompt's single example
``<answer> Beijing </answer>`` to be the first. We score the completion alone and one block
suffices. The two agree for Search-R1's own prompt; they differ when the prompt holds another
number of example answers: with two or more, an answerless response reads in Search-R1 as the
prompt's last example answer (a leaked answer that can score, or earn ``final_format_score``);
with none, a response's single answer is ignored by Search-R1 (scored as no answer). Likewise
Search-R1's format check reads the text after the chat template's ``<|im_start|>assistant``
marker (no marker, e.g. a base template: always malformed); ours reads the completion, which is
that same text when the chat template is used.

Format credit (``main_ppo_format``; a row applies when the ones above it do not):

==========================================  ======================================================
answer correct, trajectory well formed      ``score``                                (1.0)
answer correct, trajectory malformed        ``score - structure_format_score``       (0.8)
answer wrong or missing, well formed,       ``structure_format_score + retrieval_score``
  a gold answer appears in an <information>
answer wrong or missing, well formed        ``structure_format_score``               (0.2)
answer wrong, malformed                     ``final_format_score``                   (0.1)
no answer, malformed                        0
==========================================  ======================================================

(brackets: ``search_r1_format``, whose retrieval score is 0). "Well formed" means the completion
is, up to whitespace between blocks, ``(<think>..</think> <search>..</search>
<information>..</information>)* <think>..</think> <answer>..</answer>`` (:func:`is_valid_sequence`).
With all three format scores 0 the reward is qa_em's: ``score`` if correct, ``format_score`` if
an answer is given but wrong, 0 without an answer. ``format_score`` belongs to qa_em only
(``main_ppo_format`` passes it but never reads it), so it may not be combined with the others.
"""

from __future__ import annotations

import functools
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


MATCHES = ("em", "subem")


def _check_settings(match: str, score: float, format_score: float, structure_format_score: float,
                    final_format_score: float, retrieval_score: float) -> None:
  if match not in MATCHES:
    raise ValueError(f"match: expected 'em' or 'subem', got {match!r}")
  values = dict(score=score, format_score=format_score,
                structure_format_score=structure_format_score,
                final_format_score=final_format_score, retrieval_score=retrieval_score)
  for name, value in values.items():
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise TypeError(f"{name}: expected a number, got {value!r}")
  if format_score and (structure_format_score or final_format_score or retrieval_score):
    raise ValueError("format_score (qa_em) cannot be combined with structure_format_score / "
                     "final_format_score / retrieval_score (qa_em_format)")


def score_completion(completion: str, golden_answers: Sequence[str], *, match: str = "em",
                     score: float = 1.0, format_score: float = 0.0,
                     structure_format_score: float = 0.0, final_format_score: float = 0.0,
                     retrieval_score: float = 0.0) -> float:
  """Reward of one completion; see the module docstring for the table of values."""
  check = {"em": em_check, "subem": subem_check}.get(match)
  if check is None:
    raise ValueError(f"match: expected 'em' or 'subem', got {match!r}")
  answer = extract_answer(completion)
  correct = answer is not None and check(answer, golden_answers)
  if not (structure_format_score or final_format_score or retrieval_score):
    # Search-R1's qa_em: no format check at all.
    if correct:
      return float(score)
    return float(format_score) if answer is not None else 0.0
  well_formed = is_valid_sequence(completion)
  if correct:
    return float(score if well_formed else score - structure_format_score)
  if well_formed:
    bonus = retrieval_score if retrieval_contains_answer(completion, golden_answers) else 0.0
    return float(structure_format_score + bonus)
  return float(final_format_score) if answer is not None else 0.0


def search_r1(prompts: Sequence[str], completions: Sequence[str],
              examples: Sequence[Mapping[str, Any]], *, match: str = "em", score: float = 1.0,
              format_score: float = 0.0, structure_format_score: float = 0.0,
              final_format_score: float = 0.0, retrieval_score: float = 0.0) -> list[float]:
  """Search-R1's reward of each completion (module docstring); defaults: plain EM.

  Args:
    prompts: unused (the answer is judged on the completion alone; see the module docstring).
    completions: the responses.
    examples: ``examples[i]["answer"]``: gold answers (list of str, or one str).
    match: "em" (exact match) or "subem" (a gold answer is a substring of the answer).
    score: reward of a correct answer.
    format_score: qa_em's reward of a given but wrong answer.
    structure_format_score, final_format_score, retrieval_score: qa_em_format's credit.
  """
  del prompts
  settings = dict(match=match, score=score, format_score=format_score,
                  structure_format_score=structure_format_score,
                  final_format_score=final_format_score, retrieval_score=retrieval_score)
  _check_settings(**settings)
  if len(completions) != len(examples):
    raise ValueError(f"completions/examples: expected equal lengths, got {len(completions)} "
                     f"and {len(examples)}")
  return [score_completion(c, _gold_answers(ex, i), **settings)
          for i, (c, ex) in enumerate(zip(completions, examples))]


# Reward name -> the settings that reproduce a published Search-R1 run (module docstring).
PRESETS: dict[str, dict[str, Any]] = {
    "search_r1": {},
    "search_r1_format": dict(structure_format_score=0.2, final_format_score=0.1,
                             retrieval_score=0.0),
    "search_r1_subem": dict(match="subem"),
}


def make_search_r1_reward(match: str = "em", **settings: Any) -> RewardFn:
  """:func:`search_r1` with its settings bound (checked now, not at the first call)."""
  _check_settings(**{**dict(match=match, score=1.0, format_score=0.0, structure_format_score=0.0,
                            final_format_score=0.0, retrieval_score=0.0), **settings})
  reward = functools.partial(search_r1, match=match, **settings)
  reward.__name__ = f"search_r1_{match}"  # type: ignore[attr-defined]
  return reward


search_r1_em = make_search_r1_reward("em")
search_r1_subem = make_search_r1_reward(**PRESETS["search_r1_subem"])
search_r1_format = make_search_r1_reward(**PRESETS["search_r1_format"])
# The numbers noted in qa_em_format.py's comments (retrieval 0.1), which no script uses.
search_r1_em_format = make_search_r1_reward(
    "em", structure_format_score=0.2, final_format_score=0.1, retrieval_score=0.1)
