"""The Search-R1 text protocol: actions, observations and the prompt template, as pure strings.

Search-R1 (Jin et al., 2025, "Search-R1: Training LLMs to Reason and Leverage Search Engines with
Reinforcement Learning", github.com/PeterGriffinJin/Search-R1) lets the policy write
``<search> query </search>``; the trainer answers with ``<information> docs </information>`` and the
policy continues until ``<answer> ... </answer>``. This module holds the parts of that protocol users
rely on, re-derived from Search-R1's ``search_r1/llm_agent/generation.py`` and
``scripts/data_process/nq_search.py``:

* A turn's text ends at the first ``</search>`` or ``</answer>``; text after it is cut
  (:func:`cut_at_action`).
* The action of a turn is the first ``<search>...</search>`` or ``<answer>...</answer>`` block, its
  content stripped; a turn without one is *invalid* (:func:`parse_action`).
* An invalid turn gets the fixed corrective observation :data:`INVALID_ACTION_OBSERVATION`.
* Retrieved documents are shown as ``Doc i(Title: <first line>) <rest>`` one per line
  (:func:`format_documents`) inside ``\\n\\n<information>...</information>\\n\\n``
  (:func:`information_block`).
* After ``max_turns`` turns with search, one last turn runs without search: a search there is not
  executed (:func:`observation_for` with ``do_search=False``).

One deliberate difference: Search-R1 cuts at ``</search>`` whenever it occurs and only otherwise at
``</answer>``; we cut at whichever closes *first*. That is where a sampler with both stop strings
stops, so on what such a sampler produces the two agree; they differ only on text that runs on
past a first ``</answer>`` to a ``</search>``. Exactly these cases (rollout = cut, then parse):

* ``<search>a</answer> b</search>``: Search-R1 searches for ``a</answer> b``; here the turn is cut
  to ``<search>a</answer>``, which holds no complete block: an invalid turn.
* ``<search>q <answer>x</answer> more</search>``: Search-R1 searches for
  ``q <answer>x</answer> more``; here the turn is cut to ``<search>q <answer>x</answer>``, whose
  first complete block is the answer: the episode ends with answer ``x``.

So :func:`parse_action`'s rule "an answer nested in a search is part of the query" holds for text
parsed as it stands (Search-R1's view, and any text that has its ``</search>`` first); in a
rollout the cut comes first and a nested ``</answer>`` closes the turn as an answer.

Whether a turn that ends with EOS before any action ends the row (ours) or is an invalid action
(Search-R1) is a rollout option: ``SearchRolloutConfig.eos_without_action``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
INFO_OPEN, INFO_CLOSE = "<information>", "</information>"

# The stop strings a sampler should use for each turn of a search rollout.
STOP_STRINGS: tuple[str, ...] = (SEARCH_CLOSE, ANSWER_CLOSE)

# Search-R1's user prompt (nq_search.py, template_type="base"), including its typo ("as your want")
# because trained checkpoints expect the exact text.
SEARCH_R1_TEMPLATE = (
    "Answer the given question. "
    "You must conduct reasoning inside <think> and </think> first every time you get new "
    "information. "
    "After reasoning, if you find you lack some knowledge, you can call a search engine by "
    "<search> query </search> and it will return the top searched results between "
    "<information> and </information>. "
    "You can search as many times as your want. "
    "If you find no further external knowledge needed, you can directly provide the answer "
    "inside <answer> and </answer>, without detailed illustrations. "
    "For example, <answer> Beijing </answer>. Question: {question}\n")

# The observation Search-R1 appends after a turn with neither a search nor an answer block.
INVALID_ACTION_OBSERVATION = (
    "\nMy previous action is invalid. "
    "If I want to search, I should put the query between <search> and </search>. "
    "If I want to give the final answer, I should put the answer between <answer> and </answer>. "
    "Let me try again.\n")

# The first <search> or <answer> block; `\1` makes the closing tag match the opening one.
_ACTION_RE = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

ActionKind = Literal["search", "answer", "invalid"]


@dataclasses.dataclass(frozen=True)
class Action:
  """The action of one turn.

  Attributes:
    kind: "search", "answer" or "invalid" (no complete block).
    content: the stripped text inside the block ("" when invalid).
  """

  kind: ActionKind
  content: str = ""

  @property
  def is_valid(self) -> bool:
    return self.kind != "invalid"


def make_prompt(question: str) -> str:
  """Search-R1's prompt for one question (stripped; a missing final "?" is added, as nq_search.py)."""
  if not isinstance(question, str):
    raise TypeError(f"question: expected str, got {type(question).__name__}")
  question = question.strip()
  if not question:
    raise ValueError("question: expected a non-empty string")
  if not question.endswith("?"):
    question += "?"
  return SEARCH_R1_TEMPLATE.format(question=question)


def action_end(text: str) -> int | None:
  """Index just past the first ``</search>`` or ``</answer>`` in `text`, or None if neither occurs."""
  ends = [i + len(tag) for tag in STOP_STRINGS if (i := text.find(tag)) >= 0]
  return min(ends) if ends else None


def cut_at_action(text: str) -> str:
  """The turn's text up to and including the first closing action tag (all of it if none)."""
  end = action_end(text)
  return text if end is None else text[:end]


def parse_action(text: str) -> Action:
  """The first complete ``<search>``/``<answer>`` block of `text` (Search-R1's regex semantics).

  Nested tags are not balanced: ``<search> a <answer> b </answer> </search>`` is a search for
  ``a <answer> b </answer>``. A block must be closed by its own tag; ``<search> q </answer>`` is
  invalid. An empty block is still a valid action (Search-R1 sends the empty query).

  The nesting rule is about `text` as given. A rollout parses ``cut_at_action(text)``, which ends
  at the first closing tag: ``<search> a <answer> b </answer> </search>`` is cut to
  ``<search> a <answer> b </answer>``, an answer ``b`` (see the module docstring).
  """
  match = _ACTION_RE.search(text)
  if match is None:
    return Action("invalid", "")
  return Action(match.group(1), match.group(2).strip())


def extract_answer(text: str) -> str | None:
  """The stripped content of the *last* ``<answer>`` block of a completion, or None.

  Search-R1's ``extract_solution`` requires two or more blocks because its input starts with the
  prompt, whose example ``<answer> Beijing </answer>`` is the first; our completions exclude the
  prompt, so one block is enough.
  """
  matches = _ANSWER_RE.findall(text)
  return matches[-1].strip() if matches else None


def _document_contents(item: Any, index: int) -> str:
  """`contents` of one retrieval result, with or without the {"document", "score"} wrapper."""
  if isinstance(item, Mapping) and "document" in item:
    item = item["document"]
  if not isinstance(item, Mapping) or not isinstance(item.get("contents"), str):
    raise ValueError(
        f"results[{index}]: expected {{'document': {{'contents': str}}}} or {{'contents': str}}, "
        f"got {item!r:.200}")
  return item["contents"]


def format_documents(results: Sequence[Any]) -> str:
  """Retrieved documents as Search-R1 shows them: ``Doc i(Title: <first line>) <rest>\\n`` each.

  Args:
    results: one query's results, each ``{"document": {"contents": ...}, "score": ...}`` (as the
      server returns with ``return_scores``) or a bare ``{"contents": ...}`` document.
  """
  lines = []
  for i, item in enumerate(results):
    title, _, text = _document_contents(item, i).partition("\n")
    lines.append(f"Doc {i + 1}(Title: {title}) {text}\n")
  return "".join(lines)


def truncate_text(text: str, max_chars: int | None) -> str:
  """`text` cut to at most `max_chars` characters (None: unchanged)."""
  if max_chars is None:
    return text
  if max_chars < 0:
    raise ValueError(f"max_chars: expected >= 0 or None, got {max_chars}")
  return text[:max_chars]


def information_block(documents: str, max_doc_chars: int | None = None) -> str:
  """The observation after a search: ``\\n\\n<information>docs</information>\\n\\n``.

  Args:
    documents: formatted documents (:func:`format_documents`); surrounding whitespace is stripped,
      as Search-R1 does.
    max_doc_chars: optional character budget for the documents; the tags are always kept whole
      (unlike a token-level cut, which may cut the closing tag, as Search-R1's ``max_obs_length``).
  """
  return f"\n\n{INFO_OPEN}{truncate_text(documents.strip(), max_doc_chars)}{INFO_CLOSE}\n\n"


def observation_for(action: Action, documents: str | None, do_search: bool = True,
                    max_doc_chars: int | None = None) -> tuple[str, bool]:
  """The observation appended after a turn, and whether the rollout is done.

  Args:
    action: the parsed action of the turn.
    documents: formatted documents for a search action (ignored otherwise).
    do_search: False on the last turn: nothing is appended after it.
    max_doc_chars: see :func:`information_block`.

  Returns:
    (observation text, done). An answer ends the rollout with no observation; a search continues
    with the information block; an invalid action continues with
    :data:`INVALID_ACTION_OBSERVATION`. With ``do_search=False`` the observation is always "".
  """
  if action.kind == "answer":
    return "", True
  if not do_search:
    return "", False
  if action.kind == "search":
    if documents is None:
      raise ValueError("documents: a search action needs its formatted documents, got None")
    return information_block(documents, max_doc_chars), False
  return INVALID_ACTION_OBSERVATION, False
