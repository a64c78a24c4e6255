"""Random-access sources of examples: built-in tasks and TFDS datasets (array_record through
`tfds.data_source`, no TensorFlow), JSONL and Parquet files (pyarrow).

Every source returns examples as plain Python dicts of str / numbers / lists / dicts (TFDS bytes
are decoded to str, NumPy values to Python values), so the rest of the pipeline sees one format.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from grpo_jax.data.config import DataConfig


class DataError(ValueError):
  """Data that cannot be read as configured; the message says what to do."""


def to_python(x: Any) -> Any:
  """Bytes → str, NumPy → Python, recursively."""
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, np.ndarray):
    return [to_python(v) for v in x.tolist()] if x.ndim else to_python(x.item())
  if isinstance(x, np.generic):
    return to_python(x.item())
  if isinstance(x, Mapping):
    return {str(k): to_python(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_python(v) for v in x]
  return x


def get_field(example: Mapping[str, Any], path: str, *, field: str, index: int) -> Any:
  """`example[a][b]...` for a dotted `path` "a.b"; a clear error naming `field` when absent."""
  value: Any = example
  for i, key in enumerate(path.split(".")):
    if not isinstance(value, Mapping) or key not in value:
      where = ".".join(path.split(".")[:i]) or "the example"
      keys = sorted(value) if isinstance(value, Mapping) else type(value).__name__
      raise DataError(f"config.data.{field}: example {index} has no {key!r} in {where} "
                      f"(it has: {keys})")
    value = value[key]
  return value


class ListSource:
  """Examples held in memory (JSONL / Parquet)."""

  def __init__(self, rows: list[dict], origin: str):
    self.rows, self.origin = rows, origin

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, i: int) -> dict:
    return self.rows[i]

  def get_many(self, indices: Sequence[int]) -> list[dict]:
    return [self.rows[int(i)] for i in indices]


class TfdsSource:
  """A TFDS array_record split read with `tfds.data_source` (random access, no TensorFlow)."""

  def __init__(self, source, origin: str):
    self.source, self.origin = source, origin

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    return to_python(self.source[int(i)])

  def get_many(self, indices: Sequence[int]) -> list[dict]:
    return [to_python(r) for r in self.source.__getitems__([int(i) for i in indices])]


def _path(config: DataConfig, split: str) -> str:
  return os.path.expanduser(config.target.replace("{split}", split))


def _read_jsonl(path: str) -> list[dict]:
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
      if not isinstance(row, dict):
        raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}")
      rows.append(row)
  return rows


def _read_parquet(path: str) -> list[dict]:
  import pyarrow.parquet as pq
  try:
    table = pq.read_table(path)
  except Exception as e:  # pylint: disable=broad-except  (pyarrow's errors are many)
    raise DataError(f"{path}: cannot read as Parquet ({type(e).__name__}: {e})") from None
  return [to_python(r) for r in table.to_pylist()]


def _tfds_prepare_command(name: str, data_dir: str | None) -> str:
  where = f" --data_dir={data_dir}" if data_dir else ""
  return f"tfds build {name}{where} --file_format=array_record"


def open_source(config: DataConfig, split: str):
  """The examples of `split` as a random-access source (`len`, `[i]`, `get_many`)."""
  if config.kind == "builtin":
    from grpo_jax.data import builtin
    data_dir = builtin.prepare_builtin(config.target, config.data_dir or None)
    return _open_tfds(builtin.builder_name(config.target), split, data_dir, builtin=True)
  if config.kind == "tfds":
    return _open_tfds(config.target, split, os.path.expanduser(config.data_dir) or None)
  path = _path(config, split)
  if not os.path.isfile(path):
    hint = "" if "{split}" in config.target else " (put {split} in the path to select splits)"
    raise DataError(f"config.data.source: no file {path!r} for split {split!r}{hint}")
  rows = _read_jsonl(path) if config.kind == "jsonl" else _read_parquet(path)
  return ListSource(rows, path)


def _open_tfds(name: str, split: str, data_dir: str | None, builtin: bool = False) -> TfdsSource:
  import tensorflow_datasets as tfds
  origin = f"tfds:{name}[{split}] in {data_dir or 'the default TFDS data_dir'}"
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except
    # TFDS raises many kinds here (not found, not prepared, other file format, unknown split);
    # its messages run to pages. One line that says what to do instead.
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    if builtin:
      raise DataError(f"config.data.source: cannot read built-in {origin}: {first}") from None
    raise DataError(
        f"config.data.source: TFDS dataset {name!r} (split {split!r}) is not prepared as "
        f"array_record in {data_dir or 'the default TFDS data_dir'}. Prepare it with: "
        f"`{_tfds_prepare_command(name, data_dir)}` (TFDS said: {first})") from None
  return TfdsSource(source, origin)


def num_examples(config: DataConfig, split: str | None = None) -> int:
  """Number of examples in `split` (default: `config.split`), before any filtering."""
  return len(open_source(config, split or config.split))


def check_source(config: DataConfig) -> None:
  """Checks (cheaply, before anything compiles) that the splits exist and have the fields.

  Prepares built-in tasks on first use. Raises `DataError` with one line that says what to do.
  """
  splits = [config.split] + ([config.eval_split] if config.eval_split else [])
  for split in splits:
    source = open_source(config, split)
    if not len(source):
      raise DataError(f"config.data.source: split {split!r} of {config.source} is empty")
    first = source[0]
    get_field(first, config.prompt_field, field="prompt_field", index=0)
    get_field(first, config.answer_field, field="answer_field", index=0)
