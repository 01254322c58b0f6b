"""Machine presets and the machine/accelerator pairings Vertex accepts.

Vertex only rejects a wrong pairing after the endpoint exists and the deploy
operation has been queued, sometimes minutes later. Checking the family table
here turns that into an immediate error that names the right pairing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from handler.settings import unknown_names
from vertex.errors import VertexConfigError

T4 = "NVIDIA_TESLA_T4"
P4 = "NVIDIA_TESLA_P4"
P100 = "NVIDIA_TESLA_P100"
V100 = "NVIDIA_TESLA_V100"
L4 = "NVIDIA_L4"
A100 = "NVIDIA_TESLA_A100"
A100_80GB = "NVIDIA_A100_80GB"
H100_80GB = "NVIDIA_H100_80GB"
H100_MEGA_80GB = "NVIDIA_H100_MEGA_80GB"
H200_141GB = "NVIDIA_H200_141GB"
B200 = "NVIDIA_B200"

# GPUs before compute capability 8.0 (Pascal, Volta, Turing): no bfloat16 units, so they
# serve float16 (the handler's `dtype: auto` decides the same on the GPU itself).
NO_BF16 = frozenset({T4, P4, P100, V100})
# Each GPU's memory in GB, which `preset_for_weights` sizes a model against.
GPU_MEMORY_GB = {
    T4: 16, P4: 8, P100: 16, V100: 16, L4: 24, A100: 40, A100_80GB: 80,
    H100_80GB: 80, H100_MEGA_80GB: 80, H200_141GB: 141, B200: 180,
}  # fmt: skip


@dataclass(frozen=True)
class MachineSpec:
    """What one replica runs on, plus the dtype the GPU serves best."""

    machine_type: str
    accelerator_type: str | None = None
    accelerator_count: int = 0

    @property
    def dtype(self) -> str:
        """GPUs older than Ampere have no bfloat16 units; every newer GPU does; CPUs get float32."""
        if self.accelerator_type is None:
            return "float32"
        if self.accelerator_type in NO_BF16:
            return "float16"
        return "bfloat16"

    def describe(self) -> str:
        if self.accelerator_type is None:
            return self.machine_type
        return f"{self.machine_type} + {self.accelerator_count} x {self.accelerator_type}"


# One GPU each, cheapest first: `preset_for_weights` takes the first that holds a model.
PRESETS: dict[str, MachineSpec] = {
    "t4": MachineSpec("n1-standard-8", T4, 1),
    "l4": MachineSpec("g2-standard-8", L4, 1),
    "a100": MachineSpec("a2-highgpu-1g", A100, 1),
    "a100-80gb": MachineSpec("a2-ultragpu-1g", A100_80GB, 1),
    "h100": MachineSpec("a3-highgpu-1g", H100_80GB, 1),
    "h200": MachineSpec("a3-ultragpu-8g", H200_141GB, 1),
}
# A preset fits a model whose weights take at most this share of its GPU's memory: the rest
# holds the KV cache (`num_blocks: auto` takes what is free), activations and CUDA's context.
WEIGHT_SHARE = 0.6


@dataclass(frozen=True)
class _Family:
    """A machine family: its name pattern, the accelerators it takes, and its GPU counts.

    `attached` is the number of GPUs a machine of the family carries, read from its name
    (None: the N1 family, where GPUs are chosen and attached); a deployment may use 1 to
    that many, and Vertex co-schedules replicas that use fewer on one machine."""

    pattern: re.Pattern[str]
    label: str
    accelerators: tuple[str, ...]
    attached: Callable[[str], int] | None


def _from_name(machine_type: str) -> int:
    found = re.search(r"-(\d+)g$", machine_type)
    if found is None:
        raise VertexConfigError(f"{machine_type} does not end in its GPU count (-Ng)")
    return int(found.group(1))


def _g2_gpus(machine_type: str) -> int:
    return _G2_GPUS[int(machine_type.rsplit("-", 1)[1])]


# g2 machines carry a fixed number of L4s that the name does not spell out.
_G2_GPUS = {4: 1, 8: 1, 12: 1, 16: 1, 32: 1, 24: 2, 48: 4, 96: 8}
# GPUs an N1 machine can have attached, by model.
_N1_COUNTS = {T4: (1, 2, 4), P4: (1, 2, 4), P100: (1, 2, 4), V100: (1, 2, 4, 8)}

_FAMILIES: tuple[_Family, ...] = (
    _Family(re.compile(r"^n1-(?:standard|highmem|highcpu)-\d+$"), "n1-*", (T4, P4, P100, V100), None),
    _Family(re.compile(r"^g2-standard-(?:4|8|12|16|24|32|48|96)$"), "g2-standard-*", (L4,), _g2_gpus),
    _Family(re.compile(r"^a2-highgpu-(?:1|2|4|8)g$"), "a2-highgpu-{1,2,4,8}g", (A100,), _from_name),
    _Family(re.compile(r"^a2-megagpu-16g$"), "a2-megagpu-16g", (A100,), _from_name),
    _Family(re.compile(r"^a2-ultragpu-(?:1|2|4|8)g$"), "a2-ultragpu-{1,2,4,8}g", (A100_80GB,), _from_name),
    _Family(re.compile(r"^a3-highgpu-(?:1|2|4|8)g$"), "a3-highgpu-{1,2,4,8}g", (H100_80GB,), _from_name),
    _Family(re.compile(r"^a3-megagpu-8g$"), "a3-megagpu-8g", (H100_MEGA_80GB,), _from_name),
    _Family(re.compile(r"^a3-ultragpu-8g$"), "a3-ultragpu-8g", (H200_141GB,), _from_name),
    _Family(re.compile(r"^a4-highgpu-8g$"), "a4-highgpu-8g", (B200,), _from_name),
)


def pairing_table() -> str:
    """The accepted pairings as one line, for error messages."""
    return ", ".join(f"{f.label} -> {'/'.join(f.accelerators)}" for f in _FAMILIES)


def _family_of(machine_type: str) -> _Family | None:
    for family in _FAMILIES:
        if family.pattern.match(machine_type):
            return family
    return None


def allowed_counts(machine_type: str, accelerator: str) -> tuple[int, ...]:
    """The GPU counts a deployment of `machine_type` may ask for with `accelerator`."""
    family = _family_of(machine_type)
    if family is None or accelerator not in family.accelerators:
        return ()
    if family.attached is None:
        return _N1_COUNTS[accelerator]
    return tuple(range(1, family.attached(machine_type) + 1))


def validate_machine(
    machine_type: str,
    accelerator_type: str | None = None,
    accelerator_count: int | None = None,
) -> MachineSpec:
    """Check an explicit machine against the family table and fill in the count: all the GPUs
    an accelerator-optimized machine carries, one on N1."""
    accelerator = accelerator_type or None
    family = _family_of(machine_type)
    if accelerator is None:
        if accelerator_count:
            raise VertexConfigError(f"--accelerator-count {accelerator_count} given without --accelerator-type")
        if family is not None and family.attached is not None:
            raise VertexConfigError(f"{machine_type} comes with GPUs attached: pass --accelerator-type {family.accelerators[0]}")
        return MachineSpec(machine_type)
    if family is None:
        raise VertexConfigError(
            f"no known GPU pairing for machine type {machine_type!r} with {accelerator}; accepted pairings: {pairing_table()}"
        )
    if accelerator not in family.accelerators:
        raise VertexConfigError(
            f"{machine_type} cannot carry {accelerator}: {family.label} machines take "
            f"{' or '.join(family.accelerators)} (accepted pairings: {pairing_table()})"
        )
    counts = allowed_counts(machine_type, accelerator)
    count = accelerator_count if accelerator_count is not None else (counts[-1] if family.attached else 1)
    if count not in counts:
        raise VertexConfigError(f"{machine_type} takes {', '.join(map(str, counts))} x {accelerator}, not {count}")
    return MachineSpec(machine_type, accelerator, count)


def preset_for_weights(weight_bytes: int) -> str:
    """The cheapest one-GPU preset whose memory holds the weights with room to serve
    (WEIGHT_SHARE); refused past the largest, which would need several GPUs."""
    memory = {name: GPU_MEMORY_GB[spec.accelerator_type] for name, spec in PRESETS.items() if spec.accelerator_type}
    for name, gigabytes in memory.items():
        if weight_bytes <= gigabytes * 10**9 * WEIGHT_SHARE:
            return name
    largest = max(memory.values())
    raise VertexConfigError(
        f"the weights take {weight_bytes / 10**9:.1f} GB, more than {WEIGHT_SHARE:.0%} of the largest "
        f"one-GPU preset's {largest} GB: name a machine with --machine-type and --accelerator-*"
    )


def weights_size(model_dir: Path) -> int:
    """Bytes of a checkpoint's weight files (safetensors, else pickle) in `model_dir`."""
    files = list(model_dir.glob("*.safetensors")) or list(model_dir.glob("*.bin"))
    if not files:
        raise VertexConfigError(f"no weights in {model_dir} to size a GPU from: pass --machine, or --weights-gb")
    return sum(f.stat().st_size for f in files)


def resolve_machine(
    preset: str | None = None,
    machine_type: str | None = None,
    accelerator_type: str | None = None,
    accelerator_count: int | None = None,
) -> MachineSpec:
    """A preset name, or an explicit machine; never both, so nothing is silently ignored."""
    explicit = machine_type or accelerator_type or accelerator_count
    if preset and explicit:
        raise VertexConfigError("pass either --machine PRESET or --machine-type/--accelerator-*, not both")
    if preset:
        problem = unknown_names([preset], PRESETS, "machine preset")
        if problem:
            raise VertexConfigError(problem)
        return PRESETS[preset]
    if not machine_type:
        raise VertexConfigError("no machine: pass --machine (one of " + ", ".join(PRESETS) + ") or --machine-type")
    return validate_machine(machine_type, accelerator_type, accelerator_count)
