"""Incremental detokenization: the text of a growing token sequence, one short window per step.

Decoding the whole sequence at every step costs time that grows with its length. Decoding a
single new token does not work either: byte-level tokenizers split a character over several
tokens (a lone piece decodes to U+FFFD), and SentencePiece tokenizers drop the leading space
of whatever decode starts with. So each step decodes two windows that start at the same
earlier token, the one up to the last released token and the one up to the newest, and
releases only what the second adds, once it no longer ends in U+FFFD (vLLM's
`detokenize_incrementally`, transformers' `TextStreamer`).
"""

from __future__ import annotations

from typing import Sequence

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._reset()

    def _reset(self) -> None:
        self.ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0  # where both windows start
        self.read_offset = 0  # the tokens before it are in `text`

    def update(self, ids: Sequence[int], final: bool = False) -> str:
        """The text of `ids`, all the generated tokens so far; `final` also releases a trailing U+FFFD."""
        ids = list(ids)
        if ids[: self.read_offset] != self.ids[: self.read_offset]:
            self._reset()  # not a continuation: start again from the first token
        self.ids = ids
        released = self._decode(ids[self.prefix_offset : self.read_offset])
        window = self._decode(ids[self.prefix_offset :])
        if len(window) > len(released) and (final or not window.endswith(REPLACEMENT_CHAR)):
            self.text += window[len(released) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        return self.text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
