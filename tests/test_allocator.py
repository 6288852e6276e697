"""The caching-allocator replay: its rules on small handmade sequences. No torch."""

from __future__ import annotations

from vramplan.planner.allocator import LARGE_BUFFER, MIB, SMALL_BUFFER, replay


def test_small_tensors_share_one_2mib_segment():
    events = [(1000, i) for i in range(100)]  # 100 x 1024 B (rounded) in one 2 MiB segment
    result = replay(events)
    assert result.allocated_peak == 100 * 1024
    assert result.needed_peak == SMALL_BUFFER


def test_mid_size_tensors_share_a_20mib_segment():
    result = replay([(3 * MIB, 1), (3 * MIB, 2), (3 * MIB, 3)])
    assert result.needed_peak == LARGE_BUFFER


def test_freed_large_block_is_reused_without_growth():
    events = [(100 * MIB, 1), (-100 * MIB, 1), (100 * MIB, 2)]
    assert replay(events).needed_peak == 100 * MIB


def test_fragmentation_forces_a_new_segment():
    # A 100 MiB block is freed, split for a 60 MiB tensor; the next 100 MiB tensor cannot fit.
    events = [(100 * MIB, 1), (-100 * MIB, 1), (60 * MIB, 2), (100 * MIB, 3)]
    result = replay(events)
    assert result.allocated_peak == 160 * MIB
    assert result.needed_peak == 200 * MIB
    # Expandable segments grow the one segment instead: pages actually used.
    assert replay(events, expandable_segments=True).needed_peak == 160 * MIB


def test_freeing_everything_releases_segments():
    events = [(50 * MIB, 1), (50 * MIB, 2), (-50 * MIB, 1), (-50 * MIB, 2), (30 * MIB, 3)]
    result = replay(events)
    assert result.needed_peak == 100 * MIB
