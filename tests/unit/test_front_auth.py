"""The front's optional API key: where it is read, which headers carry it, which shape a refusal takes."""

from gateway.anthropic_api import anthropic_error
from gateway.auth import presented_keys, refusal_shape
from gateway.openai_api import openai_error
from gateway.relay import error
from gateway.settings import FrontSettings, SupervisorSettings


def test_the_key_is_read_once_and_never_shown():
    settings = FrontSettings.from_env({"APP": "a", "LLM_API_KEY": " s3cret "})
    assert settings.api_key == "s3cret" and "s3cret" not in repr(settings)
    assert FrontSettings.from_env({"APP": "a", "LLM_API_KEY": ""}).api_key is None
    assert settings.open_routes == ("/health", "/ping")
    vertex = FrontSettings.from_env({"APP": "a", "AIP_HEALTH_ROUTE": "/v1/alive"})
    assert vertex.open_routes == ("/v1/alive", "/health", "/ping")


def test_torchserve_never_gets_the_key(tmp_path):
    (tmp_path / "a.mar").touch()
    env = {"APP": "a", "LLM_API_KEY": "s3cret", "LLM_MODEL_STORE": str(tmp_path), "HOME": str(tmp_path)}
    assert "LLM_API_KEY" not in SupervisorSettings.from_env(env).torchserve_env


def test_bearer_tokens_and_x_api_key_are_the_keys_offered():
    headers = [
        (b"Authorization", b"Bearer  one "),
        (b"x-api-key", b"two"),
        (b"authorization", b"Basic three"),
        (b"content-type", b"application/json"),
    ]
    assert presented_keys((name.lower(), value) for name, value in headers) == [b"one", b"two"]


def test_a_refusal_takes_its_routes_shape():
    native = frozenset({"/v1/endpoints/e:predict"})
    assert refusal_shape("/v1/messages", native) is anthropic_error
    assert refusal_shape("/v1/messages/count_tokens", native) is anthropic_error
    assert refusal_shape("/v1/chat/completions", native) is openai_error
    assert refusal_shape("/v1/endpoints/e:predict", native) is error
    assert refusal_shape("/predictions/smollm2", native) is error
