"""Run metrics: `metrics.jsonl`, TensorBoard event files (tensorboardX, no TensorFlow), a progress bar
(or one line per logged step when the bar is off), and the reward-curve PNG written when a run ends.
Only process 0 writes anything.

Event files are written synchronously from the loop (tensorboardX's `EventsWriter`, not its
`SummaryWriter`, whose writer thread dies silently on a full disk and leaves `close()` waiting
forever); a full disk is an `OSError` in the loop, where it is reported.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Iterable

import jax
import numpy as np

# Figures shown in the progress bar and the per-step line, in this order, when present: key, label.
_SHOWN = (("reward/mean", "reward"), ("eval/greedy_accuracy", "eval_acc"), ("kl", "kl"),
          ("entropy", "entropy"), ("response/length_mean", "resp_len"),
          ("update/skipped_update", "skipped"), ("time/step_s", "step_s"))


def _scalar(v: Any) -> float:
  v = float(np.asarray(v))
  return v if math.isfinite(v) else float("nan")


def shown(scalars: dict[str, float]) -> str:
  """`reward=0.41 kl=0.002 ...`: the headline figures of a metrics row, labelled."""
  return " ".join(f"{label}={scalars[k]:.3g}" for k, label in _SHOWN if k in scalars)


class _EventFile:
  """A TensorBoard event file written synchronously (see the module docstring)."""

  def __init__(self, logdir: str, purge_step: int | None):
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    os.makedirs(logdir, exist_ok=True)
    self._event = Event
    self._writer = EventsWriter(os.path.join(logdir, "events"))
    if purge_step is not None:  # Readers hide the events of steps >= purge_step written before.
      self._writer.write_event(Event(step=purge_step, wall_time=time.time(),
                                     session_log=SessionLog(status=SessionLog.START)))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    from tensorboardX import summary
    now = time.time()
    for k, v in scalars.items():
      self._writer.write_event(self._event(summary=summary.scalar(k, v), step=step, wall_time=now))
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class MetricsWriter:
  """Appends one JSON object per logged step to `<workdir>/metrics.jsonl` and TensorBoard, and
  shows it: in the progress bar, or as one line on stdout when the bar is off."""

  def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0,
               progress_bar: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.total_steps = total_steps
    self._tb = self._bar = self._file = None
    if not self.enabled:
      return
    # A resumed run redoes the steps after its checkpoint: drop what an earlier attempt logged for
    # them (purge_step does the same for TensorBoard readers).
    truncate_jsonl(self.path, initial_step)
    self._tb = _EventFile(os.path.join(workdir, "tensorboard"),
                          purge_step=initial_step + 1 if initial_step else None)
    self._file = open(self.path, "a")
    if progress_bar:
      import tqdm
      self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    scalars = {k: _scalar(v) for k, v in metrics.items()}
    self._file.write(json.dumps({"step": step, **scalars}, allow_nan=True) + "\n")
    self._file.flush()
    self._tb.write(step, scalars)
    if self._bar is not None:
      self._bar.set_postfix_str(shown(scalars), refresh=False)
    else:
      print(f"step {step}/{self.total_steps} {shown(scalars)}", flush=True)

  def advance(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def close(self) -> None:
    """Closes what is open; a close that fails (a full disk) does not stop the others."""
    if not self.enabled:
      return
    errors = []
    for closer in (self._tb, self._file, self._bar):
      if closer is None:
        continue
      try:
        closer.close()
      except OSError as e:
        errors.append(e)
    self._tb = self._file = self._bar = None
    if errors:
      raise errors[0]


def missing_steps(path: str, expected: Iterable[int]) -> list[int]:
  """The steps of `expected` that have no row in the metrics file at `path`."""
  have = set()
  if os.path.exists(path):
    have = {int(r["step"]) for r in read_metrics(path) if isinstance(r.get("step"), (int, float))}
  return [s for s in expected if s not in have]


def ranges(steps: list[int]) -> str:
  """[1, 2, 3, 7] -> "1-3, 7"."""
  out, i = [], 0
  while i < len(steps):
    j = i
    while j + 1 < len(steps) and steps[j + 1] == steps[j] + 1:
      j += 1
    out.append(str(steps[i]) if i == j else f"{steps[i]}-{steps[j]}")
    i = j + 1
  return ", ".join(out)


def truncate_jsonl(path: str, last_step: int) -> None:
  """Keeps only the lines of a `{"step": ...}` JSONL file with step <= last_step (atomically)."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= last_step:
          keep.append(line if line.endswith("\n") else line + "\n")
      except (json.JSONDecodeError, KeyError, TypeError):
        continue
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def read_metrics(path: str) -> list[dict[str, float]]:
  """Reads `metrics.jsonl`; a last line cut by a crash is ignored."""
  rows = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict):
        rows.append(row)
  return rows


def plot_curves(rows: Iterable[dict[str, float]], keys: tuple[str, ...], path: str,
                title: str = "") -> str:
  """Writes a PNG with one line per metric key (steps on x); returns the path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = list(rows)
  fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
  for key in keys:
    pts = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
    if pts:
      xs, ys = zip(*pts)
      ax.plot(xs, ys, label=key, marker="." if len(pts) < 50 else None)
  ax.set_xlabel("step")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp)
  plt.close(fig)
  os.replace(tmp, path)
  return path
