# Everything runs from the project-local virtualenv and AIRFLOW_HOME; `make run`
# and `make test` install what they need on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
BIN := $(VENV)/bin
PARAMS ?= {}
# Where the DAG's train stage runs spark-submit: local mode, or a cluster such as `make cluster` starts
SPARK_MASTER ?= local[*,4]

export PATH := $(BIN):$(PATH)
export AIRFLOW_HOME := $(CURDIR)/var/airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__UNIT_TEST_MODE := False
export AIRFLOW_CONN_SPARK_DEFAULT := {"conn_type": "spark", "host": "$(SPARK_MASTER)", "extra": {"deploy-mode": "client", "spark-binary": "spark-submit"}}
export PYSPARK_PYTHON := $(BIN)/python
export PYSPARK_DRIVER_PYTHON := $(BIN)/python
export PYTHONUNBUFFERED := 1

.PHONY: install run test test-fast bench clean airflow cluster

install: $(VENV)/.installed

# Bytecode is compiled at install: where PYTHONDONTWRITEBYTECODE is set, every Python process (each Spark
# worker, Airflow task and test subprocess) would otherwise compile numpy, pyarrow, airflow... from source
# (1.3 s of a Spark worker's first Parquet read here).
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	touch $@

$(AIRFLOW_HOME)/airflow.db: $(VENV)/.installed
	mkdir -p $(AIRFLOW_HOME)
	$(BIN)/airflow db migrate > $(AIRFLOW_HOME)/db-migrate.log 2>&1 || (cat $(AIRFLOW_HOME)/db-migrate.log; exit 1)

# make run [DATE=YYYY-MM-DD] [PARAMS='{...}']: one DAG run for that logical date (default: now, UTC).
run: $(AIRFLOW_HOME)/airflow.db
	$(BIN)/python -m admm_jobs.operations.run_pipeline --params '$(PARAMS)' $(if $(DATE),--logical-date '$(DATE)')

# MNIST cut into 6 weekly batches, backfilled through a real Airflow (api-server, scheduler, dag-processor with
# their own AIRFLOW_HOME, var/demo/airflow); prints the week-by-week table, writes var/demo/weeks.{md,json,png}.
# PARAMS='{"epochs": 10}' overrides DAG params of every run; DEMO_ARGS='--weeks 3' (python -m admm_jobs.operations.demo --help).
.PHONY: demo-retraining
demo-retraining: $(VENV)/.installed
	$(BIN)/python -m admm_jobs.operations.demo --params '$(PARAMS)' $(DEMO_ARGS)

# Airflow UI + scheduler + dag-processor + triggerer (airflow standalone) on this machine.
# Log in with AIRFLOW_USER / AIRFLOW_PASSWORD (SimpleAuthManager; development only).
AIRFLOW_HOST ?= 127.0.0.1
AIRFLOW_PORT ?= 8080
AIRFLOW_USER ?= admin
AIRFLOW_PASSWORD ?= admin
airflow: export AIRFLOW__API__HOST := $(AIRFLOW_HOST)
airflow: export AIRFLOW__API__PORT := $(AIRFLOW_PORT)
airflow: export AIRFLOW__CORE__EXECUTION_API_SERVER_URL := http://127.0.0.1:$(AIRFLOW_PORT)/execution/
airflow: export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS := $(AIRFLOW_USER):admin
airflow: export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE := $(AIRFLOW_HOME)/simple_auth_manager_passwords.json
airflow: $(AIRFLOW_HOME)/airflow.db
	@umask 077 && printf '{"%s": "%s"}\n' '$(AIRFLOW_USER)' '$(AIRFLOW_PASSWORD)' > "$$AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"
	@echo "Airflow UI: http://$(AIRFLOW_HOST):$(AIRFLOW_PORT)/  login: $(AIRFLOW_USER) / $(AIRFLOW_PASSWORD)"
	@echo "Reports:    http://$(AIRFLOW_HOST):$(AIRFLOW_PORT)/admm-reports/  (Ctrl-C stops Airflow)"
	$(BIN)/airflow standalone

# A Spark standalone master and CLUSTER_WORKERS workers on 127.0.0.1 (pyspark's spark-class);
# prints the master URL for `make run SPARK_MASTER=...`; Ctrl-C stops them all.
CLUSTER_WORKERS ?= 2
CLUSTER_CORES ?= 1
CLUSTER_MEMORY ?= 1g
CLUSTER_PORT ?= 7077
CLUSTER_WEBUI_PORT ?= 8077
cluster: $(VENV)/.installed
	$(BIN)/python -m admm_jobs.operations.cluster --workers $(CLUSTER_WORKERS) --cores $(CLUSTER_CORES) --memory $(CLUSTER_MEMORY) \
		--port $(CLUSTER_PORT) --webui-port $(CLUSTER_WEBUI_PORT) --directory $(CURDIR)/var/cluster

test: $(VENV)/.installed
	$(BIN)/python -m pytest -p no:cacheprovider $(PYTEST_ARGS)

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf var .pytest_cache
