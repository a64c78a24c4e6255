"""Built-in tasks as TFDS builders that generate their examples locally (no download).

They are written as array_record (`download_and_prepare(file_format="array_record")`) and read back
with `tfds.data_source`, which needs no TensorFlow. `digits` and `arithmetic` have a reward of the
same name in `grpo_jax.rewards`; `addition` is scored by `"numeric"`.

Tasks:
  digits: ``"repeat the last digit: 3 8 1"`` → ``"1"``. The answer is one token copied from the
    end of the prompt, then a stop: a 2-layer, width-64 transformer trained from random init with
    GRPO picks it up within a minute of CPU (v1.0.0 put the digits first; copying from ten tokens
    back took the same model thousands of steps, too slow for the default run). Its reward (`grpo_jax.rewards.digits_reward`) is shaped so that a
    random policy already gets spread within each group. 1000 prompts: 900 train, 100 test
    (disjoint).
  arithmetic: two- to four-step word problems with GSM8K-style gold (worked steps, then
    ``#### 42``); reward `numeric`. 2000 train, 200 test (disjoint prompts).
  addition: ``"What is 7 + 15? Answer with the number only."`` → ``"22"``, both numbers in 0..19;
    reward `numeric` (the last number of the response). Posed to a small *pretrained* model
    (SmolLM2-135M-Instruct, with its chat template): the built-in `arithmetic` task is far out of its
    reach (reward 0 at the start), this one is not (configs/smollm2_addition.py). The 400 ordered
    pairs are split by unordered pair ({a, b}: both orders in the same split), 20% test, so a test
    sum is never seen in training with its operands swapped.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

_TEST_FRACTION = 0.1


class _LocalBuilder(tfds.core.GeneratorBasedBuilder):
  """A builder whose examples are generated in code (nothing to download, no checksums)."""

  # TFDS finds a builder's source file through `importlib_resources` (not a dependency of ours)
  # when the package is installed in editable mode; the file is right here.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)


class GrpoDigits(_LocalBuilder):
  """The `digits` task: repeat the last of three digits."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": "The instruction comes first, the digits last."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Repeat the last of three digits (a task a tiny model learns with GRPO).",
        features=tfds.features.FeaturesDict(
            {"prompt": tfds.features.Text(), "answer": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    order = np.random.RandomState(1234).permutation(1000)
    n_test = int(len(order) * _TEST_FRACTION)
    return {"train": self._generate_examples(order[n_test:]),
            "test": self._generate_examples(order[:n_test])}

  def _generate_examples(self, numbers):
    for n in numbers:
      a, b, c = int(n) // 100, int(n) // 10 % 10, int(n) % 10
      yield int(n), {"prompt": f"repeat the last digit: {a} {b} {c}", "answer": str(c)}


_NAMES = ("ann", "ben", "dan", "eve", "fay", "gus", "hal", "ivy")
_ITEMS = ("apples", "pears", "coins", "books", "cards", "stones", "shells", "marbles")


def arithmetic_problem(rng: np.random.RandomState) -> tuple[str, str]:
  """One word problem and its GSM8K-style solution (steps, then ``#### n``); all values >= 0."""
  name, item = _NAMES[rng.randint(len(_NAMES))], _ITEMS[rng.randint(len(_ITEMS))]
  total = int(rng.randint(2, 20))
  sentences = [f"{name} has {total} {item}."]
  steps = []
  for _ in range(int(rng.randint(2, 5)) - 1):
    kind = rng.randint(3)
    if kind == 0:
      k = int(rng.randint(1, 20))
      sentences.append(f"then {name} finds {k} more.")
      steps.append(f"{total} + {k} = {total + k}")
      total += k
    elif kind == 1 and total > 1:
      k = int(rng.randint(1, total))
      sentences.append(f"then {name} gives away {k}.")
      steps.append(f"{total} - {k} = {total - k}")
      total -= k
    else:
      k = int(rng.randint(2, 4))
      sentences.append(f"then {name} gets {k} times as many.")
      steps.append(f"{total} * {k} = {total * k}")
      total *= k
  sentences.append(f"how many {item} does {name} have now?")
  return " ".join(sentences), "\n".join(steps) + f"\n#### {total}"


class GrpoArithmetic(_LocalBuilder):
  """The `arithmetic` task: multi-step word problems with GSM8K-style numeric gold."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  NUM_TRAIN, NUM_TEST = 2000, 200

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Multi-step arithmetic word problems; gold is worked steps then '#### n'.",
        features=tfds.features.FeaturesDict(
            {"prompt": tfds.features.Text(), "answer": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    rng = np.random.RandomState(4321)
    test, train, seen = [], [], set()
    while len(test) < self.NUM_TEST:  # Test first; train never repeats a test prompt.
      q, a = arithmetic_problem(rng)
      if q not in seen:
        seen.add(q)
        test.append((q, a))
    while len(train) < self.NUM_TRAIN:
      q, a = arithmetic_problem(rng)
      if q not in seen:
        seen.add(q)
        train.append((q, a))
    return {"train": self._generate_examples(train), "test": self._generate_examples(test)}

  def _generate_examples(self, pairs):
    for i, (q, a) in enumerate(pairs):
      yield i, {"prompt": q, "answer": a}


class GrpoAddition(_LocalBuilder):
  """The `addition` task: "What is a + b?" with a, b in 0..19, gold the sum."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MAX_OPERAND = 19

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Addition of two numbers in 0..19, answer with the number only.",
        features=tfds.features.FeaturesDict(
            {"prompt": tfds.features.Text(), "answer": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    n = self.MAX_OPERAND + 1
    unordered = [(a, b) for a in range(n) for b in range(a, n)]
    order = np.random.RandomState(2468).permutation(len(unordered))
    n_test = int(len(unordered) * 0.2)
    def ordered(idx):  # Both orders of each unordered pair (one when a == b).
      return sorted({p for i in idx for p in (unordered[i], unordered[i][::-1])})
    return {"train": self._generate_examples(ordered(order[n_test:])),
            "test": self._generate_examples(ordered(order[:n_test]))}

  def _generate_examples(self, pairs):
    for a, b in pairs:
      yield a * 100 + b, {"prompt": f"What is {a} + {b}? Answer with the number only.",
                          "answer": str(a + b)}


# task name (as in "builtin:<task>") -> builder class.
BUILTIN_TASKS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "digits": GrpoDigits,
    "arithmetic": GrpoArithmetic,
    "addition": GrpoAddition,
}


def default_data_dir() -> str:
  """Where built-in tasks are prepared when no data_dir is given: $GRPO_JAX_CACHE/tfds."""
  root = os.environ.get("GRPO_JAX_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "grpo_jax"))
  return os.path.join(root, "tfds")


def builder_name(task: str) -> str:
  """The TFDS name of a built-in task (e.g. ``"grpo_digits"``), as `tfds.data_source` wants it."""
  return _builder_class(task).name


def _builder_class(task: str):
  cls = BUILTIN_TASKS.get(task)
  if cls is None:
    raise ValueError(f"config.data.source: unknown built-in task {task!r} "
                     f"(known: {', '.join(sorted(BUILTIN_TASKS))})")
  return cls


@contextlib.contextmanager
def _file_lock(path: str):
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)  # Released when the file closes (also if the process dies).
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare_builtin(task: str, data_dir: str | os.PathLike | None = None) -> str:
  """Generates built-in `task` as array_record under `data_dir` once; returns the data_dir.

  Idempotent and safe against concurrent first use: processes take an exclusive file lock in
  `data_dir` and the first one builds (TFDS writes into an `incomplete.*` folder and renames it);
  the others then find the finished dataset.
  """
  cls = _builder_class(task)
  data_dir = os.fspath(data_dir) if data_dir else default_data_dir()
  os.makedirs(data_dir, exist_ok=True)
  with _file_lock(os.path.join(data_dir, f".{cls.name}.lock")):
    builder = cls(data_dir=data_dir)
    if not builder.is_prepared():
      builder.download_and_prepare(file_format="array_record")
  return data_dir
