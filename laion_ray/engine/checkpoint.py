"""The one checkpoint mechanism: unit part files plus a ledger, per job.

Layout under ``<checkpoint root>/jobs/<fingerprint>/``:

- ``job.json``: the plan (pinned read version, fragment states, unit size) and
  the fragments already committed;
- ``parts/<unit>-<uuid>.arrow``: computed outputs of a unit, keyed by row
  address, written by workers as batches finish (Arrow IPC: parts are
  transient, and IPC writes and reads several times faster than a Lance file);
- ``ledger.lance``: one record per part, appended by the driver. A unit is done
  when the parts of one run add up to the unit's row count.

A killed driver loses only parts not yet in the ledger; a rerun with the same
job fingerprint picks the plan up and skips every finished unit.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from laion_ray.storage import filesystem, join_uri, resolve_storage_options

from .plan import ERROR_PREFIX, KEEP, UNIT, UNIT_ROWS, FragmentState

# Part of every job fingerprint: checkpoints written in another format are not reused.
PART_FORMAT = "arrow-ipc-1"
RECORD_SCHEMA = pa.schema(
    [
        ("unit", pa.int32()),
        ("run", pa.string()),
        ("path", pa.string()),
        ("rows", pa.int32()),
        ("errors", pa.int32()),
        ("unit_rows", pa.int32()),
    ]
)


@dataclasses.dataclass
class FinishedUnit:
    unit: int
    paths: list[str]
    rows: int
    errors: int


def write_parts(
    batch: pa.Table,
    *,
    job_uri: str,
    run_id: str,
    columns: Sequence[str],
    storage_options: Mapping[str, str] | None,
) -> pa.Table:
    """Ray Data stage: persist a batch's rows per unit, return ledger records.

    Rows with ``_keep`` false count towards their unit but are not stored, so
    the fragment keeps its current value there.
    """
    if isinstance(batch, pa.RecordBatch):
        batch = pa.Table.from_batches([batch])
    opts = resolve_storage_options(storage_options)
    records = []
    units = batch[UNIT].to_numpy()
    errors = _error_counts(batch)
    keep = (
        batch[KEEP].to_numpy(zero_copy_only=False).astype(bool)
        if KEEP in batch.column_names
        else np.ones(batch.num_rows, dtype=bool)
    )
    # Rows of one unit arrive as one contiguous run; each run becomes one part.
    starts = np.flatnonzero(np.diff(units, prepend=np.int64(-1)))
    for begin, end in zip(starts, [*starts[1:], len(units)], strict=True):
        unit, kept = int(units[begin]), keep[begin:end]
        part = (
            batch.slice(begin, end - begin)
            if kept.all()
            else batch.take(pa.array(np.flatnonzero(kept) + begin))
        ).select(list(columns))
        path = join_uri(job_uri, "parts", f"{unit}-{uuid.uuid4().hex}.arrow")
        _write_part(path, part, opts)
        records.append(
            {
                "unit": unit,
                "run": run_id,
                "path": path,
                "rows": int(end - begin),
                "errors": int(errors[begin:end].sum()),
                "unit_rows": int(batch[UNIT_ROWS][int(begin)].as_py()),
            }
        )
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)


def _write_part(path: str, part: pa.Table, opts: Mapping[str, str]) -> None:
    fs, fs_path = filesystem(path, opts)
    try:
        stream = fs.open_output_stream(fs_path)
    except FileNotFoundError:  # the first part of a job on local disk
        fs.create_dir(fs_path.rsplit("/", 1)[0], recursive=True)
        stream = fs.open_output_stream(fs_path)
    with stream, ipc.new_file(stream, part.schema) as writer:
        writer.write_table(part)


def read_part(path: str, opts: Mapping[str, str]) -> pa.Table:
    fs, fs_path = filesystem(path, opts)
    with fs.open_input_file(fs_path) as f:
        return ipc.open_file(f).read_all()


def _error_counts(batch: pa.Table) -> np.ndarray:
    failed = np.zeros(batch.num_rows, dtype=bool)
    for name in batch.column_names:
        if name.startswith(ERROR_PREFIX):
            failed |= pc.is_valid(batch[name]).to_numpy(zero_copy_only=False)
    return failed.astype(np.int64)


def finished_units(records: pa.Table | Iterable[dict]) -> dict[int, FinishedUnit]:
    """Units whose parts from one run cover every row the unit's read produced."""
    if isinstance(records, pa.Table):
        records = records.to_pylist()
    by_run: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for rec in records:
        by_run[(rec["unit"], rec["run"])].append(rec)
    done: dict[int, FinishedUnit] = {}
    for (unit, _run), recs in by_run.items():
        # Dedupe by path: a retried ledger flush may append a record twice.
        unique = {r["path"]: r for r in recs}.values()
        rows = sum(r["rows"] for r in unique)
        if unit not in done and rows == recs[0]["unit_rows"]:
            done[unit] = FinishedUnit(
                unit, sorted(r["path"] for r in unique), rows, sum(r["errors"] for r in unique)
            )
    return done


class JobCheckpoint:
    """The checkpoint of one job (one fingerprint) in the dataset's store."""

    def __init__(self, root: str, fingerprint: str, storage_options: Mapping[str, str] | None):
        self.uri = join_uri(root, "jobs", fingerprint)
        self.fingerprint = fingerprint
        self.storage_options = dict(storage_options or {})
        self._ledger_uri = join_uri(self.uri, "ledger.lance")
        self._manifest_uri = join_uri(self.uri, "job.json")

    # --- manifest ---------------------------------------------------------
    def load_manifest(self) -> dict | None:
        fs, path = filesystem(self._manifest_uri, self.storage_options)
        try:
            with fs.open_input_stream(path) as f:
                return json.loads(f.read().decode())
        except (FileNotFoundError, OSError):
            return None

    def save_manifest(self, manifest: dict) -> None:
        fs, path = filesystem(self._manifest_uri, self.storage_options)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(json.dumps(manifest, indent=1).encode())
        fs.move(tmp, path)  # atomic on local disk; a single PUT on object stores

    # --- ledger -----------------------------------------------------------
    def records(self) -> pa.Table:
        try:
            ds = lance.dataset(
                self._ledger_uri, storage_options=resolve_storage_options(self.storage_options)
            )
        except (ValueError, OSError):
            return RECORD_SCHEMA.empty_table()
        return ds.to_table()

    def append(self, records: pa.Table) -> None:
        if not records.num_rows:
            return
        opts = resolve_storage_options(self.storage_options)
        try:
            lance.dataset(self._ledger_uri, storage_options=opts)
            mode = "append"
        except (ValueError, OSError):
            mode = "create"
        lance.write_dataset(records, self._ledger_uri, mode=mode, storage_options=opts)

    def remove(self) -> None:
        from laion_ray.storage import remove_tree

        remove_tree(self.uri, self.storage_options)


def states_to_json(states: Sequence[FragmentState]) -> list[dict]:
    return [dataclasses.asdict(s) for s in states]


def states_from_json(items: Sequence[dict]) -> list[FragmentState]:
    return [
        FragmentState(i["fragment_id"], i["physical_rows"], tuple(i["input_files"])) for i in items
    ]
