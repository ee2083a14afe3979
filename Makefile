# Two commands:  `make demo` (set up + run the digits demo)  and  `make test` (set up + run the tests).
# GPU machines: TORCH_SPEC=cuda installs the CUDA torch build named in docker/torch-cuda.env (the one
# torch/CUDA pairing; `make image` builds the Docker image from the same file), any other pip spec
# installs that, and TORCH_SPEC=keep uses the torch already present in $(VENV).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
IMAGE ?= asnn-dist:latest
BIN := $(VENV)/bin

include docker/torch-cuda.env
TORCH_CUDA_SPEC := torch==$(TORCH_CUDA_VERSION) --index-url $(TORCH_CUDA_INDEX)
TORCH_PIP_SPEC = $(if $(filter cuda,$(TORCH_SPEC)),$(TORCH_CUDA_SPEC),$(TORCH_SPEC))

.PHONY: demo test install install-test bench image clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	if [ "$(TORCH_SPEC)" != "keep" ]; then $(BIN)/python -m pip install -q $(TORCH_PIP_SPEC); fi
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

image:
	docker build -f docker/Dockerfile --build-arg CUDA_BASE_IMAGE=$(CUDA_BASE_IMAGE) -t $(IMAGE) .

clean:
	rm -rf $(VENV) asnn-work .pytest_cache
