#!/usr/bin/env bash
# Runs grpo_jax on every host of a Cloud TPU VM pod slice (v5e / v6e / v5p / v4): the same
# `python -m grpo_jax.train` on each worker, joined by jax.distributed.initialize() (auto-detected
# from the TPU metadata server: GRPO_JAX_DISTRIBUTED=auto).
#
# Usage (from your workstation, with gcloud authenticated and this repository checked out):
#   export TPU_NAME=my-v5e-32 ZONE=us-west4-a [PROJECT=my-project] [REMOTE_DIR=grpo_jax]
#   launch/tpu_pod.sh setup                 # copy this checkout to every worker, build its venv
#   launch/tpu_pod.sh train -- --config=configs/qwen2_5_0p5b_gsm8k.py --workdir=/mnt/shared/run1
#   launch/tpu_pod.sh logs                  # last lines of every worker's log
#   launch/tpu_pod.sh stop                  # SIGTERM: every worker checkpoints and exits
#
# The workdir must be ONE directory that every worker sees at the same path (Filestore / NFS, or a
# bucket mounted with gcsfuse at the same mount point on all workers): Orbax writes each checkpoint
# from all hosts together into it and process 0 writes metrics, TensorBoard and exports there.
# Data (TFDS data_dir, JSONL / Parquet files) and local model folders must be readable on every
# worker too: put them on the shared directory or copy them with `gcloud ... scp --worker=all`.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
REMOTE_DIR="${REMOTE_DIR:-grpo_jax}"
PYTHON_BIN="${PYTHON_BIN:-python3.11}"
gcloud_args=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && gcloud_args+=(--project="$PROJECT")

on_all_workers() {  # Runs one shell command on every worker at once; fails if any worker fails.
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_args[@]}" --worker=all --command="$1"
}

cmd="${1:-}"
shift || true
[[ "${1:-}" == "--" ]] && shift
case "$cmd" in
  setup)
    # Ship exactly what is committed (no venvs, no workdirs), identical on every worker.
    repo_root="$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)"
    archive="$(mktemp --suffix=.tar.gz)"
    git -C "$repo_root" archive --format=tar.gz -o "$archive" HEAD
    gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:/tmp/grpo_jax.tar.gz" \
        "${gcloud_args[@]}" --worker=all
    rm -f "$archive"
    on_all_workers "set -e
      rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf /tmp/grpo_jax.tar.gz -C ~/$REMOTE_DIR
      cd ~/$REMOTE_DIR
      $PYTHON_BIN -m venv .venv
      .venv/bin/pip install -q --upgrade pip
      .venv/bin/pip install -q -e . 'jax[tpu]'
      .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), \"TPU cores on\", \"\$(hostname)\")'"
    ;;
  train)
    [[ $# -gt 0 ]] || { echo "launch/tpu_pod.sh train: pass the train flags after --" >&2; exit 2; }
    args="$(printf '%q ' "$@")"
    # The same command on every worker; each writes its own log, process 0 also the workdir files.
    # nohup + setsid: the run survives a dropped ssh connection; `stop` ends it.
    on_all_workers "cd ~/$REMOTE_DIR && GRPO_JAX_DISTRIBUTED=auto \
      GRPO_JAX_HEARTBEAT_TIMEOUT_S=\${GRPO_JAX_HEARTBEAT_TIMEOUT_S:-120} \
      setsid nohup .venv/bin/python -m grpo_jax.train $args > ~/grpo_jax_train.log 2>&1 < /dev/null &
      echo \$! > ~/grpo_jax_train.pid
      echo started on \$(hostname): log ~/grpo_jax_train.log"
    ;;
  logs)
    on_all_workers "echo == \$(hostname); tail -n ${LINES_PER_WORKER:-20} ~/grpo_jax_train.log"
    ;;
  stop)
    # The loop turns SIGTERM into a checkpoint at the end of the current step, then exits.
    on_all_workers "kill -TERM \$(cat ~/grpo_jax_train.pid) 2>/dev/null || echo nothing running on \$(hostname)"
    ;;
  *)
    sed -n '2,18p' "$0"
    exit 2
    ;;
esac
