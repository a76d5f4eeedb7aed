#!/usr/bin/env bash
# Runs the test suite on CPU with 8 simulated devices and no network access to model hubs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh --test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0}"
set +e
.venv/bin/python -m pytest -q "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "test: pytest collected no tests; treating that as a failure." >&2
  exit 1
fi
exit "$status"
