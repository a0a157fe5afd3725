"""The errors table: rows a UDF could not process, next to the dataset.

Stored as a Lance dataset at ``<checkpoint root>/errors.lance`` so it lives in
the same store as the data, and is listed by ``laion-ray errors URI``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
    root: str, udfs: Sequence[str], storage_options: Mapping[str, str] | None = None
) -> dict[int, KnownBad]:
    """Keys that failed in any of ``udfs``, per fragment, to be handed out per unit.

    Held as numpy arrays (16 bytes a failed row), not one list per fragment
    shipped with every unit of that fragment.
    """
    ds = _open(root, storage_options)
    if ds is None or not udfs:
        return {}
    table = ds.to_table(
        columns=["key", "fragment_id", "row_offset"], filter=f"udf IN ({_quote(udfs)})"
    )
    table = table.filter(pc.is_valid(table["key"])).sort_by(
        [("fragment_id", "ascending"), ("row_offset", "ascending")]
    )
    if not table.num_rows:
        return {}
    fragments = table["fragment_id"].to_numpy()
    offsets = table["row_offset"].to_numpy()
    keys = table["key"].to_numpy()
    bounds = np.flatnonzero(np.diff(fragments, prepend=np.int64(-1)))
    known = {}
    for begin, end in zip(bounds, [*bounds[1:], len(fragments)], strict=True):
        known[int(fragments[begin])] = KnownBad(offsets[begin:end], keys[begin:end])
    return known
