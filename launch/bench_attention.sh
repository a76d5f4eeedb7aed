#!/usr/bin/env bash
# Masked-attention benchmark at the release's shapes: tokenizer encoder/decoder masks (18,768 tokens, 12 heads,
# D=64, batch 1 and 4) and the LM's causal attention (1,500 tokens, 16 heads, D=128, batch 2), for the Pallas
# kernel, dense-masked xla, jax.nn.dot_product_attention and (where torch is importable) FlexAttention.
# Run on a GPU (or TPU for splash). Usage: bash launch/bench_attention.sh [out.json] [extra landiff-jax flags]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench_attention.json}"
shift || true
exec .venv/bin/landiff-jax bench attention --config configs/landiff_official.py --dtype bfloat16 --repeats 5 \
  --out "$out" "$@"
