"""The errors table: rows a UDF could not process, next to the dataset.

Stored as a Lance dataset at ``<checkpoint root>/errors.lance`` so it lives in
the same store as the data, and is listed by ``laion-ray errors URI``.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Mapping, Sequence

import lance
import pyarrow as pa

from laion_ray.storage import join_uri, resolve_storage_options

# What a failed row records; the log adds the job and the time.
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
ERROR_LOG_SCHEMA = ERROR_SCHEMA.append(pa.field("job", pa.string())).append(
    pa.field("created_at", pa.timestamp("us", tz="UTC"))
)


def checkpoint_root(uri: str, checkpoint_uri: str | None = None) -> str:
    """Where laion-ray keeps checkpoints and errors for ``uri``."""
    return checkpoint_uri or join_uri(uri, "_laion_ray")


def _open(root: str, storage_options: Mapping[str, str] | None) -> lance.LanceDataset | None:
    try:
        return lance.dataset(
            join_uri(root, "errors.lance"), storage_options=resolve_storage_options(storage_options)
        )
    except (ValueError, OSError):
        return None


def _quote(values: Sequence[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


def record_errors(
    root: str,
    errors: pa.Table,
    *,
    job: str,
    replace_fragments: Sequence[int] = (),
    udfs: Sequence[str] = (),
    storage_options: Mapping[str, str] | None = None,
) -> None:
    """Append error rows; first drop older records of ``udfs`` in ``replace_fragments``
    (those rows were all retried by this job)."""
    opts = resolve_storage_options(storage_options)
    existing = _open(root, opts)
    if existing is not None and replace_fragments and udfs:
        frags = ", ".join(str(int(f)) for f in replace_fragments)
        existing.delete(f"fragment_id IN ({frags}) AND udf IN ({_quote(udfs)})")
    if not errors.num_rows:
        return
    now = dt.datetime.now(dt.timezone.utc)
    table = errors.append_column("job", pa.array([job] * errors.num_rows, pa.string()))
    table = table.append_column(
        "created_at", pa.array([now] * errors.num_rows, ERROR_LOG_SCHEMA.field("created_at").type)
    )
    lance.write_dataset(
        table.cast(ERROR_LOG_SCHEMA),
        join_uri(root, "errors.lance"),
        mode="append" if existing is not None else "create",
        storage_options=opts,
    )


def list_errors(
    root: str,
    *,
    udf: str | None = None,
    limit: int | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> pa.Table:
    ds = _open(root, storage_options)
    if ds is None:
        return ERROR_LOG_SCHEMA.empty_table()
    return ds.to_table(filter=f"udf = {_quote([udf])}" if udf else None, limit=limit)


def failed_keys_by_fragment(
    root: str, udfs: Sequence[str], storage_options: Mapping[str, str] | None = None
) -> dict[int, list[int]]:
    """Keys that failed in any of ``udfs``, grouped by the fragment they were in."""
    ds = _open(root, storage_options)
    if ds is None or not udfs:
        return {}
    table = ds.to_table(columns=["key", "fragment_id"], filter=f"udf IN ({_quote(udfs)})")
    grouped: dict[int, list[int]] = defaultdict(list)
    for key, frag in zip(table["key"].to_pylist(), table["fragment_id"].to_pylist(), strict=False):
        if key is not None:
            grouped[frag].append(key)
    return dict(grouped)
