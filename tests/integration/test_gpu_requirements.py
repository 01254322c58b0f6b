"""The GPU image's requirements resolve against PyPI as its pip would resolve them (network: PyPI).

No image is built: `scripts/resolve_gpu_requirements.py` runs pip's dry run for Linux x86_64 and
CPython 3.11 against PyPI alone, reading torch's metadata without its wheel.
"""

import importlib.util
import shutil
from pathlib import Path

import pytest

from tests.support.context import ROOT

spec = importlib.util.spec_from_file_location("resolve_gpu_requirements", ROOT / "scripts" / "resolve_gpu_requirements.py")
resolver = importlib.util.module_from_spec(spec)
spec.loader.exec_module(resolver)


@pytest.fixture(scope="module")
def resolved() -> dict[str, str]:
    return resolver.resolve()


def test_the_gpu_requirements_resolve_to_exactly_their_pins(resolved):
    assert resolver.mismatches(resolved, resolver.pins(resolver.REQUIREMENTS)) == []


def test_pypis_cuda_torch_comes_with_its_own_triton_and_cuda_wheels(resolved):
    assert resolved["torch"] == "2.13.0" and resolved["triton"] == "3.7.1"
    assert resolved["cuda-toolkit"].startswith("13.0") and "nvidia-cudnn-cu13" in resolved
    assert "nvidia-ml-py" in resolved


def test_the_triton_pin_of_the_cpu_index_would_not_resolve(tmp_path: Path):
    """The defect this replaced: triton==3.9.0 beside PyPI's torch 2.13.0, which pins 3.7.1."""
    runtime = (ROOT / "docker" / "requirements-runtime.txt").read_text().replace("triton==3.7.1", "triton==3.9.0")
    (tmp_path / "requirements-runtime.txt").write_text(runtime)
    shutil.copy(resolver.REQUIREMENTS, tmp_path / "requirements-gpu.txt")
    with pytest.raises(RuntimeError, match="triton"):
        resolver.resolve(tmp_path / "requirements-gpu.txt")
