# Vertex AI: deploy the GPU image, ask it, tear it down (python -m vertex; docs/vertex.md).
# Every variable can be set on the command line or in the environment.

APP ?= smollm2
PY ?= .venv/bin/python
GCP_REGION ?= us-central1
# Artifact Registry repository the image was pushed to, and the image itself.
VERTEX_REPO ?= llm
# The name `make push VARIANT=gpu` gives the image built by `make build-gpu`.
VERTEX_IMAGE ?= $(GCP_REGION)-docker.pkg.dev/$(GCP_PROJECT)/$(VERTEX_REPO)/torchserve-llm-gpu:$(APP)
# t4 (n1-standard-8 + T4, float16), l4 (g2-standard-8 + L4), a100, a100-80gb, h100, h200 (bfloat16).
# Empty: the cheapest one-GPU preset that holds models/$(APP)'s weights (vertex.machines.preset_for_weights).
VERTEX_MACHINE ?=
VERTEX_ENDPOINT ?= $(APP)
# Extra `python -m vertex deploy` flags, e.g. --max-replicas 3 --duty-cycle-target 60 --spot
VERTEX_DEPLOY_ARGS ?=
VERTEX_PROMPT ?= How to prepare a spanish omelette:
VERTEX_MAX_NEW_TOKENS ?= 64
# 1: deploy to a dedicated endpoint (its own DNS name; needed for streaming and invoke).
VERTEX_DEDICATED ?= 0
# 1: upload with invoke_route_prefix "/*" (every container path through .../invoke/<path>,
# no predict route); implies VERTEX_DEDICATED=1.
VERTEX_INVOKE ?= 0
# 1: `make chat` prints the text as it is generated (streamRawPredict, or invoke).
VERTEX_STREAM ?= 0
# 1: `make undeploy` also deletes the Model (all its versions).
VERTEX_DELETE_MODEL ?= 0

VERTEX_YES = $(filter 1 yes true,$(1))
VERTEX_ROUTES = $(if $(call VERTEX_YES,$(VERTEX_INVOKE)),--invoke-route-prefix '/*' --dedicated-endpoint,\
	$(if $(call VERTEX_YES,$(VERTEX_DEDICATED)),--dedicated-endpoint))

VERTEX_CONNECT = $(if $(GCP_PROJECT),--project $(GCP_PROJECT)) \
	$(if $(GCP_REGION),--region $(GCP_REGION)) \
	$(if $(VERTEX_API_ENDPOINT),--api-endpoint $(VERTEX_API_ENDPOINT))

.PHONY: deploy predict chat undeploy vertex-check

vertex-check:
	@test -n "$(GCP_PROJECT)" || { echo "set GCP_PROJECT (and GCP_REGION, default us-central1)" >&2; exit 2; }

deploy: vertex-check ## Upload VERTEX_IMAGE as a Model (new version if it exists) and deploy it on VERTEX_MACHINE (VERTEX_INVOKE=1: invoke prefix, dedicated endpoint)
	$(PY) -m vertex deploy --app $(APP) --image $(VERTEX_IMAGE) $(if $(VERTEX_MACHINE),--machine $(VERTEX_MACHINE)) \
		--endpoint $(VERTEX_ENDPOINT) $(VERTEX_ROUTES) $(VERTEX_CONNECT) $(VERTEX_DEPLOY_ARGS)

predict: vertex-check ## Ask the Vertex endpoint VERTEX_PROMPT (VERTEX_MAX_NEW_TOKENS tokens)
	$(PY) -m vertex predict --app $(APP) --endpoint $(VERTEX_ENDPOINT) \
		--instance '$(VERTEX_PROMPT)' --parameters '{"max_new_tokens": $(VERTEX_MAX_NEW_TOKENS)}' \
		$(VERTEX_CONNECT)

chat: vertex-check ## Send VERTEX_PROMPT to the endpoint as an OpenAI chat request and print the answer (VERTEX_STREAM=1: as it comes)
	$(PY) -m vertex chat --app $(APP) --endpoint $(VERTEX_ENDPOINT) --prompt '$(VERTEX_PROMPT)' \
		--max-tokens $(VERTEX_MAX_NEW_TOKENS) $(if $(call VERTEX_YES,$(VERTEX_STREAM)),--stream) \
		$(VERTEX_CONNECT)

undeploy: vertex-check ## Undeploy everything from the endpoint and delete it (VERTEX_DELETE_MODEL=1: the Model too)
	$(PY) -m vertex undeploy --app $(APP) --endpoint $(VERTEX_ENDPOINT) \
		$(if $(call VERTEX_YES,$(VERTEX_DELETE_MODEL)),--delete-model) $(VERTEX_CONNECT)
