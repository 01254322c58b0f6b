"""The GPU image's recipe, read statically: the driver's paths, one requirements file per image."""

import re

from tests.support.context import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def server_env() -> str:
    stage = DOCKERFILE.split("AS server", 1)[1].split("\nFROM ", 1)[0]
    return re.search(r"^ENV (.*?)(?=^\S)", stage, re.M | re.S).group(1)


def test_the_server_finds_nvidia_smi_and_the_driver_where_gke_mounts_them():
    env = server_env()
    assert re.search(r'PATH="[^"]*:/usr/local/nvidia/bin"', env)
    assert 'LD_LIBRARY_PATH="/usr/local/nvidia/lib64"' in env


def test_the_gpu_build_installs_the_gpu_requirements_which_include_the_runtimes():
    assert "ARG REQUIREMENTS=requirements-runtime.txt" in DOCKERFILE
    assert '-r "/tmp/${REQUIREMENTS}"' in DOCKERFILE
    gpu = (ROOT / "docker" / "requirements-gpu.txt").read_text()
    assert "-r requirements-runtime.txt" in gpu and re.search(r"^nvidia-ml-py==\S+$", gpu, re.M)
    make = (ROOT / "mk" / "docker.mk").read_text()
    for target in ("build-gpu:", "image-gpu:"):
        recipe = make.split(f"\n{target}", 1)[1].split("\n\n", 1)[0]
        assert "--build-arg REQUIREMENTS=requirements-gpu.txt" in recipe, target
    assert "nvidia-ml-py" not in (ROOT / "docker" / "requirements-runtime.txt").read_text()
