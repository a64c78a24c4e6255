"""Data: built-in TFDS tasks, TFDS catalogue datasets, JSONL / Parquet files, grain pipelines.

Public API:
  DataConfig, eval_config                                         (config.py)
  make_dataset, PromptDataset, DataStats, render_prompt, left_pad, bucket_length  (pipeline.py)
  open_source, num_examples, check_source, DataError             (sources.py)
  prepare_builtin, BUILTIN_TASKS, builder_name, default_data_dir (builtin.py: TFDS builders)
"""

from grpo_jax.data.config import DataConfig, eval_config
from grpo_jax.data.sources import DataError, check_source, num_examples, open_source
from grpo_jax.data.pipeline import (DataStats, PromptDataset, bucket_length, left_pad,
                                    make_dataset, render_prompt)
from grpo_jax.data.builtin import BUILTIN_TASKS, builder_name, default_data_dir, prepare_builtin

__all__ = [
    "BUILTIN_TASKS", "DataConfig", "DataError", "DataStats", "PromptDataset", "bucket_length",
    "builder_name", "check_source", "default_data_dir", "eval_config", "left_pad",
    "make_dataset", "num_examples", "open_source", "prepare_builtin", "render_prompt",
]
