"""The app registry: which apps the front serves, where each stands, and the predictions it holds.

The health route, the relay and the healer all read and change this one record. The
``llm_front_healing`` gauge moves here with the state it reports, so the two never disagree.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Awaitable, Iterator, Mapping

from gateway import health
from gateway.metrics import FrontMetrics


@dataclass(eq=False)
class AppState:
    name: str
    # TorchServe's async mode (asyncCommunication): a dead worker's requests are never answered.
    async_mode: bool
    ready: bool = False
    healing: bool = False
    detail: str = "starting"
    pids: frozenset[int] = frozenset()
    workers: tuple[str, ...] = ()
    # One event per prediction being relayed, set when the worker it was on died.
    held: set[asyncio.Event] = field(default_factory=set)
    # Set while the app serves (``ready``): what predictions wait on while it heals.
    serving: asyncio.Event = field(default_factory=asyncio.Event)
    # Predictions waiting for ``serving`` now (bounded by the front's ``heal_wait_requests``).
    waiting: int = 0

    def readiness(self) -> health.Readiness:
        if self.ready:
            return health.Readiness(True, "ready", self.name, self.workers)
        return health.Readiness(False, "healing" if self.healing else "starting", self.name, self.workers, self.detail)


class AppRegistry:
    """Every served app by name, in the order served (the first is Vertex's predict route's)."""

    def __init__(self, async_modes: Mapping[str, bool], metrics: FrontMetrics) -> None:
        self._states = {name: AppState(name, async_mode) for name, async_mode in async_modes.items()}
        self._metrics = metrics

    def __contains__(self, name: object) -> bool:
        return name in self._states

    def __iter__(self) -> Iterator[AppState]:
        return iter(self._states.values())

    def get(self, name: str) -> AppState | None:
        return self._states.get(name)

    def names(self) -> list[str]:
        return sorted(self._states)

    def hold(self, name: str) -> asyncio.Event:
        """A prediction for ``name`` is being relayed; the event is set if its worker dies."""
        cut = asyncio.Event()
        self._states[name].held.add(cut)
        return cut

    async def until_serving(self, state: AppState, timeout_s: float, max_waiting: int | None, gone: Awaitable[object]) -> str:
        """Wait while ``state`` heals: "serving" once it serves again, "full" at once when
        ``max_waiting`` predictions already wait (None: no bound, for a replay, which was
        admitted before), "timeout" after ``timeout_s``, "gone" when ``gone`` (the client's
        disconnect) comes first; a waiter that leaves frees its place in the queue."""
        if state.serving.is_set():
            return "serving"
        if max_waiting is not None and state.waiting >= max_waiting:
            return "full"
        state.waiting += 1
        serving = asyncio.ensure_future(state.serving.wait())
        left = asyncio.ensure_future(gone)
        try:
            done, _ = await asyncio.wait({serving, left}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            state.waiting -= 1
            serving.cancel()
            left.cancel()
        if serving in done:
            return "serving"
        return "gone" if left in done else "timeout"

    def release(self, name: str, cut: asyncio.Event) -> None:
        self._states[name].held.discard(cut)

    def cut_held(self, state: AppState) -> int:
        """Tell every prediction ``state`` holds that it is lost; how many there were."""
        held = list(state.held)
        for cut in held:
            cut.set()
        state.held.clear()
        return len(held)

    def mark_started(self, state: AppState) -> None:
        """READY and answering; a heal under way still ends with ``mark_ready``."""
        state.ready, state.detail = True, ""
        state.serving.set()

    def mark_healing(self, state: AppState, cause: str) -> None:
        state.ready, state.healing, state.detail = False, True, cause
        state.serving.clear()
        self._metrics.healing.labels(state.name).set(1)

    def mark_ready(self, state: AppState) -> None:
        state.ready, state.healing, state.detail = True, False, ""
        state.serving.set()
        self._metrics.healing.labels(state.name).set(0)
