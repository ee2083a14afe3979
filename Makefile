# Two commands:  `make demo` (set up + run the digits demo)  and  `make test` (set up + run the tests).
# GPU machines: pick your torch build, e.g. make demo TORCH_SPEC="torch==2.9.1 --index-url https://download.pytorch.org/whl/cu128"
# or TORCH_SPEC=keep to use the torch already present in $(VENV).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
BIN := $(VENV)/bin

.PHONY: demo test install install-test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	if [ "$(TORCH_SPEC)" != "keep" ]; then $(BIN)/python -m pip install -q $(TORCH_SPEC); fi
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e ".[demo]"
	$(BIN)/python -m asnn_dist.train.prebuild
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install -q -e ".[demo,test]"
	$(BIN)/python -m asnn_dist.train.prebuild
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/asnn-dist demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(BIN)/asnn-dist bench neurons

clean:
	rm -rf $(VENV) asnn-work .pytest_cache
