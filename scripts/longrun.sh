# Sourced by scripts/train_*_long.sh: what every long background run shares. Sets ROOT (this checkout), DIR
# (LONGRUN_DIR: the run's own git worktree at the current commit, so its training code is exactly one commit),
# THREADS, PY, and the data mirror; longrun_worktree makes the worktree once (then the caller configures it).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${LONGRUN_DIR:-$ROOT/../$LONGRUN_DEFAULT}
THREADS=${THREADS:-1}          # torch CPU threads (1 leaves a core for other work; 2 threads are ~1.7x, not 2x)
PY=$ROOT/.venv/bin/python
if [ -z "${DATA_MIRROR:-}" ] && [ -f "$ROOT/../shared/datasets/SHA256SUMS" ]; then
  export DATA_MIRROR=$ROOT/../shared/datasets
fi
export DVC_NO_ANALYTICS=1 PIPELINE_NO_PROGRESS=${PIPELINE_NO_PROGRESS:-1}

# true when the worktree was made now (the caller then writes its params.yaml)
longrun_worktree() {
  [ -d "$DIR" ] && return 1
  git -C "$ROOT" worktree add --detach "$DIR" HEAD
}
