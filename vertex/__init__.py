"""Deploy the TorchServe LLM image to Vertex AI, one typed function per step.

``python -m vertex upload|deploy|predict|chat|undeploy`` wraps these for the Makefile.
The SDK is imported lazily so that the configuration checks (machines, env,
secrets) run, and fail, without google-cloud-aiplatform installed.
"""

from vertex.chat import ChatRequest, chat
from vertex.container import ServingContainer
from vertex.deploy import deploy_app
from vertex.endpoints import (
    Deployment,
    deploy_model,
    get_or_create_endpoint,
    open_endpoint,
    teardown,
)
from vertex.errors import DeployError, PredictionError, SecretInEnvError, VertexConfigError
from vertex.machines import PRESETS, MachineSpec, resolve_machine, validate_machine
from vertex.models import find_model, upload_model
from vertex.predict import predict
from vertex.settings import Settings, connect, resolve_settings

__all__ = [
    "PRESETS",
    "ChatRequest",
    "DeployError",
    "Deployment",
    "MachineSpec",
    "PredictionError",
    "SecretInEnvError",
    "ServingContainer",
    "Settings",
    "VertexConfigError",
    "chat",
    "connect",
    "deploy_app",
    "deploy_model",
    "find_model",
    "get_or_create_endpoint",
    "open_endpoint",
    "predict",
    "resolve_machine",
    "resolve_settings",
    "teardown",
    "upload_model",
    "validate_machine",
]
