#!/usr/bin/env bash
# Runs one `landiff-jax train` command on every worker of a Cloud TPU VM pod slice (one JAX process per worker).
#
#   bash launch/tpu_pod.sh TPU_NAME ZONE -- <landiff-jax args>
#
#   bash launch/tpu_pod.sh my-v5p-64 us-east5-a -- train lm --config=configs/train.py:lm \
#       --config.train.data_dir=/mnt/data/lm-tokens --config.train.workdir=/mnt/runs/lm \
#       --config.parallel.mesh.data=-1
#
# Each worker runs `cd $REPO_DIR && $LANDIFF_JAX <args> --config.parallel.distributed=True`; on TPU
# `jax.distributed.initialize()` finds the coordinator, the process count and this worker's id by itself, so no
# address is passed. Every worker needs the same checkout and environment at REPO_DIR (e.g. `bash launch/setup.sh`
# run on all workers with `gcloud compute tpus tpu-vm ssh ... --worker=all`). train.workdir must be a directory
# every worker sees (NFS, a gcsfuse mount; not a gs:// URL): all workers write each checkpoint together.
# train.data_dir must hold the same files on every worker (shared storage or copies); each worker reads only
# the rows of each global batch that its chips hold. gcloud streams back the output of all workers.
#
# Environment:
#   REPO_DIR      the checkout on the workers (default: ~/landiff-jax)
#   LANDIFF_JAX   the program on the workers, relative to REPO_DIR (default: .venv/bin/landiff-jax)
#   PROJECT       passed as --project when set
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
  exit 2
}

[ $# -ge 4 ] && [ "$3" = "--" ] || usage
name="$1"
zone="$2"
shift 3

repo_dir="${REPO_DIR:-~/landiff-jax}"
program="${LANDIFF_JAX:-.venv/bin/landiff-jax}"
args="$(printf ' %q' "$@" --config.parallel.distributed=True)"
# REPO_DIR is left unquoted on purpose so that a leading ~ expands on the worker.
remote="cd $repo_dir && $program$args"

project=()
[ -z "${PROJECT:-}" ] || project=(--project "$PROJECT")

echo "tpu_pod: on every worker of $name ($zone): $remote" >&2
exec gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${project[@]+"${project[@]}"}" --worker=all \
    --command "$remote"
