"""Streaming from a real TorchServe on the classic (dynamic batching) path.

A request with `"stream": true` gets HTTP chunks, each a JSON line `{"index", "text"}` (index:
the position of its prediction in the final body),
then the usual `{"predictions": [...]}` body. The checks read the raw response as it
arrives and compare the order of events, never times: text must arrive in several reads
before the final body does, and curl must print a line while the response is still open.
The helpers here serve test_continuous_serving.py too.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support.torchserve import TorchServe, dynamic_model_config, start_app

OMELETTE = "How to prepare a spanish omelette:"
NAME = "smollm2-dynamic"


@dataclass
class Streamed:
    """One streamed response as it arrived: its status, headers, and each read with its arrival time."""

    status: int
    headers: dict[str, str]
    started: float
    reads: list[tuple[float, bytes]]

    @property
    def ended(self) -> float:
        return self.reads[-1][0] if self.reads else self.started

    @property
    def text(self) -> str:
        return b"".join(data for _, data in self.reads).decode()

    @property
    def chunks(self) -> list[dict[str, Any]]:
        """The JSON lines before the final body."""
        return [json.loads(line) for line in self.text.split("\n")[:-1]]

    @property
    def final(self) -> dict[str, Any]:
        return json.loads(self.text.split("\n")[-1])

    def first_arrival_of(self, needle: bytes) -> float:
        seen = b""
        for at, data in self.reads:
            seen += data
            if needle in seen:
                return at
        raise AssertionError(f"{needle!r} never arrived")


def stream(port: int, name: str, body: dict[str, Any], timeout: float = 600) -> Streamed:
    """POSTs and reads the response one HTTP chunk at a time, stamping each on arrival."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        started = time.monotonic()
        connection.request("POST", f"/predictions/{name}", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        reads = []
        while data := response.read1(65536):
            reads.append((time.monotonic(), data))
        headers = {key.lower(): value for key, value in response.getheaders()}
        return Streamed(response.status, headers, started, reads)
    finally:
        connection.close()


def curl_lines(port: int, name: str, body: dict[str, Any], timeout: float = 600) -> tuple[bool, list[str]]:
    """`curl -N` reading the stream: whether curl was still running when its first line came, and its lines."""
    command = [
        "curl",
        "-N",
        "-s",
        "--fail-with-body",
        "--max-time",
        str(int(timeout)),
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps(body),
        f"http://127.0.0.1:{port}/predictions/{name}",
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as curl:
        first = curl.stdout.readline()
        open_at_first_line = curl.poll() is None
        lines = [first, *curl.stdout]
        assert curl.wait() == 0
    return open_at_first_line, lines


def assert_streamed_before_the_end(result: Streamed) -> None:
    """Text reached the client early and piece by piece, not in one block at the end."""
    assert result.status == 200
    assert result.headers.get("transfer-encoding") == "chunked"
    final = result.first_arrival_of(b'"predictions"')
    early_reads = [data for at, data in result.reads if at < final and b'"text"' in data]
    assert len(early_reads) >= 3, "the text did not come in at least 3 reads before the final body"
    assert "".join(c["text"] for c in result.chunks) == result.final["predictions"][0]["generated_text"]


@pytest.fixture(scope="module")
def dynamic_server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[TorchServe]:
    server = start_app(tmp_path_factory.mktemp("torchserve-dynamic"), NAME, dynamic_model_config("smollm2"))
    yield server
    server.stop()


LONG_STREAM = {"instances": [OMELETTE], "parameters": {"max_new_tokens": 40, "min_new_tokens": 40, "stream": True}}


def test_chunks_arrive_while_the_generation_runs(dynamic_server: TorchServe):
    assert_streamed_before_the_end(stream(dynamic_server.port, NAME, LONG_STREAM))


def test_curl_no_buffer_prints_lines_as_they_come(dynamic_server: TorchServe):
    open_at_first_line, lines = curl_lines(dynamic_server.port, NAME, LONG_STREAM)
    chunks = [json.loads(line) for line in lines[:-1]]
    final = json.loads(lines[-1])
    assert len(chunks) >= 3
    assert open_at_first_line, "curl printed its first line only once the response had ended"
    assert "".join(c["text"] for c in chunks) == final["predictions"][0]["generated_text"]


@pytest.mark.honours("dynamic", "stop", "stream", "details")
def test_a_stream_never_shows_its_stop_string(dynamic_server: TorchServe):
    plain = dynamic_server.post(NAME, {"instances": [OMELETTE], "parameters": {"max_new_tokens": 30, "temperature": 0}})[1]
    text = plain["predictions"][0]["generated_text"]
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    result = stream(
        dynamic_server.port,
        NAME,
        {
            "instances": [OMELETTE],
            "parameters": {"max_new_tokens": 30, "temperature": 0, "stop": stop, "stream": True, "details": True},
        },
    )
    [prediction] = result.final["predictions"]
    assert prediction["finish_reason"] == "stop"
    assert prediction["generated_text"] == text[: text.find(stop)]
    assert "".join(c["text"] for c in result.chunks) == prediction["generated_text"]
    assert all(stop not in c["text"] for c in result.chunks)


def test_a_stream_beside_a_plain_request_in_one_batch(dynamic_server: TorchServe):
    plain_body = {"instances": ["Name three colours:"], "parameters": {"max_new_tokens": 20, "temperature": 0}}
    with ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(stream, dynamic_server.port, NAME, LONG_STREAM)
        plain = pool.submit(dynamic_server.post, NAME, plain_body)
        streamed, (status, body) = streamed.result(), plain.result()
    assert status == 200 and body["predictions"][0]["generated_text"]
    assert streamed.status == 200
    assert "".join(c["text"] for c in streamed.chunks) == streamed.final["predictions"][0]["generated_text"]


def test_chunks_of_several_instances_and_sequences_name_their_prediction(dynamic_server: TorchServe):
    body = {
        "instances": ["Name a fruit:", "Name a city:"],
        "parameters": {"max_new_tokens": 10, "temperature": 0.9, "seed": 7, "num_return_sequences": 2, "stream": True},
    }
    result = stream(dynamic_server.port, NAME, body)
    predictions = [p["generated_text"] for p in result.final["predictions"]]
    assert result.status == 200 and len(predictions) == 4
    assert {c["index"] for c in result.chunks} == {0, 1, 2, 3}
    for index, text in enumerate(predictions):
        assert "".join(c["text"] for c in result.chunks if c["index"] == index) == text
