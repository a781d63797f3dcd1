# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
# CPU build by default (a small wheel, and the one CI uses); GPU users: make TORCH=torch demo
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test venv protos clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: venv
	$(BIN)/hivefold demo

test: venv
	$(BIN)/python -m pytest -q

protos: venv
	$(BIN)/python -m protos.generate

clean:
	rm -rf $(VENV) hivefold-demo .pytest_cache
