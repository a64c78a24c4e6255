"""The tiny tokenizer: deterministic build, AutoTokenizer loading, round trips, cached location."""

import filecmp
import os
import threading

import pytest
import transformers

from grpo_jax.testing import tokenizer as tiny


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return tiny.build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
  return transformers.AutoTokenizer.from_pretrained(tok_dir)


def test_build_is_deterministic(tok_dir, tmp_path):
  other = tiny.build_tokenizer(tmp_path / "again")
  names = sorted(os.listdir(tok_dir))
  assert names == sorted(os.listdir(other)) and "tokenizer.json" in names
  match, mismatch, errors = filecmp.cmpfiles(tok_dir, other, names, shallow=False)
  assert not mismatch and not errors


def test_special_tokens_and_vocab(tok):
  assert len(tok) == len(tiny.vocabulary())
  assert tok.pad_token == "<pad>" and tok.eos_token == "</s>"
  assert tok.pad_token_id != tok.eos_token_id
  assert tok.convert_tokens_to_ids(tiny.vocabulary()) == list(range(len(tok)))


@pytest.mark.parametrize("text", [
    "repeat the last digit: 3 8 1",
    "<think>so 3 + 4 = 7</think><answer>7</answer>",
    "ann has 12 apples. then ann gives away 5.\n#### 7",
    "there theory them",  # words inside longer words fall back to characters
    "",
])
def test_ascii_round_trip(tok, text):
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert tok.decode(ids) == text


def test_whole_words_and_tags_are_single_tokens(tok):
  assert tok.tokenize("<answer>7</answer>") == ["<answer>", "7", "</answer>"]
  assert tok.tokenize("the last digit") == ["the", " ", "last", " ", "digit"]
  assert tok.tokenize("theme") == ["t", "h", "e", "m", "e"]
  assert tok.tokenize("é") == ["<unk>"]
  assert tok("7")["input_ids"] == tok("7", add_special_tokens=False)["input_ids"]  # no BOS/EOS


def test_chat_template(tok):
  text = tok.apply_chat_template([{"role": "system", "content": "be brief"},
                                  {"role": "user", "content": "copy 7"}],
                                 tokenize=False, add_generation_prompt=True)
  assert text == "<|system|>be brief<|end|><|user|>copy 7<|end|><|assistant|>"
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert tok.convert_ids_to_tokens(ids)[:1] == ["<|system|>"]
  assert tok.decode(ids, skip_special_tokens=True) == "be briefcopy 7"


def test_default_dir_builds_once_and_survives_concurrent_first_use(tmp_path):
  paths = []
  threads = [threading.Thread(target=lambda: paths.append(tiny.default_tokenizer_dir(tmp_path)))
             for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(set(paths)) == 1
  path = paths[0]
  assert os.path.dirname(path) == str(tmp_path)
  assert [p for p in os.listdir(tmp_path) if p.startswith(".tiny_tokenizer_")] == []
  stamp = os.stat(os.path.join(path, "tokenizer.json")).st_mtime_ns
  assert tiny.default_tokenizer_dir(tmp_path) == path
  assert os.stat(os.path.join(path, "tokenizer.json")).st_mtime_ns == stamp  # not rebuilt
  assert len(transformers.AutoTokenizer.from_pretrained(path)) == len(tiny.vocabulary())
