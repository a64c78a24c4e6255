"""Data layer: built-in TFDS builders, local files, the grain pipeline (order, resume, hosts)."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import transformers

from grpo_jax import data
from grpo_jax import rewards as rw
from grpo_jax.testing import datasets as tds
from grpo_jax.testing import tokenizer as tiny


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return transformers.AutoTokenizer.from_pretrained(
      tiny.build_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  for task in data.BUILTIN_TASKS:
    data.prepare_builtin(task, d)
  return d


def digits_cfg(data_dir, **kw):
  return data.DataConfig(source="builtin:digits", data_dir=data_dir, **kw)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, field", [
    ({"source": "hf:gsm8k"}, "source"),
    ({"source": "jsonl:"}, "source"),
    ({"template": "Q: {question}"}, "template"),
    ({"template": "{prompt"}, "template"),
    ({"batch_size": 0}, "batch_size"),
    ({"max_prompt_len": 64}, "length_buckets"),
    ({"length_buckets": (32, 16)}, "length_buckets"),
    ({"num_epochs": 0}, "num_epochs"),
    ({"shuffle": 1}, "shuffle"),
    ({"prompt_field": ""}, "prompt_field"),
])
def test_config_errors_name_the_field(kw, field):
  with pytest.raises(ValueError, match=rf"^config\.data\.{field}: "):
    data.DataConfig(**kw)


def test_config_normalises_buckets_and_forever():
  cfg = data.DataConfig(length_buckets=[8, 32], num_epochs=-1)
  assert cfg.length_buckets == (8, 32) and cfg.forever
  assert data.DataConfig(num_epochs=None).forever and not data.DataConfig(num_epochs=2).forever
  ev = data.eval_config(cfg)
  assert (ev.split, ev.shuffle, ev.num_epochs) == ("test", False, 1)


# ---------------------------------------------------------------------------------------------
# Built-in TFDS builders
# ---------------------------------------------------------------------------------------------


def test_builtin_builders_build_and_read_back(data_dir):
  import tensorflow_datasets as tfds
  for task in data.BUILTIN_TASKS:
    folder = os.path.join(data_dir, data.builder_name(task))
    files = os.listdir(os.path.join(folder, str(data.BUILTIN_TASKS[task].VERSION)))
    assert any(".array_record-" in f for f in files), files
  train = data.open_source(digits_cfg(data_dir), "train")
  test = data.open_source(digits_cfg(data_dir), "test")
  assert (len(train), len(test)) == (900, 100)
  rows = train.get_many(range(len(train))) + test.get_many(range(len(test)))
  assert len({r["prompt"] for r in rows}) == 1000  # all 1000 prompts, train and test disjoint
  for r in rows:
    digits = re.fullmatch(r"repeat the last digit: (\d) (\d) (\d)", r["prompt"]).groups()
    assert r["answer"] == digits[-1]
  # Readable by name through tfds.data_source too ("tfds:<name>" sources).
  raw = tfds.data_source("grpo_digits", split="test", data_dir=data_dir)
  assert len(raw) == 100 and isinstance(raw[0]["prompt"], bytes)


def _solve(question):
  """Independent solver of the arithmetic task's sentences."""
  total = int(re.search(r"has (\d+)", question).group(1))
  for kind, k in re.findall(r"then \w+ (finds|gives away|gets) (\d+)", question):
    k = int(k)
    total = total + k if kind == "finds" else total - k if kind == "gives away" else total * k
  return total


def test_arithmetic_gold_is_right_and_gsm8k_style(data_dir):
  cfg = data.DataConfig(source="builtin:arithmetic", data_dir=data_dir, max_prompt_len=128,
                        length_buckets=(128,))
  train, test = data.open_source(cfg, "train"), data.open_source(cfg, "test")
  assert (len(train), len(test)) == (2000, 200)
  rows = train.get_many(range(len(train)))
  test_rows = test.get_many(range(len(test)))
  assert not {r["prompt"] for r in rows} & {r["prompt"] for r in test_rows}
  for r in rows + test_rows:
    gold = int(r["answer"].rsplit("#### ", 1)[1])
    assert gold == _solve(r["prompt"]) >= 0
    for a, op, b, c in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", r["answer"]):
      assert eval(f"{a} {op} {b}") == int(c)  # pylint: disable=eval-used
    assert rw.numeric([""], [f"#### {gold}"], [r]) == [1.0]
  steps = {r["answer"].count("\n") for r in rows}
  assert steps >= {1, 2, 3}  # one to three worked steps


def test_prepare_builtin_concurrent_first_use(tmp_path):
  code = ("import sys; from grpo_jax import data; "
          "data.prepare_builtin('digits', sys.argv[1]); print('done')")
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  folder = tmp_path / "grpo_digits"
  assert os.listdir(folder) == [str(data.BUILTIN_TASKS["digits"].VERSION)]  # no leftover incomplete.* folder
  assert sum("Downloading and preparing" in out + err for out, err in outs) == 1  # built exactly once
  cfg = digits_cfg(str(tmp_path))
  assert data.num_examples(cfg) == 900 and data.num_examples(cfg, "test") == 100


def test_tfds_not_prepared_says_what_to_run(tmp_path):
  cfg = data.DataConfig(source="tfds:gsm8k", data_dir=str(tmp_path), prompt_field="question")
  with pytest.raises(data.DataError) as info:
    data.check_source(cfg)
  msg = str(info.value)
  assert "\n" not in msg and info.value.__cause__ is None and info.value.__suppress_context__
  assert f"tfds build gsm8k --data_dir={tmp_path} --file_format=array_record" in msg


def test_tfds_source_reads_prepared_dataset(data_dir, tok):
  cfg = data.DataConfig(source="tfds:grpo_digits", data_dir=data_dir, batch_size=4)
  data.check_source(cfg)
  batch = next(iter(data.make_dataset(cfg, tok)))
  assert all(re.fullmatch(r"repeat the last digit: \d \d \d", t) for t in batch["prompt_text"])


# ---------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------


def test_jsonl_source(tmp_path, tok):
  tds.write_jsonl(tmp_path / "train.jsonl", tds.qa_rows())
  cfg = data.DataConfig(source=f"jsonl:{tmp_path}/{{split}}.jsonl", eval_split="",
                        prompt_field="question", answer_field="answers",
                        template="Q: {prompt} (id {id}) A:", max_prompt_len=64,
                        length_buckets=(64,), batch_size=6, shuffle=False, num_epochs=1)
  data.check_source(cfg)
  batch = next(iter(data.make_dataset(cfg, tok)))
  rows = tds.qa_rows()
  assert batch["prompt_text"] == [f"Q: {r['question']} (id {r['id']}) A:" for r in rows]
  assert batch["answer"] == [r["answers"] for r in rows]
  assert batch["example"] == [{"id": r["id"]} for r in rows]
  assert batch["index"].tolist() == list(range(6))


def test_search_r1_parquet_with_chat_template(tmp_path, tok):
  tds.write_search_r1_parquet(tmp_path / "test.parquet", split="test")
  cfg = data.DataConfig(source=f"parquet:{tmp_path}/{{split}}.parquet", split="test",
                        eval_split="", answer_field="reward_model.ground_truth.target",
                        use_chat_template=True, system_prompt="be brief", max_prompt_len=512,
                        length_buckets=(256, 512), batch_size=2, shuffle=False)
  data.check_source(cfg)
  batch = next(iter(data.make_dataset(cfg, tok)))
  rows = tds.search_r1_rows("test")
  expected = [f"<|system|>be brief<|end|><|user|>{r['prompt'][0]['content']}<|end|><|assistant|>"
              for r in rows[:2]]
  assert batch["prompt_text"] == expected
  assert batch["answer"] == [["Paris"], ["Nile", "the Nile", "Nile River"]]
  assert batch["example"][1]["data_source"] == "nq"
  assert batch["example"][1]["extra_info"] == {"split": "test", "index": 1}
  assert batch["example"][1]["reward_model"]["ground_truth"]["target"][0] == "Nile"
  out = rw.make_reward_fn([("exact_match", 1.0)])(
      batch["prompt_text"], ["<answer>paris</answer>", "<answer>Nile river</answer>"],
      [{**e, "answer": a} for e, a in zip(batch["example"], batch["answer"])])
  assert out.total.tolist() == [1.0, 1.0]


def test_local_file_errors(tmp_path, tok):
  cfg = data.DataConfig(source=f"jsonl:{tmp_path}/{{split}}.jsonl")
  with pytest.raises(data.DataError, match=r"no file .*train\.jsonl' for split 'train'"):
    data.check_source(cfg)
  (tmp_path / "train.jsonl").write_text('{"prompt": "a", "answer": "b"}\nnot json\n')
  with pytest.raises(data.DataError, match=r"train\.jsonl:2: not valid JSON"):
    data.num_examples(cfg)
  tds.write_jsonl(tmp_path / "train.jsonl", tds.qa_rows())
  with pytest.raises(data.DataError, match=r"config\.data\.prompt_field: example 0 has no "
                                           r"'prompt'.*'answers', 'id', 'question'"):
    data.check_source(dataclasses.replace(cfg, eval_split=""))
  bad = tmp_path / "x.parquet"
  bad.write_text("not parquet")
  with pytest.raises(data.DataError, match="cannot read as Parquet"):
    data.num_examples(data.DataConfig(source=f"parquet:{bad}"))


# The first rows of GSM8K's train split as `openai/gsm8k` (config `main`) publishes them on the
# hub: Parquet with string columns `question` and `answer`; the answer is the worked solution with
# calculator annotations, the final number after "#### ".
GSM8K_ROWS = (
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                 "clips in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
               "clips altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
                 "babysitting. How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned "
               "0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
    {"question": "A shop sold 1,200 pens on Monday and 150 fewer on Tuesday. How many pens did it "
                 "sell in total?",
     "answer": "On Tuesday it sold 1200-150 = <<1200-150=1050>>1050 pens.\nIn total it sold "
               "1200+1050 = <<1200+1050=2250>>2,250 pens.\n#### 2,250"},
)


def _write_gsm8k(root):
  """`hf download openai/gsm8k --repo-type dataset --include "main/*"`'s layout, with the schema
  metadata the `datasets` library writes."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  features = {"question": {"dtype": "string", "_type": "Value"},
              "answer": {"dtype": "string", "_type": "Value"}}
  schema = pa.schema([("question", pa.string()), ("answer", pa.string())],
                     metadata={"huggingface": json.dumps({"info": {"features": features}})})
  os.makedirs(root / "main", exist_ok=True)
  for split, rows in (("train", GSM8K_ROWS), ("test", GSM8K_ROWS[:2])):
    pq.write_table(pa.Table.from_pylist(list(rows), schema=schema),
                   root / "main" / f"{split}-00000-of-00001.parquet")


def test_gsm8k_parquet_from_the_hub_with_the_gsm8k_config(tmp_path, tok):
  """configs/qwen2_5_0p5b_gsm8k.py reads the hub's GSM8K Parquet files as they are published."""
  from grpo_jax.config import load_config
  _write_gsm8k(tmp_path / "gsm8k")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  c = load_config(f"{root}/configs/qwen2_5_0p5b_gsm8k.py")
  assert c.data.source == "parquet:~/data/gsm8k/main/{split}-00000-of-00001.parquet"
  data_cfg = dict(c.data.to_dict(), batch_size=3, shuffle=False)
  data_cfg["source"] = c.data.source.replace("~/data/gsm8k", str(tmp_path / "gsm8k"))
  cfg = data.DataConfig(**data_cfg)
  data.check_source(cfg)
  assert data.num_examples(cfg, "test") == 2
  batch = next(iter(data.make_dataset(cfg, tok)))
  # The config's instruction inside the tokenizer's chat template.
  assert batch["prompt_text"][0] == (
      f"<|user|>{GSM8K_ROWS[0]['question']}\nLet's think step by step and output the final "
      f"answer after \"####\".<|end|><|assistant|>")
  assert batch["answer"] == [[r["answer"]] for r in GSM8K_ROWS]
  # The gold number is the one after "#### " (not the last annotation), thousands commas included.
  assert [rw.extract_number(a[0]) for a in batch["answer"]] == [72.0, 10.0, 2250.0]
  completions = ["48 + 24 = 72\n#### 72", "She earned $10.\n#### 10", "#### 2250"]
  wrong = ["#### 24", "#### 0.2", "1200 + 1050 = 2250, so #### 1,050"]
  fn = rw.make_reward_fn([tuple(r) for r in c.rewards])
  examples = [{**e, "answer": a} for e, a in zip(batch["example"], batch["answer"])]
  right = fn(batch["prompt_text"], completions, examples).total.tolist()
  assert right == pytest.approx([1.1, 1.1, 1.1])  # numeric 1.0 + format 0.1
  assert fn(batch["prompt_text"], wrong, examples).total.tolist() == pytest.approx([0.1] * 3)


def test_pad_id_is_the_pad_token_else_eos(tmp_path, tok):
  """One rule for the data pipeline and the sampler (train.Steps): Llama 3 has no pad token."""
  from grpo_jax.data.pipeline import pad_id_of
  assert pad_id_of(tok) == tok.pad_token_id != tok.eos_token_id
  no_pad = transformers.AutoTokenizer.from_pretrained(tok.name_or_path, pad_token=None)
  assert no_pad.pad_token_id is None and pad_id_of(no_pad) == tok.eos_token_id
  neither = transformers.AutoTokenizer.from_pretrained(tok.name_or_path, pad_token=None,
                                                        eos_token=None)
  with pytest.raises(ValueError, match="neither a pad nor an eos token"):
    pad_id_of(neither)


# ---------------------------------------------------------------------------------------------
# The grain pipeline
# ---------------------------------------------------------------------------------------------


def _indices(ds, steps):
  it = iter(ds)
  return [next(it)["index"].tolist() for _ in range(steps)]


def test_order_is_deterministic_for_a_seed_and_reshuffles_each_epoch(data_dir, tok):
  cfg = digits_cfg(data_dir, split="test", batch_size=10, num_epochs=2)
  a = _indices(data.make_dataset(cfg, tok), 20)
  assert a == _indices(data.make_dataset(cfg, tok), 20)
  assert a != _indices(data.make_dataset(dataclasses.replace(cfg, seed=1), tok), 20)
  epoch1, epoch2 = sum(a[:10], []), sum(a[10:], [])
  assert sorted(epoch1) == sorted(epoch2) == list(range(100))  # each epoch: every example once
  assert epoch1 != epoch2 and epoch1 != list(range(100))
  unshuffled = _indices(data.make_dataset(dataclasses.replace(cfg, shuffle=False), tok), 10)
  assert sum(unshuffled, []) == list(range(100))
  ds = data.make_dataset(cfg, tok)
  assert len(ds) == 20 and len(list(iter(ds))) == 20


def test_resume_from_saved_iterator_state(data_dir, tok):
  cfg = digits_cfg(data_dir, batch_size=8)
  it = iter(data.make_dataset(cfg, tok))
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # JSON-able, as it goes into the checkpoint
  expected = [next(it) for _ in range(4)]
  resumed = iter(data.make_dataset(cfg, tok))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert set(got) == set(want)
    for key in want:
      if isinstance(want[key], np.ndarray):
        np.testing.assert_array_equal(got[key], want[key])
      else:
        assert got[key] == want[key]
  assert resumed.get_state() == it.get_state()


def test_host_slices_are_disjoint_and_cover_the_data(data_dir, tok):
  cfg = digits_cfg(data_dir, split="test", batch_size=10, num_epochs=1)
  hosts = [data.make_dataset(cfg, tok, process_index=p, process_count=2) for p in range(2)]
  whole = data.make_dataset(cfg, tok)
  seen = [[], []]
  for step, (b0, b1, bw) in enumerate(zip(*hosts, whole)):
    assert b0["prompt_ids"].shape[0] == b1["prompt_ids"].shape[0] == 5
    assert b0["prompt_ids"].shape == b1["prompt_ids"].shape  # same bucket on every host
    np.testing.assert_array_equal(np.concatenate([b0["index"], b1["index"]]), bw["index"])
    np.testing.assert_array_equal(np.concatenate([b0["prompt_ids"], b1["prompt_ids"]]),
                                  bw["prompt_ids"])
    np.testing.assert_array_equal(hosts[0].global_indices(step), bw["index"])
    seen[0] += b0["index"].tolist()
    seen[1] += b1["index"].tolist()
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(100))
  with pytest.raises(ValueError, match="batch_size: 10 prompts do not divide over 3 hosts"):
    data.make_dataset(cfg, tok, process_index=0, process_count=3)


def test_left_padding_and_length_buckets(tmp_path, tok):
  rows = [{"prompt": "x" * n, "answer": "y"} for n in (3, 5, 9, 12, 2, 1, 16, 4)]
  tds.write_jsonl(tmp_path / "train.jsonl", rows)
  cfg = data.DataConfig(source=f"jsonl:{tmp_path}/train.jsonl", eval_split="",
                        max_prompt_len=16, length_buckets=(4, 8, 16), batch_size=2,
                        shuffle=False, num_epochs=1)
  pad = tok.pad_token_id
  for batch in data.make_dataset(cfg, tok):
    lengths = [len(tok(t)["input_ids"]) for t in batch["prompt_text"]]
    width = min(b for b in (4, 8, 16) if b >= max(lengths))
    assert batch["prompt_ids"].shape == (2, width) and batch["prompt_ids"].dtype == np.int32
    assert batch["prompt_mask"].dtype == np.int32
    for row, mask, text, n in zip(batch["prompt_ids"], batch["prompt_mask"],
                                  batch["prompt_text"], lengths):
      assert mask.tolist() == [0] * (width - n) + [1] * n
      assert row.tolist() == [pad] * (width - n) + tok(text)["input_ids"]


def test_over_long_prompts_are_dropped_and_counted(tmp_path, tok):
  rows = [{"prompt": "x" * n, "answer": "y"} for n in (3, 40, 9, 17, 2, 16, 100, 4)]
  tds.write_jsonl(tmp_path / "train.jsonl", rows)
  cfg = data.DataConfig(source=f"jsonl:{tmp_path}/train.jsonl", eval_split="",
                        max_prompt_len=16, length_buckets=(8, 16), batch_size=1, num_epochs=1)
  ds = data.make_dataset(cfg, tok)
  over = [i for i, r in enumerate(rows) if len(tok(r["prompt"])["input_ids"]) > 16]
  assert over == [1, 3, 6]
  assert (ds.stats.num_examples, ds.stats.num_kept, ds.stats.num_over_long) == (8, 5, 3)
  assert ds.stats.over_long_indices == (1, 3, 6)
  assert sorted(b["index"][0] for b in ds) == [0, 2, 4, 5, 7]
  with pytest.raises(data.DataError, match=r"config\.data\.max_prompt_len: 3 prompts .* "
                                           r"\(example 1: 40 tokens\)"):
    data.make_dataset(dataclasses.replace(cfg, drop_over_long=False), tok)


def test_eval_split_and_rewards_of_the_digits_task(data_dir, tok):
  cfg = digits_cfg(data_dir, batch_size=20)
  ev = data.make_dataset(data.eval_config(cfg), tok)
  batches = list(ev)
  assert len(batches) == 5 and sum(len(b["index"]) for b in batches) == 100
  assert sorted(sum((b["index"].tolist() for b in batches), [])) == list(range(100))
  batch = batches[0]
  fn = rw.make_reward_fn([("digits", 1.0)])
  examples = [{**e, "answer": a} for e, a in zip(batch["example"], batch["answer"])]
  right = [a[0] for a in batch["answer"]]
  assert fn(batch["prompt_text"], right, examples).total.tolist() == [1.0] * 20
  wrong = [str((int(a) + 1) % 10) for a in right]
  np.testing.assert_array_equal(fn(batch["prompt_text"], wrong, examples).total,
                                np.full(20, 0.5, np.float32))  # stopped, wrong digit
  assert batch["prompt_ids"].shape == (20, 16)  # 14 tokens: the smallest bucket
