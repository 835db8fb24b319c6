# make run: install into .venv and run the default job on the local AG News copy.
# make test: the whole suite (slow end-to-end tests included), as CI runs it.
# make e2e: start PostgreSQL + an MLflow server (scripts/e2e_services.sh; password auth on both),
# run the e2e tests (-m e2e: authenticated tracking server over HTTP, the registry and model
# serving, Optuna workers on PostgreSQL, the UI in headless Chromium), stop them again.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/ag_news
export HF_HUB_OFFLINE ?= 1

# Services of scripts/e2e_services.sh (loopback only); the script reads the same variables.
# Empty (the default): the script picks free ports itself and `scripts/e2e_services.sh env` says
# which; set them (make e2e E2E_PG_PORT=5433 E2E_MLFLOW_PORT=5055) to pin them.
E2E_PG_PORT ?=
E2E_MLFLOW_PORT ?=
export E2E_PG_PORT E2E_MLFLOW_PORT
SERVICES := VENV=$(VENV) scripts/e2e_services.sh
# The clients' settings (URIs, MLflow user and password, PGPASSFILE) come from the script, which
# keeps the generated credentials in .e2e/ (never in the repository or on a command line).
E2E_ENV = eval "$$($(SERVICES) env)"

.PHONY: install run grid search test test-fast lint docs docs-serve format mlflow-ui optuna-dashboard mlflow-server services-up services-down e2e clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned: this machine holds the CPU build; an unpinned resolve pulls a CUDA one.
# editable_mode=compat keeps the hydra_plugins namespace package discoverable by Hydra.
install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,docs]' --config-settings editable_mode=compat

run: install
	$(BIN)/python -m embft data.local_dir=$(DATA)

grid: install
	$(BIN)/python -m embft -m experiment=seed_grid data.local_dir=$(DATA)

search: install
	$(BIN)/python -m embft -m experiment=search data.local_dir=$(DATA)

# Two pytest workers (pytest-xdist), each file's tests on one of them (--dist loadfile: its module fixtures
# shared) and one torch thread each: most of the suite waits on one core (Python start-up, SQLite), and two
# workers of two threads on two cores spin against each other. PYTEST_WORKERS=0: one process, as before.
PYTEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not e2e"

# ruff: the formatter and the linter (pyproject.toml [tool.ruff]); CI runs `make lint`.
lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# The documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link or a page left out of
# the nav fails. CI runs it (.ci/run). `make docs-serve`: the site on http://127.0.0.1:8000, rebuilt on save.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict  # the variable: no banner about MkDocs 2

docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# MLflow 3.17 opens an experiment in its GenAI overview: the runs table is #/experiments/<id>/runs.
# The port is EMBFT_MLFLOW_UI_PORT's, which a job's closing link reads too (tracking.ui_url).
export EMBFT_MLFLOW_UI_PORT ?= 5000
mlflow-ui:
	@[ -f mlruns/mlflow.db ] && $(BIN)/python -c "import mlflow; \
	[print(f'{e.name}: http://127.0.0.1:$(EMBFT_MLFLOW_UI_PORT)/#/experiments/{e.experiment_id}/runs') \
	 for e in mlflow.MlflowClient('sqlite:///$(CURDIR)/mlruns/mlflow.db').search_experiments()]" || true
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --host 127.0.0.1 --port $(EMBFT_MLFLOW_UI_PORT)

# A search's Optuna study in optuna-dashboard, on 127.0.0.1 only. STORAGE: the search's
# hydra.sweeper.storage (SQLite or PostgreSQL); by default embft's searches' mlruns/optuna.db.
OPTUNA_DASHBOARD_PORT ?= 8080
STORAGE ?= sqlite:///$(CURDIR)/mlruns/optuna.db
optuna-dashboard:
	$(BIN)/python -m embft.sweeping.dashboard --storage '$(STORAGE)' --port $(OPTUNA_DASHBOARD_PORT)

# An MLflow tracking server (basic-auth app) on PostgreSQL (scram passwords), artifacts proxied
# into .e2e/mlartifacts; it keeps running (make services-down stops it). Admin credentials:
# E2E_MLFLOW_USER / E2E_MLFLOW_PASSWORD from the environment, else generated into .e2e/secrets.env.
# Then: eval "$$(scripts/e2e_services.sh env)"; python -m embft tracking=server ...
mlflow-server: services-up
	@$(E2E_ENV) && echo "MLflow server: $$EMBFT_MLFLOW_URI  (eval \"\$$(scripts/e2e_services.sh env)\"; python -m embft tracking=server ...)" \
	  && echo "Optuna storage: hydra.sweeper.storage=$$EMBFT_PG_URI/optuna (password: PGPASSFILE=.e2e/pgpass)"

services-up: $(BIN)/python
	$(SERVICES) start

services-down:
	$(SERVICES) stop

# The services are stopped whatever happens (test failure, Ctrl-C); the exit status is pytest's.
e2e: install
	@trap '$(SERVICES) stop' EXIT; trap 'exit 130' INT TERM; \
	$(SERVICES) start && $(E2E_ENV) && $(BIN)/python -m pytest -q -m e2e

clean:
	rm -rf outputs multirun .cache
