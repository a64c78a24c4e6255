"""Default config: a tiny transformer learns the built-in `digits` task with GRPO on one CPU.

Run:  python -m grpo_jax.train --config=configs/default.py --workdir=/tmp/grpo_default
Override any field:  --config.rollout.group_size=16 --config.rl.kl_coef=0.0
Variants through the config argument: --config=configs/default.py:smoke (a few steps, for tests).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # PRNG seed of init, sampling and data order (int).

  # --- policy model -------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  # A local folder with an HF config.json + *.safetensors (grpo_jax.models.from_pretrained), or
  # "tiny": a random-init model built from the fields below.
  c.model.path = "tiny"  # "tiny" | path to a local HF model folder.
  c.model.vocab_size = 0  # tiny only: 0 = the tokenizer's vocabulary size (tokens).
  c.model.hidden_size = 64  # tiny only: model width (features).
  c.model.intermediate_size = 128  # tiny only: SwiGLU hidden width (features).
  c.model.num_layers = 2  # tiny only: decoder layers.
  c.model.num_heads = 4  # tiny only: query heads.
  c.model.num_kv_heads = 2  # tiny only: key/value heads (GQA).
  c.model.head_dim = 16  # tiny only: features per head.
  c.model.rope_theta = 10000.0  # tiny only: RoPE base.
  c.model.tie_word_embeddings = True  # tiny only: share embedding and LM head.
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16.
  c.model.param_dtype = "float32"  # parameter (and optimizer state) dtype: float32 | bfloat16.
  # Rematerialise every layer in the backward pass: True = always; False = only if the automatic
  # micro-batch plan needs it to fit (train.microbatch_size = 0).
  c.model.remat = False  # bool, see above.

  c.tokenizer = ""  # "" = the built-in tiny tokenizer (or the model folder's own); else a local HF folder.

  # --- data ---------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.source = "builtin:digits"  # builtin:<task> | tfds:<name> | jsonl:<path> | parquet:<path>.
  c.data.split = "train"  # split to train on.
  c.data.eval_split = "test"  # held-out split for evaluation ("" = no evaluation).
  c.data.data_dir = ""  # TFDS data_dir ("" = ~/.cache/grpo_jax/tfds for built-ins).
  c.data.prompt_field = "prompt"  # column with the prompt (dotted paths allowed).
  c.data.answer_field = "answer"  # column with the gold answer(s) (dotted paths allowed).
  c.data.template = "{prompt}"  # str.format template applied to the prompt.
  c.data.use_chat_template = False  # render the prompt with the tokenizer's chat template.
  c.data.system_prompt = ""  # system message when the chat template is used.
  c.data.max_prompt_len = 32  # prompts longer than this (tokens) are dropped and counted.
  c.data.length_buckets = (16, 32)  # padded prompt lengths (tokens); bounds recompiles.
  c.data.batch_size = 16  # prompts per step, over all hosts.
  c.data.shuffle = True  # shuffle each epoch with the seed.
  c.data.num_epochs = -1  # passes over the data (-1 = repeat forever).
  c.data.seed = 0  # seed of the data shuffle (int).
  c.data.drop_over_long = True  # drop (and count) over-long prompts; False = refuse the data.

  # --- rewards -------------------------------------------------------------------------------
  # A tuple, so the command line can set it: --config.rewards="(('numeric', 1.0, {}),)"
  c.rewards = (("digits", 1.0, {}),)  # (name or "pkg.module:fn", weight, kwargs), summed.

  # --- rollout ------------------------------------------------------------------------------
  c.rollout = ml_collections.ConfigDict()
  c.rollout.group_size = 16  # G: responses sampled per prompt.
  c.rollout.max_new_tokens = 4  # response length budget (tokens); longer rows are truncated.
  c.rollout.temperature = 1.0  # sampling temperature (0 = greedy).
  c.rollout.top_k = 0  # keep the k most likely tokens (0 = off).
  c.rollout.top_p = 1.0  # nucleus sampling mass (1.0 = off).
  c.rollout.stop_strings = ()  # extra strings whose token ends a response (besides EOS).

  # --- RL objective -------------------------------------------------------------------------
  c.rl = ml_collections.ConfigDict()
  c.rl.estimator = "grpo"  # advantage estimator: grpo | grpo_no_std | rloo | ... (advantages.py).
  c.rl.adv_eps = 1e-6  # eps in (r - mean) / (std + eps).
  c.rl.clip_low = 0.2  # PPO clip: ratio >= 1 - clip_low.
  c.rl.clip_high = 0.2  # PPO clip: ratio <= 1 + clip_high (DAPO clip-higher: 0.28).
  c.rl.dual_clip = 0.0  # dual-clip constant c > 1 for negative advantages (0 = off).
  c.rl.ratio_level = "token"  # token | sequence (GSPO).
  c.rl.agg_mode = "token-mean"  # token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm.
  c.rl.kl_coef = 0.0  # beta of the KL to the reference policy (0 = off, no reference kept).
  c.rl.kl_kind = "low_var_kl"  # k1 | k2 | k3 | low_var_kl.
  c.rl.entropy_coef = 0.0  # entropy bonus coefficient.
  c.rl.filter_zero_std_groups = False  # DAPO: drop groups whose rewards are all equal from the loss.
  c.rl.kl_on_filtered_groups = True  # when filtering, still apply the KL term to dropped groups.
  c.rl.overlong_buffer = 0  # DAPO overlong penalty: soft zone length before max_new_tokens (0 = off).
  c.rl.overlong_penalty = 1.0  # DAPO overlong penalty at the hard limit (reward units).

  # --- optimizer ----------------------------------------------------------------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 3e-3  # peak AdamW learning rate.
  c.optim.warmup_steps = 5  # linear warm-up (optimizer steps).
  c.optim.decay = "cosine"  # cosine | linear | constant after warm-up.
  c.optim.end_lr_factor = 0.1  # final lr = peak * end_lr_factor (cosine / linear).
  c.optim.weight_decay = 0.0  # AdamW decoupled weight decay.
  c.optim.b1 = 0.9  # Adam beta1.
  c.optim.b2 = 0.99  # Adam beta2.
  c.optim.eps = 1e-8  # Adam epsilon.
  c.optim.max_grad_norm = 1.0  # global-norm gradient clipping (0 = off).

  # --- training loop ------------------------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 200  # GRPO steps (rollout + update each).
  c.train.ppo_epochs = 1  # passes over each rollout batch.
  c.train.minibatch_size = 0  # responses per optimizer step (0 = the whole rollout batch).
  # Responses per forward/backward (gradient accumulation). 0 = sized automatically so that the
  # update's activations fit memory_budget_gb (logged at start-up; may turn model.remat on).
  c.train.microbatch_size = 0  # responses (0 = automatic, see above).
  # Memory for the update; 0 = 90% of an accelerator's, or 35% of host RAM (<= 6 GiB) on CPU.
  c.train.memory_budget_gb = 0.0  # GiB (0 = automatic, see above).
  c.train.lm_head_chunk = 0  # positions per LM-head chunk in the update (0 = <= 256 MB of logits).
  c.train.shared_prefix = True  # each prompt's forward once per group in the update (False: G times).
  # Update and old / ref forwards in micro-batches ordered by response length, each cut to the
  # smallest of R, R/2, R/4, R/8 (multiples of 16) holding its longest response (False: all at R).
  c.train.trim_responses = True  # bool, see above.
  # With trim_responses and shared_prefix: a micro-batch whose groups fit runs each group's G
  # responses packed one after the other in one row (segment ids in attention), so a group costs
  # the sum of its lengths, not G times its longest (False: each response its own padded row).
  c.train.pack_responses = True  # bool, see above.
  c.train.log_every = 1  # write metrics every N steps.
  c.train.eval_every = 50  # evaluate on the held-out split every N steps (0 = never).
  c.train.eval_num_prompts = 64  # held-out prompts per evaluation.
  c.train.eval_pass_k = 4  # k of pass@k (samples per held-out prompt).
  c.train.eval_success_reward = 1.0  # a response is correct when its total reward >= this.
  c.train.checkpoint_every = 50  # save every N steps (0 = only at the end).
  c.train.keep_checkpoints = 2  # checkpoints kept on disk.
  c.train.export_every = 50  # write the advantage Parquet every N steps (0 = never).
  c.train.export_token_groups = 2  # groups per export with a per-token view.
  c.train.final_export = ""  # at the end: "" | "hf" (merged HF checkpoint) | "peft" (adapters).
  c.train.progress_bar = True  # tqdm progress bar on process 0.
  c.train.max_nonfinite_steps = 5  # stop after this many steps in a row skipped as non-finite (0 = never).

  # --- LoRA (parameter-efficient GRPO) --------------------------------------------------------
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0  # adapter rank r (0 = full fine-tuning: every parameter is trained).
  c.lora.alpha = 16.0  # scale alpha / r of the adapter update.
  c.lora.dropout = 0.0  # dropout on the adapter input (probability).
  c.lora.target_modules = ("all-linear",)  # projections to adapt (regexes, e.g. "q_proj").
  # A frozen tied head caps how peaked a small policy can get; training the final norm (hidden_size
  # numbers) next to the adapters lifts the cap (BENCHMARKS.md, "LoRA learning").
  c.lora.modules_to_save = ()  # norms trained whole (PEFT modules_to_save): final_norm, attn_norm, mlp_norm (+ q_norm, k_norm on Qwen3).

  # --- device mesh --------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis (-1 = all remaining devices).
  c.mesh.fsdp = 1  # fully-sharded data-parallel axis.
  c.mesh.tensor = 1  # tensor-parallel axis.

  if arg:
    for part in arg.split(","):
      if part == "smoke":  # a few steps of everything, for tests and a first look.
        c.train.num_steps = 4
        c.train.eval_every = 2
        c.train.eval_num_prompts = 8
        c.train.checkpoint_every = 2
        c.train.export_every = 2
        c.data.batch_size = 4
        c.rollout.group_size = 4
        c.train.progress_bar = False
      else:
        raise ValueError(f"configs/default.py: unknown variant {part!r} (known: smoke)")
  return c
