"""What the front promises on the wire, in one copy for the front and for every tool that talks to it.

The port and routes are Vertex's defaults for the container (``AIP_*`` may move them; see
``gateway.settings``); the probe is the one-token prediction that "ready" means: an app is
ready only once a worker has answered it.
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_HTTP_PORT = 7080
HEALTH_ROUTE = "/health"
# The OpenAI API's routes (gateway.openai_api).
CHAT_COMPLETIONS_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
MODELS_ROUTE = "/v1/models"
# Anthropic's Messages API's routes (gateway.anthropic_api).
MESSAGES_ROUTE = "/v1/messages"
COUNT_TOKENS_ROUTE = "/v1/messages/count_tokens"
RESPONSES_ROUTE = "/v1/responses"
# Where ``make serve`` answers on this host, with the default port.
LOCAL_URL = f"http://127.0.0.1:{DEFAULT_HTTP_PORT}"
JSON = "application/json"
PROBE_BODY = {"instances": ["Hello"], "parameters": {"max_new_tokens": 1, "temperature": 0}}
PROBE = json.dumps(PROBE_BODY).encode()


def predict_route(app: str) -> str:
    """TorchServe's inference route for one registered model; the front serves it under the same path."""
    return f"/predictions/{app}"


# The header that tells the handler which protocol a relayed body speaks (handler.api.protocols reads it).
PROTOCOL_HEADER = "X-LLM-Protocol"

# Under the run folder ($LLM_RUN_DIR), one `<app>.json` per app: the dtype decision its worker
# serves with (handler.settings.DTYPE_REPORTS names the same folder), shown by the health route.
DTYPE_REPORTS = "dtype"

# The id the front gives each relayed prediction; a cancel names it (handler.cancellation reads both).
REQUEST_ID_HEADER = "X-LLM-Request-Id"
CANCEL_MESSAGE = b"cancel "


def cancel_socket_dir(run_dir: Path, app: str) -> Path:
    """Where each worker of ``app`` binds a Unix datagram socket for the front's cancels (``<pid>.sock``)."""
    return Path(run_dir) / "cancel" / app
