"""The one checkpoint mechanism: part files whose existence is the record.

Layout under ``<checkpoint root>/jobs/<fingerprint>/``:

- ``job.json``: the plan (pinned read version, row filter, fragment states,
  unit size), written once when the job is planned;
- ``parts/<fragment>/<unit>_<run>_<first>_<rows>_<unit rows>_<errors>_<digest>_<unit digest>.arrow``:
  computed outputs of some rows of a unit, keyed by row address, written by
  workers as batches finish (Arrow IPC: parts are transient, and IPC writes and
  reads several times faster than a Lance file). The name is the record: which
  unit, which run, the part's first row, its rows, the rows the unit's read
  produced, its failed rows, and the digests of its rows and of the unit's
  (:func:`.plan.row_digests`). A unit is finished when distinct parts of one
  run add up to the unit's rows and digest. A task that computed a whole
  fragment writes the fragment's column file itself (``data/lr-<run>-<fragment>.lance``)
  and, per unit, a *column-file part* (``….col.arrow``): the same name, holding
  only the failed rows and, in its schema metadata, what finds the computed
  rows again (:class:`ColumnFileSpec`); the file is then the record of the values;
- ``runs/<run>``: an empty file once a run's canary has seen that its failures
  are bad data (some rows succeed, or they fail in different ways). Parts whose
  every row failed are reused by a later run only if their run has one: a run
  that failed systemically (a broken UDF, fixed before the rerun) must not
  leave its rows recorded as bad;
- ``commits/<commit>.json`` (+ ``.errors.arrow``): the intent of one commit in
  flight, written before its column files (their names) and before the commit
  (its failed rows), deleted once the commit is complete; a rerun settles each
  one, see :mod:`laion_ray.engine.writeback`;
- ``committed/<fragment>_<rows>_<errors>``: an empty file per fragment whose
  columns are committed, the compacted summary that replaces its parts (which
  are then deleted).

Every write is one new file (a part, a summary), so checkpoint writes grow with
finished units, never with the job's history; nothing is rewritten or
appended to. A part is written under a temporary name and renamed on local
disk; on an object store a single PUT is atomic already. Resume lists
``committed/`` and the part folders of uncommitted fragments: time grows with
the finished units still uncommitted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.ipc as ipc

from laion_ray.ray_env import initialized_ray
from laion_ray.storage import (
    PinnedVersion,
    count_io,
    filesystem,
    is_local,
    join_uri,
    remove_tree,
    resolve_storage_options,
    with_retries,
)

from .plan import (
    ERROR_PREFIX,
    KEEP,
    READ_S,
    ROWADDR,
    UDF_S,
    UNIT,
    UNIT_DIGEST,
    UNIT_ROWS,
    FragmentState,
    UnitPlan,
    digest_sum,
    row_digests,
    runs,
)

# Part of every job fingerprint: checkpoints written in another format are not reused.
PART_FORMAT = "arrow-ipc-4"
RECORD_SCHEMA = pa.schema(
    [
        ("unit", pa.int32()),
        ("run", pa.string()),
        ("first", pa.int64()),
        ("rows", pa.int32()),
        ("unit_rows", pa.int32()),
        ("errors", pa.int32()),
        ("digest", pa.uint64()),
        ("unit_digest", pa.uint64()),
        ("column_file", pa.bool_()),  # a column-file part (its values are in the file)
        # Worker seconds behind the block these parts came from (on its first record).
        ("read_s", pa.float32()),
        ("udf_s", pa.float32()),
        ("write_s", pa.float32()),
        ("node", pa.string()),  # the Ray node that wrote them (None outside Ray)
    ]
)
PART_SUFFIX = ".arrow"
FILE_PART_SUFFIX = ".col.arrow"
COLUMN_FILE_METADATA = b"laion_ray.column_file"


@dataclasses.dataclass
class FinishedUnit:
    unit: int
    paths: list[str]
    rows: int
    errors: int


@dataclasses.dataclass(frozen=True)
class PartSink:
    """Where and how a run's tasks write their parts (one per job run, sent to every task).

    Attributes:
        job_uri: The job's checkpoint folder.
        run_id: This run.
        columns: The columns a part stores.
        storage_options: Object-store options.
        uri: The dataset (a whole fragment's column file goes to its ``data/``).
        pinned: The version the job reads.
        where: The job's row filter (Lance SQL) or None.
        outputs: The stored output columns.
    """

    job_uri: str
    run_id: str
    columns: tuple[str, ...]
    storage_options: Mapping[str, str]
    uri: str
    pinned: PinnedVersion
    where: str | None
    outputs: pa.Schema


@dataclasses.dataclass(frozen=True)
class ColumnFileSpec:
    """What a column-file part needs to find its computed rows and their values again.

    Its computed rows are those its unit's read selects (``where`` within rows
    ``[start, end)`` of the fragment at ``pinned``) less the ``skipped`` keys;
    their values are in ``<uri>/data/<file>``, one value per physical row.
    """

    file: str
    based_on: tuple[str, ...]  # the fragment's data files its unchanged values came from
    uri: str
    pinned: PinnedVersion
    where: str | None
    start: int
    end: int
    skipped: tuple[int, ...]

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ColumnFileSpec:
        fields = json.loads(data)
        fields["pinned"] = PinnedVersion(**fields["pinned"])
        fields["based_on"], fields["skipped"] = tuple(fields["based_on"]), tuple(fields["skipped"])
        return cls(**fields)


def column_file_name(run_id: str, fragment_id: int) -> str:
    """The column file a task of ``run_id`` writes for a whole fragment (under ``data/``)."""
    return f"lr-{run_id}-{fragment_id}.lance"


def column_file_of(part: pa.Table) -> ColumnFileSpec | None:
    """The spec a column-file part carries; None for a part holding its values."""
    raw = (part.schema.metadata or {}).get(COLUMN_FILE_METADATA)
    return ColumnFileSpec.from_json(raw) if raw else None


def part_name(rec: Mapping[str, object]) -> str:
    suffix = FILE_PART_SUFFIX if rec.get("column_file") else PART_SUFFIX
    return (
        f"{rec['unit']}_{rec['run']}_{rec['first']}_{rec['rows']}_{rec['unit_rows']}_"
        f"{rec['errors']}_{rec['digest']:016x}_{rec['unit_digest']:016x}{suffix}"
    )


def parse_part_name(name: str) -> dict | None:
    """The record a part's file name carries; None for anything else (a temp file)."""
    column_file = name.endswith(FILE_PART_SUFFIX)
    if not name.endswith(PART_SUFFIX):
        return None
    fields = name[: -len(FILE_PART_SUFFIX if column_file else PART_SUFFIX)].split("_")
    if len(fields) != 8:
        return None
    unit, run, first, rows, unit_rows, errors, digest, unit_digest = fields
    return {
        "unit": int(unit),
        "run": run,
        "first": int(first),
        "rows": int(rows),
        "digest": int(digest, 16),
        "unit_digest": int(unit_digest, 16),
        "unit_rows": int(unit_rows),
        "errors": int(errors),
        "column_file": column_file,
    }


def write_parts(
    batch: pa.Table,
    *,
    sink: PartSink,
    column_files: Mapping[int, ColumnFileSpec] | None = None,
    as_read: bool = False,
) -> pa.Table:
    """Ray Data stage: persist a batch's rows per unit, return their records.

    Rows with ``_keep`` false count towards their unit but are not stored, so
    the fragment keeps its current value there. With ``column_files`` (a spec
    per unit) the values are in a column file already: each part stores only
    its failed rows and the spec that finds the rest again. ``as_read``: the
    batch's units are whole, as their read produced them (a lane task's own
    read, never re-batched), so a part's digest is its unit's.
    """
    started = time.perf_counter()
    if isinstance(batch, pa.RecordBatch):
        batch = pa.Table.from_batches([batch])
    if not batch.num_rows:
        return RECORD_SCHEMA.empty_table()
    opts = resolve_storage_options(sink.storage_options)
    records = []
    units_of_rows = batch[UNIT].to_numpy()
    # A unit's figures repeat on each of its rows: read the first only, uncopied.
    addresses, unit_rows, unit_digests = batch[ROWADDR], batch[UNIT_ROWS], batch[UNIT_DIGEST]
    errors = _error_counts(batch)
    keep = (
        batch[KEEP].to_numpy(zero_copy_only=False).astype(bool)
        if KEEP in batch.column_names
        else np.ones(batch.num_rows, dtype=bool)
    )
    if column_files is not None:
        keep = errors.astype(bool)  # the file holds the others' values
    # Rows of one unit arrive as one contiguous run; each run becomes one part.
    for begin, end in runs(units_of_rows):
        kept = keep[begin:end]
        if kept.all():
            part = batch.slice(begin, end - begin)
        elif kept.any():
            part = batch.take(pa.array(np.flatnonzero(kept) + begin))
        else:
            part = batch.slice(0, 0)
        part = part.select(list(sink.columns))
        address = addresses[begin].as_py()
        unit = int(units_of_rows[begin])
        if column_files is not None:
            spec = column_files[unit].to_json()
            part = part.replace_schema_metadata({COLUMN_FILE_METADATA: spec})
        rec = {
            "unit": unit,
            "run": sink.run_id,
            "first": address & 0xFFFFFFFF,
            "rows": int(end - begin),
            "unit_rows": unit_rows[begin].as_py(),
            "errors": int(errors[begin:end].sum()),
            "digest": unit_digests[begin].as_py()
            if as_read
            else digest_sum(row_digests(addresses.slice(begin, end - begin).to_numpy())),
            "unit_digest": unit_digests[begin].as_py(),
            "column_file": column_files is not None,
        }
        _write_part(join_uri(sink.job_uri, "parts", str(address >> 32), part_name(rec)), part, opts)
        records.append(rec)
    records[0].update(
        read_s=_seconds(batch, READ_S),
        udf_s=_seconds(batch, UDF_S),
        write_s=time.perf_counter() - started,
        node=_ray_node(),
    )
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)


def with_write_seconds(records: pa.Table, seconds: float) -> pa.Table:
    """``records`` whose block took ``seconds`` to write (a column file and its parts)."""
    values = records["write_s"].to_pylist()
    values[0] = seconds
    return records.set_column(
        records.schema.get_field_index("write_s"),
        RECORD_SCHEMA.field("write_s"),
        pa.array(values, pa.float32()),
    )


def _ray_node() -> str | None:
    """The Ray node this process runs on, if it is a Ray worker (never imports Ray)."""
    ray = initialized_ray()
    return None if ray is None else ray.get_runtime_context().get_node_id()


def _seconds(batch: pa.Table, column: str) -> float:
    """Worker seconds a block carries (see :func:`.plan.add_seconds`)."""
    return float(pc.sum(batch[column]).as_py() or 0) if column in batch.column_names else 0.0


def _write_part(path: str, part: pa.Table, opts: Mapping[str, str]) -> None:
    fs, fs_path = filesystem(path, opts)
    # On local disk a crash mid-write must not leave a part under its final
    # name (its name is its record): write a temp file and rename it.
    target = f"{fs_path}.{uuid.uuid4().hex}.tmp" if is_local(path) else fs_path

    def write() -> int:
        try:
            stream = fs.open_output_stream(target)
        except FileNotFoundError:  # the first part of a fragment on local disk
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            stream = fs.open_output_stream(target)
        with stream:
            with ipc.new_file(stream, part.schema) as writer:
                writer.write_table(part)
            size = stream.tell()
        if target != fs_path:
            fs.move(target, fs_path)
        return size

    count_io("checkpoint_bytes", with_retries("write", path, write))
    count_io("checkpoint_writes")


def read_part(path: str, opts: Mapping[str, str]) -> pa.Table:
    fs, fs_path = filesystem(path, opts)

    def read() -> pa.Table:
        with fs.open_input_file(fs_path) as f:
            return ipc.open_file(f).read_all()

    return with_retries("read", path, read)


def _error_counts(batch: pa.Table) -> np.ndarray:
    failed = np.zeros(batch.num_rows, dtype=bool)
    for name in batch.column_names:
        if name.startswith(ERROR_PREFIX) and batch[name].null_count < batch.num_rows:
            failed |= pc.is_valid(batch[name]).to_numpy(zero_copy_only=False)
    return failed.astype(np.int64)


class UnitTally:
    """Adds up part records per (unit, run) until they cover the unit's rows.

    Only units with parts but not yet finished are held, so in a run this is
    bounded by the units in flight. Parts are told apart by (first row, rows,
    digest): a retried task that rewrites the same part is counted once. A
    unit is finished only when its parts' rows *and* digests add up to the
    unit's: parts of one run split differently (a block recomputed with other
    batch boundaries) could otherwise add up to the unit's row count while
    holding some rows twice and others not at all.
    """

    def __init__(self) -> None:
        self._open: dict[tuple[int, str], dict[tuple[int, int, int], tuple[int, str | None]]] = {}

    def add(self, rec: Mapping, path: str | None = None) -> FinishedUnit | None:
        """Count one part; return the unit once its parts of this run cover it."""
        key = (rec["unit"], rec["run"])
        parts = self._open.setdefault(key, {})
        parts[(rec["first"], rec["rows"], rec["digest"])] = (rec["errors"], path)
        if sum(rows for _, rows, _ in parts) != rec["unit_rows"]:
            return None
        if sum(digest for _, _, digest in parts) % 2**64 != rec["unit_digest"]:
            return None
        del self._open[key]
        paths = sorted(p for _, p in parts.values() if p is not None)
        return FinishedUnit(rec["unit"], paths, rec["unit_rows"], sum(e for e, _ in parts.values()))

    def forget(self, unit: int) -> None:
        """Drop what is held for a unit finished by another run."""
        for key in [k for k in self._open if k[0] == unit]:
            del self._open[key]


class UnitLedger:
    """The driver's view of finished units: one byte per unit plus counts per fragment.

    At LAION-5B's ~5.7M units that is ~6 MB, against ~8 KB per unit for a
    record kept in memory.
    """

    def __init__(self, plan: UnitPlan):
        self.plan = plan
        self.done = np.zeros(plan.total, dtype=bool)
        self.left = np.diff(plan.first_unit)  # units not finished, per fragment
        self.rows = np.zeros(len(plan.states), dtype=np.int64)
        self.errors = np.zeros(len(plan.states), dtype=np.int64)

    def add(self, unit: int, rows: int, errors: int) -> bool:
        """Mark ``unit`` finished; False if it already was."""
        if self.done[unit]:
            return False
        i = self.plan.fragment_of(unit)
        self.done[unit] = True
        self.left[i] -= 1
        self.rows[i] += rows
        self.errors[i] += errors
        return True

    def add_fragment(self, fragment_id: int, rows: int, errors: int) -> None:
        """Mark a whole (committed) fragment finished with its summary counts."""
        i = self.plan.position[fragment_id]
        self.done[self.plan.first_unit[i] : self.plan.first_unit[i + 1]] = True
        self.left[i] = 0
        self.rows[i], self.errors[i] = rows, errors

    def finished(self, fragment_id: int) -> bool:
        return self.left[self.plan.position[fragment_id]] == 0

    def counts(self, fragment_id: int) -> tuple[int, int]:
        i = self.plan.position[fragment_id]
        return int(self.rows[i]), int(self.errors[i])

    @property
    def units_done(self) -> int:
        return int(self.done.sum())


def finished_units(listing: Iterable[tuple[str, dict]]) -> dict[int, FinishedUnit]:
    """Finished units among ``(path, record)`` parts; the first run to cover a unit wins."""
    tally, done = UnitTally(), {}
    for path, rec in sorted(listing, key=lambda item: item[0]):
        if rec["unit"] in done:
            continue
        if (unit := tally.add(rec, path)) is not None:
            done[unit.unit] = unit
            tally.forget(unit.unit)
    return done


class JobCheckpoint:
    """The checkpoint of one job (one fingerprint) in the dataset's store."""

    def __init__(self, root: str, fingerprint: str, storage_options: Mapping[str, str] | None):
        self.uri = join_uri(root, "jobs", fingerprint)
        self.fingerprint = fingerprint
        self.storage_options = dict(storage_options or {})
        self._manifest_uri = join_uri(self.uri, "job.json")
        self._parts_uri = join_uri(self.uri, "parts")
        self._committed_uri = join_uri(self.uri, "committed")
        self._commits_uri = join_uri(self.uri, "commits")
        self._runs_uri = join_uri(self.uri, "runs")

    # --- plan -------------------------------------------------------------
    def load_manifest(self) -> dict | None:
        """The plan, or None when there is none: only a true "not found" is absence."""
        return self._read_json(self._manifest_uri)

    def save_manifest(self, manifest: dict) -> None:
        """Write the plan; once per job."""
        self._write_json(self._manifest_uri, manifest)

    def _read_json(self, uri: str) -> dict | None:
        fs, path = filesystem(uri, self.storage_options)
        info = with_retries("read", uri, lambda: fs.get_file_info(path))
        if info.type == pafs.FileType.NotFound:
            return None

        def read() -> bytes:
            with fs.open_input_stream(path) as f:
                return f.read()

        return json.loads(with_retries("read", uri, read).decode())

    def _write_json(self, uri: str, obj: dict) -> None:
        """Replace a small JSON file whole: readers see the old or the new one."""
        fs, path = filesystem(uri, self.storage_options)
        data = json.dumps(obj).encode()
        local = is_local(uri)

        def write() -> None:
            if local:
                fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp" if local else path
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            if tmp != path:
                fs.move(tmp, path)  # atomic on local disk; one PUT is atomic on object stores

        with_retries("write", uri, write)
        count_io("checkpoint_bytes", len(data))
        count_io("checkpoint_writes")

    def _touch(self, uri: str) -> None:
        fs, path = filesystem(uri, self.storage_options)

        def write() -> None:
            try:
                stream = fs.open_output_stream(path)
            except FileNotFoundError:  # the first file of its folder on local disk
                fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
                stream = fs.open_output_stream(path)
            stream.close()

        with_retries("write", uri, write)
        count_io("checkpoint_writes")

    def _delete(self, uri: str) -> None:
        fs, path = filesystem(uri, self.storage_options)

        def delete() -> None:
            with contextlib.suppress(FileNotFoundError):
                fs.delete_file(path)

        with_retries("write", uri, delete)

    # --- listing ----------------------------------------------------------
    def _list(self, uri: str) -> list[pafs.FileInfo]:
        fs, path = filesystem(uri, self.storage_options)
        selector = pafs.FileSelector(path, allow_not_found=True)
        infos = with_retries("list", uri, lambda: fs.get_file_info(selector))
        count_io("checkpoint_lists")
        return infos

    def fragments_with_parts(self) -> list[int]:
        return sorted(
            int(i.base_name)
            for i in self._list(self._parts_uri)
            if i.type == pafs.FileType.Directory and i.base_name.isdigit()
        )

    def fragment_parts(self, fragment_id: int) -> list[tuple[str, dict]]:
        """``(path, record)`` of every part of one fragment."""
        parts_uri = join_uri(self._parts_uri, str(fragment_id))
        found = []
        for info in self._list(parts_uri):
            if (rec := parse_part_name(info.base_name)) is not None:
                found.append((join_uri(parts_uri, info.base_name), rec))
        return found

    def part_path(self, fragment_id: int, rec: Mapping[str, object]) -> str:
        return join_uri(self._parts_uri, str(fragment_id), part_name(rec))

    def delete_part(self, path: str) -> None:
        """Drop one part: its unit is then not finished for any later run."""
        self._delete(path)

    # --- runs whose failed rows are bad data ------------------------------------
    def vouch(self, run_id: str) -> None:
        """Record that ``run_id``'s failed rows are bad data, not a broken stage."""
        self._touch(join_uri(self._runs_uri, run_id))

    def revoke(self, run_id: str) -> None:
        """Undo :meth:`vouch`: the run stopped systemically after all."""
        self._delete(join_uri(self._runs_uri, run_id))

    def vouched(self) -> set[str]:
        return {i.base_name for i in self._list(self._runs_uri) if i.type == pafs.FileType.File}

    # --- commits in flight --------------------------------------------------------
    def write_intent(self, commit_id: str, intent: dict) -> None:
        """Record what commit ``commit_id`` will write, before it writes anything."""
        self._write_json(join_uri(self._commits_uri, f"{commit_id}.json"), intent)

    def intents(self) -> list[tuple[str, dict]]:
        """``(commit id, intent)`` of every commit that did not complete, oldest first."""
        found = []
        for info in sorted(self._list(self._commits_uri), key=lambda i: i.base_name):
            if info.base_name.endswith(".json"):
                commit_id = info.base_name[: -len(".json")]
                intent = self._read_json(join_uri(self._commits_uri, info.base_name))
                if intent is not None:
                    found.append((commit_id, intent))
        return found

    def save_errors(self, commit_id: str, errors: pa.Table) -> None:
        """Keep a commit's failed rows until they are in the errors table."""
        path = join_uri(self._commits_uri, f"{commit_id}.errors.arrow")
        _write_part(path, errors, resolve_storage_options(self.storage_options))

    def load_errors(self, commit_id: str) -> pa.Table | None:
        """The failed rows :meth:`save_errors` kept, or None if none were saved."""
        try:
            return read_part(
                join_uri(self._commits_uri, f"{commit_id}.errors.arrow"),
                resolve_storage_options(self.storage_options),
            )
        except FileNotFoundError:
            return None

    def close_intent(self, commit_id: str) -> None:
        """The commit is complete: forget its intent (errors first, the intent last)."""
        self._delete(join_uri(self._commits_uri, f"{commit_id}.errors.arrow"))
        self._delete(join_uri(self._commits_uri, f"{commit_id}.json"))

    def finished_units(self) -> dict[int, FinishedUnit]:
        """Finished units of the fragments not yet committed."""
        committed = self.committed()
        done: dict[int, FinishedUnit] = {}
        for fragment_id in self.fragments_with_parts():
            if fragment_id not in committed:
                done.update(finished_units(self.fragment_parts(fragment_id)))
        return done

    # --- committed fragments ------------------------------------------------
    def committed(self) -> dict[int, tuple[int, int]]:
        """Committed fragments with their (rows, errors) summaries."""
        summaries = {}
        for info in self._list(self._committed_uri):
            fields = info.base_name.split("_")
            if len(fields) == 3 and all(f.isdigit() for f in fields):
                summaries[int(fields[0])] = (int(fields[1]), int(fields[2]))
        return summaries

    def mark_committed(self, fragments: Mapping[int, tuple[int, int]]) -> None:
        """Record committed fragments (``id -> (rows, errors)``)."""
        for fragment_id, (rows, errors) in fragments.items():
            self._touch(join_uri(self._committed_uri, f"{fragment_id}_{rows}_{errors}"))

    def drop_parts(self, fragments: Iterable[int]) -> None:
        """Delete the parts of committed fragments: their summaries replace them."""
        for fragment_id in fragments:
            remove_tree(join_uri(self._parts_uri, str(fragment_id)), self.storage_options)

    def remove(self) -> None:
        remove_tree(self.uri, self.storage_options)


def states_to_json(states: Sequence[FragmentState]) -> list[dict]:
    return [dataclasses.asdict(s) for s in states]


def states_from_json(items: Sequence[dict]) -> list[FragmentState]:
    return [
        FragmentState(i["fragment_id"], i["physical_rows"], tuple(i["input_files"])) for i in items
    ]
