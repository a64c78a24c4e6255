"""Advantage export: what every GRPO user asks of a run - what did the advantages look like?

Every `train.export_every` steps the loop writes, under `<workdir>/export/`:
  step_<N>.parquet         one row per response: step, group_id, index_in_group, prompt, response,
                           reward and each reward component (`reward/<name>`), group_mean, group_std,
                           advantage, response_length, truncated, retrieved (text inside retrieved-token
                           spans, Search-R1 rollouts only).
  step_<N>_tokens.parquet  for the first `train.export_token_groups` groups, one row per response token:
                           token_id, token, loss_mask, info_mask, old_logp, new_logp (after the
                           update), ratio = exp(new - old), clipped (the PPO clip is active at that
                           ratio for the sign of the advantage), advantage.
Only process 0 writes; arrays are gathered from all hosts first.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _gather(x) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def export_dir(workdir: str) -> str:
  return os.path.join(workdir, "export")


def step_path(workdir: str, step: int, tokens: bool = False) -> str:
  return os.path.join(export_dir(workdir), f"step_{step:06d}{'_tokens' if tokens else ''}.parquet")


def write_parquet(table: pa.Table, path: str) -> None:
  """Writes atomically: a killed run never leaves a truncated Parquet behind."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  pq.write_table(table, tmp)
  os.replace(tmp, path)


def response_rows(*, step: int, prompts: list[str], responses: list[str], rewards: np.ndarray,
                  components: dict[str, np.ndarray], group_ids: np.ndarray, group_size: int,
                  group_mean: np.ndarray, group_std: np.ndarray, advantages: np.ndarray,
                  lengths: np.ndarray, truncated: np.ndarray,
                  retrieved: list[str] | None = None) -> pa.Table:
  n = len(responses)
  cols: dict[str, Any] = {
      "step": np.full(n, step, np.int64),
      "group_id": group_ids.astype(np.int64),
      "index_in_group": (np.arange(n) % group_size).astype(np.int64),
      "prompt": prompts, "response": responses,
      "reward": rewards.astype(np.float32),
  }
  for name, v in sorted(components.items()):
    cols[f"reward/{name}"] = np.asarray(v, np.float32)
  cols.update({
      "group_mean": group_mean.astype(np.float32), "group_std": group_std.astype(np.float32),
      "advantage": advantages.astype(np.float32), "response_length": lengths.astype(np.int64),
      "truncated": truncated.astype(bool),
  })
  if retrieved is not None:
    cols["retrieved"] = retrieved
  return pa.table(cols)


def token_rows(*, step: int, tokenizer, group_ids: np.ndarray, group_size: int, groups: np.ndarray,
               response_ids: np.ndarray, response_mask: np.ndarray, loss_mask: np.ndarray,
               info_mask: np.ndarray, old_logp: np.ndarray, new_logp: np.ndarray,
               advantages: np.ndarray, clip_low: float, clip_high: float) -> pa.Table:
  rows = np.flatnonzero(np.isin(group_ids, groups))
  out: dict[str, list] = {k: [] for k in (
      "step", "group_id", "index_in_group", "position", "token_id", "token", "loss_mask",
      "info_mask", "old_logp", "new_logp", "ratio", "clipped", "advantage")}
  for r in rows:
    for t in np.flatnonzero(response_mask[r]):
      ratio = float(np.exp(new_logp[r, t] - old_logp[r, t]))
      a = float(advantages[r])
      clipped = (a > 0 and ratio > 1 + clip_high) or (a < 0 and ratio < 1 - clip_low)
      for k, v in (("step", step), ("group_id", int(group_ids[r])),
                   ("index_in_group", int(r % group_size)), ("position", int(t)),
                   ("token_id", int(response_ids[r, t])),
                   ("token", tokenizer.decode([int(response_ids[r, t])])),
                   ("loss_mask", float(loss_mask[r, t])), ("info_mask", int(info_mask[r, t])),
                   ("old_logp", float(old_logp[r, t])), ("new_logp", float(new_logp[r, t])),
                   ("ratio", ratio), ("clipped", bool(clipped)), ("advantage", a)):
        out[k].append(v)
  return pa.table(out)


def write_step(workdir: str, step: int, *, tokenizer, run, texts, rewards, components,
               train_batch, gstats, truncated, old_logp, new_logp, info_mask=None,
               retrieved=None) -> tuple[str, str] | None:
  """Gathers one step's rollout batch and writes both Parquet files (process 0 only).

  `texts` are the decoded responses of this process (all of them on one host); the numeric
  arguments are global arrays.
  """
  g = run.rollout.group_size
  r_len = run.rollout.max_new_tokens
  tokens = _gather(train_batch["tokens"])
  attn = _gather(train_batch["attn_mask"])
  loss_mask = _gather(train_batch["loss_mask"])
  adv = _gather(train_batch["advantages"])
  gids = _gather(gstats["group_ids"])
  gmean, gstd = _gather(gstats["group_mean"]), _gather(gstats["group_std"])
  old_logp, new_logp = _gather(old_logp), _gather(new_logp)
  rewards_all = _gather(rewards)
  comps = {k: _gather(v) for k, v in components.items()}
  trunc = _gather(truncated)
  info = np.zeros_like(loss_mask, dtype=np.int32) if info_mask is None else _gather(info_mask)
  if jax.process_index() != 0:
    return None
  prompt_ids, prompt_mask = tokens[:, :-r_len], attn[:, :-r_len]
  resp_ids, resp_mask = tokens[:, -r_len:], attn[:, -r_len:]
  prompts = tokenizer.batch_decode([row[m.astype(bool)].tolist()
                                    for row, m in zip(prompt_ids[::g], prompt_mask[::g])],
                                   skip_special_tokens=False)
  prompts = [p for p in prompts for _ in range(g)]
  if jax.process_count() > 1 or texts is None:
    texts = tokenizer.batch_decode([row[m.astype(bool)].tolist()
                                    for row, m in zip(resp_ids, resp_mask)],
                                   skip_special_tokens=True)
  table = response_rows(step=step, prompts=prompts, responses=list(texts), rewards=rewards_all,
                        components=comps, group_ids=gids, group_size=g, group_mean=gmean,
                        group_std=gstd, advantages=adv, lengths=resp_mask.sum(axis=1),
                        truncated=trunc, retrieved=retrieved)
  path = step_path(workdir, step)
  write_parquet(table, path)
  chosen = np.unique(gids)[:run.train.export_token_groups]
  tok_table = token_rows(step=step, tokenizer=tokenizer, group_ids=gids, group_size=g,
                         groups=chosen, response_ids=resp_ids, response_mask=resp_mask,
                         loss_mask=loss_mask, info_mask=info, old_logp=old_logp,
                         new_logp=new_logp, advantages=adv, clip_low=run.rl.loss.clip_low,
                         clip_high=run.rl.loss.clip_high)
  tok_path = step_path(workdir, step, tokens=True)
  write_parquet(tok_table, tok_path)
  return path, tok_path
