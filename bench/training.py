"""What the tiny-model training scripts share: a timestamped log kept next to the weights, and the
learning-rate schedule (linear warm-up, cosine decay to a floor)."""

from __future__ import annotations

import math
import time
from pathlib import Path


class Log:
    """Prints each line with the seconds since start and appends it to ``path`` (the shipped train log)."""

    def __init__(self, path: Path, append: bool):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a" if append else "w")
        self.start = time.time()

    def __call__(self, message: str) -> None:
        line = f"[{time.time() - self.start:7.1f}s] {message}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def lr_at(step: int, steps: int, peak: float, warmup: int = 100, floor: float = 0.1) -> float:
    """``peak`` after a linear warm-up, then a cosine decay to ``floor * peak`` at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))
