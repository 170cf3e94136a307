# inferline: `make demo` and `make test` are the two commands; both set everything up.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
TRITON_VENV := .venv-triton
PY := $(VENV)/bin/python
FEAST_REPO := deploy/feast/feature_repo
FEAST_STAMP := $(FEAST_REPO)/data/.materialized

.PHONY: setup demo test lint proto models clean

setup: $(VENV)/.stamp $(TRITON_VENV)/.stamp $(FEAST_STAMP) redis-server postgresql libb64 promtool codegen-plugins

# The Redis tests start their own redis-server on a free port; install Debian's package
# where the binary is missing (CI runs as root).
.PHONY: redis-server
redis-server:
	@command -v redis-server >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server; \
		else echo "redis-server is missing: install it (apt-get install redis-server)"; exit 1; fi; }

# The Postgres job-store tests start their own PostgreSQL cluster (initdb, pg_ctl) on a free
# port; install Debian's server package where the binaries are missing.
.PHONY: postgresql
postgresql:
	@{ command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq postgresql; \
		else echo "PostgreSQL is missing: install it (apt-get install postgresql)"; exit 1; fi; }

# perf_analyzer (from the tritonclient wheel) links libb64.so.0d, which no wheel ships: install
# Debian's package where it is missing (its libcudart.so.12 comes from PyPI, in pyproject.toml).
.PHONY: libb64
libb64:
	@/sbin/ldconfig -p | grep -q 'libb64\.so\.0d' || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq libb64-0d; \
		else echo "libb64 is missing (perf_analyzer needs it): apt-get install libb64-0d"; exit 1; fi; }

# The alert rules are evaluated by Prometheus' own promtool (tests/unit/test_alert_rules.py):
# Debian's prometheus package ships it (and the server). Its service is not started.
.PHONY: promtool
promtool:
	@command -v promtool >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
			apt-get install -y -qq --no-install-recommends prometheus; \
		else echo "promtool is missing: install it (apt-get install prometheus)"; exit 1; fi; }

# The API tests generate Go and Java stubs with `buf generate` (buf.gen.yaml): the code
# generator plugins come from Debian (protoc-gen-go, protoc-gen-go-grpc, grpc-java's
# plugin, and protoc for the built-in Java generator); no registry serves them as wheels.
CODEGEN_PLUGINS := protoc-gen-go protoc-gen-go-grpc grpc_java_plugin protoc
.PHONY: codegen-plugins
codegen-plugins:
	@for p in $(CODEGEN_PLUGINS); do command -v $$p >/dev/null || missing=1; done; \
	[ -z "$$missing" ] || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
			apt-get install -y -qq protoc-gen-go protoc-gen-go-grpc protobuf-compiler-grpc-java-plugin protobuf-compiler; \
		else echo "code generator plugins missing: apt-get install protoc-gen-go protoc-gen-go-grpc protobuf-compiler-grpc-java-plugin protobuf-compiler"; exit 1; fi; }

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

$(FEAST_STAMP): $(VENV)/.stamp $(FEAST_REPO)/driver_repo.py $(FEAST_REPO)/feature_store.yaml scripts/setup_feast.py services/inferline/demo/feast_setup.py services/inferline/demo/driver_data.py
	$(PY) scripts/setup_feast.py $(FEAST_REPO)
	touch $@

demo: setup
	$(PY) -m inferline.demo.run --config deploy/local/inferline.yaml

lint: $(VENV)/.stamp
	$(VENV)/bin/ruff check services tests benchmarks scripts triton_models clients
	$(VENV)/bin/ruff format --check services tests benchmarks scripts triton_models clients
	$(VENV)/bin/mypy
	cd clients/python && ../../$(VENV)/bin/mypy  # the slim client, with its own config
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf format --diff --exit-code
	$(VENV)/bin/buf breaking --against protos/breaking-baseline.json

# `buf breaking` compares the protos with protos/breaking-baseline.json, the image of the
# API as last published, and not with the main branch: sessions commit straight to main
# and CI runs in a clone of it, where "against main" compares the tree with itself. A
# deliberate breaking change (a new major version) refreshes the baseline in the same commit.
.PHONY: api-baseline
api-baseline: $(VENV)/.stamp
	$(VENV)/bin/buf build --exclude-source-info -o protos/breaking-baseline.json
	$(PY) -c "import json, pathlib; p = pathlib.Path('protos/breaking-baseline.json'); \
		p.write_text(json.dumps(json.loads(p.read_text()), indent=1, sort_keys=True) + '\n')"

test: setup lint
	$(PY) -m pytest -q

proto: $(VENV)/.stamp
	$(PY) scripts/gen_proto.py

# deploy/k8s/base/generated/prometheusrule.yaml: the PrometheusRule of deploy/grafana/alerts.yaml
# (kustomize cannot wrap a file into a resource); tests/unit/test_k8s_manifests.py fails while it is stale.
.PHONY: k8s-generate
k8s-generate: $(VENV)/.stamp
	$(PY) deploy/k8s/generate.py

models: $(VENV)/.stamp
	$(PY) triton_models/train_driver_models.py

clean:
	rm -rf $(VENV) $(TRITON_VENV) $(FEAST_REPO)/data .pytest_cache .mypy_cache .ruff_cache
