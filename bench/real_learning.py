"""GRPO improves a real pretrained model: SmolLM2-135M-Instruct on the built-in `addition` task.

Runs `configs/smollm2_addition.py` through the real CLI, each run in its own process:

1. the base model, evaluated: one step at learning rate 1e-12 (the weights do not move), then the
   held-out evaluation (greedy accuracy and pass@4 on 72 held-out prompts);
2. the training run (full fine-tuning, or `--variant lora`), evaluated every `--eval-every` steps.

It prints a markdown table (step, mean training reward, held-out greedy accuracy and pass@4) and
writes a PNG of the curves, the base evaluation drawn at step 0.

  python bench/real_learning.py [--steps 20] [--variant ""|lora] [--png bench/results/x.png]
      [--workdir /tmp/real_learning] [--skip-base]

Extra `--config.*` overrides after `--` go to both runs.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # grpo_jax from this checkout (peft_parity imports it in this process).


def cli(workdir, config_arg, overrides, log):
  cmd = [sys.executable, "-m", "grpo_jax.train", f"--config=configs/smollm2_addition.py{config_arg}",
         f"--workdir={workdir}", *overrides]
  print("$", " ".join(cmd), flush=True)
  t0 = time.time()
  with open(log, "w") as f:
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=f, stderr=subprocess.STDOUT)
  print(f"  done in {time.time() - t0:.0f} s (log {log})", flush=True)
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def peft_parity(base_dir, peft_dir):
  """Loads the PEFT export with `peft` over the base folder; returns (max |logit diff| to our merged
  model relative to max |logit|, max |logit change| the adapters make) on a few rendered prompts."""
  import jax.numpy as jnp
  import numpy as np
  import peft
  import torch
  import transformers
  from grpo_jax import models
  tok = transformers.AutoTokenizer.from_pretrained(base_dir)
  texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                   add_generation_prompt=True) + a
           for q, a in [("What is 3 + 14? Answer with the number only.", "17"),
                        ("What is 19 + 8? Answer with the number only.", "19 + 8 = 27."),
                        ("Name a colour.", "Blue")]]
  enc = tok(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="np")
  ids, mask = enc["input_ids"], enc["attention_mask"]
  ours = np.asarray(models.merge_lora(models.load_peft_adapters(
      models.from_pretrained(base_dir), peft_dir))(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  base = np.asarray(models.from_pretrained(base_dir)(jnp.asarray(ids),
                                                     attention_mask=jnp.asarray(mask)))
  hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
  pm = peft.PeftModel.from_pretrained(hf, peft_dir).eval()
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    theirs = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(pos)).logits.float().numpy()
  keep = mask.astype(bool)
  scale = np.abs(theirs[keep]).max()
  return (float(np.abs(ours - theirs)[keep].max() / scale),
          float(np.abs(ours - base)[keep].max() / scale))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--eval-every", type=int, default=10)
  parser.add_argument("--variant", default="", help="config variant, e.g. 'lora'")
  parser.add_argument("--workdir", default="/tmp/real_learning")
  parser.add_argument("--png", default=os.path.join(ROOT, "bench", "results",
                                                     "real_learning_smollm2_addition.png"))
  parser.add_argument("--skip-base", action="store_true", help="reuse <workdir>/base if present")
  parser.add_argument("--report-only", action="store_true",
                      help="no runs: the table and PNG from the metrics already in <workdir> "
                           "(e.g. of a run that was stopped early)")
  parser.add_argument("overrides", nargs="*", help="extra --config.* flags (after --)")
  args = parser.parse_args()
  config_arg = f":{args.variant}" if args.variant else ""
  os.makedirs(args.workdir, exist_ok=True)

  base_dir = os.path.join(args.workdir, "base")
  if not (args.skip_base or args.report_only) or not os.path.exists(
      os.path.join(base_dir, "metrics.jsonl")):
    subprocess.run(["rm", "-rf", base_dir], check=True)
    cli(base_dir, config_arg, ["--config.train.num_steps=1", "--config.train.eval_every=1",
                               "--config.optim.learning_rate=1e-12", *args.overrides],
        os.path.join(args.workdir, "base.log"))
  base_rows = [json.loads(line) for line in open(os.path.join(base_dir, "metrics.jsonl"))]
  base_eval = [r for r in base_rows if "eval/greedy_accuracy" in r][-1]

  run_dir = os.path.join(args.workdir, "train" + (f"_{args.variant}" if args.variant else ""))
  if args.report_only:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
  else:
    subprocess.run(["rm", "-rf", run_dir], check=True)
    rows = cli(run_dir, config_arg, [f"--config.train.num_steps={args.steps}",
                                     f"--config.train.eval_every={args.eval_every}",
                                     *args.overrides],
               os.path.join(args.workdir, os.path.basename(run_dir) + ".log"))

  rewards = {r["step"]: r["reward/mean"] for r in rows if "reward/mean" in r}
  truncated = {r["step"]: r["response/truncated_frac"] for r in rows if "reward/mean" in r}
  evals = {r["step"]: r for r in rows if "eval/greedy_accuracy" in r}
  k = next(key for key in base_eval if key.startswith("eval/pass@"))
  print(f"\n| step | mean reward (this step) | mean reward (last 5 steps) | responses cut at the "
        f"budget | held-out greedy accuracy | held-out {k[5:]} |")
  print("|---|---|---|---|---|---|")
  print(f"| 0 (base) | {base_rows[0]['reward/mean']:.2f} | | "
        f"{base_rows[0]['response/truncated_frac']:.2f} | {base_eval['eval/greedy_accuracy']:.2f} "
        f"| {base_eval[k]:.2f} |")
  for s in sorted(rewards):
    window = [rewards[t] for t in range(max(1, s - 4), s + 1) if t in rewards]
    ev = (f"{evals[s]['eval/greedy_accuracy']:.2f} | {evals[s][k]:.2f}" if s in evals else " | ")
    print(f"| {s} | {rewards[s]:.2f} | {statistics.mean(window):.2f} | {truncated[s]:.2f} | {ev} |")

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  steps = sorted(rewards)
  ax.plot(steps, [rewards[s] for s in steps], color="tab:blue", alpha=0.35, label="mean reward (step)")
  smooth = [statistics.mean([rewards[t] for t in steps if s - 4 <= t <= s]) for s in steps]
  ax.plot(steps, smooth, color="tab:blue", label="mean reward (last 5 steps)")
  es = [0, *sorted(evals)]
  ax.plot(es, [base_eval["eval/greedy_accuracy"]] + [evals[s]["eval/greedy_accuracy"]
                                                    for s in es[1:]],
          "o-", color="tab:red", label="held-out greedy accuracy")
  ax.plot(es, [base_eval[k]] + [evals[s][k] for s in es[1:]], "s--", color="tab:green",
          label=f"held-out {k[5:]}")
  ax.set_xlabel("GRPO step")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  ax.set_title(f"SmolLM2-135M-Instruct, addition task, {args.variant or 'full fine-tuning'}")
  os.makedirs(os.path.dirname(args.png), exist_ok=True)
  fig.tight_layout()
  fig.savefig(args.png, dpi=100)
  print(f"wrote {args.png}")

  peft_dir = os.path.join(run_dir, "peft_export")
  if os.path.isdir(peft_dir):
    diff, moved = peft_parity(json.load(open(os.path.join(peft_dir, "adapter_config.json")))[
        "base_model_name_or_path"], peft_dir)
    print(f"PEFT export loaded with peft over the base folder: max |logit diff| to our merged model "
          f"{diff:.2e} of max |logit|; the adapters move logits by up to {moved:.2e} of it")


if __name__ == "__main__":
  main()
