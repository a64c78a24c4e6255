"""Rewards against hand-written cases and an independent SQuAD normaliser; the error paths."""

import dataclasses
import math
import os
import re
import string
import sys
import textwrap

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from grpo_jax import rewards as rw


def squad_normalize(s):
  """Re-typed from SQuAD v1.1's evaluate script (the reference Search-R1 copies)."""
  def remove_articles(text):
    return re.sub(r"\b(a|an|the)\b", " ", text)

  def white_space_fix(text):
    return " ".join(text.split())

  def remove_punc(text):
    exclude = set(string.punctuation)
    return "".join(ch for ch in text if ch not in exclude)

  return white_space_fix(remove_articles(remove_punc(s.lower())))


@pytest.mark.parametrize("text, expected", [
    ("The  Nile!", "nile"),
    ("  An apple, a day. ", "apple day"),
    ("Zürich", "zürich"),
    ("CAFÉ\tcrème", "café crème"),
    ("", ""),
    ("the", ""),
    ("theory of the a-team", "theory of ateam"),
    ("Guido van Rossum", "guido van rossum"),
])
def test_normalize_answer_cases(text, expected):
  assert rw.normalize_answer(text) == expected


@hypothesis.given(st.text(alphabet=st.sampled_from(list("aAnNtThHeE .,!-'\t\nüé0")), max_size=30))
def test_normalize_answer_matches_squad(text):
  assert rw.normalize_answer(text) == squad_normalize(text)


def _ex(*golds):
  return {"answer": list(golds)}


def test_exact_match_cases():
  completions = ["<think>hmm</think><answer>The Nile</answer>", "Nile river", "<answer>Zürich!</answer>",
                 "<answer>paris</answer><answer>Berlin</answer>", "", "<answer></answer>", "8"]
  examples = [_ex("Nile", "Nile River"), _ex("Nile", "Nile River"), _ex("zürich"),
              _ex("berlin"), _ex("Paris"), _ex(""), {"answer": "eight"}]
  got = rw.exact_match([""] * 7, completions, examples)
  assert got == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]  # last block counts; empty == empty
  # require_tag: no <answer> block, no credit (Search-R1).
  assert rw.exact_match([""], ["Nile"], [_ex("Nile")], require_tag=True) == [0.0]
  assert rw.exact_match([""], ["Nile"], [{"answer": "Nile"}]) == [1.0]
  assert rw.exact_match([""], [b"x".decode()], [{"answer": np.array([b"x"])}]) == [1.0]


def test_substring_match_cases():
  completions = ["<answer>it is the Nile river</answer>", "<answer>Tokyo</answer>", "anything",
                 "Zürich, of course"]
  examples = [_ex("nile"), _ex("Kyoto"), _ex(""), _ex("Vienna", "zürich")]
  assert rw.substring_match([""] * 4, completions, examples) == [1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("completion, gold, expected", [
    ("so the answer is 42", "#### 42", 1.0),
    ("#### 42", "Natalia sold 48/2 = 24 clips.\n48+24 = 72\n#### 72", 0.0),
    ("48 + 24 = 72\n#### 72", "Natalia sold 48/2 = 24 clips.\n48+24 = 72\n#### 72", 1.0),
    ("the total is \\boxed{1,234} dollars, not 5", "1234", 1.0),
    ("\\boxed{$18}", "#### 18", 1.0),
    ("3.50", "3.5", 1.0),
    ("-7 degrees", "#### -7", 1.0),
    ("1 2 3", "#### 2", 0.0),  # the last number, 3
    ("no number here", "#### 0", 0.0),
    ("", "#### 5", 0.0),
    ("5", "", 0.0),  # a gold without a number never matches
])
def test_numeric_cases(completion, gold, expected):
  assert rw.numeric([""], [completion], [{"answer": gold}]) == [expected]


def test_numeric_multiple_golds_and_modes():
  assert rw.numeric([""], ["8"], [_ex("#### 7", "eight is 8")]) == [1.0]
  assert rw.extract_number("#### 1,000.5 then 3") == 1000.5
  assert rw.extract_number("\\boxed{2} and 9", mode="last") == 9.0
  assert rw.extract_number("\\boxed{2} and 9", mode="boxed") == 2.0
  assert rw.extract_number("none", mode="hashes") is None
  with pytest.raises(ValueError, match="mode"):
    rw.extract_number("1", mode="first")


def test_format_reward_cases():
  completions = ["<think>a</think><answer>b</answer>", "<answer>b</answer><think>a</think>",
                 "<think>a</think>", "<think>a<answer>b</answer>", "", "x #### 3"]
  got = rw.format_reward([""] * 6, completions, [{}] * 6)
  assert got == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
  got = rw.format_reward([""] * 6, completions, [{}] * 6, partial=True)
  assert got == [1.0, 0.5, 0.5, 0.5, 0.0, 0.0]
  assert rw.format_reward([""] * 6, completions, [{}] * 6, tags=("####",)) == [0, 0, 0, 0, 0, 1]


def test_digits_reward_table():
  # right first character (0.5) + stopped after one character (0.5), independently.
  completions = ["7", " 7 ", "7x", "a7 3", "3", "x", "x3 7", "", "no", "77"]
  got = rw.digits_reward([""] * 10, completions, [{"answer": "7"}] * 10)
  assert got == [1.0, 1.0, 0.5, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.5]


USER_MODULE = """
import dataclasses
import math
import os
def score(prompts, completions, examples, bonus=0.0):
  return [len(c) + bonus for c in completions]
def wrong_length(prompts, completions, examples):
  return [1.0] * (len(completions) + 1)
def nan_on_b(prompts, completions, examples):
  return [math.nan if c == "b" else 0.0 for c in completions]
def inf_out(prompts, completions, examples):
  return [math.inf for c in completions]
def text_out(prompts, completions, examples):
  return ["1.0" for c in completions]
def raises_on_b(prompts, completions, examples):
  for c in completions:
    if c == "b":
      raise KeyError("gold missing")
  return [0.0] * len(completions)
not_callable = 3
"""


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
  root = tmp_path_factory.mktemp("user_rewards")
  (root / "my_rewards_mod.py").write_text(textwrap.dedent(USER_MODULE))
  sys.path.insert(0, str(root))
  yield "my_rewards_mod"
  sys.path.remove(str(root))


def test_make_reward_fn_weighted_sum_and_components(user_module):
  fn = rw.make_reward_fn([("digits", 1.0, {}), (f"{user_module}:score", 0.5, {"bonus": 1.0}),
                          ("format", 0.25, {"tags": ("answer",)}), ("digits", 2.0)])
  completions = ["7", "<answer>3</answer>", "zz"]
  examples = [{"answer": "7"}, {"answer": ["3"]}, {"answer": "1"}]
  out = fn(["p"] * 3, completions, examples)
  digits = np.array([1.0, 0.0, 0.0], np.float32)  # "<answer>3..." starts with "<", not "3"
  score = np.array([2.0, 19.0, 3.0], np.float32)
  fmt = np.array([0.0, 1.0, 0.0], np.float32)
  assert list(out.components) == ["digits", f"{user_module}:score", "format", "digits#2"]
  np.testing.assert_array_equal(out.components["digits"], digits)
  np.testing.assert_array_equal(out.components[f"{user_module}:score"], score)
  np.testing.assert_array_equal(out.components["format"], fmt)
  np.testing.assert_allclose(out.total, digits + 0.5 * score + 0.25 * fmt + 2 * digits)
  assert out.total.dtype == np.float32 and out.total.shape == (3,)


def test_search_r1_reward_by_name():
  fn = rw.make_reward_fn([("search_r1", 1.0)])
  out = fn(["q"], ["<answer>The Nile</answer>"], [{"answer": ["Nile"]}])
  assert out.total.tolist() == [1.0]


@pytest.mark.parametrize("name, pattern", [
    ("wrong_length", r"'my_rewards_mod:wrong_length' returned 3 values for 2 completions; sample 0"),
    ("nan_on_b", r"'my_rewards_mod:nan_on_b' returned nan; sample 1: prompt='q1', completion='b'"),
    ("inf_out", r"returned inf; sample 0: prompt='q0', completion='a'"),
    ("text_out", r"non-numeric value '1.0' \(str\); sample 0"),
    ("raises_on_b", r"'my_rewards_mod:raises_on_b' raised KeyError: 'gold missing'; first failing "
                    r"sample 1: prompt='q1', completion='b', example=\{'answer': 'B'\}"),
])
def test_reward_errors_name_function_and_sample(user_module, name, pattern):
  fn = rw.make_reward_fn([(f"{user_module}:{name}", 1.0)])
  with pytest.raises(rw.RewardError, match=pattern):
    fn(["q0", "q1"], ["a", "b"], [{"answer": "A"}, {"answer": "B"}])


@pytest.mark.parametrize("spec, error, pattern", [
    (("no_such_reward", 1.0), ValueError, "unknown name"),
    (("no_such_pkg_xyz.mod:fn", 1.0), ImportError, "cannot import module 'no_such_pkg_xyz.mod'"),
    (("my_rewards_mod:missing", 1.0), AttributeError, "has no attribute 'missing'"),
    (("my_rewards_mod:not_callable", 1.0), TypeError, "not callable"),
    (("digits", "1"), ValueError, "weight must be a finite number"),
    (("digits", math.nan), ValueError, "weight must be a finite number"),
    (("digits",), ValueError, r"rewards\[0\]: expected \(name, weight"),
])
def test_make_reward_fn_bad_specs(user_module, spec, error, pattern):
  with pytest.raises(error, match=pattern):
    rw.make_reward_fn([spec])


def test_mismatched_batch_lengths():
  fn = rw.make_reward_fn([("exact_match", 1.0)])
  with pytest.raises(ValueError, match="one entry per completion"):
    fn(["p"], ["a", "b"], [{"answer": "a"}])


# ---------------------------------------------------------------------------------------------
# Reward kwargs are checked against the signature before any work; Search-R1's presets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, pattern", [
    (("search_r1", 1.0, {"structure_format_scor": 0.2}),
     r"^rewards\[0\] \('search_r1'\): unexpected kwarg 'structure_format_scor' \(accepted: match, "),
    (("exact_match", 1.0, {"answer_tag": "a", "tag": "b"}),
     r"^rewards\[0\] \('exact_match'\): unexpected kwarg 'tag' \(accepted: answer_tag, require_tag"),
    (("my_rewards_mod:wrong_length", 1.0, {"bonus": 1.0}),
     r"unexpected kwarg 'bonus' \(accepted: none\)"),
    (("search_r1", 1.0, {"match": "f1"}), r"^rewards\[0\] \('search_r1'\): match: expected 'em'"),
    (("search_r1", 1.0, {"score": "1"}), r"score: expected a number"),
    (("search_r1", 1.0, {"format_score": 0.1, "retrieval_score": 0.1}),
     r"format_score \(qa_em\) cannot be combined"),
])
def test_reward_kwargs_are_checked_before_any_call(user_module, spec, pattern):
  with pytest.raises((TypeError, ValueError), match=pattern):
    rw.make_reward_fn([spec])


def test_bad_reward_kwarg_fails_preflight_in_one_line(tmp_path):
  """The config path: the run stops before anything compiles, naming config.rewards."""
  from grpo_jax import train
  from grpo_jax.config import ConfigError, load_config, resolve
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = resolve(load_config(f"{root}/configs/default.py:smoke"))
  cfg = dataclasses.replace(cfg, rewards=(("search_r1", 1.0, {"structure_format_scor": 0.2}),))
  with pytest.raises(ConfigError) as e:
    train.preflight(cfg, str(tmp_path))
  msg = str(e.value)
  assert msg.startswith("config.rewards: ") and "'structure_format_scor'" in msg
  assert "\n" not in msg


def test_user_function_kwargs_still_bind(user_module):
  fn = rw.make_reward_fn([(f"{user_module}:score", 1.0, {"bonus": 2.0})])
  assert fn(["p"], ["ab"], [{"answer": "x"}]).total.tolist() == [4.0]


# Hand-computed Search-R1 cases. GOOD is a well-formed trajectory whose answer is "Paris" and whose
# <information> holds the gold answer; each variant changes one thing.
_GOOD = ("<think> t </think> <search> q </search>\n\n<information>Doc 1(Title: P) Paris city"
         "</information>\n\n<think> t2 </think><answer> The Paris! </answer>")
_CASES = {  # name -> completion (gold answer: "Paris")
    "correct_well_formed": _GOOD,
    "correct_malformed": _GOOD.replace("<think> t </think> ", ""),      # no think first
    "wrong_well_formed_retrieved": _GOOD.replace("The Paris!", "Lyon"),
    "wrong_well_formed": _GOOD.replace("The Paris!", "Lyon").replace("Paris city", "a city"),
    "wrong_malformed": "<answer> Lyon </answer>",
    "none_well_formed_prefix": "<think> t </think> <search> q </search>",  # no answer: malformed
    "none_malformed": "Paris",
    "substring": "<think> t </think><answer> Paris, France </answer>",  # well formed, not EM
}


@pytest.mark.parametrize("name, kwargs, expected", [
    # Search-R1 main_ppo (qa_em, format_score=0): root train_*.sh, v0.1, v0.2, v0.3 validation.
    ("search_r1", {}, dict(correct_well_formed=1.0, correct_malformed=1.0,
                           wrong_well_formed_retrieved=0.0, wrong_well_formed=0.0,
                           wrong_malformed=0.0, none_well_formed_prefix=0.0, none_malformed=0.0,
                           substring=0.0)),
    # Search-R1 v0.3 train_*_format.sh: main_ppo_format with 0.2 / 0.1 / 0.
    ("search_r1_format", {}, dict(correct_well_formed=1.0, correct_malformed=0.8,
                                  wrong_well_formed_retrieved=0.2, wrong_well_formed=0.2,
                                  wrong_malformed=0.1, none_well_formed_prefix=0.0,
                                  none_malformed=0.0, substring=0.2)),
    # The same function through kwargs, with qa_em_format's commented retrieval score of 0.1.
    ("search_r1", {"structure_format_score": 0.2, "final_format_score": 0.1,
                   "retrieval_score": 0.1},
     dict(correct_well_formed=1.0, correct_malformed=0.8, wrong_well_formed_retrieved=0.3,
          wrong_well_formed=0.2, wrong_malformed=0.1, none_well_formed_prefix=0.0,
          none_malformed=0.0, substring=0.2)),
    # qa_em with a format score: a given but wrong answer earns it, no answer earns nothing.
    ("search_r1", {"format_score": 0.1}, dict(correct_well_formed=1.0, correct_malformed=1.0,
                                              wrong_well_formed_retrieved=0.1,
                                              wrong_well_formed=0.1, wrong_malformed=0.1,
                                              none_well_formed_prefix=0.0, none_malformed=0.0,
                                              substring=0.1)),
    # qa_em compute_score_subem.
    ("search_r1_subem", {}, dict(correct_well_formed=1.0, correct_malformed=1.0,
                                 wrong_well_formed_retrieved=0.0, wrong_well_formed=0.0,
                                 wrong_malformed=0.0, none_well_formed_prefix=0.0,
                                 none_malformed=0.0, substring=1.0)),
])
def test_search_r1_presets_hand_computed(name, kwargs, expected):
  fn = rw.make_reward_fn([(name, 1.0, kwargs)])
  names = list(_CASES)
  out = fn([""] * len(names), [_CASES[n] for n in names], [{"answer": ["Paris"]}] * len(names))
  got = dict(zip(names, out.components[name].tolist()))
  assert got == pytest.approx(expected), got


def test_search_r1_presets_are_the_published_settings():
  from grpo_jax.rewards import search_r1
  assert search_r1.PRESETS == {
      "search_r1": {},
      "search_r1_format": {"structure_format_score": 0.2, "final_format_score": 0.1,
                           "retrieval_score": 0.0},
      "search_r1_subem": {"match": "subem"},
  }
  for name in search_r1.PRESETS:
    assert name in rw.REGISTRY
