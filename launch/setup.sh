#!/usr/bin/env bash
# Creates .venv (Python >= 3.11) and installs landiff-jax with its pinned runtime stack.
#   bash launch/setup.sh          runtime only
#   bash launch/setup.sh --test   also the test/conversion stack (torch 2.13.0 CPU, diffusers, pytest)
# Safe to rerun: an up-to-date environment takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "setup: $PYTHON is $("$PYTHON" --version 2>&1); landiff-jax needs Python >= 3.11 (set PYTHON=python3.11)." >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if [ "${1:-}" = "--test" ]; then
  # torch first and exactly this version: it resolves to the local CPU wheel; a looser spec pulls a CUDA build.
  "${PIP[@]}" torch==2.13.0
  "${PIP[@]}" -c constraints.txt -r requirements.txt -r requirements-test.txt
else
  "${PIP[@]}" -c constraints.txt -r requirements.txt
fi
# The editable install builds without isolation, so the build backend comes from the venv: Python 3.11's bundled
# setuptools (65) has no bdist_wheel and fails on a fresh machine.
"${PIP[@]}" "setuptools>=70.1"
"${PIP[@]}" --no-deps --no-build-isolation -e .
echo "setup: ready ($("$VENV/bin/python" -c 'import jax; print("jax", jax.__version__)'))"
