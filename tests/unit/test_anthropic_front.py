"""The front's own words on Anthropic's routes: its refusals and a stream cut short, read back by the `anthropic` SDK."""

import json
from types import SimpleNamespace

import anthropic
import httpx2
import pytest

from gateway.anthropic_api import anthropic_error, broken_stream
from gateway.relay import WORKER_DIED, unavailable
from gateway.settings import FrontSettings

QUESTION = [{"role": "user", "content": "Hi"}]


def sdk_client(status: int, content: bytes, content_type: str) -> anthropic.Anthropic:
    transport = httpx2.MockTransport(
        lambda request: httpx2.Response(status, content=content, headers={"content-type": content_type})
    )
    return anthropic.Anthropic(base_url="http://test", api_key="k", http_client=httpx2.Client(transport=transport), max_retries=0)


@pytest.mark.parametrize(
    "status, kind, sdk_error",
    [
        (401, "authentication_error", anthropic.AuthenticationError),
        (404, "not_found_error", anthropic.NotFoundError),
        (405, "invalid_request_error", anthropic.APIStatusError),
        (413, "request_too_large", anthropic.APIStatusError),
        (502, "api_error", anthropic.InternalServerError),
        (503, "overloaded_error", anthropic.InternalServerError),
        (507, "api_error", anthropic.InternalServerError),
    ],
)
def test_the_fronts_refusals_are_anthropics_errors(status, kind, sdk_error):
    response = anthropic_error(status, "why")
    assert json.loads(response.body) == {"type": "error", "error": {"type": kind, "message": "why"}}
    with pytest.raises(sdk_error) as caught:
        sdk_client(status, response.body, "application/json").messages.create(model="m", max_tokens=4, messages=QUESTION)
    assert caught.value.status_code == status


def test_an_app_loading_or_healing_is_overloaded_with_retry_after():
    from gateway.anthropic_api import MESSAGES

    front = SimpleNamespace(settings=FrontSettings.from_env({"APP": "smollm2"}))  # all `unavailable` reads of the front
    response = unavailable(front, "smollm2", "still loading", MESSAGES)
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert json.loads(response.body)["error"]["type"] == "overloaded_error"


def test_a_stream_cut_short_ends_with_an_error_event_the_sdk_raises():
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "m",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 0},
        },
    }
    cut = b"event: message_start\ndata: " + json.dumps(start).encode() + b"\n\nevent: content_block_st"
    stream = cut + broken_stream(WORKER_DIED, 507)
    with pytest.raises(anthropic.APIStatusError) as caught:
        with sdk_client(200, stream, "text/event-stream").messages.stream(model="m", max_tokens=4, messages=QUESTION) as s:
            list(s.text_stream)
    assert "worker died" in str(caught.value)
