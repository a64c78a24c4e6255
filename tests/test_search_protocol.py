"""Search-R1 protocol strings: actions, cuts, observations, prompt; reward values."""

import re

import hypothesis
import hypothesis.strategies as st
import pytest

from grpo_jax.rewards import search_r1 as rw
from grpo_jax.rollout import search_protocol as sp


def searchr1_postprocess(text):
  """Search-R1's own cut and parse (generation.py), re-typed as the reference."""
  if "</search>" in text:
    text = text.split("</search>")[0] + "</search>"
  elif "</answer>" in text:
    text = text.split("</answer>")[0] + "</answer>"
  m = re.search(r"<(search|answer)>(.*?)</\1>", text, re.DOTALL)
  return (m.group(1), m.group(2).strip()) if m else (None, "")


@pytest.mark.parametrize("text, kind, content", [
    ("<think>x</think><search> capital of France </search>", "search", "capital of France"),
    ("<answer>Paris</answer>", "answer", "Paris"),
    ("<answer>\n  Zürich 🇨🇭 \n</answer>", "answer", "Zürich 🇨🇭"),
    ("<search></search>", "search", ""),                        # empty query is still a search
    ("<search> a <answer> b </answer> </search>", "search", "a <answer> b </answer>"),  # nested
    ("<answer> a <search> b </search></answer>", "answer", "a <search> b </search>"),
    ("<search> q </answer>", "invalid", ""),                    # mismatched closing tag
    ("<search> q", "invalid", ""),                              # unclosed
    ("q </search>", "invalid", ""),                             # unopened
    ("<Search> q </Search>", "invalid", ""),                    # tags are case-sensitive
    ("no tags at all", "invalid", ""),
    ("", "invalid", ""),
    ("<answer>1</answer><search>2</search>", "answer", "1"),    # the first block wins
])
def test_parse_action(text, kind, content):
  assert sp.parse_action(text) == sp.Action(kind, content)


def test_cut_at_action_cuts_after_first_closing_tag():
  assert sp.cut_at_action("a<search>q</search> tail</answer>") == "a<search>q</search>"
  assert sp.cut_at_action("<answer>x</answer> then <search>q</search>") == "<answer>x</answer>"
  assert sp.cut_at_action("no tags") == "no tags"
  assert sp.action_end("no tags") is None


_pieces = st.sampled_from(["<search>", "</search>", "<answer>", "</answer>", "<think>", " ",
                           "q", "é", "\n", "<", ">", "/"])


@hypothesis.settings(max_examples=30)
@hypothesis.given(st.lists(_pieces, max_size=14).map("".join))
def test_action_matches_search_r1(text):
  # On what a sampler with both stop strings emits (text up to the first closing tag), our action
  # is Search-R1's.
  cut = sp.cut_at_action(text)
  action = sp.parse_action(cut)
  kind, content = searchr1_postprocess(cut)
  assert (action.kind if action.is_valid else None, action.content) == (kind, content)
  assert text.startswith(cut)
  assert cut == text or cut.endswith(("</search>", "</answer>"))
  assert sp.action_end(cut[:-1]) is None  # nothing closes earlier


def test_documented_difference_from_search_r1():
  text = "<search>a</answer> b</search>"
  assert searchr1_postprocess(text) == ("search", "a</answer> b")
  assert sp.parse_action(sp.cut_at_action(text)) == sp.Action("invalid", "")


def test_format_documents_and_information_block():
  hits = [{"document": {"id": "1", "contents": "Paris\nParis is in France.\nSecond line."},
           "score": 2.0},
          {"contents": "No body"}]
  docs = sp.format_documents(hits)
  assert docs == ("Doc 1(Title: Paris) Paris is in France.\nSecond line.\n"
                  "Doc 2(Title: No body) \n")
  assert sp.information_block(docs) == f"\n\n<information>{docs.strip()}</information>\n\n"
  assert sp.information_block("abcdef", max_doc_chars=3) == "\n\n<information>abc</information>\n\n"
  with pytest.raises(ValueError, match=r"results\[0\]"):
    sp.format_documents([{"document": {"id": 1}}])


def test_observation_for():
  assert sp.observation_for(sp.Action("answer", "x"), None) == ("", True)
  assert sp.observation_for(sp.Action("invalid"), None) == (sp.INVALID_ACTION_OBSERVATION, False)
  assert sp.observation_for(sp.Action("search", "q"), "D") == (
      "\n\n<information>D</information>\n\n", False)
  assert sp.observation_for(sp.Action("search", "q"), None, do_search=False) == ("", False)
  assert sp.INVALID_ACTION_OBSERVATION.startswith("\nMy previous action is invalid.")


def test_make_prompt():
  p = sp.make_prompt("  who wrote Hamlet ")
  assert p.endswith("Question: who wrote Hamlet?\n")
  assert p.startswith("Answer the given question. You must conduct reasoning inside <think>")
  assert sp.make_prompt("Why?").endswith("Question: Why?\n")
  with pytest.raises(ValueError, match="question"):
    sp.make_prompt("  ")


def test_extract_answer_takes_last_block():
  assert sp.extract_answer("<answer> a </answer> x <answer> b </answer>") == "b"
  assert sp.extract_answer("<answer> a") is None


# ---------------------------------------------------------------------------------------- reward

GOOD = ("<think> t </think> <search> q </search>\n\n<information>Doc 1(Title: P) Paris city"
        "</information>\n\n<think> t2 </think><answer> The Paris! </answer>")


def test_em_and_subem():
  ex = [{"answer": ["Paris", "City of Light"]}]
  assert rw.search_r1_em([""], ["<answer> the  paris. </answer>"], ex) == [1.0]
  assert rw.search_r1_em([""], ["<answer> Paris, France </answer>"], ex) == [0.0]
  assert rw.search_r1_subem([""], ["<answer> Paris, France </answer>"], ex) == [1.0]
  assert rw.search_r1_em([""], ["Paris"], ex) == [0.0]  # no answer block
  assert rw.search_r1_em([""], ["<answer>x</answer><answer>Paris</answer>"], ex) == [1.0]
  assert rw.search_r1_em([""], ["<answer>Zürich</answer>"], [{"answer": "zürich"}]) == [1.0]


def test_format_credit_table():
  f = rw.search_r1_em_format
  gold = [{"answer": ["Paris"]}]
  bad = lambda s: s.replace("<think> t </think> ", "")  # noqa: E731
  assert rw.is_valid_sequence(GOOD) and not rw.is_valid_sequence(bad(GOOD))
  assert f([""], [GOOD], gold) == [1.0]
  assert f([""], [bad(GOOD)], gold) == [pytest.approx(0.8)]
  wrong = GOOD.replace("The Paris!", "Lyon")
  assert f([""], [wrong], gold) == [pytest.approx(0.3)]           # gold answer was retrieved
  assert f([""], [wrong.replace("Paris city", "x")], gold) == [pytest.approx(0.2)]
  assert f([""], [bad(wrong)], gold) == [pytest.approx(0.1)]
  assert f([""], ["nothing"], gold) == [0.0]
  assert rw.search_r1_em([""], [bad(GOOD)], gold) == [1.0]       # plain EM ignores format


@pytest.mark.parametrize("text", [
    "<think>a</think><answer>b</answer>",
    "<think>a</think> <search>q</search> <information>d</information> <think>b</think>"
    "<answer>c</answer>\n",
])
def test_valid_sequences(text):
  assert rw.is_valid_sequence(text)


@pytest.mark.parametrize("text", [
    "<answer>b</answer>",                                       # no think first
    "<think>a</think>stray<answer>b</answer>",                  # text between blocks
    "<think>a</think><answer>b</answer> trailing",
    "<think>a</think><search>q</search><think>b</think><answer>c</answer>",  # no information
    "<think>a<think>b</think></think><answer>c</answer>",       # nested think
    "<think>a</think><answer>b",                                # unbalanced
])
def test_invalid_sequences(text):
  assert not rw.is_valid_sequence(text)


def test_reward_errors():
  with pytest.raises(ValueError, match="equal lengths"):
    rw.search_r1_em(["", ""], ["a", "b"], [{"answer": ["a"]}])
  with pytest.raises(ValueError, match=r"examples\[0\]"):
    rw.search_r1_em([""], ["a"], [{"gold": ["a"]}])
  with pytest.raises(ValueError, match="match"):
    rw.make_search_r1_reward("f1")
