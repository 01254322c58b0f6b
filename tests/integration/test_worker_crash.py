"""Kill the model worker in the middle of requests, on the real process tree (front, healer, TorchServe).

What the client sees of a crash, on both batching paths:

- eight greedy requests the dead worker held all get 200, with the same texts as without the
  kill: the front sends each one again once the app serves (on the continuous path the healer
  cuts them, on the dynamic one TorchServe answers them ``Worker died.``; the front replays
  both);
- of eight streams, each that had begun ends with its protocol's error event (native JSON
  line, OpenAI's, Anthropic's and the Responses API's), each that had not completes with its
  full text;
- requests sent while the app heals wait in the front and get 200, none 503; the health
  route is 503 while it heals and 200 after; the heal is counted; the process tree has as
  many launcher, Java and worker processes after as before;
- a request held by a worker that dies a second time, after its replay, gets 507 with
  Retry-After and is logged as a suspected poison request;
- with a job queue of 2, a burst of 10 is partly refused at once (503 with Retry-After, in the
  route's own shape), but 10 requests that waited out a heal, released together, all get 200;
- five kills in a row on the default app (continuous, ``dtype: auto``), each one's seconds
  to the first answer recorded (issue 28's 10 s median is `bench.crash_drill`'s to judge).

The replay tests pin float32 so greedy text compares across batches (as tests/integration's
keyed server does) and drop the app's deadline, which would cut a slow reference run short;
the five kills use the app's own config. Last, TorchServe itself is
killed: the front starts it again.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import statistics
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support.torchserve import TorchServe, continuous_model_config, dynamic_model_config, post, start_app
from tests.support.waiting import wait_for

MODEL = "smollm2"
HANG_GUARD_S = int(os.environ.get("HANG_GUARD_S", 300))
SMALL = {"instances": ["Name a colour:"], "parameters": {"max_new_tokens": 2, "temperature": 0}}
TOKENS = 24
PROMPTS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a steam engine works.",
    "Describe a walk through a busy market in the morning.",
    "Tell me everything you know about the history of tea.",
    "Write a letter to a friend about a trip to the mountains.",
    "Explain how to grow tomatoes on a balcony, step by step.",
    "Describe the life of a lighthouse keeper on a stormy island.",
    "Write a long poem about the sea and the moon.",
]


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """Greedy text that compares across batches: float32, and no deadline to cut a slow run short."""
    config["handler"]["dtype"] = "float32"
    config["handler"].pop("deadline_seconds", None)
    return config


@pytest.fixture(scope="module")
def dynamic_server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[TorchServe]:
    """The classic path: TorchServe answers a dead worker's requests itself and retries the worker."""
    server = start_app(tmp_path_factory.mktemp("crash-dynamic"), MODEL, comparable(dynamic_model_config("smollm2")))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def continuous_server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[TorchServe]:
    """TorchServe's async mode, every request in the worker at once; the healer cuts what it held."""
    server = start_app(tmp_path_factory.mktemp("crash-continuous"), MODEL, comparable(continuous_model_config("smollm2")))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[TorchServe]:
    """The shipped app as it is (continuous, ``dtype: auto``)."""
    server = start_app(tmp_path_factory.mktemp("crash-default"), MODEL, continuous_model_config("smollm2"))
    yield server
    server.stop()


def serving(request: pytest.FixtureRequest, path: str) -> TorchServe:
    return request.getfixturevalue(f"{path}_server")


# --- clients ----------------------------------------------------------------------------


def lower(headers) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def read(url: str, timeout: float = 10) -> tuple[int, Any]:
    """A GET's status and JSON body (None when it has none); status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    except (urllib.error.URLError, OSError):
        return 0, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def answer_of(url: str, timeout: float = 10) -> int:
    return read(url, timeout)[0]


def front_heals(server: TorchServe) -> bool:
    """The front itself marks the app healing; /health's 503 can come earlier, from TorchServe's
    own worker status, while predictions still go straight to TorchServe."""
    body = read(f"{server.url}/health")[1]
    return isinstance(body, dict) and any(app.get("status") == "healing" for app in body.get("apps", []))


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


def worker_pid(server: TorchServe) -> int:
    return describe(server)["workers"][0]["pid"]


def front_metric(server: TorchServe, name: str, **labels: str) -> float:
    """The sum of the front's samples of ``name`` whose labels include ``labels``."""
    with urllib.request.urlopen(f"{server.metrics}/metrics", timeout=30) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Call(threading.Thread):
    """One native prediction through the front in the background, its answer kept."""

    def __init__(self, server: TorchServe, body: dict[str, Any]):
        super().__init__(daemon=True)
        self.url, self.body = f"{server.url}/predictions/{MODEL}", body
        self.answer: tuple[int, dict[str, str], Any] | None = None
        self.answered_at = 0.0

    def run(self) -> None:
        self.answer = post_with_headers(self.url, self.body)
        self.answered_at = time.monotonic()


class Trickle(threading.Thread):
    """A small request every second until stopped (once the app healed); each one's answer kept."""

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
            self.done.wait(1.0)

    def stop(self) -> list[tuple[int, dict[str, str], Any]]:
        self.done.set()
        self.join()
        for call in self.calls:
            call.join(HANG_GUARD_S)
            assert not call.is_alive(), "a request sent during the heal never got an answer"
        return [call.answer for call in self.calls]


def greedy(prompt: str) -> dict[str, Any]:
    return {"instances": [prompt], "parameters": {"max_new_tokens": TOKENS, "min_new_tokens": TOKENS, "temperature": 0}}


def texts_of(calls: list[Call]) -> list[str]:
    texts = []
    for call in calls:
        status, _, body = call.answer
        assert status == 200, body
        texts.append(body["predictions"][0]["generated_text"])
    return texts


def run_all(calls: list[Call]) -> list[Call]:
    for call in calls:
        call.start()
    for call in calls:
        call.join(HANG_GUARD_S)
        assert not call.is_alive(), "a request never got an answer"
    return calls


# --- streams in four protocols ------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    name: str
    path: str

    def body(self, prompt: str) -> dict[str, Any]:
        messages = [{"role": "user", "content": prompt}]
        if self.name == "native":
            return {"instances": [prompt], "parameters": {**greedy(prompt)["parameters"], "stream": True}}
        if self.name == "openai":
            return {"model": MODEL, "messages": messages, "max_tokens": TOKENS, "temperature": 0, "stream": True}
        if self.name == "anthropic":
            return {"model": MODEL, "messages": messages, "max_tokens": TOKENS, "temperature": 0, "stream": True}
        return {"model": MODEL, "input": prompt, "max_output_tokens": TOKENS, "temperature": 0, "stream": True}

    def events(self, raw: bytes) -> list[dict[str, Any]]:
        """Each JSON object of the stream: native JSON lines, or SSE ``data:`` lines."""
        events = []
        for line in raw.decode().split("\n"):
            line = line.strip()
            if self.name != "native":
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                line = line[len("data:") :].strip()
            if line:
                events.append(json.loads(line))
        return events

    def text(self, events: list[dict[str, Any]]) -> str:
        if self.name == "native":
            return "".join(event.get("text", "") for event in events if "index" in event)
        if self.name == "openai":
            return "".join(choice["delta"].get("content") or "" for e in events for choice in e.get("choices", []))
        if self.name == "anthropic":
            return "".join(e["delta"].get("text", "") for e in events if e.get("type") == "content_block_delta")
        return "".join(e.get("delta", "") for e in events if e.get("type") == "response.output_text.delta")

    def is_error(self, event: dict[str, Any]) -> bool:
        """The protocol's error event: native ``{"error", "code"}``, OpenAI's ``{"error": {...}}``,
        Anthropic's and the Responses API's ``{"type": "error"}``."""
        if self.name == "native":
            return "error" in event and event.get("code") == 507
        if self.name == "openai":
            return isinstance(event.get("error"), dict) and event["error"].get("code") == "worker_died"
        return event.get("type") == "error"


PROTOCOLS = [
    Protocol("native", f"/predictions/{MODEL}"),
    Protocol("openai", "/v1/chat/completions"),
    Protocol("anthropic", "/v1/messages"),
    Protocol("responses", "/v1/responses"),
]


class Stream(threading.Thread):
    """One streaming request read piece by piece, each piece stamped on arrival."""

    def __init__(self, server: TorchServe, protocol: Protocol, prompt: str):
        super().__init__(daemon=True)
        self.server, self.protocol, self.prompt = server, protocol, prompt
        self.status = 0
        self.reads: list[tuple[float, bytes]] = []
        self.began = threading.Event()

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=HANG_GUARD_S)
        try:
            body = json.dumps(self.protocol.body(self.prompt))
            connection.request("POST", self.protocol.path, body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            self.status = response.status
            while data := response.read1(65536):
                self.reads.append((time.monotonic(), data))
                self.began.set()
        finally:
            self.began.set()
            connection.close()

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.protocol.events(b"".join(data for _, data in self.reads))

    @property
    def cut(self) -> bool:
        return bool(self.events) and self.protocol.is_error(self.events[-1])

    def first_at(self) -> float:
        return self.reads[0][0] if self.reads else float("inf")

    def last_at(self) -> float:
        return self.reads[-1][0] if self.reads else float("inf")


def streams_for(server: TorchServe, which: range) -> list[Stream]:
    return [Stream(server, PROTOCOLS[i % len(PROTOCOLS)], PROMPTS[i]) for i in which]


def finish(streams: list[Stream]) -> None:
    for stream in streams:
        stream.join(HANG_GUARD_S)
        assert not stream.is_alive(), "a stream never ended"


# --- the heal, seen from outside ---------------------------------------------------------


class Outage:
    """Watches the health route and sends small requests from the kill until the app serves again."""

    def __init__(self, server: TorchServe):
        self.server = server
        self.tree = {kind: len(pids) for kind, pids in server.processes().items()}
        self.heals = front_metric(server, "llm_front_heals_total")
        self.health: list[int] = []
        self.trickle = Trickle(server)

    def kill(self) -> float:
        self.old = worker_pid(self.server)
        os.kill(self.old, signal.SIGKILL)
        killed = time.monotonic()
        self.trickle.start()
        return killed

    def healed(self) -> None:
        """The health route said 503, then 200; every request sent meanwhile got 200; the tree is whole."""

        def healthy_again() -> bool:
            self.health.append(answer_of(f"{self.server.url}/health"))
            return self.health[-1] == 200 and 503 in self.health

        wait_for(healthy_again, "the health route to report the outage, then the healed app")
        time.sleep(1)  # a request or two sent after the heal, too
        answers = self.trickle.stop()
        assert [status for status, _, _ in answers] == [200] * len(answers), answers  # waited, never refused
        assert all(body["predictions"][0]["generated_text"] for _, _, body in answers)
        assert front_metric(self.server, "llm_front_heals_total") == self.heals + 1
        assert worker_pid(self.server) != self.old
        wait_for(
            lambda: {k: len(p) for k, p in self.server.processes().items()} == self.tree,
            "the process tree to be as before (no leftover process)",
        )


def wait_received(server: TorchServe, before: int, count: int) -> None:
    wait_for(lambda: server.batches_received() >= before + count, f"{count} batch(es) to reach the worker")


# --- the tests ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["dynamic", "continuous"])
def test_eight_greedy_requests_held_by_a_killed_worker_all_get_their_text(path, request, record_property):
    server = serving(request, path)
    reference = texts_of(run_all([Call(server, greedy(p)) for p in PROMPTS]))
    replays = front_metric(server, "llm_front_replays_total", outcome="answered")

    before = server.batches_received()
    calls = [Call(server, greedy(p)) for p in PROMPTS]
    for call in calls:
        call.start()
    # Continuous: every request reaches the worker at once. Dynamic: one batch is on the
    # worker and the rest wait in TorchServe's queue.
    wait_received(server, before, 8 if path == "continuous" else 1)
    outage = Outage(server)
    killed = outage.kill()
    outage.healed()
    for call in calls:
        call.join(HANG_GUARD_S)
        assert not call.is_alive(), "a request the dead worker held never got an answer"
    assert texts_of(calls) == reference
    assert front_metric(server, "llm_front_replays_total", outcome="answered") >= replays + 1
    record_property("seconds_kill_to_last_answer", round(max(c.answered_at for c in calls) - killed, 1))
    record_property("replays", front_metric(server, "llm_front_replays_total", outcome="answered") - replays)


@pytest.mark.parametrize("path", ["dynamic", "continuous"])
def test_streams_cut_by_a_killed_worker_end_with_their_error_event_and_the_rest_complete(path, request, record_property):
    server = serving(request, path)
    reference_streams = streams_for(server, range(8))
    for stream in reference_streams:
        stream.start()
    finish(reference_streams)
    reference = []
    for stream in reference_streams:
        assert stream.status == 200 and not stream.cut, stream.events[-1:]
        reference.append(stream.protocol.text(stream.events))

    early, late = streams_for(server, range(4)), streams_for(server, range(4, 8))
    for stream in early:
        stream.start()
    for stream in early:
        stream.began.wait(HANG_GUARD_S)
    before = server.batches_received()
    for stream in late:
        stream.start()
    if path == "continuous":
        wait_received(server, before, 4)
    else:
        wait_for(lambda: describe(server)["jobQueueStatus"]["pendingRequests"] >= 1, "a stream to queue")
    outage = Outage(server)
    killed = outage.kill()
    outage.healed()
    finish(early + late)

    completed = 0
    for stream, text in zip(early + late, reference):
        began_before_the_kill = stream.first_at() < killed
        ended_before_the_kill = stream.last_at() < killed
        if stream.cut:
            assert (
                stream.status == 200 and stream.protocol.text(stream.events) == text[: len(stream.protocol.text(stream.events))]
            )
            assert "cut short" in json.dumps(stream.events[-1]), stream.events[-1]
        else:
            assert stream.status == 200 and stream.protocol.text(stream.events) == text, (stream.protocol.name, path)
            completed += not ended_before_the_kill
        if began_before_the_kill and not ended_before_the_kill:
            assert stream.cut, (stream.protocol.name, "a stream that had begun did not end with its error event")
    assert completed >= 1, "no stream that had not begun at the kill completed afterwards"
    assert any(s.cut for s in early), "no stream was cut"
    record_property("streams_cut", sum(s.cut for s in early + late))
    record_property("streams_completed_after_the_kill", completed)


def test_a_request_held_by_a_second_death_after_its_replay_is_answered_507(continuous_server):
    server = continuous_server
    call = Call(server, greedy(PROMPTS[0]) | {"parameters": {"max_new_tokens": 400, "min_new_tokens": 400, "temperature": 0}})
    before = server.batches_received()
    call.start()
    wait_received(server, before, 1)
    at_first_kill = server.batches_received()
    os.kill(worker_pid(server), signal.SIGKILL)
    wait_for(lambda: answer_of(f"{server.url}/health") == 503, "the heal to start")
    wait_for(lambda: answer_of(f"{server.url}/health") == 200, "the app to heal")
    wait_received(server, at_first_kill, 2)  # the heal's probe, then the replay
    os.kill(worker_pid(server), signal.SIGKILL)
    call.join(HANG_GUARD_S)
    assert not call.is_alive()
    status, headers, body = call.answer
    assert status == 507, body
    assert "worker died" in body["error"] and "retry" in body["error"] and headers.get("retry-after")
    assert "suspected poison request" in (server.workdir / "logs" / "stdout.log").read_text(errors="replace")
    assert front_metric(server, "llm_front_replays_total", outcome="lost-again") == 1
    wait_for(lambda: answer_of(f"{server.url}/health") == 200, "the app to heal again")


SMALL_QUEUE = 2
BURST = 10


@pytest.fixture(scope="module")
def small_queue_server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[TorchServe]:
    """The dynamic path with a job queue of 2 (a batch of 2): a burst of 10 overflows it."""
    config = comparable(dynamic_model_config("smollm2", batch_size=SMALL_QUEUE)) | {"jobQueueSize": SMALL_QUEUE}
    server = start_app(
        tmp_path_factory.mktemp("crash-small-queue"), MODEL, config, properties={"job_queue_size": str(SMALL_QUEUE)}
    )
    yield server
    server.stop()


def burst(url: str, body: dict[str, Any], count: int) -> list[tuple[int, dict[str, str], Any]]:
    """``count`` copies of a request sent at once (a barrier), each one's answer."""
    start = threading.Barrier(count)

    def one(_: int) -> tuple[int, dict[str, str], Any]:
        start.wait()
        return post_with_headers(url, body)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_a_full_queue_is_refused_at_once_with_retry_after_in_the_protocols_shape(small_queue_server):
    """Without a heal, TorchServe's "queue full" stays a refusal: 503 with Retry-After, here in OpenAI's shape."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 2, "temperature": 0}
    answers = burst(f"{small_queue_server.url}/v1/chat/completions", chat, BURST)
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503} and 503 in statuses, statuses
    for status, headers, body in answers:
        if status == 503:
            assert headers.get("retry-after") and body["error"]["message"] and body["error"]["type"], (headers, body)


def test_predictions_released_by_a_heal_wait_out_a_full_queue_instead_of_a_503(small_queue_server):
    """A heal releases every prediction that waited at once, more than the job queue takes: they
    were promised a wait, so TorchServe's "queue full" sends them again until served."""
    server = small_queue_server
    os.kill(worker_pid(server), signal.SIGKILL)
    wait_for(lambda: front_heals(server), "the front to mark the heal")
    calls = [Call(server, SMALL) for _ in range(BURST)]
    for call in calls:
        call.start()
    for call in calls:
        call.join(HANG_GUARD_S)
        assert not call.is_alive(), "a request sent during the heal never got an answer"
    waits = {o: front_metric(server, "llm_front_heal_waits_total", outcome=o) for o in ("served", "full", "timeout")}
    assert [status for status, _, _ in (call.answer for call in calls)] == [200] * BURST, (waits, [call.answer for call in calls])
    assert front_metric(server, "llm_front_heal_waits_total", outcome="served") >= BURST


def test_torchserve_killed_whole_is_started_again(continuous_server):
    server = continuous_server
    (java,) = server.processes()["java"]
    old_management = server.management_port
    os.kill(java, signal.SIGKILL)
    wait_for(lambda: answer_of(f"{server.url}/health") == 503, "the front to notice")
    wait_for(lambda: answer_of(f"{server.url}/health") == 200, "TorchServe to be started again")
    assert server.management_port != old_management  # fresh ports at every start
    status, answer = post(f"{server.url}/predictions/{MODEL}", SMALL, timeout=HANG_GUARD_S)
    assert status == 200, answer
    assert front_metric(server, "llm_front_heals_total", method="restart") >= 1
    assert len(server.processes()["java"]) == 1


def test_five_kills_in_a_row_on_the_default_app_are_each_answered(default_server, record_property):
    """Each round: SIGKILL the worker, send a small request at once (it waits in the front, or
    is cut and replayed), and record the seconds from the kill to its 200. The time is recorded,
    not asserted: issue 28's 10 s median is judged by `bench.crash_drill`, on a quiet host."""
    server = default_server
    seconds = []
    for _ in range(5):
        wait_for(lambda: answer_of(f"{server.url}/health") == 200, "the app to serve")
        old = worker_pid(server)
        os.kill(old, signal.SIGKILL)
        killed = time.monotonic()
        status, _, body = post_with_headers(f"{server.url}/predictions/{MODEL}", SMALL)
        seconds.append(round(time.monotonic() - killed, 1))
        assert status == 200, body
        assert worker_pid(server) != old
    record_property("seconds_kill_to_first_answer", seconds)
    record_property("median_s", statistics.median(seconds))
