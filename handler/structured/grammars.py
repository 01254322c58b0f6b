"""Compiling response formats into grammars: once per distinct format, bounded in time and memory.

A compile runs in a child process (`grammar_worker`), started on first use, that is killed
when it overruns `compile_timeout_seconds` or its `compile_memory_mb`; the next compile starts
a fresh one. Results, failures included, sit in a bounded LRU cache keyed by the format, so a
schema is compiled once, and a hostile one resent is refused at once. Every failure is a
`RequestError` for the one request that asked: 400 for a schema, regex or grammar the
compiler cannot follow, 422 naming the limit it overran.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import xgrammar

from handler.errors import LIMIT_EXCEEDED, RequestError
from handler.response_format import ResponseFormat
from handler.settings import StructuredOutputSettings
from handler.structured.constraint import CompiledFormat, GrammarConstraint

logger = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("grammar_worker.py")
WORKER_START_SECONDS = 120.0


@dataclass(frozen=True)
class Refusal:
    """A cached compile failure, re-raised with each asker's own field."""

    message: str
    status: int = 400
    details: dict[str, Any] = field(default_factory=dict)

    def error(self, spec: ResponseFormat) -> RequestError:
        return RequestError(f"{spec.source_field} {self.message}", spec.source_field, self.status, dict(self.details))


def tokenizer_info(tokenizer, vocab_size: int, eos_token_ids: list[int]) -> xgrammar.TokenizerInfo:
    """The vocabulary as xgrammar sees it: the model's logits width, and our EOS ids as the ends."""
    return xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=eos_token_ids)


class CompilerProcess:
    """One `grammar_worker` child and the pipes to it."""

    def __init__(self, info_json: str, settings: StructuredOutputSettings):
        to_child_read, to_child_write = os.pipe()
        from_child_read, from_child_write = os.pipe()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        arguments = [str(to_child_read), str(from_child_write), str(settings.compile_memory_mb)]
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), *arguments, str(settings.compile_threads)],
            pass_fds=(to_child_read, from_child_write),
            stdin=subprocess.DEVNULL,
            env=env,
        )
        os.close(to_child_read)
        os.close(from_child_write)
        self.requests = Connection(to_child_write, readable=False)
        self.replies = Connection(from_child_read, writable=False)
        if self.ask(info_json, WORKER_START_SECONDS) != {"ready": True}:
            self.stop()
            raise RuntimeError("the grammar compiler process did not start")

    def ask(self, request: str, timeout: float) -> dict | None:
        """The child's answer, `{"died": exit code}` when it died, None when it overran `timeout`."""
        try:
            self.requests.send_bytes(request.encode("utf-8"))
            if not self.replies.poll(timeout):
                return None
            return json.loads(self.replies.recv_bytes())
        except (EOFError, OSError):
            return {"died": self.process.wait()}

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.requests.close()
        self.replies.close()


class Grammars:
    """The compile cache and the child that fills it; safe to call from several threads."""

    def __init__(self, info: xgrammar.TokenizerInfo, settings: StructuredOutputSettings):
        self.info = info
        self.settings = settings
        self._info_json = info.serialize_json()
        self._cache: OrderedDict[ResponseFormat, xgrammar.CompiledGrammar | Refusal] = OrderedDict()
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()
        self._compile_lock = threading.Lock()
        self._process: CompilerProcess | None = None
        self._closed = False
        self.compiles = 0

    def compile(self, spec: ResponseFormat) -> xgrammar.CompiledGrammar:
        """The compiled grammar for `spec`, from the cache when it was compiled before."""
        found = self._cached(spec)
        if found is None:
            with self._compile_lock:
                found = self._cached(spec)
                if found is None:
                    found = self._compile(spec)
                    self._store(spec, found)
        if isinstance(found, Refusal):
            raise found.error(spec)
        return found

    def compiled(self, spec: ResponseFormat) -> CompiledFormat:
        """`spec` compiled (or from the cache), ready to make one constraint per sequence."""
        return CompiledFormat(self.compile(spec), spec.source_field, self.settings.max_mask_ms)

    def constraint(self, spec: ResponseFormat, prompt_length: int) -> GrammarConstraint:
        return self.compiled(spec).constraint(prompt_length)

    def start(self) -> None:
        """Starts the child now (it takes seconds to import xgrammar), so the first request need not wait."""
        with self._compile_lock:
            self._start()

    def close(self) -> None:
        with self._compile_lock:
            self._closed = True
            if self._process is not None:
                self._process.stop()
                self._process = None

    def _cached(self, spec: ResponseFormat) -> xgrammar.CompiledGrammar | Refusal | None:
        with self._cache_lock:
            found = self._cache.get(spec)
            if found is not None:
                self._cache.move_to_end(spec)
            return found

    def _store(self, spec: ResponseFormat, value: xgrammar.CompiledGrammar | Refusal) -> None:
        with self._cache_lock:
            self._cache[spec] = value
            self._cache_bytes += _size(value)
            budget = self.settings.cache_mb * 1024 * 1024
            while len(self._cache) > 1 and (len(self._cache) > self.settings.cache_entries or self._cache_bytes > budget):
                _, dropped = self._cache.popitem(last=False)
                self._cache_bytes -= _size(dropped)

    def _start(self) -> CompilerProcess:
        if self._process is None:
            self._process = CompilerProcess(self._info_json, self.settings)
        return self._process

    def _restart(self) -> None:
        try:
            with self._compile_lock:
                if not self._closed:
                    self._start()
        except (OSError, RuntimeError):
            logger.exception("the grammar compiler process did not restart; the next compile tries again")

    def _compile(self, spec: ResponseFormat) -> xgrammar.CompiledGrammar | Refusal:
        process = self._start()
        timeout = self.settings.compile_timeout_seconds
        reply = process.ask(json.dumps({"kind": spec.kind, "source": spec.source}), timeout)
        self.compiles += 1
        if reply is None or "died" in reply or "out_of_memory" in reply:
            return self._stopped(spec, reply)
        if "error" in reply:
            return Refusal(f"cannot be compiled: {reply['error']}")
        return xgrammar.CompiledGrammar.deserialize_json(reply["grammar"], self.info)

    def _stopped(self, spec: ResponseFormat, reply: dict | None) -> Refusal:
        """The child overran, ran out of memory or died: a fresh one starts while this request is refused."""
        if self._process is not None:
            self._process.stop()
        self._process = None
        threading.Thread(target=self._restart, name="grammar-compiler-restart", daemon=True).start()
        if reply is None:
            timeout = self.settings.compile_timeout_seconds
            logger.warning("a %s compile overran %d s and was stopped", spec.kind, timeout)
            return over_limit(f"took longer than the {timeout} s compile limit", timeout, "compile_timeout_seconds")
        code = reply.get("died")
        if code is None or code in (-signal.SIGABRT, -signal.SIGKILL):
            memory = self.settings.compile_memory_mb
            logger.warning("a %s compile ran out of its %d MiB and was stopped", spec.kind, memory)
            return over_limit(f"needs more than the {memory} MiB compile memory limit", memory, "compile_memory_mb")
        logger.error("the grammar compiler died (exit %s) compiling a %s", code, spec.kind)
        return Refusal("made the grammar compiler fail; it was restarted")


def _size(value: xgrammar.CompiledGrammar | Refusal) -> int:
    return value.memory_size_bytes if isinstance(value, xgrammar.CompiledGrammar) else 0


def over_limit(message: str, limit: int | float, setting: str) -> Refusal:
    """A compile stopped at one of `structured_output`'s limits: a 422 naming the setting."""
    return Refusal(message, LIMIT_EXCEEDED, {"limit": limit, "limit_name": f"structured_output.{setting}"})
