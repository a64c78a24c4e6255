"""Search-R1 end to end on one CPU: a tiny random-init policy, the built-in BM25 retriever over a
ten-document corpus, NQ-format Parquet questions, multi-turn rollouts with retrieved tokens masked
out of the loss. It checks the plumbing, not learning (a random policy rarely answers right).

  python -m grpo_jax.train --config=configs/search_r1_tiny.py --workdir=/tmp/search_tiny
The corpus and the Parquet files are written on first use under ~/.cache/grpo_jax/search_tiny.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "grpo_default_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))
default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(default)


def _tiny_files() -> str:
  """Writes the tiny corpus and train/test Parquet once; returns their folder."""
  from grpo_jax.testing import search as search_fixtures
  folder = os.path.join(os.path.expanduser(os.environ.get("GRPO_JAX_CACHE", "~/.cache/grpo_jax")),
                        "search_tiny")
  os.makedirs(folder, exist_ok=True)
  for name, write in (("corpus.jsonl", search_fixtures.write_corpus_jsonl),
                      ("train.parquet", search_fixtures.write_nq_parquet),
                      ("test.parquet", search_fixtures.write_nq_parquet)):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
      tmp = f"{path}.tmp{os.getpid()}{os.path.splitext(path)[1]}"
      write(tmp)
      os.replace(tmp, path)
  return folder


def get_config(arg: str | None = None):
  c = default.get_config()
  folder = _tiny_files()
  c.data.source = f"parquet:{folder}/{{split}}.parquet"  # FlashRAG NQ columns.
  c.data.prompt_field = "question"  # question column.
  c.data.answer_field = "golden_answers"  # gold answers (any one counts).
  c.data.template = ("Answer the question. Search with <search> query </search>, answer with "
                     "<answer> answer </answer>.\nQuestion: {prompt}\n")  # short Search-R1 style.
  c.data.max_prompt_len = 192  # tokens (the built-in tokenizer is character level).
  c.data.length_buckets = (192,)  # tokens.
  c.data.batch_size = 4  # prompts per step.
  c.rewards = (("search_r1", 1.0, {}),)  # EM of the last <answer> against any gold answer.
  c.rollout.group_size = 4  # G.
  c.rollout.max_new_tokens = 160  # whole response budget R: sampled + retrieved tokens.
  c.train.num_steps = 4
  c.train.eval_every = 2
  c.train.eval_num_prompts = 4
  c.train.eval_pass_k = 2
  c.train.checkpoint_every = 2
  c.train.export_every = 2
  c.train.progress_bar = False
  # A 2-layer model computes its update in no time; packing would compile 8 more branches into each
  # update program (minutes of compile on a CPU for nothing). Trimming (4 buckets) stays on.
  c.train.pack_responses = False

  c.search = default.ml_collections.ConfigDict()
  c.search.enabled = True  # multi-turn Search-R1 rollouts.
  c.search.url = ""  # remote retriever's /retrieve URL ("" = use local_corpus).
  c.search.local_corpus = f"{folder}/corpus.jsonl"  # served by the built-in BM25 server.
  c.search.topk = 2  # documents per search.
  c.search.max_turns = 2  # turns with search; one more without.
  c.search.max_turn_tokens = 48  # tokens sampled per turn.
  c.search.max_obs_tokens = 64  # retrieved tokens per observation (cut beyond).
  c.search.max_sampled_tokens = 0  # sampled tokens in all (0 = only the response budget).
  c.search.max_obs_total_tokens = 0  # observation tokens in all (0 = only the response budget).
  c.search.max_doc_chars = 0  # cap on document characters (0 = none).
  c.search.eos_without_action = "end"  # EOS before an action ends the row ("invalid": Search-R1).
  c.search.timeout_s = 10.0  # per retriever request (seconds).
  c.search.max_retries = 2  # retries after the first attempt.
  c.search.backoff_s = 0.2  # first back-off (seconds), doubled each retry.
  if arg:
    raise ValueError(f"configs/search_r1_tiny.py: unknown variant {arg!r}")
  return c
