"""Kill the model worker in the middle of a request, on a real TorchServe with the gateway in front.

The client of the killed request gets an error, not a hang; a request queued behind it is
not lost; TorchServe starts a new worker; while it loads, the management API says the worker
is not READY and the gateway's health route answers 503, then 200 again; later requests
succeed through TorchServe and through the gateway.

On the continuous path (TorchServe's async mode) TorchServe itself never answers the requests
a dead worker held; through the gateway, which watches the worker pids, they get 507.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from gateway.server import GatewayServer, make_server
from gateway.settings import GatewaySettings, Upstream
from tests.support.torchserve import TorchServe, continuous_model_config, dynamic_model_config, post, start_app

MODEL = "smollm2"
HANG_GUARD_S = int(os.environ.get("HANG_GUARD_S", 300))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[TorchServe]:
    # The classic path, where a second request waits in TorchServe's queue while the worker is
    # busy: the test shows that queued request survives the crash. (In async mode every
    # request goes to the worker at once, so there is no queued request to keep.)
    torchserve = start_app(tmp_path_factory.mktemp("worker-crash"), MODEL, dynamic_model_config("smollm2"))
    yield torchserve
    torchserve.stop()


def start_gateway(server: TorchServe) -> GatewayServer:
    """The container's gateway (real code, own thread), its upstreams this TorchServe."""
    settings = GatewaySettings(
        app=MODEL,
        port=0,
        predict_route=f"/predictions/{MODEL}",
        health_route="/health",
        inference=Upstream("127.0.0.1", server.port),
        management=Upstream("127.0.0.1", server.management_port),
        bind_host="127.0.0.1",
    )
    front = make_server(settings)
    threading.Thread(target=front.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return front


@pytest.fixture(scope="module")
def gateway(server: TorchServe) -> Iterator[GatewayServer]:
    front = start_gateway(server)
    yield front
    front.shutdown()
    front.server_close()


def get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return 0


def describe(server: TorchServe) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.management}/models/{MODEL}", timeout=10) as response:
        return json.load(response)[0]


def wait_for(condition, what: str) -> None:
    """Poll until `condition()`; the limit only turns a hang into a failure."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


class Call(threading.Thread):
    """One prediction in the background, its answer kept; through `url` (a gateway) if given."""

    def __init__(self, server: TorchServe, body: dict[str, Any], url: str | None = None):
        super().__init__(daemon=True)
        self.server, self.body, self.url = server, body, url
        self.answer: tuple[int, Any] | None = None

    def run(self) -> None:
        if self.url is None:
            self.answer = self.server.post(MODEL, self.body, timeout=HANG_GUARD_S)
        else:
            self.answer = post(self.url, self.body, timeout=HANG_GUARD_S)


def test_a_worker_killed_mid_request_is_replaced(server, gateway, record_property):
    health = f"http://127.0.0.1:{gateway.server_address[1]}/health"
    assert get_status(health) == 200
    old = describe(server)["workers"][0]
    assert old["status"] == "READY"

    before = server.batches_received()
    long_call = Call(server, {"instances": ["Count to a thousand:"],
                              "parameters": {"max_new_tokens": 400, "min_new_tokens": 400}})
    long_call.start()
    wait_for(lambda: server.batches_received() > before, "the long request to reach the worker")
    queued_call = Call(server, {"instances": ["The capital of France is"], "parameters": {"max_new_tokens": 2, "temperature": 0}})
    queued_call.start()
    wait_for(lambda: describe(server)["jobQueueStatus"]["pendingRequests"] >= 1, "the second request to queue")

    os.kill(old["pid"], signal.SIGKILL)
    worker_states, health_states, ping_states = set(), [], set()

    def replaced() -> bool:
        workers = describe(server)["workers"]
        worker_states.update(w["status"] for w in workers)
        health_states.append(get_status(health))
        ping_states.add(get_status(f"{server.url}/ping"))
        return any(w["status"] == "READY" and w["pid"] != old["pid"] for w in workers)

    wait_for(replaced, "a new READY worker")
    long_call.join(HANG_GUARD_S)
    queued_call.join(HANG_GUARD_S)

    status, answer = long_call.answer
    assert status >= 500, answer  # TorchServe 0.12 answered 507
    assert "Worker died" in answer["message"]
    assert queued_call.answer[0] == 200, queued_call.answer
    assert queued_call.answer[1]["predictions"][0]["generated_text"]
    assert worker_states - {"READY"}, "the outage never showed in the management API"
    assert 503 in health_states, "the gateway's health route never reported the outage"
    assert get_status(health) == 200
    record_property("client_status", status)
    record_property("client_message", answer["message"])
    record_property("worker_states_seen", sorted(worker_states))
    record_property("gateway_health_seen", sorted(set(health_states)))
    record_property("ping_seen", sorted(ping_states))


def test_requests_succeed_after_the_restart(server, gateway):
    body = {"instances": ["Name a colour:"], "parameters": {"max_new_tokens": 3, "temperature": 0}}
    status, answer = server.post(MODEL, body, timeout=HANG_GUARD_S)
    assert status == 200 and answer["predictions"][0]["generated_text"]
    request = urllib.request.Request(
        f"http://127.0.0.1:{gateway.server_address[1]}/predictions/{MODEL}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=HANG_GUARD_S) as response:
        assert response.status == 200
        assert json.load(response)["predictions"] == answer["predictions"]


@pytest.fixture(scope="module")
def continuous_server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[TorchServe]:
    """The shipped path: TorchServe's async mode, every request in the worker at once."""
    torchserve = start_app(
        tmp_path_factory.mktemp("worker-crash-continuous"), MODEL, continuous_model_config("smollm2")
    )
    yield torchserve
    torchserve.stop()


def test_the_gateway_fails_what_a_dead_async_worker_held(continuous_server):
    """TorchServe 0.12 never answers these itself. (Nor does its restarted async worker come
    back: it fails with "Received more than 1 control command"; docs/reliability.md.)"""
    server = continuous_server
    front = start_gateway(server)
    predict = f"http://127.0.0.1:{front.server_address[1]}/predictions/{MODEL}"
    try:
        old = describe(server)["workers"][0]
        wait_for(lambda: front.watch.known_pids == frozenset({old["pid"]}), "the gateway to see the worker")
        before = server.batches_received()
        long = {"parameters": {"max_new_tokens": 400, "min_new_tokens": 400}}
        held = [Call(server, {"instances": [f"Count to a thousand ({i}):"], **long}, url=predict) for i in range(2)]
        for call in held:
            call.start()
        wait_for(lambda: server.batches_received() >= before + 2, "both requests to reach the worker")
        os.kill(old["pid"], signal.SIGKILL)
        for call in held:
            call.join(HANG_GUARD_S)
            assert not call.is_alive(), "a request the dead worker held never got an answer"
            status, answer = call.answer
            assert status == 507, answer
            assert "worker died" in answer["error"]
    finally:
        front.shutdown()
        front.server_close()
