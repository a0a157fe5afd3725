"""Turn a fragment's finished units into one new column file, aligned to its rows.

Built from the checkpoint's parts by an assemble task at commit time
(:func:`assemble_fragment`), or, when one task computed the whole fragment, by
that task itself from its rows in memory (:func:`write_fragment`): the values
are then written once. The file holds one value per *physical* row (deleted
rows included), which is what Lance's DataReplacement expects. Rows not processed keep their current
value: null for a new column, the old value for an overwritten one, another
writer's value where it wrote one. The file records which data files those
values came from, so the commit can tell whether they are still the newest.
Memory is bounded by one unit, whatever the fragment size.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lance.file import LanceFileReader, LanceFileWriter

from laion_ray.errors import JobFailed, brief
from laion_ray.filters import sql_and
from laion_ray.storage import (
    LANCE_SCANS,
    PinnedVersion,
    cached_dataset,
    filesystem,
    is_local,
    join_uri,
    resolve_storage_options,
)

from . import checkpoint as ckpt
from .checkpoint import read_part
from .commit import ColumnFile, check_unchanged, column_files, delete_data_file, field_ids
from .error_log import ERROR_SCHEMA, part_errors
from .lanes import Group
from .plan import KEY, ROWADDR, UNIT, WorkUnit, digest_sum, row_digests, row_range, runs


class MissingPart(JobFailed):
    """A finished unit's checkpointed outputs are gone: its rows cannot be committed."""


@dataclasses.dataclass
class AssembledFragment:
    fragment_id: int
    file_name: str  # relative to <uri>/data
    errors: pa.Table
    based_on: tuple[str, ...]  # the fragment's data files of these columns that were read

    @property
    def column_file(self) -> ColumnFile:
        return ColumnFile(self.file_name, self.based_on)


def _read_parts(paths: Sequence[str], opts: Mapping[str, str]) -> pa.Table | None:
    if not paths:
        return None
    table = pa.concat_tables([read_part_rows(p, opts) for p in paths])
    addr = table[ROWADDR].to_numpy()
    if np.all(addr[1:] > addr[:-1]):  # the usual case: one part, in row order
        return table
    # One value per row address, in physical order (a unit retried within a run).
    table = table.take(pc.sort_indices(table[ROWADDR]))
    addr = table[ROWADDR].to_numpy()
    return table.filter(pa.array(np.concatenate([[True], addr[1:] != addr[:-1]])))


def read_part_rows(path: str, opts: Mapping[str, str]) -> pa.Table:
    """Every row a part records, with its values: a column-file part's rows are
    found again and their values read from the file it names.

    A column-file part stores only its failed rows; the rows it computed are
    the rows its unit's read selects at the pinned version, less the keys it
    skipped, checked against the part's row count and digest, and their values
    are in the fragment's column file, one value per physical row.
    """
    stored = read_part(path, opts)
    spec = ckpt.column_file_of(stored)
    if spec is None:
        return stored
    rec = ckpt.parse_part_name(path.rsplit("/", 1)[-1])
    fragment_id = int(path.rsplit("/", 2)[-2])
    ds = cached_dataset(spec.uri, pinned=spec.pinned, storage_options=opts)
    base = fragment_id << 32
    key = [KEY] if KEY in stored.column_names else []
    scanner = ds.get_fragment(fragment_id).scanner(
        columns=key,
        filter=sql_and(spec.where, row_range(base + spec.start, base + spec.end)),
        with_row_address=True,
    )
    with LANCE_SCANS.shared():
        rows = scanner.to_table()
    if len(spec.skipped) and key:
        rows = rows.filter(pc.invert(pc.is_in(rows[KEY], pa.array(spec.skipped, pa.int64()))))
    addresses = rows[ROWADDR].to_numpy()
    if len(addresses) != rec["rows"] or digest_sum(row_digests(addresses)) != rec["digest"]:
        raise FileNotFoundError(
            f"{path}: its rows cannot be found again at the pinned version "
            f"({len(addresses)} rows read, {rec['rows']} recorded)"
        )
    offsets = (addresses.astype(np.int64) - base).astype(np.uint64)
    values = (
        LanceFileReader(join_uri(spec.uri, "data", spec.file), storage_options=opts)
        .take_rows(offsets)
        .to_table()
    )
    failed = {int(a): i for i, a in enumerate(stored[ROWADDR].to_numpy())}
    columns = {ROWADDR: rows[ROWADDR], **{k: rows[k] for k in key}}
    for name in stored.column_names:
        if name in columns:
            continue
        if name in values.column_names:
            columns[name] = values[name]
        else:  # an error column: the stored failed rows' messages
            which = [failed.get(int(a)) for a in addresses]
            columns[name] = stored[name].take(pa.array(which, pa.int64()))
    return pa.table(columns).select(stored.column_names).cast(stored.schema)


def _current_values(ds, unit: WorkUnit, schema: pa.Schema, existing: Sequence[str]) -> pa.Table:
    """The unit's stored values: rows this job did not compute keep them.

    Only ``existing`` columns have stored values in this fragment; the others
    are null (a column added but not yet written here).
    """
    rows = unit.end - unit.start
    columns = {f.name: pa.nulls(rows, f.type) for f in schema}
    if existing:
        base = unit.fragment_id << 32
        scanner = ds.get_fragment(unit.fragment_id).scanner(
            columns=existing,
            with_row_address=True,
            filter=row_range(base + unit.start, base + unit.end),
        )
        with LANCE_SCANS.shared():
            stored = scanner.to_table()
        offsets = stored[ROWADDR].to_numpy().astype(np.int64) - base - unit.start
        for name in existing:
            columns[name] = _scatter(columns[name], offsets, stored[name])
    return pa.table(columns, schema=schema)


def _scatter(target: pa.Array | pa.ChunkedArray, offsets: np.ndarray, values) -> pa.Array:
    if len(values) == len(target):  # every row has a value: nothing of target survives
        return pa.chunked_array(values).combine_chunks()
    position = np.arange(len(target), dtype=np.int64) + len(values)
    position[offsets] = np.arange(len(values))
    return pa.concat_arrays(
        [pa.chunked_array(values).combine_chunks(), pa.chunked_array(target).combine_chunks()]
    ).take(pa.array(position))


def build_column_file(
    ds,
    fragment_id: int,
    units: Sequence[tuple[WorkUnit, Callable[[], pa.Table | None]]],
    schema: pa.Schema,
    writer: LanceFileWriter,
) -> tuple[pa.Table, tuple[str, ...]]:
    """Write ``schema``'s columns for every physical row of ``fragment_id`` at ``ds``.

    ``units`` cover the fragment's rows in order, each with a function giving
    its computed rows (or None); every other row keeps its value at ``ds``.
    Returns the failed rows and the fragment's data files those values came
    from. Memory is bounded by one unit.
    """
    fragment = ds.get_fragment(fragment_id)
    existing = [
        f.name
        for f in schema
        if f.name in ds.schema.names and column_files(fragment, field_ids(ds, [f.name]))
    ]
    based_on = column_files(fragment, field_ids(ds, schema.names))
    errors: list[pa.Table] = [ERROR_SCHEMA.empty_table()]
    for unit, computed in sorted(units, key=lambda u: u[0].start):
        part = computed()
        computed_rows = 0 if part is None else part.num_rows
        if computed_rows == unit.end - unit.start:
            # Every physical row computed: no stored value survives (the usual case).
            current = pa.table({f.name: part[f.name] for f in schema}, schema=schema)
        else:
            current = _current_values(ds, unit, schema, existing)
            if computed_rows:
                first = (fragment_id << 32) + unit.start
                offsets = part[ROWADDR].to_numpy().astype(np.int64) - first
                current = pa.table(
                    {f.name: _scatter(current[f.name], offsets, part[f.name]) for f in schema},
                    schema=schema,
                )
        if computed_rows and (failed := part_errors(part)).num_rows:
            errors.append(failed)
        writer.write_batch(current)
    # One chunk: a chunk per unit (thousands in a fragment of tiny units) would
    # travel to the driver, and stay there until the commit, as as many buffers.
    return pa.concat_tables(errors).combine_chunks(), based_on


def assemble_fragment(
    uri: str,
    fragment_id: int,
    units: Sequence[tuple[WorkUnit, Sequence[str]]],
    physical_rows: int,
    schema: pa.Schema,
    storage_options: Mapping[str, str] | None,
    *,
    pinned: PinnedVersion,
    file_name: str,
) -> AssembledFragment:
    """Write ``schema``'s columns for every physical row of ``fragment_id`` from its parts.

    ``units`` must cover the fragment's rows in order, each with its part paths.
    Rows outside the parts keep their values at ``pinned`` (the newest version
    the driver saw: the tasks of one commit share one dataset open per worker
    process). The file is ``<uri>/data/<file_name>``: the driver names it, and
    records the name before any task writes it, so a crash leaves no file it
    does not know of.
    """
    opts = resolve_storage_options(storage_options)
    ds = cached_dataset(uri, pinned=pinned, storage_options=opts)
    check_unchanged(ds, fragment_id, physical_rows)
    writer = LanceFileWriter(join_uri(uri, "data", file_name), schema, storage_options=opts)

    def parts_of(unit: WorkUnit, paths: Sequence[str]) -> Callable[[], pa.Table | None]:
        def load() -> pa.Table | None:
            try:
                return _read_parts(paths, opts)
            except FileNotFoundError as exc:
                writer.close()
                delete_data_file(uri, file_name, opts)
                raise MissingPart(
                    f"fragment {fragment_id}: a checkpoint part of unit {unit.index} (rows "
                    f"{unit.start}-{unit.end}) is missing ({brief(exc)}); nothing of fragment "
                    f"{fragment_id} was committed. Rerun the same command: a unit without its "
                    "parts is recomputed"
                ) from exc

        return load

    errors, based_on = build_column_file(
        ds, fragment_id, [(u, parts_of(u, paths)) for u, paths in units], schema, writer
    )
    writer.close()
    return AssembledFragment(fragment_id, file_name, errors, based_on)


def write_fragment(outputs: pa.Table, group: Group, sink: ckpt.PartSink) -> pa.Table:
    """A whole fragment's outputs, written once: its column file, and its units'
    parts holding only their failed rows (the file holds the values).
    ``outputs`` are its units as the task read them (whole, in order).

    The parts are written first and the file last, under its final name only
    once complete (a rename on local disk; an object store's upload completes at
    close): a part whose file is missing is not a record (the resumed run
    deletes it, see ``run.py``), and a file is never left without its parts.
    Returns the parts' records, as :func:`.checkpoint.write_parts` does.
    """
    started = time.perf_counter()
    fragment_id = group.fragment_id
    opts = resolve_storage_options(sink.storage_options)
    ds = cached_dataset(sink.uri, pinned=sink.pinned, storage_options=opts)
    name = ckpt.column_file_name(sink.run_id, fragment_id)
    final = join_uri(sink.uri, "data", name)
    local = is_local(final)
    target = f"{final}.{uuid.uuid4().hex}.tmp" if local else final
    writer = LanceFileWriter(target, sink.outputs, storage_options=opts)
    units = outputs[UNIT].to_numpy()
    rows_of = {int(units[b]): (b, e) for b, e in runs(units)}

    def computed(unit: WorkUnit) -> Callable[[], pa.Table | None]:
        span = rows_of.get(unit.index)
        return lambda: outputs.slice(span[0], span[1] - span[0]) if span else None

    try:
        _, based_on = build_column_file(
            ds, fragment_id, [(u, computed(u)) for u in group.units], sink.outputs, writer
        )
        specs = {
            u.index: ckpt.ColumnFileSpec(
                name, based_on, sink.uri, sink.pinned, sink.where, u.start, u.end,
                tuple(int(k) for k in group.skipped_in(u)),
            )
            for u in group.units
        }  # fmt: skip
        records = ckpt.write_parts(outputs, sink=sink, column_files=specs, as_read=True)
    except BaseException:
        # No file without its parts: an object store would publish it at close.
        writer.close()
        delete_data_file(sink.uri, target.rsplit("/", 1)[-1], opts)
        raise
    writer.close()
    if local:
        fs, path = filesystem(final, opts)
        fs.move(filesystem(target, opts)[1], path)
    return ckpt.with_write_seconds(records, time.perf_counter() - started)
