"""Kill the model worker in the middle of a request, on the real process tree (front, healer, TorchServe).

On both batching paths: the client of the killed request gets a 5xx JSON answer at once,
not a hang; small requests sent every half second while the app heals are each answered
(200, or 503 with Retry-After); the health route is 503 while the app heals and 200 again
after; the app comes back by itself; the heal is counted in the front's metrics; and the
process tree has as many launcher, Java and worker processes after as before.

The dynamic path shows a request queued behind the killed one survives the crash (TorchServe
answers the killed one itself, which the front words as on the other path, and its restarted
worker serves the queued one). On the
continuous path (TorchServe's async mode) TorchServe would never answer what the dead worker
held, and its restarted worker thread can fail forever; the front answers 507 and brings the
app back by scaling its workers to 0 and up. Last, TorchServe itself is killed: the front
starts it again.
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

from tests.support.torchserve import TorchServe, continuous_model_config, dynamic_model_config, post, start_app
from tests.support.waiting import wait_for

MODEL = "smollm2"
HANG_GUARD_S = int(os.environ.get("HANG_GUARD_S", 300))
LONG = {"parameters": {"max_new_tokens": 400, "min_new_tokens": 400}}
SMALL = {"instances": ["Name a colour:"], "parameters": {"max_new_tokens": 2, "temperature": 0}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[TorchServe]:
    # The classic path, where a second request waits in TorchServe's queue while the worker is
    # busy: the test shows that queued request survives the crash. (In async mode every
    # request goes to the worker at once, so there is no queued request to keep.)
    torchserve = start_app(tmp_path_factory.mktemp("worker-crash"), MODEL, dynamic_model_config("smollm2"))
    yield torchserve
    torchserve.stop()


@pytest.fixture(scope="module")
def continuous_server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[TorchServe]:
    """The shipped path: TorchServe's async mode, every request in the worker at once."""
    torchserve = start_app(tmp_path_factory.mktemp("worker-crash-continuous"), MODEL, continuous_model_config("smollm2"))
    yield torchserve
    torchserve.stop()


def lower(headers) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def answer_of(url: str, timeout: float = 10) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, lower(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, lower(error.headers)
    except (urllib.error.URLError, OSError):
        return 0, {}


def post_with_headers(url: str, body: Any) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=HANG_GUARD_S) as response:
            return response.status, lower(response.headers), json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, lower(error.headers), json.loads(error.read() or b"{}")
    except (urllib.error.URLError, OSError) as error:
        return 0, {}, str(error)


def describe(server: TorchServe) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.management}/models/{MODEL}", timeout=10) as response:
        return json.load(response)[0]


def heals(server: TorchServe) -> dict[str, float]:
    """``llm_front_heals_total`` by method, from the front's metrics port."""
    with urllib.request.urlopen(f"{server.metrics}/metrics", timeout=30) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("llm_front_heals_total{"):
            method = line.split('method="', 1)[1].split('"', 1)[0]
            counts[method] = counts.get(method, 0) + float(line.rsplit(" ", 1)[1])
    return counts


class Call(threading.Thread):
    """One prediction through the front in the background, its answer kept."""

    def __init__(self, server: TorchServe, body: dict[str, Any]):
        super().__init__(daemon=True)
        self.url, self.body = f"{server.url}/predictions/{MODEL}", body
        self.answer: tuple[int, dict[str, str], Any] | None = None

    def run(self) -> None:
        self.answer = post_with_headers(self.url, self.body)


class Trickle(threading.Thread):
    """A small request every half second until stopped; each one's answer kept."""

    def __init__(self, server: TorchServe):
        super().__init__(daemon=True)
        self.server = server
        self.calls: list[Call] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            call = Call(self.server, SMALL)
            call.start()
            self.calls.append(call)
            self.done.wait(0.5)

    def stop(self) -> list[tuple[int, dict[str, str], Any]]:
        self.done.set()
        self.join()
        for call in self.calls:
            call.join(HANG_GUARD_S)
            assert not call.is_alive(), "a request sent during the heal never got an answer"
        return [call.answer for call in self.calls]


def assert_answered_while_healing(answers: list[tuple[int, dict[str, str], Any]]) -> None:
    statuses = {status for status, _, _ in answers}
    assert statuses <= {200, 503, 507}, statuses  # 0 would be a hang or a dropped connection
    for status, headers, body in answers:
        if status == 503:
            assert headers.get("retry-after"), body
            assert "retry" in json.dumps(body).lower(), body
    assert answers[-1][0] == 200, answers[-1]


def test_a_dynamic_worker_killed_mid_request_is_replaced(server, record_property):
    health = f"{server.url}/health"
    assert answer_of(health)[0] == 200
    old = describe(server)["workers"][0]
    before_tree = {kind: len(pids) for kind, pids in server.processes().items()}
    heals_before = sum(heals(server).values())

    batches = server.batches_received()
    long_call = Call(server, {"instances": ["Count to a thousand:"], **LONG})
    long_call.start()
    wait_for(lambda: server.batches_received() > batches, "the long request to reach the worker")
    queued_call = Call(server, {"instances": ["The capital of France is"], "parameters": {"max_new_tokens": 2}})
    queued_call.start()
    wait_for(lambda: describe(server)["jobQueueStatus"]["pendingRequests"] >= 1, "the second request to queue")

    os.kill(old["pid"], signal.SIGKILL)
    killed = time.monotonic()
    trickle = Trickle(server)
    trickle.start()
    health_seen = []

    def healed() -> bool:
        health_seen.append(answer_of(health)[0])
        return health_seen[-1] == 200 and 503 in health_seen

    wait_for(healed, "the front's health route to report the outage, then the healed app")
    seconds = time.monotonic() - killed
    time.sleep(1)
    answers = trickle.stop()
    long_call.join(HANG_GUARD_S)
    queued_call.join(HANG_GUARD_S)

    status, headers, answer = long_call.answer
    assert status == 507, answer  # TorchServe's "Worker died." (500 or 507), said as on the other path
    assert "worker died" in answer["error"] and "retry" in answer["error"]
    assert headers.get("retry-after")
    assert queued_call.answer[0] == 200, queued_call.answer
    assert queued_call.answer[2]["predictions"][0]["generated_text"]
    assert_answered_while_healing(answers)
    assert sum(heals(server).values()) == heals_before + 1
    assert describe(server)["workers"][0]["pid"] != old["pid"]
    wait_for(lambda: {k: len(p) for k, p in server.processes().items()} == before_tree, "no leftover process")
    record_property("seconds_to_health_200", round(seconds, 1))
    record_property("trickle_statuses", sorted({s for s, _, _ in answers}))


def test_requests_succeed_after_the_restart(server):
    status, answer = server.post(MODEL, SMALL, timeout=HANG_GUARD_S)
    assert status == 200 and answer["predictions"][0]["generated_text"]


def test_a_continuous_worker_killed_mid_request_is_answered_and_healed(continuous_server, record_property):
    server = continuous_server
    old = describe(server)["workers"][0]
    before_tree = {kind: len(pids) for kind, pids in server.processes().items()}
    heals_before = heals(server).get("scale", 0)
    batches = server.batches_received()
    held = [Call(server, {"instances": [f"Count to a thousand ({i}):"], **LONG}) for i in range(2)]
    for call in held:
        call.start()
    wait_for(lambda: server.batches_received() >= batches + 2, "both requests to reach the worker")

    os.kill(old["pid"], signal.SIGKILL)
    killed = time.monotonic()
    trickle = Trickle(server)
    trickle.start()
    for call in held:
        call.join(HANG_GUARD_S)
        assert not call.is_alive(), "a request the dead worker held never got an answer"
        status, headers, answer = call.answer
        assert status == 507, answer
        assert "worker died" in answer["error"] and "retry" in answer["error"]
        assert headers.get("retry-after")
    held_answered = time.monotonic() - killed

    wait_for(lambda: answer_of(f"{server.url}/health")[0] == 200, "the app to heal by itself")
    seconds = time.monotonic() - killed
    time.sleep(1)
    answers = trickle.stop()
    assert_answered_while_healing(answers)
    assert heals(server).get("scale", 0) == heals_before + 1
    assert describe(server)["workers"][0]["pid"] != old["pid"]
    wait_for(lambda: {k: len(p) for k, p in server.processes().items()} == before_tree, "no leftover process")
    status, answer = server.post(MODEL, SMALL, timeout=HANG_GUARD_S)
    assert status == 200, answer
    record_property("seconds_to_answer_held", round(held_answered, 1))
    record_property("seconds_to_health_200", round(seconds, 1))
    record_property("trickle_statuses", sorted({s for s, _, _ in answers}))


def test_torchserve_killed_whole_is_started_again(continuous_server):
    server = continuous_server
    (java,) = server.processes()["java"]
    old_management = server.management_port
    os.kill(java, signal.SIGKILL)
    wait_for(lambda: answer_of(f"{server.url}/health")[0] == 503, "the front to notice")
    wait_for(lambda: answer_of(f"{server.url}/health")[0] == 200, "TorchServe to be started again")
    assert server.management_port != old_management  # fresh ports at every start
    status, answer = post(f"{server.url}/predictions/{MODEL}", SMALL, timeout=HANG_GUARD_S)
    assert status == 200, answer
    assert heals(server).get("restart", 0) >= 1
    assert len(server.processes()["java"]) == 1
