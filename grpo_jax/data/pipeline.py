"""The grain pipeline: examples → rendered prompts → left-padded token batches, per host.

Order of operations (all deterministic for a seed):

1. Read the split and render every prompt (template, chat template); measure its length in
   tokens. Prompts longer than `max_prompt_len` are dropped here, counted (`stats`) and logged, so
   every later step sees only usable examples and each batch is full.
2. A grain `MapDataset` over the kept examples: shuffled from the seed (differently each epoch),
   repeated `num_epochs` times (or forever), cut into GLOBAL batches of `batch_size` examples.
3. Each host takes its own contiguous slice of every global batch (host p: rows
   ``[p*b, (p+1)*b)`` with ``b = batch_size / process_count``), tokenises it and pads it on the
   left to the smallest length bucket that holds the longest prompt of the *global* batch (so all
   hosts agree on the shape without talking to each other).

The iterator is grain's: `get_state()` is a small JSON-able dict and `set_state()` resumes exactly.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from grpo_jax.data.config import DataConfig
from grpo_jax.data.sources import DataError, get_field, open_source

_LOG = logging.getLogger(__name__)


def _is_chat(value: Any) -> bool:
  return (isinstance(value, (list, tuple)) and bool(value)
          and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value))


def answers_of(example: Mapping[str, Any], config: DataConfig, index: int) -> list[str]:
  """The gold answers of `example` as a list of str."""
  value = get_field(example, config.answer_field, field="answer_field", index=index)
  if isinstance(value, (str, int, float)) and not isinstance(value, bool):
    return [str(value)]
  if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
    return [str(v) for v in value]
  raise DataError(f"config.data.answer_field: example {index}: expected a str or a list of str at "
                  f"{config.answer_field!r}, got {value!r:.200}")


def render_prompt(example: Mapping[str, Any], config: DataConfig, tokenizer, index: int) -> str:
  """The prompt text the model sees: template, system prompt and (optionally) chat template.

  A chat-list prompt (Search-R1 / verl Parquet) gets the template applied to its last user
  message; a plain prompt becomes one user message.
  """
  value = get_field(example, config.prompt_field, field="prompt_field", index=index)
  fields = {k: v for k, v in example.items() if isinstance(k, str) and k.isidentifier()}

  def fill(text: str) -> str:
    try:
      return config.template.format(**{**fields, "prompt": text})
    except (KeyError, IndexError) as e:
      raise DataError(f"config.data.template: example {index} has no field {e} "
                      f"(template {config.template!r})") from None

  if _is_chat(value):
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in value]
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if users:
      messages[users[-1]]["content"] = fill(messages[users[-1]]["content"])
  elif isinstance(value, str):
    messages = [{"role": "user", "content": fill(value)}]
  else:
    raise DataError(f"config.data.prompt_field: example {index}: expected a str or a chat list "
                    f"of {{role, content}} at {config.prompt_field!r}, got {value!r:.200}")
  if config.use_chat_template:
    if config.system_prompt and messages[0]["role"] != "system":
      messages.insert(0, {"role": "system", "content": config.system_prompt})
    if getattr(tokenizer, "chat_template", None) is None:
      raise DataError("config.data.use_chat_template: the tokenizer has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  text = "\n".join(m["content"] for m in messages)
  return f"{config.system_prompt}\n{text}" if config.system_prompt else text


def tokenize(tokenizer, texts: Sequence[str], config: DataConfig) -> list[list[int]]:
  """Token ids of rendered prompts. A chat template already holds its special tokens."""
  if not texts:
    return []
  return tokenizer(list(texts), add_special_tokens=not config.use_chat_template)["input_ids"]


def pad_id_of(tokenizer) -> int:
  """The pad id of a run: the tokenizer's pad token, else its EOS (Llama 3's tokenizer has no pad).

  The one rule for prompt padding here and for the sampler's pad (`grpo_jax.train`); padded
  positions are masked out everywhere, so EOS is as good a filler as any.
  """
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  if pad is None:
    raise ValueError("tokenizer: has neither a pad nor an eos token to pad prompts with")
  return int(pad)


def left_pad(ids: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """[b, length] int32 ids right-aligned (left padding) and their int32 mask."""
  ids_BxP = np.full((len(ids), length), pad_id, np.int32)
  mask_BxP = np.zeros((len(ids), length), np.int32)
  for row, seq in enumerate(ids):  # Host side, b rows per step: not a hot path.
    if len(seq) > length:
      raise ValueError(f"left_pad: a prompt of {len(seq)} tokens does not fit length {length}")
    if len(seq):
      ids_BxP[row, length - len(seq):] = seq
      mask_BxP[row, length - len(seq):] = 1
  return ids_BxP, mask_BxP


def bucket_length(longest: int, config: DataConfig) -> int:
  """The smallest length bucket >= `longest` (max_prompt_len when there are no buckets)."""
  for b in config.length_buckets:
    if b >= longest:
      return b
  return config.max_prompt_len


@dataclasses.dataclass(frozen=True)
class DataStats:
  """Counts of the split, after filtering.

  Attributes:
    num_examples: examples in the split.
    num_kept: examples the pipeline draws from.
    num_over_long: prompts dropped for being longer than `max_prompt_len` tokens.
    over_long_indices: the first (up to 20) dropped example indices.
  """

  num_examples: int
  num_kept: int
  num_over_long: int
  over_long_indices: tuple[int, ...]


class PromptDataset:
  """Batches of prompts for one host; `iter()` gives a checkpointable grain `DatasetIterator`.

  Each batch is a dict:
    prompt_ids: int32 [b, P], left-padded with the tokenizer's pad id.
    prompt_mask: int32 [b, P], 1 on prompt tokens.
    prompt_text: list[str], the rendered prompts (what was tokenised).
    answer: list[list[str]], the gold answers of each prompt.
    example: list[dict], the other fields of each example.
    index: int64 [b], each example's index in the split (the same on resume).
  with ``b = batch_size // process_count`` and P the smallest length bucket that holds the longest
  prompt of the global batch.
  """

  def __init__(self, config: DataConfig, tokenizer, *, process_index: int = 0,
               process_count: int = 1, drop_remainder: bool = True):
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index: expected 0 <= process_index < process_count="
                       f"{process_count}, got {process_index}")
    if config.batch_size % process_count:
      raise ValueError(f"config.data.batch_size: {config.batch_size} prompts do not divide over "
                       f"{process_count} hosts")
    self.config, self.tokenizer = config, tokenizer
    self.process_index, self.process_count = process_index, process_count
    self.local_batch_size = config.batch_size // process_count
    self.pad_id = pad_id_of(tokenizer)
    self.source = open_source(config, config.split)

    # Render and measure every prompt once: over-long prompts are dropped up front (so batches
    # stay full and the order stays a pure function of the seed), and each host can find the
    # bucket of a whole global batch from the lengths alone.
    records = self.source.get_many(range(len(self.source)))
    texts = [render_prompt(r, config, tokenizer, i) for i, r in enumerate(records)]
    lengths = np.array([len(t) for t in tokenize(tokenizer, texts, config)], np.int64)
    over = np.flatnonzero(lengths > config.max_prompt_len)
    if len(over) and not config.drop_over_long:
      i = int(over[0])
      raise DataError(f"config.data.max_prompt_len: {len(over)} prompts of {config.source} "
                      f"[{config.split}] are longer than {config.max_prompt_len} tokens (example "
                      f"{i}: {lengths[i]} tokens); raise max_prompt_len or set drop_over_long=True")
    self._kept = np.flatnonzero(lengths <= config.max_prompt_len)
    self._lengths = lengths
    self.stats = DataStats(num_examples=len(records), num_kept=len(self._kept),
                           num_over_long=len(over),
                           over_long_indices=tuple(int(i) for i in over[:20]))
    if len(over):
      _LOG.warning("data: dropped %d of %d prompts of %s [%s] longer than %d tokens "
                   "(first indices: %s)", len(over), len(records), config.source, config.split,
                   config.max_prompt_len, list(self.stats.over_long_indices))
    if len(self._kept) == 0:
      raise DataError(f"config.data.max_prompt_len: every prompt of {config.source} "
                      f"[{config.split}] is longer than {config.max_prompt_len} tokens")
    if drop_remainder and not config.forever and (
        len(self._kept) * config.num_epochs < config.batch_size):
      raise DataError(f"config.data.batch_size: {config.batch_size} is more than the "
                      f"{len(self._kept) * config.num_epochs} examples of {config.num_epochs} "
                      f"epoch(s) of {config.source} [{config.split}]")

    ds = grain.MapDataset.source(self._kept)
    if config.shuffle:
      ds = ds.shuffle(seed=config.seed)
    ds = ds.repeat(None if config.forever else config.num_epochs)
    ds = ds.batch(config.batch_size, drop_remainder=drop_remainder, batch_fn=np.asarray)
    self._global_batches = ds  # MapDataset of int64 [batch_size] example indices
    self._dataset = ds.map(self._host_batch)

  def _host_batch(self, indices_B: np.ndarray) -> dict[str, Any]:
    # Bucket from the whole global batch: every host pads to the same length.
    length = bucket_length(int(self._lengths[indices_B].max()), self.config)
    pieces = np.array_split(indices_B, self.process_count)  # equal unless a short last batch
    mine = pieces[self.process_index]
    records = self.source.get_many(mine)
    texts = [render_prompt(r, self.config, self.tokenizer, int(i)) for r, i in zip(records, mine)]
    ids_BxP, mask_BxP = left_pad(tokenize(self.tokenizer, texts, self.config), length,
                                 self.pad_id)
    # The prompt and answer columns themselves are not repeated; nested ones (dotted paths) stay.
    top = {f for f in (self.config.prompt_field, self.config.answer_field) if "." not in f}
    return {
        "prompt_ids": ids_BxP,
        "prompt_mask": mask_BxP,
        "prompt_text": texts,
        "answer": [answers_of(r, self.config, int(i)) for r, i in zip(records, mine)],
        "example": [{k: v for k, v in r.items() if k not in top} for r in records],
        "index": np.asarray(mine, np.int64),
    }

  def __len__(self) -> int:
    """Number of batches (sys.maxsize // batch_size when repeating forever)."""
    return len(self._dataset)

  def __getitem__(self, step: int) -> dict[str, Any]:
    """The batch of step `step` (random access, as the iterator would yield it)."""
    return self._dataset[step]

  def global_indices(self, step: int) -> np.ndarray:
    """The example indices of the whole global batch of `step` (all hosts)."""
    return np.asarray(self._global_batches[step])

  def __iter__(self) -> grain.DatasetIterator:
    # One reader thread, a few batches ahead: tokenising is cheap, and a deep prefetch would only
    # spend CPU the training step needs.
    return iter(self._dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))


def make_dataset(config: DataConfig, tokenizer, *, process_index: int = 0, process_count: int = 1,
                 drop_remainder: bool = True) -> PromptDataset:
  """The host-local prompt batches of `config`; see `PromptDataset`.

  Args:
    config: the data config.
    tokenizer: an HF tokenizer (pad or eos token needed; a chat template if `use_chat_template`).
    process_index: this host's index (jax.process_index()).
    process_count: number of hosts (jax.process_count()); must divide `config.batch_size`.
    drop_remainder: drop a last, partial global batch (only reached with finite `num_epochs`).
      With False its rows are split as evenly as possible over the hosts.
  """
  return PromptDataset(config, tokenizer, process_index=process_index,
                       process_count=process_count, drop_remainder=drop_remainder)
