"""Search-R1 rollouts on the KV-cache sampler: `generate_turn` of `search_rollout`, from the cache.

  out = search_generate(graphdef, params, prompt_ids_BxP, prompt_mask_BxP, rng, group_size=G,
                        tokenizer=tok, retriever=client, config=SearchRolloutConfig(...),
                        temperature=1.0, eos_token_id=eos, pad_token_id=pad, mesh=None)
  out.tokens     int32 [B*G, R]  response: sampled and retrieved tokens, right-padded with pad
  out.mask       int32 [B*G, R]  1 on every response token (sampled or retrieved)
  out.info_mask  int32 [B*G, R]  1 on retrieved / corrective (forced) tokens
  out.logprobs   f32   [B*G, R]  log softmax(logits / T) of sampled tokens; 0 on forced and padding
  out.truncated  bool  [B*G]     the row spent its R-token budget ("length")

Rows are ordered as `expand_groups` orders them (a a a b b b). The turn loop, the action parsing,
the batched retrieval and the info mask are `search_rollout.run_search_rollout`; this module is the
generator behind it (:class:`CacheTurnGenerator`), which never re-prefills a history:

* Prefill once: the B prompts are left-padded to `sampling.bucket_length(P)` (P_b) and prefilled
  once, the cache repeated G times (`sampling.prefill(group_size=G)`).
* Each later turn (one device call each, `_compact`) gathers the cache rows of the active rollout
  rows and moves each row's first `n_prompt + keep - 1` valid slots to the front (stable order),
  marking every other slot invalid. That is the contract's rewind (tokens sampled past the stop
  string, and the last kept token, are dropped) and it reclaims the slots that earlier turns left
  empty. The result equals a fresh forward because the decoder numbers a token by the count of
  valid slots before it and lets queries read only valid slots: moving valid slots together
  changes neither (keys are stored already rotated).
* Then `sampling.append` writes ``[last kept token] + observation`` left-padded to a bucketed width
  F at the new end. Re-feeding the last kept token costs one token per row and turn and gives
  exact next-token logits whatever happened after it (a row that stopped mid-call has stale
  logits in `decode`'s output, and a rewound row's logits belong to a dropped token).
* Then `sampling.decode` in chunks of `chunk_tokens` (C) steps, with the per-row budget.

Stop strings: ``</search>`` and ``</answer>`` are several tokens for most tokenizers, so the device
stops a row only at EOS, at a stop string that the tokenizer encodes as one token (exact, no waste)
and at its budget; after each chunk the host decodes each live row's turn and ends the rows whose
text holds a stop string, cutting after the token that completes it. Cost: at most C - 1 tokens
sampled past a stop per row and turn (dropped at the next rewind) and one device→host copy of
[N, C] ids per chunk; C = 8 keeps both small. (Stopping on device at every token that contains
">" would waste nothing, but costs a host round trip at each opening tag too.)

Finished rows: the cache keeps only active rows, in a batch of `_row_bucket(A)` rows (the next
power of two, a multiple of the mesh's batch multiple, at most B*G), so once half the rows are
done each decode step costs half. Inside a chunk, rows that stopped early ride along at mask 0.

Static shapes: the cache has S = P_b + R + F_max + C·ceil(T/C) slots (T = per-turn budget,
F_max = observation cap + 1), enough for the worst turn after a compaction. Compiles:
prefill once per (B, P_b); `_compact` once per row bucket (log2(B*G)), `append` once per (row
bucket, observation width bucket), and `decode` once per (row bucket, slot length): its `length`
is static, a power of two; nothing depends on the data otherwise.

Several processes: each passes its own prompts (rows [p*N/np, (p+1)*N/np) of the batch, the
layout of `host.to_host`) and runs `run_search_rollout` over its own rows, so text, stop checks,
answers and retrieval calls stay on the process that owns the prompts. The cache, its compaction
and every decode chunk are global SPMD programs over the whole batch, so all processes must make
the same calls with the same shapes: the generator gathers every process's `TurnRequest` into one
(`allgather_objects`) and every decode chunk's ids to every process (`sampling.fetch`), and each
process then runs the single-process bookkeeping of the *whole* batch, identically; the rollout
loop runs in lockstep (an empty request once a process's rows are done). The result is that of
one process holding the whole batch (same layout, same random draws), returned as global arrays
with this process's texts; the metrics are pooled over all rows (`_pooled_metrics`).

Counters (for the cost of the cache vs re-prefilling): `num_prefill_tokens` (B * P_b prompt slots
run once), `num_append_tokens` (slots run by `append`, padding included), `num_decode_tokens`
(rows x steps of the decode chunks, padding rows included), `num_append_real_tokens` (without
padding) and `num_naive_prefill_tokens`: the real tokens a sampler without cache continuation
would prefill, every active row's prompt (G copies) plus its whole response so far, at each
turn. Observation widths are bucketed (and rows differ), so the padded append slots can be
well above the real count; both are reported.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pickle
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from grpo_jax import sampling
from grpo_jax import sharding as sharding_lib
from grpo_jax.models import decoder as decoder_lib
from grpo_jax.rollout import search_protocol as sp
from grpo_jax.rollout import search_rollout as sr


@dataclasses.dataclass(frozen=True)
class SearchSampleOutput:
  """Outputs of :func:`search_generate` for N = B*G rows and R = max_response_tokens.

  Attributes:
    tokens: int32 [N, R] response ids (sampled and forced), right-padded with the pad id.
    mask: int32 [N, R], 1 on every response token.
    info_mask: int32 [N, R], 1 on forced (retrieved / corrective) tokens.
    logprobs: float32 [N, R] sampling log-probs of sampled tokens; 0 on forced tokens and padding.
    truncated: bool [N], the row ended by spending its response budget.
    texts: decoded responses (special tokens skipped) of this process's rows (all N on one
      process); `segments`, `answers` and `finish_reasons` likewise.
    segments: per row, the response as (text, is_retrieved) pieces, for export.
    answers: per row the content of the answer action, or None.
    finish_reasons: per row "answer", "eos", "length" or "max_turns".
    metrics: `search_rollout.search_metrics` plus the counters below as floats.
    num_prefill_tokens: prompt slots prefilled (B * P_b: each prompt once).
    num_append_tokens: slots run through `append` (observations, padding included).
    num_append_real_tokens: real tokens appended (observations and one re-fed token per turn).
    num_decode_tokens: row-steps of decode (padding rows and over-generation included).
    num_naive_prefill_tokens: real tokens a sampler that re-prefills the history every turn
      would prefill (the baseline for the counters above; its padding not counted).
  """

  tokens: jax.Array
  mask: jax.Array
  info_mask: jax.Array
  logprobs: jax.Array
  truncated: jax.Array
  texts: list[str]
  segments: list[list[tuple[str, bool]]]
  answers: list[str | None]
  finish_reasons: list[str]
  metrics: dict[str, float]
  num_prefill_tokens: int
  num_append_tokens: int
  num_append_real_tokens: int
  num_decode_tokens: int
  num_naive_prefill_tokens: int


# ----------------------------------------------------------------------------- device pieces


@functools.partial(jax.jit, static_argnames=("mesh",))
def _compact(cache: decoder_lib.KVCache, src_rows_M: jax.Array, keep_M: jax.Array, *,
             mesh: Mesh | None = None) -> decoder_lib.KVCache:
  """Cache rows `src_rows_M`, each reduced to its first `keep_M` valid slots, moved to the front.

  Valid slots keep their order (a stable sort of the validity), so the context a query sees, and
  every later token's position (the count of valid slots before it), are those of the compacted
  sequence. Slots past `keep_M` are marked invalid; their stale keys are never read.
  """
  valid_MxS = jnp.take(cache.valid, src_rows_M, axis=0)
  S = valid_MxS.shape[1]
  order_MxS = jnp.argsort(jnp.logical_not(valid_MxS).astype(jnp.int8), axis=1, stable=True)
  order_1xMxSx1x1 = order_MxS[None, :, :, None, None]
  k = jnp.take_along_axis(jnp.take(cache.k, src_rows_M, axis=1), order_1xMxSx1x1, axis=2)
  v = jnp.take_along_axis(jnp.take(cache.v, src_rows_M, axis=1), order_1xMxSx1x1, axis=2)
  valid_MxS = jnp.arange(S, dtype=jnp.int32)[None, :] < keep_M[:, None]
  return sampling._constrain_cache(decoder_lib.KVCache(k=k, v=v, valid=valid_MxS), mesh)


def _row_bucket(num_active: int, num_rows: int, multiple: int) -> int:
  """Cache batch for `num_active` rows: next power of two, a multiple of `multiple`, <= num_rows."""
  b = 1 << max(num_active - 1, 0).bit_length()
  b = -(-b // multiple) * multiple
  return min(b, num_rows)


def _place_batch(x: np.ndarray, mesh: Mesh | None) -> jax.Array:
  """A host array that every process holds whole -> a global batch-sharded array."""
  if mesh is None:
    return jnp.asarray(x)
  x = np.asarray(x)
  sharding = sharding_lib.batch_sharding(mesh, x.ndim, sharding_lib.ROLLOUT_RULES, shape=x.shape)
  # Each process fills only the shards its devices hold (several processes: no transfer).
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def allgather_objects(obj: Any) -> list[Any]:
  """Every process's picklable `obj`, in process order (``[obj]`` on one process)."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(pickle.dumps(obj), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64)))
  sizes = sizes.reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:data.size] = data
  bufs = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
  return [pickle.loads(bufs[p, :sizes[p]].tobytes()) for p in range(len(sizes))]


def _check_process_blocks(mesh: Mesh, num_rows: int) -> None:
  """Several processes: process p's devices must hold rows [p*n, (p+1)*n) of a batch, the layout
  `host.to_host` and `sharding.host_local_to_global` give the loop's per-process prompts."""
  count, index = jax.process_count(), jax.process_index()
  n = num_rows // count
  sharding = sharding_lib.batch_sharding(mesh, 1, sharding_lib.ROLLOUT_RULES, shape=(num_rows,))
  rows = set()
  for idx in sharding.addressable_devices_indices_map((num_rows,)).values():
    rows.update(range(num_rows)[idx[0]])
  if num_rows % count or rows != set(range(index * n, (index + 1) * n)):
    raise ValueError(f"search rollouts on {count} processes: process {index} must hold rows "
                     f"[{index * n}, {(index + 1) * n}) of the {num_rows}-row batch, its devices "
                     f"hold {sorted(rows)[:8]}...; order the mesh's batch axes by process")


def single_token_stops(tokenizer: sr.Tokenizer, stop_strings: Sequence[str]) -> tuple[int, ...]:
  """Ids of the stop strings that the tokenizer encodes as exactly one token (stopped on device)."""
  out = []
  for s in stop_strings:
    ids = list(tokenizer.encode(s, add_special_tokens=False))
    if len(ids) == 1:
      out.append(int(ids[0]))
  return tuple(out)


# ----------------------------------------------------------------------------- the generator


class CacheTurnGenerator:
  """`generate_turn` for `run_search_rollout` over one KV cache (see the module docstring).

  Args:
    graphdef, params: `nnx.split` of the policy `Decoder`.
    prompt_ids, prompt_mask: int [B, P] prompts (any padding) and their masks.
    rng: PRNG key; chunk c of turn t samples with `fold_in(fold_in(rng, t), c)`.
    group_size: G; rollout row i continues prompt i // G.
    tokenizer: decodes sampled ids for the host-side stop-string check.
    config: the rollout limits (R, per-turn budget, observation cap).
    temperature, top_k, top_p: sampling settings, as in `sampling.generate`.
    eos_token_id, pad_token_id: EOS stops a row on device; pad fills unused slots.
    chunk_tokens: C, decode steps per device call between host stop-string checks.
    mesh: shard the cache and batch over the mesh's batch axes.
  """

  def __init__(self, graphdef: nnx.GraphDef, params: Any, prompt_ids: Any, prompt_mask: Any,
               rng: jax.Array, *, group_size: int, tokenizer: sr.Tokenizer,
               config: sr.SearchRolloutConfig, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, eos_token_id: int, pad_token_id: int, chunk_tokens: int = 8,
               mesh: Mesh | None = None):
    # Several processes: each passes its own prompts and drives its own rows (rows
    # [p*N/np, (p+1)*N/np) of the batch); the device work runs on the whole batch, so every
    # process keeps the whole host state, identical everywhere (module docstring).
    self.num_processes = jax.process_count()
    ids_BxP = np.asarray(prompt_ids)
    mask_BxP = np.asarray(prompt_mask).astype(np.int32)
    self.num_local_rows = ids_BxP.shape[0] * group_size
    if self.num_processes > 1:
      if mesh is None:
        raise ValueError("mesh: search rollouts on several processes need the global mesh")
      shapes = allgather_objects(ids_BxP.shape)
      if len(set(shapes)) != 1:
        raise ValueError(f"prompt_ids: every process must pass as many prompts of the same "
                         f"length, got shapes {shapes}")
      ids_BxP, mask_BxP = (np.concatenate(allgather_objects(x)) for x in (ids_BxP, mask_BxP))
      _check_process_blocks(mesh, ids_BxP.shape[0] * group_size)
    self.local_offset = jax.process_index() * self.num_local_rows
    sampling._check_prompts(ids_BxP, mask_BxP)
    if not (mask_BxP.sum(axis=1) >= 1).all():
      raise ValueError("prompt_mask: every prompt needs at least one real token")
    self.graphdef, self.params, self.rng, self.mesh = graphdef, params, rng, mesh
    self.tokenizer, self.config = tokenizer, config
    self.group_size = sampling._check_int("group_size", group_size, 1)
    self.chunk = sampling._check_int("chunk_tokens", chunk_tokens, 1)
    stop_ids = (eos_token_id,) + single_token_stops(tokenizer, sp.STOP_STRINGS)
    (self.temperature, self.top_k, self.top_p, self.stop_ids,
     self.pad_id) = sampling._check_sampling(temperature, top_k, top_p, stop_ids, pad_token_id)
    self.eos_id = self.stop_ids[0]
    B, P = ids_BxP.shape
    self.num_rows = B * self.group_size
    self.multiple = 1
    if mesh is not None:
      self.multiple = sharding_lib.batch_size_multiple(mesh, sharding_lib.ROLLOUT_RULES)
      if self.num_rows % self.multiple:
        raise ValueError(f"group_size: B*G = {self.num_rows} rows are not divisible by the mesh "
                         f"batch multiple {self.multiple}")

    # Host copies of each row's context: the real prompt tokens, then the response so far.
    self.prompt_len = int(sampling.bucket_length(P))
    self.prompts = [[int(t) for t, m in zip(ids_BxP[b], mask_BxP[b]) if m]
                    for b in range(B) for _ in range(self.group_size)]
    self.responses: list[list[int]] = [[] for _ in range(self.num_rows)]

    R = config.max_response_tokens
    obs_cap = R if config.max_obs_tokens is None else min(config.max_obs_tokens, R)
    self.max_forced = obs_cap + 1  # an observation and the re-fed token
    turn_budget = min(config.max_turn_tokens, R)
    self.max_decode = self.chunk * math.ceil(turn_budget / self.chunk)
    self.num_slots = self.prompt_len + R + self.max_forced + self.max_decode

    padded_ids = np.full((B, self.prompt_len), self.pad_id, np.int32)
    padded_mask = np.zeros((B, self.prompt_len), np.int32)
    padded_ids[:, self.prompt_len - P:] = ids_BxP
    padded_mask[:, self.prompt_len - P:] = mask_BxP
    self.cache, self.logits = sampling.prefill(
        graphdef, params, _place_batch(padded_ids, None if B % self.multiple else mesh),
        _place_batch(padded_mask, None if B % self.multiple else mesh), self.num_slots,
        group_size=self.group_size, mesh=mesh)
    self.cache_rows = np.arange(self.num_rows)  # rollout row of each cache row (-1: padding)
    self.index = self.prompt_len  # next free cache slot
    self.num_prefill_tokens = B * self.prompt_len
    self.num_append_tokens = 0
    self.num_append_real_tokens = 0
    self.num_decode_tokens = 0
    self.num_naive_prefill_tokens = 0
    self.calls = 0

  # --------------------------------------------------------------------------- one turn

  def __call__(self, request: sr.TurnRequest) -> sr.TurnOutput:
    """One turn; `request` covers this process's rows (0-based among them)."""
    if self.num_processes == 1:
      return self._turn(request)
    # Every process's request, as one request over the whole batch (the device work is one
    # SPMD program); this process answers for its own rows only.
    parts = allgather_objects((np.asarray(request.rows) + self.local_offset, request.keep,
                               request.forced_ids, request.max_new_tokens))
    rows = np.concatenate([p[0] for p in parts]).astype(np.int64)
    out = sr.TurnOutput([], [])
    if rows.size:
      out = self._turn(dataclasses.replace(
          request, rows=rows, keep=np.concatenate([p[1] for p in parts]).astype(np.int64),
          forced_ids=[f for p in parts for f in p[2]],
          max_new_tokens=np.concatenate([p[3] for p in parts]).astype(np.int64)))
    mine = [j for j, i in enumerate(rows) if self.local_offset <= i < self.local_offset
            + self.num_local_rows]
    return sr.TurnOutput([out.token_ids[j] for j in mine], [out.logprobs[j] for j in mine])

  def _turn(self, request: sr.TurnRequest) -> sr.TurnOutput:
    rows = [int(r) for r in request.rows]
    A = len(rows)
    for j, i in enumerate(rows):
      keep = int(request.keep[j])
      if keep > len(self.responses[i]):
        raise ValueError(f"TurnRequest.keep: row {i} keeps {keep} tokens of a {len(self.responses[i])}"
                         f"-token response")
      del self.responses[i][keep:]
      self.num_naive_prefill_tokens += len(self.prompts[i]) + keep + len(request.forced_ids[j])

    if self.calls == 0:
      if rows != list(range(self.num_rows)) or any(request.keep) or any(request.forced_ids):
        raise ValueError("TurnRequest: the first turn must cover every row with nothing to keep "
                         "or append")
      logits = self.logits
    else:
      logits = self._rewind_and_append(rows, request)
    self.logits = None  # only the first turn reads the prefill logits
    for j, i in enumerate(rows):
      self.responses[i].extend(int(t) for t in request.forced_ids[j])

    slot_of_row = {int(i): s for s, i in enumerate(self.cache_rows) if i >= 0}
    slots = np.array([slot_of_row[i] for i in rows])
    remaining = np.zeros(len(self.cache_rows), np.int64)
    remaining[slots] = np.asarray(request.max_new_tokens, np.int64)
    new_ids: list[list[int]] = [[] for _ in range(A)]
    new_logp: list[list[float]] = [[] for _ in range(A)]
    turn_key = jax.random.fold_in(self.rng, request.turn)
    chunk = 0
    while (remaining > 0).any():
      if self.index + self.chunk > self.num_slots:  # guaranteed by the slot count; a bug if hit
        raise RuntimeError(f"search sampler: cache of {self.num_slots} slots is full")
      budget = np.minimum(remaining, self.chunk).astype(np.int32)
      out, self.cache, logits = sampling.decode(
          self.graphdef, self.params, self.cache, logits, self.index,
          jax.random.fold_in(turn_key, chunk), max_new_tokens=self.chunk,
          temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
          stop_token_ids=self.stop_ids, pad_token_id=self.pad_id,
          budget=_place_batch(budget, self.mesh), mesh=self.mesh)
      self.index += self.chunk
      self.num_decode_tokens += len(self.cache_rows) * self.chunk
      chunk += 1
      toks, mask, logp = sampling.fetch((out.tokens, out.mask, out.logprobs))
      for j, s in enumerate(slots):
        if remaining[s] <= 0:
          continue
        n = int(mask[s].sum())  # live tokens are a prefix of the chunk
        ids, lps = [int(t) for t in toks[s, :n]], [float(x) for x in logp[s, :n]]
        start = len(new_ids[j])
        new_ids[j].extend(ids)
        new_logp[j].extend(lps)
        remaining[s] -= n
        if n and ids[-1] in self.stop_ids:
          remaining[s] = 0
        cut = self._stop_cut(new_ids[j], start)
        if cut is not None:
          del new_ids[j][cut:], new_logp[j][cut:]
          remaining[s] = 0
    self.calls += 1
    for j, i in enumerate(rows):
      self.responses[i].extend(new_ids[j])
    return sr.TurnOutput(new_ids, new_logp)

  def _stop_cut(self, ids: list[int], start: int) -> int | None:
    """Length of the shortest prefix of `ids` whose text holds a stop string (searched past
    `start`, the prefix known to hold none), or None.

    Binary search: "holds a stop string" is monotone in the prefix length.
    """
    decode = lambda n: self.tokenizer.decode(ids[:n], skip_special_tokens=True)
    if len(ids) == start or sp.action_end(decode(len(ids))) is None:
      return None
    lo, hi = start + 1, len(ids)
    while lo < hi:
      mid = (lo + hi) // 2
      if sp.action_end(decode(mid)) is not None:
        hi = mid
      else:
        lo = mid + 1
    return lo

  def _rewind_and_append(self, rows: list[int], request: sr.TurnRequest) -> jax.Array:
    """Keeps the active rows' cache (rewound to `keep`, minus the last kept token) and appends
    [last kept token] + forced ids; returns the next-token logits [M, V]."""
    A = len(rows)
    M = _row_bucket(A, self.num_rows, self.multiple)
    slot_of_row = {int(i): s for s, i in enumerate(self.cache_rows) if i >= 0}
    src = np.full(M, slot_of_row[rows[0]], np.int32)
    keep_count = np.zeros(M, np.int32)
    forced: list[list[int]] = [[] for _ in range(M)]
    for j, i in enumerate(rows):
      context = self.prompts[i] + self.responses[i]  # responses[i] was cut to keep already
      src[j] = slot_of_row[i]
      keep_count[j] = len(context) - 1
      forced[j] = [context[-1]] + [int(t) for t in request.forced_ids[j]]
    width = max(len(f) for f in forced)
    # Bucketed widths, capped at the largest possible one (obs cap + 1): a full-length
    # observation, the common case with a token cap, then pays no bucket padding.
    F = min(sampling.bucket_length(width, minimum=8), self.max_forced)
    if F > self.max_forced:  # the observation cap bounds it; a bug if hit
      raise RuntimeError(f"search sampler: {width} forced tokens exceed the {self.max_forced} "
                         "planned slots")
    self.cache = _compact(self.cache, _place_batch(src, self.mesh),
                          _place_batch(keep_count, self.mesh), mesh=self.mesh)
    self.cache_rows = np.array(rows + [-1] * (M - A))
    self.index = int(keep_count.max())
    # Left-padded, so that every row's context ends at the same slot and decode continues there.
    ids_MxF = np.full((M, F), self.pad_id, np.int32)
    mask_MxF = np.zeros((M, F), np.int32)
    for j, f in enumerate(forced):
      if f:
        ids_MxF[j, F - len(f):] = f
        mask_MxF[j, F - len(f):] = 1
    self.cache, logits = sampling.append(
        self.graphdef, self.params, self.cache, _place_batch(ids_MxF, self.mesh),
        _place_batch(mask_MxF, self.mesh), self.index, mesh=self.mesh)
    self.index += F
    self.num_append_tokens += M * F
    self.num_append_real_tokens += sum(map(len, forced))
    return logits


# ----------------------------------------------------------------------------- public API


def search_generate(graphdef: nnx.GraphDef, params: Any, prompt_ids_BxP: Any,
                    prompt_mask_BxP: Any, rng: jax.Array, *, group_size: int,
                    tokenizer: sr.Tokenizer, retriever: sr.Retriever,
                    config: sr.SearchRolloutConfig, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, eos_token_id: int, pad_token_id: int,
                    mesh: Mesh | None = None, chunk_tokens: int = 8) -> SearchSampleOutput:
  """G Search-R1 rollouts per prompt on the KV-cache sampler (see the module docstring).

  Args:
    graphdef, params: `nnx.split(model)` of a `grpo_jax.models.Decoder`.
    prompt_ids_BxP, prompt_mask_BxP: int [B, P] prompts (left-padded) and their masks; with
      several processes, this process's prompts (the same B and P on every process).
    rng: PRNG key; the same key gives the same output.
    group_size: G, rollouts per prompt; rows are ordered a a a b b b.
    tokenizer: encodes observations, decodes sampled text; its `eos_token_id` must equal
      `eos_token_id` (the rollout ends a row at the tokenizer's EOS).
    retriever: answers each turn's queries in one batch (`RetrieverClient`).
    config: the rollout limits; R = config.max_response_tokens is the output width.
    temperature, top_k, top_p: sampling settings (temperature 0 = greedy).
    eos_token_id: stops a row (on device).
    pad_token_id: fills the outputs after each response and pads prompts.
    mesh: shard the cache and outputs over this mesh's batch axes.
    chunk_tokens: decode steps between host-side stop-string checks.

  Raises:
    RetrieverError: the retriever failed after its retries (nothing else was touched).
  """
  if not isinstance(config, sr.SearchRolloutConfig):
    raise TypeError(f"config: expected a SearchRolloutConfig, got {type(config).__name__}")
  tok_eos = getattr(tokenizer, "eos_token_id", None)
  if tok_eos != eos_token_id:
    raise ValueError(f"eos_token_id: expected the tokenizer's eos_token_id {tok_eos!r}, got "
                     f"{eos_token_id!r}")
  tok_pad = getattr(tokenizer, "pad_token_id", None)
  if tok_pad is not None and tok_pad != pad_token_id:
    raise ValueError(f"pad_token_id: expected the tokenizer's pad_token_id {tok_pad!r}, got "
                     f"{pad_token_id!r}")
  gen = CacheTurnGenerator(graphdef, params, prompt_ids_BxP, prompt_mask_BxP, rng,
                           group_size=group_size, tokenizer=tokenizer, config=config,
                           temperature=temperature, top_k=top_k, top_p=top_p,
                           eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                           chunk_tokens=chunk_tokens, mesh=mesh)
  multi = jax.process_count() > 1
  result = sr.run_search_rollout(gen, _PadTokenizer(tokenizer, pad_token_id), retriever, config,
                                 gen.num_local_rows, lockstep=multi)
  gen.cache = None  # free the cache before the caller's next allocation
  truncated = np.array([f == "length" for f in result.finish_reasons], bool)
  counters = {  # whole-batch figures: every process ran the whole batch's device work
      "search/prefill_tokens": gen.num_prefill_tokens,
      "search/append_tokens": gen.num_append_tokens,
      "search/append_real_tokens": gen.num_append_real_tokens,
      "search/decode_tokens": gen.num_decode_tokens,
      "search/naive_prefill_tokens": gen.num_naive_prefill_tokens,
  }
  metrics = _pooled_metrics(result) if multi else dict(result.metrics)
  if multi:  # This process's rows -> the global batch (rows [p*N/np, (p+1)*N/np) are ours).
    place = lambda x: sharding_lib.host_local_to_global(x, mesh, sharding_lib.ROLLOUT_RULES)
  else:
    place = lambda x: _place_batch(x, mesh)
  return SearchSampleOutput(
      tokens=place(result.response_ids), mask=place(result.response_mask),
      info_mask=place(result.info_mask), logprobs=place(result.logprobs), truncated=place(truncated),
      texts=result.texts, segments=result.segments, answers=result.answers,
      finish_reasons=result.finish_reasons,
      metrics={**metrics, **{k: float(v) for k, v in counters.items()}},
      num_prefill_tokens=gen.num_prefill_tokens, num_append_tokens=gen.num_append_tokens,
      num_append_real_tokens=gen.num_append_real_tokens,
      num_decode_tokens=gen.num_decode_tokens,
      num_naive_prefill_tokens=gen.num_naive_prefill_tokens)


def _pooled_metrics(result: sr.SearchRolloutResult) -> dict[str, float]:
  """The rollout metrics over every process's rows (what one process with the whole batch
  reports); timings stay this process's own."""
  codes = ("answer", "eos", "length", "max_turns")
  stats = np.stack([result.num_turns, result.num_searches, result.num_valid_actions,
                    [codes.index(f) for f in result.finish_reasons],
                    result.response_mask.sum(axis=1),
                    (result.info_mask * result.response_mask).sum(axis=1)], axis=1).astype(np.int64)
  truncations = np.array([result.metrics[f"search/truncated_{k}"] for k in sr.TRUNCATION_KINDS])
  gathered = allgather_objects((stats, truncations))
  stats = np.concatenate([g[0] for g in gathered])
  metrics = sr.search_metrics(stats[:, 0], stats[:, 1], stats[:, 2],
                              [codes[c] for c in stats[:, 3]], stats[:, 4], stats[:, 5])
  total = np.sum([g[1] for g in gathered], axis=0)
  metrics.update({f"search/truncated_{k}": float(v) for k, v in zip(sr.TRUNCATION_KINDS, total)})
  metrics.update({k: v for k, v in result.metrics.items() if k.startswith("time/")})
  return metrics


def gather_retrieved_text(out: SearchSampleOutput) -> list[str]:
  """Per response of the whole batch (all processes, in batch order), its retrieved text."""
  local = ["".join(text for text, retrieved in row if retrieved) for row in out.segments]
  return [t for part in allgather_objects(local) for t in part]


class _PadTokenizer:
  """The tokenizer as the rollout sees it, with the sampler's pad id (the output padding)."""

  def __init__(self, tokenizer: sr.Tokenizer, pad_token_id: int):
    self._tok, self.pad_token_id = tokenizer, pad_token_id
    self.eos_token_id = getattr(tokenizer, "eos_token_id", None)

  def encode(self, text, add_special_tokens=False):
    return self._tok.encode(text, add_special_tokens=add_special_tokens)

  def decode(self, ids, skip_special_tokens=False):
    return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
