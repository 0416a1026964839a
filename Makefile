# kubetrain: the documented entry points. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CLUSTER_DIR ?= .cluster

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-19s %s\n", $$1, $$2}'

# torch first, pinned: left to itself pip would pick a multi-GB CUDA build. Use
# TORCH_SPEC to choose another build (e.g. a CUDA wheel on a GPU machine).
TORCH_SPEC ?= torch==2.13.0

$(BIN)/kubetrain: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet '$(TORCH_SPEC)'
	$(BIN)/pip install --quiet -e '.[operator,trainer,serve,object-store,dev]'
	@touch $@

install: $(BIN)/kubetrain ## create .venv with kubetrain, its trainer and the dev tools

quickstart: install ## train the quickstart run locally (2 CPU workers, FSDP2) into runs/quickstart
	$(BIN)/kubetrain validate examples/*.yaml --model-configs examples/model-configs
	$(BIN)/kubetrain run examples/quickstart.yaml --overwrite

bench: install ## benchmarks vs same-run baselines -> bench/results/bench.json + bench.png
	$(BIN)/python -m bench.run_all

bench-gpu: install ## on a GPU machine: ~0.5B model, FSDP2 + bf16, tokens/s and MFU
	$(BIN)/python -m bench.bench_gpu

lint: install ## ruff, formatting and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

crds: install ## regenerate crds/ and the Helm chart's copy from the API models
	$(BIN)/kubetrain crds

docs: install ## regenerate docs/api-reference.md from the API models
	$(BIN)/python -m kubetrain_api.reference > docs/api-reference.md

dashboards: install ## regenerate the chart's Grafana dashboards and alert rules from kubetrain_monitoring
	$(BIN)/python -m kubetrain_monitoring

dashboards-preview: install ## draw the Training and Serving dashboards from a live run -> docs/dashboards/*.png
	$(BIN)/python hack/controlplane.py tools
	$(BIN)/python hack/dashboards_preview.py

golden: install ## regenerate tests/golden/ (the children the operator renders for the quickstart run and the example ModelService)
	$(BIN)/python -m tests.golden.render

check-crds: install ## fail if crds/ or the chart's copy is out of date
	$(BIN)/kubetrain crds --check

test: install lint ## everything CI runs: lint, unit, control-plane, image and real-node e2e tests
	$(BIN)/python hack/controlplane.py build
	$(BIN)/python hack/controlplane.py tools
	$(BIN)/python hack/images.py build
	$(BIN)/pytest -v --durations=15

test-unit: install ## fast tests only (no control plane)
	$(BIN)/pytest -m "not controlplane"

e2e: install ## end to end on a real node: helm install, TrainingRun -> Ray pods -> served model
	$(BIN)/python hack/controlplane.py build
	$(BIN)/python hack/controlplane.py tools
	$(BIN)/python hack/images.py build
	$(BIN)/pytest -v -m e2e --durations=5

images: ## build both images (operator, CPU trainer) with buildah into docker-archive tarballs
	$(PYTHON) hack/images.py build

kind-up: ## with Docker: create the kind cluster of hack/kind/cluster.yaml
	kind create cluster --name kubetrain --config hack/kind/cluster.yaml --wait 120s

kind-e2e: ## with Docker: build + kind load the images, helm install, quickstart to a served model
	KEEP=$(KEEP) bash hack/kind/e2e.sh

kind-down: ## delete the kind cluster
	kind delete cluster --name kubetrain

cluster-up: ## start a local control plane and a real node in .cluster/ (then: source .cluster/env)
	@# A node left over from a control plane that is gone would block its restart.
	@$(PYTHON) hack/controlplane.py status --dir $(CLUSTER_DIR) >/dev/null 2>&1 || \
	  $(PYTHON) hack/node.py down --dir $(CLUSTER_DIR)/node
	$(PYTHON) hack/controlplane.py up --dir $(CLUSTER_DIR)
	$(PYTHON) hack/node.py up --dir $(CLUSTER_DIR)/node --kubeconfig $(CLUSTER_DIR)/kubeconfig
	@echo "run: source $(CLUSTER_DIR)/env"

cluster-down: ## stop the node and the control plane started by cluster-up
	$(PYTHON) hack/node.py down --dir $(CLUSTER_DIR)/node
	$(PYTHON) hack/controlplane.py down --dir $(CLUSTER_DIR)

.PHONY: help install quickstart bench bench-gpu lint crds docs dashboards dashboards-preview golden check-crds test test-unit e2e kind-up kind-e2e kind-down cluster-up cluster-down
