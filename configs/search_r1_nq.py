"""Search-R1 on NQ with Qwen2.5-3B: the paper's setting, with retrieved tokens masked out of the loss.

Prepare (once, on machines with internet), as Search-R1 does:
  hf download Qwen/Qwen2.5-3B --local-dir ~/models/Qwen2.5-3B
  python scripts/data_process/nq_search.py      # from the Search-R1 repo: writes train/test.parquet
  # start Search-R1's retrieval server (or ours: python -m grpo_jax.retriever --corpus=... --port=8000)
Then:
  python -m grpo_jax.train --config=configs/search_r1_nq.py --workdir=/tmp/search_r1_nq \
    --config.data.source=parquet:$HOME/data/nq_search/{split}.parquet
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "grpo_default_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))
default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(default)


def get_config(arg: str | None = None):
  c = default.get_config()
  c.model.path = os.path.expanduser("~/models/Qwen2.5-3B")  # local HF folder.
  c.model.dtype = "bfloat16"  # compute dtype.
  c.model.param_dtype = "float32"  # master weights.
  c.model.remat = True  # long multi-turn sequences.
  c.data.source = "parquet:" + os.path.expanduser("~/data/nq_search/{split}.parquet")
  c.data.prompt_field = "prompt"  # chat list written by Search-R1's nq_search.py.
  c.data.answer_field = "reward_model.ground_truth.target"  # gold answers.
  c.data.use_chat_template = True  # render with Qwen's chat template.
  c.data.max_prompt_len = 512  # tokens.
  c.data.length_buckets = (256, 512)  # tokens.
  c.data.batch_size = 512  # prompts per step (Search-R1: train_batch_size 512).
  # EM on the extracted answer (Search-R1 main_ppo: v0.1/v0.2 and the root train_grpo.sh); its
  # v0.3 runs use ("search_r1_format", 1.0, {}): 0.2 structure / 0.1 final-format credit.
  c.rewards = (("search_r1", 1.0, {}),)
  c.rollout.group_size = 5  # G (Search-R1's GRPO runs use n_agent 5).
  # Whole response, sampled + retrieved tokens (Search-R1 cuts it at max_prompt_length 4096):
  # 5 turns x 500 sampled + 4 observations x 500 fit.
  c.rollout.max_new_tokens = 4096
  c.rollout.temperature = 1.0
  c.rl.kl_coef = 0.001  # beta.
  c.rl.kl_kind = "low_var_kl"
  c.optim.learning_rate = 1e-6
  c.optim.warmup_steps = 20
  c.optim.decay = "constant"
  c.train.num_steps = 1005
  c.train.minibatch_size = 640  # responses per optimizer step.
  c.train.microbatch_size = 32  # responses per forward/backward.
  c.train.eval_every = 50
  c.train.eval_num_prompts = 512
  c.train.checkpoint_every = 50
  c.train.export_every = 50
  c.mesh.data = 1  # with fsdp = -1: shard params over every device (3B + Adam).
  c.mesh.fsdp = -1

  c.search = default.ml_collections.ConfigDict()
  c.search.enabled = True  # multi-turn Search-R1 rollouts.
  c.search.url = "http://127.0.0.1:8000/retrieve"  # Search-R1's retrieval server.
  c.search.local_corpus = ""  # or a JSONL corpus for the built-in BM25 server.
  c.search.topk = 3  # documents per search.
  c.search.max_turns = 4  # turns with search; one more without.
  c.search.max_turn_tokens = 500  # sampled per turn (Search-R1 data.max_response_length).
  c.search.max_obs_tokens = 500  # per observation (Search-R1 data.max_obs_length).
  c.search.max_sampled_tokens = 0  # sampled in all (0 = only the response budget; as Search-R1).
  c.search.max_obs_total_tokens = 0  # observation tokens in all (0 = only the response budget).
  c.search.max_doc_chars = 0  # 0 = no character cap.
  c.search.eos_without_action = "invalid"  # Search-R1: EOS before an action gets the corrective
                                           # observation ("end": the row ends there).
  c.search.timeout_s = 60.0  # per request (seconds).
  c.search.max_retries = 5  # then the run stops with its last checkpoint intact.
  c.search.backoff_s = 1.0  # first back-off (seconds), doubled each retry.
  if arg:
    raise ValueError(f"configs/search_r1_nq.py: unknown variant {arg!r}")
  return c
