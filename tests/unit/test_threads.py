"""Torch work on threads that end: results and errors come back, and the OpenMP pool goes with the thread."""

import asyncio
import os
import threading
import time

import pytest
import torch

from handler.schedulers.threads import on_passing_thread, run_on_passing_thread


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def settled_thread_count(expected: int, seconds: float = 10.0) -> int:
    """The process's thread count once it is back to `expected`, or what it is after `seconds`."""
    deadline = time.monotonic() + seconds
    while (count := thread_count()) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


def quiet_thread_count(quiet: float = 0.5, seconds: float = 10.0) -> int:
    """The thread count once it has held for `quiet` seconds: threads that earlier tests left
    ending (stopped managers, awaited passing threads) are gone, so they cannot shift a count."""
    deadline = time.monotonic() + seconds
    count, since = thread_count(), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.05)
        if (now := thread_count()) != count:
            count, since = now, time.monotonic()
    return count


def parallel_sum() -> float:
    """Large enough for torch to open an OpenMP parallel region on the calling thread."""
    return float(torch.ones(4_000_000).sum())


def test_the_work_runs_on_another_thread_and_its_result_comes_back():
    caller = threading.get_ident()
    assert run_on_passing_thread(lambda: (threading.get_ident() != caller, parallel_sum())) == (True, 4_000_000.0)


def test_an_error_in_the_work_is_raised_to_the_caller():
    with pytest.raises(ZeroDivisionError):
        run_on_passing_thread(lambda: 1 / 0)


def test_the_threads_torch_started_for_the_work_end_with_it():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a pool of one extra thread even on one core
    try:
        before = quiet_thread_count()
        during = run_on_passing_thread(lambda: (parallel_sum(), thread_count())[1])
        assert during > before + 1, "the work's thread and its OpenMP pool"
        assert settled_thread_count(before) == before
    finally:
        torch.set_num_threads(threads)


def test_the_awaited_form_gives_the_result_and_the_error_on_the_loop():
    async def both():
        loop_thread = threading.get_ident()
        other = await on_passing_thread(lambda: threading.get_ident() != loop_thread)
        with pytest.raises(KeyError):
            await on_passing_thread(lambda: {}["missing"])
        return other

    assert asyncio.run(both()) is True
