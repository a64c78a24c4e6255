r"""Where the time of one grpo_jax GRPO step goes, recompiles, host syncs: the `vs_trl` setting.

  python bench/profile_step.py                       # B=4, G=8, P=32, R=32, 4-layer E=256 model
  python bench/profile_step.py --trace-dir /tmp/tr   # keep the trace (TensorBoard / Perfetto)

Same model, prompts, reward and RunConfig as `bench/vs_trl.py` (its helpers are reused), one CPU
device. It reports:

  * compiles per step: a `jax.monitoring` listener counts backend compiles (and `jax_log_compiles`
    names them) during each of `--steps` steps; after the first step there must be none;
  * host syncs: the update (`Steps.train_step` + `finish_step`) runs under
    `jax.transfer_guard("disallow")`, so any implicit host<->device transfer inside it raises;
    the rollout and assembly calls are tried under the guard as well and the result is reported;
  * the time of each jitted piece on its own (median of `--reps` after a warm-up, blocked):
    generate, assemble, train_step, and inside the update: the forward (log-probs + entropy),
    forward + backward (`value_and_grad(loss_fn)`), and the optimizer (AdamW + clip) alone;
  * a `jax.profiler` trace of one whole step (Perfetto JSON), summarised: device time per XLA
    op kind (fusion, dot/convolution, while, copy, ...) and the top ops.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vs_trl  # noqa: E402  (bench/vs_trl.py: shared model, prompts, reward, config)


class CompileCounter:
  """Counts XLA backend compiles (jax.monitoring) and keeps the names jax_log_compiles prints."""

  def __init__(self):
    import jax
    self.count = 0
    self.names: list[str] = []
    jax.monitoring.register_event_duration_secs_listener(self._on_event)
    jax.config.update("jax_log_compiles", True)
    handler = logging.Handler()
    handler.emit = self._on_log
    logging.getLogger("jax").addHandler(handler)

  def _on_event(self, event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1

  def _on_log(self, record):
    m = re.search(r"Compiling (\S+)", record.getMessage())
    if m:
      self.names.append(m.group(1))

  def take(self):
    out = (self.count, list(self.names))
    self.count, self.names = 0, []
    return out


def _median_time(fn, reps: int) -> float:
  import jax
  jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def summarise_trace(trace_dir: str, top: int = 12) -> dict:
  """Aggregates the Perfetto trace's complete events by name (and by XLA op kind)."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    return {"error": f"no *.trace.json.gz under {trace_dir}"}
  with gzip.open(files[0], "rt") as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  threads = {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  by_name = collections.Counter()
  by_thread = collections.Counter()
  for e in events:
    if e.get("ph") != "X":
      continue
    dur = e.get("dur", 0) / 1e3  # ms
    by_name[e["name"]] += dur
    by_thread[threads.get((e["pid"], e["tid"]), str(e["tid"]))] += dur
  kinds = collections.Counter()
  for name, ms in by_name.items():
    base = re.sub(r"[._]\d+$", "", name.split(":")[0]).split(".")[0]
    kinds[base] += ms
  return {"file": files[0], "top_events_ms": by_name.most_common(top),
          "top_kinds_ms": kinds.most_common(top), "threads_ms": by_thread.most_common(8)}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--group", type=int, default=8)
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--new-tokens", type=int, default=32)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--steps", type=int, default=5, help="loop steps watched for recompiles")
  p.add_argument("--reps", type=int, default=5, help="timed calls per jitted piece")
  p.add_argument("--trace-dir", help="keep the jax.profiler trace here (default: a temp dir)")
  p.add_argument("--json", help="write the results here")
  args = p.parse_args()
  os.environ.pop("XLA_FLAGS", None)

  import jax
  import jax.numpy as jnp
  import optax
  import transformers

  from grpo_jax import host, sharding, train, update

  counter = CompileCounter()
  tmp = tempfile.TemporaryDirectory()
  args.path = os.path.join(tmp.name, "model")
  args.steps_total = args.steps
  info = vs_trl.write_model(args)
  args.warmup, args.steps = 0, args.steps_total
  run = vs_trl.jax_run_config(args)
  tokenizer = transformers.AutoTokenizer.from_pretrained(args.path)
  prompts = vs_trl.make_prompts(args.batch, args.prompt_len, tokenizer)
  enc = tokenizer(prompts, add_special_tokens=False, return_tensors="np")
  mesh = sharding.make_mesh(run.mesh, jax.devices()[:1])
  setup, state, _ = train.init_state(run, mesh, tokenizer, workdir="")
  setup.stop_token_ids = ()
  steps = train.Steps(setup)
  g = run.rollout.group_size
  prompts_rep = [q for q in prompts for _ in range(g)]
  prompt_ids, prompt_mask = host.to_global(
      (enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)), mesh)
  counter.take()
  result = {"model": info, "compiles_per_step": [], "guard": {}}

  def rollout(state, step):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
    return steps.generate(state.params, prompt_ids, prompt_mask, jax.random.split(key)[0])

  def score(out):
    tokens_h, mask_h = host.to_host(out.tokens), host.to_host(out.mask)
    texts = host.decode(tokenizer, tokens_h, mask_h)
    rewards = host.to_global(np.asarray(vs_trl.digit_fraction_reward(prompts_rep, texts),
                                        np.float32), mesh)
    batch, _ = steps.assemble(prompt_ids, prompt_mask, out.tokens, out.mask,
                              jnp.zeros_like(out.mask), rewards)
    return batch

  # 1. The loop, watched for recompiles; the update under a transfer guard.
  for step in range(args.steps_total):
    out = rollout(state, step)
    batch = score(out)
    jax.block_until_ready(batch)
    with jax.transfer_guard("disallow"):
      state, metrics = steps.train_step(state, batch)
      state = steps.finish_step(state)
    jax.block_until_ready((state, metrics))
    n, names = counter.take()
    result["compiles_per_step"].append({"step": step, "compiles": n, "names": names})
  result["guard"]["update"] = "ok: no implicit host<->device transfer in train_step/finish_step"

  # The rollout and assembly under the guard too, their arguments made on the device first
  # (a Python int step folded into the key would itself be a host->device transfer).
  key = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 99))[0]
  zeros_mask, zeros_r = jnp.zeros_like(out.mask), jnp.zeros((out.tokens.shape[0],))
  jax.block_until_ready((key, zeros_mask, zeros_r))
  for name, fn in (("generate", lambda: steps.generate(state.params, prompt_ids, prompt_mask, key)),
                   ("assemble", lambda: steps.assemble(prompt_ids, prompt_mask, out.tokens,
                                                       out.mask, zeros_mask, zeros_r))):
    try:
      with jax.transfer_guard("disallow"):
        jax.block_until_ready(fn())
      result["guard"][name] = "ok"
    except Exception as e:  # noqa: BLE001  (reported, not fatal)
      result["guard"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
  counter.take()

  # 2. Each jitted piece on its own.
  R = run.rollout.max_new_tokens
  gd = setup.graphdef
  fwd = jax.jit(lambda p, b: update.response_logprobs(gd, p, b["tokens"], b["attn_mask"], R,
                                                      with_entropy=True))
  den = update.minibatch_denominators(batch, run.rl)
  fwd_bwd = jax.jit(lambda p, b: jax.value_and_grad(update.loss_fn, has_aux=True)(
      p, gd, b, run.rl, R, den, 1.0))
  grads = fwd_bwd(state.params, batch)[1]
  opt = jax.jit(lambda g_, s: optax.apply_updates(s.params, setup.tx.update(g_, s.opt_state,
                                                                            s.params)[0]))
  # train_step donates its state: time it on fresh copies.
  copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s))
  timings = {
      "generate": _median_time(lambda: rollout(state, 7), args.reps),
      "host decode + reward + assemble": _median_time(lambda: score(out), args.reps),
      "train_step (whole update)": None,
      "  forward: log-probs + entropy": _median_time(lambda: fwd(state.params, batch), args.reps),
      "  forward + backward": _median_time(lambda: fwd_bwd(state.params, batch), args.reps),
      "  AdamW + clip": _median_time(lambda: opt(grads, state), args.reps),
      "  state copy (not in the step; subtracted)": _median_time(lambda: copy(state), args.reps),
  }
  ts = []
  for _ in range(args.reps + 1):
    s2 = copy(state)
    jax.block_until_ready(s2)
    t = time.perf_counter()
    s2, m2 = steps.train_step(s2, batch)
    jax.block_until_ready((s2, m2))
    ts.append(time.perf_counter() - t)
  timings["train_step (whole update)"] = statistics.median(ts[1:])
  result["timings_s"] = timings
  result["compiles_during_timing"] = counter.take()[0]

  # 3. A profiler trace of one whole step.
  trace_dir = args.trace_dir or os.path.join(tmp.name, "trace")
  opts = jax.profiler.ProfileOptions()
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True, profiler_options=opts)
  t = time.perf_counter()
  with jax.profiler.TraceAnnotation("rollout"):
    out = rollout(state, 123)
    jax.block_until_ready(out)
  with jax.profiler.TraceAnnotation("score"):
    batch = score(out)
    jax.block_until_ready(batch)
  with jax.profiler.TraceAnnotation("update"):
    state, metrics = steps.train_step(state, batch)
    state = steps.finish_step(state)
    jax.block_until_ready((state, metrics))
  result["traced_step_s"] = time.perf_counter() - t
  jax.profiler.stop_trace()
  result["trace"] = summarise_trace(trace_dir)

  print(json.dumps(result, indent=1, default=str))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
  main()
