"""Lanes: the todo units of a job cut into a bounded number of read tasks.

Ray Data builds every read task of an execution before it runs any, so a job
whose read tasks were its units (5.7M at LAION-5B) could only run in waves, and
each wave would start a new actor pool. A lane is instead a few ranges of
consecutive todo units (never a list of units), read one group after another
by one task: the number of read tasks is bounded by the cluster's task slots,
not by the table, and the whole job is one execution with one actor pool.

A group is what one read covers: up to ``units_per_task`` adjacent units of
one fragment. A lane's range that covers every unit of its fragment is
*whole*: its task computes the whole fragment and can write the fragment's
column file itself (see :func:`laion_ray.engine.assemble.write_fragment`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np

from .plan import UnitPlan, WorkUnit

# Read tasks per task slot: more lanes balance better at the end of a job, fewer
# cost less to build and schedule; a lane's units run one group at a time.
LANES_PER_SLOT = 4


@dataclasses.dataclass(frozen=True)
class Group:
    """Consecutive units of one fragment, read at once."""

    units: list[WorkUnit]
    skip_keys: np.ndarray  # keys that failed before: the read leaves them out
    skip_offsets: np.ndarray  # their row offsets, ascending
    physical_rows: int

    @property
    def fragment_id(self) -> int:
        return self.units[0].fragment_id

    def skipped_in(self, unit: WorkUnit) -> np.ndarray:
        lo, hi = np.searchsorted(self.skip_offsets, [unit.start, unit.end])
        return self.skip_keys[lo:hi]


@dataclasses.dataclass(frozen=True)
class UnitRange:
    """Todo units ``[begin, end)`` (positions within the fragment) of one fragment."""

    fragment_id: int
    physical_rows: int
    first_unit: int  # global index of the fragment's unit 0
    begin: int
    end: int
    units_in_fragment: int
    # Keys recorded as failed at these units' rows (reads skip them), by row offset.
    bad_offsets: np.ndarray
    bad_keys: np.ndarray

    @property
    def whole(self) -> bool:
        """Every unit of the fragment: one task computes it all and can write
        its column file itself."""
        return self.begin == 0 and self.end == self.units_in_fragment

    def rows(self, unit_rows: int) -> int:
        return min(self.end * unit_rows, self.physical_rows) - self.begin * unit_rows

    def group(self, begin: int, end: int, unit_rows: int) -> Group:
        """Units ``[begin, end)`` of this range, with their known-bad keys."""
        units = [
            WorkUnit(
                self.first_unit + k,
                self.fragment_id,
                k * unit_rows,
                min((k + 1) * unit_rows, self.physical_rows),
            )
            for k in range(begin, end)
        ]
        lo, hi = np.searchsorted(self.bad_offsets, [units[0].start, units[-1].end])
        return Group(units, self.bad_keys[lo:hi], self.bad_offsets[lo:hi], self.physical_rows)


@dataclasses.dataclass(frozen=True)
class Lane:
    """What one task covers: unit ranges, each read group by group."""

    ranges: tuple[UnitRange, ...]
    unit_rows: int
    units_per_task: int

    def groups_of(self, r: UnitRange) -> Iterator[Group]:
        for begin in range(r.begin, r.end, self.units_per_task):
            yield r.group(begin, min(begin + self.units_per_task, r.end), self.unit_rows)

    def groups(self) -> Iterator[Group]:
        for r in self.ranges:
            yield from self.groups_of(r)


def todo_ranges(plan: UnitPlan, done: np.ndarray, skip: set[int]) -> Iterator[tuple[int, int, int]]:
    """``(fragment position, begin, end)`` for each run of todo units, fragment by fragment.

    O(fragments + runs) in memory; ``skip`` holds fragments committed already.
    """
    for i, state in enumerate(plan.states):
        if state.fragment_id in skip:
            continue
        first, last = int(plan.first_unit[i]), int(plan.first_unit[i + 1])
        todo = np.flatnonzero(~done[first:last])
        if not len(todo):
            continue
        breaks = np.flatnonzero(np.diff(todo) != 1) + 1
        for run in np.split(todo, breaks):
            yield i, int(run[0]), int(run[-1]) + 1


def build_lanes(
    plan: UnitPlan,
    done: np.ndarray,
    *,
    skip: set[int],
    known_bad: Mapping[int, object],
    units_per_task: int,
    max_lanes: int,
) -> list[Lane]:
    """Cut the todo units into at most ``max_lanes`` lanes of about equal rows.

    Lanes are cut between groups only, and the last lane takes whatever is
    left; each lane holds its ranges' known-bad keys (O(errors)), nothing per unit.
    """
    unit_rows = plan.unit_rows
    runs = list(todo_ranges(plan, done, skip))
    groups = sum(-(-(end - begin) // units_per_task) for _, begin, end in runs)
    if not groups:
        return []
    lanes_wanted = max(1, min(max_lanes, groups))
    total_rows = sum(_rows(plan, i, b, e) for i, b, e in runs)
    per_lane = total_rows / lanes_wanted
    lanes: list[Lane] = []
    current: list[UnitRange] = []
    filled = 0.0

    def close() -> None:
        nonlocal current, filled
        if current:
            lanes.append(Lane(tuple(current), unit_rows, units_per_task))
        current, filled = [], 0.0

    for i, begin, end in runs:
        while begin < end:
            # Whole groups up to what the lane still takes (at least one group).
            rows_per_group = _rows(plan, i, begin, min(begin + units_per_task, end))
            room = max(1, int(np.ceil((per_lane - filled) / max(rows_per_group, 1))))
            last_lane = len(lanes) == lanes_wanted - 1
            stop = end if last_lane else min(end, begin + room * units_per_task)
            current.append(_range(plan, i, begin, stop, known_bad))
            filled += _rows(plan, i, begin, stop)
            begin = stop
            if filled >= per_lane and len(lanes) < lanes_wanted - 1:
                close()
    close()
    return lanes


def _rows(plan: UnitPlan, i: int, begin: int, end: int) -> int:
    rows = plan.states[i].physical_rows
    return min(end * plan.unit_rows, rows) - begin * plan.unit_rows


def _range(plan: UnitPlan, i: int, begin: int, end: int, known_bad: Mapping) -> UnitRange:
    state = plan.states[i]
    bad = known_bad.get(state.fragment_id)
    start_row, end_row = begin * plan.unit_rows, min(end * plan.unit_rows, state.physical_rows)
    lo, hi = np.searchsorted(bad.offsets, [start_row, end_row]) if bad is not None else (0, 0)
    return UnitRange(
        state.fragment_id,
        state.physical_rows,
        int(plan.first_unit[i]),
        begin,
        end,
        int(plan.first_unit[i + 1] - plan.first_unit[i]),
        # Copies: a lane carries only its own keys to its task.
        np.array(bad.offsets[lo:hi]) if bad is not None else np.empty(0, np.int64),
        np.array(bad.keys[lo:hi]) if bad is not None else np.empty(0, np.int64),
    )
