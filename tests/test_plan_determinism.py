"""A plan does not depend on Python's hash seed: equal-weight blocks and equal-size values are pruned
in program order, not in the iteration order of a set."""

from __future__ import annotations

import os
import subprocess
import sys

CODE = (
    "import hashlib\n"
    "from vramplan import plan_for\n"
    "p = plan_for(gpu='RTX 4090', model='wan2.1-t2v-1.3b', height=480, width=832, frames=81, dtype='bf16', vram_gb=2)\n"
    "assert p.component('transformer').streamed\n"
    "print(hashlib.sha1(p.model_dump_json(exclude={'solver'}).encode()).hexdigest())\n"
)


def _plan_digest(seed: int) -> str:
    env = dict(os.environ, PYTHONHASHSEED=str(seed))
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_same_plan_under_different_hash_seeds():
    assert len({_plan_digest(seed) for seed in (1, 2, 3)}) == 1
