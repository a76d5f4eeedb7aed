#!/usr/bin/env bash
# Trains the built-in demo (configs/shapes_demo.py) from nothing and writes its pipeline directory (models/shapes-demo
# is a run of this recipe; README says how it was made).
#   bash launch/train_demo.sh [OUT]        OUT defaults to runs/demo; the pipeline lands in OUT/pipeline
# Environment: SIZE=demo (default) or SIZE=tiny for a minutes-long smoke run of the same recipe at toy sizes;
# VIDEOS (training clips, default 1500) and STEPS_SCALE (multiplies every stage's steps, default 1) to trade
# quality for time; BATCH_SCALE (multiplies every stage's batch size, default 1; for accelerators, which models this
# small leave mostly idle); STAGE_SECONDS caps each stage's training time (train.max_seconds, default 0 = no
# cap), STAGE_SECONDS_<STAGE> (e.g. STAGE_SECONDS_DIFFUSION) one stage's.
# Every step skips itself when its output exists, so a rerun continues where one stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/demo}"
SIZE="${SIZE:-demo}"
VIDEOS="${VIDEOS:-1500}"
STEPS_SCALE="${STEPS_SCALE:-1}"
BATCH_SCALE="${BATCH_SCALE:-1}"
STAGE_SECONDS="${STAGE_SECONDS:-0}"
LJ="${LANDIFF_JAX:-landiff-jax}"
if [ "$SIZE" = demo ]; then MODEL=configs/shapes_demo.py; else MODEL=configs/tiny.py; fi
mkdir -p "$OUT"
start=$SECONDS

stage_done() { [ -e "$1" ] && echo "== $2: done already ($1)"; }
log() { echo "== $1 [$(( SECONDS - start )) s]"; }

setting() {  # setting STAGE SECTION KEY: a value of the stage's training config
  $LJ config --json --config="configs/train.py:$1,$SIZE" | python3 -c "import json,sys; print(json.load(sys.stdin)['$2']['$3'])"
}

scaled_steps() {  # scaled_steps STAGE: "STEPS WARMUP BATCH", the stage's settings times STEPS_SCALE (steps ≥ 2,
                  # warmup < steps) and BATCH_SCALE
  $LJ config --json --config="configs/train.py:$1,$SIZE" | python3 -c "
import json, sys
train = json.load(sys.stdin)['train']
steps = max(2, round(train['num_steps'] * $STEPS_SCALE))
warmup = min(round(train['warmup_steps'] * $STEPS_SCALE), steps - 1)
print(steps, warmup, max(1, round(train['batch_size'] * $BATCH_SCALE)))"
}

train() {  # train STAGE DATA [extra overrides...]: trains OUT/runs/STAGE and exports it to OUT/models/STAGE
  local stage=$1 data=$2 task=${1%%_*}; shift 2  # STAGE is a task (vae, lm, ...) or one phase of it (vae_frames)
  stage_done "$OUT/models/$stage" "train $stage" && return
  log "train $stage"
  local steps warmup batch seconds_var="STAGE_SECONDS_${stage^^}"
  read -r steps warmup batch < <(scaled_steps "$stage")
  $LJ train "$task" --config="configs/train.py:$stage,$SIZE" --config.train.data_dir="$data" \
      --config.train.workdir="$OUT/runs/$stage" --config.train.num_steps="$steps" --config.train.warmup_steps="$warmup" \
      --config.train.batch_size="$batch" \
      --config.train.max_seconds="${!seconds_var:-$STAGE_SECONDS}" --config.train.progress=False "$@"
  $LJ export "$task" --workdir "$OUT/runs/$stage" --dst "$OUT/models/$stage" --overwrite
}

stage_done "$OUT/videos" "videos" || { log "videos"; $LJ prepare videos --config=$MODEL --dst "$OUT/videos" --num "$VIDEOS" --seed 0; }
stage_done "$OUT/vae-frames" "vae frames" || { log "vae frames"; $LJ prepare videos --config=$MODEL --dst "$OUT/vae-frames" \
    --num "$(( VIDEOS * 2 ))" --seed 2 --frames 1; }
stage_done "$OUT/vae-clips" "vae clips" || { log "vae clips"; $LJ prepare videos --config=$MODEL --dst "$OUT/vae-clips" \
    --num "$VIDEOS" --seed 1 --frames "$(setting vae video num_frames)"; }
stage_done "$OUT/semantics" "semantics" || { log "semantics"; $LJ prepare semantics --config=$MODEL --dst "$OUT/semantics" \
    --num "$(( VIDEOS * 4 ))" --seed 3; }
stage_done "$OUT/models" "frozen parts" || { log "frozen parts"; $LJ prepare frozen --config=$MODEL --dst "$OUT/models"; }

train theia "$OUT/semantics"

train vae_frames "$OUT/vae-frames"
train vae "$OUT/vae-clips" --config.train.init_from="$OUT/models/vae_frames"
stage_done "$OUT/data" "encode" || { log "encode"; $LJ prepare encode --config=$MODEL --src "$OUT/videos" --models "$OUT/models" --dst "$OUT/data"; }
train tokenizer "$OUT/data/tokenizer"
stage_done "$OUT/data-tokens" "tokens" || { log "tokens"; $LJ prepare tokens --config=$MODEL --src "$OUT/data" --models "$OUT/models" \
    --dst "$OUT/data-tokens"; }
train lm "$OUT/data-tokens/lm"
train backbone "$OUT/data/backbone"
train diffusion "$OUT/data-tokens/diffusion" --config.train.init_from="$OUT/models/backbone"
[ -e "$OUT/models/dit" ] || cp -r "$OUT/models/diffusion" "$OUT/models/dit"
log "assemble"
$LJ prepare assemble --config=$MODEL --models "$OUT/models" --dst "$OUT/pipeline" --overwrite
log "done: $OUT/pipeline (landiff-jax generate --ckpt $OUT/pipeline --prompt \"a red circle moving right\")"
echo "   to make it the built-in demo (what generate uses without --ckpt): rm -rf models/shapes-demo && cp -r $OUT/pipeline models/shapes-demo"
