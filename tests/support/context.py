"""TorchServe's own Context for a handler under test, and what the handler sent through it.

A real `ts.context.Context` with the real metrics cache, so statuses, content types, metrics
and stream chunks go through TorchServe's own code; stream chunks are read back from a
socket pair in TorchServe's wire format.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from pathlib import Path
from typing import Any

from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

ROOT = Path(__file__).resolve().parents[2]


def make_context(model_name: str, model_dir: Path, model_yaml_config: dict, batch_size: int = 4) -> Context:
    metrics = MetricsCacheYamlImpl(str(ROOT / "metrics.yaml"))
    metrics.initialize_cache()
    context = Context(
        model_name, str(model_dir), {}, batch_size, None, "0.12.0", metrics=metrics, model_yaml_config=model_yaml_config
    )
    metrics.model_name = model_name
    return context


# The tool tests' continuous-path KV cache: room for the fallback tool block and a call.
TOOL_CACHE = {"num_blocks": 96, "page_size": 16, "max_batch_tokens": 512}


def tool_handler(model_dir: Path, batching: str):
    """A started LLMHandler on the tool model, on the ``dynamic`` or ``continuous`` path, and its context."""
    from handler.torchserve_handler import LLMHandler

    handler_config: dict[str, Any] = {"warmup": False, "max_total_tokens": 1024, "dtype": "float32"}
    if batching == "dynamic":
        context = make_context("tiny", model_dir, {"handler": handler_config})
    else:
        handler_config.update(batching="continuous", continuous=TOOL_CACHE)
        context = make_context("tiny", model_dir, {"asyncCommunication": True, "handler": handler_config}, batch_size=1)
    handler = LLMHandler()
    handler.initialize(context)
    return handler, context


def start_batch(context: Context, bodies: list, headers: list[dict[str, str]] | None = None) -> list[dict[str, Any]]:
    """Sets the context up for one TorchServe message of `bodies` (each with its request `headers`); returns the handler's `data`."""
    context.request_ids = {i: f"request-{i}" for i in range(len(bodies))}
    context.request_processor = [RequestProcessor(dict(h)) for h in headers or [{} for _ in bodies]]
    context.metrics.request_ids = context.request_ids
    return [{"body": body} for body in bodies]


def statuses_and_bodies(context: Context, outputs: list[str]) -> list[tuple[int, dict]]:
    return [(context.get_response_status(i)[0], json.loads(out)) for i, out in enumerate(outputs)]


def run_batch(handler, context: Context, bodies: list, headers: list[dict[str, str]] | None = None) -> list[tuple[int, dict]]:
    """One batch through the synchronous (dynamic batching) `handle`: each request's status and body."""
    outputs = handler.handle(start_batch(context, bodies, headers), context)
    assert len(outputs) == len(bodies)
    return statuses_and_bodies(context, outputs)


def run_raw(
    handler, context: Context, bodies: list, headers: list[dict[str, str]] | None = None
) -> tuple[list[str], list[tuple[int, bytes]]]:
    """One message through `handle` (either path), streams read back: each request's last output, and the chunks sent."""
    reader, writer = socket.socketpair()
    context.cl_socket = writer
    try:
        outputs = handler.handle(start_batch(context, bodies, headers), context)
        if asyncio.iscoroutine(outputs):
            outputs = asyncio.run(outputs)
        chunks = read_messages(reader)
    finally:
        reader.close()
        writer.close()
    return outputs, chunks


def run_async(handler, context: Context, bodies: list) -> tuple[list[tuple[int, dict]], list[tuple[int, bytes]]]:
    """One message through the async (continuous batching) `handle`: each request's (status, body), and the chunks sent."""
    reader, writer = socket.socketpair()
    context.cl_socket = writer
    try:
        outputs = asyncio.run(handler.handle(start_batch(context, bodies), context))
        chunks = read_messages(reader)
    finally:
        reader.close()
        writer.close()
    return statuses_and_bodies(context, outputs), chunks


def read_messages(sock: socket.socket) -> list[tuple[int, bytes]]:
    """Every (status, body) TorchServe's response encoder wrote, in order."""
    data = bytearray()
    sock.setblocking(False)
    while True:
        try:
            block = sock.recv(65536)
        except BlockingIOError:
            break
        if not block:
            break
        data += block
    messages, at = [], 0

    def take() -> int:
        nonlocal at
        (value,) = struct.unpack_from("!i", data, at)
        at += 4
        return value

    def skip_string() -> bytes:
        nonlocal at
        size = take()
        at += size
        return bytes(data[at - size : at])

    while at < len(data):
        take(), skip_string()  # code, message
        while (size := take()) != -1:
            at += size  # request id
            skip_string()  # content type
            status = take()
            skip_string()  # phrase
            for _ in range(take()):
                skip_string(), skip_string()
            messages.append((status, skip_string()))
    return messages
