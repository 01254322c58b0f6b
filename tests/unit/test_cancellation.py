"""Cancel on disconnect: the registry, the worker's listener and the front's sender, and each scheduler's hook.

The schedulers run a tiny random Llama; a cancel is set the way the listener sets it, from
another thread, or from the stream's sink right after the first piece (a client that leaves
after its first token).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gateway import contract
from gateway.cancel import Canceller
from gateway.held_request import HeldRequest
from handler import cancellation
from handler.cancellation import CancelListener, CancelRegistry, CancelSignal, parse_message, socket_path
from handler.model.loading import LoadedModel, load_model
from handler.schedulers.compat import manager_rows, pending_result_handlers
from handler.schedulers.continuous import ContinuousScheduler
from handler.schedulers.dynamic import DynamicScheduler
from handler.service import CLIENT_GONE
from handler.settings import ContinuousBatchingSettings, HandlerSettings
from tests.support.prompts import make_prompt
from tests.support.waiting import wait_for

LONG = {"max_new_tokens": 120, "min_new_tokens": 120, "temperature": 0, "stream": True}

# The signal and the registry


def test_a_signal_runs_its_callbacks_once_and_a_late_one_at_once():
    signal, heard = CancelSignal(), []
    signal.on_set(lambda: heard.append("early"))
    unhook = signal.on_set(lambda: heard.append("removed"))
    unhook()
    signal.set()
    signal.set()
    signal.on_set(lambda: heard.append("late"))
    assert signal.is_set() and heard == ["early", "late"]


def test_a_cancel_sets_the_signal_of_the_request_being_served():
    registry = CancelRegistry()
    signal = registry.watch("a")
    assert signal is not None and not signal.is_set()
    assert registry.cancel("a") is True and signal.is_set()


def test_a_cancel_that_comes_before_its_request_is_kept_for_it():
    registry = CancelRegistry()
    assert registry.cancel("early") is False
    signal = registry.watch("early")
    assert signal is not None and signal.is_set()
    registry.forget("early")
    again = registry.watch("early")
    assert again is not None and not again.is_set(), "a remembered cancel serves one request only"


def test_early_cancels_are_bounded_oldest_first():
    registry = CancelRegistry(remembered=2)
    for request_id in ("a", "b", "c"):
        registry.cancel(request_id)
    assert [registry.watch(request_id).is_set() for request_id in ("a", "b", "c")] == [False, True, True]


def test_the_registry_counts_each_cancel_of_a_request_it_serves_once():
    counted: list[int] = []
    registry = CancelRegistry(on_cancel=lambda: counted.append(1))
    registry.watch("a")
    registry.cancel("a")
    registry.cancel("a")
    registry.cancel("not-here")
    registry.watch("not-here")
    assert len(counted) == 2


def test_a_request_without_an_id_has_no_signal_and_a_forgotten_one_is_not_watched():
    registry = CancelRegistry()
    assert registry.watch(None) is None and registry.watch("") is None
    registry.watch("x")
    registry.forget("x")
    assert registry.watched == 0


@pytest.mark.parametrize("data", [b"", b"cancel ", b"stop abc", b"cancel " + b"x" * 200, b"cancel \xff"])
def test_anything_but_a_cancel_with_an_id_is_ignored(data):
    assert parse_message(data) is None
    assert parse_message(b"cancel abc123") == "abc123"


# The front's copy of the contract and the worker's agree


def test_the_front_and_the_worker_name_the_header_socket_and_message_alike(tmp_path: Path):
    assert contract.REQUEST_ID_HEADER == cancellation.REQUEST_ID_HEADER
    assert contract.CANCEL_MESSAGE == cancellation.CANCEL_VERB
    assert contract.cancel_socket_dir(tmp_path, "app") == socket_path(tmp_path, "app", 42).parent


# The side channel: the front's sender, the worker's listener


@pytest.fixture
def run_dir():
    """A short folder: a Unix socket's path has at most 107 bytes, and pytest's can be long."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cx-") as folder:
        yield Path(folder)


def test_the_front_reaches_every_worker_of_the_app_and_only_them(run_dir: Path):
    registries = [CancelRegistry(), CancelRegistry(), CancelRegistry()]
    listeners = [
        CancelListener(registries[0], socket_path(run_dir, "app", 1)),
        CancelListener(registries[1], socket_path(run_dir, "app", 2)),
        CancelListener(registries[2], socket_path(run_dir, "other", 3)),
    ]
    for listener in listeners:
        listener.start()
    try:
        signals = [registry.watch("r1") for registry in registries]
        canceller = Canceller(run_dir)
        assert canceller.cancel("app", "r1") == 2
        wait_for(lambda: signals[0].is_set() and signals[1].is_set(), "both workers of the app to hear the cancel", 5)
        assert not signals[2].is_set()
        canceller.close()
    finally:
        for listener in listeners:
            listener.close()


def test_a_dead_workers_socket_is_removed_and_the_live_one_still_hears(run_dir: Path):
    dead = socket_path(run_dir, "app", 9)
    dead.parent.mkdir(parents=True)
    gone = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    gone.bind(str(dead))
    gone.close()  # bound, then closed: what a killed worker leaves behind
    registry = CancelRegistry()
    listener = CancelListener(registry, socket_path(run_dir, "app", 10))
    listener.start()
    try:
        signal = registry.watch("r")
        assert Canceller(run_dir).cancel("app", "r") == 1
        assert not dead.exists()
        wait_for(signal.is_set, "the live worker to hear the cancel", 5)
    finally:
        listener.close()


def test_without_a_run_folder_or_workers_a_cancel_reaches_no_one(run_dir: Path):
    assert Canceller(None).cancel("app", "r") == 0
    assert Canceller(run_dir).cancel("app", "r") == 0
    assert CancelListener.start_for(CancelRegistry(), None, "app") is None


def test_a_socket_path_too_long_leaves_the_worker_without_cancels(tmp_path: Path):
    assert CancelListener.start_for(CancelRegistry(), str(tmp_path / ("x" * 120)), "app") is None


def test_the_front_hands_the_held_requests_id_to_its_canceller_when_the_client_leaves():
    from gateway.apps import AppRegistry
    from gateway.metrics import FrontMetrics

    metrics = FrontMetrics()
    left: list[str] = []
    with HeldRequest(AppRegistry({"m": True}, metrics), metrics, "m", 0.0, left.append) as held:
        held.client_left()
    assert left == [held.request_id] and len(held.request_id) == 32


# The schedulers' hooks


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(tiny_model_dir, HandlerSettings(dtype="float32", max_total_tokens=200), torch.device("cpu"))


@pytest.fixture(scope="module")
def continuous(loaded: LoadedModel):
    served = ContinuousScheduler(loaded, ContinuousBatchingSettings(num_blocks=48, page_size=16, max_batch_tokens=256))
    yield served
    served.stop()


def cancelled_after_first_piece(prompts, cancels: dict[int, CancelSignal]):
    """A sink that, like a client that leaves after its first token, cancels the prompts named in `cancels`."""
    pieces: dict[int, int] = {}

    def sink(index: int, _: int, text: str) -> None:
        pieces[index] = pieces.get(index, 0) + 1
        if index in cancels:
            cancels[index].set()

    return sink, pieces


def test_dynamic_a_cancelled_row_stops_at_the_next_step_and_its_neighbour_runs_on(loaded: LoadedModel):
    engine = DynamicScheduler(loaded)
    signal = CancelSignal()
    prompts = [make_prompt(loaded, "Leave early", **LONG), make_prompt(loaded, "Stay", **LONG)]
    prompts[0] = replace(prompts[0], cancel=signal)
    sink, pieces = cancelled_after_first_piece(prompts, {0: signal})
    [[left], [stayed]] = engine.generate(prompts, sink)
    assert left.generated_tokens < 10 and pieces[0] == 1, "the cancelled row went on generating or streaming"
    assert stayed.generated_tokens == 120
    assert engine.active_rows == 0


def test_dynamic_a_batch_whose_rows_are_all_cancelled_ends_early(loaded: LoadedModel):
    engine = DynamicScheduler(loaded)
    signals = [CancelSignal(), CancelSignal()]
    prompts = [make_prompt(loaded, text, **LONG) for text in ("One", "Two")]
    prompts = [replace(p, cancel=s) for p, s in zip(prompts, signals)]
    sink, _ = cancelled_after_first_piece(prompts, dict(enumerate(signals)))
    seen_rows: list[int] = []
    original = engine._count_rows

    def count(ended: int) -> None:
        original(ended)
        seen_rows.append(engine.active_rows)

    engine._count_rows = count  # type: ignore[method-assign]
    completions = engine.generate(prompts, sink)
    assert all(c.generated_tokens < 10 for [c] in completions), "generate ran on after every row was cancelled"
    assert seen_rows[-1] == 0 and engine.active_rows == 0


def test_continuous_a_cancel_from_another_thread_frees_the_managers_row(loaded: LoadedModel, continuous: ContinuousScheduler):
    signal = CancelSignal()
    base = make_prompt(loaded, "Go on and on", **LONG)
    cancelled = replace(base, cancel=signal)
    rows: list[int] = []

    async def run():
        first = asyncio.Event()
        loop = asyncio.get_running_loop()

        def sink(index: int, _: int, text: str) -> None:
            if not first.is_set():
                rows.append(continuous.active_rows)
                first.set()

        task = asyncio.ensure_future(continuous.complete([cancelled], sink))
        await first.wait()
        # What the listener thread does: set the signal from a thread that is not the loop's.
        await loop.run_in_executor(None, signal.set)
        return await task

    [[completion]] = asyncio.run(run())
    assert rows == [1]
    assert completion.generated_tokens < 120
    wait_for(lambda: manager_rows(continuous.manager) == 0, "the manager to drop the cancelled row", 5)
    assert pending_result_handlers(continuous.manager) == 0
    assert not continuous.front_lists and not continuous.processor_lists


def test_continuous_only_the_cancelled_of_two_streams_stops(loaded: LoadedModel, continuous: ContinuousScheduler):
    signal = CancelSignal()
    prompts = [make_prompt(loaded, "Leave early", **LONG), make_prompt(loaded, "Stay", **LONG)]
    prompts[0] = replace(prompts[0], cancel=signal)
    sink, _ = cancelled_after_first_piece(prompts, {0: signal})
    [[left], [stayed]] = asyncio.run(continuous.complete(prompts, sink))
    assert left.generated_tokens < 120 and stayed.generated_tokens == 120
    assert manager_rows(continuous.manager) == 0 and pending_result_handlers(continuous.manager) == 0


def test_a_request_cancelled_before_it_is_served_is_not_generated(loaded: LoadedModel):
    from handler.service import Service

    engine = DynamicScheduler(loaded)
    calls = threading.Event()
    original = engine.generate

    def generate(prompts, sink=None):
        calls.set()
        return original(prompts, sink)

    engine.generate = generate  # type: ignore[method-assign]
    service = Service(HandlerSettings(dtype="float32", warmup=False), loaded, engine)
    signal = CancelSignal()
    signal.set()
    [answer] = asyncio.run(service.answer([[make_prompt(loaded, "Too late", max_new_tokens=5)]], None, [signal]))
    assert answer is CLIENT_GONE and not calls.is_set()


def test_max_rows_bounds_the_managers_rows_and_a_cancel_lets_a_waiting_one_in(loaded: LoadedModel):
    """The slot a cancel frees: with `max_rows: 2`, a third stream waits until a row is cancelled."""
    bounded = ContinuousScheduler(
        loaded, ContinuousBatchingSettings(num_blocks=48, page_size=16, max_batch_tokens=256, max_rows=2)
    )
    try:
        signal = CancelSignal()
        prompts = [replace(make_prompt(loaded, "First", **LONG), cancel=signal)]
        prompts += [make_prompt(loaded, text, **LONG) for text in ("Second", "Third")]
        seen: list[tuple[int, int]] = []

        def sink(index: int, _: int, text: str) -> None:
            seen.append((index, manager_rows(bounded.manager)))
            if index == 0:
                signal.set()

        [[first], [second], [third]] = asyncio.run(bounded.complete(prompts, sink))
        assert max(rows for _, rows in seen) == 2
        assert first.generated_tokens < 120 and second.generated_tokens == third.generated_tokens == 120
        first_of_third = next(at for at, (index, _) in enumerate(seen) if index == 2)
        last_of_second = max(at for at, (index, _) in enumerate(seen) if index == 1)
        assert first_of_third < last_of_second, "the third stream waited for the second to end"
    finally:
        bounded.stop()
