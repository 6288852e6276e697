"""Memory and latency of a *rows* segment (units sliced along the height with halos), from a profile.

The executor (``vramplan.runtime.rows``) runs a rows segment slice by slice on the rows
:func:`.rows.plan_segment` gives; this prices the same plan:

- memory, per slice and unit: values alive at the segment's start, the full buffers of escaping
  outputs (device-placed; in the first slice only earlier units', as the executor allocates a
  buffer at its first write; all of them after), the pieces of earlier units a later
  unit of the slice still reads (each as many rows as its slab produced: the halo included), host
  inputs staged for the slab, and the unit's own scratch for its slab — the profiled scratch of
  the unit sliced alone (``UnitProfile.scratch``), scaled by slab rows from the nearest profiled
  slice count at or above it;
- time: each unit's roofline time scaled by the rows it computes over all slices (the halo's
  recompute), a launch cost per slice, the statistics passes (and the units recomputed for them),
  writing escaping outputs, and host-link copies.
"""

from __future__ import annotations

from .rows import RowMap, plan_segment, profiled_slice


def _maps(model) -> list[RowMap | None]:
    cache = model.__dict__.get("_row_maps")
    if cache is None:
        cache = model.__dict__["_row_maps"] = [RowMap.from_list(u.rows) if u.rows else None for u in model.units]
    return cache


def in_rows(model, j: int) -> int:
    """Rows of unit ``j``'s first input: its producer's output, or the sample's height."""
    unit = model.units[j]
    p = model.producer.get(unit.inputs[0]) if unit.inputs else None
    if p is not None:
        return model.units[p].output_shape[-2]
    return model.profile.shape.latent_height


def _cropped(model, j: int) -> bool:
    return bool(getattr(model.units[j], "rows_cropped", False))


def _slab_scratch(model, j: int, rows: int) -> float:
    """Scratch of unit ``j`` computing from a slab of ``rows`` input rows; for a unit that crops after
    every step, ``rows`` are the rows it holds (:meth:`.rows.RowMap.held_rows`: its input slab, clipped
    at both ends of a low-resolution input, says little about its high-resolution steps): see
    :func:`_affine`."""
    cache = model.__dict__.setdefault("_rows_scratch", {})
    table = cache.get(j)
    unit = model.units[j]
    cropped = _cropped(model, j)
    if table is None:
        m, n = _maps(model)[j], in_rows(model, j)
        table = []
        for k, nbytes in sorted(unit.scratch.items()):
            sl = plan_segment([m], [[]], [None], [n], k)
            if cropped:  # the slice the profiler ran: its held rows, and whether it has halos on both sides
                s, e = sl[profiled_slice([m], sl, [n], [True])].out[0]
                table.append((m.held_rows(s, e, n), nbytes, 0 < s and e < unit.output_shape[-2]))
            else:
                table.append((max(b - a for a, b in (s.slab[0] for s in sl)), nbytes))
        table = sorted(set(table))
        cache[j] = table
    if cropped:
        return _affine(table, rows)
    for slab, nbytes in table:  # smallest profiled slab at or above ``rows``
        if slab >= rows:
            return nbytes * rows / slab
    slab, nbytes = table[-1]
    return nbytes * rows / slab


def _held(model, j: int, sl, i: int) -> int:
    """Weighted rows unit ``j`` (position ``i`` of its segment) holds in slice ``sl``."""
    s, e = sl.out[i]
    return _maps(model)[j].held_rows(s, e, in_rows(model, j)) if e > s else 0


def _affine(table: list[tuple[int, int, bool]], rows: int) -> float:
    """Bytes of a slice holding ``rows`` (weighted rows) of a unit that crops after every step, from the
    profiled ``(rows, bytes, middle)`` points. A middle slice (halos on both sides) holds at every step
    its rows plus a halo, so its bytes are affine in its weighted rows: the line through the two nearest
    middle points (exact at a profiled slice count; an edge slice, one halo, is priced as a middle one),
    never above the unsliced run's."""
    for r, nbytes, _ in table:
        if r == rows:
            return nbytes
    middle = [(r, b) for r, b, mid in table if mid]
    if len(middle) < 2:
        r, nbytes = max((r, b) for r, b, _ in table if r >= rows) if any(r >= rows for r, _, _ in table) else \
            max((r, b) for r, b, _ in table)
        return nbytes * rows / r
    i = 1
    while i < len(middle) - 1 and middle[i][0] < rows:
        i += 1
    (r0, b0), (r1, b1) = middle[i - 1], middle[i]
    whole = max(b for _, b, _ in table)
    return min(whole, max(0.0, b0 + (b1 - b0) * (rows - r0) / (r1 - r0)))


def rows_cost(model, seg, seg_rules, entry: int, host: frozenset[str]):
    """The :class:`~.costs.SegmentCost` of a rows segment of ``k`` > 1 slices."""
    from .costs import SegmentCost

    memory, terms, link, recompute = rows_memory(model, seg, seg_rules, entry)
    seconds, transfer = replay(model, terms, link)
    return SegmentCost(*memory, seconds, 0, transfer, recompute)


class _Geometry:
    """What of a rows segment's memory depends only on its units and ``k``, not on the placement: the
    slices' rows (:func:`.rows.plan_segment`), their signatures, and per slice and unit the rows and bytes
    :func:`rows_memory` reads (computed once per ``(start, stop, k)`` and profile; a placement trial
    re-costs a segment many times). Kept in tuples of integers, which the garbage collector stops
    tracking: a process that planned many shapes holds thousands of these."""

    __slots__ = ("units", "in_lens", "slices", "lens", "width", "active", "held", "made_bytes", "own_bytes",
                 "scratch", "loop", "stats_loop", "made_rows", "work")

    def __init__(self, model, seg):
        units = self.units = tuple(model.units[seg.start : seg.stop + 1])
        maps = _maps(model)[seg.start : seg.stop + 1]
        pos = {u.name: i for i, u in enumerate(units)}
        first = [pos.get(u.inputs[0]) for u in units]
        in_lens = self.in_lens = tuple(in_rows(model, seg.start + i) for i in range(len(units)))
        readers = [[r for r in range(i + 1, len(units)) if u.name in units[r].inputs] for i, u in enumerate(units)]
        slices = self.slices = tuple(plan_segment(maps, readers, first, in_lens, seg.k))
        lens = self.lens = tuple(u.output_shape[-2] or 1 for u in units)
        cropped = [_cropped(model, seg.start + i) for i in range(len(units))]
        made = [[maps[i].out_len(b - a) if b > a else 0 for i, (a, b) in enumerate(sl.slab)] for sl in slices]
        self.width = tuple(tuple(b - a for a, b in sl.slab) for sl in slices)
        self.active = tuple(tuple(e > s for s, e in sl.out) for sl in slices)
        # bytes of unit h's rows a later unit of the slice reads: its own rows if it crops, else its slab's
        self.held = tuple(tuple(u.output_bytes * ((sl.out[h][1] - sl.out[h][0]) if cropped[h] else made[n][h])
                                // lens[h] for h, u in enumerate(units)) for n, sl in enumerate(slices))
        self.made_bytes = tuple(tuple(u.output_bytes * made[n][h] // lens[h] for h, u in enumerate(units))
                                for n in range(len(slices)))
        self.own_bytes = tuple(tuple(u.output_bytes * (made[n][h] + sl.own[h][1] - sl.own[h][0]) // lens[h]
                                     for h, u in enumerate(units)) for n, sl in enumerate(slices))
        self.scratch = tuple(tuple(int(_slab_scratch(model, seg.start + i, _held(model, seg.start + i, sl, i)
                                                     if cropped[i] else self.width[n][i]))
                                   if self.active[n][i] else 0 for i in range(len(units)))
                             for n, sl in enumerate(slices))
        sigs = [_signature(model, seg, maps, sl) for sl in slices]
        seen: set = set()  # the slice loop: the first slice, then later slices of a new signature
        self.loop = tuple(n for n, sig in enumerate(sigs) if not n or (sig not in seen and not seen.add(sig)))
        seen = set()  # the statistics passes: every slice of a new signature
        self.stats_loop = tuple(n for n, sig in enumerate(sigs) if sig not in seen and not seen.add(sig))
        self.made_rows = lambda i, sl: _made_rows(maps, i, sl)
        self.work = tuple(_work(model, seg, slices, units, lens, self.made_rows))


def _made_rows(maps, i: int, sl) -> int:
    """Rows unit ``i`` produces on its slab (the halo included) before it is cropped."""
    a, b = sl.slab[i]
    return maps[i].out_len(b - a) if b > a else 0


def _geometry(model, seg) -> _Geometry:
    """The :class:`_Geometry` of ``seg``, kept with the profile's GPU-independent costs (``costs.Shared``)
    when the model has them, else on the model."""
    owner = getattr(model, "shared", None) or model
    cache = owner.__dict__.setdefault("_rows_geometry", {})
    key = (seg.start, seg.stop, seg.k)
    found = cache.get(key)
    if found is None:
        found = cache[key] = _Geometry(model, seg)
    return found


def rows_memory(model, seg, seg_rules, entry: int) -> tuple[tuple[int, int, int, int, int], tuple, float, tuple]:
    """What of a rows segment's cost does not depend on the GPU: ``(activation, live, transient, peak
    unit, needed)`` and the :func:`recipe` of its seconds ``(terms, link bytes, recompute)``. The
    placement (``seg_rules``, ``entry``) only picks which of the precomputed :class:`_Geometry` bytes add
    up; the sums are of integers, so their order does not change them."""
    g = _geometry(model, seg)
    units, in_lens = g.units, g.in_lens
    size = model.size
    count = len(units)
    kinds = seg_rules.buffers(lambda j, name: False)  # rows never write over an input (halos are read later)
    buffer = [u.output_bytes if kind == "new" else 0 for u, kind in zip(units, kinds, strict=True)]
    held_at = [[h - seg.start for h in seg_rules.held_at(seg.start + i)] for i in range(count)]
    # A unit that stages its input itself (``stage_inside``: the Wan decode's up levels) copies each frame
    # of its slab to the device whether that input is on host or not: the copy is in its profiled scratch.
    staged_at = [[] if getattr(units[i], "stage_inside", False) else [size[v] for v in seg_rules.staged(seg.start + i)]
                 for i in range(count)]
    before = [0]  # buffers of the units before each one
    for nbytes in buffer:
        before.append(before[-1] + nbytes)
    all_buffers = before[-1]
    best = None
    for n in g.loop:
        active, width, scratch, pieces = g.active[n], g.width[n], g.scratch[n], g.held[n]
        for i in range(count):
            if not active[i]:
                continue
            # The executor allocates an escaping output's full buffer at its first write, after the unit's
            # first slice is computed: during that slice only earlier units' buffers are alive.
            live = entry + (all_buffers if n else before[i])
            # a cropping unit holds only the rows its readers need (its slice's own), not its whole slab
            held = sum(pieces[h] for h in held_at[i])
            staged = sum(nbytes * width[i] // max(1, in_lens[i]) for nbytes in staged_at[i]) if staged_at[i] else 0
            transient = held + staged + scratch[i]
            if best is None or live + transient > best[0]:
                best = (live + transient, live, transient, seg.start + i)
            if not n and buffer[i]:  # that first write: the new buffer and the slice's piece, both alive
                live = entry + before[i + 1]
                if live + held + pieces[i] > best[0]:
                    best = (live + held + pieces[i], live, held + pieces[i], seg.start + i)
    # Statistics passes run before the slice loop (no buffers yet): a recomputed input's cone, slice by
    # slice, holding the cone's slabs its later units read, then the input's own rows (and their copy
    # for the grouped moments).
    for i, unit in enumerate(units):
        j = seg.start + i
        cone = [c - seg.start for c in seg_rules.cone(j)] if unit.needs_input_stats and i else []
        if not cone:
            continue
        # the cone's units whose output a later unit of the cone reads, per position in the cone
        read = [[u for u in cone[:n] if any(units[u].name in units[v].inputs for v in cone[n:])]
                for n in range(len(cone))]
        last = cone[-1]
        for m in g.stats_loop:
            active, scratch, made_bytes = g.active[m], g.scratch[m], g.made_bytes[m]
            for n, c in enumerate(cone):
                if not active[c]:
                    continue
                transient = sum(made_bytes[u] for u in read[n]) + scratch[c]
                if entry + transient > best[0]:
                    best = (entry + transient, entry, transient, j)
            transient = g.own_bytes[m][last]
            if entry + transient > best[0]:
                best = (entry + transient, entry, transient, j)
    act, live, transient, peak = best
    terms, link, recompute = recipe(model, seg, seg_rules, g.slices, units, g.lens, g.made_rows, g.work)
    return (act, live, transient, peak, int(act * model.allocator_factor(seg.k))), terms, link, recompute


def _signature(model, seg, maps, sl) -> tuple:
    """What the memory of a slice depends on, per unit of the segment: its output, slab and own rows
    (counts, not positions), and for a unit that crops after every step the rows it holds (clipped at
    the input's ends: positions matter there). Two slices with one signature reach the same states."""
    out = []
    for i, ((s, e), (a, b), (o, p)) in enumerate(zip(sl.out, sl.slab, sl.own, strict=True)):
        j = seg.start + i
        held = maps[i].held_rows(s, e, in_rows(model, j)) if e > s and _cropped(model, j) else 0
        out.append((e - s, b - a, p - o, held))
    return tuple(out)


def _work(model, seg, slices, units, lens, made_rows) -> list[float]:
    """Each unit's work over all slices as a fraction of its unsliced work (the halo's recompute)."""
    maps = _maps(model)
    work = []
    for i, unit in enumerate(units):
        j = seg.start + i
        if getattr(unit, "rows_cropped", False):
            work.append(maps[j].cropped_fraction([sl.out[i] for sl in slices if sl.out[i][1] > sl.out[i][0]],
                                                 in_rows(model, j)))
        else:
            work.append(sum(made_rows(i, sl) for sl in slices) / lens[i])
    return work


def recipe(model, seg, rules, slices, units, lens, made_rows, work=None) -> tuple[tuple, float, tuple[int, ...]]:
    """A rows segment's seconds as GPU-independent terms in the order they add up: ``(unit, work,
    launches)`` for a unit's roofline time scaled by the rows it computes over all slices (the halo's
    recompute) and its launches, ``(bytes,)`` for memory traffic; and the bytes over the host link.
    :func:`replay` prices them on a GPU (the fleet computes this once per profile, see ``costs.Shared``).
    ``work``: :func:`_work`, when already known."""
    link = 0.0
    terms = []
    recompute = []
    size = model.size
    k = len(slices)
    if work is None:
        work = _work(model, seg, slices, units, lens, made_rows)

    def unit_term(i: int) -> tuple:
        return (seg.start + i, work[i], k * units[i].kernels)

    for i, unit in enumerate(units):
        j = seg.start + i
        terms.append(unit_term(i))
        staged = rules.staged(j)
        link += sum(size[v] for v in staged)
        if rules.escapes(j):
            terms.append((2 * unit.output_bytes,))
        if unit.needs_input_stats:
            terms.append((3 * model._input_bytes(unit),))
            cone = rules.cone(j) if j > seg.start else []
            if cone:
                recompute.append(j)
                for c in cone:
                    terms.append(unit_term(c - seg.start))
                    link += sum(size[v] for v in rules.staged(c))
            elif unit.inputs and unit.inputs[0] in staged:
                link += size[unit.inputs[0]]
        if rules.on_host(j):
            link += unit.output_bytes
    return tuple(terms), link, tuple(recompute)


def replay(model, terms: tuple, link: float) -> tuple[float, float]:
    """(seconds, host-link seconds) of a :func:`recipe` at ``model``'s GPU rates: the same floating-point
    operations in the same order as pricing the segment afresh."""
    total = 0.0
    unit_seconds, launch, bandwidth = model.unit_seconds, model.launch_seconds, model.bytes_per_s
    for t in terms:
        if len(t) == 3:
            total += unit_seconds[t[0]] * t[1] + t[2] * launch
        else:
            total += t[0] / bandwidth
    transfer = link / model.link_bytes_per_s
    return total + transfer, transfer
