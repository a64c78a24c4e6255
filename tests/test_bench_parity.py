"""grpo_jax and TRL compute the same quantities on the same weights and batch.

`bench/vs_trl.py` times the two trainers against each other; these checks make sure it times the
same computation. One tiny Qwen2-shaped model is built with grpo_jax, every parameter perturbed
(norms and biases included, so a dropped bias or a transposed matrix shows), written with
`save_pretrained` and loaded by TRL's `GRPOTrainer` through transformers. On one batch with
left-padded prompts and right-padded (early-stopped) responses we compare:

  * per-token log-probs and entropies of the responses: TRL's
    `_get_per_token_logps_and_entropies` vs `update.response_logprobs`;
  * the GRPO loss and its gradient for every weight: TRL's `_compute_loss` with
    `loss_type="dapo"` (token mean over the batch), beta = 0, vs `update.loss_fn` with
    `agg_mode="token-mean"`, both on-policy (old log-probs = detached current ones) and
    off-policy (given old log-probs far enough away that clipping is active).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from grpo_jax import losses, update  # noqa: E402
from grpo_jax.config import RLConfig  # noqa: E402
from grpo_jax.models import Decoder, save_pretrained  # noqa: E402
from grpo_jax.models.hf import hf_tensors  # noqa: E402
from grpo_jax.testing import models as tiny_models  # noqa: E402
from grpo_jax.testing import tokenizer as tiny_tok  # noqa: E402

# ~20-30 s on 2 shared cores, most of it building TRL's trainer once.
pytestmark = pytest.mark.slow

N, P, R = 6, 7, 5  # responses, prompt slots, response slots


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  import datasets
  import transformers

  path = str(tmp_path_factory.mktemp("parity_model"))
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_tok.default_tokenizer_dir())
  config = tiny_models.tiny_config("qwen2_tied", vocab_size=len(tokenizer))
  model = Decoder(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  # Perturb every weight (norms away from 1, biases away from 0) and make the logits spread out.
  leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  params = jax.tree.unflatten(treedef, leaves)
  save_pretrained(nnx.merge(graphdef, params), path, hf_config_extra={
      "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
  tokenizer.save_pretrained(path)

  args = trl.GRPOConfig(
      output_dir=str(tmp_path_factory.mktemp("trl_out")), report_to="none", use_cpu=True,
      bf16=False, gradient_checkpointing=False, per_device_train_batch_size=N,
      num_generations=2, max_completion_length=R, beta=0.0, epsilon=0.2, loss_type="dapo",
      temperature=1.0, use_vllm=False)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  trainer = trl.GRPOTrainer(model=hf_model, reward_funcs=[lambda completions, **kw: [0.0] * len(
      completions)], args=args, train_dataset=datasets.Dataset.from_dict({"prompt": ["a"] * N}),
                            processing_class=tokenizer)
  trainer.current_gradient_accumulation_steps = 1
  trainer.model.train()

  rng = np.random.default_rng(0)
  V = config.vocab_size
  prompt_pad = np.array([0, 2, 0, 4, 1, 0])  # left padding per row
  resp_len = np.array([5, 5, 3, 1, 4, 2])  # early stops: right padding
  prompt_mask = (np.arange(P)[None] >= prompt_pad[:, None]).astype(np.int64)
  resp_mask = (np.arange(R)[None] < resp_len[:, None]).astype(np.int64)
  tokens = rng.integers(3, V, (N, P + R))
  attn = np.concatenate([prompt_mask, resp_mask], axis=1)
  tokens = np.where(attn > 0, tokens, tokenizer.pad_token_id)
  advantages = np.array([1.2, -0.8, 0.5, -1.5, 0.9, -0.3], np.float32)  # both signs on long rows
  return dict(trainer=trainer, graphdef=graphdef, params=params, tokens=tokens, attn=attn,
              resp_mask=resp_mask, advantages=advantages)


def _trl_logps(s):
  t = s["trainer"]
  with torch.no_grad():
    logp, ent, _ = t._get_per_token_logps_and_entropies(
        t.model, torch.from_numpy(s["tokens"]), torch.from_numpy(s["attn"]), R,
        compute_entropy=True)
  return logp.numpy(), ent.numpy()


def test_response_logprobs_and_entropy_match_trl(setup):
  s = setup
  logp_trl, ent_trl = _trl_logps(s)
  logp, ent = update.response_logprobs(s["graphdef"], s["params"], jnp.asarray(s["tokens"]),
                                       jnp.asarray(s["attn"]), R, with_entropy=True)
  m = s["resp_mask"] > 0
  assert np.abs(logp_trl).max() > 1.0  # not a degenerate (uniform) distribution
  np.testing.assert_allclose(np.asarray(logp)[m], logp_trl[m], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(ent)[m], ent_trl[m], atol=2e-5, rtol=1e-5)


def _trl_loss_and_grads(s, old_logp):
  t = s["trainer"]
  tok, attn = torch.from_numpy(s["tokens"]), torch.from_numpy(s["attn"])
  inputs = {"prompt_ids": tok[:, :P], "prompt_mask": attn[:, :P],
            "completion_ids": tok[:, P:], "completion_mask": attn[:, P:],
            "advantages": torch.from_numpy(s["advantages"]),
            "num_items_in_batch": attn[:, P:].sum()}
  if old_logp is not None:
    inputs["old_per_token_logps"] = torch.from_numpy(old_logp)
  t.model.zero_grad(set_to_none=True)
  loss = t._compute_loss(t.model, inputs)
  loss.backward()
  grads = {name: p.grad.numpy().copy() for name, p in t.model.named_parameters()}
  t.model.zero_grad(set_to_none=True)
  return float(loss.detach()), grads


def _our_loss_and_grads(s, old_logp):
  rl = RLConfig(estimator="grpo", adv_eps=1e-4, loss=losses.LossConfig(
      clip_low=0.2, clip_high=0.2, agg_mode="token-mean", kl_coef=0.0, max_len=R))
  mask = jnp.asarray(s["resp_mask"], jnp.float32)
  batch = {"tokens": jnp.asarray(s["tokens"], jnp.int32),
           "attn_mask": jnp.asarray(s["attn"], jnp.int32), "loss_mask": mask, "kl_mask": mask,
           "advantages": jnp.asarray(s["advantages"])}
  if old_logp is not None:
    batch["old_logp"] = jnp.asarray(old_logp)
  den = update.minibatch_denominators(batch, rl)
  (loss, _), grads = jax.value_and_grad(update.loss_fn, has_aux=True)(
      s["params"], s["graphdef"], batch, rl, R, den, 1.0)
  return float(loss), hf_tensors(nnx.merge(s["graphdef"], grads))


@pytest.mark.parametrize("off_policy", [False, True])
def test_grpo_loss_and_gradients_match_trl(setup, off_policy):
  s = setup
  old = None
  if off_policy:  # Old log-probs off by up to ±0.8 nats: ratios in [0.45, 2.2], clipping active.
    logp_trl, _ = _trl_logps(s)
    shift = np.random.default_rng(1).uniform(-0.8, 0.8, logp_trl.shape).astype(np.float32)
    old = (logp_trl + shift) * s["resp_mask"]
    # Some tokens must sit on the clipped branch of either side, or clipping goes untested.
    ratio, adv = np.exp(-shift), s["advantages"][:, None]
    m = s["resp_mask"] > 0
    assert ((ratio > 1.2) & (adv > 0) & m).sum() >= 2 and ((ratio < 0.8) & (adv < 0) & m).sum() >= 2
  loss_trl, g_trl = _trl_loss_and_grads(s, old)
  loss, g = _our_loss_and_grads(s, old)
  np.testing.assert_allclose(loss, loss_trl, atol=1e-6, rtol=1e-5)
  if off_policy:
    assert abs(loss_trl) > 1e-2  # the clipped surrogate is not trivially 0 here
  assert set(g) == set(g_trl), (sorted(set(g) ^ set(g_trl)))
  scale = max(np.abs(v).max() for v in g_trl.values())
  assert scale > 1e-3
  for name in g_trl:
    np.testing.assert_allclose(g[name], g_trl[name], atol=1e-5 * scale, rtol=1e-4, err_msg=name)
