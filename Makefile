# The two commands a new user needs: `make demo` and `make test`. Both create the environment first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast bench gpu-check lint demo serve stop clean lock

setup: $(STAMP)

# One resolve of everything (see ../shared/design/STACK.md: installing moto in a second step broke s3fs),
# at the tested versions of constraints.txt (`make lock` renews them). torch==2.13.0: pip takes this
# machine's local CPU wheel, a GPU machine gets PyPI's CUDA build of the same release.
# GeoCLIP (its pretrained location encoder makes `locdiff realbench`) goes in without its declared dependencies: they would pull torchvision, which
# breaks beside our torch; of the rest, `import geoclip` needs geopy (and its geographiclib).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -c constraints.txt --no-deps geoclip==1.3.0 geopy==2.4.1 geographiclib==2.1
	-$(BIN)/pip install -q -c constraints.txt 'sphericart-torch>=2.0,<3' || echo "optional extra sphericart-torch did not install; benchmarks skip it"
	touch $(STAMP)

# Renew constraints.txt: a fresh venv, one install within pyproject.toml's bounds (the newest releases
# that resolve), then pip freeze. Run the tests with it (`make clean test`) before committing the result.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install '.[dev]' 'sphericart-torch>=2.0,<3'
	$(LOCK_VENV)/bin/pip install --no-deps geoclip==1.3.0 geopy==2.4.1 geographiclib==2.1
	$(LOCK_VENV)/bin/pip check | grep -v '^geoclip ' | { ! grep .; }
	{ sed -n '/^#/!q;p' constraints.txt; \
	  $(LOCK_VENV)/bin/pip freeze --all --exclude locdiff --exclude pip | sed 's/^\([A-Za-z0-9_.-]*==[^+]*\)+.*/\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)
	@echo "constraints.txt renewed; review with git diff constraints.txt"

test: setup
	$(BIN)/python -m pytest -q

# Everything that starts no service (Ray, Prefect, S3, HTTP servers) and is not marked slow: about 2 minutes.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not ray and not prefect and not s3 and not server and not slow"

bench: setup
	$(BIN)/python -m benchmarks.run

# The GPU path on one GPU in under 5 minutes (benchmarks/gpu_check.py); without a GPU, a dry run of its CPU parts.
gpu-check: setup
	$(BIN)/python -m benchmarks.gpu_check

# ruff, and the import-layer contract (tests/test_layers.py, docs/architecture.md): no cycles, imports at the
# top of modules (lazy only for heavy optional libraries), each module on its layer, no module over 600 lines.
# `make test` runs the contract too (it is an ordinary test).
lint: setup
	$(BIN)/ruff check locdiff flows tests benchmarks
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_layers.py

demo: setup
	$(BIN)/python -m flows.demo

# Serve the registry's champion (`locdiff serve`: MLflow's scoring server behind a guard) on
# 127.0.0.1:$(SERVE_PORT), nothing to activate. The registry: MLFLOW_TRACKING_URI, else the stack `make demo`
# left running (MLFLOW_PORT, 5000). POST /invocations (README "Where was this photo taken?").
SERVE_PORT ?= 5001
SERVE_MAX_MB ?= 128
serve:
	@test -x $(BIN)/locdiff || { echo "no $(BIN): run make setup (or make demo) first" >&2; exit 2; }
	MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-http://127.0.0.1:$${MLFLOW_PORT:-5000}}" \
	  $(BIN)/locdiff serve --model models:/locdiff@champion --host 127.0.0.1 --port $(SERVE_PORT) \
	  --max-request-mb $(SERVE_MAX_MB)

stop:
	@if [ -x infra/stop.sh ]; then infra/stop.sh; fi

clean:
	rm -rf $(VENV) $(LOCK_VENV) build *.egg-info .pytest_cache benchmarks/results
