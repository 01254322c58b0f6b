"""`from_hub` with the real huggingface_hub client against the Hub stand-in (tests/hub_standin.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml
from huggingface_hub.errors import GatedRepoError
from safetensors.torch import load_file

from handler.model.sources import from_hub
from tests.hub_standin import HubStandin
from tests.support.torchserve import ROOT

TOKEN = "hf_StandinTokenThatMustNeverBeStored"
REPO = "acme/tiny-llama"
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}


@pytest.fixture
def hub() -> Iterator[HubStandin]:
    with HubStandin(token=TOKEN) as standin:
        yield standin


@pytest.fixture
def client_on_standin(hub: HubStandin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubStandin:
    """Point this process's huggingface_hub at the stand-in, with its home (cache, token file) in tmp_path.

    huggingface_hub copies HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE into `constants` at import
    time, and its module-level `HfApi` (behind `list_repo_files`) keeps the endpoint it was built
    with, so both are patched as well as the environment. The token is read from HF_TOKEN at call time.
    """
    import huggingface_hub.constants as constants
    from huggingface_hub import hf_api

    home = tmp_path / "hf-home"
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    real_home = constants.HF_HOME
    for name, value in list(vars(constants).items()):  # the cache, token file, agent registry... under HF_HOME
        if isinstance(value, str) and value.startswith(real_home):
            monkeypatch.setattr(constants, name, str(home) + value[len(real_home) :])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    monkeypatch.setattr(hf_api.api, "endpoint", hub.url)
    assert constants.AGENT_HARNESSES_PATH.startswith(str(home)) and constants.HF_TOKEN_PATH.startswith(str(home))
    return hub


def _repo_folder(tiny_model_dir: Path, folder: Path, *, safetensors: bool, pickle: bool) -> Path:
    """A Hub-like repo: config, tokenizer, a README, and the weights in the formats asked for."""
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n# tiny llama\n")
    if safetensors:
        shutil.copy(tiny_model_dir / "model.safetensors", folder)
    if pickle:
        torch.save(load_file(tiny_model_dir / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


def _hub_paths(hub: HubStandin, part: str) -> list[str]:
    return [r.path for r in hub.requests if r.origin == "hub" and part in r.path]


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file()}


def test_a_pinned_revision_brings_safetensors_and_tokenizer_but_no_pickle(client_on_standin, tiny_model_dir, tmp_path):
    hub = client_on_standin
    pinned = hub.add_repo(REPO, _repo_folder(tiny_model_dir, tmp_path / "v1", safetensors=True, pickle=True))
    newer = _repo_folder(tiny_model_dir, tmp_path / "v2", safetensors=True, pickle=True)
    config = json.loads((newer / "config.json").read_text())
    (newer / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    head = hub.add_repo(REPO, newer)  # main moves on; the pin must not follow it

    dest = from_hub(REPO, pinned, tmp_path / "dest")

    assert {"config.json", "generation_config.json", "model.safetensors"} | TOKENIZER_FILES <= _files(dest)
    assert not list(dest.rglob("*.bin")) and not (dest / "README.md").exists()
    assert (dest / "config.json").read_bytes() == (tmp_path / "v1" / "config.json").read_bytes()
    assert (dest / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    trees, resolves = _hub_paths(hub, "/tree/"), _hub_paths(hub, "/resolve/")
    assert trees and all(path == f"/api/models/{REPO}/tree/{pinned}" for path in trees)
    assert resolves and all(path.startswith(f"/{REPO}/resolve/{pinned}/") for path in resolves)
    assert not any(head in r.path or "/main" in r.path or r.path.endswith(".bin") for r in hub.requests)
    weights = [r for r in hub.requests if r.origin == "cdn"]
    assert [r.status for r in weights] == [200], "the safetensors file comes once from the CDN, as an LFS file"


def test_hf_token_from_the_environment_is_sent_to_the_hub_and_never_stored(
    client_on_standin, tiny_model_dir, tmp_path, monkeypatch
):
    hub = client_on_standin
    folder = _repo_folder(tiny_model_dir, tmp_path / "repo", safetensors=True, pickle=False)
    revision = hub.add_repo(REPO, folder, access="gated")
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    dest = from_hub(REPO, revision, tmp_path / "dest")

    assert (dest / "model.safetensors").exists()
    to_hub = [r for r in hub.requests if r.origin == "hub" and r.path.startswith(("/api/models/", f"/{REPO}/"))]
    assert to_hub and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in to_hub)
    assert all("authorization" not in r.headers for r in hub.requests if r.origin == "cdn"), "the token left the Hub"
    stored = [p for p in dest.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not stored and not any(TOKEN in p.name for p in dest.rglob("*"))


def test_a_gated_repo_without_a_token_raises_the_gated_error(client_on_standin, tiny_model_dir, tmp_path):
    hub = client_on_standin
    folder = _repo_folder(tiny_model_dir, tmp_path / "repo", safetensors=True, pickle=False)
    revision = hub.add_repo(REPO, folder, access="gated")

    with pytest.raises(GatedRepoError, match="restricted"):
        from_hub(REPO, revision, tmp_path / "dest")

    assert not any("authorization" in r.headers for r in hub.requests)
    assert {r.status for r in hub.requests if "/resolve/" in r.path} == {401}
    assert not list((tmp_path / "dest").rglob("*.safetensors"))


def test_a_pickle_only_repo_is_refused_without_allow_pickle(client_on_standin, tiny_model_dir, tmp_path):
    hub = client_on_standin
    revision = hub.add_repo(REPO, _repo_folder(tiny_model_dir, tmp_path / "repo", safetensors=False, pickle=True))

    with pytest.raises(ValueError, match="allow_pickle"):
        from_hub(REPO, revision, tmp_path / "dest")

    assert _hub_paths(hub, "/tree/") and not _hub_paths(hub, "/resolve/"), "nothing is downloaded before the refusal"
    assert not (tmp_path / "dest").exists()


def test_a_pickle_only_repo_is_converted_to_safetensors_with_allow_pickle(client_on_standin, tiny_model_dir, tmp_path):
    hub = client_on_standin
    revision = hub.add_repo(REPO, _repo_folder(tiny_model_dir, tmp_path / "repo", safetensors=False, pickle=True))

    dest = from_hub(REPO, revision, tmp_path / "dest", allow_pickle=True)

    assert any(path.endswith("/pytorch_model.bin") for path in _hub_paths(hub, "/resolve/"))
    assert not list(dest.rglob("*.bin")) and {"config.json", "model.safetensors"} | TOKENIZER_FILES <= _files(dest)
    original, converted = load_file(tiny_model_dir / "model.safetensors"), load_file(dest / "model.safetensors")
    assert original.keys() <= converted.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, converted[name]), name


def test_prepare_cli_downloads_from_hf_endpoint(hub, tiny_model_dir, tmp_path):
    """What `make model` runs, in a fresh interpreter that reads HF_ENDPOINT like a user's would."""
    revision = hub.add_repo(REPO, _repo_folder(tiny_model_dir, tmp_path / "repo", safetensors=True, pickle=True))
    app = tmp_path / "apps" / "tiny-hub"
    app.mkdir(parents=True)
    (app / "app.yaml").write_text(yaml.safe_dump({"source": {"kind": "hub", "repo_id": REPO, "revision": revision}}))
    env = {name: value for name, value in os.environ.items() if not name.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_PROGRESS_BARS="1")
    env.pop("TRANSFORMERS_OFFLINE", None)
    dest = tmp_path / "models" / "tiny-hub"

    result = subprocess.run(
        [sys.executable, "-m", "handler.model.sources", "prepare", str(app), str(dest)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr
    assert {"config.json", "model.safetensors"} | TOKENIZER_FILES <= _files(dest) and not list(dest.rglob("*.bin"))
    assert _hub_paths(hub, f"/resolve/{revision}/model.safetensors")
    resolves = [r for r in hub.requests if "/resolve/" in r.path]
    assert all("hf_hub/" in r.headers.get("user-agent", "") for r in resolves), "made by the huggingface_hub client"
