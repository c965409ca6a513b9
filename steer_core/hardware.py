"""What this machine can hold: its memory limit, the device and dtype models run in, and each cache's share.

A Space runs in a container whose memory limit (its cgroup) is far below what /proc/meminfo shows of the host, and a
load past that limit kills the server for every visitor. So the limit is read where the kernel enforces it, and every
model or SAE is checked against its share before any of it downloads (steer_core.hub reads the sizes).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

MEMORY_ENV = "STEER_MEMORY_LIMIT"  # e.g. "16G": what a CPU Space has, to try its limits on a larger machine
GPU_MEMORY_ENV = "STEER_GPU_MEMORY"
# ZeroGPU attaches an H200 slice with "70GB of vRAM per workload" (huggingface.co/docs/hub/spaces-zerogpu). Outside a
# decorated handler its CUDA is emulated, so the real card cannot be asked; this is the figure the docs promise.
ZERO_GPU_MEMORY = 70 * 10**9
_NO_LIMIT = 2**62  # cgroup v1 writes "no limit" as a huge number (9223372036854771712)
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_UNITS |= {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes from '16G' (GiB, as docker and cgroups count), '16GB' (10^9), '16GiB', '1.5g' or a plain number."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"memory size {text!r} is not valid; write it as a number and a unit, e.g. 16G, 16GB or 512M")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """Sizes as the Hub shows them: decimal units."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _cgroup_limits(proc_cgroup: Path, root: Path) -> list[tuple[int, str]]:
    """Every memory limit the kernel applies to this process: its cgroup's and each ancestor's (v1 and v2)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            candidates = [(root / "unified", "memory.max"), (root, "memory.max")]
        elif "memory" in controllers.split(","):
            candidates = [(root / "memory", "memory.limit_in_bytes")]
        else:
            continue
        for mount, name in candidates:
            parts = [p for p in path.split("/") if p]
            # Inside a cgroup namespace (docker, Spaces) the mount is the process's own cgroup: try both readings.
            for depth in range(len(parts), -1, -1):
                file = mount.joinpath(*parts[:depth], name)
                try:
                    value = file.read_text().strip()
                except OSError:
                    continue
                if value.isdigit() and int(value) < _NO_LIMIT:
                    found.append((int(value), f"cgroup {name}"))  # not the path: messages show this to visitors
    return found


def _meminfo_total(meminfo: Path) -> int | None:
    try:
        match = re.search(r"^MemTotal:\s+(\d+) kB", meminfo.read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def memory_limit(
    *, proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup"),
    meminfo: Path = Path("/proc/meminfo"),
) -> tuple[int, str]:  # fmt: skip
    """(bytes this process may use, where that figure comes from): STEER_MEMORY_LIMIT, else the tightest cgroup limit,
    else the machine's total memory."""
    if os.environ.get(MEMORY_ENV):
        return parse_size(os.environ[MEMORY_ENV]), MEMORY_ENV
    limits = _cgroup_limits(proc_cgroup, root)
    total = _meminfo_total(meminfo)
    if total is not None:
        limits.append((total, "MemTotal"))
    return min(limits) if limits else (16 * 10**9, "unknown: assumed 16 GB")


def gpu_memory() -> tuple[int, str] | None:
    """(bytes of GPU memory, where from), or None where no GPU runs the models."""
    if os.environ.get(GPU_MEMORY_ENV):
        return parse_size(os.environ[GPU_MEMORY_ENV]), GPU_MEMORY_ENV
    if os.environ.get("SPACES_ZERO_GPU") == "true":
        return ZERO_GPU_MEMORY, "ZeroGPU"
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory), torch.cuda.get_device_name(0)
    return None


@dataclass(frozen=True)
class Budget:
    """What one server may hold. On a CPU models take half of the memory, SAEs an eighth, labels a sixty-fourth; the
    rest is for the requests themselves (a Gemma 3 270M export peaks about 4 GB above what is loaded, measured by
    scripts/space_check.py).

    On a GPU, models run in bfloat16 (half the memory, and what GPU kernels are fastest in) and must fit both the GPU
    and the host, which holds them first; on a CPU they run in float32, which CPUs are fastest in.
    """

    memory: int  # bytes: the host's limit, or the smaller of host and GPU where a GPU runs the models
    source: str  # where that figure came from
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    models_share: float = 0.5
    saes_share: float = 0.125
    labels_share: float = 1 / 64

    def __post_init__(self) -> None:
        if self.memory <= 0:
            raise ValueError(f"memory must be positive, got {self.memory}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device!r} is not one of cpu, cuda")
        shares = (self.models_share, self.saes_share, self.labels_share)
        if not all(0 < s < 1 for s in shares) or sum(shares) >= 1:
            raise ValueError(f"cache shares must be in (0, 1) and leave room for requests, got {shares}")

    @property
    def models(self) -> int:
        return int(self.memory * self.models_share)

    @property
    def saes(self) -> int:
        return int(self.memory * self.saes_share)

    @property
    def labels(self) -> int:
        return int(self.memory * self.labels_share)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def model_bytes(self, parameters: int) -> int:
        return parameters * torch.finfo(self.dtype).bits // 8

    def describe(self) -> str:
        return (
            f"{format_bytes(self.memory)} memory ({self.source}); models run on {self.device} in {self.dtype_name}, "
            f"up to {format_bytes(self.models)} of them, SAEs up to {format_bytes(self.saes)}"
        )

    def check_model(self, name: str, parameters: int) -> int:
        """The bytes `name` takes loaded here; a ValueError naming size and limit when it cannot fit."""
        need = self.model_bytes(parameters)
        if need > self.models:
            raise ValueError(
                f"{name} has {parameters / 1e9:.2f}B parameters: {format_bytes(need)} in {self.dtype_name}, more than "
                f"the {format_bytes(self.models)} this server holds models in ({_share(self.models_share)} of its "
                f"{format_bytes(self.memory)} memory, {self.source}); pick a smaller model, or run the app on larger "
                "hardware"
            )
        return need

    def check_sae(self, name: str, elements: int) -> int:
        """SAEs load in float32 (sae_lens' default), wherever the model runs."""
        need = elements * 4
        if need > self.saes:
            raise ValueError(
                f"SAE {name} has {elements / 1e6:.0f}M weights: {format_bytes(need)} in float32, more than the "
                f"{format_bytes(self.saes)} this server holds SAEs in ({_share(self.saes_share)} of its "
                f"{format_bytes(self.memory)} memory, {self.source}); pick a narrower SAE (fewer features) of the same "
                "release"
            )
        return need


def _share(fraction: float) -> str:
    return {0.5: "half", 0.125: "an eighth"}.get(fraction, f"{fraction:.0%}")


def current_budget(*, gpu: bool | None = None) -> Budget:
    """The budget of this process: on the GPU (bfloat16) when `gpu` (default: when one is there), else the CPU."""
    host, source = memory_limit()
    card = gpu_memory() if gpu is not False else None
    if card is None:
        return Budget(host, source)
    # On a GPU a request's working memory is smaller next to the weights (bfloat16 logits, no float32 activations
    # kept on the host), so models may take more of it: an 8B model (16.1 GB) fits a 24 GB card.
    where = f"{source}; GPU {card[1]}: {format_bytes(card[0])}"
    return Budget(min(host, card[0]), where, "cuda", torch.bfloat16, models_share=0.7, saes_share=0.1)
