"""Chat step: an OpenAI chat body to a deployed endpoint, the assistant's text back.

Vertex carries a body it does not parse in two ways. ``rawPredict`` (and
``streamRawPredict``) send it, unchanged, to the Model's predict route;
``invoke`` sends it to a container path of the caller's choosing, here
``/v1/chat/completions``, but only for a Model uploaded with
``invoke_route_prefix="/*"`` on a dedicated endpoint. Such a Model has no
predict route, so the route follows from the Model that takes the traffic.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from gateway.contract import CHAT_COMPLETIONS_ROUTE, JSON
from vertex.container import INVOKE_ROUTE_PREFIXES
from vertex.endpoints import open_endpoint
from vertex.errors import PredictionError, VertexConfigError
from vertex.predict import DEFAULT_TIMEOUT_S
from vertex.settings import Settings

if TYPE_CHECKING:
    from google.cloud.aiplatform import Endpoint

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
JSON_HEADERS = {"Content-Type": JSON}
# Past google-auth's default timeout the SDK mounts requests-toolbelt's keep-alive
# adapter for dedicated endpoints, a package this project does not install.
MAX_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ChatRequest:
    """One OpenAI chat request: the messages, the app's name as ``model``, and sampling."""

    messages: list[dict[str, str]]
    model: str
    max_tokens: int | None = None
    temperature: float | None = None

    def __post_init__(self) -> None:
        if not self.messages:
            raise VertexConfigError("no messages: pass --prompt or --messages-json")
        for number, message in enumerate(self.messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise VertexConfigError(f"messages[{number}] needs a role, one of {', '.join(ROLES)}")
            if not isinstance(message.get("content"), str):
                raise VertexConfigError(f"messages[{number}].content must be a string")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise VertexConfigError(f"--max-tokens must be at least 1, not {self.max_tokens}")
        if self.temperature is not None and self.temperature < 0:
            raise VertexConfigError(f"--temperature must be >= 0, not {self.temperature}")

    def body(self, stream: bool) -> bytes:
        body: dict[str, Any] = {"model": self.model, "messages": self.messages}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if stream:
            body["stream"] = True
        return json.dumps(body).encode()


def serving_model(endpoint: Endpoint) -> tuple[str, bool]:
    """The deployed model taking the traffic, and whether its Model has the invoke prefix."""
    from google.cloud import aiplatform

    split = dict(endpoint.gca_resource.traffic_split)
    if not split:
        raise VertexConfigError(f"{endpoint.resource_name} has no model taking traffic: run `make deploy`")
    deployed_id = max(split, key=lambda deployed: split[deployed])
    deployed = next(d for d in endpoint.gca_resource.deployed_models if d.id == deployed_id)
    model = aiplatform.Model(deployed.model, version=deployed.model_version_id or None)
    return deployed_id, model.gca_resource.container_spec.invoke_route_prefix in INVOKE_ROUTE_PREFIXES


def answer_text(response: Any) -> str:
    """The assistant's text of a non-streamed answer; an error status raises with the body."""
    if response.status_code != 200:
        raise PredictionError(f"the endpoint answered {response.status_code}: {response.text}")
    try:
        return response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise PredictionError(f"not a chat.completion: {response.text[:500]}") from None


def stream_text(lines: Iterable[bytes]) -> Iterator[str]:
    """The content deltas of an SSE chat stream, up to ``data: [DONE]``.

    The SDK's streaming methods yield lines and never look at the status, so
    an error body arrives as lines too: anything that is not an SSE event is
    kept and raised if the stream ends without ``[DONE]``.
    """
    other: list[str] = []
    for raw in lines:
        line = raw.decode(errors="replace").strip()
        if not line.startswith("data:"):
            if line:
                other.append(line)
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            raise PredictionError(f"the stream failed: {event['error']}")
        for choice in event.get("choices", []):
            content = (choice.get("delta") or {}).get("content")
            if content:
                yield content
    raise PredictionError("the stream ended without [DONE]" + (f": {' '.join(other)[:500]}" if other else ""))


def chat(
    endpoint_name: str,
    request: ChatRequest,
    settings: Settings,
    stream: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Iterator[str]:
    """The assistant's text, in pieces as they arrive when ``stream``; one piece otherwise.

    rawPredict/streamRawPredict for a Model with a predict route; invoke to
    ``/v1/chat/completions`` (the deployed model named, so the Model inspected
    is the one that answers) for a Model uploaded with the invoke prefix.
    """
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise VertexConfigError(f"--timeout must be 1-{MAX_TIMEOUT_S:.0f} s, not {timeout_s}")
    endpoint = open_endpoint(endpoint_name, settings)
    deployed_id, invoke = serving_model(endpoint)
    body = request.body(stream)
    log.info(
        "chat via %s on %s",
        "invoke " + CHAT_COMPLETIONS_ROUTE if invoke else ("streamRawPredict" if stream else "rawPredict"),
        endpoint.resource_name,
    )
    if invoke:
        answer = endpoint.invoke(
            request_path=CHAT_COMPLETIONS_ROUTE,
            body=body,
            headers=JSON_HEADERS,
            deployed_model_id=deployed_id,
            stream=stream,
            timeout=timeout_s,
        )
        return stream_text(answer) if stream else iter([answer_text(answer)])
    if stream:
        return stream_text(endpoint.stream_raw_predict(body=body, headers=JSON_HEADERS, timeout=timeout_s))
    return iter([answer_text(endpoint.raw_predict(body=body, headers=JSON_HEADERS, timeout=timeout_s))])
