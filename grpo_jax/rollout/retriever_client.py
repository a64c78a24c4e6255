"""HTTP client for a Search-R1-compatible retrieval server.

The API is Search-R1's ``search_r1/search/retrieval_server.py`` (and :mod:`grpo_jax.retriever`):

  POST /retrieve  {"queries": [str, ...], "topk": int, "return_scores": bool}
  200 -> {"result": [[{"document": {"id": ..., "contents": str}, "score": float}, ...], ...]}

one list of hits per query, in query order (without ``return_scores`` each hit is the bare
document). A rollout sends the queries of all rows of a turn in one request.

Failures are retried with exponential back-off (timeouts, refused connections, 5xx, 408, 429,
and malformed JSON or a result of the wrong shape, which a restarting server can produce); any other
4xx fails at once (the same request cannot succeed). After ``max_retries`` retries a
:class:`RetrieverError` that names the URL and the last cause is raised, so the training loop can
stop before touching its state (the last checkpoint stays intact). Standard library only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

Hit = dict[str, Any]


class RetrieverError(RuntimeError):
  """The retriever could not answer a batch (after retries); the message names the URL."""


@dataclasses.dataclass(frozen=True)
class RetrieverConfig:
  """Where the retriever is and how patiently to talk to it.

  Attributes:
    url: full endpoint, e.g. "http://127.0.0.1:8000/retrieve".
    topk: documents per query.
    timeout_s: per-request socket timeout in seconds.
    max_retries: retries after the first attempt (0: fail at once).
    backoff_s: sleep before retry i (0-based) is backoff_s * 2**i seconds.
    max_backoff_s: cap on one sleep, in seconds.
  """

  url: str = "http://127.0.0.1:8000/retrieve"
  topk: int = 3
  timeout_s: float = 30.0
  max_retries: int = 3
  backoff_s: float = 1.0
  max_backoff_s: float = 30.0

  def __post_init__(self):
    if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
      raise ValueError(f"retriever.url: expected an http(s):// URL, got {self.url!r}")
    if not isinstance(self.topk, int) or self.topk < 1:
      raise ValueError(f"retriever.topk: expected a positive int, got {self.topk!r}")
    if not self.timeout_s > 0:
      raise ValueError(f"retriever.timeout_s: expected > 0 seconds, got {self.timeout_s!r}")
    if not isinstance(self.max_retries, int) or self.max_retries < 0:
      raise ValueError(f"retriever.max_retries: expected an int >= 0, got {self.max_retries!r}")
    if self.backoff_s < 0 or self.max_backoff_s < 0:
      raise ValueError(
          f"retriever.backoff_s/max_backoff_s: expected >= 0, got {self.backoff_s!r}, "
          f"{self.max_backoff_s!r}")


def _error_body(error: urllib.error.HTTPError) -> str:
  try:
    return error.read()[:200].decode("utf-8", "replace")
  except Exception:  # noqa: BLE001 -- the body is only decoration for the message
    return ""


class _BadResponse(Exception):
  """A response that arrived but cannot be used (status, JSON or shape); retried."""


class RetrieverClient:
  """Batched ``/retrieve`` calls with timeouts, retries and back-off.

  Args:
    config: the :class:`RetrieverConfig`.
    sleep: the sleep function (tests pass a fake one to check the back-off schedule).
  """

  def __init__(self, config: RetrieverConfig, sleep: Callable[[float], None] = time.sleep):
    self.config = config
    self._sleep = sleep
    self.num_requests = 0  # HTTP attempts, retries included (for metrics)
    self.num_retries = 0

  def retrieve(self, queries: Sequence[str], topk: int | None = None,
               return_scores: bool = True) -> list[list[Hit]]:
    """Hits for each query, in query order: ``[{"document": {...}, "score": float}, ...]``.

    Without ``return_scores`` the hits are the bare documents. An empty `queries` makes no request.

    Raises:
      TypeError: a query is not a str.
      RetrieverError: the server stayed unreachable or kept answering unusably.
    """
    queries = list(queries)
    for i, q in enumerate(queries):
      if not isinstance(q, str):
        raise TypeError(f"queries[{i}]: expected str, got {type(q).__name__}")
    if not queries:
      return []
    topk = self.config.topk if topk is None else topk
    body = json.dumps({"queries": queries, "topk": topk, "return_scores": return_scores},
                      ensure_ascii=False).encode("utf-8")
    last_error = "no attempt made"
    for attempt in range(self.config.max_retries + 1):
      if attempt:
        delay = min(self.config.backoff_s * 2 ** (attempt - 1), self.config.max_backoff_s)
        logging.warning("retriever %s: attempt %d failed (%s); retrying in %.2fs",
                        self.config.url, attempt, last_error, delay)
        self.num_retries += 1
        self._sleep(delay)
      self.num_requests += 1
      try:
        return self._parse(self._post(body), len(queries), return_scores)
      except _BadResponse as e:
        last_error = str(e)
      except urllib.error.HTTPError as e:
        last_error = f"HTTP {e.code} {e.reason}: {_error_body(e)}"
        if 400 <= e.code < 500 and e.code not in (408, 429):
          # The request itself is wrong (e.g. an older server with another schema): retrying the
          # same bytes cannot help.
          raise RetrieverError(f"retriever at {self.config.url} rejected the request: "
                               f"{last_error}") from None
      except (urllib.error.URLError, OSError) as e:  # refused, DNS, timeout (socket.timeout)
        last_error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
    raise RetrieverError(
        f"retriever at {self.config.url} failed {self.config.max_retries + 1} attempt(s) for a "
        f"batch of {len(queries)} queries; last error: {last_error}. Is the server running "
        f"(python -m grpo_jax.retriever --corpus=... --port=...)?")

  def _post(self, body: bytes) -> bytes:
    request = urllib.request.Request(
        self.config.url, data=body, method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
      return response.read()

  @staticmethod
  def _parse(raw: bytes, num_queries: int, return_scores: bool) -> list[list[Hit]]:
    try:
      payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise _BadResponse(f"malformed JSON ({e}): {raw[:120]!r}") from None
    result = payload.get("result") if isinstance(payload, dict) else None
    if not isinstance(result, list):
      raise _BadResponse(f"expected a JSON object with a 'result' list, got {str(payload)[:120]}")
    if len(result) != num_queries:
      raise _BadResponse(f"expected {num_queries} result lists (one per query), got {len(result)}")
    for i, hits in enumerate(result):
      if not isinstance(hits, list):
        raise _BadResponse(f"result[{i}]: expected a list of hits, got {type(hits).__name__}")
      for j, hit in enumerate(hits):
        doc = hit.get("document") if return_scores and isinstance(hit, dict) else hit
        if not isinstance(doc, dict) or not isinstance(doc.get("contents"), str):
          raise _BadResponse(f"result[{i}][{j}]: expected a document with str 'contents', got "
                             f"{str(hit)[:120]}")
    return result
