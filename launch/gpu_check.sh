#!/usr/bin/env bash
# One command for a machine with one GPU, at most 8 minutes: the Pallas kernel's correctness check (Pallas vs xla at
# the highest precision, forward and gradients, both tokenizer masks, bf16 and fp32), then every benchmark at the
# release's shapes (attention tile sweep, lm, dit, generate, tokenizer, vae, and train where `bench train` exists),
# each under its own time limit, writing DIR/summary.json (one entry per step: figures, or why it was skipped,
# failed or timed out), DIR/raw.json, DIR/tables.md and DIR/gpu_check.log after every step.
#
# Usage: bash launch/gpu_check.sh [--tiny] [--out DIR] [--budget SECONDS]
#   --tiny: the tiny config (a CPU test that the script works end to end); default out gpu_check_out/<time>.
# Runs the package from this checkout (no install). Python packages the GPU machine lacks (ml_collections, grain,
# array_record, portpicker, diffusers) come as wheels in .whl/ (see ../shared/reference/environment.md §6).
set -uo pipefail
cd "$(dirname "$0")/.."
# the checkout's environment (launch/setup.sh) where there is one, else the machine's python3 (the GPU machine)
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# wheels of what the interpreter lacks (the GPU machine has no ml_collections, grain, ...), only where it lacks them
if compgen -G ".whl/*.whl" > /dev/null && ! "$PYTHON" -c 'import ml_collections, grain' 2> /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    || echo "gpu_check: installing .whl/ failed; continuing with what is installed" >&2
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHON
for arg in "$@"; do
  if [[ "$arg" == "--tiny" && "$(uname -s)" == Linux ]] && ! command -v nvidia-smi > /dev/null; then
    export LANDIFF_PALLAS_INTERPRET=1  # no GPU: the kernel runs interpreted
  fi
done
exec "$PYTHON" launch/gpu_check.py "$@"
