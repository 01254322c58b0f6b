"""The client side of an HTTP run: replay a workload's arrivals with at most `concurrency` in flight.

Requests are released at their arrival times into a pool of `concurrency` threads; one
that arrives while every thread is busy waits its turn (counted as `queued_s`), so the
server never sees more than `concurrency` requests at once. With every arrival at t=0
this is a closed loop of `concurrency` clients.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from bench.stats import RequestResult
from bench.workloads import BenchRequest, Workload

# Fills in a result's outcome fields (ttft_s, generated_tokens, text, ...) for one request;
# raising marks the request failed.
SendFn = Callable[[BenchRequest, RequestResult], None]


def drive(send: SendFn, workload: Workload, concurrency: int) -> list[RequestResult]:
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    start = time.perf_counter()

    def timed(request: BenchRequest) -> RequestResult:
        result = RequestResult(index=request.index, new_tokens=request.new_tokens)
        sent = time.perf_counter()
        result.sent_s = sent - start
        result.queued_s = max(0.0, result.sent_s - request.arrival_s)
        try:
            send(request, result)
        except Exception as error:  # noqa: BLE001 - any failure is data for the report
            result.error = f"{type(error).__name__}: {error}"
        done = time.perf_counter()
        result.done_s = done - start
        result.latency_s = done - sent
        return result

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench") as pool:
        futures = []
        for request in sorted(workload.requests, key=lambda r: r.arrival_s):
            delay = start + request.arrival_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(timed, request))
        results = [future.result() for future in futures]
    return sorted(results, key=lambda r: r.index)
