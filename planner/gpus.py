"""GPU profiles: lookup by forgiving name, ``auto`` through NVML. No torch."""

from __future__ import annotations

import difflib
import logging
import re
from functools import cache

from ..profiles import read_json
from .errors import UnknownGPUError, VramplanError
from .schema import GpuProfile

log = logging.getLogger(__name__)


@cache
def all_gpus() -> tuple[GpuProfile, ...]:
    return tuple(GpuProfile.model_validate(g) for g in read_json("gpus.json")["gpus"])


def _norm(name: str) -> str:
    name = name.lower()
    name = re.sub(r"\b(nvidia|geforce|tesla)\b", "", name)
    return re.sub(r"[^a-z0-9]", "", name)


@cache
def _index() -> dict[str, GpuProfile]:
    index: dict[str, GpuProfile] = {}
    for gpu in all_gpus():
        for alias in [gpu.name, *gpu.aliases]:
            index.setdefault(_norm(alias), gpu)
    return index


def find_gpu(name: str) -> GpuProfile:
    """A GPU profile by name: "2080Ti", "RTX 2080 Ti", "rtx2080ti", an NVML name, or "auto"."""
    if name.strip().lower() == "auto":
        return detect_gpu()
    key = _norm(name)
    index = _index()
    if key in index:
        return index[key]
    close = difflib.get_close_matches(key, list(index), n=8, cutoff=0.5)
    names = list(dict.fromkeys(index[c].name for c in close))[:4]
    hint = f" Did you mean: {', '.join(names)}?" if names else ""
    raise UnknownGPUError(f"unknown GPU {name!r}.{hint} `vramplan gpus` lists the known GPUs.")


def detect_gpu(device_index: int = 0) -> GpuProfile:
    """The local GPU, read through NVML (nvidia-ml-py): its profile by name, with the memory NVML
    reports (an 8 GiB card sold under a 12 GB card's name is planned with 8 GiB)."""
    try:
        import pynvml
    except ImportError as err:
        raise VramplanError(
            "gpu='auto' needs nvidia-ml-py (pip install nvidia-ml-py); or name the GPU, e.g. gpu='2080Ti'"
        ) from err
    try:
        pynvml.nvmlInit()
    except Exception as err:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
        raise VramplanError(
            f"gpu='auto' found no NVIDIA driver on this machine ({err}). Name the GPU you plan for, "
            f"e.g. plan_for(gpu='2080Ti') or `vramplan plan --gpu 2080Ti`."
        ) from err
    try:
        count = pynvml.nvmlDeviceGetCount()
        if device_index >= count:
            raise VramplanError(
                f"gpu='auto': NVML started but sees {count} GPU(s), so there is no GPU {device_index}. "
                f"Name the GPU you plan for, e.g. gpu='2080Ti'."
            )
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else str(name)
        total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
    except VramplanError:
        raise
    except Exception as err:  # noqa: BLE001 - any NVMLError
        raise VramplanError(
            f"gpu='auto': NVML could not read GPU {device_index} ({err}). Name the GPU you plan for, e.g. gpu='2080Ti'."
        ) from err
    finally:
        pynvml.nvmlShutdown()
    try:
        profile = find_gpu(name)
    except UnknownGPUError as err:
        raise UnknownGPUError(
            f"the local GPU {name!r} ({total / 2**30:.1f} GiB) has no vramplan profile. Pass the closest known "
            f"GPU and vram_gb=<its memory>. {err}"
        ) from err
    return with_memory(profile, total)


def with_memory(profile: GpuProfile, total_bytes: int) -> GpuProfile:
    """``profile`` with the memory a device really has (what NVML reports), if it differs by over 1%;
    usable memory keeps the profile's reserve (total - usable)."""
    if total_bytes <= 0 or abs(total_bytes - profile.memory_total_bytes) <= 0.01 * profile.memory_total_bytes:
        return profile
    reserve = profile.memory_total_bytes - profile.memory_usable_bytes
    usable = max(total_bytes - reserve, total_bytes // 2)
    log.warning("the local %s has %.2f GiB, not the %.2f GiB of its profile: planning with what it has",
                profile.name, total_bytes / 2**30, profile.memory_total_bytes / 2**30)
    return profile.model_copy(update={"memory_total_bytes": total_bytes, "memory_usable_bytes": usable})
