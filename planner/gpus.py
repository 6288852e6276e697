"""GPU profiles: lookup by forgiving name, ``auto`` through NVML. No torch."""

from __future__ import annotations

import difflib
import re
from functools import cache

from ..profiles import read_json
from .errors import UnknownGPUError, VramplanError
from .schema import GpuProfile


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
    """The local GPU, read through NVML (nvidia-ml-py), with a clear error where there is none."""
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
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else name
    finally:
        pynvml.nvmlShutdown()
    try:
        return find_gpu(name)
    except UnknownGPUError as err:
        raise UnknownGPUError(
            f"the local GPU {name!r} has no vramplan profile. Pass the closest known GPU and "
            f"vram_gb=<its memory>. {err}"
        ) from err
