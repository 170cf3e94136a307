# inferline: `make demo` and `make test` are the two commands; both set everything up.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
TRITON_VENV := .venv-triton
PY := $(VENV)/bin/python
FEAST_REPO := deploy/feast/feature_repo
FEAST_STAMP := $(FEAST_REPO)/data/.materialized

.PHONY: setup demo test lint proto models clean

setup: $(VENV)/.stamp $(TRITON_VENV)/.stamp $(FEAST_STAMP) redis-server libb64

# The Redis tests start their own redis-server on a free port; install Debian's package
# where the binary is missing (CI runs as root).
.PHONY: redis-server
redis-server:
	@command -v redis-server >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server; \
		else echo "redis-server is missing: install it (apt-get install redis-server)"; exit 1; fi; }

# perf_analyzer (from the tritonclient wheel) links libb64.so.0d, which no wheel ships: install
# Debian's package where it is missing (its libcudart.so.12 comes from PyPI, in pyproject.toml).
.PHONY: libb64
libb64:
	@/sbin/ldconfig -p | grep -q 'libb64\.so\.0d' || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq libb64-0d; \
		else echo "libb64 is missing (perf_analyzer needs it): apt-get install libb64-0d"; exit 1; fi; }

$(VENV)/.stamp: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(TRITON_VENV)/.stamp: requirements-triton.txt
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRITON_VENV)/bin/python -m pip install -q -r requirements-triton.txt
	touch $@

$(FEAST_STAMP): $(VENV)/.stamp $(FEAST_REPO)/driver_repo.py $(FEAST_REPO)/feature_store.yaml scripts/setup_feast.py services/inferline/demo/driver_data.py
	$(PY) scripts/setup_feast.py $(FEAST_REPO)
	touch $@

demo: setup
	$(PY) -m inferline.demo.run --config deploy/local/inferline.yaml

lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check services tests benchmarks scripts triton_models
	$(VENV)/bin/ruff format --check services tests benchmarks scripts triton_models
	$(VENV)/bin/mypy
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf format --diff --exit-code

test: setup lint
	$(PY) -m pytest -q

proto: $(VENV)/.stamp
	$(PY) scripts/gen_proto.py

models: $(VENV)/.stamp
	$(PY) triton_models/train_driver_models.py

clean:
	rm -rf $(VENV) $(TRITON_VENV) $(FEAST_REPO)/data .pytest_cache .mypy_cache .ruff_cache
