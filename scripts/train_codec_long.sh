#!/usr/bin/env bash
# Long CPU training of the shipped RNN codec (models/rnnc-cpu.pt), with the project's own stages.
#
# Runs `augment` and `train_compressor` in a separate git worktree at the current commit (so the
# training code is exactly one commit, recorded in the shipped JSON), on the settings below layered
# over the cpu profile. Warm-starts from models/rnnc-cpu.pt when it exists (training continued across
# sessions). Resumable: run the same command again after a kill and it resumes from the last epoch
# (model, optimiser, scheduler, EMA and RNG state; checkpoint every epoch of EPOCH_PATCHES patches).
# Then `python -m tools.release` turns a snapshot into models/rnnc-cpu.pt + .json (run it from this checkout with
# --workdir the run's folder: the worktree's own code may predate the current .rnnc entropy table).
#
# The defaults are the shipped ConvGRU's recipe (docs/codec-training.md); the ConvLSTM's phases below set theirs,
# over the defaults of then: CELL=lstm LR=0.001 PATCH=32 SCALE=4 BATCH=32 PATCHES=100000 EPOCH_PATCHES=9600.
#
#   scripts/train_codec_long.sh            # start or resume, in the foreground
#   LONGRUN_DIR=/path THREADS=2 scripts/train_codec_long.sh
#   EPOCHS=40 LR=0.0008 LR_SCHEDULE=cosine LR_WARMUP=0.01 scripts/train_codec_long.sh   # a decay phase
#   PATCH=64 BATCH=16 PATCHES=60000 EPOCH_PATCHES=2400 EPOCHS=27 LR=0.0003 LR_SCHEDULE=cosine LR_WARMUP=0.02 \
#     scripts/train_codec_long.sh   # phase 4 (session 5): 64-px patches
#   PATCH=128 BATCH=4 PATCHES=20000 EPOCH_PATCHES=600 EPOCHS=44 LR=0.0002 LR_SCHEDULE=cosine LR_WARMUP=0.02 \
#     scripts/train_codec_long.sh   # phase 5 (session 6): 128-px patches (8x8 code blocks)
#   PATCH=64 SCALE=2 BATCH=16 PATCHES=20000 EPOCH_PATCHES=2400 EPOCHS=24 LR=0.0002 LR_SCHEDULE=cosine LR_WARMUP=0.03 \
#     VAL_PATCHES=64 scripts/train_codec_long.sh   # phase 7 (session 8): x2-upsampled CIFAR-10, sharper detail
#   INIT_MODEL=none CELL=gru ITERATIONS=8 LR=0.002 PATCH=64 SCALE=2 BATCH=8 PATCHES=50000 EPOCH_PATCHES=2400 EPOCHS=1000 \
#     LONGRUN_DIR=../longrun-gru scripts/train_codec_long.sh   # session 13: the equal-time winner, from scratch
#   INIT_MODEL=../rnnc-gru/model.pt CELL=gru ITERATIONS=16 LR=0.002 PATCH=64 SCALE=2 BATCH=8 PATCHES=50000 \
#     EPOCH_PATCHES=1200 EPOCHS=1000 LONGRUN_DIR=../longrun-gru16 scripts/train_codec_long.sh  # 16 iterations
#   INIT_MODEL=runs/rnnc-gru/model.pt EPOCHS=24 LR=0.0015 LR_SCHEDULE=cosine LR_WARMUP=0.02 \
#     LONGRUN_DIR=../longrun-gru16c scripts/train_codec_long.sh  # session 17: its decay phase (shipped)
#   LOSS=l1_ssim EPOCHS=20 LR=0.0004 LR_SCHEDULE=cosine LR_WARMUP=0.02 scripts/train_codec_long.sh  # tried: worse on Kodak (README)
LONGRUN_DEFAULT=longrun
source "$(dirname "$0")/longrun.sh"
EPOCH_PATCHES=${EPOCH_PATCHES:-1200}  # patches per epoch = per checkpoint (150 steps of 8 at 16 iterations, ~3 min on 1 thread)
EPOCHS=${EPOCHS:-1000}         # the schedule spans this many epochs (cosine: set it to what the session can afford)
LR=${LR:-0.002}                # peak Adam learning rate
LR_SCHEDULE=${LR_SCHEDULE:-constant}  # constant | cosine | multistep; a warm start's decay phase: cosine
LR_WARMUP=${LR_WARMUP:-0.002}  # fraction of steps
LOSS=${LOSS:-l1}               # l1 | l2 | l1_ssim (train_compressor.loss)
CELL=${CELL:-gru}              # gru | lstm (train_compressor.cell; the init's cell, or INIT_MODEL=none)
ITERATIONS=${ITERATIONS:-16}   # iterations trained = the most a file holds (16: the coursework's; an init trained at 8 may start it)
PATCH=${PATCH:-64}             # patch side in px (64: 4x4 code blocks; 128: the whole x4-upsampled CIFAR-10 image)
SCALE=${SCALE:-2}              # bicubic upsampling of CIFAR-10 before cropping (augment.patch_scale; 2: sharper detail)
BATCH=${BATCH:-8}              # patches per step
PATCHES=${PATCHES:-50000}      # training patches cut by augment
VAL_PATCHES=${VAL_PATCHES:-512}  # held-out patches scored every epoch (at 128 px, 512 cost more time than 600 trained)
INIT_MODEL=${INIT_MODEL:-$ROOT/models/rnnc-cpu.pt}  # the warm start (with its release JSON beside it); none: from scratch

if longrun_worktree; then
  INIT=null
  if [ "$INIT_MODEL" != none ] && [ -f "$INIT_MODEL" ]; then  # the release's JSON travels too: hours and curve accumulate
    cp "$INIT_MODEL" "$DIR/init.pt"; cp "${INIT_MODEL%.pt}.json" "$DIR/init.json"; INIT=init.pt
  fi
  cd "$DIR"
  # the recipe (README "Training the codec on a CPU" has the evidence for each value)
  "$PY" -m pipeline configure --profile cpu \
    --set augment.patches=$PATCHES --set augment.val_patches=1000 --set augment.patch_scale=$SCALE \
    --set augment.patch_size=$PATCH --set train_compressor.batch_size=$BATCH --set train_compressor.lr=$LR \
    --set train_compressor.lr_schedule=$LR_SCHEDULE --set train_compressor.lr_warmup=$LR_WARMUP \
    --set train_compressor.loss=$LOSS --set train_compressor.cell=$CELL --set train_compressor.iterations=$ITERATIONS \
    --set "train_compressor.val_iterations=[$(for k in 1 2 4 8 12 16; do [ "$k" -le "$ITERATIONS" ] && printf '%s,' "$k"; done | sed 's/,$//')]" \
    --set train_compressor.binarizer=deterministic --set train_compressor.ema_decay=0.999 \
    --set train_compressor.amp=true --set train_compressor.epochs=$EPOCHS \
    --set train_compressor.patches_per_epoch=$EPOCH_PATCHES --set train_compressor.val_patches=$VAL_PATCHES \
    --set train_compressor.snapshot_every=4 --set train_compressor.init=$INIT \
    --set tracking.register_models=false
fi
cd "$DIR"
"$PY" -m pipeline configure --set train_compressor.cpu_threads="$THREADS" > /dev/null  # not part of the run key
[ -f data/raw/cifar-10-batches-py/data_batch_1 ] || "$PY" -m pipeline download
[ -f data/prepared/patches.npz ] || { [ -n "${PATCHES_FROM:-}" ] && mkdir -p data/prepared && cp "$PATCHES_FROM" data/prepared/patches.npz; } \
  || "$PY" -m pipeline augment  # PATCHES_FROM: another run's patches.npz cut with the same augment params
exec "$PY" -m pipeline train_compressor 2>&1
