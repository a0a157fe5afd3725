"""Shuffle join: hash buckets of dataset rows and labels joined per bucket, for any size."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laion_ray.engine.plan import KEEP, ROWADDR, UNIT, UNIT_DIGEST, UNIT_ROWS
from laion_ray.merge.broadcast import positions
from laion_ray.merge.source import BUCKET, EXAMPLES, SIDE, conform, duplicate_error, write_keys
from laion_ray.storage import resolve_storage_options

log = logging.getLogger(__name__)


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
    right = right.take(pc.sort_indices(right[on]))  # positions binary-searches
    if not left.num_rows:
        return out_schema.empty_table()
    hit, pos = positions(right, on, left[on])
    take = pa.array(np.where(hit, pos, 0))
    arrays = [left[c] for c in (on, ROWADDR, UNIT, UNIT_ROWS, UNIT_DIGEST)]
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


def validate_shuffle(
    report, ds, version, src, on, key_type, types, unmatched_out, partitions, workers,
    storage_options,
):  # fmt: skip
    """Distributed checks by a key shuffle; return the bucket-join transform.

    Buckets: ``partitions``, else two per worker (``workers``, or the cluster's
    CPUs including autoscalable nodes) or one per 128 MiB, whichever is more.
    """
    from laion_ray.cluster import cluster_capacity
    from laion_ray.ray_env import ray_data

    cpus = cluster_capacity().worker_count(workers)
    buckets = partitions or max(
        2 * cpus, int(np.ceil((src.size_bytes + ds.count_rows() * 32) / (128 * 1024**2)))
    )
    report.partitions = buckets
    key_schema = pa.schema([(on, key_type)])
    conform_args = dict(on=on, key_type=key_type, types=types)

    def source_rows(cols):
        return src.ray_dataset([on, *types]).map_batches(
            lambda b: conform(b, **conform_args).select(cols), batch_format="pyarrow"
        )

    ours = ray_data().read_lance(
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
        write_keys(unmatched_out, unmatched_tables(), src.storage_options)
    else:
        for _ in unmatched_tables():
            pass
    duplicate_error(src, on, dup_count, dup_examples)
    report.source_rows, report.matched_keys = rows, matched
    report.unmatched_keys, report.unmatched_examples = unmatched, examples

    columns = list(types)
    join_schema = pa.schema(
        [
            (on, key_type),
            (ROWADDR, pa.uint64()),
            (UNIT, pa.int32()),
            (UNIT_ROWS, pa.int32()),
            (UNIT_DIGEST, pa.uint64()),
        ]
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
