"""Shared fixtures: tiny random models for unit tests, the SmolLM2 checkpoint, a real TorchServe.

Tests are marked by folder (unit, integration, e2e), so `pytest -m unit` runs the fast suite.
Each session gets its own temp folder, so suites running side by side never share one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.torchserve import ROOT, TorchServe, start_app

SMOLLM2_DIR = ROOT / "models" / "smollm2"
OWN_BASETEMP = pytest.StashKey[str]()
SESSION_FAILED = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
    """pytest's default numbered folders (`pytest-of-USER/pytest-N`, 3 kept) let a newer session
    delete an older one's fixtures while it still runs; a private folder per session cannot be."""
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        config.option.basetemp = tempfile.mkdtemp(prefix="pytest-llm-")
        config.stash[OWN_BASETEMP] = config.option.basetemp
    # Every server a test starts compiles the same decode steps (handler.schedulers.compiled_decode): one
    # inductor cache for the session's processes and servers, inductor's default, rather than the
    # gateway's per run folder, so each shape compiles cold once. Inductor's cache takes concurrent users.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())


def pytest_unconfigure(config: pytest.Config) -> None:
    """A green session's folder goes (each holds model copies and TorchServe logs); a red one's stays for a look."""
    own = config.stash.get(OWN_BASETEMP, None)
    if own is not None and config.stash.get(SESSION_FAILED, True) is False:
        shutil.rmtree(own, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[SESSION_FAILED] = exitstatus != 0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for kind in ("unit", "integration", "e2e"):
            if f"/tests/{kind}/" in str(item.fspath):
                item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2 checkpoint, prepared from the offline GGUF package by `make model`."""
    if not (SMOLLM2_DIR / "config.json").exists():
        from handler.model.sources import from_smollm2_package

        SMOLLM2_DIR.parent.mkdir(exist_ok=True)
        from_smollm2_package(SMOLLM2_DIR)
    return SMOLLM2_DIR


def build_tiny_llama(path: Path, smollm2_dir: Path, max_positions: int) -> Path:
    """A tiny random Llama (seed 0) with SmolLM2's tokenizer and chat template, saved at ``path``."""
    from transformers import AutoTokenizer

    from tests.support.models import tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = tiny_llama(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template: real text plumbing, no download."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir, 256)


@pytest.fixture(scope="session")
def tool_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """The same tiny Llama with room for the tool block (SmolLM2's template knows no tools, so the fallback block goes in)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-tools"), smollm2_dir, 1024)


@pytest.fixture(scope="session")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[TorchServe]:
    """A real TorchServe serving the smollm2 app as shipped; on free ports."""
    server = start_app(tmp_path_factory.mktemp("torchserve-smollm2"), "smollm2")
    yield server
    server.stop()
