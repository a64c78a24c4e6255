#!/usr/bin/env bash
# Starts N processes of `python -m grpo_jax.train` on this machine, each with its own CPU devices,
# joined by JAX's distributed runtime (gloo collectives): a multi-host run without a cluster.
# The tests use it; it is also the quickest way to see a multi-host bug before a pod does.
#
# Usage:
#   launch/local.sh [-n PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] [-l LOG_DIR] -- TRAIN_ARGS...
#   launch/local.sh -n 2 -d 2 -- --config=configs/default.py:smoke --workdir=/tmp/grpo_2x2
#
# Every process runs the same command line; each learns its id from GRPO_JAX_PROCESS_ID.
# Without -l, output is interleaved on this terminal, each line prefixed by `[p<i>]`; with -l, each
# process writes LOG_DIR/process_<i>.log and its pid to LOG_DIR/process_<i>.pid.
# Exit status: 0 if every process succeeded, else the status of the first one (by id) that failed.
# The launcher does not kill the survivors when one process dies: JAX's coordination service does
# (heartbeat timeout GRPO_JAX_HEARTBEAT_TIMEOUT_S, default 100 s), with an error naming the task.
set -euo pipefail

num=2
devices=2
port=""
logdir=""
python="${PYTHON:-python}"
while getopts "n:d:p:l:h" opt; do
  case "$opt" in
    n) num="$OPTARG" ;;
    d) devices="$OPTARG" ;;
    p) port="$OPTARG" ;;
    l) logdir="$OPTARG" ;;
    h) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "launch/local.sh: see -h" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
for v in "$num" "$devices"; do
  if ! [[ "$v" =~ ^[1-9][0-9]*$ ]]; then
    echo "launch/local.sh: -n and -d: expected positive integers, got '$v'" >&2; exit 2
  fi
done
if [[ -z "$port" ]]; then  # A free port, chosen by the kernel.
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
[[ -n "$logdir" ]] && mkdir -p "$logdir"

pids=()
forward() {  # Ctrl-C / SIGTERM on the launcher reach every process (they checkpoint on SIGTERM).
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap forward INT TERM

# Our device count wins over one inherited from the caller (a test session with 8 devices).
xla_flags="$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<< "${XLA_FLAGS:-}")"
xla_flags="${xla_flags} --xla_force_host_platform_device_count=${devices}"

for ((i = 0; i < num; i++)); do
  env JAX_PLATFORMS=cpu \
      XLA_FLAGS="$xla_flags" \
      JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
      GRPO_JAX_COORDINATOR="127.0.0.1:${port}" \
      GRPO_JAX_NUM_PROCESSES="$num" \
      GRPO_JAX_PROCESS_ID="$i" \
      "$python" -m grpo_jax.train "$@" \
      > >(if [[ -n "$logdir" ]]; then cat > "$logdir/process_$i.log"; else sed -u "s/^/[p$i] /"; fi) 2>&1 &
  pids+=("$!")
  [[ -n "$logdir" ]] && echo "$!" > "$logdir/process_$i.pid"
done

status=0
for i in "${!pids[@]}"; do
  while :; do  # `wait` also returns when a trapped signal arrives: wait again until it exits.
    rc=0
    wait "${pids[$i]}" || rc=$?
    kill -0 "${pids[$i]}" 2>/dev/null || break
  done
  if [[ $rc -ne 0 ]]; then
    echo "launch/local.sh: process $i (pid ${pids[$i]}) exited with status $rc" >&2
    [[ $status -eq 0 ]] && status=$rc
  fi
done
exit "$status"
