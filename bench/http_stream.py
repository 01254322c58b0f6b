"""A small streaming HTTP client: POST JSON, hand each piece of the body over as it arrives.

It uses `http.client` so the arrival of the first chunk can be timed exactly, with no
extra dependency. The parsers are tolerant: our handler streams JSON lines
(`{"index": 0, "text": ...}` then the final `{"predictions": [...]}`), llama.cpp's server
streams Server-Sent Events (`data: {...}`), and a server that does not stream at all
sends one JSON body; all three go through the same code.
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from gateway.contract import JSON

TEXT_KEYS = ("token_text", "text", "delta", "content", "generated_text")


class HttpStatusError(RuntimeError):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status = status


def post_stream(
    url: str,
    payload: dict,
    timeout: float,
    on_data: Callable[[float, bytes], None],
    headers: dict[str, str] | None = None,
) -> None:
    """POST `payload` as JSON; call `on_data(perf_counter(), bytes)` for each piece of the body.

    Raises `HttpStatusError` for a non-2xx answer (with its body), `OSError` when the
    server cannot be reached or stops answering for `timeout` seconds.
    """
    parts = urlsplit(url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname, parts.port, timeout=timeout)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    body = json.dumps(payload).encode()
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": JSON, **(headers or {})})
        response = connection.getresponse()
        if not 200 <= response.status < 300:
            raise HttpStatusError(response.status, response.read().decode(errors="replace"))
        while True:
            data = response.read1(65536)
            if not data:
                break
            on_data(time.perf_counter(), data)
    finally:
        connection.close()


def get_status(url: str, timeout: float) -> int:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request("GET", parts.path or "/")
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@dataclass
class JsonStream:
    """Splits a byte stream into JSON objects: JSON lines, concatenated objects, or SSE `data:` lines.

    Bytes that are not JSON (an SSE comment, `[DONE]`) are skipped.
    """

    buffer: str = ""
    pending: bytes = b""
    decoder: json.JSONDecoder = field(default_factory=json.JSONDecoder)

    def feed(self, data: bytes) -> Iterator[Any]:
        data = self.pending + data
        try:
            text = data.decode()
            self.pending = b""
        except UnicodeDecodeError as error:  # a character cut between two reads
            text = data[: error.start].decode()
            self.pending = data[error.start :]
        self.buffer += text
        while True:
            self.buffer = self.buffer.lstrip()
            if self.buffer.startswith("data:"):
                self.buffer = self.buffer[5:].lstrip()
            if not self.buffer:
                return
            if self.buffer[0] not in "{[" or self.buffer.startswith("[DONE]"):
                line_end = self.buffer.find("\n")
                if line_end < 0:
                    return  # wait for the rest of the line
                self.buffer = self.buffer[line_end + 1 :]
                continue
            try:
                value, end = self.decoder.raw_decode(self.buffer)
            except json.JSONDecodeError:
                return  # incomplete: wait for more bytes
            self.buffer = self.buffer[end:]
            yield value


def chunk_text(obj: Any) -> str:
    """The new text a streamed object carries, whatever the server's schema."""
    if not isinstance(obj, dict):
        return ""
    for key in TEXT_KEYS:
        value = obj.get(key)
        if isinstance(value, str):
            return value
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        if isinstance(choice.get("text"), str):
            return choice["text"]
        delta = choice.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            return delta["content"]
    predictions = obj.get("predictions")
    if isinstance(predictions, list) and predictions and isinstance(predictions[0], dict):
        return chunk_text(predictions[0])
    return ""
