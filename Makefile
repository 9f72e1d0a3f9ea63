# The two commands a new user needs: `make demo` and `make test`. Both create the environment first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test bench lint demo stop clean

setup: $(STAMP)

# One resolve of everything (see ../shared/design/STACK.md: installing moto in a second step broke s3fs).
# torch==2.13.0 is pinned in pyproject.toml: pip takes this machine's local CPU wheel, a GPU machine gets
# PyPI's CUDA build of the same release.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	-$(BIN)/pip install -q 'sphericart-torch>=2.0' 'faiss-cpu>=1.8' || echo "optional extras (sphericart, faiss) did not install; benchmarks skip them"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m benchmarks.run

lint: setup
	$(BIN)/ruff check locdiff flows tests benchmarks

demo: setup
	$(BIN)/python -m flows.demo

stop:
	@if [ -x infra/stop.sh ]; then infra/stop.sh; fi

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache benchmarks/results
