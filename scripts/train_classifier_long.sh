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
# Then, from this checkout, `python -m tools.release_classifier --workdir <the run's folder>` records it (in progress or
# ended) in models/coursework-run.json, which the report scores against the test labels (report.coursework_run).
#
#   LONGRUN_DIR=/work/runs/cw scripts/train_classifier_long.sh                 # start or resume
#   RESUME_FROM=/path/last.pt LONGRUN_DIR=/work/runs/cw scripts/train_classifier_long.sh
LONGRUN_DEFAULT=longrun-classifier
source "$(dirname "$0")/longrun.sh"
PROFILE=${PROFILE:-coursework}
export OMP_NUM_THREADS=$THREADS
[ -z "${RESUME_FROM:-}" ] || RESUME_FROM=$(realpath "$RESUME_FROM")  # before the cd below

if longrun_worktree; then
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
