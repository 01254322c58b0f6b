"""Build an app's TorchServe archive: the handler package, the model-config, and the model folder.

    python scripts/archive.py APP [--model-config FILE] [--name NAME] [--format default|no-archive]

The archive's root holds the checkpoint files (safetensors, tokenizer.json,
tokenizer.model, chat template: everything in models/APP/) and the `handler/` package,
so the archive serves with nothing but TorchServe and the handler's dependencies.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def build(app: str, name: str, model_config: Path, archive_format: str, models_dir: Path, export: Path) -> Path:
    model_dir = models_dir / app
    if not (model_dir / "config.json").exists():
        sys.exit(f"{model_dir} is not prepared: run `make model APP={app}` first")
    staging = ROOT / "build" / "archive" / name
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(ROOT / "handler", staging / "handler", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    export.mkdir(parents=True, exist_ok=True)
    target = export / (name if archive_format == "no-archive" else f"{name}.mar")
    if target.is_dir():
        shutil.rmtree(target)
    # torch-model-archiver stages in $TMPDIR/<model name>: two checkouts archiving the same
    # app at once would mix their files. A temp folder of our own keeps them apart.
    private_tmp = Path(tempfile.mkdtemp(prefix="archive-"))
    subprocess.run(
        [
            str(Path(sys.executable).parent / "torch-model-archiver"),
            "--model-name",
            name,
            "--version",
            "1.0",
            "--handler",
            str(ROOT / "handler" / "torchserve_handler.py"),
            "--extra-files",
            f"{staging},{model_dir}",
            "--config-file",
            str(model_config),
            "--export-path",
            str(export),
            "--archive-format",
            archive_format,
            "--force",
        ],
        check=True,
        env={**os.environ, "TMPDIR": str(private_tmp)},
    )
    shutil.rmtree(private_tmp, ignore_errors=True)
    shutil.rmtree(staging)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("app")
    parser.add_argument("--name", help="model name in TorchServe (default: the app)")
    parser.add_argument("--model-config", type=Path, help="default: apps/APP/model-config.yaml")
    parser.add_argument("--format", choices=("default", "no-archive"), help="default: the app's archive_format")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--export", type=Path, default=ROOT / "model-store")
    args = parser.parse_args()
    app_dir = ROOT / "apps" / args.app
    if not app_dir.is_dir():
        sys.exit(f"unknown app {args.app!r}: apps are {sorted(p.name for p in (ROOT / 'apps').iterdir())}")
    app = yaml.safe_load((app_dir / "app.yaml").read_text())
    build(
        args.app,
        args.name or args.app,
        args.model_config or app_dir / "model-config.yaml",
        args.format or app.get("archive_format", "default"),
        args.models_dir,
        args.export,
    )


if __name__ == "__main__":
    main()
