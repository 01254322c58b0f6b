"""TorchServe's system-metrics command with GPU metrics from NVML: the GPUs' answers are stated
(nvidia-ml-py's calls faked, as on a machine with no GPU), TorchServe's collector runs as is."""

import logging
import subprocess
import sys
from types import SimpleNamespace

import pynvml
import pytest
from ts.metrics import system_metrics

from gateway.system_metrics import collect, gpu_count

GIB = 2**30


@pytest.fixture
def two_gpus(monkeypatch):
    """Two GPUs of 80 GiB, 20 and 60 GiB used; the second reports no utilisation (a vGPU)."""
    calls = []
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: calls.append("init"))
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 2)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: index)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda h: SimpleNamespace(used=(20, 60)[h] * GIB, total=80 * GIB))

    def utilization(handle):
        if handle == 1:
            raise pynvml.NVMLError_NotSupported()
        return SimpleNamespace(gpu=37)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", utilization)
    monkeypatch.setattr(system_metrics, "gpu_utilization", system_metrics.gpu_utilization)
    monkeypatch.setattr(system_metrics, "system_metrics", [])
    return calls


def test_gpu_metrics_come_from_nvml_beside_torchserves_own(two_gpus, caplog):
    with caplog.at_level(logging.INFO):
        collect(2)
    lines = caplog.text
    assert "GPUMemoryUtilization.Percent:25.0|#Level:Host,device_id:0" in lines
    assert "GPUMemoryUsed.Megabytes:61440.0|#Level:Host,device_id:1" in lines
    assert "GPUUtilization.Percent:37|#Level:Host,device_id:0" in lines
    assert lines.count("GPUUtilization.Percent") == 1
    assert "CPUUtilization" in lines and "MemoryUsed" in lines
    assert two_gpus == ["init", "shutdown"]


def test_with_no_gpu_nvml_is_never_touched(two_gpus, caplog):
    with caplog.at_level(logging.INFO):
        collect(0)
    assert two_gpus == [] and "GPU" not in caplog.text and "CPUUtilization" in caplog.text


def test_the_gpus_are_counted_through_nvml(two_gpus):
    assert gpu_count() == 2 and two_gpus == ["init", "shutdown"]


def test_without_a_driver_no_gpu_is_counted(monkeypatch):
    def no_library():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    assert gpu_count() == 0


def test_the_command_torchserve_runs_prints_its_metrics_and_exits_cleanly():
    """As TorchServe runs it: its python, then `system_metrics_cmd` split on spaces, nothing more."""
    done = subprocess.run([sys.executable, "-m", "gateway.system_metrics"], input="", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "CPUUtilization.Percent" in done.stdout and "Traceback" not in done.stderr
