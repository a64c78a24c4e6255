"""Search-R1 in the training loop: the tiny end-to-end config, and a retriever that is down."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest

from grpo_jax import train
from grpo_jax.config import load_config, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def load(*overrides):
  return load_config(f"{ROOT}/configs/search_r1_tiny.py", *overrides)


def test_tiny_search_run_end_to_end(tmp_path):
  cfg = resolve(load("--config.mesh.data=4", "--config.mesh.fsdp=2"), num_devices=8)
  train.preflight(cfg, str(tmp_path))
  train.run(cfg, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for key in ("search/turns", "search/searches_per_rollout", "search/valid_action_rate",
              "search/answer_rate", "search/retrieved_token_share", "search/prefill_tokens",
              "search/naive_prefill_tokens", "search/truncated_turn", "search/truncated_obs",
              "search/truncated_response", "time/retrieval_s"):
    assert all(key in r for r in rows), key
  # eval_every=2: steps 2 and 4 carry the evaluation.
  assert [r["step"] for r in rows if "eval/greedy_accuracy" in r] == [2, 4]
  # Rows that retrieved something show it in the export, and their masked tokens are counted.
  table = pq.read_table(tmp_path / "export" / "step_000004.parquet").to_pydict()
  assert "retrieved" in table and len(table["retrieved"]) == 16
  tokens = pq.read_table(tmp_path / "export" / "step_000004_tokens.parquet").to_pydict()
  info = np.asarray(tokens["info_mask"])
  loss = np.asarray(tokens["loss_mask"])
  assert np.all(loss[info == 1] == 0), "retrieved tokens must not count in the loss"
  share = np.mean([r["search/retrieved_token_share"] for r in rows])
  assert share > 0  # a random policy mostly gets the corrective observation: retrieved tokens


def test_retriever_down_stops_with_a_clear_error_and_checkpoint_intact(tmp_path):
  with socket.socket() as s:  # a port nobody listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run(
      [sys.executable, "-m", "grpo_jax.train", "--config=configs/search_r1_tiny.py",
       f"--workdir={tmp_path}", f"--config.search.url=http://127.0.0.1:{port}/retrieve",
       "--config.search.local_corpus=", "--config.search.max_retries=1",
       "--config.search.backoff_s=0.01", "--config.mesh.data=1"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  last = [l for l in proc.stderr.strip().splitlines() if l.strip()][-1]
  assert last.startswith("error: ") and f"127.0.0.1:{port}" in last, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
