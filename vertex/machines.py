"""Machine presets and the machine/accelerator pairings Vertex accepts.

Vertex only rejects a wrong pairing after the endpoint exists and the deploy
operation has been queued, sometimes minutes later. Checking the family table
here turns that into an immediate error that names the right pairing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from handler.settings import unknown_names
from vertex.errors import VertexConfigError

T4 = "NVIDIA_TESLA_T4"
L4 = "NVIDIA_L4"
A100 = "NVIDIA_TESLA_A100"
A100_80GB = "NVIDIA_A100_80GB"
H100_80GB = "NVIDIA_H100_80GB"


@dataclass(frozen=True)
class MachineSpec:
    """What one replica runs on, plus the dtype the GPU serves best."""

    machine_type: str
    accelerator_type: Optional[str] = None
    accelerator_count: int = 0

    @property
    def dtype(self) -> str:
        """T4 (Turing) has no bfloat16 units; every newer GPU here does; CPUs get float32."""
        if self.accelerator_type is None:
            return "float32"
        if self.accelerator_type == T4:
            return "float16"
        return "bfloat16"

    def describe(self) -> str:
        if self.accelerator_type is None:
            return self.machine_type
        return f"{self.machine_type} + {self.accelerator_count} x {self.accelerator_type}"


PRESETS: Dict[str, MachineSpec] = {
    "t4": MachineSpec("n1-standard-8", T4, 1),
    "l4": MachineSpec("g2-standard-8", L4, 1),
    "a100": MachineSpec("a2-highgpu-1g", A100, 1),
    "h100": MachineSpec("a3-highgpu-1g", H100_80GB, 1),
}


@dataclass(frozen=True)
class _Family:
    """A machine family: its name pattern, its only accelerator, and its GPU counts."""

    pattern: "re.Pattern[str]"
    label: str
    accelerator: str
    gpus_attached: bool


_FAMILIES: Tuple[_Family, ...] = (
    _Family(re.compile(r"^n1-(?:standard|highmem|highcpu)-\d+$"), "n1-*", T4, False),
    _Family(re.compile(r"^g2-standard-\d+$"), "g2-*", L4, True),
    _Family(re.compile(r"^a2-highgpu-(\d+)g$"), "a2-highgpu-*", A100, True),
    _Family(re.compile(r"^a2-ultragpu-(\d+)g$"), "a2-ultragpu-*", A100_80GB, True),
    _Family(re.compile(r"^a3-highgpu-(\d+)g$"), "a3-highgpu-*", H100_80GB, True),
)

# g2 machines carry a fixed number of L4s that the name does not spell out.
_G2_GPUS = {4: 1, 8: 1, 12: 1, 16: 1, 32: 1, 24: 2, 48: 4, 96: 8}
_N1_T4_COUNTS = (1, 2, 4)


def pairing_table() -> str:
    """The accepted pairings as one line, for error messages."""
    return ", ".join(f"{f.label} -> {f.accelerator}" for f in _FAMILIES)


def _family_of(machine_type: str) -> Optional[_Family]:
    for family in _FAMILIES:
        if family.pattern.match(machine_type):
            return family
    return None


def _required_count(family: _Family, machine_type: str) -> Optional[int]:
    """GPU-bearing families fix the count; ``None`` means the user chooses."""
    if family.accelerator == L4:
        vcpus = int(machine_type.rsplit("-", 1)[1])
        return _G2_GPUS.get(vcpus)
    match = family.pattern.match(machine_type)
    if match and match.groups():
        return int(match.group(1))
    return None


def validate_machine(
    machine_type: str,
    accelerator_type: Optional[str] = None,
    accelerator_count: Optional[int] = None,
) -> MachineSpec:
    """Check an explicit machine against the family table and fill in the count."""
    accelerator = accelerator_type or None
    family = _family_of(machine_type)
    if accelerator is None:
        if accelerator_count:
            raise VertexConfigError(
                f"--accelerator-count {accelerator_count} given without --accelerator-type"
            )
        if family is not None and family.gpus_attached:
            raise VertexConfigError(
                f"{machine_type} comes with GPUs attached: pass --accelerator-type "
                f"{family.accelerator}"
            )
        return MachineSpec(machine_type)
    if family is None:
        raise VertexConfigError(
            f"no known GPU pairing for machine type {machine_type!r} with {accelerator}; "
            f"accepted pairings: {pairing_table()}"
        )
    if accelerator != family.accelerator:
        raise VertexConfigError(
            f"{machine_type} cannot carry {accelerator}: {family.label} machines take "
            f"{family.accelerator} (accepted pairings: {pairing_table()})"
        )
    required = _required_count(family, machine_type)
    count = accelerator_count if accelerator_count is not None else (required or 1)
    if required is not None and count != required:
        raise VertexConfigError(
            f"{machine_type} has exactly {required} x {accelerator}, not {count}"
        )
    if family.accelerator == T4 and count not in _N1_T4_COUNTS:
        raise VertexConfigError(
            f"n1 machines take 1, 2 or 4 x {T4}, not {count}"
        )
    return MachineSpec(machine_type, accelerator, count)


def resolve_machine(
    preset: Optional[str] = None,
    machine_type: Optional[str] = None,
    accelerator_type: Optional[str] = None,
    accelerator_count: Optional[int] = None,
) -> MachineSpec:
    """A preset name, or an explicit machine; never both, so nothing is silently ignored."""
    explicit = machine_type or accelerator_type or accelerator_count
    if preset and explicit:
        raise VertexConfigError(
            "pass either --machine PRESET or --machine-type/--accelerator-*, not both"
        )
    if preset:
        problem = unknown_names([preset], PRESETS, "machine preset")
        if problem:
            raise VertexConfigError(problem)
        return PRESETS[preset]
    if not machine_type:
        raise VertexConfigError(
            "no machine: pass --machine (one of " + ", ".join(PRESETS) + ") or --machine-type"
        )
    return validate_machine(machine_type, accelerator_type, accelerator_count)
