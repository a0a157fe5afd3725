"""The label table of a merge: formats, files, schema, types and casts, key checks."""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from laion_ray.engine.plan import KEEP, ROWADDR, UNIT, UNIT_DIGEST, UNIT_ROWS
from laion_ray.errors import LaionRayError, StorageError, brief
from laion_ray.storage import (
    filesystem,
    is_local,
    is_storage_failure,
    open_dataset,
    resolve_storage_options,
)

log = logging.getLogger(__name__)


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
EXAMPLES = 5
# Columns the join adds; a source column may not use these names.
SIDE = "_side"
BUCKET = "_bucket"
RESERVED = (ROWADDR, UNIT, UNIT_ROWS, UNIT_DIGEST, KEEP, SIDE, BUCKET)


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

    def read_error(self, exc: BaseException) -> Exception:
        """What a failed read of the source means: the store failing
        (:class:`StorageError`, a failed job) or files that are not its format
        (:class:`LaionRayError`, bad input)."""
        if is_storage_failure(exc):
            return StorageError(f"cannot read source {self.display}: {brief(exc)}")
        return LaionRayError(f"cannot read source {self.display} as {self.format}: {brief(exc)}")

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
        from laion_ray.ray_env import ray_data

        if self.format == "lance":
            return ray_data().read_lance(
                self.paths[0],
                columns=list(columns),
                version=self.lance_version,
                storage_options=resolve_storage_options(self.storage_options) or None,
            )
        fs = self._fs()
        paths = [filesystem(p, self.storage_options)[1] for p in self.paths]
        if self.format == "parquet":
            return ray_data().read_parquet(paths, filesystem=fs, columns=list(columns))
        if self.format == "csv":
            import pyarrow.csv as pacsv

            return ray_data().read_csv(
                paths,
                filesystem=fs,
                convert_options=pacsv.ConvertOptions(
                    include_columns=list(columns), column_types=self.schema
                ),
            )
        return ray_data().read_json(paths, filesystem=fs, lines=True).select_columns(list(columns))


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
        raise table.read_error(exc) from exc
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


def plan_types(
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
        if name == on or name in RESERVED or name.startswith("_error:"):
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


def conform(
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


# --- unmatched keys file ----------------------------------------------------------


def write_keys(path: str, tables, options) -> None:
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


def unwrap(exc: BaseException) -> LaionRayError | None:
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


def duplicate_error(src: SourceTable, on: str, count: int, examples: Sequence[Any]) -> None:
    if count:
        raise LaionRayError(
            f"source {src.display} has {count} duplicate value(s) of key {on!r}, e.g. "
            f"{', '.join(map(repr, sorted(examples)))}; a merge needs unique keys"
        )
