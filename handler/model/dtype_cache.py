"""`dtype: auto`'s decisions, kept per host fingerprint so that restarts and heals reuse them.

A decision timed once on a quiet start should not be re-taken on every start: a start while
something else runs beside the worker times the candidates under that load and may pick
another format (docs/bench.md). So the first start on a host decides, and every later one
whose fingerprint matches reads the decision back without timing anything.

The fingerprint holds what changes which format is fastest: the CPU's model and the
instruction sets the kernels pick by, the cores torch may use, torch's version, the model
(its config and weight files, not the folder's path: TorchServe unpacks an archive anew at
every start) and the rows the probe decodes. Anything else that changes (a new CPU
microcode, a kernel) is not seen: delete the file or pin `handler.dtype` to decide anew.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

# The instruction sets torch's CPU kernels (oneDNN, fbgemm) dispatch on for fp32, bf16 and fp16.
CPU_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx512f", "avx2")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
FORMAT_VERSION = 1


def cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU's model name and which of `CPU_FLAGS` it reports (empty where /proc/cpuinfo is absent)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {"model": "unknown", "flags": []}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name", "unknown"), "flags": [flag for flag in CPU_FLAGS if flag in flags]}


def model_identity(model_dir: Path) -> str:
    """A digest of the model's config and its weight files' names and sizes: the same for every
    unpacked copy of one archive, different when the weights change."""
    digest = hashlib.sha256()
    config = model_dir / "config.json"
    digest.update(config.read_bytes() if config.exists() else b"")
    for path in sorted(model_dir.iterdir()):
        if path.suffix in WEIGHT_SUFFIXES and path.is_file():
            digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def host_fingerprint(model_dir: Path, batch: int, candidates: list[str], cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """Everything a decision depends on, as plain JSON values."""
    return {
        "cpu": cpu_identity(cpuinfo),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": model_identity(model_dir),
        "batch": batch,
        "candidates": list(candidates),
    }


def fingerprint_key(fingerprint: dict[str, Any]) -> str:
    """A short, stable key: the digest of the fingerprint's canonical JSON."""
    canonical = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class DecisionCache:
    """One small JSON file: {"version", "decisions": {key: {"fingerprint", "name", "step_seconds", "contention", "decided_utc"}}}.

    Several workers may start at once and each may write: a write re-reads the file, adds its
    entry and replaces the file whole (a rename), so no reader sees half a file. A file that
    cannot be read or parsed counts as empty; one that cannot be written is logged and the
    decision is still used for this start.
    """

    def __init__(self, path: Path):
        self.path = path

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            logger.warning("dtype decision cache %s unreadable (%s): deciding anew", self.path, error)
            return {}
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or not isinstance(data.get("decisions"), dict):
            return {}
        return data["decisions"]

    def get(self, key: str) -> dict[str, Any] | None:
        entry = self._read().get(key)
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            return None
        seconds = entry.get("step_seconds")
        if not isinstance(seconds, dict) or not all(isinstance(value, (int, float)) for value in seconds.values()):
            return None
        if not isinstance(entry.get("contention"), (int, float)):
            entry["contention"] = None  # kept before contention was measured: provisional
        return entry

    def put(
        self, key: str, fingerprint: dict[str, Any], name: str, step_seconds: dict[str, float], contention: float | None = None
    ) -> None:
        decisions = self._read()
        decisions[key] = {
            "fingerprint": fingerprint,
            "name": name,
            "step_seconds": step_seconds,
            "contention": contention,
            "decided_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_json(self.path, {"version": FORMAT_VERSION, "decisions": decisions}, "dtype decision")


def write_json(path: Path, data: dict[str, Any], what: str) -> None:
    """`data` as `path`, replaced whole (a rename), so no reader sees half a file; a failure is
    logged, never raised: the worker serves on without it."""
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    scratch = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, scratch = tempfile.mkstemp(prefix=".dtype-", dir=path.parent)
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(scratch, path)
    except OSError as error:
        logger.warning("%s not kept in %s: %s", what, path, error)
        if scratch is not None:
            Path(scratch).unlink(missing_ok=True)
