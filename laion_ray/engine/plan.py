"""Plan: pin a read version and split fragments into bounded work units."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Iterator, Sequence

import lance
import numpy as np
import pyarrow as pa

from laion_ray.udf import UDF

ROWADDR = "_rowaddr"
KEY = "key"  # LAION's row id: error records name rows by it
UNIT = "_unit"
UNIT_ROWS = "_unit_rows"
# The sum of the unit's rows' digests (see row_digests): with UNIT_ROWS it tells
# whether a set of parts holds exactly the unit's rows, whatever their order.
UNIT_DIGEST = "_unit_digest"
ERROR_PREFIX = "_error:"
# Worker seconds spent on a block so far, carried by the block itself so that
# they survive Ray Data's re-batching: the first row holds them, the rest 0.
READ_S = "_read_s"
UDF_S = "_udf_s"
KEEP = "_keep"  # optional: rows computed but with no new value (e.g. unmatched keys)
# A unit bounds a task's memory: about UNIT_BYTES of input, so an image unit
# (rows of ~50 KB) holds ~1k rows and one of two int64 columns 1M rows.
UNIT_BYTES = 64 * 1024**2
MAX_UNIT_ROWS = 1 << 20
BINARY_ROW_BYTES = 64 * 1024  # a LAION JPEG, rounded up
STRING_ROW_BYTES = 64  # a caption or URL


@dataclasses.dataclass(frozen=True)
class WorkUnit:
    """Physical row range ``[start, end)`` of one fragment (deleted rows included)."""

    index: int
    fragment_id: int
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class FragmentState:
    """What must not change under a planned fragment for its checkpoints to stay valid."""

    fragment_id: int
    physical_rows: int
    input_files: tuple[str, ...]


def row_digests(addresses: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row address (splitmix64's finaliser).

    Parts of a unit are told complete when their rows add up to the unit's
    and their digests, summed modulo 2**64, to the unit's: parts that hold
    some row twice and miss another cannot match both but by a 2**-64 chance,
    however the rows were split (a shuffle interleaves them).
    """
    with np.errstate(over="ignore"):
        z = addresses.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def runs(values: np.ndarray) -> list[tuple[int, int]]:
    """``[begin, end)`` of each run of equal consecutive ``values``.

    One comparison pass: ``np.diff`` with a prepended sentinel copies and
    widens the array, 20x slower on a block's unit column.
    """
    if not len(values):
        return []
    starts = np.flatnonzero(values[1:] != values[:-1]) + 1
    return list(itertools.pairwise([0, *starts.tolist(), len(values)]))


def digest_sum(digests: np.ndarray) -> int:
    with np.errstate(over="ignore"):
        return int(np.sum(digests, dtype=np.uint64))


def add_seconds(table: pa.Table, column: str, seconds: float) -> pa.Table:
    """``table`` with ``seconds`` added to its ``column`` (see :data:`READ_S`)."""
    if not table.num_rows:
        return table
    values = np.zeros(table.num_rows, np.float32)
    values[0] = seconds
    if column in table.column_names:
        values += table[column].to_numpy()
        return table.set_column(table.column_names.index(column), column, pa.array(values))
    return table.append_column(column, pa.array(values))


def row_range(start: int, end: int) -> str:
    """Lance SQL for the row addresses ``[start, end)``."""
    return f"{ROWADDR} >= {int(start)} AND {ROWADDR} < {int(end)}"


def error_column_name(producer: str) -> str:
    return f"{ERROR_PREFIX}{producer}"


def error_column(stage: UDF) -> str:
    return error_column_name(stage.name)


def dataset_inputs(stages: Sequence[UDF]) -> list[str]:
    """Columns to read from the dataset: stage inputs not produced earlier in this run."""
    produced: set[str] = set()
    needed: list[str] = []
    for stage in stages:
        for col in stage.inputs:
            if col not in produced and col not in needed:
                needed.append(col)
        produced.update(stage.outputs)
    return needed


def fragment_states(ds: lance.LanceDataset, input_columns: Sequence[str]) -> list[FragmentState]:
    field_ids = {f.name(): f.id() for f in ds.lance_schema.fields()}
    wanted = {field_ids[c] for c in input_columns if c in field_ids}
    states = []
    for frag in ds.get_fragments():
        meta = frag.metadata
        files = tuple(sorted(f.path for f in meta.files if wanted.intersection(f.fields)))
        states.append(FragmentState(meta.id, meta.physical_rows, files))
    return states


class UnitPlan:
    """The work units of a plan, generated on demand from the fragment states.

    Memory is O(fragments) whatever the number of units: a unit is
    ``(fragment, row range)`` and its index is the fragment's first unit index
    plus its position, so nothing per unit is ever listed up front.
    """

    def __init__(self, states: Sequence[FragmentState], unit_rows: int):
        self.states = list(states)
        self.unit_rows = unit_rows
        counts = [-(-s.physical_rows // unit_rows) for s in self.states]
        # first_unit[i] is the index of fragment i's first unit; the last entry the total.
        self.first_unit = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.position = {s.fragment_id: i for i, s in enumerate(self.states)}

    @property
    def total(self) -> int:
        return int(self.first_unit[-1])

    def unit_count(self, fragment_id: int) -> int:
        i = self.position[fragment_id]
        return int(self.first_unit[i + 1] - self.first_unit[i])

    def fragment_of(self, unit_index: int) -> int:
        """Position (in ``states``) of the fragment that holds unit ``unit_index``."""
        return int(np.searchsorted(self.first_unit, unit_index, side="right")) - 1

    def units(self, fragment_id: int) -> Iterator[WorkUnit]:
        i = self.position[fragment_id]
        rows, first = self.states[i].physical_rows, int(self.first_unit[i])
        for k, start in enumerate(range(0, rows, self.unit_rows)):
            yield WorkUnit(first + k, fragment_id, start, min(start + self.unit_rows, rows))

    def all_units(self) -> Iterator[WorkUnit]:
        for state in self.states:
            yield from self.units(state.fragment_id)


def split_units(states: Sequence[FragmentState], unit_rows: int) -> list[WorkUnit]:
    """Every unit as a list: for tests and small tables; the engine uses :class:`UnitPlan`."""
    return list(UnitPlan(states, unit_rows).all_units())


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def reads_binary(input_columns: Sequence[str], schema: pa.Schema) -> bool:
    """Whether the job reads image-like (binary) columns: wide rows."""
    return any(_is_binary(schema.field(c).type) for c in input_columns if c in schema.names)


def _row_bytes(t: pa.DataType) -> int:
    if _is_binary(t):
        return BINARY_ROW_BYTES
    if pa.types.is_fixed_size_list(t):
        return t.list_size * _row_bytes(t.value_type)
    if pa.types.is_struct(t):
        return sum(_row_bytes(f.type) for f in t) or 1
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return 8 * _row_bytes(t.value_type)
    try:
        return max(1, t.bit_width // 8)
    except ValueError:  # strings and other variable-width types
        return STRING_ROW_BYTES


def default_unit_rows(input_columns: Sequence[str], schema: pa.Schema) -> int:
    width = sum(_row_bytes(schema.field(c).type) for c in input_columns if c in schema.names)
    return max(1, min(MAX_UNIT_ROWS, UNIT_BYTES // max(width, 1)))


def job_fingerprint_of(identity: str, **options: object) -> str:
    """Checkpoint key: reused only by the same computation with the same options."""
    payload = json.dumps({"identity": identity, **options}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]
