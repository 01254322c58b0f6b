"""`make gpu-check`'s dry mode: the whole GPU check on the CPU, through its shell wrapper, so the
script a GPU host runs is itself tested here."""

import json
import os
import subprocess

from tests.support.context import ROOT


def test_the_gpu_check_passes_its_dry_mode_and_writes_its_report(tmp_path, smollm2_dir):
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "OUT": str(tmp_path), "GPU_CHECK_TOKENIZER": str(smollm2_dir)}
    done = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check-cpu.json").read_text())
    assert report["ok"] and report["device"] == "cpu"
    names = [check["name"] for check in report["checks"]]
    assert names == [
        "load through the adapter",
        "every parameter, dynamic path",
        "16 mixed + seeded + logprobs, continuous path",
        "response_format on both paths",
        "tokens/s and peak memory at c=1 and c=16",
        "greedy fp32 equals the CPU's",
    ]
    throughput = report["checks"][4]["data"]
    assert throughput["c16"]["tokens"] == 16 * throughput["c1"]["tokens"] > 0
    assert "# GPU check on cpu: passed" in (tmp_path / "gpu-check-cpu.md").read_text()
