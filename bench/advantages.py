"""Benchmark: jitted `grpo` advantages vs verl-style dict loops, NumPy bincount and a copy floor.

  python bench/advantages.py                # N in {1e4, 1e5, 1e6, 1e7}, G in {4, 16, 64}
  python bench/advantages.py --sizes 1e4,1e5 --loop-max 1e5 --repeats 5

For every (N, G): rewards uniform in [0, 1), ids = repeat(arange(N/G), G) shuffled. Timed, each as
the median of `--repeats` runs after one warm-up:
  contiguous  jax.jit(compute_advantages, group_size=G) on the trainer's own layout, ids =
              repeat(arange(N/G), G) unshuffled: row reductions of [N/G, G], no scatter.
  ours        jax.jit(compute_advantages) on the shuffled ids (segment reductions, scatters).
  verl_torch  verl's compute_grpo_outcome_advantage loop: scores grouped by uid in a Python dict,
              torch.mean / torch.std per group, then a Python loop over samples.
  verl_numpy  the same dict loop with NumPy.
  bincount    vectorised NumPy: np.bincount for count, sum, sum of squared deviations.
  copy        jitted x * 1 on the same bytes (the floor: one read + one write of [N] float32).
              XLA turns it into an HLO `copy` into a fresh output buffer (the input is not
              donated, so nothing can alias); the script checks the compiled text says so.
  before      with `--before REV`: the contiguous path of grpo_jax/advantages.py as it was at
              git revision REV, in the same process, to compare code versions under one load.
  --parts     also times the pieces of a two-pass kernel, interleaved with the copy: `read`
              jnp.sum of the rewards (one read of [N], nothing written), `stats` the std of
              group_stats (group_size=G: the statistics pass, [B] written), `output`
              ((r - a[g]) - b[g]) * c[g] from given [B] arrays (the output pass alone).
copy, contiguous and before are timed in interleaved rounds (a burst of 5 calls of each per
round), so a change of the machine's load hits all three alike and their ratios stay comparable.
The dict loops run only for N <= --loop-max (default 1e6: at 1e7 one run takes minutes).
Prints a Markdown table; the results in BENCHMARKS.md come from this script.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grpo_jax import advantages as adv_lib  # noqa: E402


def verl_torch(scores_np, index, eps=1e-6):
  import torch
  scores = torch.from_numpy(scores_np.copy())
  id2score = collections.defaultdict(list)
  id2mean, id2std = {}, {}
  bsz = scores.shape[0]
  for i in range(bsz):
    id2score[index[i]].append(scores[i])
  for idx in id2score:
    if len(id2score[idx]) == 1:
      id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
    else:
      t = torch.stack(id2score[idx])
      id2mean[idx], id2std[idx] = torch.mean(t), torch.std(t)
  for i in range(bsz):
    scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + eps)
  return scores.numpy()


def verl_numpy(scores, index, eps=1e-6):
  id2score = collections.defaultdict(list)
  id2mean, id2std = {}, {}
  for i in range(len(scores)):
    id2score[index[i]].append(scores[i])
  for idx, vals in id2score.items():
    if len(vals) == 1:
      id2mean[idx], id2std[idx] = 0.0, 1.0
    else:
      a = np.asarray(vals)
      id2mean[idx], id2std[idx] = a.mean(), a.std(ddof=1)
  out = np.empty_like(scores)
  for i in range(len(scores)):
    out[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + eps)
  return out


def numpy_bincount(scores, ids, num_groups, eps=1e-6):
  count = np.bincount(ids, minlength=num_groups).astype(np.float64)
  mean = np.bincount(ids, scores, minlength=num_groups) / np.maximum(count, 1)
  dev = scores - mean[ids]
  std = np.sqrt(np.bincount(ids, dev * dev, minlength=num_groups) / np.maximum(count - 1, 1))
  single = count[ids] <= 1
  return np.where(single, scores, dev) / (np.where(single, 1.0, std[ids]) + eps)


def _summary(times):
  # The minimum on a shared machine (other processes only ever add time); the median otherwise.
  return min(times) if os.environ.get("BENCH_MIN") else statistics.median(times)


def median_time(fn, repeats):
  fn()  # warm-up (compilation for the jitted ones)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return _summary(times)


def interleaved_times(fns, repeats, burst=5):
  """{name: time} of the callables over `repeats` rounds of `burst` back-to-back calls each.

  Rounds interleave the callables, so load from other processes hits them alike; calls within
  a burst run back to back, so each one finds its own buffers warm in cache, as a tight loop
  of one callable would (one call each per round left the copy's 4 MB output cold and timed
  the copy up to 2x slower, flattering every ratio to it).
  """
  for fn in fns.values():
    fn()  # warm-up (compilation)
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      for _ in range(burst):
        t = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t)
  return {name: _summary(ts) for name, ts in times.items()}


def load_module_at(rev):
  """grpo_jax/advantages.py as committed at git revision `rev`, imported under its own name."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  src = subprocess.run(["git", "-C", root, "show", f"{rev}:grpo_jax/advantages.py"], check=True,
                       capture_output=True, text=True).stdout
  path = os.path.join(tempfile.mkdtemp(), "advantages_before.py")
  with open(path, "w") as f:
    f.write(src)
  spec = importlib.util.spec_from_file_location("advantages_before", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="1e4,1e5,1e6,1e7")
  parser.add_argument("--groups", default="4,16,64")
  parser.add_argument("--loop-max", type=float, default=1e6)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--loop-repeats", type=int, default=3)
  parser.add_argument("--before", default=None,
                      help="git revision whose contiguous path to time alongside (same run)")
  parser.add_argument("--parts", action="store_true",
                      help="also time a read pass, the statistics pass and the output pass")
  args = parser.parse_args()
  sizes = [int(float(s)) for s in args.sizes.split(",")]
  group_sizes = [int(g) for g in args.groups.split(",")]

  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
  before_cols = f"before {args.before} (ms) | before / copy | " if args.before else ""
  print(f"| N | G | contiguous (ms) | contiguous / copy | {before_cols}shuffled ids (ms) "
        "| copy floor (ms) | shuffled / copy | bincount (ms) | verl dict numpy (ms) "
        "| verl dict torch (ms) | dict torch / shuffled |")
  print("|---|---|---|---|---|" + "---|---|" * bool(args.before) + "---|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  fn = jax.jit(adv_lib.compute_advantages, static_argnames=("num_groups", "estimator"))
  fn_rows = jax.jit(adv_lib.compute_advantages,
                    static_argnames=("num_groups", "estimator", "group_size"))
  copy = jax.jit(lambda x: x * 1.0)
  read = jax.jit(jnp.sum)
  stats = jax.jit(lambda r, ids, num_groups, group_size: adv_lib.group_stats(
      r, ids, num_groups, group_size=group_size)[1], static_argnames=("num_groups", "group_size"))
  output = jax.jit(lambda r, a, b, c: ((r.reshape(a.shape[0], -1) - a[:, None]) - b[:, None])
                   * c[:, None])
  before = load_module_at(args.before) if args.before else None
  fn_before = before and jax.jit(before.compute_advantages,
                                 static_argnames=("num_groups", "estimator", "group_size"))
  parts = []
  for n in sizes:
    for g in group_sizes:
      num_groups = n // g
      n_eff = num_groups * g
      ids = rng.permutation(np.repeat(np.arange(num_groups, dtype=np.int32), g))
      scores = rng.random(n_eff).astype(np.float32)
      r_dev, ids_dev = jax.device_put(scores), jax.device_put(ids)
      ours = median_time(lambda: fn(r_dev, ids_dev, num_groups=num_groups).block_until_ready(),
                         args.repeats)
      hlo = copy.lower(r_dev).compile().as_text()
      assert " copy(" in hlo, f"the copy floor no longer compiles to an HLO copy:\n{hlo}"
      ids_rows = jax.device_put(np.repeat(np.arange(num_groups, dtype=np.int32), g))
      timed = {
          "copy": lambda: copy(r_dev).block_until_ready(),
          "rows": lambda: fn_rows(r_dev, ids_rows, num_groups=num_groups,
                                  group_size=g).block_until_ready()}
      if before:
        timed["before"] = lambda: fn_before(r_dev, ids_rows, num_groups=num_groups,
                                            group_size=g).block_until_ready()
      if args.parts:
        rng_parts = np.random.default_rng(1)  # leaves `rng`, and so the timed data, as without
        a_B, b_B, c_B = (jax.device_put(rng_parts.random(num_groups).astype(np.float32))
                         for _ in range(3))
        timed["read"] = lambda: read(r_dev).block_until_ready()
        timed["stats"] = lambda: jax.block_until_ready(
            stats(r_dev, ids_rows, num_groups=num_groups, group_size=g))
        timed["output"] = lambda: output(r_dev, a_B, b_B, c_B).block_until_ready()
      t = interleaved_times(timed, args.repeats)
      floor, rows = t["copy"], t["rows"]
      if args.parts:
        parts.append(f"| {n_eff:.0e} | {g} | {rows * 1e3:.3f} | {floor * 1e3:.3f} | "
                     + " | ".join(f"{t[k] * 1e3:.3f} ({t[k] / floor:.1f}x)"
                                  for k in ("read", "stats", "output"))
                     + f" | {(t['read'] + t['output']) / floor:.1f}x |")
      before_vals = f"{t['before'] * 1e3:.3f} | {t['before'] / floor:.1f}x | " if before else ""
      np.testing.assert_allclose(
          np.asarray(fn_rows(r_dev, ids_rows, num_groups=num_groups, group_size=g)),
          np.asarray(fn(r_dev, ids_rows, num_groups=num_groups)), rtol=1e-5, atol=1e-5)
      binc = median_time(lambda: numpy_bincount(scores, ids, num_groups), args.repeats)
      got = np.asarray(fn(r_dev, ids_dev, num_groups=num_groups))
      np.testing.assert_allclose(got, numpy_bincount(scores, ids, num_groups), rtol=1e-4,
                                 atol=1e-4)
      if n_eff <= args.loop_max:
        index = ids.tolist()  # verl passes uids as a NumPy object array / list
        t_np = median_time(lambda: verl_numpy(scores, index), args.loop_repeats)
        t_torch = median_time(lambda: verl_torch(scores, index), args.loop_repeats)
        np.testing.assert_allclose(got, verl_torch(scores, index), rtol=1e-4, atol=1e-4)
        loops = f"{t_np * 1e3:.1f} | {t_torch * 1e3:.1f} | {t_torch / ours:.0f}x"
      else:
        loops = "not run | not run | -"
      print(f"| {n_eff:.0e} | {g} | {rows * 1e3:.3f} | {rows / floor:.1f}x | {before_vals}"
            f"{ours * 1e3:.3f} | "
            f"{floor * 1e3:.3f} | {ours / floor:.1f}x | "
            f"{binc * 1e3:.2f} | {loops} |", flush=True)
  if parts:
    print("\n| N | G | contiguous (ms) | copy (ms) | read pass (ms, x copy) | statistics pass "
          "(ms, x copy) | output pass (ms, x copy) | read + output, x copy |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(parts))


if __name__ == "__main__":
  main()
