#!/usr/bin/env bash
# `landiff-jax bench train` for the control-branch (diffusion), LM and tokenizer stages at the release's sizes, and
# the VAE on 17x256x256 crops (data parallel) and on whole 49x480x720 clips, one JSON per run in OUT_DIR (default
# bench-train/): median step time, samples/tokens per second per device, MFU against the device's dense bf16 peak,
# compiled and peak memory. Run on the accelerator host:
#   bash launch/bench_train.sh [OUT_DIR]
# Environment: PYTHON (default python3), STAGE_TIMEOUT seconds per stage (default 300), ATTENTION (an attention
# backend for the tokenizer and diffusion stages, default: the config's), LM_BATCH / TOKENIZER_BATCH /
# DIFFUSION_BATCH / VAE_BATCH (examples per device: 8 / 2 / 2 / 3 fit an 80 GB GPU), VAE_TENSOR (devices that
# share each whole clip's rows, the vae plan's context parallelism: 4 on a host of 4 or more GPUs, the default
# there; 1 on a single GPU, where a whole clip is expected not to fit in 80 GB).
set -u
OUT_DIR=${1:-bench-train}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}

bench() {  # bench STAGE [--name NAME] [bench train options]
  local stage=$1 name=$1
  shift
  if [ "${1:-}" = "--name" ]; then name=$2; shift 2; fi
  echo "== bench train --stage $stage $*"
  timeout "${STAGE_TIMEOUT:-300}" "$PYTHON" -m landiff_jax bench train --stage "$stage" --repeats 5 \
    --out "$OUT_DIR/$name.json" "$@" 2>&1 | grep -v '^ *"\(data\|fsdp\|tensor\)"' | tail -n 45
}

attention=()
[ -n "${ATTENTION:-}" ] && attention=(--config.attention_backend="$ATTENTION")
bench lm --batch "${LM_BATCH:-8}"
bench diffusion --batch "${DIFFUSION_BATCH:-2}" "${attention[@]}"
bench tokenizer --batch "${TOKENIZER_BATCH:-2}" "${attention[@]}"
bench vae --name vae-crops --batch "${VAE_BATCH:-3}" --config.video.num_frames=17 --config.video.height=256 \
  --config.video.width=256 --config.parallel.mesh.tensor=1
vae_tensor=${VAE_TENSOR:-}
if [ -z "$vae_tensor" ]; then
  gpus=$("$PYTHON" -c 'import jax; print(jax.device_count())' 2>/dev/null || echo 1)
  vae_tensor=$([ "$gpus" -ge 4 ] && echo 4 || echo 1)
fi
bench vae --name vae-clip --batch 1 --config.parallel.mesh.tensor="$vae_tensor"
