"""Does GRPO with LoRA learn? Full fine-tuning vs adapters vs adapters + final norm, same base.

The base is the tiny default model fitted on noisy labels (`grpo_jax.testing.pretrain`): it knows
the answer format and answers the requested digit now and then, as a pretrained model does on a
new task. Each variant runs the default config (digits task, G=16, 16 prompts per step) from that
base through the real CLI, in its own process, for the same number of steps and seed, and the
table reports the mean reward of the first and last 10 steps, the held-out greedy accuracy at the
end, the trainable parameter count and the median step time.

  python bench/lora_learning.py [--steps 100] [--bases "{'last': 0.2};{'first': 0.45, 'last': 0.3}"]

A base's mix gives the probability of each label being the first / last digit of the prompt (the
rest: a random digit). The "base" row is the base itself: one step at lr 1e-12, evaluated.
"""

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    "base (no training)": ["--config.lora.rank=0", "--config.optim.learning_rate=1e-12"],
    "full fine-tuning (lr 3e-3)": ["--config.lora.rank=0", "--config.optim.learning_rate=3e-3"],
    "LoRA r=8, adapters only (lr 1e-2)": ["--config.lora.rank=8",
                                         "--config.optim.learning_rate=1e-2"],
    "LoRA r=8 + final norm (lr 1e-2)": ["--config.lora.rank=8",
                                       "--config.lora.modules_to_save=('final_norm',)",
                                       "--config.optim.learning_rate=1e-2"],
}


def trainable_params(workdir):
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_names=("state", "data", "meta"))
  out = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mngr.close()
  return sum(int(np.size(x)) for x in jax.tree.leaves(out["state"]["params"]))


def run(base, workdir, steps, extra):
  cmd = [sys.executable, "-m", "grpo_jax.train", "--config=configs/default.py",
         f"--workdir={workdir}", f"--config.model.path={base}", f"--config.train.num_steps={steps}",
         f"--config.train.eval_every={steps}", "--config.train.eval_num_prompts=256",
         "--config.train.export_every=0",
         "--config.train.checkpoint_every=0", "--config.train.progress_bar=False", *extra]
  subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
  evals = [r for r in rows if "eval/greedy_accuracy" in r]
  times = [r["time/step_s"] for r in rows[1:] if "time/step_s" in r] or [float("nan")]
  return dict(first=statistics.mean(rewards[:10]), last=statistics.mean(rewards[-10:]),
              greedy=evals[-1]["eval/greedy_accuracy"], pass4=evals[-1]["eval/pass@4"],
              step_s=statistics.median(times), params=trainable_params(workdir))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--bases", default="{'last': 0.2};{'first': 0.45, 'last': 0.3}",
                      help="';'-separated label mixes of the pretrained bases "
                           "(grpo_jax.testing.pretrain.pretrain_digits_base)")
  args = parser.parse_args()
  from grpo_jax.testing.pretrain import pretrain_digits_base
  print(f"| base labels | variant | trainable params | reward, first 10 steps | reward, last 10 "
        f"of {args.steps} | greedy accuracy | pass@4 | median step s |")
  print("|---|---|---|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as tmp:
    for b, spec in enumerate(args.bases.split(";")):
      mix = ast.literal_eval(spec)
      base = pretrain_digits_base(os.path.join(tmp, f"base{b}"), mix=mix, steps=300)
      label = ", ".join(f"{v:.0%} {k}" for k, v in mix.items()) + ", rest random"
      for v, (name, extra) in enumerate(VARIANTS.items()):
        steps = 1 if name.startswith("base") else args.steps
        r = run(base, os.path.join(tmp, f"run{b}_{v}"), steps, extra)
        first, last = (f"{r['first']:.2f}", f"{r['last']:.2f}") if steps > 1 else (
            f"{r['first']:.2f}", "")
        print(f"| {label} | {name} | {r['params']:,} | {first} | {last} | {r['greedy']:.2f} | "
              f"{r['pass4']:.2f} | {r['step_s']:.3f} |", flush=True)


if __name__ == "__main__":
  main()
