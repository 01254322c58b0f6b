"""Resolve the GPU image's requirements against PyPI, as the image's pip would, without building it.

`pip install --dry-run --report` for Linux x86_64 and CPython 3.11, PyPI only (no local wheel
folder, no CPU index, no constraints from the machine's pip config), so `torch==2.13.0` is
PyPI's CUDA build and its pinned CUDA wheels and triton come with it. pip reads each wheel's
metadata from the index (PEP 658) and downloads no torch wheel. The result is compared with
the pins of docker/requirements-gpu.txt (and the runtime file it includes): a package the
resolution installs at another version, or one no file pins, is a mismatch.

    python scripts/resolve_gpu_requirements.py [--report r.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "docker" / "requirements-gpu.txt"
INDEX = "https://pypi.org/simple"
# The manylinux tags a glibc 2.28+ x86_64 image accepts (Debian 12 has glibc 2.36).
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(36, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64",
]  # fmt: skip


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line in `path` and the files it includes with -r."""
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            found.update(pins(path.parent / line[3:].strip()))
        elif "==" in line:
            name, version = line.split("==", 1)
            found[canonical(name)] = version.strip()
    return found


def resolve(requirements: Path = REQUIREMENTS, python: str = sys.executable) -> dict[str, str]:
    """name -> version of what pip would install for the GPU image; raises with pip's output when it cannot."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        command = [
            python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
            "--report", str(report), "--index-url", INDEX, "--python-version", "3.11",
            "--implementation", "cp", "--only-binary=:all:", "--target", str(Path(scratch) / "target"),
            *[arg for platform in PLATFORMS for arg in ("--platform", platform)],
            "-r", str(requirements),
        ]  # fmt: skip
        env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_CONSTRAINT": ""}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"pip could not resolve {requirements.name}:\n{done.stdout}\n{done.stderr}")
        installed = json.loads(report.read_text())["install"]
    return {canonical(item["metadata"]["name"]): item["metadata"]["version"] for item in installed}


def mismatches(resolved: dict[str, str], pinned: dict[str, str]) -> list[str]:
    """One line per package that the resolution and the pins disagree on."""
    lines = []
    for name, version in sorted(resolved.items()):
        if name not in pinned:
            lines.append(f"{name}=={version} is installed but pinned nowhere")
        elif pinned[name] != version:
            lines.append(f"{name}: pinned {pinned[name]}, resolved {version}")
    lines += [f"{name}=={pinned[name]} is pinned but not installed" for name in sorted(set(pinned) - set(resolved))]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, help="write the resolved versions here as JSON")
    args = parser.parse_args()
    resolved = resolve()
    problems = mismatches(resolved, pins(REQUIREMENTS))
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps({"resolved": resolved, "mismatches": problems}, indent=2) + "\n")
    for line in problems:
        sys.stderr.write(line + "\n")
    sys.stdout.write(
        f"{len(resolved)} packages resolved; torch {resolved.get('torch')}, triton {resolved.get('triton')}, "
        f"{len(problems)} mismatches\n"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
