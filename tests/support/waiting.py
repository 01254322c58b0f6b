"""Waiting on a condition instead of sleeping for a guessed time."""

from __future__ import annotations

import os
import time
from typing import Callable

HANG_GUARD_S = float(os.environ.get("HANG_GUARD_S", 300))  # a slow host may set it higher


def wait_for(condition: Callable[[], bool], what: str, limit_s: float = HANG_GUARD_S) -> None:
    """Poll until `condition()`; the limit only turns a hang into a failure."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)
