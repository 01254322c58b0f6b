"""Stop strings, finish reasons, and the text a stream may safely release."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

REPLACEMENT_CHAR = "\ufffd"


class FinishReason(str, Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Index of the earliest stop string in `text[start:]`, or None."""
    hits = [i for i in (text.find(stop, start) for stop in stops) if i >= 0]
    return min(hits) if hits else None


def matched_stop(text: str, stops: tuple[str, ...], at: int) -> str | None:
    """The stop string found at `at` in `text` (the first listed when several start there):
    Anthropic's answers name it (`stop_sequence`), and the text no longer holds it once cut."""
    return next((stop for stop in stops if text.startswith(stop, at)), None)


def releasable_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` a stream can send without leaking a stop string or half a character.

    Text is held back while its tail could still grow into a stop string, and while the
    tokenizer has decoded an incomplete multi-byte character as U+FFFD.
    """
    end = len(text)
    while end > 0 and text[end - 1] == REPLACEMENT_CHAR:
        end -= 1
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, end), held, -1):
            if text.endswith(stop[:size], 0, end):
                held = size
                break
    return end - held


@dataclass
class StopScan:
    """Tracks one sequence's decoded text and finds stop strings in its new tail only."""

    stops: tuple[str, ...]
    scanned: int = 0

    def scan(self, text: str) -> int | None:
        longest = max((len(s) for s in self.stops), default=0)
        start = max(0, self.scanned - longest + 1)
        self.scanned = len(text)
        return find_stop(text, self.stops, start) if self.stops else None
