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


def rows_memory(model, seg, seg_rules, entry: int) -> tuple[tuple[int, int, int, int, int], tuple, float, tuple]:
    """What of a rows segment's cost does not depend on the GPU: ``(activation, live, transient, peak
    unit, needed)`` and the :func:`recipe` of its seconds ``(terms, link bytes, recompute)``."""
    units = model.units[seg.start : seg.stop + 1]
    maps = _maps(model)[seg.start : seg.stop + 1]
    pos = {u.name: i for i, u in enumerate(units)}
    first = [pos.get(u.inputs[0]) for u in units]
    in_lens = [in_rows(model, seg.start + i) for i in range(len(units))]
    readers = [[r for r in range(i + 1, len(units)) if u.name in units[r].inputs] for i, u in enumerate(units)]
    slices = plan_segment(maps, readers, first, in_lens, seg.k)
    size = model.size
    lens = [u.output_shape[-2] or 1 for u in units]
    kinds = seg_rules.buffers(lambda j, name: False)  # rows never write over an input (halos are read later)
    buffer = [u.output_bytes if kind == "new" else 0 for u, kind in zip(units, kinds, strict=True)]

    def made_rows(i: int, sl) -> int:
        """Rows unit ``i`` produces on its slab (the halo included) before it is cropped."""
        a, b = sl.slab[i]
        return maps[i].out_len(b - a) if b > a else 0

    sigs = [_signature(model, seg, maps, sl) for sl in slices]
    held_at = [[h - seg.start for h in seg_rules.held_at(seg.start + i)] for i in range(len(units))]
    # A unit that stages its input itself (``stage_inside``: the Wan decode's up levels) copies each frame
    # of its slab to the device whether that input is on host or not: the copy is in its profiled scratch.
    staged_at = [[] if getattr(units[i], "stage_inside", False) else [size[v] for v in seg_rules.staged(seg.start + i)]
                 for i in range(len(units))]
    cropped = [_cropped(model, seg.start + i) for i in range(len(units))]
    best = None
    seen = set()
    for n, sl in enumerate(slices):
        if n:  # a later slice with the rows of an earlier later one (most interior slices): the same states
            if sigs[n] in seen:
                continue
            seen.add(sigs[n])
        for i in range(len(units)):
            j = seg.start + i
            if sl.out[i][1] <= sl.out[i][0]:
                continue
            # The executor allocates an escaping output's full buffer at its first write, after the unit's
            # first slice is computed: during that slice only earlier units' buffers are alive.
            live = entry + (sum(buffer) if n else sum(buffer[:i]))
            # a cropping unit holds only the rows its readers need (its slice's own), not its whole slab
            held = sum(units[h].output_bytes * ((sl.out[h][1] - sl.out[h][0]) if cropped[h] else made_rows(h, sl))
                       // lens[h] for h in held_at[i])
            a, b = sl.slab[i]
            staged = sum(nbytes * (b - a) // max(1, in_lens[i]) for nbytes in staged_at[i])
            scratch = int(_slab_scratch(model, j, _held(model, j, sl, i) if cropped[i] else b - a))
            transient = held + staged + scratch
            if best is None or live + transient > best[0]:
                best = (live + transient, live, transient, j)
            if not n and buffer[i]:  # that first write: the new buffer and the slice's piece, both alive
                s, e = sl.out[i]
                piece = units[i].output_bytes * ((e - s) if _cropped(model, j) else made_rows(i, sl)) // lens[i]
                live = entry + sum(buffer[: i + 1])
                if live + held + piece > best[0]:
                    best = (live + held + piece, live, held + piece, j)
    # Statistics passes run before the slice loop (no buffers yet): a recomputed input's cone, slice by
    # slice, holding the cone's slabs its later units read, then the input's own rows (and their copy
    # for the grouped moments).
    for i, unit in enumerate(units):
        j = seg.start + i
        cone = [c - seg.start for c in seg_rules.cone(j)] if unit.needs_input_stats and i else []
        seen = set()
        for m, sl in enumerate(slices if cone else ()):
            if sigs[m] in seen:  # the rows of an earlier slice: the same states
                continue
            seen.add(sigs[m])
            for n, c in enumerate(cone):
                if sl.out[c][1] <= sl.out[c][0]:
                    continue
                held = sum(units[u].output_bytes * made_rows(u, sl) // lens[u] for u in cone[:n]
                           if any(units[u].name in units[v].inputs for v in cone[n:]))
                a, b = sl.slab[c]
                rows = _held(model, seg.start + c, sl, c) if _cropped(model, seg.start + c) else b - a
                transient = held + int(_slab_scratch(model, seg.start + c, rows))
                if entry + transient > best[0]:
                    best = (entry + transient, entry, transient, j)
            last = cone[-1]
            own = sl.own[last][1] - sl.own[last][0]
            transient = units[last].output_bytes * (made_rows(last, sl) + own) // lens[last]
            if entry + transient > best[0]:
                best = (entry + transient, entry, transient, j)
    act, live, transient, peak = best
    terms, link, recompute = recipe(model, seg, seg_rules, slices, units, lens, made_rows)
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


def recipe(model, seg, rules, slices, units, lens, made_rows) -> tuple[tuple, float, tuple[int, ...]]:
    """A rows segment's seconds as GPU-independent terms in the order they add up: ``(unit, work,
    launches)`` for a unit's roofline time scaled by the rows it computes over all slices (the halo's
    recompute) and its launches, ``(bytes,)`` for memory traffic; and the bytes over the host link.
    :func:`replay` prices them on a GPU (the fleet computes this once per profile, see ``costs.Shared``)."""
    link = 0.0
    terms = []
    recompute = []
    size = model.size
    k = len(slices)
    maps = _maps(model)
    work = []  # each unit's work over all slices as a fraction of its unsliced work (the halo's recompute)
    for i, unit in enumerate(units):
        j = seg.start + i
        if getattr(unit, "rows_cropped", False):
            work.append(maps[j].cropped_fraction([sl.out[i] for sl in slices if sl.out[i][1] > sl.out[i][0]],
                                                 in_rows(model, j)))
        else:
            work.append(sum(made_rows(i, sl) for sl in slices) / lens[i])

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
