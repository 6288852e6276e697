"""GPU profiles: lookup by forgiving name, ``auto`` through NVML. No torch.

The shipped specs (``profiles/gpus.json``) get per-card overlays: JSON files written by
``bench/gpu_check.py`` (:class:`~.schema.GpuOverlay`: the card and its fitted latency constants),
read from the shipped folder ``profiles/calibration/`` and then from the folder named by
``VRAMPLAN_CALIBRATION_DIR`` (a later overlay for the same card wins). An overlay for a card with
no profile is ignored with a warning; a malformed one is an error naming the file.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from functools import cache
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from ..profiles import read_json
from .errors import InputFileError, UnknownGPUError, VramplanError
from .schema import GpuOverlay, GpuProfile

log = logging.getLogger(__name__)

CALIBRATION_ENV = "VRAMPLAN_CALIBRATION_DIR"
SHIPPED_CALIBRATION = "calibration"


@cache
def all_gpus() -> tuple[GpuProfile, ...]:
    """Every GPU profile: the shipped specs with the calibration overlays found applied."""
    gpus = shipped_gpus()
    applied: dict[str, Path] = {}
    updated = {g.name: g for g in gpus}
    for path, overlay in read_overlays():
        gpu = _match(overlay.gpu, gpus) or (_match(overlay.latency.source.card, gpus) if overlay.latency
                                             and overlay.latency.source else None)
        if gpu is None:
            log.warning("ignoring the GPU overlay %s: no GPU profile matches %r (`vramplan gpus` lists them)",
                        path, overlay.gpu)
            continue
        if overlay.latency is None:
            log.info("the GPU overlay %s has no latency constants (the check fitted none): nothing applied", path)
            continue
        if gpu.name in applied:
            log.warning("the GPU overlay %s replaces %s for %s", path, applied[gpu.name], gpu.name)
        if overlay.latency.source is not None and overlay.latency.source.smoke:
            log.warning("the GPU overlay %s comes from a CPU smoke run: its constants mean nothing for %s",
                        path, gpu.name)
        applied[gpu.name] = path
        updated[gpu.name] = gpu.model_copy(update={
            "latency": overlay.latency, "calibrated": True,
            "sources": [*gpu.sources, f"latency constants: {path.name}"],
        })
    return tuple(updated[g.name] for g in gpus)


@cache
def shipped_gpus() -> tuple[GpuProfile, ...]:
    """The GPU specs of ``profiles/gpus.json``, no overlay applied."""
    return tuple(GpuProfile.model_validate(g) for g in read_json("gpus.json")["gpus"])


def clear_cache() -> None:
    """Forget the profiles built so far (after writing an overlay or changing ``VRAMPLAN_CALIBRATION_DIR``)."""
    all_gpus.cache_clear()
    _index.cache_clear()


def calibration_dirs() -> list[Path]:
    """Where overlays are read from, in order: the shipped folder, then ``$VRAMPLAN_CALIBRATION_DIR``."""
    folders = [Path(str(resources.files("vramplan.profiles").joinpath(SHIPPED_CALIBRATION)))]
    user = os.environ.get(CALIBRATION_ENV, "").strip()
    if user:
        folder = Path(user).expanduser()
        if folder.exists() and not folder.is_dir():
            raise InputFileError(f"{CALIBRATION_ENV}={user}: that is a file, not a folder of GPU overlays "
                                 f"(the JSON files bench/gpu_check.py writes)")
        if not folder.exists():
            log.warning("%s=%s does not exist: no GPU overlays read from it", CALIBRATION_ENV, user)
        folders.append(folder)
    return folders


def read_overlays() -> list[tuple[Path, GpuOverlay]]:
    """Every overlay (``*.json``) of :func:`calibration_dirs`, in order (by name within a folder)."""
    out = []
    for folder in calibration_dirs():
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            out.append((path, load_overlay(path)))
    return out


def load_overlay(path: str | Path) -> GpuOverlay:
    """One overlay file, or an error naming the file and what is wrong with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise InputFileError(f"cannot read the GPU overlay {path}: {err}") from err
    except json.JSONDecodeError as err:
        raise InputFileError(f"the GPU overlay {path} is not valid JSON ({err}); fix or remove it") from err
    try:
        return GpuOverlay.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or '(file)'}: {e['msg']}" for e in err.errors())
        raise InputFileError(
            f"the GPU overlay {path} is malformed ({problems}); rerun bench/gpu_check.py or remove it"
        ) from err


def _norm(name: str) -> str:
    name = name.lower()
    name = re.sub(r"\b(nvidia|geforce|tesla)\b", "", name)
    return re.sub(r"[^a-z0-9]", "", name)


def _match(name: str | None, gpus) -> GpuProfile | None:
    """The profile ``name`` (a profile name, an alias or an NVML name) denotes among ``gpus``, or None."""
    if not name:
        return None
    key = _norm(name)
    for gpu in gpus:
        if any(_norm(alias) == key for alias in [gpu.name, *gpu.aliases]):
            return gpu
    return None


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
