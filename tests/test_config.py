"""Configs: every file in configs/ loads and resolves; bad configs fail with one clear line."""

import glob
import os
import subprocess
import sys

import pytest

from grpo_jax.config import ConfigError, load_config, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


load = load_config


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_loads_and_every_field_is_commented(path):
  config = load(path)
  run = resolve_without_files(config)
  assert run.rollout.group_size >= 1
  # Every assignment line of the default config carries a comment (its unit / meaning).
  if path.endswith("default.py"):
    src = open(path).read().splitlines()
    fields = [l for l in src if l.startswith("  c.") and "=" in l and "ConfigDict()" not in l]
    uncommented = [l for l in fields if "#" not in l]
    assert not uncommented, f"uncommented fields: {uncommented}"


def resolve_without_files(config):
  """Resolves a config whose model / data files may not exist on this machine."""
  try:
    return resolve(config, num_devices=1)
  except ConfigError as e:
    if "model.path" in str(e) or "tokenizer" in str(e):
      with config.unlocked():
        config.model.path = "tiny"
        config.tokenizer = ""
      return resolve(config, num_devices=1)
    raise


def test_lora_modules_to_save_checked_against_the_model():
  config = load(os.path.join(ROOT, "configs/default.py"), "--config.lora.rank=4",
                "--config.lora.modules_to_save=('final_norm', 'mlp_norm')")
  assert resolve(config, num_devices=1).lora.saved == ("final_norm", "mlp_norm")
  config = load(os.path.join(ROOT, "configs/default.py"), "--config.lora.rank=4",
                "--config.lora.modules_to_save=('q_norm',)")
  with pytest.raises(ConfigError, match="config.lora.modules_to_save: this model has no q_norm"):
    resolve(config, num_devices=1)


def test_rewards_can_be_set_on_the_command_line():
  config = load(os.path.join(ROOT, "configs/default.py"),
                "--config.rewards=(('digits', 0.5, {}), ('format', 0.1, {'tags': ('####',)}))")
  run = resolve(config, num_devices=1)
  assert [(name, weight) for name, weight, _ in run.rewards] == [("digits", 0.5), ("format", 0.1)]


def test_default_resolves_with_the_mesh():
  run = resolve(load(os.path.join(ROOT, "configs/default.py")), num_devices=8)
  assert run.rollout_batch == run.data.batch_size * run.rollout.group_size


BAD = [
    ("--config.rollout.group_size=0", "config.rollout.group_size"),
    ("--config.rollout.group_size=1", "config.rollout.group_size"),  # grpo divides by the std
    ("--config.rl.estimator=bogus", "config.rl.estimator"),
    ("--config.rl.clip_low=-0.1", "clip_low"),
    ("--config.train.minibatch_size=7", "config.train.minibatch_size"),
    ("--config.train.microbatch_size=5", "config.train.microbatch_size"),
    ("--config.mesh.data=3", "mesh"),
    ("--config.model.dtype=float16", "config.model.dtype"),
    ("--config.model.num_kv_heads=3", "config.model.num_kv_heads"),
    ("--config.model.path=/nonexistent/model", "config.model.path"),
    ("--config.data.source=jsonl:/nonexistent/data.jsonl", "/nonexistent/data.jsonl"),
    ("--config.rollout.top_p=1.5", "config.rollout.top_p"),
    ("--config.optim.decay=exponential", "config.optim.decay"),
    ("--config.rl.agg_mode=token-sum", "agg_mode"),
    ("--config.lora.modules_to_save=('embed',)", "config.lora.modules_to_save: 'embed' matches no"),
    ("--config.lora.rank=-2", "config.lora.rank"),
    ("--config.rewards=(('nonexistent_reward', 1.0, {}),)", "nonexistent_reward"),
]


@pytest.mark.parametrize("override,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_one_clear_line_and_writes_nothing(tmp_path, override, expected):
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(
      [sys.executable, "-m", "grpo_jax.train", "--config=configs/default.py",
       f"--workdir={workdir}", override],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
  assert expected in lines[-1], lines[-1]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert not workdir.exists(), "a bad config must not write anything"
