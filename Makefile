# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if missing and install.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines take the torch wheel that lies on disk; constrain torch in every pip command so nothing upgrades it.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint reproduce experiment bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=77" wheel

$(STAMP): $(BIN)/python pyproject.toml setup.py csrc/select.cpp
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q --no-build-isolation -e ".[triton,experiments,bench,qlora,test]" "$(TORCH_SPEC)"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m fastsel demo

test: install
	$(BIN)/python -m ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/python -m ruff check .
	$(BIN)/lint-imports

reproduce: install
	$(BIN)/python -m fastsel continual --config configs/reproduce.yaml --out runs/reproduce

# The miniature safety experiment of issue 15 (<= 45 min on a 2-core CPU; not in CI). Re-running resumes.
EXPERIMENT_OUT ?= runs/experiment
experiment: install
	$(BIN)/python -m fastsel continual --config configs/experiment.yaml --out $(EXPERIMENT_OUT)

bench: install
	$(BIN)/python -m fastsel bench --quick

clean:
	rm -rf build *.egg-info fastsel/_C*.so
