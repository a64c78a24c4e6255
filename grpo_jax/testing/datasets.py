"""Tiny local data sets written in code (JSONL, Search-R1 / verl Parquet) for tests and smoke runs."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

# (question, gold answers): unicode, several gold answers, an empty gold.
TINY_QA: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("Paris",)),
    ("Which river flows north through Africa?", ("Nile", "the Nile", "Nile River")),
    ("Where is café culture famous?", ("Zürich", "Vienna")),
    ("Who created Python?", ("Guido van Rossum",)),
    ("How many legs has a spider?", ("8", "eight")),
    ("What is the capital of Japan?", ("Tokyo",)),
)

SEARCH_R1_INSTRUCTION = (
    "Answer the given question. You can search with <search> query </search> and the results "
    "appear between <information> and </information>. Give the final answer between <answer> "
    "and </answer>. Question: ")


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict]) -> str:
  """Writes `rows` as JSON lines (UTF-8) and returns the path."""
  path = os.fspath(path)
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  return path


def qa_rows(n: int | None = None) -> list[dict]:
  """Plain QA rows: {"question", "answers", "id"}."""
  qa = TINY_QA if n is None else [TINY_QA[i % len(TINY_QA)] for i in range(n)]
  return [{"question": q, "answers": list(a), "id": i} for i, (q, a) in enumerate(qa)]


def search_r1_rows(split: str = "train", n: int | None = None,
                   data_source: str = "nq") -> list[dict]:
  """Rows in the format of Search-R1's `data_process/nq_search.py` (verl RL Parquet)."""
  rows = []
  for i, row in enumerate(qa_rows(n)):
    question = row["question"].strip()
    rows.append({
        "data_source": data_source,
        "prompt": [{"role": "user", "content": SEARCH_R1_INSTRUCTION + question + "\n"}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": row["answers"]}},
        "extra_info": {"split": split, "index": i},
    })
  return rows


def write_search_r1_parquet(path: str | os.PathLike, split: str = "train",
                            n: int | None = None) -> str:
  """Writes `search_r1_rows` with pyarrow and returns the path."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  path = os.fspath(path)
  pq.write_table(pa.Table.from_pylist(search_r1_rows(split, n)), path)
  return path
