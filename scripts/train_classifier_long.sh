#!/usr/bin/env bash
# The coursework's own classifier recipe run to its end (issue 25): PROFILE=coursework, 300 epochs, in the
# background beside other work, resumable after any stop.
#
# Runs `download`, `augment` and `train_classifier` in a separate git worktree at the current commit (the
# training code is exactly one commit), on the coursework profile, with THREADS torch threads. The stage
# checkpoints every epoch (data/checkpoints/train_classifier/last.pt: model, optimiser, RNG, history) and
# resumes from it when run again. RESUME_FROM copies a saved checkpoint in first (a new machine: the
# worktree is gone, the checkpoint was kept elsewhere); the stage refuses one from other params or data.
#
#   LONGRUN_DIR=/work/runs/cw scripts/train_classifier_long.sh                 # start or resume
#   RESUME_FROM=/path/last.pt LONGRUN_DIR=/work/runs/cw scripts/train_classifier_long.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${LONGRUN_DIR:-$ROOT/../longrun-classifier}
THREADS=${THREADS:-1}          # torch CPU threads (1 leaves a core for other work)
PROFILE=${PROFILE:-coursework}
PY=$ROOT/.venv/bin/python
if [ -z "${DATA_MIRROR:-}" ] && [ -f "$ROOT/../shared/datasets/SHA256SUMS" ]; then
  export DATA_MIRROR=$ROOT/../shared/datasets
fi
export DVC_NO_ANALYTICS=1 PIPELINE_NO_PROGRESS=${PIPELINE_NO_PROGRESS:-1} OMP_NUM_THREADS=$THREADS

if [ ! -d "$DIR" ]; then
  git -C "$ROOT" worktree add --detach "$DIR" HEAD
  (cd "$DIR" && "$PY" -m pipeline configure --profile "$PROFILE" --set tracking.register_models=false)
fi
cd "$DIR"
if [ -n "${RESUME_FROM:-}" ] && [ ! -f data/checkpoints/train_classifier/last.pt ]; then
  mkdir -p data/checkpoints/train_classifier
  cp "$RESUME_FROM" data/checkpoints/train_classifier/last.pt.tmp
  mv data/checkpoints/train_classifier/last.pt.tmp data/checkpoints/train_classifier/last.pt
fi
[ -f data/raw/cifar-10-batches-py/data_batch_1 ] || "$PY" -m pipeline download
[ -f data/prepared/cifar10.npz ] || "$PY" -m pipeline augment
exec "$PY" -m pipeline train_classifier 2>&1
