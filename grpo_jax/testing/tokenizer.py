"""A tiny word/character-level tokenizer built in code and saved as an ordinary HF tokenizer folder.

Nothing can be downloaded in tests and smoke runs, yet every run should load its tokenizer through
the same `transformers.AutoTokenizer.from_pretrained(path)` path as a pretrained model's. So we build
a small `tokenizers` model here and save it with `save_pretrained`.

Vocabulary (about 170 tokens): special tokens (`<pad>`, `</s>` = EOS, `<unk>`), chat role markers,
the reasoning tags (`<think>`, `</think>`, `<answer>`, `</answer>`, ...) as single tokens, every
printable ASCII character, and the words of the built-in tasks as single tokens. Any other text falls
back to characters (unknown characters, e.g. non-ASCII, become `<unk>`). Decoding concatenates
tokens, so `decode(encode(s)) == s` for ASCII text.

Building is deterministic: the same files byte for byte on every call.
"""

from __future__ import annotations

import os
import re
import shutil
import string
import tempfile

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>", "<search>", "</search>",
              "<information>", "</information>", "####")
# Words of the built-in tasks (grpo_jax.data.builtin): whole-word tokens keep prompts short.
WORDS = (
    "repeat", "digit", "copy", "answer", "the", "of", "and", "has", "have", "how", "many", "more",
    "gives", "away", "buys", "loses", "finds", "each", "times", "what", "does", "now", "apples",
    "pears", "coins", "books", "cards", "stones", "shells", "marbles", "he", "she", "they", "then",
    "gets", "sells", "is", "are", "per", "box", "boxes", "bag", "bags", "left", "total", "in",
    "ann", "ben", "cat", "dan", "eve", "fay", "gus", "hal", "ivy", "jo", "think", "step", "by",
    "final", "question", "user", "assistant", "system", "search", "information", "last", "as",
)
CHARS = tuple(ch for ch in string.printable if ch not in "\t\r\x0b\x0c")  # 95 printable + "\n"

# A simple chat template (Jinja, as HF tokenizers carry them): role marker, content, end marker.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")

_VERSION = "2"  # Bump when the vocabulary changes: the cache directory name includes it.


def vocabulary() -> list[str]:
  """The tokens in id order (ids are positions): special, roles, tags, characters, words."""
  vocab: list[str] = []
  for tok in (*SPECIAL_TOKENS, *ROLE_TOKENS, *TAG_TOKENS, *CHARS, *WORDS):
    if tok not in vocab:  # single-letter words are already characters
      vocab.append(tok)
  return vocab


def build_tokenizer(path: str | os.PathLike) -> str:
  """Writes the tiny tokenizer as an HF tokenizer folder at `path` and returns `path`.

  Load it with `transformers.AutoTokenizer.from_pretrained(path)`.
  """
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers
  import transformers

  vocab = vocabulary()
  model = models.WordLevel(vocab={t: i for i, t in enumerate(vocab)}, unk_token=UNK)
  tok = tokenizers.Tokenizer(model)
  # Longest alternatives first, whole words only (\b), then any single character.
  multi = sorted((t for t in vocab[len(SPECIAL_TOKENS) + len(ROLE_TOKENS):] if len(t) > 1),
                 key=lambda t: (-len(t), t))
  words = [re.escape(t) if not t.isalpha() else rf"\b{t}\b" for t in multi]
  pattern = "|".join(words + [r"[\s\S]"])
  tok.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(list(SPECIAL_TOKENS) + list(ROLE_TOKENS))
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
      padding_side="left", model_max_length=4096)
  fast.chat_template = CHAT_TEMPLATE
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  fast.save_pretrained(path)
  return path


def default_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> str:
  """The tiny tokenizer's folder under `cache_dir` (default: $GRPO_JAX_CACHE or ~/.cache/grpo_jax).

  Built on first use into a temporary folder that is renamed into place, so concurrent first uses
  (several processes, several hosts on a shared disk) never see a half-written folder.
  """
  root = os.fspath(cache_dir) if cache_dir is not None else os.environ.get(
      "GRPO_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "grpo_jax"))
  path = os.path.join(root, f"tiny_tokenizer_v{_VERSION}")
  if os.path.isfile(os.path.join(path, "tokenizer.json")):
    return path
  os.makedirs(root, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tiny_tokenizer_", dir=root)
  try:
    build_tokenizer(tmp)
    try:
      os.rename(tmp, path)
    except OSError:  # Another process won the race; its folder is complete.
      if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return path
