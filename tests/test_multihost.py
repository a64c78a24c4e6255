"""Multi-host: two processes x 2 CPU devices (launch/local.sh, gloo) == one process x 4 devices.

The two-process runs are real: separate Python processes joined by `jax.distributed.initialize`,
each feeding its own half of every batch, their collectives going through gloo over localhost.
The one-process runs use 4 of this session's 8 devices in-process. What must agree: the final
parameters (float tolerance), every logged metric, the examples trained on; checkpoints written by
one layout resume in the other; and a process killed mid-run makes the other exit instead of
waiting forever.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from grpo_jax import distributed
from grpo_jax import train
from grpo_jax.config import load_config, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_SH = os.path.join(ROOT, "launch", "local.sh")
SMOKE = f"--config={ROOT}/configs/default.py:smoke"
# Compared as they are: wall-clock figures differ from run to run.
_TIMING = ("time/", "throughput/")
# Longer than one decode chunk (8 steps): the sampler's compaction runs between chunks, reading
# which rows are done from arrays that span both processes.
LONG = ("--config.rollout.max_new_tokens=12",)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def launch_2x2(workdir, *overrides, logdir, cache_dir, env=None, wait=True, config=SMOKE):
  """`launch/local.sh -n 2 -d 2` on `config` (the smoke config by default); returns the finished
  (or running) Popen."""
  # No persistent compilation cache (see tests/conftest.py): each process compiles for itself.
  del cache_dir
  full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
  proc = subprocess.Popen(
      ["bash", LOCAL_SH, "-n", "2", "-d", "2", "-l", str(logdir), "--", config,
       f"--workdir={workdir}", *overrides],
      env=full_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      start_new_session=True)  # its own process group: a failed test can end all of it
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=600)
  if proc.returncode != 0:
    logs = "".join(_tail(os.path.join(logdir, f"process_{i}.log")) for i in range(2))
    pytest.fail(f"launch/local.sh exited {proc.returncode}:\n{out}\n{logs}")
  return proc


def _tail(path, n=40):
  if not os.path.exists(path):
    return f"({path} missing)\n"
  with open(path, errors="replace") as f:
    lines = [l for l in f if not l.startswith(("I1", "W1"))]  # drop absl INFO/WARNING chatter
  return f"--- {path}\n" + "".join(lines[-n:])


def run_1x4(workdir, *overrides, config=SMOKE):
  """One process, 4 of the session's devices, parsed as `grpo_jax.train` parses flags."""
  devices = jax.devices()[:4]
  cfg = resolve(load_config(config.removeprefix("--config="), *overrides),
                num_devices=len(devices))
  train.preflight(cfg, str(workdir))
  return train.run(cfg, str(workdir), devices=devices)


def read_state(workdir, step):
  """The train state of checkpoint `step` as NumPy, whatever layout wrote it."""
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
  with ocp.StandardCheckpointer() as ckpt:
    meta = ckpt.metadata(path).item_metadata
    meta = getattr(meta, "tree", meta)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), meta,
                          is_leaf=is_leaf)
    return jax.tree.map(np.asarray, ckpt.restore(path, target))


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(l) for l in f]


def assert_same_params(a, b, what):
  flat_a = jax.tree_util.tree_flatten_with_path(a["params"])[0]
  flat_b = dict(jax.tree_util.tree_flatten_with_path(b["params"])[0])
  assert len(flat_a) == len(flat_b) > 0
  for path, x in flat_a:
    np.testing.assert_allclose(x, flat_b[path], rtol=2e-4, atol=2e-5,
                               err_msg=f"{what}: {jax.tree_util.keystr(path)}")
  assert int(a["step"]) == int(b["step"])


def assert_same_metrics(rows_a, rows_b, what, steps):
  by_step_a = {r["step"]: r for r in rows_a}
  by_step_b = {r["step"]: r for r in rows_b}
  for s in steps:
    ra, rb = by_step_a[s], by_step_b[s]
    keys = {k for k in ra if not k.startswith(_TIMING)}
    assert keys == {k for k in rb if not k.startswith(_TIMING)}, f"{what}: step {s} keys differ"
    for k in sorted(keys - {"step"}):
      np.testing.assert_allclose(ra[k], rb[k], rtol=1e-4, atol=1e-5,
                                 err_msg=f"{what}: step {s} metric {k}")


def assert_same_exports(wd_a, wd_b, names):
  """The export tables `names` of two workdirs hold the same rows (floats to tolerance)."""
  import pyarrow.parquet as pq
  for name in names:
    ta = pq.read_table(wd_a / "export" / name).to_pandas()
    tb = pq.read_table(wd_b / "export" / name).to_pandas()
    assert ta.shape == tb.shape, name
    for col in tb.columns:
      if tb[col].dtype.kind == "f":
        np.testing.assert_allclose(ta[col], tb[col], rtol=1e-4, atol=1e-5, err_msg=col)
      else:
        assert ta[col].tolist() == tb[col].tolist(), f"{name}: column {col}"


# ----------------------------------------------------------------------------------------------
# The environment contract (fast)
# ----------------------------------------------------------------------------------------------


def test_from_env_one_host_is_none():
  assert distributed.from_env({}) is None
  assert distributed.from_env({"GRPO_JAX_DISTRIBUTED": ""}) is None


def test_from_env_explicit_and_auto():
  cfg = distributed.from_env({
      "GRPO_JAX_COORDINATOR": "10.0.0.1:1234", "GRPO_JAX_NUM_PROCESSES": "4",
      "GRPO_JAX_PROCESS_ID": "3", "GRPO_JAX_HEARTBEAT_TIMEOUT_S": "10",
      "GRPO_JAX_LOCAL_DEVICE_IDS": "0,1"})
  assert cfg.initialize_kwargs() == {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
      "local_device_ids": [0, 1], "heartbeat_timeout_seconds": 10}
  auto = distributed.from_env({"GRPO_JAX_DISTRIBUTED": "auto", "GRPO_JAX_INIT_TIMEOUT_S": "60"})
  # Auto: JAX detects coordinator, ids and count itself (TPU metadata, SLURM_* variables).
  assert auto.initialize_kwargs() == {"initialization_timeout": 60}


@pytest.mark.parametrize("env, match", [
    ({"GRPO_JAX_COORDINATOR": "h:1"}, "GRPO_JAX_NUM_PROCESSES and GRPO_JAX_PROCESS_ID"),
    ({"GRPO_JAX_COORDINATOR": "h", "GRPO_JAX_NUM_PROCESSES": "2", "GRPO_JAX_PROCESS_ID": "0"},
     "GRPO_JAX_COORDINATOR: expected host:port"),
    ({"GRPO_JAX_COORDINATOR": "h:1", "GRPO_JAX_NUM_PROCESSES": "2", "GRPO_JAX_PROCESS_ID": "2"},
     "GRPO_JAX_PROCESS_ID: expected 0 <= id < GRPO_JAX_NUM_PROCESSES=2"),
    ({"GRPO_JAX_COORDINATOR": "h:1", "GRPO_JAX_NUM_PROCESSES": "two",
      "GRPO_JAX_PROCESS_ID": "0"}, "GRPO_JAX_NUM_PROCESSES: expected an integer"),
    ({"GRPO_JAX_DISTRIBUTED": "auto", "GRPO_JAX_HEARTBEAT_TIMEOUT_S": "0"},
     "GRPO_JAX_HEARTBEAT_TIMEOUT_S: expected an integer >= 1"),
    ({"GRPO_JAX_DISTRIBUTED": "slurm"}, "GRPO_JAX_DISTRIBUTED: expected auto"),
    ({"GRPO_JAX_DISTRIBUTED": "auto", "GRPO_JAX_LOCAL_DEVICE_IDS": "0;1"},
     "GRPO_JAX_LOCAL_DEVICE_IDS: expected comma-separated integers"),
])
def test_from_env_bad_values_name_the_variable(env, match):
  with pytest.raises(ValueError, match=match):
    distributed.from_env(env)
  with pytest.raises(SystemExit, match=match):  # what `python -m grpo_jax.train` prints
    distributed.initialize(env)


def test_local_sh_rejects_bad_counts():
  out = subprocess.run(["bash", LOCAL_SH, "-n", "0", "--", SMOKE], capture_output=True, text=True)
  assert out.returncode == 2 and "-n and -d: expected positive integers" in out.stderr


# ----------------------------------------------------------------------------------------------
# 2 processes x 2 devices == 1 process x 4 devices (slow: real multi-process runs)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The smoke config (4 steps; eval, export and checkpoints every 2; responses of up to 12
  tokens) in both layouts."""
  base = tmp_path_factory.mktemp("multihost")
  cache = base / "xla_cache"  # Later launches reuse the first one's compiled programs.
  wd22, wd14 = base / "wd_2x2", base / "wd_1x4"
  launch_2x2(wd22, *LONG, logdir=base / "logs_2x2", cache_dir=cache)
  run_1x4(wd14, *LONG)
  return {"base": base, "cache": cache, "2x2": wd22, "1x4": wd14}


@pytest.mark.slow
def test_two_processes_match_one_process(runs):
  wd22, wd14 = runs["2x2"], runs["1x4"]
  assert_same_params(read_state(wd22, 4), read_state(wd14, 4), "2x2 vs 1x4")
  rows22, rows14 = read_jsonl(wd22 / "metrics.jsonl"), read_jsonl(wd14 / "metrics.jsonl")
  assert [r["step"] for r in rows22] == [1, 2, 3, 4]  # once each: process 1 wrote none
  assert any("eval/greedy_accuracy" in r for r in rows22)
  assert_same_metrics(rows22, rows14, "2x2 vs 1x4", steps=[1, 2, 3, 4])


@pytest.mark.slow
def test_only_process_zero_writes_logs_and_exports(runs):
  wd22, wd14 = runs["2x2"], runs["1x4"]
  # tensorboardX names its event file after the writing process: two writers, two files.
  assert len(list((wd22 / "tensorboard").glob("events.out.tfevents.*"))) == 1
  assert (wd22 / "reward_curve.png").stat().st_size > 1000
  assert (wd22 / "config.json").exists()
  assert not list(wd22.glob("**/*.tmp*")), "a half-written file was left behind"
  # The export gathers every host's rows: the same table as the one-process run.
  assert_same_exports(wd22, wd14, ("step_000002.parquet", "step_000004_tokens.parquet"))
  # Both processes took part in every checkpoint (Orbax commits only when all have written).
  assert sorted(os.listdir(wd22 / "checkpoints")) == ["2", "4"]


@pytest.mark.slow
def test_data_seen_lists_every_host_examples(runs):
  seen22 = read_jsonl(runs["2x2"] / "data_seen.jsonl")
  seen14 = read_jsonl(runs["1x4"] / "data_seen.jsonl")
  assert seen22 == seen14


@pytest.mark.slow
def test_resume_across_layouts(runs):
  """Checkpoint 2 of each layout, resumed by the other, ends where the uninterrupted run ended."""
  base, wd14 = runs["base"], runs["1x4"]
  final14 = read_state(wd14, 4)
  rows14 = read_jsonl(wd14 / "metrics.jsonl")
  # Eval and export do not touch the train state or the data order; skipping them saves compiles.
  quick = (*LONG, "--config.train.eval_every=0", "--config.train.export_every=0")
  for writer, resumer in (("2x2", "1x4"), ("1x4", "2x2")):
    wd = base / f"resume_{writer}_by_{resumer}"
    shutil.copytree(runs[writer], wd)
    shutil.rmtree(wd / "checkpoints" / "4")  # as if the writer had been preempted after step 2
    if resumer == "1x4":
      run_1x4(wd, *quick)
    else:
      launch_2x2(wd, *quick, logdir=base / f"logs_{wd.name}", cache_dir=runs["cache"])
    what = f"written by {writer}, resumed by {resumer}"
    assert_same_params(read_state(wd, 4), final14, what)
    rows = read_jsonl(wd / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4], what
    # Steps 3-4 have no eval figures here; the rest must match the uninterrupted run.
    no_eval = lambda rs: [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in rs]
    assert_same_metrics(no_eval(rows), no_eval(rows14), what, steps=[3, 4])


# ----------------------------------------------------------------------------------------------
# Search-R1 rollouts: each process drives its own rows (and retrieval calls)
# ----------------------------------------------------------------------------------------------

SEARCH = f"--config={ROOT}/configs/search_r1_tiny.py"


@pytest.mark.slow
def test_search_two_processes_match_one_process(tmp_path):
  """configs/search_r1_tiny.py, 2 steps (eval, export, checkpoint at step 2): 2 processes x 2
  devices, each with its own BM25 server and its own half of the rows, against 1 x 4. Responses
  untrimmed: trimming is one global computation whatever the layout (tested on the 8-device mesh
  in tests/test_update.py), and its branches would double what both runs compile."""
  quick = ("--config.train.num_steps=2", "--config.train.trim_responses=false")
  wd22, wd14 = tmp_path / "search_2x2", tmp_path / "search_1x4"
  launch_2x2(wd22, *quick, logdir=tmp_path / "logs", cache_dir=None, config=SEARCH)
  run_1x4(wd14, *quick, config=SEARCH)
  assert_same_params(read_state(wd22, 2), read_state(wd14, 2), "search 2x2 vs 1x4")
  rows22, rows14 = read_jsonl(wd22 / "metrics.jsonl"), read_jsonl(wd14 / "metrics.jsonl")
  assert [r["step"] for r in rows22] == [1, 2]
  assert_same_metrics(rows22, rows14, "search 2x2 vs 1x4", steps=[1, 2])
  for key in ("search/turns", "search/retrieved_token_share", "search/truncated_obs",
              "eval/greedy_accuracy", "time/retrieval_s"):
    assert key in rows22[-1], key
  assert rows22[-1]["search/searches_per_rollout"] + rows22[-1]["search/valid_action_rate"] > 0
  import pyarrow.parquet as pq
  # Texts, retrieved text and masks of every process's rows, in batch order.
  assert_same_exports(wd22, wd14, ("step_000002.parquet", "step_000002_tokens.parquet"))
  assert "retrieved" in pq.read_table(wd22 / "export" / "step_000002.parquet").column_names


# ----------------------------------------------------------------------------------------------
# A dead process
# ----------------------------------------------------------------------------------------------

# What a survivor's log says when its peer is gone: gloo sees the closed socket at once; the
# coordination service names the task whose heartbeats stopped.
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "heartbeat timeout",
              "another task died", "tasks are unhealthy")


@pytest.mark.slow
def test_killed_process_makes_the_other_exit(runs, tmp_path):
  logdir = tmp_path / "logs"
  proc = launch_2x2(
      tmp_path / "wd", "--config.train.num_steps=1000", "--config.train.eval_every=0",
      "--config.train.export_every=0", "--config.train.checkpoint_every=0", logdir=logdir,
      cache_dir=runs["cache"], env={"GRPO_JAX_HEARTBEAT_TIMEOUT_S": "10"}, wait=False)
  try:
    metrics = tmp_path / "wd" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.stat().st_size) and proc.poll() is None:
      assert time.monotonic() < deadline, "the two-process run never logged a step"
      time.sleep(0.5)
    assert proc.poll() is None, "the run ended before it could be killed"
    victim = int((logdir / "process_1.pid").read_text())
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    # Without failure detection process 0 would wait in its next collective forever.
    out, _ = proc.communicate(timeout=90)
    waited = time.monotonic() - killed_at
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both processes it started
  assert proc.returncode != 0
  log0 = (logdir / "process_0.log").read_text(errors="replace")
  assert any(s in log0 for s in _PEER_GONE), _tail(logdir / "process_0.log")
  assert "process 0" in out and "process 1" in out, out  # the launcher names who failed
  print(f"survivor exited {waited:.1f} s after its peer was killed")


def test_peer_failure_message_only_for_lost_peers():
  lost = jax.errors.JaxRuntimeError(
      "INTERNAL: Gloo all-reduce failed: [pair.cc:538] Read error [127.0.0.1]:1: Connection reset "
      "by peer")
  msg = distributed.peer_failure_message(lost, process_index=0, process_count=2)
  assert msg.startswith("process 0 of 2: another process of this run died")
  assert "Connection reset by peer" in msg and "\n" not in msg
  assert distributed.peer_failure_message(lost, process_index=0, process_count=1) is None
  other = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory")
  assert distributed.peer_failure_message(other, process_index=0, process_count=2) is None
  assert distributed.peer_failure_message(ValueError("Gloo"), process_index=0,
                                          process_count=2) is None
