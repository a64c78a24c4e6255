"""A built-in BM25 retrieval server with Search-R1's HTTP API.

  python -m grpo_jax.retriever --corpus=corpus.jsonl --port=8000 [--host=127.0.0.1] [--topk=3]

The corpus is JSONL, one ``{"id": ..., "contents": "Title\\ntext..."}`` per line (Search-R1's
wiki-18 format: the first line of ``contents`` is the title). ``"id"`` is optional, as for
Search-R1's dense server: a row without one gets ``str(i)``, ``i`` its 0-based position among the
corpus documents (blank lines not counted), which is the id FlashRAG's wiki-18 rows carry. Ranking is BM25 (Lucene variant,
k1=1.5, b=0.75) from the ``bm25s`` library over lower-cased word tokens with English stop words
removed. The API is that of Search-R1's ``retrieval_server.py``:

  POST /retrieve  {"queries": [str, ...], "topk": int | null, "return_scores": bool}
  200 -> {"result": [[{"document": {...corpus row...}, "score": float}, ...], ...]}
         (without return_scores: [[{...corpus row...}, ...], ...])
  400 -> {"detail": "..."} for a malformed request
  GET /health -> {"status": "ok", "num_docs": int}

Every query gets ``min(topk, len(corpus))`` hits, best first, even those with score 0 (as a dense
retriever would), so the policy always sees the same number of documents.

The server binds to 127.0.0.1 unless told otherwise: it has no authentication.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.server
import json
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

_STOPWORDS = "en"


def load_corpus(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """Reads a JSONL corpus; every line must be an object with a str "contents" (and maybe "id").

  A row without "id" gets ``"id": str(i)``, ``i`` its 0-based position among the documents (as
  FlashRAG numbers wiki-18); an id may not repeat, given or synthesised.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: a malformed line or a repeated id (names the file and the 1-based line number),
      or an empty corpus.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"corpus: no such file {path!r}")
  docs = []
  seen: dict[str, int] = {}  # id -> line, to refuse repeats
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
      if not isinstance(row, dict) or not isinstance(row.get("contents"), str):
        raise ValueError(
            f"{path}:{lineno}: expected an object with a str 'contents' (and optionally 'id'), "
            f"got {line.strip()[:120]}")
      if "id" not in row:
        row["id"] = str(len(docs))
      key = str(row["id"])
      if key in seen:
        raise ValueError(f"{path}:{lineno}: id {row['id']!r} repeats line {seen[key]} (rows "
                         f"without 'id' are numbered from 0 by position)")
      seen[key] = lineno
      docs.append(row)
  if not docs:
    raise ValueError(f"corpus: {path!r} holds no documents")
  return docs


class BM25Index:
  """BM25 over a list of documents ``{"id", "contents", ...}``; thread-safe `search`."""

  def __init__(self, docs: Sequence[dict[str, Any]]):
    import bm25s  # Imported here so that clients of this module do not pay for it.

    if not docs:
      raise ValueError("docs: expected at least one document")
    self._bm25s = bm25s
    self.docs = list(docs)
    tokens = bm25s.tokenize([d["contents"] for d in self.docs], stopwords=_STOPWORDS,
                            show_progress=False)
    self._index = bm25s.BM25()
    self._index.index(tokens, show_progress=False)
    # bm25s keeps scratch state during retrieve; the HTTP server is threaded.
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.docs)

  def search(self, queries: Sequence[str], topk: int) -> tuple[np.ndarray, np.ndarray]:
    """Best `topk` (at most len(docs)) document indices and scores per query, best first.

    Returns:
      (indices [Q, K] int, scores [Q, K] float32) with K = min(topk, len(docs)).
    """
    k = min(topk, len(self.docs))
    if not queries:
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    query_tokens = self._bm25s.tokenize(list(queries), stopwords=_STOPWORDS, return_ids=False,
                                        show_progress=False)
    with self._lock:
      indices, scores = self._index.retrieve(query_tokens, k=k, show_progress=False, n_threads=1)
    return np.asarray(indices), np.asarray(scores, np.float32)

  def retrieve(self, queries: Sequence[str], topk: int, return_scores: bool) -> list[list[Any]]:
    """The ``result`` field of a ``/retrieve`` response."""
    indices, scores = self.search(queries, topk)
    result = []
    for idx_K, score_K in zip(indices.tolist(), scores.tolist()):
      if return_scores:
        result.append([{"document": self.docs[i], "score": s} for i, s in zip(idx_K, score_K)])
      else:
        result.append([self.docs[i] for i in idx_K])
    return result


class _BadRequest(ValueError):
  pass


# The largest request body read (bytes): a batch of queries is kilobytes; anything near this is
# abuse or a bug, answered 413 without reading it.
MAX_BODY_BYTES = 8 << 20


def _parse_request(body: bytes, default_topk: int) -> tuple[list[str], int, bool]:
  try:
    request = json.loads(body.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _BadRequest(f"request body: malformed JSON ({e})") from None
  except RecursionError:
    raise _BadRequest("request body: JSON nested too deeply") from None
  if not isinstance(request, dict):
    raise _BadRequest("request body: expected a JSON object")
  queries = request.get("queries")
  if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
    raise _BadRequest("queries: expected a list of strings")
  topk = request.get("topk")
  if topk is None or topk == 0:  # Search-R1 falls back to the server's default for a falsy topk
    topk = default_topk
  if not isinstance(topk, int) or isinstance(topk, bool) or topk < 0:
    raise _BadRequest(f"topk: expected a positive int or null, got {topk!r}")
  return_scores = request.get("return_scores", False)
  if not isinstance(return_scores, bool):
    raise _BadRequest(f"return_scores: expected a bool, got {return_scores!r}")
  return queries, topk, return_scores


class RetrieverHTTPServer(http.server.ThreadingHTTPServer):
  """A threaded HTTP server that answers ``/retrieve`` from a :class:`BM25Index`."""

  daemon_threads = True

  def __init__(self, address: tuple[str, int], index: BM25Index | None, default_topk: int = 3):
    self.index = index
    self.default_topk = default_topk
    super().__init__(address, _Handler)

  @property
  def url(self) -> str:
    """The ``/retrieve`` endpoint URL."""
    host, port = self.server_address[:2]
    return f"http://{host}:{port}/retrieve"


class _Handler(http.server.BaseHTTPRequestHandler):
  server: RetrieverHTTPServer
  protocol_version = "HTTP/1.1"
  # Seconds a connection may stay silent (socket timeout): a client that announces more bytes
  # than it sends does not hold a thread forever.
  timeout = 60

  def _send_json(self, status: int, payload: Any) -> None:
    data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    self.send_response(status)
    self.send_header("Content-Type", "application/json; charset=utf-8")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def do_GET(self):  # noqa: N802 -- http.server's naming
    if self.path.rstrip("/") == "/health":
      self._send_json(200, {"status": "ok", "num_docs": len(self.server.index)})
    else:
      self._send_json(404, {"detail": f"no such path {self.path!r}; POST /retrieve"})

  def _body(self) -> bytes | None:
    """The request body; None after answering a bad Content-Length (the connection is closed:
    whatever follows on it cannot be framed)."""
    header = self.headers.get("Content-Length")
    try:
      length = int(header) if header is not None else 0
    except ValueError:
      length = -1
    if length < 0:
      self.close_connection = True
      self._send_json(400, {"detail": f"Content-Length: expected a byte count, got {header!r}"})
      return None
    if length > MAX_BODY_BYTES:
      self.close_connection = True
      self._send_json(413, {"detail": f"request body: {length} bytes, the limit is "
                                      f"{MAX_BODY_BYTES}"})
      return None
    return self.rfile.read(length)

  def do_POST(self):  # noqa: N802
    body = self._body()
    if body is None:
      return
    if self.path.rstrip("/") != "/retrieve":
      self._send_json(404, {"detail": f"no such path {self.path!r}; POST /retrieve"})
      return
    try:
      queries, topk, return_scores = _parse_request(body, self.server.default_topk)
    except _BadRequest as e:
      self._send_json(400, {"detail": str(e)})
      return
    self._send_json(200, {"result": self.server.index.retrieve(queries, topk, return_scores)})

  def log_message(self, format, *args):  # noqa: A002 -- signature from the base class
    logging.debug("retriever %s: " + format, self.address_string(), *args)


@dataclasses.dataclass
class RunningServer:
  """A server started by :func:`start_server`; `close()` (or `with`) stops it."""

  server: RetrieverHTTPServer
  thread: threading.Thread

  @property
  def url(self) -> str:
    return self.server.url

  def close(self) -> None:
    self.server.shutdown()
    self.server.server_close()
    self.thread.join(timeout=10)

  def __enter__(self) -> "RunningServer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def start_server(corpus: str | os.PathLike[str] | Sequence[dict[str, Any]] | BM25Index, *,
                 host: str = "127.0.0.1", port: int = 0, topk: int = 3) -> RunningServer:
  """Serves `corpus` from a background (daemon) thread; ``port=0`` picks a free port.

  Args:
    corpus: a JSONL path, a list of documents, or a built :class:`BM25Index`.
    host: interface to bind; loopback by default.
    port: TCP port; 0 lets the OS choose (read it from ``.url``).
    topk: documents per query when a request does not say.
  """
  if isinstance(corpus, BM25Index):
    index = corpus
  elif isinstance(corpus, (str, os.PathLike)):
    index = BM25Index(load_corpus(corpus))
  else:
    index = BM25Index(corpus)
  server = RetrieverHTTPServer((host, port), index, default_topk=topk)
  thread = threading.Thread(target=server.serve_forever, name="grpo_jax-retriever", daemon=True)
  thread.start()
  return RunningServer(server, thread)


class _OneLineParser(argparse.ArgumentParser):
  """Argument errors as one `error: ...` line (no usage block); `--help` shows the usage."""

  def error(self, message):
    self.exit(2, f"error: {message}\n")


def main(argv: Sequence[str] | None = None) -> None:
  parser = _OneLineParser(
      prog="python -m grpo_jax.retriever",
      description="BM25 retrieval server with Search-R1's /retrieve API.")
  parser.add_argument("--corpus", required=True, help="JSONL file of {'id', 'contents'} rows.")
  parser.add_argument("--host", default="127.0.0.1",
                      help="Interface to bind (default loopback; the server has no auth).")
  parser.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port).")
  parser.add_argument("--topk", type=int, default=3, help="Default documents per query.")
  args = parser.parse_args(argv)
  if args.topk < 1:
    parser.error(f"--topk: expected a positive int, got {args.topk}")
  if not 0 <= args.port <= 65535:
    parser.exit(2, f"error: --port: expected 0..65535, got {args.port}\n")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  if not os.path.isfile(args.corpus):
    parser.exit(2, f"error: --corpus: no such file {args.corpus!r}\n")
  # Bind first: a bad --host / --port is known before the corpus is read and indexed.
  try:
    server = RetrieverHTTPServer((args.host, args.port), None, default_topk=args.topk)
  except (OSError, OverflowError) as e:  # Unknown host, address in use, port not allowed.
    parser.exit(2, f"error: --host/--port: cannot listen on {args.host}:{args.port} "
                   f"({getattr(e, 'strerror', None) or e})\n")
  try:
    docs = load_corpus(args.corpus)
    server.index = BM25Index(docs)
  except (FileNotFoundError, ValueError) as e:
    server.server_close()
    parser.exit(2, f"error: {e}\n")
  logging.info("retriever: %d documents from %s, serving %s", len(docs), args.corpus, server.url)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


if __name__ == "__main__":
  main()
