"""Copy a filtered subset of a (possibly remote) Lance dataset into a new one.

Reads from the Hub or an object store are lazy: only the projected columns and
the row groups that match the filter cross the wire. The subset is streamed
batch by batch from a Lance scanner into ``lance.write_dataset`` through a
``pyarrow.RecordBatchReader``, so the rows never all sit in Python memory.
Peak memory is roughly ``batch_rows`` x row size x the small scan readahead.

Filters are written in the one filter language of every command
(:mod:`laion_ray.filters`): the card's ``"NSFW"`` and pylance's `` `NSFW` ``
both name a column, and ``'text'`` is a string literal.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import lance
import pyarrow as pa
import pyarrow.fs as pafs

from laion_ray.errors import LaionRayError, StorageError
from laion_ray.filters import check_filter, to_lance_sql
from laion_ray.storage import (
    filesystem,
    is_local,
    is_storage_failure,
    mask_secrets,
    open_dataset,
    remove_tree,
    resolve_storage_options,
)

log = logging.getLogger(__name__)

# Scan readahead kept small: the default (16 batches) times wide image rows
# is what would make memory grow with the batch size rather than stay bounded.
_BATCH_READAHEAD = 2
_FRAGMENT_READAHEAD = 2
# Lance's default I/O budget is 2 GiB of in-flight reads; 128 MiB still keeps
# several requests in flight against a remote store.
_IO_BUFFER_BYTES = 128 << 20

# Lance error strings end with the Rust source location; users don't need it.
_RUST_LOCATION = re.compile(r",\s*/\S+\.rs:\d+:\d+\s*$")


@dataclass(frozen=True)
class MaterializeReport:
    """What :func:`materialize` wrote.

    Attributes:
        src: Source dataset URI.
        dest: Destination dataset URI.
        rows: Rows written.
        bytes_read: Arrow bytes streamed from the source (projected columns only).
        bytes_written: Size of the data files of the new dataset.
        elapsed_s: Wall-clock seconds for the whole copy.
        columns: Columns of the new dataset.
        filter: The filter as passed to Lance (after identifier translation).
        fragments: Fragments of the new dataset.
    """

    src: str
    dest: str
    rows: int
    bytes_read: int
    bytes_written: int
    elapsed_s: float
    columns: list[str] = field(default_factory=list)
    filter: str | None = None
    fragments: int = 0

    def summary(self) -> str:
        rate = self.rows / self.elapsed_s if self.elapsed_s > 0 else float("inf")
        return (
            f"materialized {self.rows} rows ({self.bytes_written / 2**20:.1f} MiB written, "
            f"{self.bytes_read / 2**20:.1f} MiB read) from {self.src} to {self.dest} "
            f"in {self.elapsed_s:.1f} s ({rate:.0f} rows/s), "
            f"{len(self.columns)} columns, {self.fragments} fragment(s)"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return _RUST_LOCATION.sub("", line)


def _dest_exists(dest: str, storage_options: Mapping[str, str]) -> bool:
    if is_local(dest):
        return os.path.exists(dest.removeprefix("file://"))
    try:
        fs, path = filesystem(dest, storage_options)
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except (pa.ArrowException, OSError, ValueError):
        # A store pyarrow can't reach (e.g. hf://): fall back to asking Lance.
        try:
            lance.dataset(dest, storage_options=dict(storage_options))
        except (ValueError, OSError):
            return False
        return True


def materialize(
    src: str,
    dest: str,
    *,
    where: str | None = None,
    columns: list[str] | None = None,
    limit: int | None = None,
    storage_options: dict[str, str] | None = None,
    dest_storage_options: dict[str, str] | None = None,
    batch_rows: int = 8192,
) -> MaterializeReport:
    """Stream a filtered, projected subset of ``src`` into a new Lance dataset ``dest``.

    Args:
        src: Source dataset URI: a local path, ``s3://...``, or
            ``hf://datasets/lance-format/laion-1m/data/train.lance``.
        dest: URI of the dataset to create (local or object store); must not exist.
        where: SQL filter pushed into the scan: ``"NSFW" = 0`` (the card's,
            LanceDB's) or `` `NSFW` = 0 `` (pylance's); see :mod:`laion_ray.filters`.
        columns: Columns to keep, in this order (default: all).
        limit: Keep at most this many matching rows.
        storage_options: Lance storage options for ``src`` (``AWS_*`` env is read too).
        dest_storage_options: Storage options for ``dest``; defaults to
            ``storage_options``.
        batch_rows: Rows per streamed batch. Memory is bounded by about
            ``batch_rows`` x row size x a small readahead, so lower it for
            wide image rows.

    Returns:
        A :class:`MaterializeReport` with rows, bytes and elapsed time.

    Raises:
        LaionRayError: ``dest`` exists, a column is unknown, the filter is
            invalid, or an argument is out of range.
        StorageError: A store failed (reading ``src``, writing ``dest``); a
            partly written ``dest`` is removed.

    Examples:
        >>> materialize(  # doctest: +SKIP
        ...     "hf://datasets/lance-format/laion-1m/data/train.lance",
        ...     "./laion-subset/train.lance",
        ...     where='"NSFW" = 0 AND similarity > 0.35 AND width >= 512',
        ...     columns=["key", "image", "caption", "url", "img_emb"],
        ... )
    """
    if batch_rows <= 0:
        raise LaionRayError(f"batch_rows must be positive, got {batch_rows}")
    if limit is not None and limit < 0:
        raise LaionRayError(f"limit must be >= 0, got {limit}")
    if columns is not None and not columns:
        raise LaionRayError("columns must name at least one column")
    dest_options = resolve_storage_options(
        storage_options if dest_storage_options is None else dest_storage_options
    )
    if _dest_exists(dest, dest_options):
        raise LaionRayError(f"destination already exists: {dest}")

    start = time.perf_counter()
    ds = open_dataset(src, storage_options=storage_options)
    names = ds.schema.names
    if columns is not None:
        unknown = [c for c in columns if c not in names]
        if unknown:
            raise LaionRayError(
                f"unknown column(s) {', '.join(unknown)} in {src}; available: {', '.join(names)}"
            )
    lance_filter = to_lance_sql(where)
    check_filter(ds, lance_filter, given=where)

    try:
        reader = ds.scanner(
            columns=columns,
            filter=lance_filter,
            limit=limit,
            batch_size=batch_rows,
            batch_readahead=_BATCH_READAHEAD,
            fragment_readahead=_FRAGMENT_READAHEAD,
            io_buffer_size=_IO_BUFFER_BYTES,
        ).to_reader()
    except (ValueError, OSError) as exc:
        if is_storage_failure(exc):
            raise StorageError(f"cannot read {src}: {_first_line(exc)}") from exc
        raise LaionRayError(f"bad --where {where!r}: {_first_line(exc)}") from exc

    counts = {"rows": 0, "bytes": 0}

    def counted() -> Iterator[pa.RecordBatch]:
        for batch in reader:
            counts["rows"] += batch.num_rows
            counts["bytes"] += batch.nbytes
            yield batch

    log.info(
        "materialize %s -> %s filter=%r columns=%s limit=%s options=%s",
        src,
        dest,
        lance_filter,
        columns or "all",
        limit,
        mask_secrets(dest_options),
    )
    stream = pa.RecordBatchReader.from_batches(reader.schema, counted())
    try:
        out = lance.write_dataset(
            stream, dest, schema=reader.schema, mode="create", storage_options=dest_options
        )
    except BaseException as exc:
        message = _first_line(exc)
        if "already exists" in message:
            # Another writer created it after our check: it is theirs, keep it.
            raise LaionRayError(f"destination already exists: {dest}") from exc
        # Don't leave a half-written directory (data files, no manifest) that
        # would block the rerun.
        try:
            remove_tree(dest, dest_options)
        except Exception:  # cleanup must not mask the real error
            log.warning("could not remove partial output %s", dest)
        if is_storage_failure(exc):  # reading src or writing dest: a failed job, not bad input
            raise StorageError(f"writing {dest} failed: {message}") from exc
        if isinstance(exc, (ValueError, OSError)):
            raise LaionRayError(f"writing {dest} failed: {message}") from exc
        raise

    fragments = out.get_fragments()
    written = sum(df.file_size_bytes or 0 for f in fragments for df in f.data_files())
    return MaterializeReport(
        src=src,
        dest=dest,
        rows=counts["rows"],
        bytes_read=counts["bytes"],
        bytes_written=written,
        elapsed_s=time.perf_counter() - start,
        columns=out.schema.names,
        filter=lance_filter,
        fragments=len(fragments),
    )
