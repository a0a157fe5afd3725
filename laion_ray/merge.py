"""``merge``: attach or update columns from an external table, joined on a key.

The source (Parquet, CSV, JSONL or Lance; local, object store or several files)
is validated first (duplicate keys, key and column types, source keys absent
from the dataset) and only then joined onto the dataset's rows by the engine
(``laion_ray.engine.run``): the same plan, checkpoints, commit path, history
and tags as a backfill. Existing data files are never rewritten; each fragment
gains one new column file.

Two join strategies, chosen by the source's size (``broadcast_max_bytes``):

- *broadcast*: one worker task loads the source, sorts it by key and keeps it
  in the object store; each unit batch looks its keys up (vectorised binary
  search, or ``pc.index_in`` for string keys). Nothing reaches the driver.
- *shuffle*: the unit stream and the source are hash-partitioned on the key
  by Ray Data (``groupby(bucket).map_groups``) and joined per bucket, so the
  source never has to fit on one node. (Ray Data's ``Dataset.join`` needs
  polars, which is not a dependency here; the bucket join is the same hash
  join built from primitives the project already has.)

Re-merging the same source without ``overwrite`` is an incremental fill: the
columns carry ``laion_ray.udf = merge:<source>`` metadata, so the engine reads
only rows whose merged columns are still null (appended rows, or keys the
source has gained) and fills those. Use ``overwrite`` to refresh values.

Examples:
    >>> merge("laion.lance", source="labels.parquet", on="key")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laion_ray.engine.commit import UDF_METADATA
from laion_ray.engine.plan import KEEP, ROWADDR, UNIT, UNIT_ROWS
from laion_ray.engine.run import COMMIT_EVERY_S, Job, JobReport, run_job
from laion_ray.engine.stages import MAX_RETRIES
from laion_ray.errors import LaionRayError, brief
from laion_ray.storage import filesystem, is_local, open_dataset, resolve_storage_options
from laion_ray.udf import TASK_CPUS

log = logging.getLogger(__name__)

__all__ = ["BROADCAST_MAX_BYTES", "MergeReport", "SourceTable", "merge", "open_source"]

FORMATS = ("parquet", "csv", "json", "lance")
_EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".lance": "lance",
}
# A source up to this size (bytes on disk) is broadcast; above it, shuffled.
BROADCAST_MAX_BYTES = 512 * 1024**2
SIDE = "_side"
BUCKET = "_bucket"
_RESERVED = (ROWADDR, UNIT, UNIT_ROWS, KEEP, SIDE, BUCKET)
EXAMPLES = 5


# --- the source ---------------------------------------------------------------


@dataclasses.dataclass
class SourceTable:
    """A label table: where it is, its format, schema and content identity.

    Only this small description travels to tasks; each task opens the files itself.
    """

    display: str
    format: str
    paths: list[str]
    schema: pa.Schema
    identity: str
    size_bytes: int
    storage_options: dict[str, str]
    lance_version: int | None = None

    def _fs(self):
        return filesystem(self.paths[0], self.storage_options)[0]

    def arrow_dataset(self):
        """A ``pyarrow.dataset`` over the files (not for Lance sources)."""
        import pyarrow.dataset as pads

        fs = self._fs()
        paths = [filesystem(p, self.storage_options)[1] for p in self.paths]
        fmt = pads.JsonFileFormat() if self.format == "json" else self.format
        return pads.dataset(paths, format=fmt, filesystem=fs)

    def read(self, columns: Sequence[str]) -> pa.Table:
        """Read ``columns`` of the whole source (used only below the broadcast limit)."""
        if self.format == "lance":
            import lance

            ds = lance.dataset(
                self.paths[0],
                version=self.lance_version,
                storage_options=resolve_storage_options(self.storage_options),
            )
            return ds.to_table(columns=list(columns))
        return self.arrow_dataset().to_table(columns=list(columns))

    def ray_dataset(self, columns: Sequence[str]):
        """The source as a Ray Dataset, read in parallel (files or fragments)."""
        import ray

        if self.format == "lance":
            return ray.data.read_lance(
                self.paths[0],
                columns=list(columns),
                version=self.lance_version,
                storage_options=resolve_storage_options(self.storage_options) or None,
            )
        fs = self._fs()
        paths = [filesystem(p, self.storage_options)[1] for p in self.paths]
        if self.format == "parquet":
            return ray.data.read_parquet(paths, filesystem=fs, columns=list(columns))
        if self.format == "csv":
            import pyarrow.csv as pacsv

            return ray.data.read_csv(
                paths,
                filesystem=fs,
                convert_options=pacsv.ConvertOptions(
                    include_columns=list(columns), column_types=self.schema
                ),
            )
        return ray.data.read_json(paths, filesystem=fs, lines=True).select_columns(list(columns))


def _format_of(path: str, fmt: str | None) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise LaionRayError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        return fmt
    ext = os.path.splitext(path.rstrip("/"))[1].lower()
    if ext not in _EXTENSIONS:
        raise LaionRayError(
            f"cannot tell the format of source {path!r} from its extension; "
            f"pass --format ({', '.join(FORMATS)})"
        )
    return _EXTENSIONS[ext]


def _expand(uri: str, options: Mapping[str, str]) -> list[tuple[str, int, str]]:
    """Files behind ``uri`` (a file, a directory or a local glob) with size and mtime."""
    import pyarrow.fs as pafs

    if is_local(uri) and any(c in uri for c in "*?["):
        matches = sorted(glob.glob(uri.removeprefix("file://")))
        if not matches:
            raise LaionRayError(f"source pattern {uri!r} matches no files")
        return [f for m in matches for f in _expand(m, options)]
    fs, path = filesystem(uri, options)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise LaionRayError(f"no such source: {uri}")
    if info.type == pafs.FileType.File or uri.rstrip("/").endswith(".lance"):
        return [(uri, info.size or 0, str(info.mtime_ns or info.mtime))]
    prefix = uri.rstrip("/")
    out = []
    for child in sorted(
        fs.get_file_info(pafs.FileSelector(path, recursive=True)), key=lambda i: i.path
    ):
        name = child.path[len(path.rstrip("/")) + 1 :]
        if (
            child.type == pafs.FileType.File
            and os.path.splitext(name)[1].lower() in _EXTENSIONS
            and not os.path.basename(name).startswith(("_", "."))
        ):
            out.append((f"{prefix}/{name}", child.size or 0, str(child.mtime_ns)))
    if not out:
        raise LaionRayError(f"source directory {uri!r} holds no .parquet/.csv/.jsonl files")
    return out


def open_source(
    source: str | Sequence[str],
    *,
    format: str | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> SourceTable:
    """Describe a label table: one or several files, a directory, or a Lance dataset.

    The identity names every file with its size and modification time (or the
    Lance version), so a changed table never resumes stale checkpoints.
    """
    uris = [source] if isinstance(source, str) else list(source)
    if not uris:
        raise LaionRayError("give a --from source")
    opts = dict(storage_options or {})
    first_ext = os.path.splitext(uris[0].rstrip("/"))[1].lower()
    fmt = _format_of(uris[0], format) if format or first_ext in _EXTENSIONS else None
    if fmt == "lance":
        if len(uris) != 1:
            raise LaionRayError("a Lance source must be a single dataset")
        ds = open_dataset(uris[0], storage_options=opts)
        size = sum(
            (f.file_size_bytes or 0) for frag in ds.get_fragments() for f in frag.metadata.files
        )
        return SourceTable(
            uris[0],
            "lance",
            uris,
            ds.schema,
            f"lance:{uris[0]}@{ds.version}",
            size or ds.count_rows() * 64,
            opts,
            lance_version=ds.version,
        )
    files = [f for u in uris for f in _expand(u, opts)]
    fmts = {fmt} if fmt else {_format_of(p, None) for p, _, _ in files}
    if len(fmts) > 1:
        raise LaionRayError(f"source files mix formats ({', '.join(sorted(fmts))})")
    fmt = fmts.pop()
    paths = [p for p, _, _ in files]
    table = SourceTable(
        ",".join(uris),
        fmt,
        paths,
        pa.schema([]),
        json.dumps(files),
        sum(s for _, s, _ in files),
        opts,
    )
    try:
        table.schema = table.arrow_dataset().schema
    except (pa.ArrowInvalid, OSError) as exc:
        raise LaionRayError(f"cannot read source {table.display} as {fmt}: {brief(exc)}") from exc
    return table


# --- types and casts ----------------------------------------------------------


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _safe_cast_possible(src: pa.DataType, dst: pa.DataType) -> bool:
    """Casts ``--cast`` may attempt; values are still checked (``safe=True``)."""
    if src == dst:
        return True
    if pa.types.is_integer(src) and (pa.types.is_integer(dst) or pa.types.is_floating(dst)):
        return True
    if pa.types.is_floating(src) and pa.types.is_floating(dst):
        return True
    if _is_string(src) and (pa.types.is_integer(dst) or _is_string(dst)):
        return True
    if pa.types.is_null(src):
        return True
    return (
        pa.types.is_list(src) or pa.types.is_large_list(src) or pa.types.is_fixed_size_list(src)
    ) and (pa.types.is_fixed_size_list(dst) or pa.types.is_list(dst))


def cast_column(values, target: pa.DataType, name: str):
    """Safe cast (no overflow, truncation or unparsable strings) naming the column."""
    if values.type == target:
        return values
    try:
        return pc.cast(values, target, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise LaionRayError(
            f"cannot cast column {name!r} from {values.type} to {target}: {brief(exc)}"
        ) from exc


def _plan_types(
    ds_schema: pa.Schema,
    source: SourceTable,
    on: str,
    columns: Sequence[str],
    overwrite: bool,
    cast: bool,
) -> tuple[pa.DataType, dict[str, pa.DataType]]:
    """(key type, target type per column), checked against the dataset's schema."""
    if on not in ds_schema.names:
        raise LaionRayError(f"key column {on!r} is not in the dataset")
    if on not in source.schema.names:
        raise LaionRayError(
            f"key column {on!r} is not in source {source.display} "
            f"(it has: {', '.join(source.schema.names)})"
        )
    key_type = ds_schema.field(on).type
    src_key = source.schema.field(on).type
    if src_key != key_type and not (
        (cast or (_is_string(src_key) and _is_string(key_type)))
        and _safe_cast_possible(src_key, key_type)
    ):
        hint = (
            "; pass --cast to convert it (safe casts only)"
            if _safe_cast_possible(src_key, key_type)
            else ""
        )
        raise LaionRayError(
            f"key {on!r} is {key_type} in the dataset but {src_key} in {source.display}{hint}"
        )
    types: dict[str, pa.DataType] = {}
    for name in columns:
        if name not in source.schema.names:
            raise LaionRayError(f"column {name!r} is not in source {source.display}")
        if name == on or name in _RESERVED or name.startswith("_error:"):
            raise LaionRayError(f"cannot merge column {name!r}: it is the key or reserved")
        src = source.schema.field(name).type
        if pa.types.is_null(src):
            raise LaionRayError(
                f"column {name!r} of {source.display} has no type (all null); "
                "write it with an explicit type"
            )
        if name in ds_schema.names and overwrite:
            dst = ds_schema.field(name).type
            if src != dst and not (cast and _safe_cast_possible(src, dst)):
                hint = (
                    "; pass --cast to convert (safe casts only)"
                    if _safe_cast_possible(src, dst)
                    else ""
                )
                raise LaionRayError(
                    f"column {name!r} is {dst} in the dataset but {src} in {source.display}{hint}"
                )
            types[name] = dst
        else:
            types[name] = src
    return key_type, types


def _conform(
    table: pa.Table, on: str, key_type: pa.DataType, types: Mapping[str, pa.DataType]
) -> pa.Table:
    """Select and cast the source's key and columns; drop rows with a null key."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    arrays = [cast_column(table[on], key_type, on)]
    arrays += [cast_column(table[name], t, name) for name, t in types.items()]
    out = pa.Table.from_arrays(arrays, names=[on, *types])
    if out[on].null_count:
        out = out.filter(pc.is_valid(out[on]))
    return out


# --- the report ---------------------------------------------------------------


@dataclasses.dataclass
class MergeReport:
    """What a merge found and did; ``report_path`` gets it as JSON."""

    uri: str
    source: str
    on: str
    columns: list[str]
    strategy: str
    source_rows: int = 0
    matched_keys: int = 0
    unmatched_keys: int = 0
    unmatched_examples: list[Any] = dataclasses.field(default_factory=list)
    unmatched_out: str | None = None
    job: JobReport | None = None

    @property
    def version(self) -> int | None:
        return self.job.version if self.job else None

    @property
    def rows_processed(self) -> int:
        return self.job.rows_processed if self.job else 0

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "job"}
        out["job"] = self.job.to_dict() if self.job else None
        return out

    def summary(self) -> str:
        head = (
            f"merge {self.source} -> {self.uri} on {self.on!r} ({self.strategy}): "
            f"{self.source_rows} source rows, {self.matched_keys} keys matched, "
            f"{self.unmatched_keys} source keys not in the dataset"
            + (f" (written to {self.unmatched_out})" if self.unmatched_out else "")
        )
        return head + ("\n" + self.job.summary() if self.job else "")


# --- broadcast strategy ---------------------------------------------------------


def _sorted_keys(keys) -> np.ndarray | None:
    """Keys as a numpy array when they allow a binary search (numeric), else None."""
    t = keys.type
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return pc.fill_null(keys, 0).to_numpy() if keys.null_count else keys.to_numpy()
    return None


def _duplicates(keys: pa.Array) -> tuple[int, list[Any]]:
    """(number of keys that occur more than once, a few of them); keys sorted."""
    arr = _sorted_keys(keys)
    if arr is not None:
        same = arr[1:] == arr[:-1]
        if not same.any():
            return 0, []
        dup_vals = np.unique(arr[1:][same])
        return len(dup_vals), dup_vals[:EXAMPLES].tolist()
    counts = pc.value_counts(keys)
    dups = counts.filter(pc.greater(counts.field("counts"), 1))
    return len(dups), dups.field("values")[:EXAMPLES].to_pylist()


def load_broadcast(
    source: SourceTable, on: str, key_type: pa.DataType, types: Mapping[str, pa.DataType]
) -> tuple[pa.Table, dict]:
    """Worker task: the whole source, conformed and sorted by key, plus its facts."""
    try:
        table = _conform(source.read([on, *types]), on, key_type, types)
    except (pa.ArrowInvalid, OSError) as exc:
        raise LaionRayError(f"cannot read source {source.display}: {brief(exc)}") from exc
    table = table.take(pc.sort_indices(table[on])).combine_chunks()
    n_dups, examples = _duplicates(table[on].chunk(0) if table.num_rows else table[on])
    return table, {"rows": table.num_rows, "duplicates": n_dups, "examples": examples}


def _positions(labels: pa.Table, on: str, keys) -> tuple[np.ndarray, np.ndarray]:
    """For each key: (matched?, row of ``labels``), labels sorted by key."""
    keys = pa.chunked_array([keys]) if isinstance(keys, pa.Array) else keys
    keys = keys.combine_chunks()
    n = len(labels)
    sorted_keys = _sorted_keys(labels[on].combine_chunks()) if n else None
    values = _sorted_keys(keys)
    if n == 0:
        return np.zeros(len(keys), bool), np.zeros(len(keys), np.int64)
    if sorted_keys is not None and values is not None:
        pos = np.minimum(np.searchsorted(sorted_keys, values), n - 1)
        hit = sorted_keys[pos] == values
        if keys.null_count:
            hit &= pc.is_valid(keys).to_numpy(zero_copy_only=False)
        return hit, pos
    idx = pc.index_in(keys, value_set=labels[on].combine_chunks())
    hit = pc.is_valid(idx).to_numpy(zero_copy_only=False)
    return hit, pc.fill_null(idx, 0).to_numpy().astype(np.int64)


def _lookup_batch(batch: pa.Table, *, labels_ref, on: str, columns: Sequence[str]) -> pa.Table:
    """Ray Data stage: attach the label columns to a unit batch; ``_keep`` marks matches."""
    import ray

    labels = ray.get(labels_ref[0])
    hit, pos = _positions(labels, on, batch[on])
    take = pa.array(np.where(hit, pos, 0))
    out = batch
    for name in columns:
        values = labels[name].take(take) if len(labels) else pa.nulls(len(hit), labels[name].type)
        out = out.append_column(name, values)
    return out.append_column(KEEP, pa.array(hit))


def _found_in_fragments(
    uri: str,
    version: int,
    fragment_ids: Sequence[int],
    on: str,
    labels_ref,
    storage_options: Mapping[str, str] | None,
) -> bytes:
    """Worker task: bitmap of the source rows whose key some row of these fragments has."""
    import ray

    labels = ray.get(labels_ref[0])
    found = np.zeros(len(labels), bool)
    ds = open_dataset(uri, version=version, storage_options=storage_options)
    for fid in fragment_ids:
        for batch in ds.get_fragment(fid).to_batches(columns=[on], batch_size=1 << 20):
            hit, pos = _positions(labels, on, batch.column(0))
            found[pos[hit]] = True
    return np.packbits(found).tobytes()


def _finish_broadcast_validation(
    labels_ref, masks: Sequence[bytes], on: str, unmatched_out: str | None, options
) -> dict:
    """Worker task: count (and optionally write) source keys found in no fragment."""
    import ray

    labels = ray.get(labels_ref[0])
    found = np.zeros(len(labels), bool)
    for mask in masks:
        found |= np.unpackbits(np.frombuffer(mask, np.uint8), count=len(labels)).astype(bool)
    missing = labels[on].filter(pa.array(~found))
    if unmatched_out:
        _write_keys(unmatched_out, [pa.table({on: missing})], options)
    return {
        "matched": int(found.sum()),
        "unmatched": len(missing),
        "examples": missing[:EXAMPLES].to_pylist(),
    }


# --- shuffle strategy -----------------------------------------------------------


def _bucket_of(keys, buckets: int) -> pa.Array:
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    if pa.types.is_integer(keys.type):
        values = pc.fill_null(keys, 0).to_numpy().astype(np.int64)
        # Fibonacci hashing spreads strided keys (multiples of the bucket count) too.
        mixed = values.astype(np.uint64) * np.uint64(11400714819323198485)
        return pa.array((mixed >> np.uint64(40)) % np.uint64(buckets), pa.int64())
    import pandas as pd

    hashed = pd.util.hash_array(np.asarray(keys.to_pylist(), dtype=object))
    return pa.array(hashed % np.uint64(buckets), pa.int64())


def _tag_side(batch: pa.Table, *, side: int, schema: pa.Schema, on: str, buckets: int):
    """Bring both join inputs to one schema (missing columns null) with side and bucket."""
    if isinstance(batch, pa.RecordBatch):
        batch = pa.Table.from_batches([batch])
    n = batch.num_rows
    arrays = [
        batch[f.name] if f.name in batch.column_names else pa.nulls(n, f.type) for f in schema
    ]
    table = pa.Table.from_arrays(arrays, schema=schema)
    table = table.append_column(SIDE, pa.array(np.full(n, side, np.int8)))
    return table.append_column(BUCKET, _bucket_of(table[on], buckets))


def _join_bucket(group: pa.Table, *, on: str, columns: Sequence[str], out_schema: pa.Schema):
    """One bucket: dataset rows (side 0) get their label (side 1) or ``_keep`` false."""
    side = group[SIDE].to_numpy()
    left = group.filter(pa.array(side == 0))
    right = group.filter(pa.array(side == 1))
    right = right.take(pc.sort_indices(right[on]))  # _positions binary-searches
    if not left.num_rows:
        return out_schema.empty_table()
    hit, pos = _positions(right, on, left[on])
    take = pa.array(np.where(hit, pos, 0))
    arrays = [left[c] for c in (on, ROWADDR, UNIT, UNIT_ROWS)]
    for name in columns:
        values = right[name].take(take) if right.num_rows else left[name]
        arrays.append(pc.if_else(pa.array(hit), values, pa.scalar(None, values.type)))
    arrays.append(pa.array(hit))
    return pa.Table.from_arrays(arrays, schema=out_schema)


def _check_bucket(group: pa.Table, *, on: str) -> pa.Table:
    """One bucket of (dataset keys, source keys): its duplicate and unmatched source keys."""
    side = group[SIDE].to_numpy()
    ours = group[on].filter(pa.array(side == 0)).combine_chunks()
    theirs = group[on].filter(pa.array(side == 1)).combine_chunks()
    counts = pc.value_counts(theirs)
    values, n = counts.field("values"), counts.field("counts")
    present = pc.is_in(values, value_set=ours)
    return pa.table(
        {
            on: values,
            "n": pc.cast(n, pa.int64()),
            "in_dataset": present,
        }
    )


# --- unmatched keys file ----------------------------------------------------------


def _write_keys(path: str, tables, options) -> None:
    """Write key tables to ``path`` as Parquet or CSV (by extension), streaming."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, fpath = filesystem(path, options)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".parquet", ".csv"):
        raise LaionRayError(f"--unmatched-out must end in .parquet or .csv, got {path!r}")
    if is_local(path):
        os.makedirs(os.path.dirname(os.path.abspath(fpath)), exist_ok=True)
    writer = None
    with fs.open_output_stream(fpath) as sink:
        for table in tables:
            if writer is None:
                writer = (
                    pq.ParquetWriter(sink, table.schema)
                    if ext == ".parquet"
                    else pacsv.CSVWriter(sink, table.schema)
                )
            writer.write_table(table)
        if writer is not None:
            writer.close()


def _unwrap(exc: BaseException) -> LaionRayError | None:
    """The LaionRayError behind a Ray task or Ray Data failure, if any."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, LaionRayError):
            return LaionRayError(str(e).splitlines()[-1] if "\n" in str(e) else str(e))
        cause = getattr(e, "cause", None)
        stack += [e.__cause__, e.__context__, cause]
    return None


# --- merge ------------------------------------------------------------------------


def _identity(source: SourceTable, on: str, types: Mapping[str, pa.DataType]) -> str:
    payload = {
        "source": source.identity,
        "on": on,
        "columns": {k: str(v) for k, v in types.items()},
    }
    return "merge:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def merge(
    uri: str,
    *,
    source: str | Sequence[str],
    on: str = "key",
    columns: Sequence[str] | None = None,
    overwrite: bool = False,
    cast: bool = False,
    tag: str | None = None,
    unmatched_out: str | None = None,
    source_format: str | None = None,
    storage_options: Mapping[str, str] | None = None,
    source_storage_options: Mapping[str, str] | None = None,
    address: str | None = None,
    unit_rows: int | None = None,
    checkpoint_uri: str | None = None,
    report_path: str | None = None,
    broadcast_max_bytes: int = BROADCAST_MAX_BYTES,
    num_partitions: int | None = None,
    commit_every_s: float = COMMIT_EVERY_S,
) -> MergeReport:
    """Attach (or, with ``overwrite``, update) ``source``'s columns to ``uri`` by key.

    Validation runs distributed and before anything is committed: duplicate
    source keys are an error (with examples), key and column types must agree
    (``cast`` allows safe casts), and source keys absent from the dataset are
    counted (and written to ``unmatched_out``). Dataset rows without a label
    get null; with ``overwrite`` they keep their old values.

    Resumable and safe against concurrent writers like every engine job; the
    checkpoint key includes the source's content identity (file sizes and
    mtimes, or the Lance version), so a changed source starts afresh.

    Args:
        uri: Lance dataset to merge into.
        source: Parquet/CSV/JSONL file(s), a directory or glob of them, or a Lance dataset.
        on: Key column, present in both.
        columns: Source columns to merge (default: all but the key).
        overwrite: Update existing columns (matched rows only).
        cast: Allow safe casts of the key and of columns to the dataset's types.
        tag: Tag the resulting version.
        unmatched_out: Write source keys absent from the dataset here (.parquet/.csv).
        source_format: ``parquet``, ``csv``, ``json`` or ``lance`` (default: by extension).
        storage_options: Object-store options for the dataset.
        source_storage_options: Options for the source (default: ``storage_options``).
        address: Ray cluster address.
        unit_rows: Rows per work unit (checkpoint granularity).
        checkpoint_uri: Where checkpoints live (default ``<uri>/_laion_ray``).
        report_path: Write the report as JSON here.
        broadcast_max_bytes: Sources up to this size are broadcast, larger ones shuffled.
        num_partitions: Buckets of the shuffle join (default: from the sizes).
        commit_every_s: Commit finished fragments at least this often.

    Returns:
        A :class:`MergeReport`.

    Examples:
        >>> merge("laion.lance", source="s3://b/labels/", columns=["aesthetic"])  # doctest: +SKIP
    """
    import ray

    from laion_ray.ray_env import ensure_ray

    src_opts = dict(
        source_storage_options if source_storage_options is not None else storage_options or {}
    )
    ds = open_dataset(uri, storage_options=storage_options)
    src = open_source(source, format=source_format, storage_options=src_opts)
    names = list(columns) if columns else [c for c in src.schema.names if c != on]
    if not names:
        raise LaionRayError(f"source {src.display} has no columns besides the key {on!r}")
    if len(set(names)) != len(names):
        raise LaionRayError(f"--columns names a column twice: {', '.join(names)}")
    key_type, types = _plan_types(ds.schema, src, on, names, overwrite, cast)
    if unmatched_out and os.path.splitext(unmatched_out)[1].lower() not in (".parquet", ".csv"):
        raise LaionRayError(f"--unmatched-out must end in .parquet or .csv, got {unmatched_out!r}")
    producer = f"merge:{src.display}".encode()
    outputs = pa.schema(
        [pa.field(n, t).with_metadata({UDF_METADATA: producer}) for n, t in types.items()]
    )
    strategy = "broadcast" if src.size_bytes <= broadcast_max_bytes else "shuffle"
    report = MergeReport(uri, src.display, on, list(types), strategy, unmatched_out=unmatched_out)
    ensure_ray(address)
    version = ds.version
    try:
        if strategy == "broadcast":
            transform = _validate_broadcast(
                report, ds, version, src, on, key_type, types, unmatched_out, storage_options
            )
        else:
            transform = _validate_shuffle(
                report,
                ds,
                version,
                src,
                on,
                key_type,
                types,
                unmatched_out,
                num_partitions,
                storage_options,
            )
    except (ray.exceptions.RayError, RuntimeError, ValueError) as exc:
        raise (_unwrap(exc) or exc) from exc
    log.info("%s", report.summary())
    job = Job(
        uri=uri,
        name=f"merge:{src.display}",
        identity=_identity(src, on, types),
        read_columns=[on],
        outputs=outputs,
        producers=[],
        transform=transform,
        overwrite=overwrite,
        details={
            "source": src.display,
            "source_identity": src.identity[:2000],
            "on": on,
            "strategy": strategy,
            "source_rows": report.source_rows,
            "unmatched_keys": report.unmatched_keys,
        },
    )
    try:
        report.job = run_job(
            job,
            tag=tag,
            unit_rows=unit_rows,
            commit_every_s=commit_every_s,
            checkpoint_uri=checkpoint_uri,
            storage_options=storage_options,
            address=address,
        )
    except (ray.exceptions.RayError, RuntimeError) as exc:
        raise (_unwrap(exc) or exc) from exc
    if report_path:
        fs, path = filesystem(report_path, storage_options)
        with fs.open_output_stream(path) as f:
            f.write(json.dumps(report.to_dict(), indent=2, default=str).encode())
    return report


def _duplicate_error(src: SourceTable, on: str, count: int, examples: Sequence[Any]) -> None:
    if count:
        raise LaionRayError(
            f"source {src.display} has {count} duplicate value(s) of key {on!r}, e.g. "
            f"{', '.join(map(repr, sorted(examples)))}; a merge needs unique keys"
        )


def _validate_broadcast(
    report, ds, version, src, on, key_type, types, unmatched_out, storage_options
):
    """Load the source once on a worker; check it; return the lookup transform."""
    import ray

    labels_ref, facts_ref = ray.remote(num_returns=2)(load_broadcast).remote(
        src, on, key_type, types
    )
    facts = ray.get(facts_ref)
    _duplicate_error(src, on, facts["duplicates"], facts["examples"])
    report.source_rows = facts["rows"]
    fragments = [f.fragment_id for f in ds.get_fragments()]
    cpus = max(1, int(ray.available_resources().get("CPU", 1)))
    groups = [fragments[i :: cpus * 2] for i in range(min(len(fragments), cpus * 2))]
    found = ray.remote(num_cpus=0.5)(_found_in_fragments)
    masks = ray.get(
        [found.remote(ds.uri, version, g, on, [labels_ref], storage_options) for g in groups]
    )
    result = ray.get(
        ray.remote(num_cpus=0.5)(_finish_broadcast_validation).remote(
            [labels_ref], masks, on, unmatched_out, dict(src.storage_options)
        )
    )
    report.matched_keys = result["matched"]
    report.unmatched_keys = result["unmatched"]
    report.unmatched_examples = result["examples"]
    columns = list(types)

    def transform(data):
        # Keep the reference alive (and the labels in the object store) for the job.
        return data.map_batches(
            _lookup_batch,
            fn_kwargs={"labels_ref": [labels_ref], "on": on, "columns": columns},
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=TASK_CPUS,  # like the read and the checkpoint write: one fused task
            max_retries=MAX_RETRIES,
        )

    return transform


def _validate_shuffle(
    report, ds, version, src, on, key_type, types, unmatched_out, partitions, storage_options
):
    """Distributed checks by a key shuffle; return the bucket-join transform."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    buckets = partitions or max(
        2 * cpus, int(np.ceil((src.size_bytes + ds.count_rows() * 32) / (128 * 1024**2)))
    )
    key_schema = pa.schema([(on, key_type)])
    conform = dict(on=on, key_type=key_type, types=types)

    def source_rows(cols):
        return src.ray_dataset([on, *types]).map_batches(
            lambda b: _conform(b, **conform).select(cols), batch_format="pyarrow"
        )

    ours = ray.data.read_lance(
        ds.uri,
        columns=[on],
        version=version,
        storage_options=resolve_storage_options(storage_options) or None,
    )
    tag = dict(schema=key_schema, on=on, buckets=buckets)
    keys = ours.map_batches(_tag_side, fn_kwargs={**tag, "side": 0}, batch_format="pyarrow").union(
        source_rows([on]).map_batches(
            _tag_side, fn_kwargs={**tag, "side": 1}, batch_format="pyarrow"
        )
    )
    checked = keys.groupby(BUCKET, num_partitions=buckets).map_groups(
        _check_bucket, fn_kwargs={"on": on}, batch_format="pyarrow"
    )
    dup_count, dup_examples, rows, matched, unmatched, examples = 0, [], 0, 0, 0, []

    def unmatched_tables():
        nonlocal dup_count, rows, matched, unmatched
        for batch in checked.iter_batches(batch_size=None, batch_format="pyarrow"):
            n = batch["n"].to_numpy()
            rows += int(n.sum())
            dup = batch.filter(pa.array(n > 1))
            dup_count += dup.num_rows
            dup_examples.extend(dup[on].to_pylist()[: EXAMPLES - len(dup_examples)])
            present = batch["in_dataset"].to_numpy(zero_copy_only=False)
            matched += int(present.sum())
            missing = batch.filter(pa.array(~present)).select([on])
            unmatched += missing.num_rows
            examples.extend(missing[on].to_pylist()[: EXAMPLES - len(examples)])
            yield missing

    if unmatched_out:
        _write_keys(unmatched_out, unmatched_tables(), src.storage_options)
    else:
        for _ in unmatched_tables():
            pass
    _duplicate_error(src, on, dup_count, dup_examples)
    report.source_rows, report.matched_keys = rows, matched
    report.unmatched_keys, report.unmatched_examples = unmatched, examples

    columns = list(types)
    join_schema = pa.schema(
        [(on, key_type), (ROWADDR, pa.uint64()), (UNIT, pa.int32()), (UNIT_ROWS, pa.int32())]
        + [(n, t) for n, t in types.items()]
    )
    out_schema = pa.schema([*join_schema, (KEEP, pa.bool_())])
    tag = dict(schema=join_schema, on=on, buckets=buckets)

    def transform(data):
        left = data.map_batches(_tag_side, fn_kwargs={**tag, "side": 0}, batch_format="pyarrow")
        right = source_rows([on, *columns]).map_batches(
            _tag_side, fn_kwargs={**tag, "side": 1}, batch_format="pyarrow"
        )
        return (
            left.union(right)
            .groupby(BUCKET, num_partitions=buckets)
            .map_groups(
                _join_bucket,
                fn_kwargs={"on": on, "columns": columns, "out_schema": out_schema},
                batch_format="pyarrow",
            )
        )

    return transform
