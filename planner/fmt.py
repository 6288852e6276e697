"""Human-readable sizes for messages and tables."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``1.23 GiB``, ``45.6 MiB``, ``789 KiB``: three significant figures where it matters."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
