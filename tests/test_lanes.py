"""Lanes (engine/lanes.py): every todo unit read once, in a bounded number of read tasks."""

from __future__ import annotations

import numpy as np
import pytest

from laion_ray.engine.error_log import KnownBad
from laion_ray.engine.lanes import build_lanes
from laion_ray.engine.plan import FragmentState, UnitPlan, runs

# Fragments of 25, 3, 100 and 7 units (unit_rows 10), the last unit of each partial.
STATES = [FragmentState(i, rows, ()) for i, rows in enumerate([245, 30, 1000, 61])]


def _lanes(done=None, *, max_lanes=4, units_per_task=8, skip=(), known_bad=None):
    plan = UnitPlan(STATES, 10)
    done = np.zeros(plan.total, bool) if done is None else done
    lanes = build_lanes(
        plan, done, skip=set(skip), known_bad=known_bad or {},
        units_per_task=units_per_task, max_lanes=max_lanes,
    )  # fmt: skip
    return plan, lanes


@pytest.mark.parametrize("max_lanes", [1, 3, 4, 1000])
def test_every_todo_unit_is_read_once_in_at_most_max_lanes(max_lanes):
    plan, lanes = _lanes(max_lanes=max_lanes)
    groups = [g for lane in lanes for g in lane.groups()]
    units = [u for g in groups for u in g.units]
    assert [u.index for u in units] == list(range(plan.total))
    assert units == list(plan.all_units())
    assert len(lanes) <= max_lanes
    if max_lanes < len(groups):  # as many lanes as allowed, to keep every slot busy
        assert len(lanes) == max_lanes
    assert all(len(g.units) <= 8 for g in groups)
    assert all(len({u.fragment_id for u in g.units}) == 1 for g in groups)


def test_lanes_are_balanced_by_rows():
    _, lanes = _lanes(max_lanes=4, units_per_task=1)
    rows = [sum(u.end - u.start for g in lane.groups() for u in g.units) for lane in lanes]
    assert len(lanes) == 4 and max(rows) - min(rows) <= 20, rows


def test_a_range_holding_every_unit_of_its_fragment_is_whole():
    _, lanes = _lanes(max_lanes=2, units_per_task=8)
    whole = sorted(r.fragment_id for lane in lanes for r in lane.ranges if r.whole)
    # Two lanes of ~660 rows: fragment 2 (100 units) is cut between them.
    assert whole == [0, 1, 3]
    _, lanes = _lanes(max_lanes=1, units_per_task=8)
    assert sorted(r.fragment_id for r in lanes[0].ranges if r.whole) == [0, 1, 2, 3]


def test_finished_units_and_committed_fragments_are_left_out():
    plan = UnitPlan(STATES, 10)
    done = np.zeros(plan.total, bool)
    done[[0, 1, 5, 30]] = True  # fragment 0's units 0, 1, 5; fragment 2's unit 2
    plan, lanes = _lanes(done, skip={3})
    read = [u.index for lane in lanes for g in lane.groups() for u in g.units]
    expected = [i for i in range(int(plan.first_unit[3])) if not done[i]]
    assert read == expected
    ranges = [r for lane in lanes for r in lane.ranges]
    assert not any(r.whole for r in ranges if r.fragment_id in (0, 2))  # units finished before
    assert [r.whole for r in ranges if r.fragment_id == 1] == [True]


def test_each_group_gets_only_its_own_known_bad_keys():
    bad = {2: KnownBad(np.array([5, 15, 333, 999]), np.array([105, 115, 433, 1099]))}
    _, lanes = _lanes(known_bad=bad, max_lanes=3, units_per_task=2)
    for lane in lanes:
        for g in lane.groups():
            start, end = g.units[0].start, g.units[-1].end
            expected = [
                k for o, k in zip(bad[2].offsets, bad[2].keys, strict=True) if start <= o < end
            ]
            assert g.skip_keys.tolist() == (expected if g.fragment_id == 2 else [])
            for unit in g.units:
                inside = [
                    k
                    for o, k in zip(bad[2].offsets, bad[2].keys, strict=True)
                    if unit.start <= o < unit.end
                ]
                assert g.skipped_in(unit).tolist() == (inside if g.fragment_id == 2 else [])


@pytest.mark.parametrize(
    "values,expected",
    [
        ([], []),
        ([7], [(0, 1)]),
        ([3, 3, 3], [(0, 3)]),
        ([1, 1, 2, 5, 5, 5, 1], [(0, 2), (2, 3), (3, 6), (6, 7)]),
    ],
)
def test_runs_are_the_spans_of_equal_neighbours(values, expected):
    """A block's units are split into parts by ``runs``: each run one part."""
    assert runs(np.array(values, np.int32)) == expected
