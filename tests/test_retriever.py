"""The built-in BM25 server and the retriever client, against it and against misbehaving fakes."""

import http.server
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from bm25s.stopwords import STOPWORDS_EN

from grpo_jax import retriever as rt
from grpo_jax.rollout.retriever_client import RetrieverClient, RetrieverConfig, RetrieverError
from grpo_jax.testing.search import TINY_CORPUS, write_corpus_jsonl


@pytest.fixture(scope="module")
def server():
  with rt.start_server(TINY_CORPUS, topk=3) as s:
    yield s


def bm25_reference(docs, query, k1=1.5, b=0.75):
  """Lucene BM25, re-derived: idf = ln(1 + (N - df + .5) / (df + .5))."""
  stop = set(STOPWORDS_EN)
  tok = lambda s: [w for w in re.findall(r"(?u)\b\w\w+\b", s.lower()) if w not in stop]  # noqa
  doc_toks = [tok(d["contents"]) for d in docs]
  n, avgdl = len(docs), sum(map(len, doc_toks)) / len(docs)
  scores = []
  for toks in doc_toks:
    s = 0.0
    for term in set(tok(query)):
      df = sum(term in t for t in doc_toks)
      tf = toks.count(term)
      if tf:
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        s += idf * tf / (tf + k1 * (1 - b + b * len(toks) / avgdl))
    scores.append(s)
  return scores


def test_server_ranks_like_reference_bm25(server):
  client = RetrieverClient(RetrieverConfig(url=server.url, topk=3))
  queries = ["capital of Japan", "river in Africa", "largest city Switzerland café"]
  results = client.retrieve(queries)
  assert len(results) == 3
  for query, hits in zip(queries, results):
    ref = bm25_reference(TINY_CORPUS, query)
    best = sorted(range(len(ref)), key=lambda i: -ref[i])[:3]
    assert [h["score"] for h in hits] == pytest.approx([ref[i] for i in best], rel=1e-4)
    assert hits[0]["document"] == TINY_CORPUS[best[0]]
  assert results[0][0]["document"]["id"] == "2" and results[2][0]["document"]["id"] == "9"


def test_server_api_details(server):
  client = RetrieverClient(RetrieverConfig(url=server.url, topk=2))
  bare = client.retrieve(["Everest"], topk=20, return_scores=False)
  assert len(bare[0]) == len(TINY_CORPUS)  # topk is capped at the corpus size
  assert bare[0][0] == TINY_CORPUS[5]
  assert client.retrieve([]) == []
  assert client.num_requests == 1  # no request for an empty batch
  # Search-R1 falls back to the server's default topk for a null topk.
  body = json.dumps({"queries": ["Paris"], "topk": None, "return_scores": True}).encode()
  with urllib.request.urlopen(urllib.request.Request(server.url, data=body), timeout=10) as r:
    assert len(json.loads(r.read())["result"][0]) == 3
  health = server.url.replace("/retrieve", "/health")
  with urllib.request.urlopen(health, timeout=10) as r:
    assert json.loads(r.read()) == {"status": "ok", "num_docs": len(TINY_CORPUS)}


@pytest.mark.parametrize("body, detail", [
    (b"{not json", "malformed JSON"),
    (b'{"queries": "one"}', "queries"),
    (b'{"queries": ["a"], "topk": "3"}', "topk"),
    (b'{"queries": ["a"], "return_scores": 1}', "return_scores"),
])
def test_server_rejects_bad_requests(server, body, detail):
  with pytest.raises(urllib.error.HTTPError) as e:
    urllib.request.urlopen(urllib.request.Request(server.url, data=body), timeout=10)
  assert e.value.code == 400 and detail in json.loads(e.value.read())["detail"]


def test_client_does_not_retry_a_rejected_request(server):
  sleeps = []
  client = RetrieverClient(RetrieverConfig(url=server.url.replace("/retrieve", "/nope")),
                           sleep=sleeps.append)
  with pytest.raises(RetrieverError, match="rejected the request: HTTP 404"):
    client.retrieve(["q"])
  assert sleeps == [] and client.num_requests == 1


def test_load_corpus_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file"):
    rt.load_corpus(tmp_path / "missing.jsonl")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": 1, "contents": "ok"}\n\n{"id": 2, "contents": \n')
  with pytest.raises(ValueError, match=r"bad.jsonl:3: malformed JSON"):
    rt.load_corpus(bad)
  bad.write_text('{"id": 1, "text": "wrong field"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:1: expected an object with a str 'contents'"):
    rt.load_corpus(bad)
  bad.write_text('{"contents": "a"}\n{"id": "0", "contents": "b"}\n')  # "0" was synthesised
  with pytest.raises(ValueError, match=r"bad.jsonl:2: id '0' repeats line 1"):
    rt.load_corpus(bad)
  bad.write_text("\n")
  with pytest.raises(ValueError, match="no documents"):
    rt.load_corpus(bad)


def test_corpus_rows_without_id_get_their_position(tmp_path):
  """Search-R1's dense server needs no "id": rows without one are numbered by position."""
  corpus = tmp_path / "noid.jsonl"
  corpus.write_text('{"contents": "Apples\\nred fruit"}\n\n{"id": "x", "contents": "Pears\\ngreen"}\n'
                    '{"contents": "Plums\\npurple fruit"}\n')
  docs = rt.load_corpus(corpus)
  assert [d["id"] for d in docs] == ["0", "x", "2"]
  with rt.start_server(str(corpus)) as server:
    client = RetrieverClient(RetrieverConfig(url=server.url, max_retries=0))
    hits = client.retrieve(["purple plums"], topk=1)
  assert hits[0][0]["document"] == {"id": "2", "contents": "Plums\npurple fruit"}


def test_cli_serves_a_jsonl_corpus(tmp_path):
  corpus = write_corpus_jsonl(tmp_path / "corpus.jsonl")
  with socket.socket() as s:  # a free port for the subprocess
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen([sys.executable, "-m", "grpo_jax.retriever", f"--corpus={corpus}",
                           f"--port={port}", "--topk=1"], stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    client = RetrieverClient(RetrieverConfig(url=f"http://127.0.0.1:{port}/retrieve", topk=1,
                                             timeout_s=5, max_retries=40, backoff_s=0.25,
                                             max_backoff_s=0.25))
    hits = client.retrieve(["Who discovered polonium"])
    assert hits[0][0]["document"]["id"] == "7"
  finally:
    proc.terminate()
    proc.wait(timeout=10)
  bad = subprocess.run([sys.executable, "-m", "grpo_jax.retriever", "--corpus=/nonexistent"],
                       capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and "no such file '/nonexistent'" in bad.stderr


# ---------------------------------------------------------------------- client against bad servers

class _FakeHandler(http.server.BaseHTTPRequestHandler):
  """Answers from the server's `script`: a list of (status, body bytes, delay s), last one sticks."""

  def do_POST(self):  # noqa: N802
    self.rfile.read(int(self.headers.get("Content-Length") or 0))
    script = self.server.script
    status, body, delay = script.pop(0) if len(script) > 1 else script[0]
    self.server.hits += 1
    time.sleep(delay)
    try:
      self.send_response(status)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)
    except OSError:  # the client timed out and left
      pass

  def log_message(self, *args):
    pass


@pytest.fixture
def fake_server():
  servers = []

  def make(script):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHandler)
    srv.daemon_threads = True
    srv.script, srv.hits = list(script), 0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    servers.append(srv)
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/retrieve"

  yield make
  for srv in servers:
    srv.shutdown()
    srv.server_close()


OK_ONE = json.dumps({"result": [[{"document": {"id": "0", "contents": "T\nx"}, "score": 1.0}]]})


@pytest.mark.parametrize("script, error", [
    ([(500, b"boom", 0)], "HTTP 500"),
    ([(200, b"{not json", 0)], "malformed JSON"),
    ([(200, b'{"result": []}', 0)], "expected 1 result lists"),
    ([(200, b'{"result": [[{"document": {"id": 1}}]]}', 0)], "str 'contents'"),
    ([(200, b'{"hits": []}', 0)], "'result' list"),
    ([(200, OK_ONE.encode(), 1.0)], "timed out"),
])
def test_client_retries_then_fails_with_the_url(fake_server, script, error):
  srv, url = fake_server(script)
  sleeps = []
  client = RetrieverClient(RetrieverConfig(url=url, timeout_s=0.3, max_retries=2, backoff_s=0.5),
                           sleep=sleeps.append)
  with pytest.raises(RetrieverError) as e:
    client.retrieve(["q"])
  assert url in str(e.value) and error in str(e.value) and "3 attempt(s)" in str(e.value)
  assert sleeps == [0.5, 1.0]  # exponential back-off
  assert client.num_requests == 3


def test_client_recovers_after_transient_failures(fake_server):
  srv, url = fake_server([(503, b"", 0), (200, b"garbage", 0), (200, OK_ONE.encode(), 0)])
  sleeps = []
  client = RetrieverClient(RetrieverConfig(url=url, max_retries=3, backoff_s=0.1,
                                           max_backoff_s=0.15), sleep=sleeps.append)
  assert client.retrieve(["q"])[0][0]["score"] == 1.0
  assert sleeps == [0.1, 0.15] and srv.hits == 3 and client.num_retries == 2


def test_client_server_down():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # closed once the block ends: nothing listens there
  client = RetrieverClient(RetrieverConfig(url=f"http://127.0.0.1:{port}/retrieve",
                                           max_retries=1, backoff_s=0), sleep=lambda s: None)
  with pytest.raises(RetrieverError, match=rf"127.0.0.1:{port}/retrieve failed 2 attempt.*refused"):
    client.retrieve(["q"])


def test_client_config_validation():
  with pytest.raises(ValueError, match="retriever.url"):
    RetrieverConfig(url="localhost:8000")
  with pytest.raises(ValueError, match="retriever.max_retries"):
    RetrieverConfig(max_retries=-1)
  with pytest.raises(TypeError, match=r"queries\[1\]"):
    RetrieverClient(RetrieverConfig()).retrieve(["a", 3])
