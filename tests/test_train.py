"""The training loop end to end: learning, sharding invariance, metrics, export, checkpoints, resume."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest

from grpo_jax import advantages as adv_lib
from grpo_jax import checkpoint as ckpt_lib
from grpo_jax import train
from grpo_jax.config import ConfigError, load_config, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(*overrides, arg="smoke"):
  """The default config with command-line style overrides, parsed as `grpo_jax.train` does."""
  return load_config(f"{ROOT}/configs/default.py" + (f":{arg}" if arg else ""), *overrides)


def run_in(workdir, *overrides, devices=None, arg="smoke"):
  """Runs the default config (variant `arg`) with overrides in `workdir`."""
  devices = devices or jax.devices()
  cfg = resolve(load(*overrides, arg=arg), num_devices=len(devices))
  train.preflight(cfg, str(workdir))
  return train.run(cfg, str(workdir), devices=devices), cfg


def final_state(workdir, cfg=None):
  """(step, state as NumPy) of the latest checkpoint in `workdir`."""
  import orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_names=("state", "data", "meta"))
  step = mngr.latest_step()
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mngr.close()
  return step, jax.tree.map(np.asarray, out["state"])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """One smoke run of the default config on 8 devices (data 2 x fsdp 2 x tensor 2), shared."""
  workdir = tmp_path_factory.mktemp("smoke8")
  last, cfg = run_in(workdir, "--config.mesh.data=2", "--config.mesh.fsdp=2",
                     "--config.mesh.tensor=2")
  return workdir, last, cfg


def test_smoke_run_writes_metrics_tensorboard_export_and_checkpoints(smoke_run):
  workdir, last, cfg = smoke_run
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows] == list(range(1, cfg.train.num_steps + 1))
  for key in ("reward/mean", "reward/std", "advantage/mean", "groups/zero_spread_frac",
              "update/grad_norm", "update/clip_frac_low", "entropy", "response/length_mean",
              "response/truncated_frac", "optim/learning_rate", "time/rollout_s",
              "time/update_s", "throughput/tokens_per_s", "eval/greedy_accuracy"):
    assert any(key in r for r in rows), key
  events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert events
  assert (workdir / "reward_curve.png").stat().st_size > 1000
  assert (workdir / "config.json").exists()


def test_tensorboard_events_parse(smoke_run):
  workdir, _, _ = smoke_run
  from tensorboardX.proto import event_pb2
  import struct
  path = next((workdir / "tensorboard").glob("events.out.tfevents.*"))
  data = path.read_bytes()
  tags, off = set(), 0
  while off < len(data):
    (length,) = struct.unpack("<Q", data[off:off + 8])
    event = event_pb2.Event.FromString(data[off + 12:off + 12 + length])
    off += 12 + length + 4
    for v in event.summary.value:
      tags.add(v.tag)
  assert "reward/mean" in tags and "update/grad_norm" in tags


def test_export_matches_compute_advantages(smoke_run):
  workdir, _, cfg = smoke_run
  path = workdir / "export" / "step_000002.parquet"
  table = pq.read_table(path).to_pydict()
  n = cfg.rollout_batch
  assert len(table["advantage"]) == n
  rewards = np.asarray(table["reward"], np.float32)
  gids = np.asarray(table["group_id"], np.int32)
  expected = adv_lib.compute_advantages(rewards, gids, cfg.data.batch_size, estimator="grpo",
                                        eps=cfg.rl.adv_eps)
  np.testing.assert_allclose(table["advantage"], expected, rtol=1e-5, atol=1e-6)
  assert table["index_in_group"][: cfg.rollout.group_size] == list(range(cfg.rollout.group_size))
  tokens = pq.read_table(workdir / "export" / "step_000002_tokens.parquet").to_pydict()
  assert set(tokens["group_id"]) <= {0, 1} and len(tokens["ratio"]) > 0
  assert all(np.isfinite(tokens["new_logp"]))


def test_inspect_on_workdir_and_external_parquet(smoke_run, tmp_path, capsys):
  from grpo_jax import inspect as inspect_cli
  workdir, _, cfg = smoke_run
  assert inspect_cli.main([str(workdir), "--out", str(tmp_path / "png")]) == 0
  assert (tmp_path / "png" / "step_000004_advantage_hist.png").exists()
  assert (tmp_path / "png" / "reward_curve.png").exists()
  # External rollouts: a verl-style dump with a uid column.
  import pyarrow as pa
  ext = tmp_path / "rollouts.parquet"
  pq.write_table(pa.table({"uid": ["a", "a", "b", "b", "b"], "reward": [1.0, 0.0, 0.5, 0.5, 2.0],
                           "response": ["x"] * 5}), ext)
  assert inspect_cli.main([str(ext), "--estimator", "rloo"]) == 0
  out = pq.read_table(tmp_path / "rollouts.advantages.parquet").to_pydict()
  np.testing.assert_allclose(out["advantage"], [1.0, -1.0, -0.75, -0.75, 1.5], atol=1e-6)


def test_resume_continues_without_redoing_steps(smoke_run):
  workdir, _, _ = smoke_run
  # Pointing the same config at a finished workdir resumes at the last step: nothing to do.
  last, cfg = run_in(workdir, "--config.mesh.data=2", "--config.mesh.fsdp=2",
                     "--config.mesh.tensor=2")
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows] == list(range(1, cfg.train.num_steps + 1))


def test_checkpoint_of_another_model_is_a_clear_error(smoke_run):
  workdir, _, _ = smoke_run
  with pytest.raises(ConfigError, match="config.model.hidden_size"):
    run_in(workdir, "--config.model.hidden_size=32", "--config.mesh.data=2",
           "--config.mesh.fsdp=2", "--config.mesh.tensor=2")


@pytest.mark.slow
def test_sharded_run_matches_single_device(smoke_run, tmp_path):
  workdir8, _, cfg = smoke_run
  run_in(tmp_path, "--config.mesh.data=1", devices=jax.devices()[:1])
  s8 = final_state(workdir8, cfg)[1]
  s1 = final_state(tmp_path, cfg)[1]
  m8 = [json.loads(l) for l in open(workdir8 / "metrics.jsonl")]
  m1 = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  np.testing.assert_allclose([r["reward/mean"] for r in m8], [r["reward/mean"] for r in m1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
               s8["params"], s1["params"])


@pytest.mark.slow
def test_lora_learns_the_default_task_from_a_pretrained_base(tmp_path):
  """The LoRA workflow end to end, and that it learns: an HF checkpoint in (a tiny "pretrained"
  base that knows the format, mostly repeats the wrong digit and samples the right one now and
  then: greedy accuracy about 0.39, pass@4 0.79), adapters plus the final norm trained with GRPO
  and a KL to the adapters-off base, only those checkpointed, PEFT adapters out. The curves of
  full fine-tuning and adapters without the norm from the same base: BENCHMARKS.md, "LoRA learning"."""
  from grpo_jax.testing.pretrain import pretrain_digits_base
  base = pretrain_digits_base(tmp_path / "base", mix={"first": 0.45, "last": 0.3}, steps=300)
  lora = tmp_path / "lora"
  last, _ = run_in(lora, f"--config.model.path={base}", "--config.lora.rank=8",
                   "--config.lora.modules_to_save=('final_norm',)",
                   "--config.optim.learning_rate=1e-2", "--config.train.num_steps=100",
                   "--config.train.eval_every=100", "--config.train.eval_num_prompts=64",
                   "--config.train.export_every=0", "--config.train.checkpoint_every=50",
                   "--config.train.final_export=peft", "--config.rl.kl_coef=0.01", arg="")
  rewards = [json.loads(l)["reward/mean"] for l in open(lora / "metrics.jsonl")]
  assert len(rewards) == 100
  # B = 0 at the start: the base's own rewards (format right, digit right about one time in four).
  # Seen: 0.58-0.63 at the start, 0.94-1.00 over the last 10 steps (the base's numerics, hence
  # its curve, differ between 1 and 8 host devices).
  assert 0.5 <= np.mean(rewards[:3]) <= 0.75, rewards[:3]
  assert np.mean(rewards[-10:]) >= 0.85, (
      f"LoRA no longer learns the digits task from the pretrained base: last rewards "
      f"{rewards[-10:]}; see BENCHMARKS.md 'LoRA learning' for the expected curve")
  assert last["eval/greedy_accuracy"] >= 0.9  # the base: about 0.39
  # Only the adapters and the final norm's copy (and their optimizer state) are checkpointed.
  step, state = final_state(lora, None)
  assert step == 100
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state["params"])[0]]
  assert names and all(n.startswith("['lora']") for n in names), names
  assert any("final_norm" in n for n in names)
  peft_cfg = json.load(open(lora / "peft_export" / "adapter_config.json"))
  assert peft_cfg["modules_to_save"] == ["model.norm"] and peft_cfg["r"] == 8
  assert peft_cfg["base_model_name_or_path"] == os.path.abspath(base)


@pytest.mark.slow
def test_default_config_learns(tmp_path):
  """The README's main command, shortened: mean reward rises by a clear margin (README numbers:
  0.01 at step 1, 0.92 at step 100)."""
  last, cfg = run_in(tmp_path, "--config.train.num_steps=100", "--config.train.eval_every=100",
                     "--config.train.export_every=0", "--config.train.checkpoint_every=0",
                     "--config.train.progress_bar=False", arg="")
  rewards = [json.loads(l)["reward/mean"] for l in open(tmp_path / "metrics.jsonl")]
  assert np.mean(rewards[:5]) < 0.1, rewards[:5]
  assert np.mean(rewards[-10:]) > 0.6, (
      f"the default config no longer learns: last rewards {rewards[-10:]}; check the digits task "
      f"reward, the loss sign and the learning rate")
  assert last["eval/greedy_accuracy"] > 0.5


def test_off_policy_epochs_minibatches_kl_filtering_and_overlong(tmp_path):
  """Every optional part of the update on at once: 2 PPO epochs of 2 minibatches of 2
  micro-batches, KL to a copied reference, DAPO group filtering, overlong penalty, entropy bonus."""
  last, cfg = run_in(tmp_path, "--config.train.num_steps=2", "--config.train.eval_every=0",
                     "--config.train.export_every=2", "--config.train.ppo_epochs=2",
                     "--config.train.minibatch_size=8", "--config.train.microbatch_size=4",
                     "--config.rl.kl_coef=0.05", "--config.rl.filter_zero_std_groups=True",
                     "--config.rl.overlong_buffer=2", "--config.rl.entropy_coef=0.01",
                     "--config.optim.learning_rate=0.05", "--config.mesh.data=4",
                     devices=jax.devices()[:4])
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert all(np.isfinite(r["update/loss"]) for r in rows)
  assert all("kl" in r and "reward/overlong" in r for r in rows)
  # Off-policy: after the first minibatch the policy has moved, so ratios leave 1.
  assert max(r["update/ratio_max"] for r in rows) > 1.0
  assert rows[-1]["update/skipped_update"] == 0.0
  table = pq.read_table(tmp_path / "export" / "step_000002.parquet").to_pydict()
  assert max(table["reward/overlong"]) <= 0.0 and min(table["reward/overlong"]) >= -1.0


def test_trimmed_update_trains_as_untrimmed(tmp_path, monkeypatch):
  """Responses that stop early (every digit is a stop string: lengths spread over 1..32): the
  update and old / reference forwards in micro-batches trimmed to their responses' lengths
  (`train.trim_responses`, the default), each group's responses packed into one row where they
  fit (`train.pack_responses`, the default), leave the parameters and metrics of the update at
  full length. One rollout of 4 prompts x G = 2, 2 epochs x 2 minibatches x 2 micro-batches of one
  group (off-policy ratios, KL to the reference)."""
  digits = "(" + ",".join(f"'{d}'" for d in range(10)) + ")"
  common = ("--config.train.num_steps=1", "--config.train.eval_every=0",
            "--config.train.export_every=0", "--config.rollout.max_new_tokens=32",
            f"--config.rollout.stop_strings={digits}", "--config.train.ppo_epochs=2",
            "--config.rollout.group_size=2", "--config.train.minibatch_size=4",
            "--config.train.microbatch_size=2", "--config.rl.kl_coef=0.05",
            "--config.optim.learning_rate=0.05")
  from grpo_jax import update
  packed_rows = []  # The packed lengths compiled into the run's update and old / ref forwards.
  real = update._packed_logprobs
  monkeypatch.setattr(update, "_packed_logprobs",
                      lambda *a: packed_rows.append(a[7]) or real(*a))
  got, cfg = run_in(tmp_path / "trimmed", *common, devices=jax.devices()[:1])
  assert packed_rows and max(packed_rows) < 2 * 32, packed_rows
  want, _ = run_in(tmp_path / "full", *common, "--config.train.trim_responses=False",
                   devices=jax.devices()[:1])
  assert cfg.train.trim_responses
  # Lengths spread below the budget: micro-batches land in different buckets (16 and 32).
  assert 4 < got["response/length_mean"] < 24 and got["response/truncated_frac"] < 0.5, got
  assert got["update/ratio_max"] > 1.0  # off-policy: the old log-probs matter
  for key in want:
    if not key.startswith(("time/", "throughput/")):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6, err_msg=key)
  (_, trimmed), (_, full) = final_state(tmp_path / "trimmed"), final_state(tmp_path / "full")
  for a, b in zip(jax.tree.leaves(trimmed["params"]), jax.tree.leaves(full["params"])):
    # 4 Adam steps of lr 0.05: Adam divides by sqrt(v), so a coordinate with a small gradient
    # carries its float rounding (packed attention sums in another order) into the step.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)


def test_non_finite_step_is_skipped_and_counted():
  """A NaN advantage makes the loss non-finite: params and optimizer state stay, `skipped` counts."""
  import optax
  from flax import nnx
  from grpo_jax import losses, models, update
  from grpo_jax.config import RLConfig
  cfg = models.ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                           num_heads=2, num_kv_heads=1, head_dim=8)
  graphdef, params = nnx.split(models.Decoder(cfg, rngs=nnx.Rngs(0)))
  tx = optax.adam(1e-2)
  state = update.TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                            rng=jax.random.PRNGKey(0), skipped=jnp.zeros((), jnp.int32))
  batch = {"tokens": jnp.ones((4, 6), jnp.int32), "attn_mask": jnp.ones((4, 6), jnp.int32),
           "loss_mask": jnp.ones((4, 3)), "kl_mask": jnp.ones((4, 3)),
           "advantages": jnp.array([1.0, -1.0, 0.5, jnp.nan])}
  step = jax.jit(lambda s, b: update.train_step(s, b, graphdef=graphdef, tx=tx, rl=RLConfig(),
                                                response_len=3, num_micro=2, temperature=1.0))
  new, metrics = step(state, batch)
  assert int(new.skipped) == 1 and float(metrics["skipped_update"]) == 1.0
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new.params, state.params)
  batch["advantages"] = jnp.array([1.0, -1.0, 0.5, 0.0])
  new, metrics = step(state, batch)
  assert int(new.skipped) == 0
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new.params),
                                                      jax.tree.leaves(state.params)))


@pytest.mark.slow
def test_tokenizer_without_a_pad_token_trains(tmp_path):
  """Llama 3's tokenizer has no pad token: the sampler pads with EOS, as the data pipeline does."""
  import shutil
  from grpo_jax.testing.tokenizer import default_tokenizer_dir
  tok_dir = tmp_path / "tokenizer"
  shutil.copytree(default_tokenizer_dir(), tok_dir)
  tok_cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
  del tok_cfg["pad_token"]
  (tok_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
  last, _ = run_in(tmp_path / "run", f"--config.tokenizer={tok_dir}", "--config.train.num_steps=1",
                   "--config.train.eval_every=0", devices=jax.devices()[:1])
  assert np.isfinite(last["reward/mean"])


def test_opo_lengths_exclude_retrieved_tokens():
  """OPO weighs rows by the tokens the policy generated, not the retrieved text in between."""
  G, R = 4, 6
  mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0],
                   [1, 1, 0, 0, 0, 0]], np.int32)
  info = np.zeros((G, R), np.int32)
  info[0, 1:5] = 1  # row 0: 2 generated tokens around 4 retrieved ones
  info[2, 2:4] = 1
  rewards = jnp.asarray([1.0, 0.0, 0.5, 0.2], jnp.float32)
  kw = dict(group_size=G, num_groups=1, adv_eps=1e-6, filter_zero_std=False,
            kl_on_filtered=False)
  batch, _ = train.assemble_batch(jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3), jnp.int32),
                                  jnp.ones((G, R), jnp.int32), jnp.asarray(mask),
                                  jnp.asarray(info), rewards, estimator="opo", **kw)
  gids = jnp.zeros((G,), jnp.int32)
  want = adv_lib.compute_advantages(rewards, gids, 1, estimator="opo", eps=1e-6, group_size=G,
                                    lengths=jnp.asarray([2.0, 3.0, 3.0, 2.0]))
  np.testing.assert_allclose(batch["advantages"], want, rtol=1e-6)
