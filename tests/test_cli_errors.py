"""One clear line for every bad input (issue 16): through the real command lines of the trainer,
the inspection tool and the retriever server, each bad input gives a single `error: ...` line naming
the flag, field or file, a non-zero exit status, no traceback, and (for the trainer) nothing
compiled or written. Plus the retriever's HTTP handling of abusive requests.

Each case fails before any compile, so each subprocess costs only its imports.
"""

import json
import os
import socket
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_train import ROOT


def _model_dir(tmp, config_text, weights=True):
  d = tmp / "model"
  d.mkdir()
  (d / "config.json").write_text(config_text)
  if weights:
    (d / "model.safetensors").write_bytes(b"")
  return f"--config.model.path={d}"


def _jsonl(tmp, rows):
  path = tmp / "data_{split}.jsonl"
  for split in ("train", "test"):
    with open(str(path).replace("{split}", split), "w") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
  return f"--config.data.source=jsonl:{path}"


def _reward_module(tmp, body):
  (tmp / "bad_reward.py").write_text(body)
  return "--config.rewards=(('bad_reward:fn', 1.0, {}),)"


def _under_a_file(tmp):
  (tmp / "file").write_text("x")
  return str(tmp / "file" / "w")


# name -> (extra arguments (given the test's tmp folder), workdir or None, expected in the line)
TRAIN = {
    "missing_config_file": (lambda t: ["--config=configs/nope.py"], None,
                            "--config: no such file 'configs/nope.py'"),
    "unknown_variant": (lambda t: ["--config=configs/default.py:smok"], None,
                        "unknown variant 'smok'"),
    "typo_field": (lambda t: ["--config.rollout.gruop_size=4"], None,
                   "--config.rollout.gruop_size: config.rollout has no field 'gruop_size' "
                   "(did you mean 'group_size'?)"),
    "typo_section": (lambda t: ["--config.rolout.group_size=4"], None,
                     "config has no field 'rolout' (did you mean 'rollout'?)"),
    "bad_value_type": (lambda t: ["--config.rollout.group_size=abc"], None,
                       "--config.rollout.group_size=abc: invalid literal"),
    "unknown_flag": (lambda t: ["--bogus=1"], None, "Unknown command line flag 'bogus'"),
    "no_workdir": (lambda t: ["--workdir="], None, "--workdir: required"),
    "unknown_estimator": (lambda t: ["--config.rl.estimator=nope"], None,
                          "config.rl.estimator: unknown estimator 'nope'"),
    "group_size_1_with_std": (lambda t: ["--config.rollout.group_size=1"], None,
                              "config.rollout.group_size"),
    "lora_dropout": (lambda t: ["--config.lora.rank=4", "--config.lora.dropout=0.1"], None,
                     "config.lora.dropout: adapter dropout is not implemented"),
    "negative_nonfinite_limit": (lambda t: ["--config.train.max_nonfinite_steps=-1"], None,
                                 "config.train.max_nonfinite_steps: expected >= 0"),
    "max_new_tokens_beyond_positions": (
        lambda t: ["--config.rollout.max_new_tokens=5000"], None,
        "config.rollout.max_new_tokens: prompts of up to 32 tokens (data.length_buckets) + 5000 "
        "new tokens = 5032 positions, beyond the model's max_position_embeddings=4096"),
    "model_type_gpt2": (lambda t: [_model_dir(t, json.dumps({"model_type": "gpt2",
                                                             "n_embd": 64}))], None,
                        "config.model.path: "),
    "model_config_not_json": (lambda t: [_model_dir(t, "{not json")], None,
                              "config.model.path: "),
    "model_without_safetensors": (
        lambda t: [_model_dir(t, json.dumps({"model_type": "llama"}), weights=False)], None,
        "config.model.path: no *.safetensors weights in"),
    "model_path_missing": (lambda t: ["--config.model.path=/nonexistent/model"], None,
                           "config.model.path: expected 'tiny' or a folder with config.json"),
    "empty_tokenizer_folder": (lambda t: [f"--config.tokenizer={t}"], None,
                               "config.tokenizer: cannot load a tokenizer from"),
    "unknown_builtin_task": (lambda t: ["--config.data.source=builtin:nope"], None,
                             "config.data.source"),
    "jsonl_row_3_lacks_prompt": (
        lambda t: [_jsonl(t, [{"prompt": "a", "answer": "1"}] * 3 + [{"answer": "2"}])], None,
        "config.data.prompt_field: example 3 has no 'prompt'"),
    "missing_jsonl": (lambda t: ["--config.data.source=jsonl:/nonexistent/{split}.jsonl"], None,
                      "config.data.source: no file"),
    "reward_raises_at_import": (
        lambda t: [_reward_module(t, "raise RuntimeError('boom at import')\ndef fn(*a): pass\n")],
        None, "config.rewards: "),
    "reward_syntax_error": (lambda t: [_reward_module(t, "def fn(:\n")], None,
                            "config.rewards: "),
    "reward_unknown_name": (lambda t: ["--config.rewards=(('nope', 1.0, {}),)"], None,
                            "config.rewards"),
    "workdir_under_a_file": (lambda t: [], _under_a_file, "--workdir: "),
    "workdir_is_a_file": (lambda t: [], lambda t: (t / "f").write_text("x") and str(t / "f"),
                          "--workdir: "),
}


def _run(args, cwd=ROOT, extra_env=None, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.update(extra_env or {})
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _assert_one_line(proc, expected):
  out = proc.stdout + proc.stderr
  assert proc.returncode != 0, out
  assert "Traceback" not in out, out
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), out
  assert expected in lines[0], lines[0]


@pytest.fixture(scope="module")
def train_results(tmp_path_factory):
  """Every TRAIN case, run as concurrent subprocesses (their cost is imports, mostly waiting on
  the disk and the CPU): {case: (completed process, workdir)}."""
  started = {}
  pending = sorted(TRAIN)
  results = {}
  while pending or started:
    while pending and len(started) < 3:
      case = pending.pop()
      tmp = tmp_path_factory.mktemp(case)
      extra, workdir_of, _ = TRAIN[case]
      args = extra(tmp)
      workdir = workdir_of(tmp) if workdir_of else str(tmp / "w")
      if not any(a.startswith("--config=") for a in args):
        args = ["--config=configs/default.py:smoke", *args]
      if not any(a.startswith("--workdir") for a in args):
        args.append(f"--workdir={workdir}")
      env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{tmp}{os.pathsep}{ROOT}",
                 XLA_FLAGS="--xla_force_host_platform_device_count=1")
      started[case] = (subprocess.Popen([sys.executable, "-m", "grpo_jax.train", *args], cwd=ROOT,
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True), workdir)
    case = next(iter(started))
    proc, workdir = started.pop(case)
    out, err = proc.communicate(timeout=900)  # Generous: a loaded CI machine imports slowly.
    results[case] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), workdir)
  return results


@pytest.mark.parametrize("case", sorted(TRAIN))
def test_train_bad_input_is_one_line(case, train_results):
  proc, workdir = train_results[case]
  _assert_one_line(proc, TRAIN[case][2])
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # Nothing ran.


def _mount_read_only(path):
  if os.geteuid() != 0:
    return False
  os.makedirs(path, exist_ok=True)
  return subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                        capture_output=True).returncode == 0


def test_train_read_only_workdir_is_one_line(tmp_path):
  ro = tmp_path / "ro"
  if os.geteuid() != 0:
    ro.mkdir()
    ro.chmod(0o555)  # Enough for a user who is not root.
  elif not _mount_read_only(ro):
    pytest.skip("root without tmpfs: cannot make a read-only folder")
  try:
    proc = _run(["grpo_jax.train", "--config=configs/default.py:smoke", f"--workdir={ro}/w"])
    _assert_one_line(proc, f"--workdir: cannot write to '{ro}/w' (Read-only file system)"
                     if os.geteuid() == 0 else "--workdir: cannot write to")
  finally:
    if os.geteuid() == 0:
      subprocess.run(["umount", str(ro)], check=False)


# ------------------------------------------------------------------------------------------------
# python -m grpo_jax.inspect
# ------------------------------------------------------------------------------------------------


def _workdir_with_export(tmp, content):
  (tmp / "w" / "export").mkdir(parents=True)
  (tmp / "w" / "export" / "step_000002.parquet").write_bytes(content)
  return [str(tmp / "w")]


def _external(tmp, table, *flags):
  pq.write_table(table, tmp / "r.parquet")
  return [str(tmp / "r.parquet"), *flags]


ROLLOUTS = pa.table({"uid": ["a", "a", "b", "b"], "reward": [1.0, 0.0, 0.5, 0.2]})

INSPECT = {
    "truncated_parquet_in_workdir": (lambda t: _workdir_with_export(t, b"PAR1\x00\x01junk"),
                                     "is not a readable Parquet file"),
    "empty_parquet_in_workdir": (lambda t: _workdir_with_export(t, b""),
                                 "is not a readable Parquet file"),
    "empty_table": (lambda t: _external(t, ROLLOUTS.slice(0, 0)), "has no rows"),
    "string_rewards": (lambda t: _external(t, pa.table({"uid": ["a", "a"],
                                                         "reward": ["1", "0"]})),
                       "--reward-column: column 'reward' holds string, expected numbers"),
    "remax_without_baseline": (lambda t: _external(t, ROLLOUTS, "--estimator", "remax"),
                               "--estimator remax: needs a baseline column"),
    "opo_without_lengths": (lambda t: _external(t, ROLLOUTS, "--estimator", "opo"),
                            "--estimator opo: needs a response_length column"),
    "unknown_estimator": (lambda t: _external(t, ROLLOUTS, "--estimator", "nope"),
                          "--estimator: unknown 'nope'"),
    "missing_group_column": (lambda t: _external(t, ROLLOUTS, "--group-column", "gid"),
                             "--group-column: no column 'gid'"),
    "out_is_a_file": (lambda t: (t / "f").write_text("x") and _external(
        t, ROLLOUTS, "--out", str(t / "f")), "--out: "),
    "no_such_target": (lambda t: [str(t / "nothing")], "is neither a workdir nor a Parquet file"),
    "workdir_without_exports": (lambda t: (t / "w").mkdir() or [str(t / "w")],
                                "WORKDIR: no exported steps"),
    "bad_step_flag": (lambda t: _external(t, ROLLOUTS, "--step", "x"), "--step: invalid int"),
}


@pytest.mark.parametrize("case", sorted(INSPECT))
def test_inspect_bad_input_is_one_line(case, tmp_path):
  args, expected = INSPECT[case]
  _assert_one_line(_run(["grpo_jax.inspect", *args(tmp_path)]), expected)


# ------------------------------------------------------------------------------------------------
# python -m grpo_jax.retriever: arguments, then HTTP abuse of a running server
# ------------------------------------------------------------------------------------------------


def _corpus(tmp, text='{"id": 1, "contents": "Paris\\nThe capital of France."}\n'):
  (tmp / "c.jsonl").write_text(text)
  return f"--corpus={tmp / 'c.jsonl'}"


RETRIEVER = {
    "port_out_of_range": (lambda t: [_corpus(t), "--port=99999"],
                          "--port: expected 0..65535, got 99999"),
    "bad_host": (lambda t: [_corpus(t), "--host=no.such.host.invalid", "--port=0"],
                 "--host/--port: cannot listen on no.such.host.invalid:0"),
    "port_not_a_number": (lambda t: [_corpus(t), "--port=http"], "--port: invalid int value"),
    "missing_corpus": (lambda t: ["--corpus=/nonexistent.jsonl"], "--corpus: no such file"),
    "malformed_corpus": (lambda t: [_corpus(t, '{"id": 1, "contents": "a"}\n{oops\n')],
                         "c.jsonl:2: malformed JSON"),
    "topk_zero": (lambda t: [_corpus(t), "--topk=0"], "--topk: expected a positive int"),
}


@pytest.mark.parametrize("case", sorted(RETRIEVER))
def test_retriever_bad_argument_is_one_line(case, tmp_path):
  args, expected = RETRIEVER[case]
  _assert_one_line(_run(["grpo_jax.retriever", *args(tmp_path)], timeout=60), expected)


@pytest.fixture(scope="module")
def server():
  from grpo_jax import retriever
  with retriever.start_server([{"id": 1, "contents": "Paris\nThe capital of France."}]) as s:
    yield s


def _raw(server, request: bytes, timeout=10) -> str:
  """Sends raw bytes, returns the status line (or '' if the server closed without answering)."""
  host, port = server.server.server_address[:2]
  with socket.create_connection((host, port), timeout=timeout) as sock:
    sock.sendall(request)
    data = b""
    while b"\r\n" not in data:
      chunk = sock.recv(4096)
      if not chunk:
        break
      data += chunk
  return data.split(b"\r\n")[0].decode()


def _post(length_header: str, body: bytes = b"") -> bytes:
  return (f"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
          f"Content-Length: {length_header}\r\n\r\n").encode() + body


HTTP = {
    "non_numeric_content_length": (_post("abc"), "400"),
    "negative_content_length": (_post("-1"), "400"),  # Used to read until EOF: a thread held.
    "huge_content_length": (_post(str(10 ** 12)), "413"),
    "over_the_body_limit": (_post(str(9 << 20)), "413"),
    "deeply_nested_json": (_post(str(200_000), b"[" * 100_000 + b"]" * 100_000), "400"),
    "not_json": (_post("5", b"{oops"), "400"),
}


@pytest.mark.parametrize("case", sorted(HTTP))
def test_retriever_answers_abusive_requests(case, server):
  request, status = HTTP[case]
  assert _raw(server, request).split(" ")[1] == status
  # ... and keeps serving.
  body = json.dumps({"queries": ["capital of France"], "topk": 1}).encode()
  assert _raw(server, _post(str(len(body)), body)).split(" ")[1] == "200"
