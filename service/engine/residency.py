"""How many domains stay resident: what a memory budget fits, not a fixed count.

A resident domain is one row of the engine's tables (`InferenceEngine.row_bytes`: under 1 MB for the
demo backbone, about 3 MB for the paper's ResNet-26 in float32). The budget is `RA_DEVICE_MEMORY_MB`
or, by default, `RA_DEVICE_MEMORY_FRACTION` of the memory free when the engine starts: on a GPU the
device's free memory as the framework reports it, less what the host's training workers declare
(`RA_TRAINERS` x `RA_TRAINER_GPU_MEMORY_MB`, the most each one's TensorFlow may take), or
`GPU_DEFAULT_MB` where it cannot tell (TensorFlow);
on a CPU host the "device" is host memory, so that is MemAvailable, or the container's memory limit
less its use when that is smaller. `RA_MAX_RESIDENT`, when set, caps the count below what fits.
Spare rows beyond it (loads in flight, replaced versions still computing) are outside the budget.

The host tier holds evicted domains' rows. With a GPU it is host memory beside the device's
(1 GB by default). On a CPU host both tiers are one memory, so a domain is in one or the other, never
both: the host tier is what the budget leaves beyond the capped device tier (nothing without a cap).

Runs in the engine process (and in the one process of `--workers 1`).
"""

from __future__ import annotations

import dataclasses
import pathlib

from service.settings import Settings
from service.views import DeviceReport

MB = 1024 * 1024
GPU_DEFAULT_MB = 4096  # on a GPU whose free memory the framework does not tell, without RA_DEVICE_MEMORY_MB


@dataclasses.dataclass(frozen=True)
class Budget:
    """The memory the resident domains' tables may take, and where the figure came from."""

    bytes: int
    source: str  # "RA_DEVICE_MEMORY_MB", or how the default was found
    cap: int | None  # RA_MAX_RESIDENT

    def fits(self, row_bytes: int) -> int:
        """Domains of `row_bytes` each that the budget holds (at least one), under the cap."""
        fits = max(1, self.bytes // max(row_bytes, 1))
        return min(fits, self.cap) if self.cap is not None else fits


def available_host_bytes(
    meminfo: pathlib.Path = pathlib.Path("/proc/meminfo"), cgroup: pathlib.Path = pathlib.Path("/sys/fs/cgroup")
) -> int:
    """What this process may still use: MemAvailable (free memory plus reclaimable caches), or less when
    its container's memory limit leaves less (/proc/meminfo shows the whole machine inside a container)."""
    available = None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    if available is None:
        raise RuntimeError(f"{meminfo} has no MemAvailable line: set RA_DEVICE_MEMORY_MB.")
    headroom = cgroup_headroom(cgroup)
    return min(available, headroom) if headroom is not None else available


def cgroup_headroom(root: pathlib.Path) -> int | None:
    """The memory limit of this process's cgroup (v2, else v1) minus what it uses now; None without a limit."""
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        try:
            limit, usage = (root / limit_file).read_text().strip(), (root / usage_file).read_text().strip()
        except OSError:
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # unlimited
            return None
        return max(0, int(limit) - int(usage))
    return None


def budget(settings: Settings, device: DeviceReport | None) -> Budget:
    cap = settings.max_resident
    if settings.device_memory_mb is not None:
        return Budget(int(settings.device_memory_mb * MB), "RA_DEVICE_MEMORY_MB", cap)
    fraction = settings.device_memory_fraction
    if device is not None and device.gpu:
        if device.free_bytes is None:
            return Budget(
                GPU_DEFAULT_MB * MB,
                f"{GPU_DEFAULT_MB} MB ({device.backend} does not tell the GPU's free memory: set RA_DEVICE_MEMORY_MB)",
                cap,
            )
        kept = settings.trainers * settings.trainer_gpu_memory_mb * MB  # the training workers' share
        source = f"{fraction:g} of the GPU memory free at start" + (
            f" less {settings.trainers} x RA_TRAINER_GPU_MEMORY_MB for the training workers" if kept else ""
        )
        return Budget(int(max(0, device.free_bytes - kept) * fraction), source, cap)
    return Budget(int(available_host_bytes() * fraction), f"{fraction:g} of the host memory available at start", cap)


def host_cache_bytes(
    settings: Settings, device: DeviceReport | None, budget: Budget | None = None, row_bytes: int = 0
) -> int:
    """The host tier's size: `RA_HOST_CACHE_MB`; by default 1 GB with a GPU, and on a CPU host what
    `budget` leaves beyond the device tier's cap of `row_bytes` rows (one memory: no second copy)."""
    if settings.host_cache_mb is not None:
        return int(settings.host_cache_mb * MB)
    if device is not None and device.gpu:
        return 1024 * MB
    if budget is None or budget.cap is None:
        return 0
    return max(0, budget.bytes - budget.cap * row_bytes)
