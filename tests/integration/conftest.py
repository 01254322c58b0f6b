"""Fixtures shared by the integration modules: a tree with the front's API key set, on both batching paths."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.support.torchserve import TorchServe, build_archive, continuous_model_config, dynamic_model_config

KEYED_MODELS = ("smollm2-dynamic", "smollm2-continuous")
API_KEY = "test-key-0f6c"


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[TorchServe]:
    """SmolLM2 served twice (`smollm2-dynamic`, `smollm2-continuous`) in float32, behind `LLM_API_KEY`.

    One start serves the Anthropic API's tests, its hostile bodies and the API key's tests:
    a start costs minutes on a small machine. The dtype is pinned so greedy text compares."""
    workdir = tmp_path_factory.mktemp("keyed")
    store = workdir / "store"
    store.mkdir()
    configs = {}
    for name, config in zip(KEYED_MODELS, (dynamic_model_config("smollm2"), continuous_model_config("smollm2"))):
        config["handler"]["dtype"] = "float32"
        configs[name] = config
    models = {name: build_archive("smollm2", name, store, config) for name, config in configs.items()}
    served = TorchServe(workdir, models, env={"LLM_API_KEY": API_KEY})
    try:
        served.start()
        yield served
    finally:
        served.stop()
