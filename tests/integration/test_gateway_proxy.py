"""The gateway in front of a fake TorchServe, over real sockets on loopback.

The fake answers like TorchServe does (management worker list, predictions,
chunked streams) and records what reached it, so each test checks one promise
of the gateway: readiness, routing, faithful pass-through, streaming without
buffering, draining at shutdown.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from gateway.server import GatewayServer, make_server
from gateway.settings import GatewaySettings

APP = "m"
PREDICT_ROUTE = "/v1/endpoints/123/deployedModels/456:predict"


class FakeTorchServe(BaseHTTPRequestHandler):
    """Both TorchServe APIs in one handler; class attributes steer and record it."""

    protocol_version = "HTTP/1.1"
    statuses: list[str] = []
    seen: list[dict] = []
    release_second_chunk = threading.Event()
    slow_done = threading.Event()

    def log_message(self, *args):
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _send(self, status: int, body: bytes, reason: str | None = None, **headers: str) -> None:
        self.send_response(status, reason)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        self._route()

    def do_HEAD(self):  # noqa: N802
        self._route()

    def do_POST(self):  # noqa: N802
        self._route()

    def do_DELETE(self):  # noqa: N802
        self._route()

    def _route(self) -> None:
        body = self._body()
        FakeTorchServe.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body})
        if self.path == f"/models/{APP}":
            workers = [{"id": str(9000 + i), "status": s} for i, s in enumerate(self.statuses)]
            self._send(200, json.dumps([{"modelName": APP, "workers": workers}]).encode())
        elif self.path == "/ping":
            self._send(200, b'{"status": "Healthy"}', Content_Type="application/json")
        elif self.path.startswith(f"/predictions/{APP}/stream"):
            self._stream()
        elif self.path.startswith(f"/predictions/{APP}/slow"):
            time.sleep(1.0)
            self._send(200, b"slow")
            FakeTorchServe.slow_done.set()
        elif self.path.startswith(f"/predictions/{APP}"):
            if body.startswith(b"{bad"):
                self._send(400, b'{"error": "bad json", "field": "body"}', "bad json", Content_Type="application/json")
            else:
                self._send(200, b'{"predictions": ["echo:' + body + b'"]}', Content_Type="application/json", X_Request_Id="r1")
        else:
            self._send(404, b'{"code": 404, "type": "ResourceNotFoundException"}', Content_Type="application/json")

    def _stream(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        for piece in (b'{"text": "one"}\n', b'{"text": "two"}\n'):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()
            if not FakeTorchServe.release_second_chunk.wait(10):
                return
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture()
def fake() -> Iterator[ThreadingHTTPServer]:
    FakeTorchServe.statuses = ["STARTING"]
    FakeTorchServe.seen = []
    FakeTorchServe.release_second_chunk = threading.Event()
    FakeTorchServe.slow_done = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTorchServe)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    FakeTorchServe.release_second_chunk.set()
    server.shutdown()
    server.server_close()


def _gateway(fake_port: int) -> GatewayServer:
    address = f"http://127.0.0.1:{fake_port}"
    settings = GatewaySettings.from_env(
        {
            "APP": APP,
            "AIP_HTTP_PORT": "1",  # replaced: port 0 below picks a free one
            "AIP_PREDICT_ROUTE": PREDICT_ROUTE,
            "AIP_HEALTH_ROUTE": "/health",
            "TS_INFERENCE_ADDRESS": address,
            "TS_MANAGEMENT_ADDRESS": address,
            "TS_METRICS_ADDRESS": "http://127.0.0.1:2",
            "LLM_GATEWAY_BIND": "127.0.0.1",
        }
    )
    server = make_server(dataclasses.replace(settings, port=0))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture()
def gateway(fake) -> Iterator[GatewayServer]:
    server = _gateway(fake.server_address[1])
    yield server
    server.shutdown()
    server.server_close()


def _request(gateway: GatewayServer, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", gateway.server_address[1], timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.reason, response.headers, response.read()
    finally:
        conn.close()


def test_health_turns_200_only_when_a_worker_is_ready(gateway):
    status, _, headers, body = _request(gateway, "GET", "/health")
    assert status == 503
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"status": "loading", "model": APP, "workers": ["STARTING"]}
    FakeTorchServe.statuses = ["READY"]
    assert _request(gateway, "GET", "/health")[0] == 200
    assert _request(gateway, "HEAD", "/health")[0] == 200
    FakeTorchServe.statuses = ["UNLOADING"]
    assert _request(gateway, "GET", "/health")[0] == 503


def test_health_is_503_while_torchserve_is_not_up():
    server = _gateway(_free_port())
    try:
        status, _, _, body = _request(server, "GET", "/health")
        assert (status, json.loads(body)["status"]) == (503, "starting")
        assert _request(server, "POST", PREDICT_ROUTE, b"{}")[0] == 502
    finally:
        server.shutdown()
        server.server_close()


def test_predict_route_reaches_the_model_with_body_and_headers(gateway):
    body = json.dumps({"instances": ["How to prepare a spanish omelette:"]}).encode()
    status, _, headers, answer = _request(
        gateway, "POST", PREDICT_ROUTE + "?trace=1", body, {"Content-Type": "application/json", "X-Custom": "yes"}
    )
    assert status == 200
    assert answer == b'{"predictions": ["echo:' + body + b'"]}'
    assert headers["X-Request-Id"] == "r1"
    seen = FakeTorchServe.seen[-1]
    assert (seen["method"], seen["path"], seen["body"]) == ("POST", f"/predictions/{APP}?trace=1", body)
    assert seen["headers"]["Content-Type"] == "application/json"
    assert seen["headers"]["X-Custom"] == "yes"
    assert seen["headers"]["X-Forwarded-For"] == "127.0.0.1"


def test_errors_pass_through_with_status_reason_and_body(gateway):
    status, reason, headers, body = _request(gateway, "POST", f"/predictions/{APP}", b"{bad")
    assert (status, reason) == (400, "bad json")
    assert json.loads(body) == {"error": "bad json", "field": "body"}
    assert _request(gateway, "DELETE", "/nowhere")[0] == 404


def test_other_paths_are_proxied_as_they_are(gateway):
    status, _, _, body = _request(gateway, "GET", "/ping")
    assert (status, json.loads(body)) == (200, {"status": "Healthy"})
    status, _, headers, body = _request(gateway, "HEAD", "/ping")
    assert (status, body) == (200, b"")
    assert FakeTorchServe.seen[-1]["method"] == "HEAD"


def test_a_chunked_request_body_is_forwarded(gateway):
    conn = http.client.HTTPConnection("127.0.0.1", gateway.server_address[1], timeout=10)
    conn.request("POST", PREDICT_ROUTE, body=iter([b'{"instances": ', b'["hi"]}']), encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 200
    assert response.read() == b'{"predictions": ["echo:{"instances": ["hi"]}"]}'
    conn.close()


def test_a_stream_is_forwarded_chunk_by_chunk_without_buffering(gateway):
    """The first chunk reaches the client while TorchServe still holds back the second."""
    sock = socket.create_connection(("127.0.0.1", gateway.server_address[1]), timeout=10)
    sock.sendall(f"POST /predictions/{APP}/stream HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode())
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"HTTP/1.1 200")
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, value = line.decode().split(":", 1)
        headers[name.strip().lower()] = value.strip()
    assert headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers
    first = _read_chunk(reader)
    assert first == b'{"text": "one"}\n'
    assert not FakeTorchServe.release_second_chunk.is_set()  # it arrived before TorchServe went on
    FakeTorchServe.release_second_chunk.set()
    assert _read_chunk(reader) == b'{"text": "two"}\n'
    assert _read_chunk(reader) == b""
    sock.close()


def test_drain_waits_for_requests_in_flight_and_refuses_new_ones(gateway):
    FakeTorchServe.statuses = ["READY"]
    result = {}
    slow = threading.Thread(target=lambda: result.update(answer=_request(gateway, "POST", f"/predictions/{APP}/slow", b"{}")))
    slow.start()
    deadline = time.monotonic() + 5
    while gateway.active_requests == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gateway.drain(5.0)
    assert FakeTorchServe.slow_done.is_set()
    slow.join(5)
    assert result["answer"][0] == 200
    status, _, headers, _ = _request(gateway, "GET", "/health")
    assert status == 503 and headers["Connection"] == "close"


def _read_chunk(reader) -> bytes:
    size = int(reader.readline().split(b";")[0], 16)
    data = reader.read(size) if size else b""
    assert reader.readline() == b"\r\n"
    return data


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
