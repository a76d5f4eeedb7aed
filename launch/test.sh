#!/usr/bin/env bash
# Runs the test suite on CPU with 8 simulated devices and no network access to model hubs.
#   bash launch/test.sh [pytest arguments]      e.g. tests/test_config.py -k overrides
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh --test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0}"
set +e
# Two workers, a test file each at a time (module fixtures are built once): about 1.4x faster on 2 cores than one
# process, since much of a test's time is single-threaded compilation. TEST_WORKERS=0 runs in this process.
.venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "test: pytest collected no tests; treating that as a failure." >&2
  exit 1
fi
exit "$status"
