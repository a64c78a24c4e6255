"""Run metrics: `metrics.jsonl`, TensorBoard event files (tensorboardX, no TensorFlow), a progress bar,
and the reward-curve PNG written when a run ends. Only process 0 writes anything.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

import jax
import numpy as np

# Figures shown in the progress bar, in this order, when present.
_BAR_KEYS = ("reward/mean", "eval/greedy_accuracy", "kl", "entropy", "response/length_mean",
             "time/step_s")


def _scalar(v: Any) -> float:
  v = float(np.asarray(v))
  return v if math.isfinite(v) else float("nan")


class MetricsWriter:
  """Appends one JSON object per logged step to `<workdir>/metrics.jsonl` and TensorBoard."""

  def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0,
               progress_bar: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = self._bar = self._file = None
    if not self.enabled:
      return
    import tensorboardX  # Imported lazily: only process 0 needs it.
    # A resumed run redoes the steps after its checkpoint: drop what an earlier attempt logged for
    # them (purge_step does the same for TensorBoard readers).
    truncate_jsonl(self.path, initial_step)
    self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"),
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
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    if self._bar is not None:
      self._bar.set_postfix({k.split("/")[-1]: f"{scalars[k]:.3g}" for k in _BAR_KEYS
                             if k in scalars}, refresh=False)

  def advance(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def close(self) -> None:
    if not self.enabled:
      return
    self._tb.flush()
    self._tb.close()
    self._file.close()
    if self._bar is not None:
      self._bar.close()


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
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
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
