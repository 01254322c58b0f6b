"""Model sources that need no network: local folders, pickle conversion, the choice of folder at start-up."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from handler.model.sources import from_local, pickle_to_safetensors, prepare, weights_dir


def test_local_folder_is_copied(tiny_model_dir: Path, tmp_path: Path):
    dest = prepare({"kind": "local", "path": str(tiny_model_dir)}, tmp_path / "copy")
    assert (dest / "config.json").exists() and list(dest.glob("*.safetensors"))


def test_a_folder_without_config_is_not_a_checkpoint(tmp_path: Path):
    with pytest.raises(ValueError, match="config.json"):
        from_local(tmp_path, tmp_path / "dest")


def test_unknown_source_kind_is_named(tmp_path: Path):
    with pytest.raises(ValueError, match="ftp"):
        prepare({"kind": "ftp"}, tmp_path)


def test_a_prepared_folder_is_left_as_is(tiny_model_dir: Path):
    assert prepare({"kind": "hub", "repo_id": "unreachable/model", "revision": "0" * 40}, tiny_model_dir) == tiny_model_dir


def test_pickle_weights_become_safetensors_with_the_same_values(tiny_model_dir: Path, tmp_path: Path):
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    original.config.save_pretrained(tmp_path)
    torch.save(original.state_dict(), tmp_path / "pytorch_model.bin")  # the layout of older Hub repos
    assert list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.safetensors"))
    pickle_to_safetensors(tmp_path)
    assert not list(tmp_path.glob("*.bin")) and list(tmp_path.glob("*.safetensors"))
    converted = AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True)
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, converted.state_dict()[name]), name


def test_weights_dir_prefers_a_mounted_folder_then_the_archive(tmp_path: Path):
    assert weights_dir(tmp_path / "archive", "/mnt/model", None) == Path("/mnt/model")
    assert weights_dir(tmp_path / "archive", None, None) == tmp_path / "archive"


def test_a_prepared_folder_is_readable_by_every_user(tiny_model_dir: Path, tmp_path: Path):
    dest = prepare({"kind": "local", "path": str(tiny_model_dir)}, tmp_path / "copy")
    for path in [dest, *dest.iterdir()]:
        assert path.stat().st_mode & 0o004, path


def test_the_prepared_smollm2_checkpoint_is_plain_weights(smollm2_dir: Path):
    """No `quant_method: gguf` left behind: loading it must not attach a GGUF quantizer."""
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
