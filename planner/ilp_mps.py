"""The fastest-path ILP written straight to CBC, without building a PuLP model. No torch.

:func:`.solve._ilp` builds a PuLP problem (one binary per candidate segment, flow constraints) and PuLP
writes it as an MPS file for its bundled CBC. For the ``min_latency`` objective, which every stage search
of a pipeline plan ends with, that model building costs the planning process more than CBC takes to
solve it (~27 ms of ~60 ms per call on a 2,000-candidate UNet table; a fleet makes over a thousand).
:func:`solve_min_latency` writes **the same bytes** PuLP writes (same names, order and number format:
``tests/test_fleet_speed.py`` compares them) and runs the same CBC with the same arguments, so CBC's
answer is the same; it reads the solution file as PuLP does. The ``min_peak`` objective stays on PuLP.
"""

# ruff: noqa: UP031 - PuLP's own %-format strings, so that the bytes are PuLP's
from __future__ import annotations

import os
import subprocess
import tempfile

INT_START = "    MARK      'MARKER'                 'INTORG'\n"
INT_END = "    MARK      'MARKER'                 'INTEND'\n"


def mps_min_latency(segments, seconds: dict, n: int) -> str:
    """The MPS text PuLP writes (``writeMPS(rename=1)``) for :func:`.solve._ilp`'s ``min_latency``
    problem, and ``(name, segment)`` per variable: binary ``X<i>`` per segment (sorted by PuLP's name
    ``y_<start>_<stop>_<k>_<depth>``), rows ``C0`` (one segment starts at
    unit 0), ``C1`` (one ends past the last unit), ``C<1+i>`` (flow through unit i: ends - starts = 0)."""
    rows = ["*SENSE:Minimize\n", "NAME          MODEL\n", "ROWS\n", " N  OBJ\n"]
    rows += [f" E  C{r:07d}\n" for r in range(n + 1)]
    columns = ["COLUMNS\n"]
    names = []
    # PuLP's model keeps one variable per segment (a dict) and writes them sorted by name
    for i, s in enumerate(sorted(dict.fromkeys(segments), key=lambda s: f"y_{s.start}_{s.stop}_{s.k}_{s.depth}")):
        name = f"X{i:07d}"
        names.append((name, s))
        start, end = s.start, s.stop + 1
        entries = []  # (row, coefficient), in row order as PuLP writes them
        entries.append((0 if start == 0 else 1 + start, 1.0 if start == 0 else -1.0))
        entries.append((1 if end == n else 1 + end, 1.0))
        entries.sort()
        columns.append(INT_START)
        columns += ["    %-8s  %-8s  % .12e\n" % (name, f"C{r:07d}", v) for r, v in entries]
        if seconds[s] != 0:  # a zero term is not in PuLP's objective
            columns.append("    %-8s  %-8s  % .12e\n" % (name, "OBJ", seconds[s]))
        columns.append(INT_END)
    rhs = ["RHS\n"] + ["    RHS       %-8s  % .12e\n" % (f"C{r:07d}", 1 if r < 2 else 0) for r in range(n + 1)]
    bounds = ["BOUNDS\n"] + [" BV BND       %-8s\n" % name for name, _ in names]
    return "".join(rows + columns + rhs + bounds + ["ENDATA\n"]), names


def solve_min_latency(segments, seconds: dict, n: int, solver) -> tuple[list | None, str]:
    """``(chosen segments by start, status)`` from CBC for the fastest path, as :func:`.solve._ilp` gets
    them through PuLP (``solver``: the PuLP CBC command object whose executable and options to use)."""
    text, names = mps_min_latency(segments, seconds, n)
    with tempfile.TemporaryDirectory(prefix="vramplan-cbc-") as folder:
        mps, sol = os.path.join(folder, "problem.mps"), os.path.join(folder, "problem.sol")
        with open(mps, "w") as f:
            f.write(text)
        args = [solver.path, mps]
        if solver.timeLimit is not None:
            args += ["-sec", str(solver.timeLimit)]
        for option in solver.options + solver.getOptions():
            args += ("-" + option).split()
        args += ["-solve", "-printingOptions", "all", "-solution", sol]
        done = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        if done.returncode != 0 or not os.path.exists(sol):
            raise RuntimeError(f"CBC failed (exit {done.returncode}) on a fastest-path problem")
        with open(sol) as f:
            lines = f.read().splitlines()
    status = _status(lines[0].split() if lines else [])
    if status != "Optimal":
        return None, status
    values = {}
    for line in lines[1:]:
        if len(line) <= 2:
            break
        parts = line.split()
        if parts[0] == "**":
            parts = parts[1:]
        values[parts[1]] = float(parts[2])
    chosen = sorted((s for name, s in names if values.get(name, 0) > 0.5), key=lambda s: s.start)
    return chosen, status


def _status(words: list[str]) -> str:
    """PuLP's reading of CBC's first solution line (``COIN_CMD.get_status``), as ``pulp.LpStatus`` names it."""
    first = words[0] if words else ""
    status = {"Optimal": "Optimal", "Infeasible": "Infeasible", "Integer": "Infeasible",
              "Unbounded": "Unbounded", "Stopped": "Not Solved"}.get(first, "Undefined")
    if status == "Not Solved" and len(words) >= 5 and words[4] == "objective":
        status = "Optimal"
    return status
