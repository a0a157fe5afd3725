"""The errors table: rows a UDF could not process, next to the dataset.

Stored as a Lance dataset at ``<checkpoint root>/errors.lance`` so it lives in
the same store as the data, and is listed by ``laion-ray errors URI``. A row
lands there when its fragment is committed; only those rows are known-bad (left
alone by incremental reruns). Rows that failed in a run that has not committed
them yet (stopped by the error gate, say) are read from that job's checkpoint
parts and listed too, marked ``committed = false``.

Each record names its dataset (several datasets may share one
``--checkpoint-uri``), the plan that computed it (a resumed plan must not skip
its own failed rows: its parts count them) and the commit that recorded it
(so a commit redone after a crash records its rows once). A plan that records
a fragment again replaces its records of that fragment (:func:`record_errors`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from laion_ray.errors import StorageError, brief
from laion_ray.filters import (
    check_filter,
    filter_table,
    quote_identifier,
    quote_literal,
    sql_and,
    sql_in,
    to_lance_sql,
)
from laion_ray.storage import filesystem, is_local, join_uri, resolve_storage_options

from .checkpoint import JobCheckpoint, read_part
from .plan import ERROR_PREFIX, ROWADDR, runs

# What a failed row records; the log adds who recorded it, where and when.
ERROR_SCHEMA = pa.schema(
    [
        ("key", pa.int64()),
        ("fragment_id", pa.int64()),
        ("row_offset", pa.int64()),
        ("udf", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)
# Columns added to the log after its first release: older tables gain them
# (null) at their next append, and a null dataset is read as any dataset.
IDENTITY_FIELDS = [
    pa.field("dataset", pa.string()),
    pa.field("plan", pa.string()),
    pa.field("commit", pa.string()),
]
ERROR_LOG_SCHEMA = pa.schema(
    [
        *ERROR_SCHEMA,
        pa.field("job", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
        *IDENTITY_FIELDS,
    ]
)
# What ``list_errors`` returns: false for rows of a run that has not committed them.
LISTED_SCHEMA = ERROR_LOG_SCHEMA.append(pa.field("committed", pa.bool_()))


def checkpoint_root(uri: str, checkpoint_uri: str | None = None) -> str:
    """Where laion-ray keeps checkpoints and errors for ``uri``."""
    return checkpoint_uri or join_uri(uri, "_laion_ray")


def dataset_identity(uri: str) -> str:
    """The name under which a dataset's rows are recorded: its URI, normalised."""
    if is_local(uri):
        return os.path.abspath(uri.removeprefix("file://"))
    return uri.rstrip("/")


def dataset_scope(uri: str, checkpoint_uri: str | None) -> str | None:
    """Whose records a job of ``uri`` reads from its errors table.

    A root inside the dataset (the default) holds only that dataset's
    records, wherever the dataset was copied or moved since: None, all of
    them. A ``--checkpoint-uri`` may be shared by several datasets: only the
    records of ``uri``'s identity.
    """
    return None if checkpoint_uri is None else dataset_identity(uri)


def _is_not_found(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, FileNotFoundError) or "not found" in text or "NotFound" in text


def _open(root: str, storage_options: Mapping[str, str] | None) -> lance.LanceDataset | None:
    """The errors table, or None if there is none yet.

    Only "not found" means none: a store that cannot be read (credentials, a
    network failure) must stop the job, never read as "no known-bad rows".
    """
    uri = join_uri(root, "errors.lance")
    try:
        return lance.dataset(uri, storage_options=resolve_storage_options(storage_options))
    except (ValueError, OSError) as exc:
        if _is_not_found(exc):
            return None
        raise StorageError(f"cannot read the errors table {uri}: {brief(exc)}") from exc


def _of_dataset(ds: lance.LanceDataset, dataset: str | None) -> pc.Expression | None:
    """Records of ``dataset`` (None: every record); a null dataset is an older record's."""
    if dataset is None or "dataset" not in ds.schema.names:
        return None
    return pc.field("dataset").is_null() | (pc.field("dataset") == dataset)


def _all_of(*conditions: pc.Expression | None) -> pc.Expression:
    given = [c for c in conditions if c is not None]
    combined = given[0]
    for condition in given[1:]:
        combined &= condition
    return combined


def _with_identity(ds: lance.LanceDataset, table: pa.Table) -> pa.Table:
    """Rows read from the table, with the identity columns an older table lacks."""
    for field in IDENTITY_FIELDS:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(ERROR_LOG_SCHEMA.names).cast(ERROR_LOG_SCHEMA)


# A record's identity: one row of one dataset's fragment, failed in one UDF
# under one plan. Recording the same identity again replaces the record.
RECORD_KEY = ["dataset", "plan", "fragment_id", "row_offset", "udf"]


def record_errors(
    root: str,
    errors: pa.Table,
    *,
    dataset: str,
    scope: str | None,
    job: str,
    plan: str,
    commit: str,
    replace_fragments: Sequence[int] = (),
    udfs: Sequence[str] = (),
    storage_options: Mapping[str, str] | None = None,
) -> None:
    """Record the failed rows of one commit, in one atomic write.

    The records of ``udfs`` that ``plan`` made before in the same fragments
    are replaced, not doubled: a plan recomputes a fragment it had committed
    when the fragment's ``committed/`` summary was lost (a kill while its
    finished checkpoint was being removed). ``replace_fragments`` also
    replaces the records of ``udfs`` in those fragments in ``scope`` (see
    :func:`dataset_scope`) whatever plan made them: ``--retry-errors`` retried
    those rows. Redo after a crash with :func:`recorded`: a commit whose rows
    are there already is done. ``dataset`` is recorded with every row.

    Costs one scan of the table's identity columns when it exists (the
    replacement is a ``merge_insert`` whose unmatched old records in the
    replaced slice are deleted).
    """
    opts = resolve_storage_options(storage_options)
    table = _log_rows(errors, job=job, dataset=dataset, plan=plan, commit=commit)
    existing = _open(root, opts)
    if existing is None:
        if table.num_rows:
            lance.write_dataset(table, join_uri(root, "errors.lance"), storage_options=opts)
        return
    replaced = []  # the slices of old records this write replaces
    if fragments := pc.unique(table["fragment_id"]).to_pylist():  # this plan's own
        replaced.append(
            sql_and(
                _equals("plan", plan), _equals("dataset", dataset), sql_in("fragment_id", fragments)
            )
        )
    if replace_fragments:  # --retry-errors: any plan's
        replaced.append(
            sql_and(sql_in("fragment_id", [int(f) for f in replace_fragments]), _in_scope(scope))
        )
    if not replaced:
        return
    if missing := [f for f in IDENTITY_FIELDS if f.name not in existing.schema.names]:
        existing.add_columns(missing)  # all-null fields: metadata only
    udfs = list(udfs) or pc.unique(table["udf"]).to_pylist()
    stale = sql_and(sql_in("udf", udfs), " OR ".join(f"({r})" for r in replaced))
    (
        existing.merge_insert(RECORD_KEY)
        .when_matched_update_all()
        .when_not_matched_insert_all()
        .when_not_matched_by_source_delete(stale)
        .execute(table)
    )


def _equals(column: str, value: str) -> str:
    return f"{quote_identifier(column)} = {quote_literal(value)}"


def _in_scope(scope: str | None) -> str | None:
    """Lance SQL for the records of ``scope`` (:func:`_of_dataset`, as a filter string)."""
    if scope is None:
        return None
    return f"{quote_identifier('dataset')} IS NULL OR {_equals('dataset', scope)}"


def _log_rows(errors: pa.Table, **identity: str) -> pa.Table:
    """``errors`` as rows of the log (:data:`ERROR_LOG_SCHEMA`), each naming ``identity``."""
    n = errors.num_rows
    table = errors.select(ERROR_SCHEMA.names)
    values = {"created_at": dt.datetime.now(dt.timezone.utc), **identity}
    for name in ERROR_LOG_SCHEMA.names[len(ERROR_SCHEMA) :]:
        field = ERROR_LOG_SCHEMA.field(name)
        table = table.append_column(field, pa.array([values[name]] * n, field.type))
    return table.cast(ERROR_LOG_SCHEMA)


def recorded(root: str, commit: str, storage_options: Mapping[str, str] | None = None) -> bool:
    """Whether the errors table holds rows of ``commit`` (its errors are recorded)."""
    ds = _open(root, storage_options)
    if ds is None or "commit" not in ds.schema.names:
        return False
    return ds.count_rows(filter=pc.field("commit") == commit) > 0


def list_errors(
    uri: str,
    *,
    checkpoint_uri: str | None = None,
    udf: str | None = None,
    where: str | None = None,
    limit: int | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> pa.Table:
    """Failed rows of dataset ``uri``: committed ones (known-bad), then those
    of its uncommitted runs.

    Args:
        uri: The dataset.
        checkpoint_uri: Where its checkpoints and errors live (default
            ``<uri>/_laion_ray``).
        udf: Only rows this UDF stage failed on.
        where: Only rows that pass this SQL filter over the listing's columns
            (:data:`LISTED_SCHEMA` but ``committed``), e.g. ``error_type =
            'ImageDecodeError'``; the same filter language as every command.
        limit: At most this many rows.
        storage_options: Object-store options.

    Returns:
        A table of :data:`LISTED_SCHEMA`.
    """
    root = checkpoint_root(uri, checkpoint_uri)
    scope = dataset_scope(uri, checkpoint_uri)
    given, where = where, to_lance_sql(where)
    ds = _open(root, storage_options)
    if ds is not None:
        wanted = sql_and(
            where,
            _in_scope(scope) if "dataset" in ds.schema.names else None,
            f"{quote_identifier('udf')} = {quote_literal(udf)}" if udf else None,
        )
        check_filter(ds, wanted, given=given)
        committed = _with_identity(ds, ds.to_table(filter=wanted, limit=limit))
    else:  # nothing to list yet, but a bad filter is still bad input
        committed = filter_table(ERROR_LOG_SCHEMA.empty_table(), where, given=given)
    committed = committed.append_column(
        "committed", pa.array([True] * committed.num_rows, pa.bool_())
    )
    left = None if limit is None else limit - committed.num_rows
    if left is not None and left <= 0:
        return committed.cast(LISTED_SCHEMA)
    pending = uncommitted_errors(
        root, dataset=scope, udf=udf, where=where, limit=left, storage_options=storage_options
    )
    return pa.concat_tables([committed.cast(LISTED_SCHEMA), pending])


def part_errors(part: pa.Table) -> pa.Table:
    """The failed rows of one checkpoint part (its ``_error:<udf>`` columns)."""
    rows: list[dict] = []
    for name in part.column_names:
        if not name.startswith(ERROR_PREFIX) or part[name].null_count == part.num_rows:
            continue
        failed = part.filter(pc.is_valid(part[name]))
        keys = failed["key"].to_pylist() if "key" in failed.column_names else [None] * len(failed)
        addresses = failed[ROWADDR].to_numpy().astype(np.int64)
        for key, address, message in zip(
            keys, addresses.tolist(), failed[name].to_pylist(), strict=True
        ):
            error_type, _, text = message.partition(": ")
            rows.append(
                {
                    "key": key,
                    "fragment_id": address >> 32,
                    "row_offset": address & 0xFFFFFFFF,
                    "udf": name[len(ERROR_PREFIX) :],
                    "error_type": error_type,
                    "message": text,
                }
            )
    return pa.Table.from_pylist(rows, schema=ERROR_SCHEMA)


def read_part_errors(
    paths: Iterable[str], storage_options: Mapping[str, str] | None, *, limit: int | None = None
) -> pa.Table:
    """Failed rows of checkpoint parts, read in order until ``limit`` rows."""
    opts = resolve_storage_options(storage_options)
    tables, found = [], 0
    for path in paths:
        if limit is not None and found >= limit:
            break
        try:
            table = part_errors(read_part(path, opts))
        except FileNotFoundError:  # the job finished and removed its checkpoint meanwhile
            continue
        tables.append(table)
        found += table.num_rows
    table = pa.concat_tables([ERROR_SCHEMA.empty_table(), *tables])
    return table if limit is None else table.slice(0, limit)


def uncommitted_errors(
    root: str,
    *,
    dataset: str | None,
    udf: str | None = None,
    where: str | None = None,
    limit: int | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> pa.Table:
    """Failed rows that checkpoints hold but no commit has recorded yet.

    Looks only at checkpoints planned on ``dataset`` (None: every checkpoint
    of the root, see :func:`dataset_scope`), and there only at parts whose
    name counts errors, in
    fragments the job has not committed (those rows are in ``errors.lance``).
    """
    opts = resolve_storage_options(storage_options)
    fs, jobs_path = filesystem(join_uri(root, "jobs"), opts)
    infos = fs.get_file_info(pafs.FileSelector(jobs_path, allow_not_found=True))
    tables, found = [], 0
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.Directory or (limit is not None and found >= limit):
            continue
        checkpoint = JobCheckpoint(root, info.base_name, opts)
        manifest = checkpoint.load_manifest()
        if manifest is None or (dataset and dataset_identity(manifest["uri"]) != dataset):
            continue
        committed = checkpoint.committed()
        with_errors = [
            path
            for fragment_id in checkpoint.fragments_with_parts()
            if fragment_id not in committed
            for path, rec in checkpoint.fragment_parts(fragment_id)
            if rec["errors"] > 0
        ]
        for path in with_errors:
            if limit is not None and found >= limit:
                break
            errors = read_part_errors([path], opts)
            if udf:
                errors = errors.filter(pc.equal(errors["udf"], udf))
            n = errors.num_rows
            columns = {
                "job": pa.array([checkpoint.fingerprint] * n, pa.string()),
                "created_at": pa.nulls(n, LISTED_SCHEMA.field("created_at").type),
                "dataset": pa.array([dataset_identity(manifest["uri"])] * n, pa.string()),
                "plan": pa.array([manifest.get("plan")] * n, pa.string()),
                "commit": pa.nulls(n, pa.string()),
                "committed": pa.array([False] * n, pa.bool_()),
            }
            for name, column in columns.items():
                errors = errors.append_column(name, column)
            errors = filter_table(errors.cast(LISTED_SCHEMA), where)
            if limit is not None:
                errors = errors.slice(0, limit - found)
            tables.append(errors)
            found += errors.num_rows
    return pa.concat_tables([LISTED_SCHEMA.empty_table(), *tables])


def describe_errors(errors: pa.Table, *, failed: int, top: int = 3) -> str:
    """The ``top`` most frequent error types with counts and one example each.

    ``failed`` is the number of failed rows; when ``errors`` holds fewer (a
    sample), the counts are said to be of the sample.
    """
    if not errors.num_rows:
        return "no failed rows found in the checkpoint"
    counts = Counter(errors["error_type"].to_pylist())
    examples: dict[str, str] = {}
    for row in errors.to_pylist():
        if row["error_type"] not in examples:
            where = (
                f"key {row['key']}"
                if row["key"] is not None
                else f"fragment {row['fragment_id']} row {row['row_offset']}"
            )
            examples[row["error_type"]] = f"{where}: {row['udf']}: {row['message'][:200]}"
    parts = [f"{kind} ×{n} (e.g. {examples[kind]})" for kind, n in counts.most_common(top)]
    sample = "" if errors.num_rows >= failed else f" (in a sample of {errors.num_rows})"
    return f"most frequent errors{sample}: " + "; ".join(parts)


@dataclasses.dataclass(frozen=True)
class KnownBad:
    """Keys of one fragment that failed before, sorted by the row they were in."""

    offsets: np.ndarray  # row offset in the fragment, ascending
    keys: np.ndarray

    def keys_in(self, start: int, end: int) -> np.ndarray:
        """Keys recorded at rows ``[start, end)``: what one work unit must skip.

        Rows are matched by key in the unit, so an offset gone stale (the
        fragment was rewritten) costs a recomputation, never a wrong skip.
        """
        lo, hi = np.searchsorted(self.offsets, [start, end])
        return self.keys[lo:hi]


def failed_keys_by_fragment(
    root: str,
    udfs: Sequence[str],
    storage_options: Mapping[str, str] | None = None,
    *,
    dataset: str | None,
    exclude_plan: str | None = None,
) -> dict[int, KnownBad]:
    """Keys that failed in any of ``udfs``, per fragment, to be handed out per unit.

    ``dataset`` is the scope (:func:`dataset_scope`): None for every record.
    ``exclude_plan`` leaves out the rows a plan recorded itself: when a
    resumed plan redoes a commit, its parts still hold those rows, so they are
    its own results, not rows to skip. Held as numpy arrays (16 bytes a failed
    row), not one list per fragment shipped with every unit of that fragment.
    """
    ds = _open(root, storage_options)
    if ds is None or not udfs:
        return {}
    others = None
    if exclude_plan is not None and "plan" in ds.schema.names:
        others = pc.field("plan").is_null() | (pc.field("plan") != exclude_plan)
    wanted = _all_of(pc.field("udf").isin(list(udfs)), _of_dataset(ds, dataset), others)
    table = ds.to_table(columns=["key", "fragment_id", "row_offset"], filter=wanted)
    table = table.filter(pc.is_valid(table["key"])).sort_by(
        [("fragment_id", "ascending"), ("row_offset", "ascending")]
    )
    if not table.num_rows:
        return {}
    fragments = table["fragment_id"].to_numpy()
    offsets = table["row_offset"].to_numpy()
    keys = table["key"].to_numpy()
    known = {}
    for begin, end in runs(fragments):
        known[int(fragments[begin])] = KnownBad(offsets[begin:end], keys[begin:end])
    return known
