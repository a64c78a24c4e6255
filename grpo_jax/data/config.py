"""`DataConfig`: what to read and how to turn it into batches of prompts."""

from __future__ import annotations

import dataclasses
import string

_KINDS = ("builtin", "tfds", "jsonl", "parquet")


def _fail(field: str, msg: str) -> ValueError:
  return ValueError(f"config.data.{field}: {msg}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The data of a run; validated on construction (errors name the field).

  Attributes:
    source: where the examples come from: ``"builtin:<task>"`` (digits | arithmetic, generated
      locally), ``"tfds:<name>"`` (a TFDS dataset prepared as array_record in `data_dir`),
      ``"jsonl:<path>"`` or ``"parquet:<path>"`` (a ``{split}`` in the path is replaced by the
      split name, e.g. ``"parquet:/data/nq/{split}.parquet"``).
    split: split to train on (e.g. "train").
    eval_split: held-out split for evaluation ("" = none).
    data_dir: TFDS data_dir ("" = $GRPO_JAX_CACHE/tfds for built-ins, TFDS' default otherwise).
    prompt_field: column with the prompt: a str, or a chat list of {"role", "content"} messages
      (Search-R1 / verl Parquet); dotted paths reach into nested columns.
    answer_field: column with the gold answer(s): a str or a list of str (any one counts); dotted
      paths allowed (``"reward_model.ground_truth.target"``).
    template: `str.format` template that turns the prompt into the user message; must use
      ``{prompt}``; other top-level fields of the example may be named too.
    use_chat_template: render the messages with the tokenizer's chat template (with the
      generation prompt) instead of using the text as is.
    system_prompt: system message prepended when `use_chat_template` ("" = none); without a chat
      template it is prepended to the text on its own line.
    max_prompt_len: longest prompt kept (tokens); see `drop_over_long`.
    length_buckets: padded prompt lengths (tokens, ascending); each batch is padded to the smallest
      bucket that holds its longest prompt, which bounds the number of compiled shapes. The largest
      must be >= `max_prompt_len`. Empty: always pad to `max_prompt_len`.
    batch_size: prompts per step over all hosts (each host gets batch_size / process_count).
    shuffle: shuffle the examples, differently each epoch, from `seed`.
    seed: seed of the shuffle (int).
    num_epochs: passes over the data; None or -1 = repeat forever.
    drop_over_long: drop prompts longer than `max_prompt_len` (counted and logged, see
      `PromptDataset.stats`); False = refuse the data set with an error naming the first one.
  """

  source: str = "builtin:digits"
  split: str = "train"
  eval_split: str = "test"
  data_dir: str = ""
  prompt_field: str = "prompt"
  answer_field: str = "answer"
  template: str = "{prompt}"
  use_chat_template: bool = False
  system_prompt: str = ""
  max_prompt_len: int = 32
  length_buckets: tuple[int, ...] = (16, 32)
  batch_size: int = 16
  shuffle: bool = True
  seed: int = 0
  num_epochs: int | None = None
  drop_over_long: bool = True

  def __post_init__(self):
    for f in ("source", "split", "eval_split", "data_dir", "prompt_field", "answer_field",
              "template", "system_prompt"):
      if not isinstance(getattr(self, f), str):
        raise _fail(f, f"expected a str, got {getattr(self, f)!r}")
    kind, sep, rest = self.source.partition(":")
    if not sep or kind not in _KINDS or not rest:
      raise _fail("source", f"expected builtin:<task> | tfds:<name> | jsonl:<path> | "
                            f"parquet:<path>, got {self.source!r}")
    for f in ("split", "prompt_field", "answer_field"):
      if not getattr(self, f):
        raise _fail(f, "expected a non-empty str")
    try:
      names = {name for _, name, _, _ in string.Formatter().parse(self.template) if name}
    except ValueError as e:
      raise _fail("template", f"not a valid str.format template ({e}): {self.template!r}") from None
    if "prompt" not in names:
      raise _fail("template", f"expected a str.format template using {{prompt}}, got "
                              f"{self.template!r}")
    for f in ("use_chat_template", "shuffle", "drop_over_long"):
      if not isinstance(getattr(self, f), bool):
        raise _fail(f, f"expected a bool, got {getattr(self, f)!r}")
    for f in ("max_prompt_len", "batch_size"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise _fail(f, f"expected a positive int, got {v!r}")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int):
      raise _fail("seed", f"expected an int, got {self.seed!r}")
    epochs = self.num_epochs
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int)
                               or (epochs < 1 and epochs != -1)):
      raise _fail("num_epochs", f"expected a positive int, or None / -1 for forever, got {epochs!r}")
    buckets = self.length_buckets
    if isinstance(buckets, (str, bytes)) or not hasattr(buckets, "__iter__"):
      raise _fail("length_buckets", f"expected a tuple of ints, got {buckets!r}")
    buckets = tuple(buckets)
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
      raise _fail("length_buckets", f"expected positive ints, got {buckets!r}")
    if list(buckets) != sorted(set(buckets)):
      raise _fail("length_buckets", f"expected strictly ascending lengths, got {buckets!r}")
    if buckets and buckets[-1] < self.max_prompt_len:
      raise _fail("length_buckets", f"the largest bucket ({buckets[-1]}) must be >= "
                                    f"max_prompt_len ({self.max_prompt_len})")
    object.__setattr__(self, "length_buckets", buckets)

  @property
  def kind(self) -> str:
    """"builtin" | "tfds" | "jsonl" | "parquet"."""
    return self.source.partition(":")[0]

  @property
  def target(self) -> str:
    """What follows "<kind>:" in `source` (task, TFDS name or file path)."""
    return self.source.partition(":")[2]

  @property
  def forever(self) -> bool:
    return self.num_epochs is None or self.num_epochs == -1


def eval_config(config: DataConfig) -> DataConfig:
  """The held-out view of `config`: `eval_split`, in order, one pass."""
  if not config.eval_split:
    raise _fail("eval_split", "no held-out split configured (it is '')")
  return dataclasses.replace(config, split=config.eval_split, shuffle=False, num_epochs=1)
