"""Torch work on threads that end, so that the continuous batcher's OpenMP pool is the only one
left.

libgomp, the OpenMP runtime of torch's CPU wheels, gives every thread that opens a parallel
region a pool of worker threads of its own, kept until that thread ends. Once the pools together
hold more threads than the process has CPUs, every pool stops spinning between two parallel
regions and sleeps on a futex instead, and each of the thousands of small regions of a decode
step then waits for a wake-up. On 2 cores, with the model loaded and warmed up on the worker's
main thread and then driven by the manager's thread, that about halved the manager's speed
(docs/bench.md, "Measurements behind the code's choices"). So the model is loaded, probed and
warmed up on a thread that ends when it is done (`run_on_passing_thread`), and a `generate`
beside the manager runs on a thread of its own per call (`on_passing_thread`), never on a pooled
thread that outlives it.

Each such thread first makes the model's GPU its current CUDA device (`device`): the current
device is per thread, and a new thread's is GPU 0, whichever GPU the worker was given.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable, TypeVar

import torch

from handler.model.device import bind_device

T = TypeVar("T")


def run_on_passing_thread(work: Callable[[], T], name: str = "torch-passing", device: torch.device | None = None) -> T:
    """`work()` on a new thread, joined: its result returned, its exception raised here."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            if device is not None:
                bind_device(device)
            outcome["result"] = work()
        except BaseException as error:  # noqa: BLE001 - handed back to the caller as it is
            outcome["error"] = error

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]


async def on_passing_thread(work: Callable[[], T], name: str = "torch-passing", device: torch.device | None = None) -> T:
    """`work()` on a new thread that ends with it, awaited without blocking the loop."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            if device is not None:
                bind_device(device)
            result = work()
        except BaseException as error:  # noqa: BLE001 - handed back to the awaiting coroutine
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future
