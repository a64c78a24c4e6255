"""Checkpoints: resumed == uninterrupted (bit for bit, across an epoch boundary), SIGKILL at any
moment resumes from the last complete checkpoint, a failing reward function keeps finished steps."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from grpo_jax import train
from grpo_jax.config import resolve
from grpo_jax.testing import datasets as test_datasets

from test_train import ROOT, load

pytestmark = pytest.mark.slow


def state_at(workdir, step=None):
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_names=("state", "data", "meta"))
  step = mngr.latest_step() if step is None else step
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                   data=ocp.args.JsonRestore()))
  mngr.close()
  return step, jax.tree.map(np.asarray, out["state"]), out["data"]


def data_seen(workdir):
  rows = {}
  for line in open(os.path.join(workdir, "data_seen.jsonl")):
    r = json.loads(line)
    rows[r["step"]] = r["index"]
  return [rows[k] for k in sorted(rows)]


def assert_trees_equal(a, b):
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
  assert tree_a == tree_b
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def tiny_jsonl(tmp_path_factory):
  """10 digits-task examples: with 4 prompts a step, an epoch ends inside step 3."""
  d = tmp_path_factory.mktemp("data")
  rows = [{"prompt": f"repeat the last digit: {a} {b} {c}", "answer": str(c)}
          for a, b, c in np.random.default_rng(0).integers(0, 10, (10, 3))]
  for split in ("train", "test"):
    test_datasets.write_jsonl(os.path.join(d, f"{split}.jsonl"), rows)
  return os.path.join(d, "{split}.jsonl")


def overrides(data):
  return (f"--config.data.source=jsonl:{data}", "--config.train.num_steps=5",
          "--config.train.checkpoint_every=100", "--config.train.eval_every=0",
          "--config.train.export_every=0", "--config.mesh.data=4", "--config.mesh.fsdp=2")


def test_resume_is_bit_identical_across_an_epoch_boundary(tmp_path, tiny_jsonl):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  cfg = resolve(load(*overrides(tiny_jsonl)), num_devices=8)
  train.run(cfg, str(straight))
  train.run(cfg, str(resumed), stop_after=3)  # Preempted after step 3 (the epoch ends in step 3).
  assert state_at(resumed)[0] == 3
  train.run(cfg, str(resumed))
  step_a, state_a, data_a = state_at(straight)
  step_b, state_b, data_b = state_at(resumed)
  assert step_a == step_b == 5
  assert_trees_equal(state_a, state_b)  # params, optimizer state, step, rng: bit for bit
  assert data_a == data_b
  seen = data_seen(straight)
  assert seen == data_seen(resumed)
  # The epoch boundary was crossed: some example is seen twice within 5 steps of 4 prompts.
  flat = [i for s in seen for i in s]
  assert len(set(flat)) == 10 and len(flat) == 20
  rows = [json.loads(l)["step"] for l in open(resumed / "metrics.jsonl")]
  assert rows == [1, 2, 3, 4, 5]


def test_failing_reward_keeps_finished_steps(tmp_path, tiny_jsonl, monkeypatch):
  from grpo_jax import rewards as rewards_lib
  calls = {"n": 0}
  real = rewards_lib.make_reward_fn

  def make(specs):
    fn = real(specs)

    def flaky(prompts, completions, examples):
      calls["n"] += 1
      if calls["n"] == 4:  # The 4th step's reward call fails.
        raise rewards_lib.RewardError("digits: boom")
      return fn(prompts, completions, examples)
    return flaky

  monkeypatch.setattr(rewards_lib, "make_reward_fn", make)
  cfg = resolve(load(*overrides(tiny_jsonl)), num_devices=8)
  with pytest.raises(rewards_lib.RewardError):
    train.run(cfg, str(tmp_path))
  step, _, data = state_at(tmp_path)
  assert step == 3  # the three finished steps are kept; step 4 will be redone with its batch
  monkeypatch.setattr(rewards_lib, "make_reward_fn", real)
  train.run(cfg, str(tmp_path))
  straight = tmp_path.parent / "straight_ref"
  train.run(cfg, str(straight))
  assert_trees_equal(state_at(tmp_path)[1], state_at(straight)[1])


def _launch(workdir, data, extra=()):
  # One device: a subprocess start costs compile time, and sharding is tested elsewhere.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  # Logs go to a file: a pipe nobody reads would fill up and block the child.
  log = open(f"{workdir}.log", "a")
  return subprocess.Popen(
      [sys.executable, "-m", "grpo_jax.train", "--config=configs/default.py:smoke",
       f"--workdir={workdir}", *overrides(data), "--config.train.num_steps=8",
       "--config.train.checkpoint_every=1", "--config.mesh.data=1", "--config.mesh.fsdp=1",
       *extra],
      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _tail(workdir):
  return open(f"{workdir}.log").read()[-3000:]


def test_sigkill_at_random_moments_resumes_to_the_uninterrupted_result(tmp_path, tiny_jsonl):
  reference = tmp_path / "reference"
  proc = _launch(reference, tiny_jsonl)
  assert proc.wait(timeout=300) == 0, _tail(reference)
  killed = tmp_path / "killed"
  rng = np.random.default_rng(0)
  kills = 0
  for attempt in range(3):
    proc = _launch(killed, tiny_jsonl)
    ckpt_dir = killed / "checkpoints"
    # Wait until the run is training (a checkpoint newer than the one it started from appears),
    # then kill it after a random delay: mid-step, or while an async save is being written.
    def finished():  # Orbax renames a checkpoint to its bare step number once it is complete.
      return {d for d in os.listdir(ckpt_dir) if d.isdigit()} if ckpt_dir.exists() else set()
    start_steps = finished()
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and not finished() - start_steps:
      time.sleep(0.02)
    if proc.poll() is not None:
      break
    # Kill after a random delay: mid-step, or while the next async save is being written.
    time.sleep(float(rng.uniform(0.0, 0.4)))
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      kills += 1
      # Whatever the moment, the latest listed checkpoint is complete and restores.
      step, state, _ = state_at(killed)
      assert 1 <= step <= 8 and int(state["step"]) == step
  assert kills >= 2
  proc = _launch(killed, tiny_jsonl)
  assert proc.wait(timeout=300) == 0, _tail(killed)
  assert_trees_equal(state_at(killed)[1], state_at(reference)[1])
  assert data_seen(killed) == data_seen(reference)
