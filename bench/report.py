"""Tables and result files shared by the benchmarks: markdown for people, JSON for tools."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[fmt(v) for v in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


CPU_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model and the instruction sets the kernels pick by, e.g. `AMD EPYC (avx512_bf16, avx512f, avx2)`:
    hosts that look alike can differ in them, and the figures with them."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return platform.processor() or "unknown"
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    present = [flag for flag in CPU_FLAGS if flag in flags]
    return f"{fields.get('model name', 'unknown')} ({', '.join(present) or 'none of ' + ', '.join(CPU_FLAGS)})"


def environment() -> dict:
    """What the figures depend on: the machine, its load, the library versions, the commit."""
    import importlib.metadata as metadata

    versions = {}
    for package in ("torch", "transformers", "torchserve", "llama_cpp_python", "torchao", "optimum-quanto"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False, timeout=10
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_description(),
        "load_average": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": commit,
    }


def write_results(results_dir: Path, stem: str, markdown: str, data: dict) -> tuple[Path, Path]:
    """Writes `<stem>.md/.json`, replacing the previous run: git history keeps the earlier ones,
    and `history.md` their headline figures."""
    results_dir.mkdir(parents=True, exist_ok=True)
    md_path = results_dir / f"{stem}.md"
    json_path = results_dir / f"{stem}.json"
    md_path.write_text(markdown + "\n")
    json_path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return md_path, json_path
