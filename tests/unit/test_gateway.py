"""The gateway's pure logic: env contract, readiness rule, routing, framing, process groups."""

from __future__ import annotations

import io
import json
import threading
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gateway import health
from gateway.proxy import BadBody, forwardable, read_chunks, read_length, upstream_path
from gateway.settings import GatewaySettings, SettingsError, SupervisorSettings, Upstream, torchserve_addresses
from gateway.supervisor import group_alive, torchserve_command

# --- settings ---------------------------------------------------------------


def test_defaults_follow_the_contract():
    s = GatewaySettings.from_env({"APP": "smollm2"})
    assert (s.port, s.predict_route, s.health_route) == (7080, "/predictions/smollm2", "/health")
    assert s.inference == Upstream("127.0.0.1", 7085)
    assert s.management == Upstream("127.0.0.1", 7081)


def test_vertex_variables_win():
    env = {"APP": "m", "AIP_HTTP_PORT": "8080", "AIP_PREDICT_ROUTE": "/v1/x:predict", "AIP_HEALTH_ROUTE": "/ping"}
    s = GatewaySettings.from_env(env)
    assert (s.port, s.predict_route, s.health_route) == (8080, "/v1/x:predict", "/ping")


@pytest.mark.parametrize(
    "env, word",
    [
        ({}, "APP"),
        ({"APP": "m", "AIP_HTTP_PORT": "http"}, "AIP_HTTP_PORT"),
        ({"APP": "m", "AIP_HTTP_PORT": "70000"}, "AIP_HTTP_PORT"),
        ({"APP": "m", "AIP_HEALTH_ROUTE": "health"}, "AIP_HEALTH_ROUTE"),
        ({"APP": "m", "AIP_HTTP_PORT": "7081"}, "collides"),
        ({"APP": "m", "AIP_HEALTH_ROUTE": "/x", "AIP_PREDICT_ROUTE": "/x"}, "both"),
        ({"APP": "m", "TS_MANAGEMENT_ADDRESS": "127.0.0.1:7081"}, "TS_MANAGEMENT_ADDRESS"),
        ({"APP": "m", "LLM_GATEWAY_TIMEOUT_S": "-1"}, "LLM_GATEWAY_TIMEOUT_S"),
    ],
)
def test_bad_env_names_the_variable(env, word):
    with pytest.raises(SettingsError, match=word):
        GatewaySettings.from_env(env)


def test_admin_apis_stay_on_loopback_unless_asked():
    assert torchserve_addresses({})["TS_MANAGEMENT_ADDRESS"] == "http://127.0.0.1:7081"
    exposed = torchserve_addresses({"LLM_EXPOSE_ADMIN": "true"})
    assert exposed["TS_MANAGEMENT_ADDRESS"] == "http://0.0.0.0:7081"
    assert exposed["TS_METRICS_ADDRESS"] == "http://0.0.0.0:7082"
    assert exposed["TS_INFERENCE_ADDRESS"] == "http://127.0.0.1:7085"


def test_explicit_torchserve_address_wins_and_wildcard_is_reached_on_loopback():
    env = {"APP": "m", "LLM_EXPOSE_ADMIN": "1", "TS_MANAGEMENT_ADDRESS": "http://0.0.0.0:9001"}
    assert torchserve_addresses(env)["TS_MANAGEMENT_ADDRESS"] == "http://0.0.0.0:9001"
    assert GatewaySettings.from_env(env).management == Upstream("127.0.0.1", 9001)


def _store(tmp_path: Path, *names: str) -> Path:
    store = tmp_path / "model-store"
    store.mkdir()
    for name in names:
        (store / name).write_text("x")
    return store


def test_the_one_archive_in_the_store_is_served(tmp_path):
    store = _store(tmp_path, "smollm2.mar", ".gitkeep")
    s = SupervisorSettings.from_env({"APP": "smollm2", "LLM_MODEL_STORE": str(store), "HOME": str(tmp_path)})
    assert s.model_archive == "smollm2.mar"
    assert torchserve_command(s)[-4:] == ["--models", "smollm2=smollm2.mar", "--disable-token-auth", "--ncs"]
    assert s.torchserve_env["TS_INFERENCE_ADDRESS"] == "http://127.0.0.1:7085"


def test_a_store_with_two_archives_needs_a_name(tmp_path):
    store = _store(tmp_path, "a.mar", "b.mar")
    with pytest.raises(SettingsError, match="LLM_MODEL_ARCHIVE"):
        SupervisorSettings.from_env({"APP": "a", "LLM_MODEL_STORE": str(store)})
    named = SupervisorSettings.from_env({"APP": "a", "LLM_MODEL_STORE": str(store), "LLM_MODEL_ARCHIVE": "b.mar"})
    assert named.model_archive == "b.mar"


def test_slim_image_without_weights_fails_at_start(tmp_path):
    env = {"APP": "m", "LLM_MODEL_STORE": str(_store(tmp_path, "llm")), "LLM_IMAGE_WEIGHTS": "none"}
    with pytest.raises(SettingsError, match="AIP_STORAGE_URI"):
        SupervisorSettings.from_env(env)
    assert SupervisorSettings.from_env({**env, "AIP_STORAGE_URI": "gs://b/m"}).model_archive == "llm"
    with pytest.raises(SettingsError, match="not a folder"):
        SupervisorSettings.from_env({**env, "LLM_MODEL_DIR": str(tmp_path / "missing")})
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    with pytest.raises(SettingsError, match="config.json"):
        SupervisorSettings.from_env({**env, "LLM_MODEL_DIR": str(checkpoint)})
    (checkpoint / "config.json").write_text("{}")
    assert SupervisorSettings.from_env({**env, "LLM_MODEL_DIR": str(checkpoint)}).model_archive == "llm"


def test_a_mounted_checkpoint_the_server_cannot_read_fails_at_start(tmp_path, monkeypatch):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"")
    # Tests may run as root, who reads everything: make access() answer as uid 1000 would.
    monkeypatch.setattr("gateway.settings.os.access", lambda path, mode: not str(path).endswith(".safetensors"))
    env = {"APP": "m", "LLM_MODEL_STORE": str(_store(tmp_path, "llm")), "LLM_MODEL_DIR": str(checkpoint)}
    with pytest.raises(SettingsError, match=r"\['model.safetensors'\] not readable"):
        SupervisorSettings.from_env(env)


# --- readiness rule -----------------------------------------------------------


def _description(*statuses: str) -> bytes:
    return json.dumps([{"modelName": "m", "workers": [{"id": str(i), "status": s} for i, s in enumerate(statuses)]}]).encode()


def test_ready_only_with_a_ready_worker():
    assert health.readiness_from_description("m", 200, _description("READY")).http_status == 200
    loading = health.readiness_from_description("m", 200, _description("UNLOADING", "STARTING"))
    assert (loading.http_status, loading.status, loading.workers) == (503, "loading", ("UNLOADING", "STARTING"))
    assert health.readiness_from_description("m", 200, _description()).http_status == 503


def test_any_version_with_a_ready_worker_is_enough():
    versions = json.loads(_description("STARTING")) + json.loads(_description("READY"))
    assert health.readiness_from_description("m", 200, json.dumps(versions).encode()).ready


@pytest.mark.parametrize("status, body, word", [(404, b"{}", "not-registered"), (500, b"", "unavailable"), (200, b"<html>", "unavailable")])
def test_anything_else_is_not_ready(status, body, word):
    state = health.readiness_from_description("m", status, body)
    assert (state.http_status, state.status) == (503, word)
    assert json.loads(state.body())["status"] == word


class _FakeManagement(BaseHTTPRequestHandler):
    statuses: list[str] = []

    def do_GET(self):  # noqa: N802
        body = _description(*self.statuses) if self.path == "/models/m" else b'{"code": 404}'
        self.send_response(200 if self.path == "/models/m" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_health_check_follows_the_management_api_from_503_to_200():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeManagement)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    upstream = Upstream("127.0.0.1", server.server_address[1])
    try:
        _FakeManagement.statuses = ["STARTING"]
        assert health.check("m", upstream, 2.0).http_status == 503
        _FakeManagement.statuses = ["STARTING", "READY"]
        assert health.check("m", upstream, 2.0).http_status == 200
        _FakeManagement.statuses = ["UNLOADING"]
        assert health.check("m", upstream, 2.0).http_status == 503
        assert health.check("other", upstream, 2.0).status == "not-registered"
    finally:
        server.shutdown()
        server.server_close()
    down = health.check("m", upstream, 0.5)
    assert (down.http_status, down.status) == (503, "starting")


# --- routing and framing --------------------------------------------------------


def test_predict_route_is_renamed_and_the_rest_kept():
    s = GatewaySettings.from_env({"APP": "m", "AIP_PREDICT_ROUTE": "/v1/endpoints/1:predict"})
    assert upstream_path(s, "/v1/endpoints/1:predict") == "/predictions/m"
    assert upstream_path(s, "/v1/endpoints/1:predict?x=1") == "/predictions/m?x=1"
    assert upstream_path(s, "/predictions/m/1.0") == "/predictions/m/1.0"
    assert upstream_path(s, "/ping") == "/ping"


def test_hop_by_hop_headers_are_not_forwarded():
    headers = Message()
    for name, value in [("Content-Type", "a/b"), ("Connection", "keep-alive, X-Private"), ("X-Private", "1"),
                        ("Transfer-Encoding", "chunked"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]:
        headers[name] = value
    assert forwardable(headers) == [("Content-Type", "a/b"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]


def test_chunks_come_out_one_by_one_with_extensions_and_trailers():
    stream = io.BytesIO(b"3;ext=1\r\nabc\r\n1\r\nd\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT")
    assert list(read_chunks(stream)) == [b"abc", b"d"]
    assert stream.read() == b"NEXT"


@pytest.mark.parametrize("raw", [b"zz\r\nabc\r\n", b"5\r\nab", b"3\r\nabcXX", b"3"])
def test_broken_chunked_framing_raises(raw):
    with pytest.raises(BadBody):
        list(read_chunks(io.BytesIO(raw)))


def test_a_short_body_raises():
    assert b"".join(read_length(io.BytesIO(b"abcdef"), 4)) == b"abcd"
    with pytest.raises(BadBody):
        list(read_length(io.BytesIO(b"ab"), 4))


# --- process groups -------------------------------------------------------------


def _fake_proc(tmp_path: Path, entries: dict[str, str]) -> str:
    for pid, stat in entries.items():
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "stat").write_text(stat)
    (tmp_path / "self").mkdir()
    return str(tmp_path)


def test_a_group_of_zombies_counts_as_gone(tmp_path):
    proc = _fake_proc(tmp_path, {"10": "10 (java) Z 1 10 10 0", "11": "11 (py (worker)) Z 10 10 10 0", "12": "12 (x) S 1 99 99 0"})
    assert not group_alive(10, proc)
    assert group_alive(99, proc)
