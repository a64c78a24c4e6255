"""GGUF file -> Hugging Face model folder that `grpo_jax.models.from_pretrained` loads.

People in the llama.cpp world hold GGUF files; this turns one into a plain HF folder
(config.json, model.safetensors, tokenizer files and chat template):

  python -m grpo_jax.models.gguf SmolLM2-135M-Instruct.Q4_1.gguf ~/models/SmolLM2-135M-Instruct

transformers does the reading and de-quantizing (`from_pretrained(..., gguf_file=...)`, which needs
the `gguf` package and torch: `pip install 'grpo_jax[gguf]'`); the tokenizer and chat template come
from the same file. The weights are written de-quantized (float32 by default), so a Q4 file's
rounding is kept, not undone. Only the families our decoder implements are accepted (GGUF
architectures llama, qwen2, qwen3); anything else fails before the slow load, in one line.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Any

# GGUF `general.architecture` values whose transformers model our Decoder implements.
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")

_MAGIC = b"GGUF"


class GGUFError(ValueError):
  """A GGUF file this converter cannot turn into a model folder (the message names the file)."""


def _require_packages() -> None:
  try:
    import gguf  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise GGUFError("reading GGUF files needs the `gguf` package: "
                    f"pip install 'grpo_jax[gguf]' ({e})") from e
  # transformers de-quantizes GGUF tensors with torch; importing it takes seconds, finding it not.
  if importlib.util.find_spec("torch") is None:
    raise GGUFError("reading GGUF files needs the `torch` package: pip install 'grpo_jax[gguf]'")


def gguf_architecture(path: str) -> str:
  """Checks that `path` is a GGUF file of a supported family and returns its architecture.

  Reads only the header (memory-mapped), so it is fast even for multi-GB files.

  Raises:
    GGUFError: missing file, not a GGUF file, unsupported architecture, `gguf` not installed.
  """
  if not os.path.isfile(path):
    raise GGUFError(f"{path}: no such file")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != _MAGIC:
    raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected {_MAGIC!r})")
  _require_packages()
  import gguf  # pylint: disable=import-outside-toplevel
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # pylint: disable=broad-except  # a truncated / corrupt header
    raise GGUFError(f"{path}: unreadable GGUF file ({type(e).__name__}: {e})") from e
  field = reader.fields.get("general.architecture")
  arch = field.contents() if field is not None else None
  name_field = reader.fields.get("general.name")
  name = str(name_field.contents()) if name_field is not None else ""
  if arch not in SUPPORTED_GGUF_ARCHITECTURES:
    raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported by grpo_jax's decoder "
                    f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})")
  # transformers reads a llama-architecture file named "mistral" as a Mistral model (a model type
  # our decoder does not load).
  if arch == "llama" and "mistral" in name.lower():
    raise GGUFError(f"{path}: GGUF model {name!r} is read by transformers as 'mistral', which "
                    f"grpo_jax's decoder does not support")
  return arch


def convert(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *,
            dtype: str = "float32") -> str:
  """Writes the HF folder of a GGUF file and returns `out_dir`.

  Args:
    gguf_path: a GGUF file of a llama / qwen2 / qwen3 model (any quantization transformers reads).
    out_dir: the folder to write (created; files of the same names are overwritten).
    dtype: dtype of the written weights ("float32" or "bfloat16").

  Raises:
    GGUFError: see `gguf_architecture`; also when the converted config is one our decoder refuses.
  """
  gguf_path = os.path.abspath(os.fspath(gguf_path))
  out_dir = os.fspath(out_dir)
  if dtype not in ("float32", "bfloat16"):
    raise GGUFError(f"dtype: expected 'float32' or 'bfloat16', got {dtype!r}")
  gguf_architecture(gguf_path)
  # Imported here: transformers + torch take seconds to import, the checks above do not need them.
  import transformers  # pylint: disable=import-outside-toplevel
  from grpo_jax.models.config import config_from_hf  # pylint: disable=import-outside-toplevel

  folder, name = os.path.split(gguf_path)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
  hf_config: dict[str, Any] = model.config.to_dict()
  try:
    config_from_hf(hf_config, source=f"{gguf_path} (converted config)")
  except ValueError as e:
    raise GGUFError(str(e)) from e
  # The weights are de-quantized in memory; save_pretrained refuses a model that still carries
  # the GGUF quantizer, and a quantization_config in config.json would make loaders expect GGUF.
  model.config.quantization_config = None
  model.hf_quantizer = None
  os.makedirs(out_dir, exist_ok=True)
  model.save_pretrained(out_dir)
  tokenizer.save_pretrained(out_dir)
  return out_dir


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m grpo_jax.models.gguf",
      description="Convert a GGUF file (llama / qwen2 / qwen3) into a Hugging Face model folder "
                  "that grpo_jax.models.from_pretrained loads.")
  parser.add_argument("gguf_file", help="the .gguf file")
  parser.add_argument("out_dir", help="folder to write (config.json, model.safetensors, tokenizer)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="dtype of the written weights (default float32)")
  args = parser.parse_args(argv)
  try:
    convert(args.gguf_file, args.out_dir, dtype=args.dtype)
  except GGUFError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out_dir} (from {args.gguf_file})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
