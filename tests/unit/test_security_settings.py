"""What a checkpoint folder can make the worker do: run no code, unpickle nothing, unless the app opts in.

The slim image loads whatever folder `LLM_MODEL_DIR` or `AIP_STORAGE_URI` points at, so
these hold for folders we did not build. Each refusal has a positive control showing the
same folder does run its code (or load its pickle) once the app opts in, so a marker file
that stays absent really means "not executed".
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from handler.model.loading import check_weight_format, load_model
from handler.settings import HandlerSettings, SettingsError
from tests.support.torchserve import ROOT

CPU = torch.device("cpu")
# Apps allowed to opt in; adding one here is a reviewed decision.
APPS_TRUSTING_REMOTE_CODE: set[str] = set()
APPS_ALLOWING_PICKLE: set[str] = set()


def shipped_configs() -> dict[str, Path]:
    configs = {path.parent.name: path for path in (ROOT / "apps").glob("*/model-config.yaml")}
    configs["slim image"] = ROOT / "docker" / "slim-model-config.yaml"
    return configs


def settings(**handler: object) -> HandlerSettings:
    return HandlerSettings.from_config({"handler": {"warmup": False, "dtype": "float32", **handler}}, {})


def test_the_defaults_trust_nothing():
    assert HandlerSettings().trust_remote_code is False
    assert HandlerSettings().allow_pickle_weights is False
    assert HandlerSettings.from_config({}, {}).trust_remote_code is False


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_shipped_apps_do_not_opt_in(name):
    config = yaml.safe_load(shipped_configs()[name].read_text())
    resolved = HandlerSettings.from_config(config, {})
    assert resolved.trust_remote_code is (name in APPS_TRUSTING_REMOTE_CODE)
    assert resolved.allow_pickle_weights is (name in APPS_ALLOWING_PICKLE)


def test_the_environment_cannot_turn_trust_on(monkeypatch):
    for key in ("TRUST_REMOTE_CODE", "HF_TRUST_REMOTE_CODE", "LLM_TRUST_REMOTE_CODE", "ALLOW_PICKLE_WEIGHTS"):
        monkeypatch.setenv(key, "true")
    resolved = HandlerSettings.from_config({"handler": {}}, os.environ)
    assert resolved.trust_remote_code is False and resolved.allow_pickle_weights is False


# --- custom code in the checkpoint folder -------------------------------------------------

CUSTOM_CODE = """
from pathlib import Path
Path({marker!r}).write_text("custom code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


def with_custom_code(source: Path, folder: Path, marker: Path, model_type: str) -> Path:
    """A checkpoint whose config.json points transformers at code shipped inside the folder."""
    shutil.copytree(source, folder)
    (folder / "evil.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_custom_code_for_a_known_architecture_is_ignored(tiny_model_dir, tmp_path):
    marker = tmp_path / "ran"
    folder = with_custom_code(tiny_model_dir, tmp_path / "model", marker, "llama")
    engine = load_model(folder, settings(), CPU)
    assert not marker.exists()
    assert type(engine.model).__name__ == "LlamaForCausalLM"


def test_custom_code_for_an_unknown_architecture_is_refused(tiny_model_dir, tmp_path):
    marker = tmp_path / "ran"
    folder = with_custom_code(tiny_model_dir, tmp_path / "model", marker, "evil")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(folder, settings(), CPU)
    assert not marker.exists()


def test_custom_code_runs_only_when_the_app_opts_in(tiny_model_dir, tmp_path):
    marker = tmp_path / "ran"
    folder = with_custom_code(tiny_model_dir, tmp_path / "model", marker, "llama")
    engine = load_model(folder, settings(trust_remote_code=True), CPU)
    assert marker.read_text() == "custom code ran"
    assert type(engine.model).__name__ == "EvilForCausalLM"


# --- pickle weights -----------------------------------------------------------------------


class WritesMarker:
    """Unpickling this runs a command: what a hostile pytorch_model.bin can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickled(source: Path, folder: Path, state: object, keep_safetensors: bool = False) -> Path:
    shutil.copytree(source, folder)
    if not keep_safetensors:
        (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_pickle_only_weights_are_refused(tiny_model_dir, tmp_path):
    folder = pickled(tiny_model_dir, tmp_path / "model", load_file(tiny_model_dir / "model.safetensors"))
    with pytest.raises(SettingsError, match="allow_pickle_weights"):
        check_weight_format(folder, allow_pickle=False)
    with pytest.raises(SettingsError, match="only pickle weights"):
        load_model(folder, settings(), CPU)


def test_pickle_weights_load_when_the_app_opts_in(tiny_model_dir, tmp_path):
    weights = load_file(tiny_model_dir / "model.safetensors")
    folder = pickled(tiny_model_dir, tmp_path / "model", weights)
    engine = load_model(folder, settings(allow_pickle_weights=True), CPU)
    name, tensor = next(iter(weights.items()))
    assert torch.equal(engine.model.state_dict()[name], tensor)


def test_a_hostile_pickle_is_never_unpickled(tiny_model_dir, tmp_path):
    marker = tmp_path / "ran"
    folder = pickled(tiny_model_dir, tmp_path / "model", {"weight": WritesMarker(marker)})
    with pytest.raises(SettingsError):
        load_model(folder, settings(), CPU)
    assert not marker.exists()


def test_a_hostile_pickle_beside_safetensors_is_ignored(tiny_model_dir, tmp_path):
    marker = tmp_path / "ran"
    folder = pickled(tiny_model_dir, tmp_path / "model", {"weight": WritesMarker(marker)}, keep_safetensors=True)
    engine = load_model(folder, settings(), CPU)
    assert not marker.exists()
    assert engine.model is not None


def test_opting_into_pickle_still_uses_torchs_weights_only_unpickler(tiny_model_dir, tmp_path):
    marker = tmp_path / "ran"
    folder = pickled(tiny_model_dir, tmp_path / "model", {"weight": WritesMarker(marker)})
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_model(folder, settings(allow_pickle_weights=True), CPU)
    assert not marker.exists()


def test_a_folder_with_no_weights_is_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(SettingsError, match="no model weights"):
        check_weight_format(folder, allow_pickle=False)
