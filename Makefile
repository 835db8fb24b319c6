# make run: install into .venv and run the default job on the local AG News copy.
# make test: the whole suite (slow end-to-end tests included), as CI runs it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/ag_news
export HF_HUB_OFFLINE ?= 1

.PHONY: install run grid search test test-fast mlflow-ui clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned: this machine holds the CPU build; an unpinned resolve pulls a CUDA one.
# editable_mode=compat keeps the hydra_plugins namespace package discoverable by Hydra.
install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]' --config-settings editable_mode=compat

run: install
	$(BIN)/python -m embft data.local_dir=$(DATA)

grid: install
	$(BIN)/python -m embft -m experiment=seed_grid data.local_dir=$(DATA)

search: install
	$(BIN)/python -m embft -m experiment=search data.local_dir=$(DATA)

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

mlflow-ui:
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf outputs multirun .cache
