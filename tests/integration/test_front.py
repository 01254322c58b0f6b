"""The front's HTTP promises, on the real process tree (front, healer, a real TorchServe serving SmolLM2).

Vertex's routes and ``/v1`` (the OpenAI API, its own tests in test_openai_api.py); JSON for every refusal; a request-size limit on
declared and chunked bodies; a deadline for request headers; a bounded number of
connections; histograms on the metrics port; a client that leaves is noticed; only the
front listens beyond TorchServe's loopback ports; and SIGTERM drains what is in flight
before the tree stops.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from tests.support.torchserve import TorchServe, build_archive
from tests.support.waiting import wait_for

APP = "smollm2"
PREDICT_ROUTE = "/v1/endpoints/123/deployedModels/456:predict"
HEALTH_ROUTE = "/v1/endpoints/123/deployedModels/456:health"
GREEDY = {"instances": ["The capital of France is"], "parameters": {"max_new_tokens": 4, "temperature": 0}}
MAX_CONNECTIONS = 16
HEADER_TIMEOUT_S = 2
GUARD_S = 120  # turns a hang into a failure; nothing is timed against it


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[TorchServe]:
    workdir = tmp_path_factory.mktemp("front")
    store = workdir / "store"
    store.mkdir()
    server = TorchServe(
        workdir,
        {APP: build_archive(APP, APP, store)},
        env={
            "AIP_PREDICT_ROUTE": PREDICT_ROUTE,
            "AIP_HEALTH_ROUTE": HEALTH_ROUTE,
            "LLM_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
            "LLM_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        },
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


def request(
    server: TorchServe, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=GUARD_S)
    try:
        headers = headers or {}
        conn.request(method, path, body=body, headers=headers, encode_chunked="Transfer-Encoding" in headers)
        response = conn.getresponse()
        return response.status, dict(response.headers), response.read()
    finally:
        conn.close()


def exposition(server: TorchServe) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", server.metrics_port, timeout=GUARD_S)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return text


def metric(server: TorchServe, prefix: str) -> float:
    text = exposition(server)
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_vertex_routes_and_health_answer(front):
    for route in (HEALTH_ROUTE, "/health"):
        status, _, body = request(front, "GET", route)
        assert status == 200, body
        entry = json.loads(body)["apps"][0]
        dtype = entry.pop("dtype")
        assert entry == {"status": "ready", "model": APP, "workers": ["READY"]}
        # The shipped app decides its dtype on this CPU; the health route shows the choice and its timings.
        assert dtype["source"] in ("probe", "cache")
        timings = dtype["decode_step_ms"]
        assert "float32" in timings and timings[dtype["chosen"]] == min(timings.values())
    status, _, vertex = request(front, "POST", PREDICT_ROUTE, json.dumps(GREEDY).encode(), {"Content-Type": "application/json"})
    assert status == 200, vertex
    status, _, plain = request(
        front, "POST", f"/predictions/{APP}", json.dumps(GREEDY).encode(), {"Content-Type": "application/json"}
    )
    assert status == 200
    assert json.loads(vertex) == json.loads(plain)
    assert json.loads(vertex)["predictions"][0]["generated_text"]
    assert request(front, "GET", "/ping")[0] == 200  # liveness, as TorchServe's /ping was


@pytest.mark.parametrize(
    "method, path, status, word",
    [
        ("GET", "/v1/chat/completions", 405, "use POST"),
        ("POST", "/v1/embeddings", 404, "no route"),
        ("POST", "/predictions/nope", 404, "nope"),
        ("GET", "/predictions/smollm2", 405, "GET"),
        ("GET", "/metrics", 404, "/health"),
        ("GET", "/models", 404, "no route"),
    ],
)
def test_what_is_not_served_is_refused_in_json(front, method, path, status, word):
    got, _, body = request(front, method, path, b"{}" if method == "POST" else None)
    assert got == status
    error = json.loads(body)["error"]
    assert word in (error["message"] if path.startswith("/v1/") else error)  # OpenAI's shape under /v1


def test_the_handler_errors_pass_through(front):
    body = {"instances": ["Hi"], "parameters": {"temperature": -1}}
    status, _, answer = request(
        front, "POST", f"/predictions/{APP}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    assert status == 400
    assert json.loads(answer)["field"] == "parameters.temperature"


def test_a_body_over_the_limit_is_refused_declared_or_chunked(front):
    big = b'{"instances": ["' + b"a" * (1024 * 1024) + b'"]}'
    status, _, answer = request(front, "POST", f"/predictions/{APP}", big, {"Content-Type": "application/json"})
    assert status == 413
    assert json.loads(answer)["limit"] == 1024 * 1024
    status, _, answer = request(
        front,
        "POST",
        f"/predictions/{APP}",
        iter([big[:600_000], big[600_000:]]),
        {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
    )
    assert status == 413
    assert json.loads(answer)["field"] == "body"


def test_a_chunked_request_body_is_forwarded(front):
    raw = json.dumps(GREEDY).encode()
    status, _, answer = request(
        front,
        "POST",
        f"/predictions/{APP}",
        iter([raw[:10], raw[10:]]),
        {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
    )
    assert status == 200, answer
    assert json.loads(answer)["predictions"][0]["generated_text"]


def test_a_connection_that_never_finishes_its_headers_is_closed(front):
    with socket.create_connection(("127.0.0.1", front.port), timeout=GUARD_S) as sock:
        sock.sendall(b"POST /predictions/smollm2 HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert sock.recv(1024) == b""  # the front closed it (a hang would end in the socket timeout)


def test_an_idle_kept_alive_connection_outlives_the_header_deadline(front):
    """Idle between two requests is the keep-alive timeout's (30 s) to end, not the header deadline's."""
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=GUARD_S)
    try:
        for _ in range(2):
            conn.request("GET", "/health")
            response = conn.getresponse()
            assert response.status == 200, response.read()
            response.read()
            time.sleep(HEADER_TIMEOUT_S + 1)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200  # the same socket: http.client would say if it were closed
    finally:
        conn.close()


def test_a_kept_alive_connection_that_never_finishes_its_next_headers_is_closed(front):
    with socket.create_connection(("127.0.0.1", front.port), timeout=GUARD_S) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            answer += sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert sock.recv(1024) == b""  # closed at the header deadline, well before the keep-alive timeout


def test_connections_are_bounded(front):
    idle = [socket.create_connection(("127.0.0.1", front.port), timeout=GUARD_S) for _ in range(MAX_CONNECTIONS)]
    try:
        status, _, body = request(front, "GET", "/health")
        assert status == 503, body
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: request(front, "GET", "/health")[0] == 200, "health to recover once the idle connections closed")


def test_histograms_per_app_and_status(front):
    stream = {"instances": ["Once upon a time"], "parameters": {"max_new_tokens": 8, "temperature": 0, "stream": True}}
    status, _, body = request(
        front, "POST", f"/predictions/{APP}", json.dumps(stream).encode(), {"Content-Type": "application/json"}
    )
    assert status == 200 and b"predictions" in body
    assert metric(front, f'llm_front_request_seconds_count{{app="{APP}",status="200"}}') >= 1
    assert metric(front, f'llm_front_request_seconds_count{{app="{APP}",status="400"}}') >= 1
    assert metric(front, f'llm_front_time_to_first_byte_seconds_count{{app="{APP}",status="200"}}') >= 1
    assert metric(front, f'llm_front_queue_wait_seconds_count{{app="{APP}",status="200"}}') >= 1
    assert metric(front, "llm_front_requests_in_flight") == 0
    assert "\nGeneratedTokens{" in exposition(front)  # the handler's, through TorchServe, on the same port


def test_a_client_that_leaves_is_noticed(front):
    before = metric(front, "llm_front_client_disconnects_total")
    long = {"instances": ["Tell me a story:"], "parameters": {"max_new_tokens": 300, "min_new_tokens": 300, "stream": True}}
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=GUARD_S)
    conn.request("POST", f"/predictions/{APP}", json.dumps(long), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline()  # the first piece arrived
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + GUARD_S
    while metric(front, "llm_front_client_disconnects_total") == before or metric(front, "llm_front_requests_in_flight"):
        assert time.monotonic() < deadline, "the front never noticed the client left"
        time.sleep(0.2)


def test_only_the_front_listens_and_torchserve_stays_on_loopback(front):
    tree = [psutil.Process(front.process.pid), *psutil.Process(front.process.pid).children(recursive=True)]
    listening = {}
    for process in tree:
        for conn in process.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                listening[(conn.laddr.ip, conn.laddr.port)] = process.pid
    front_ports = {port for (_, port), pid in listening.items() if pid == front.process.pid}
    assert front_ports == {front.port, front.metrics_port}
    for (ip, _), pid in listening.items():
        assert ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1"), (ip, pid)


def test_sigterm_drains_what_is_in_flight_then_stops_the_tree(front):
    """Last in the module: it stops the server."""
    tree = [p.pid for p in psutil.Process(front.process.pid).children(recursive=True)]
    body = {"instances": ["Count to twenty:"], "parameters": {"max_new_tokens": 12, "temperature": 0, "stream": True}}
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=GUARD_S)
    conn.request("POST", f"/predictions/{APP}", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    first = response.readline()
    front.process.send_signal(signal.SIGTERM)
    rest = response.read()
    conn.close()
    lines = (first + rest).decode().strip().split("\n")
    assert "predictions" in json.loads(lines[-1]), lines[-3:]  # the stream finished, not cut
    assert front.process.wait(GUARD_S) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", front.port), timeout=5).close()
    assert not [pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
