"""TorchServe's system-metrics command, with its GPU metrics read through NVML (nvidia-ml-py).

TorchServe runs `python <system_metrics_cmd>` every minute (its own collector gets `--gpu N`;
a configured command gets nothing more, so this one counts the GPUs through NVML itself). Its own collector reads GPU
metrics through `nvgpu`, which parses `nvidia-smi`'s text output at fixed lines and calls
`.decode()` on names that nvidia-ml-py now returns as `str`; where `nvgpu` is missing or
breaks, every collection logs a traceback and no GPU metric is reported. This command runs
TorchServe's collector for everything else and reads the same three GPU metrics
(GPUMemoryUtilization, GPUMemoryUsed, GPUUtilization) from NVML itself. The gateway names it in
the config it writes (`gateway.torchserve`); nvidia-ml-py is installed in the GPU image only,
and with no GPU (`--gpu 0`) it is never imported.

    python -m gateway.system_metrics [--gpu N]
"""

from __future__ import annotations

import argparse
import logging
import sys

from ts.metrics import system_metrics
from ts.metrics.dimension import Dimension
from ts.metrics.metric import Metric
from ts.metrics.process_memory_metric import check_process_mem_usage

MIB = 2**20


def gpu_utilization(num_of_gpu: int) -> None:
    """Memory used (MB and percent) and utilisation (percent) of each of the first `num_of_gpu` GPUs."""
    if num_of_gpu <= 0:
        return
    import pynvml

    pynvml.nvmlInit()
    try:
        for index in range(num_of_gpu):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            dimensions = [Dimension("Level", "Host"), Dimension("device_id", index)]
            system_metrics.system_metrics.extend(
                [
                    Metric("GPUMemoryUtilization", 100.0 * memory.used / memory.total, "percent", dimensions),
                    Metric("GPUMemoryUsed", memory.used / MIB, "MB", dimensions),
                ]
            )
            try:
                utilization = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
            except pynvml.NVMLError_NotSupported:
                continue  # some virtualised GPUs report memory but no utilisation
            system_metrics.system_metrics.append(Metric("GPUUtilization", utilization, "percent", dimensions))
    finally:
        pynvml.nvmlShutdown()


def gpu_count() -> int:
    """The GPUs NVML sees; none where nvidia-ml-py or the driver's library is missing."""
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


def collect(num_of_gpu: int) -> None:
    """TorchServe's collector (`collect_all` calls every function of its module) with our GPU part."""
    system_metrics.gpu_utilization = gpu_utilization
    system_metrics.collect_all(system_metrics, num_of_gpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", type=int, help="number of GPUs (default: as many as NVML sees)")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stdout, format="%(message)s", level=logging.INFO)
    collect(gpu_count() if args.gpu is None else args.gpu)
    check_process_mem_usage(sys.stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
