r"""Inspect the advantages of a run, or compute them for rollouts produced elsewhere.

  python -m grpo_jax.inspect WORKDIR [--step N] [--out DIR]
      Summary table of the exported step (latest by default) and PNGs: reward and advantage
      histograms, and the reward curve from metrics.jsonl.
  python -m grpo_jax.inspect ROLLOUTS.parquet --estimator rloo [--group-column uid]
        [--reward-column reward] [--out DIR]
      Computes advantages for an external Parquet of rollouts (one row per response, a group column
      and a reward column) with any estimator, writes `<name>.advantages.parquet` and the PNGs.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _fail(msg: str):
  sys.exit(f"error: {msg}")


def _read(path: str, what: str) -> pa.Table:
  """A Parquet file as a table with rows, or one line naming the file."""
  try:
    table = pq.read_table(path)
  except Exception as e:  # noqa: BLE001 -- pyarrow raises many kinds for a damaged file.
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    _fail(f"{what}: {path} is not a readable Parquet file ({first})")
  if table.num_rows == 0:
    _fail(f"{what}: {path} has no rows")
  return table


def _numbers(table: pa.Table, column: str, flag: str) -> np.ndarray:
  """A numeric column as float32, or one line naming the column and its type."""
  col = table.column(column)
  if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)
          or pa.types.is_boolean(col.type)):
    _fail(f"{flag}: column {column!r} holds {col.type}, expected numbers")
  return np.asarray(col.to_numpy(zero_copy_only=False), np.float32)


def _out_dir(out: str) -> str:
  if os.path.exists(out) and not os.path.isdir(out):
    _fail(f"--out: {out!r} is a file, expected a folder for the PNGs")
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    _fail(f"--out: cannot create {out!r} ({e.strerror or e})")
  return out


def latest_export(workdir: str, step: int | None) -> str:
  from grpo_jax import export
  if step is not None:
    path = export.step_path(workdir, step)
    if not os.path.exists(path):
      _fail(f"--step: no export for step {step} in {export.export_dir(workdir)}")
    return path
  files = sorted(f for f in glob.glob(os.path.join(export.export_dir(workdir), "step_*.parquet"))
                 if not f.endswith("_tokens.parquet"))
  if not files:
    _fail(f"WORKDIR: no exported steps under {export.export_dir(workdir)} "
          f"(set --config.train.export_every)")
  return files[-1]


def summary(table: pa.Table) -> str:
  """A plain-text table: one line per group (mean / std / min / max of reward and advantage)."""
  d = table.to_pydict()
  gid = np.asarray(d["group_id"])
  rew, adv = np.asarray(d["reward"], np.float64), np.asarray(d["advantage"], np.float64)
  lines = [f"{len(gid)} responses in {len(np.unique(gid))} groups; reward mean {rew.mean():.4f} "
           f"std {rew.std():.4f}; advantage mean {adv.mean():.4f} std {adv.std():.4f}; "
           f"groups with zero reward spread: "
           f"{np.mean([np.ptp(rew[gid == g]) == 0 for g in np.unique(gid)]):.1%}",
           f"{'group':>6} {'n':>3} {'r_mean':>8} {'r_std':>8} {'r_min':>8} {'r_max':>8} "
           f"{'a_min':>8} {'a_max':>8}"]
  for g in np.unique(gid):
    m = gid == g
    r, a = rew[m], adv[m]
    lines.append(f"{g:>6} {m.sum():>3} {r.mean():>8.3f} {r.std(ddof=1) if m.sum() > 1 else 0:>8.3f} "
                 f"{r.min():>8.3f} {r.max():>8.3f} {a.min():>8.3f} {a.max():>8.3f}")
  return "\n".join(lines)


def plot_histograms(table: pa.Table, out_dir: str, prefix: str) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  paths = []
  for col in ("reward", "advantage"):
    values = np.asarray(table.column(col).to_numpy(zero_copy_only=False), np.float64)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.hist(values[np.isfinite(values)], bins=40)
    ax.set_xlabel(col)
    ax.set_ylabel("responses")
    ax.set_title(f"{prefix}: {col}")
    fig.tight_layout()
    path = os.path.join(out_dir, f"{prefix}_{col}_hist.png")
    fig.savefig(path)
    plt.close(fig)
    paths.append(path)
  return paths


def advantages_for_table(table: pa.Table, *, estimator: str, group_column: str,
                         reward_column: str, eps: float) -> pa.Table:
  """Adds group_id, group_mean, group_std and advantage columns computed with `estimator`."""
  import jax.numpy as jnp
  from grpo_jax import advantages as adv_lib
  for col in (group_column, reward_column):
    if col not in table.column_names:
      _fail(f"--{'group' if col == group_column else 'reward'}-column: no column {col!r} "
            f"(columns: {', '.join(table.column_names)})")
  keys = table.column(group_column).to_pylist()
  uniq = {k: i for i, k in enumerate(dict.fromkeys(keys))}
  gids = np.array([uniq[k] for k in keys], np.int32)
  rewards = _numbers(table, reward_column, "--reward-column")
  if not np.isfinite(rewards).all():
    bad = int(np.flatnonzero(~np.isfinite(rewards))[0])
    _fail(f"--reward-column: row {bad} has a non-finite reward {rewards[bad]}")
  kwargs = {}
  if estimator == "opo":
    for name in ("response_length", "length"):
      if name in table.column_names:
        kwargs["lengths"] = jnp.asarray(table.column(name).to_numpy(), jnp.float32)
        break
    else:
      _fail("--estimator opo: needs a response_length column")
  if estimator == "remax":
    if "baseline" not in table.column_names:
      _fail("--estimator remax: needs a baseline column (the reward of each prompt's greedy "
            "response)")
    kwargs["baseline"] = jnp.asarray(_numbers(table, "baseline", "--estimator remax"))
  num_groups = len(uniq)
  adv = adv_lib.compute_advantages(jnp.asarray(rewards), jnp.asarray(gids), num_groups,
                                   estimator=estimator, eps=eps, **kwargs)
  mean, std = adv_lib.per_sample_stats(jnp.asarray(rewards), jnp.asarray(gids), num_groups)
  for name, col in (("group_id", gids.astype(np.int64)), ("group_mean", np.asarray(mean)),
                    ("group_std", np.asarray(std)), ("advantage", np.asarray(adv))):
    if name in table.column_names and name != group_column:
      table = table.drop([name])
    if name == group_column:
      continue
    table = table.append_column(name, pa.array(col))
  if "reward" not in table.column_names:
    table = table.append_column("reward", pa.array(rewards))
  return table


class _OneLineParser(argparse.ArgumentParser):
  """Argument errors as one `error: ...` line (no usage block); `--help` shows the usage."""

  def error(self, message):
    self.exit(2, f"error: {message}\n")


def main(argv: list[str] | None = None) -> int:
  parser = _OneLineParser(prog="python -m grpo_jax.inspect", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("target", help="a run's workdir, or a Parquet file of rollouts")
  parser.add_argument("--step", type=int, default=None, help="exported step (default: latest)")
  parser.add_argument("--out", default=None, help="where PNGs go (default: beside the input)")
  parser.add_argument("--estimator", default="grpo", help="estimator for an external Parquet")
  parser.add_argument("--group-column", default="uid", help="group key column (external Parquet)")
  parser.add_argument("--reward-column", default="reward", help="reward column (external Parquet)")
  parser.add_argument("--eps", type=float, default=1e-6, help="eps of std-normalised estimators")
  args = parser.parse_args(argv)

  if os.path.isdir(args.target):
    from grpo_jax import export, metrics
    path = latest_export(args.target, args.step)
    table = _read(path, "WORKDIR")
    for col in ("group_id", "reward", "advantage"):
      if col not in table.column_names:
        _fail(f"WORKDIR: {path} has no {col!r} column (not an export of grpo_jax.train)")
    out_dir = _out_dir(args.out or export.export_dir(args.target))
    step = int(re.search(r"step_(\d+)", os.path.basename(path)).group(1))
    print(f"step {step}: {path}")
    print(summary(table))
    pngs = plot_histograms(table, out_dir, f"step_{step:06d}")
    mpath = os.path.join(args.target, "metrics.jsonl")
    if os.path.exists(mpath):
      pngs.append(metrics.plot_curves(metrics.read_metrics(mpath), ("reward/mean",),
                                      os.path.join(out_dir, "reward_curve.png"), "reward"))
  elif os.path.isfile(args.target):
    from grpo_jax import advantages as adv_lib
    if args.estimator not in adv_lib.ESTIMATORS:
      _fail(f"--estimator: unknown {args.estimator!r} (known: {', '.join(adv_lib.ESTIMATORS)})")
    if args.out:
      _out_dir(args.out)
    table = _read(args.target, "target")
    table = advantages_for_table(table, estimator=args.estimator, group_column=args.group_column,
                                 reward_column=args.reward_column, eps=args.eps)
    base = os.path.splitext(args.target)[0]
    out_path = f"{base}.advantages.parquet"
    from grpo_jax.export import write_parquet
    write_parquet(table, out_path)
    print(f"wrote {out_path} ({table.num_rows} rows, estimator {args.estimator})")
    out_dir = _out_dir(args.out or os.path.dirname(os.path.abspath(args.target)))
    print(summary(table))
    pngs = plot_histograms(table, out_dir, os.path.basename(base))
  else:
    _fail(f"target: {args.target!r} is neither a workdir nor a Parquet file")
  for p in pngs:
    print(f"wrote {p}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
