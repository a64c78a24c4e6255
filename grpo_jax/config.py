"""The boundary between the user's ConfigDict and the library: small frozen, validated dataclasses.

`resolve(config)` turns the `ml_collections.ConfigDict` of a `configs/*.py` file into a `RunConfig`
and checks everything that can be checked before any compile: types, ranges, names, files, and the
divisibilities between batch, group size, mini/micro-batches and the device mesh. Each failure is a
`ConfigError` whose message is one line naming the field (`config.rollout.group_size: ...`).
Library code never receives the ConfigDict, only the dataclass it needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections

from grpo_jax import advantages as adv_lib
from grpo_jax import losses
from grpo_jax.sharding import MeshConfig


class ConfigError(ValueError):
  """A bad config value; the message names the field."""


DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Which policy to build: a tiny random-init model or a local HF folder."""
  path: str = "tiny"
  vocab_size: int = 0
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  rope_theta: float = 10000.0
  tie_word_embeddings: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False

  @property
  def is_tiny(self) -> bool:
    return self.path == "tiny"


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  group_size: int = 8
  max_new_tokens: int = 4
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  stop_strings: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Search-R1 multi-turn rollouts (off unless `enabled`); budgets in tokens per rollout row,
  0 = no cap of that kind (the response budget rollout.max_new_tokens always holds). See
  `grpo_jax.rollout.search_rollout.SearchRolloutConfig` for the exact semantics."""
  enabled: bool = False
  url: str = ""
  local_corpus: str = ""
  topk: int = 3
  max_turns: int = 2
  max_turn_tokens: int = 64  # sampled per turn
  max_obs_tokens: int = 128  # per observation
  max_sampled_tokens: int = 0  # sampled over the whole response
  max_obs_total_tokens: int = 0  # observation tokens over the whole response
  max_doc_chars: int = 0
  eos_without_action: str = "end"  # "end" (ours) | "invalid" (Search-R1)
  timeout_s: float = 30.0
  max_retries: int = 3
  backoff_s: float = 1.0


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """Advantage estimator and group filtering; the loss itself is a `losses.LossConfig`."""
  estimator: str = "grpo"
  adv_eps: float = 1e-6
  loss: losses.LossConfig = dataclasses.field(default_factory=losses.LossConfig)
  filter_zero_std_groups: bool = False
  kl_on_filtered_groups: bool = True
  overlong_buffer: int = 0
  overlong_penalty: float = 1.0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 3e-3
  warmup_steps: int = 5
  decay: str = "cosine"
  end_lr_factor: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.99
  eps: float = 1e-8
  max_grad_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  num_steps: int = 150
  ppo_epochs: int = 1
  minibatch_size: int = 0
  microbatch_size: int = 0  # 0: sized from memory_budget_gb (update.plan_update).
  memory_budget_gb: float = 0.0  # 0: derived from the device (update.memory_budget).
  lm_head_chunk: int = 0  # positions per LM-head chunk; 0: losses.auto_chunk_size.
  shared_prefix: bool = True  # prompt forward once per group in the update (where it applies).
  trim_responses: bool = True  # micro-batches by response length, padding past the longest skipped.
  pack_responses: bool = True  # with trim + shared prefix: a group's responses packed in one row.
  log_every: int = 1
  eval_every: int = 0
  eval_num_prompts: int = 64
  eval_pass_k: int = 4
  eval_success_reward: float = 1.0
  checkpoint_every: int = 50
  keep_checkpoints: int = 2
  export_every: int = 0
  export_token_groups: int = 2
  final_export: str = ""
  progress_bar: bool = True
  max_nonfinite_steps: int = 5


@dataclasses.dataclass(frozen=True)
class RunConfig:
  seed: int
  model: ModelSpec
  tokenizer: str
  data: Any  # grpo_jax.data.DataConfig
  rewards: tuple[tuple[str, float, dict], ...]
  rollout: RolloutConfig
  rl: RLConfig
  optim: OptimConfig
  train: TrainConfig
  mesh: MeshConfig
  lora: Any = None  # grpo_jax.models.lora.LoraConfig (rank 0 = full fine-tuning)
  search: SearchConfig = dataclasses.field(default_factory=SearchConfig)

  @property
  def rollout_batch(self) -> int:
    """Responses per step (prompts x group size), over all hosts."""
    return self.data.batch_size * self.rollout.group_size

  @property
  def minibatch(self) -> int:
    return self.train.minibatch_size or self.rollout_batch

  @property
  def microbatch(self) -> int:
    return self.train.microbatch_size or self.minibatch


def config_to_json(config: Any) -> Any:
  """A JSON-able view of a (nested) frozen dataclass config: dicts, lists and scalars."""
  if dataclasses.is_dataclass(config):
    return {f.name: config_to_json(getattr(config, f.name)) for f in dataclasses.fields(config)}
  if isinstance(config, (list, tuple)):
    return [config_to_json(v) for v in config]
  if isinstance(config, dict):
    return {str(k): config_to_json(v) for k, v in config.items()}
  return config


def user_config(run: RunConfig) -> dict:
  """`run` laid out as a config file writes it (the loss fields flat in `rl`, no `rl.loss`), every
  value resolved: `resolve(ml_collections.ConfigDict(user_config(run)))` gives `run` back, so the
  `config.json` of a workdir can be fed back."""
  out = config_to_json(run)
  rl = dict(out["rl"])
  loss = rl.pop("loss")
  if loss.get("dual_clip") is None:
    loss["dual_clip"] = 0.0  # The config files' spelling of "off".
  out["rl"] = {**rl, **loss}
  return out


def load_config(path: str, *overrides: str) -> ml_collections.ConfigDict:
  """A `configs/*.py` file (":variant" allowed) with `--config.<field>=value` overrides, parsed
  exactly as `python -m grpo_jax.train --config=PATH OVERRIDES...` parses them (for tests and
  notebooks). The result is locked: unknown fields raise."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["grpo_jax", f"--config={path}", *overrides]
  flag_values = flags.FlagValues()
  # config_flags finds the overrides in `sys_argv` (it reads sys.argv otherwise).
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def _fail(field: str, msg: str) -> ConfigError:
  return ConfigError(f"config.{field}: {msg}")


def _positive(field: str, value: Any, *, allow_zero: bool = False) -> None:
  if isinstance(value, bool) or not isinstance(value, int):
    raise _fail(field, f"expected an int, got {value!r}")
  if value < 0 or (value == 0 and not allow_zero):
    raise _fail(field, f"expected {'>= 0' if allow_zero else '> 0'}, got {value}")


def _section(cls, field: str, values: dict):
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise _fail(f"{field}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(names))})")
  try:
    return cls(**values)
  except ConfigError:
    raise
  except (TypeError, ValueError) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if msg.startswith(f"{cls.__name__}."):  # "LossConfig.clip_low: ..." -> "config.rl.clip_low: ..."
      msg = f"config.{field}.{msg[len(cls.__name__) + 1:]}"
    elif not msg.startswith("config."):
      msg = f"config.{field}: {msg}"
    raise ConfigError(msg) from None


def resolve(config: ml_collections.ConfigDict, *, num_devices: int | None = None) -> RunConfig:
  """Validates `config` and returns the typed `RunConfig`; raises `ConfigError` (one line)."""
  from grpo_jax import data as data_lib  # Heavy import (tfds); keep `import grpo_jax.config` light.

  c = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  expected = {"seed", "model", "tokenizer", "data", "rewards", "rollout", "rl", "optim", "train", "mesh"}
  optional = {"lora", "search"}
  for key in sorted(set(c) - expected - optional):
    raise _fail(key, f"unknown section (known: {', '.join(sorted(expected))})")
  for key in sorted(expected - set(c)):
    raise _fail(key, "missing")

  if isinstance(c["seed"], bool) or not isinstance(c["seed"], int):
    raise _fail("seed", f"expected an int, got {c['seed']!r}")

  model = _section(ModelSpec, "model", c["model"])
  for f in ("dtype", "param_dtype"):
    if getattr(model, f) not in DTYPES:
      raise _fail(f"model.{f}", f"expected one of {DTYPES}, got {getattr(model, f)!r}")
  if model.is_tiny:
    for f in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
              "head_dim"):
      _positive(f"model.{f}", getattr(model, f))
    _positive("model.vocab_size", model.vocab_size, allow_zero=True)
    if model.num_heads % model.num_kv_heads:
      raise _fail("model.num_kv_heads",
                  f"must divide num_heads={model.num_heads}, got {model.num_kv_heads}")
  elif not os.path.isfile(os.path.join(model.path, "config.json")):
    raise _fail("model.path", f"expected 'tiny' or a folder with config.json, got {model.path!r}")

  tokenizer = c["tokenizer"]
  if tokenizer and not os.path.isdir(tokenizer):
    raise _fail("tokenizer", f"expected '' (built-in) or a tokenizer folder, got {tokenizer!r}")
  if not tokenizer and not model.is_tiny and os.path.isfile(
      os.path.join(model.path, "tokenizer_config.json")):
    tokenizer = model.path  # A pretrained model's own tokenizer.

  data_cfg = _section(data_lib.DataConfig, "data", c["data"])

  rewards = c["rewards"]
  if not isinstance(rewards, (list, tuple)) or not rewards:
    raise _fail("rewards", "expected a non-empty list of (name, weight, kwargs)")
  parsed = []
  for i, spec in enumerate(rewards):
    if not (isinstance(spec, (list, tuple)) and len(spec) in (2, 3) and isinstance(spec[0], str)
            and isinstance(spec[1], (int, float))):
      raise _fail(f"rewards[{i}]", f"expected (name, weight[, kwargs]), got {spec!r}")
    parsed.append((spec[0], float(spec[1]), dict(spec[2]) if len(spec) == 3 else {}))

  rollout = _section(RolloutConfig, "rollout", c["rollout"])
  _positive("rollout.group_size", rollout.group_size)
  _positive("rollout.max_new_tokens", rollout.max_new_tokens)
  _positive("rollout.top_k", rollout.top_k, allow_zero=True)
  if not rollout.temperature >= 0:
    raise _fail("rollout.temperature", f"expected >= 0, got {rollout.temperature}")
  if not 0 < rollout.top_p <= 1:
    raise _fail("rollout.top_p", f"expected in (0, 1], got {rollout.top_p}")
  rollout = dataclasses.replace(rollout, stop_strings=tuple(rollout.stop_strings))

  rl = dict(c["rl"])
  rl_top = {k: rl.pop(k) for k in ("estimator", "adv_eps", "filter_zero_std_groups",
                                   "kl_on_filtered_groups", "overlong_buffer", "overlong_penalty")
            if k in rl}
  if "dual_clip" in rl and not rl["dual_clip"]:
    rl["dual_clip"] = None
  loss_cfg = _section(losses.LossConfig, "rl", rl)
  if loss_cfg.max_len is None:  # The norm aggregation divides by the response budget.
    loss_cfg = dataclasses.replace(loss_cfg, max_len=rollout.max_new_tokens)
  rl_cfg = _section(RLConfig, "rl", {**rl_top, "loss": loss_cfg})
  if rl_cfg.estimator not in adv_lib.ESTIMATORS:
    raise _fail("rl.estimator",
                f"unknown estimator {rl_cfg.estimator!r} (known: {', '.join(adv_lib.ESTIMATORS)})")
  if not rl_cfg.adv_eps > 0:
    raise _fail("rl.adv_eps", f"expected > 0, got {rl_cfg.adv_eps}")
  if rl_cfg.estimator == "grpo" and rollout.group_size < 2:
    raise _fail("rollout.group_size",
                f"estimator {rl_cfg.estimator!r} divides by the group std: needs >= 2, got "
                f"{rollout.group_size}")
  if rl_cfg.estimator in ("rloo", "grpo_passk") and rollout.group_size < 2:
    raise _fail("rollout.group_size",
                f"estimator {rl_cfg.estimator!r} needs >= 2 responses per group, got "
                f"{rollout.group_size}")
  _positive("rl.overlong_buffer", rl_cfg.overlong_buffer, allow_zero=True)
  if rl_cfg.overlong_buffer >= rollout.max_new_tokens:
    raise _fail("rl.overlong_buffer",
                f"must be < rollout.max_new_tokens={rollout.max_new_tokens}, got "
                f"{rl_cfg.overlong_buffer}")

  optim = _section(OptimConfig, "optim", c["optim"])
  if not optim.learning_rate > 0:
    raise _fail("optim.learning_rate", f"expected > 0, got {optim.learning_rate}")
  _positive("optim.warmup_steps", optim.warmup_steps, allow_zero=True)
  if optim.decay not in ("cosine", "linear", "constant"):
    raise _fail("optim.decay", f"expected cosine | linear | constant, got {optim.decay!r}")
  if not optim.max_grad_norm >= 0:
    raise _fail("optim.max_grad_norm", f"expected >= 0, got {optim.max_grad_norm}")

  train = _section(TrainConfig, "train", c["train"])
  _positive("train.max_nonfinite_steps", train.max_nonfinite_steps, allow_zero=True)
  for f in ("num_steps", "ppo_epochs", "log_every", "eval_num_prompts", "eval_pass_k",
            "keep_checkpoints", "export_token_groups"):
    _positive(f"train.{f}", getattr(train, f), allow_zero=f == "export_token_groups")
  for f in ("minibatch_size", "microbatch_size", "eval_every", "checkpoint_every", "export_every",
            "lm_head_chunk"):
    _positive(f"train.{f}", getattr(train, f), allow_zero=True)
  if (isinstance(train.memory_budget_gb, bool)
      or not isinstance(train.memory_budget_gb, (int, float)) or not train.memory_budget_gb >= 0):
    raise _fail("train.memory_budget_gb", f"expected a number >= 0, got {train.memory_budget_gb!r}")

  if train.final_export not in ("", "hf", "peft"):
    raise _fail("train.final_export", f"expected '' | 'hf' | 'peft', got {train.final_export!r}")

  mesh = _section(MeshConfig, "mesh", c["mesh"])
  from grpo_jax.models.lora import LoraConfig
  lora_values = dict(c.get("lora") or {})
  for f in ("target_modules", "modules_to_save"):
    if isinstance(lora_values.get(f), list):
      lora_values[f] = tuple(lora_values[f])
  lora = _section(LoraConfig, "lora", lora_values)
  if lora.enabled and lora.dropout:
    raise _fail("lora.dropout", f"adapter dropout is not implemented in the trainer; set 0.0, got "
                                f"{lora.dropout}")
  qk_saved = [n for n in lora.saved if n in ("q_norm", "k_norm")] if lora.enabled else []
  if qk_saved:
    has_qk = False  # The tiny model has no per-head q/k norms.
    if not model.is_tiny:
      from grpo_jax.models.config import config_from_hf
      with open(os.path.join(model.path, "config.json")) as f:
        has_qk = config_from_hf(json.load(f)).qk_norm
    if not has_qk:
      raise _fail("lora.modules_to_save", f"this model has no {qk_saved[0]} (per-head q/k norms "
                                          f"exist only in Qwen3-style models)")
  search = _section(SearchConfig, "search", dict(c.get("search") or {}))
  if search.enabled:
    if not search.url and not search.local_corpus:
      raise _fail("search.url", "set the retriever's /retrieve URL, or search.local_corpus to "
                                "serve a JSONL corpus with the built-in BM25 server")
    if search.local_corpus and not os.path.isfile(search.local_corpus):
      raise _fail("search.local_corpus", f"no such file {search.local_corpus!r} (a JSONL corpus "
                                         f"of {{\"contents\"}} rows, \"id\" optional)")
    if search.url and not search.url.startswith(("http://", "https://")):
      raise _fail("search.url", f"expected an http(s) URL ending in /retrieve, got {search.url!r}")
    for f in ("topk", "max_turns", "max_turn_tokens", "max_obs_tokens"):
      _positive(f"search.{f}", getattr(search, f))
    for f in ("max_sampled_tokens", "max_obs_total_tokens", "max_doc_chars"):
      _positive(f"search.{f}", getattr(search, f), allow_zero=True)
    if search.eos_without_action not in ("end", "invalid"):
      raise _fail("search.eos_without_action",
                  f"expected 'end' (ours: the row ends) or 'invalid' (Search-R1: a corrective "
                  f"observation), got {search.eos_without_action!r}")
  if train.final_export == "peft" and not lora.enabled:
    raise _fail("train.final_export", "'peft' writes LoRA adapters: set lora.rank > 0 (or use 'hf')")

  run = RunConfig(seed=c["seed"], model=model, tokenizer=tokenizer, data=data_cfg,
                  rewards=tuple(parsed), rollout=rollout, rl=rl_cfg, optim=optim, train=train,
                  mesh=mesh, lora=lora, search=search)

  # Cross-section divisibility, checked before anything compiles.
  if run.rollout_batch % run.minibatch:
    raise _fail("train.minibatch_size",
                f"must divide the rollout batch data.batch_size*rollout.group_size="
                f"{run.rollout_batch}, got {run.minibatch}")
  if run.minibatch % run.microbatch:
    raise _fail("train.microbatch_size",
                f"must divide the minibatch {run.minibatch}, got {run.microbatch}")
  if num_devices is not None:
    try:
      data_ax, fsdp_ax, _ = mesh.resolve(num_devices)
    except ValueError as e:
      raise ConfigError(f"config.{e}") from None
    batch_div = data_ax * fsdp_ax
    if run.microbatch % batch_div:
      raise _fail("train.microbatch_size",
                  f"the microbatch ({run.microbatch} responses) must be divisible by the mesh "
                  f"batch axes data*fsdp={batch_div}")
    if train.eval_every and data_cfg.eval_split and (
        data_cfg.batch_size * train.eval_pass_k) % batch_div:
      raise _fail("train.eval_pass_k",
                  f"data.batch_size*eval_pass_k = {data_cfg.batch_size * train.eval_pass_k} "
                  f"samples must be divisible by the mesh batch axes data*fsdp={batch_div}")
    import jax
    if jax.process_count() > 1 and data_cfg.batch_size % batch_div:
      # Each process feeds its own prompts: they must split evenly over the batch axes.
      raise _fail("data.batch_size",
                  f"with {jax.process_count()} processes the prompts per step must be divisible "
                  f"by the mesh batch axes data*fsdp={batch_div}, got {data_cfg.batch_size}")
    if data_cfg.batch_size % jax.process_count():
      raise _fail("data.batch_size",
                  f"must be divisible by the number of processes {jax.process_count()}, got "
                  f"{data_cfg.batch_size}")
  return run
