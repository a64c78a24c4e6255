"""Rule-based verifiable rewards: exact / substring match, numeric answers, format tags.

Every reward has the project's batch signature
``fn(prompts, completions, examples, **kwargs) -> list[float]`` where ``examples[i]["answer"]`` holds
the gold answer(s): a str or a list of str (several gold answers: any one counts).

Which part of a completion is "the answer": the content of its last ``<answer>...</answer>`` block when
there is one, else the whole completion (``answer_tag=None`` always uses the whole completion;
``require_tag=True`` scores completions without the block 0, as Search-R1 does).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
  """SQuAD / Search-R1 normalisation: lower-case, drop punctuation and articles, fold whitespace.

  The same steps in the same order as SQuAD v1.1's evaluation script (and Search-R1's
  ``qa_em.normalize_answer``): lower → remove ASCII punctuation → remove a/an/the → collapse
  whitespace. Non-ASCII letters are kept (``"Zürich!"`` → ``"zürich"``).
  """
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES_RE.sub(" ", text).split())


def gold_answers(example: Mapping[str, Any], index: int = 0) -> list[str]:
  """The gold answers of `example` as a list of str (a single str, list, tuple or NumPy array)."""
  if not isinstance(example, Mapping) or "answer" not in example:
    raise ValueError(f"examples[{index}]: expected a mapping with an 'answer' field, got "
                     f"{type(example).__name__}")
  gold = example["answer"]
  if isinstance(gold, bytes):
    gold = gold.decode("utf-8")
  if isinstance(gold, str):
    return [gold]
  gold = [g.decode("utf-8") if isinstance(g, bytes) else g for g in gold]
  if not all(isinstance(g, str) for g in gold):
    raise TypeError(f"examples[{index}]['answer']: expected a str or a list of str, got {gold!r}")
  return gold


def extract_tag(text: str, tag: str = "answer") -> str | None:
  """Content of the last ``<tag>...</tag>`` block of `text`, or None when there is none."""
  blocks = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
  return blocks[-1] if blocks else None


def _prediction(completion: str, answer_tag: str | None, require_tag: bool) -> str | None:
  if answer_tag is None:
    return completion
  inside = extract_tag(completion, answer_tag)
  if inside is None and not require_tag:
    return completion
  return inside


def exact_match(prompts: Sequence[str], completions: Sequence[str],
                examples: Sequence[Mapping[str, Any]], *, answer_tag: str | None = "answer",
                require_tag: bool = False) -> list[float]:
  """1.0 when the normalised answer equals any normalised gold answer, else 0.0."""
  del prompts
  out = []
  for i, (c, ex) in enumerate(zip(completions, examples)):
    pred = _prediction(c, answer_tag, require_tag)
    golds = gold_answers(ex, i)
    ok = pred is not None and any(normalize_answer(g) == normalize_answer(pred) for g in golds)
    out.append(float(ok))
  return out


def substring_match(prompts: Sequence[str], completions: Sequence[str],
                    examples: Sequence[Mapping[str, Any]], *, answer_tag: str | None = "answer",
                    require_tag: bool = False) -> list[float]:
  """1.0 when any non-empty normalised gold answer occurs in the normalised answer, else 0.0.

  (An empty gold answer would be a substring of everything; it never matches.)
  """
  del prompts
  out = []
  for i, (c, ex) in enumerate(zip(completions, examples)):
    pred = _prediction(c, answer_tag, require_tag)
    golds = [normalize_answer(g) for g in gold_answers(ex, i)]
    ok = pred is not None and any(g and g in normalize_answer(pred) for g in golds)
    out.append(float(ok))
  return out


# A number: optional sign, digits with optional thousands commas, optional decimals; or ".5".
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_HASHES_RE = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")
_BOXED_RE = re.compile(r"\\boxed\{\s*\$?\s*(" + _NUMBER + r")\s*(?:\\%|%)?\s*\}")


def parse_number(text: str) -> float | None:
  """The float value of a number string such as ``"1,234"``, ``"-3.50"``, ``".5"``; else None."""
  try:
    value = float(text.replace(",", ""))
  except ValueError:
    return None
  return value if math.isfinite(value) else None


def extract_number(text: str, *, mode: str = "auto") -> float | None:
  """The numeric answer of `text`, GSM8K style.

  Args:
    text: a completion or a gold answer.
    mode: "auto" tries, in order, the number after the last ``####``, the last ``\\boxed{..}``, and
      the last number in the text; "hashes", "boxed" or "last" use only that rule.

  Returns:
    The number, or None when the rule finds none.
  """
  rules = {"hashes": _HASHES_RE, "boxed": _BOXED_RE, "last": _NUMBER_RE}
  if mode not in (*rules, "auto"):
    raise ValueError(f"mode: expected auto | hashes | boxed | last, got {mode!r}")
  for name in (("hashes", "boxed", "last") if mode == "auto" else (mode,)):
    found = rules[name].findall(text)
    if found:
      return parse_number(found[-1])
  return None


def numeric(prompts: Sequence[str], completions: Sequence[str],
            examples: Sequence[Mapping[str, Any]], *, mode: str = "auto",
            rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> list[float]:
  """1.0 when the completion's number equals a gold answer's number (``#### 42`` gold), else 0.0.

  The gold's number is taken with the same rules ("auto": after ``####``, then ``\\boxed{}``, then the
  last number), so GSM8K's full solution text works as gold. Numbers compare with `math.isclose`.
  """
  del prompts
  out = []
  for i, (c, ex) in enumerate(zip(completions, examples)):
    pred = extract_number(c, mode=mode)
    golds = [extract_number(g, mode="auto") for g in gold_answers(ex, i)]
    ok = pred is not None and any(
        g is not None and math.isclose(pred, g, rel_tol=rel_tol, abs_tol=abs_tol) for g in golds)
    out.append(float(ok))
  return out


def _tag_ok(completion: str, tag: str) -> bool:
  m = re.fullmatch(r"<(\w+)>", tag)
  if m is None:  # A marker such as "####": it must appear.
    return tag in completion
  name = m.group(1)
  opens = [x.start() for x in re.finditer(f"<{name}>", completion)]
  closes = [x.start() for x in re.finditer(f"</{name}>", completion)]
  return bool(opens) and len(opens) == len(closes) and all(o < c for o, c in zip(opens, closes))


def format_reward(prompts: Sequence[str], completions: Sequence[str],
                  examples: Sequence[Mapping[str, Any]], *,
                  tags: Sequence[str] = ("think", "answer"), partial: bool = False,
                  ordered: bool = True) -> list[float]:
  """Format credit for tags: 1.0 when every tag is well formed, else 0.0 (or the fraction).

  Args:
    tags: "think" or "<think>" asks for balanced ``<think>...</think>`` blocks (at least one, each
      opened before it is closed); a tag that is not a ``<name>`` (e.g. "####") must just appear.
    partial: score the fraction of well-formed tags instead of all-or-nothing.
    ordered: with all tags well formed, also require their first occurrences in the given order
      (``<think>`` before ``<answer>``); an out-of-order completion scores 0 (or, with `partial`,
      loses credit for the out-of-order tags).
  """
  del prompts, examples
  tags = [t if (t.startswith("<") or not t.isidentifier()) else f"<{t}>" for t in tags]
  if not tags:
    raise ValueError("tags: expected at least one tag")
  out = []
  for c in completions:
    ok = [_tag_ok(c, t) for t in tags]
    if ordered:
      last = -1
      for j, t in enumerate(tags):
        if ok[j]:
          pos = c.find(t)
          if pos < last:
            ok[j] = False
          last = max(last, pos)
    out.append(sum(ok) / len(ok) if partial else float(all(ok)))
  return out
