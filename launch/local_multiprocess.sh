#!/usr/bin/env bash
# Runs one `landiff-jax` command as N local JAX processes (the multi-controller runtime) on simulated CPU
# devices: a way to try multi-host training, checkpointing and data sharding on one machine.
#
#   bash launch/local_multiprocess.sh [-d DEVICES_PER_PROCESS] [-p PORT] N -- <landiff-jax args>
#
#   bash launch/local_multiprocess.sh 2 -- train lm --config=configs/train.py:lm,tiny \
#       --config.train.data_dir=data/lm-tokens --config.train.workdir=/tmp/lm-2proc \
#       --config.parallel.mesh.data=2 --config.parallel.mesh.fsdp=4
#
# Process i runs `landiff-jax <args> --config.parallel.distributed=True
# --config.parallel.coordinator_address=localhost:PORT --config.parallel.num_processes=N
# --config.parallel.process_id=i` with XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES_PER_PROCESS, so
# the global mesh has N * DEVICES_PER_PROCESS devices. Output lines are prefixed with `[i] `. The script waits for
# all processes and exits with the first failure's status (stopping the others), or 0.
#
# Options / environment:
#   -d K, DEVICES_PER_PROCESS=K   simulated CPU devices per process (default 4)
#   -p P, COORDINATOR_PORT=P      coordinator port on localhost (default: a free port)
#   LANDIFF_JAX="cmd ..."         the program to run (default: `landiff-jax` if on PATH, else
#                                 `python -m landiff_jax`); words are split on spaces
#   JAX_PLATFORMS                 default cpu (the processes share this machine's CPUs; CPU collectives use gloo)
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
  exit 2
}
fail() {
  echo "local_multiprocess: $*" >&2
  exit 2
}
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 501)) || fail "needs bash >= 5.1 (wait -n -p), this is $BASH_VERSION."

devices="${DEVICES_PER_PROCESS:-4}"
port="${COORDINATOR_PORT:-}"
while getopts 'd:p:h' option; do
  case "$option" in
    d) devices="$OPTARG" ;;
    p) port="$OPTARG" ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 2 ] && [ "$2" = "--" ] || usage
num_processes="$1"
shift 2
[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || fail "N must be a positive integer, got '$num_processes'."
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || fail "devices per process must be a positive integer, got '$devices'."
[ $# -ge 1 ] || usage

if [ -n "${LANDIFF_JAX:-}" ]; then
  read -r -a program <<< "$LANDIFF_JAX"
elif command -v landiff-jax > /dev/null; then
  program=(landiff-jax)
else
  program=("${PYTHON:-python3}" -m landiff_jax)
fi
if [ -z "$port" ]; then
  port="$("${PYTHON:-python3}" -c '
import socket
s = socket.socket()
s.bind(("localhost", 0))
print(s.getsockname()[1])')"
fi

# Every process gets the same XLA_FLAGS, with its own device count instead of any inherited one.
xla_flags="$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')"
export XLA_FLAGS="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$devices"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export PYTHONUNBUFFERED=1

echo "local_multiprocess: $num_processes processes x $devices devices, coordinator localhost:$port" >&2
pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2> /dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  "${program[@]}" "$@" --config.parallel.distributed=True "--config.parallel.coordinator_address=localhost:$port" \
      "--config.parallel.num_processes=$num_processes" "--config.parallel.process_id=$i" \
      > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=("$!")
done

status=0
remaining=("${pids[@]}")
while [ ${#remaining[@]} -gt 0 ]; do
  finished=''
  code=0
  wait -n -p finished "${remaining[@]}" || code=$?
  [ -n "$finished" ] || break  # nothing left to wait for
  next=()
  for pid in "${remaining[@]}"; do
    [ "$pid" = "$finished" ] || next+=("$pid")
  done
  remaining=("${next[@]+"${next[@]}"}")
  if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
    for ((i = 0; i < num_processes; i++)); do
      [ "${pids[$i]}" != "$finished" ] || echo "local_multiprocess: process $i failed ($code); stopping the others." >&2
    done
    status="$code"
    for pid in "${remaining[@]+"${remaining[@]}"}"; do
      kill "$pid" 2> /dev/null || true
    done
  fi
done
wait  # the log prefixers
exit "$status"
