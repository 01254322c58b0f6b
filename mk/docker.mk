# Container images (Dockerfile, docker/, gateway/; docs/docker.md).
# Every variable can be set on the command line or in the environment.
#
#   make build-dev APP=gpt2      CPU image torchserve-llm:gpt2, weights inside
#   make build-gpu APP=gpt2      GPU image torchserve-llm-gpu:gpt2
#   make image-gpu APP=gpt2      the same with buildah (no Docker engine); make gpu-requirements resolves its pins
#   make build-slim              torchserve-llm-slim:latest, no weights
#   make run APP=gpt2            start it on 127.0.0.1:$(PORT); returns once it is healthy
#   make test APP=gpt2           (core) the omelette request, against the container
#   make stop-container
#   make push VARIANT=gpu        to $(REGION)-docker.pkg.dev/$(GCP_PROJECT)/$(REPO)/…
#   make scan VARIANT=slim       pip-audit and Debian's security suite on a podman image

APP ?= smollm2
PORT ?= 7080
# Any Docker-compatible client: DOCKER=podman works too.
DOCKER ?= docker
IMAGE ?= torchserve-llm
TAG ?= $(APP)
SLIM_TAG ?= latest
# Empty: the Dockerfile's own default (python:3.11-slim-bookworm, pinned by digest), for
# the CPU and the GPU image alike. Set it to build on another base (docs/docker.md).
BASE_IMAGE ?=
BASE_ARG = $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE))
# CPU builds take torch from PyTorch's CPU index; empty means PyPI only.
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
# Empty: PyPI's torch, which bundles CUDA. Set e.g. https://download.pytorch.org/whl/cu126
# to match an older driver.
GPU_TORCH_INDEX_URL ?=
# Extra flags, e.g. --secret id=hf_token,env=HF_TOKEN for gated Hub models, or the
# buildah/podman flags of a machine with no Docker engine (see docs/docker.md).
DOCKER_BUILD_FLAGS ?=
DOCKER_RUN_FLAGS ?=
# cpu | gpu | slim: the image that run and push use.
VARIANT ?= cpu
IMAGE_cpu = $(IMAGE):$(TAG)
IMAGE_gpu = $(IMAGE)-gpu:$(TAG)
IMAGE_slim = $(IMAGE)-slim:$(SLIM_TAG)
LOCAL_IMAGE = $(IMAGE_$(VARIANT))
CONTAINER ?= $(IMAGE)-$(if $(filter slim,$(VARIANT)),slim,$(APP))
# slim only: the checkpoint folder to mount (e.g. models/$(APP) after `make model`).
MODEL_DIR ?= models/$(APP)
# make run's container has a read-only root; TorchServe writes only to these two (tmpfs).
# TEMP holds the unpacked archive: a tmpfs costs that much memory (docs/docker.md).
# Docker mounts a tmpfs world-writable; podman as root's, unless :U gives it to the user.
TMPFS_OWNER = $(if $(filter podman,$(notdir $(DOCKER))),:U)
READ_ONLY_FLAGS ?= --read-only --tmpfs /home/model-server/tmp$(TMPFS_OWNER) \
	--tmpfs /home/model-server/logs$(TMPFS_OWNER)
# Seconds `make run` waits for the health route (CPU loads of big models are slow).
RUN_WAIT_S ?= 900
# 1: publish TorchServe's management (7081) and metrics (7082) APIs as well.
EXPOSE_ADMIN ?= 0

REGION ?= $(or $(GCP_REGION),us-central1)
REPO ?= $(or $(VERTEX_REPO),llm)
REMOTE_IMAGE = $(REGION)-docker.pkg.dev/$(GCP_PROJECT)/$(REPO)/$(LOCAL_IMAGE)
# What `make build-gpu push VARIANT=gpu` leaves in Artifact Registry, for mk/vertex.mk to deploy.
GPU_REMOTE_IMAGE = $(REGION)-docker.pkg.dev/$(GCP_PROJECT)/$(REPO)/$(IMAGE_gpu)

# make scan: the image to scan (in the project's podman storage) and where the report goes.
SCAN_IMAGE ?= $(LOCAL_IMAGE)
SCAN_OUT ?= docs/scan
GPU_RESOLVE_REPORT ?= bench/results/gpu-requirements.json

.PHONY: build-dev build-gpu image-gpu gpu-requirements build-slim run stop-container push scan

build-dev: ## CPU image torchserve-llm:APP with APP's weights inside
	$(DOCKER) build $(DOCKER_BUILD_FLAGS) $(BASE_ARG) \
		--build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL) --build-arg APP=$(APP) -t $(IMAGE_cpu) .

build-gpu: ## GPU image torchserve-llm-gpu:APP (same base, PyPI's CUDA torch)
	$(DOCKER) build $(DOCKER_BUILD_FLAGS) $(BASE_ARG) \
		--build-arg TORCH_INDEX_URL=$(GPU_TORCH_INDEX_URL) --build-arg REQUIREMENTS=requirements-gpu.txt \
		--build-arg APP=$(APP) -t $(IMAGE_gpu) .

# make image-gpu: the GPU image with buildah, on a machine with no Docker engine (docs/docker.md,
# /work/shared/docs/container-builds.md): chroot isolation, the host's CA bundle and pip.conf
# mounted for HTTPS to PyPI (BUILDAH_PIP_DIR), the project's podman storage.
BUILDAH ?= buildah
BUILDAH_PIP_DIR ?=
IMAGE_GPU_FLAGS ?= --isolation chroot --layers $(if $(BUILDAH_PIP_DIR),--volume $(abspath $(BUILDAH_PIP_DIR)):/etc/xdg/pip:ro)

image-gpu: ## GPU image torchserve-llm-gpu:APP built by buildah (no Docker engine; see docs/docker.md)
	$(BUILDAH) bud $(IMAGE_GPU_FLAGS) $(DOCKER_BUILD_FLAGS) $(BASE_ARG) \
		--build-arg TORCH_INDEX_URL=$(GPU_TORCH_INDEX_URL) --build-arg REQUIREMENTS=requirements-gpu.txt \
		--build-arg APP=$(APP) -t $(IMAGE_gpu) .

# What the GPU image's pip would install, resolved against PyPI without downloading torch's wheel.
gpu-requirements: ## resolve docker/requirements-gpu.txt against PyPI (dry run), report in GPU_RESOLVE_REPORT
	$(PY) scripts/resolve_gpu_requirements.py --report $(GPU_RESOLVE_REPORT)

build-slim: ## image with no weights (torchserve-llm-slim): loads LLM_MODEL_DIR or AIP_STORAGE_URI at start
	$(DOCKER) build $(DOCKER_BUILD_FLAGS) $(BASE_ARG) \
		--build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL) --target slim -t $(IMAGE_slim) .

run: ## run the VARIANT image (cpu|gpu|slim) on 127.0.0.1:PORT; returns once /health is 200
	-@$(DOCKER) rm -f $(CONTAINER) >/dev/null 2>&1
	$(DOCKER) run -d --name $(CONTAINER) -p 127.0.0.1:$(PORT):7080 $(READ_ONLY_FLAGS) \
		$(if $(filter 1 yes true,$(EXPOSE_ADMIN)),-e LLM_EXPOSE_ADMIN=true -p 127.0.0.1:7081:7081 -p 127.0.0.1:7082:7082) \
		$(if $(filter slim,$(VARIANT)),-e APP=$(APP) -e LLM_MODEL_DIR=/models/$(APP) -v $(abspath $(MODEL_DIR)):/models/$(APP):ro) \
		$(if $(filter gpu,$(VARIANT)),--gpus all) \
		$(DOCKER_RUN_FLAGS) $(LOCAL_IMAGE)
	@for _ in $$(seq 1 $(RUN_WAIT_S)); do \
		if curl -fsS -o /dev/null http://127.0.0.1:$(PORT)/health 2>/dev/null; then \
			echo "$(CONTAINER) is ready: http://127.0.0.1:$(PORT)/predictions/$(APP)"; exit 0; fi; \
		if [ "$$($(DOCKER) inspect -f '{{.State.Running}}' $(CONTAINER) 2>/dev/null)" != true ]; then \
			$(DOCKER) logs --tail 40 $(CONTAINER); echo "$(CONTAINER) exited" >&2; exit 1; fi; \
		sleep 1; \
	done; $(DOCKER) logs --tail 40 $(CONTAINER); echo "$(CONTAINER) not ready after $(RUN_WAIT_S) s" >&2; exit 1

stop-container: ## stop and remove the container of make run
	-$(DOCKER) stop -t 20 $(CONTAINER)
	-$(DOCKER) rm -f $(CONTAINER)

push: ## push the VARIANT image to REGION-docker.pkg.dev/GCP_PROJECT/REPO
	@test -n "$(GCP_PROJECT)" || { echo "set GCP_PROJECT (and REGION, REPO)" >&2; exit 2; }
	$(DOCKER) tag $(LOCAL_IMAGE) $(REMOTE_IMAGE)
	$(DOCKER) push $(REMOTE_IMAGE)
	@echo "pushed $(REMOTE_IMAGE)"

scan: ## pip-audit the VARIANT image's venv, list its Debian packages with pending updates (SCAN_OUT)
	$(PY) scripts/scan_image.py $(SCAN_IMAGE) --out $(SCAN_OUT)
