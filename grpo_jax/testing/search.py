"""Tiny search fixtures built in code: a corpus, NQ-format Parquet, tokenizers, a scripted generator.

Used by the search tests and by the tiny end-to-end Search-R1 config, which must run on CPU without
downloads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from grpo_jax.rollout import search_protocol as sp
from grpo_jax.rollout.search_rollout import TurnOutput, TurnRequest

# Search-R1 corpus rows: the first line of "contents" is the title.
TINY_CORPUS: tuple[dict[str, str], ...] = (
    {"id": "0", "contents": "Paris\nParis is the capital and largest city of France."},
    {"id": "1", "contents": "Berlin\nBerlin is the capital of Germany, on the river Spree."},
    {"id": "2", "contents": "Tokyo\nTokyo is the capital of Japan and its most populous city."},
    {"id": "3", "contents": "Canberra\nCanberra is the capital city of Australia."},
    {"id": "4", "contents": "Ottawa\nOttawa is the capital city of Canada, in Ontario."},
    {"id": "5", "contents": "Mount Everest\nMount Everest is Earth's highest mountain above sea level."},
    {"id": "6", "contents": "Nile\nThe Nile is a major north-flowing river in Africa."},
    {"id": "7", "contents": "Marie Curie\nMarie Curie discovered polonium and radium."},
    {"id": "8", "contents": "Python\nPython is a programming language created by Guido van Rossum."},
    {"id": "9", "contents": "Zürich\nZürich is the largest city in Switzerland; café culture thrives."},
)

# (question, gold answers) pairs answerable from TINY_CORPUS.
TINY_QA: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France", ("Paris",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital city of Australia?", ("Canberra",)),
    ("Which river flows north through Africa?", ("Nile", "the Nile", "Nile River")),
    ("Who created the Python programming language?", ("Guido van Rossum",)),
    ("What is the highest mountain on Earth?", ("Mount Everest", "Everest")),
    ("Who discovered polonium?", ("Marie Curie",)),
)


def write_corpus_jsonl(path: str | os.PathLike[str],
                       docs: Sequence[Mapping[str, Any]] = TINY_CORPUS) -> str:
  """Writes `docs` as a JSONL corpus and returns the path."""
  path = os.fspath(path)
  with open(path, "w", encoding="utf-8") as f:
    for doc in docs:
      f.write(json.dumps(dict(doc), ensure_ascii=False) + "\n")
  return path


def write_nq_parquet(path: str | os.PathLike[str],
                     qa: Sequence[tuple[str, Sequence[str]]] = TINY_QA, *,
                     style: str = "flashrag", data_source: str = "nq", split: str = "train") -> str:
  """Writes QA pairs as NQ/HotpotQA-format Parquet and returns the path.

  Args:
    qa: (question, gold answers) pairs.
    style: "flashrag" for the raw columns Search-R1 downloads (``id``, ``question``,
      ``golden_answers``), or "search_r1" for the columns its ``nq_search.py`` writes
      (``data_source``, ``prompt`` = [{"role": "user", "content": template}], ``ability``,
      ``reward_model`` = {"style": "rule", "ground_truth": {"target": answers}}, ``extra_info``).
  """
  import pyarrow as pa
  import pyarrow.parquet as pq

  path = os.fspath(path)
  if style == "flashrag":
    table = pa.table({
        "id": [f"{split}_{i}" for i in range(len(qa))],
        "question": [q for q, _ in qa],
        "golden_answers": [list(a) for _, a in qa],
    })
  elif style == "search_r1":
    table = pa.table({
        "data_source": [data_source] * len(qa),
        "prompt": [[{"role": "user", "content": sp.make_prompt(q)}] for q, _ in qa],
        "ability": ["fact-reasoning"] * len(qa),
        "reward_model": [{"style": "rule", "ground_truth": {"target": list(a)}} for _, a in qa],
        "extra_info": [{"split": split, "index": i} for i in range(len(qa))],
    })
  else:
    raise ValueError(f"style: expected 'flashrag' or 'search_r1', got {style!r}")
  pq.write_table(table, path)
  return path


class ByteTokenizer:
  """UTF-8 bytes as token ids 0..255, plus pad (256) and EOS (257). Lossless on any text."""

  pad_token_id = 256
  eos_token_id = 257
  vocab_size = 258

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    ids = list(text.encode("utf-8"))
    return ids + [self.eos_token_id] if add_special_tokens else ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    out, buf = [], bytearray()
    for t in ids:
      t = int(t)
      if t < 256:
        buf.append(t)
        continue
      out.append(buf.decode("utf-8", "replace"))
      buf = bytearray()
      if not skip_special_tokens:
        out.append("<pad>" if t == self.pad_token_id else "<eos>")
    out.append(buf.decode("utf-8", "replace"))
    return "".join(out)


def tiny_bpe_tokenizer(vocab_size: int = 400):
  """A byte-level BPE ``PreTrainedTokenizerFast`` trained in code on the tiny corpus and protocol.

  Multi-character tokens (``</search>`` may be one token, or glued to the next word) exercise the
  token-level cut at action tags. EOS is "<|endoftext|>", pad is "<|pad|>".
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  texts = [d["contents"] for d in TINY_CORPUS] + [sp.SEARCH_R1_TEMPLATE,
                                                  sp.INVALID_ACTION_OBSERVATION]
  texts += ["<search> capital </search><answer> Paris </answer><information></information>"] * 20
  tok.train_from_iterator(texts, trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                 pad_token="<|pad|>", clean_up_tokenization_spaces=False)


class ScriptedGenerator:
  """A fake `generate_turn`: row i says ``scripts[i][k]`` on its k-th turn (EOS when out of script).

  It keeps each row's context as the contract describes (rewind to ``keep``, append ``forced_ids``,
  append its own output) and checks that the orchestrator's requests are consistent with it, so a
  test can compare ``contexts[i]`` with the rollout's ``response_ids``.

  Args:
    tokenizer: encodes the scripted strings.
    scripts: per row, the text of each turn. The full string is emitted (up to the budget) even
      past a stop string, like a sampler without stop strings; the orchestrator must cut it. A
      text ending with :attr:`EOS` ends with the EOS token.
    with_logprobs: also return deterministic fake log-probs, ``-(1 + id % 7) / 100``.
  """

  EOS = "<EOS>"  # a turn's text ending with this marker ends with the tokenizer's EOS token

  def __init__(self, tokenizer, scripts: Sequence[Sequence[str]], with_logprobs: bool = False):
    self.tokenizer = tokenizer
    self.scripts = [list(s) for s in scripts]
    self.with_logprobs = with_logprobs
    self.contexts: list[list[int]] = [[] for _ in scripts]
    self.turn_of_row = [0] * len(scripts)
    self.requests: list[TurnRequest] = []

  def __call__(self, request: TurnRequest) -> TurnOutput:
    self.requests.append(request)
    if list(request.rows) != sorted(set(int(r) for r in request.rows)):
      raise AssertionError(f"rows not ascending and unique: {request.rows}")
    out_ids, out_logp = [], []
    for j, i in enumerate(int(r) for r in request.rows):
      ctx = self.contexts[i]
      if request.keep[j] > len(ctx):
        raise AssertionError(f"row {i}: keep={request.keep[j]} beyond context length {len(ctx)}")
      del ctx[int(request.keep[j]):]
      ctx.extend(request.forced_ids[j])
      k = self.turn_of_row[i]
      self.turn_of_row[i] += 1
      script = self.scripts[i]
      eos = self.tokenizer.eos_token_id
      text = script[k] if k < len(script) else self.EOS
      ids = list(self.tokenizer.encode(text.removesuffix(self.EOS), add_special_tokens=False))
      if text.endswith(self.EOS):
        ids.append(eos)
      ids = ids[:int(request.max_new_tokens[j])]
      ctx.extend(ids)
      out_ids.append(ids)
      out_logp.append([-(1 + t % 7) / 100 for t in ids])
    return TurnOutput(out_ids, out_logp if self.with_logprobs else None)


def fake_logprobs(ids: np.ndarray) -> np.ndarray:
  """The log-probs :class:`ScriptedGenerator` reports for `ids` (for test references)."""
  return -(1 + np.asarray(ids) % 7) / 100
