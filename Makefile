# Two entry points for a fresh machine (see README):  make run  |  make test
# Both create the virtual environment when it is missing and are safe to repeat.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
PROFILE ?=
export AIRFLOW_HOME ?= $(CURDIR)/airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__API__HOST ?= 127.0.0.1
export DVC_NO_ANALYTICS := 1
# dvc.yaml's `python -m pipeline` must run in the project's environment
export PATH := $(BIN):$(PATH)
export PYTHONUNBUFFERED := 1

.PHONY: run test test-faults setup browser services airflow-init up down status clean-runs

$(STAMP): pyproject.toml constraints.txt
	@echo "setting up $(VENV) (the first time about 2-3 minutes; pip's log: $(VENV)/install.log)"
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	@{ $(BIN)/pip install -q --upgrade pip && $(BIN)/pip install -q -c constraints.txt -e '.[test]'; } \
	  > $(VENV)/install.log 2>&1 || { tail -n 30 $(VENV)/install.log; echo "set-up failed: see $(VENV)/install.log"; exit 1; }
	@touch $(STAMP)

setup: $(STAMP)

# Airflow's metadata DB (SQLite in $AIRFLOW_HOME) and the one-slot pool that serialises DVC calls.
airflow-init: setup
	@mkdir -p $(AIRFLOW_HOME)
	@$(BIN)/airflow db migrate > $(AIRFLOW_HOME)/migrate.log 2>&1 || (cat $(AIRFLOW_HOME)/migrate.log; exit 1)
	@$(BIN)/airflow pools set dvc_workspace 1 "one DVC process per workspace" >> $(AIRFLOW_HOME)/migrate.log 2>&1 \
	  || (cat $(AIRFLOW_HOME)/migrate.log; exit 1)

# The main job: the whole pipeline DAG, in-process (no scheduler needed), on params.yaml's profile
# (or PROFILE=tiny|cpu|gpu|coursework). Outputs: data/, MLflow in mlflow.db + mlartifacts/.
# local_run: `airflow dags test`, one at a time, after failing runs a killed earlier `make run` left running;
# the console shows the stages and a summary, Airflow's own log goes to $(AIRFLOW_HOME)/runs/.
run: airflow-init
	@$(BIN)/python -m pipeline.orchestration.local_run pipeline -c '{"profile": $(if $(PROFILE),"$(PROFILE)",null)}'

# Debian's Chromium for the browser test (never a browser download by a test tool).
browser:
	@command -v chromium > /dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver > /dev/null; \
	  else echo "chromium missing and cannot be installed here: the browser test will be skipped"; fi; }

# Debian's PostgreSQL and Redis for the production-topology test (tests/test_production_stack.py).
services:
	@{ command -v redis-server > /dev/null && ls /usr/lib/postgresql/*/bin/initdb > /dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql redis-server > /dev/null; \
	  else echo "postgresql/redis-server missing and cannot be installed here: the production-stack test will be skipped"; fi; }

# TEST_WORKERS: pytest-xdist processes. Most of the suite waits on subprocesses (Airflow, DVC, stage runs):
# on 2 cores, 2 workers take ~12 min where one took ~29 (CPU 127 % busy); TEST_WORKERS=0 runs in-process.
TEST_WORKERS ?= 2
test: setup browser services
	$(BIN)/python -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The Compose topology run as processes, with its faults (tests/test_production_stack.py), alone: about 5
# minutes on 2 cores (it is part of `make test` and CI too).
test-faults: setup services
	$(BIN)/python -m pytest -m faults $(PYTEST_ARGS)

# The local stack: Airflow (standalone, SQLite) + MLflow server, both on 127.0.0.1.
up: setup
	scripts/stack.sh up

down:
	scripts/stack.sh down

status:
	scripts/stack.sh status

clean-runs:
	rm -rf airflow mlflow.db mlartifacts

# docker/compose.yaml for real with Debian's Podman (tests/test_container_stack.py; .ci/run runs it beside `make test`): installs
# podman & co. (root), builds a Debian base, the project image and stand-ins for postgres/redis/MinIO here,
# brings the stack up, runs the pipeline DAG through it with a worker kill, takes it down. About 25 min
# on 2 cores from nothing (images 12, stack up 2, DAG run 5, GPU image 5.5; session 13).
# The stack alone: scripts/container_stack.sh images | up | down (see docs/scaling.md).
.PHONY: docker-test
docker-test: setup
	CONTAINER_STACK_TEST=1 $(BIN)/python -m pytest -m containers tests/test_container_stack.py $(PYTEST_ARGS)
