"""Broadcast join: a small label table sorted by key in the object store, looked up per batch."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laion_ray.engine.plan import KEEP
from laion_ray.engine.stages import MAX_RETRIES
from laion_ray.merge.source import EXAMPLES, SourceTable, conform, duplicate_error, write_keys
from laion_ray.storage import open_dataset
from laion_ray.udf import TASK_CPUS

log = logging.getLogger(__name__)


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
        table = conform(source.read([on, *types]), on, key_type, types)
    except (pa.ArrowInvalid, OSError) as exc:
        raise source.read_error(exc) from exc
    table = table.take(pc.sort_indices(table[on])).combine_chunks()
    n_dups, examples = _duplicates(table[on].chunk(0) if table.num_rows else table[on])
    return table, {"rows": table.num_rows, "duplicates": n_dups, "examples": examples}


def positions(labels: pa.Table, on: str, keys) -> tuple[np.ndarray, np.ndarray]:
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


def lookup(batch: pa.Table, labels: pa.Table, on: str, columns: Sequence[str]) -> pa.Table:
    """Attach the label columns to a unit batch; ``_keep`` marks rows whose key matched."""
    hit, pos = positions(labels, on, batch[on])
    take = pa.array(np.where(hit, pos, 0))
    out = batch
    for name in columns:
        values = labels[name].take(take) if len(labels) else pa.nulls(len(hit), labels[name].type)
        out = out.append_column(name, values)
    return out.append_column(KEEP, pa.array(hit))


def _lookup_batch(batch: pa.Table, *, labels_ref, on: str, columns: Sequence[str]) -> pa.Table:
    """Ray Data stage: :func:`lookup` against the labels in the object store."""
    import ray

    return lookup(batch, ray.get(labels_ref[0]), on, columns)


def found_mask(
    labels: pa.Table,
    uri: str,
    version: int,
    fragment_ids: Sequence[int],
    on: str,
    storage_options: Mapping[str, str] | None,
) -> np.ndarray:
    """Which source rows have their key in some row of these fragments."""
    found = np.zeros(len(labels), bool)
    ds = open_dataset(uri, version=version, storage_options=storage_options)
    for fid in fragment_ids:
        for batch in ds.get_fragment(fid).to_batches(columns=[on], batch_size=1 << 20):
            hit, pos = positions(labels, on, batch.column(0))
            found[pos[hit]] = True
    return found


def _found_in_fragments(labels_ref, *args) -> bytes:
    """Worker task: :func:`found_mask`, packed to a bitmap for the trip to the driver."""
    import ray

    return np.packbits(found_mask(ray.get(labels_ref[0]), *args)).tobytes()


def unmatched(
    labels: pa.Table, found: np.ndarray, on: str, unmatched_out: str | None, options
) -> dict:
    """Count (and optionally write) the source keys found in no fragment."""
    missing = labels[on].filter(pa.array(~found))
    if unmatched_out:
        write_keys(unmatched_out, [pa.table({on: missing})], options)
    return {
        "matched": int(found.sum()),
        "unmatched": len(missing),
        "examples": missing[:EXAMPLES].to_pylist(),
    }


def _finish_broadcast_validation(labels_ref, masks: Sequence[bytes], *args) -> dict:
    """Worker task: OR the fragments' bitmaps, then :func:`unmatched`."""
    import ray

    labels = ray.get(labels_ref[0])
    found = np.zeros(len(labels), bool)
    for mask in masks:
        found |= np.unpackbits(np.frombuffer(mask, np.uint8), count=len(labels)).astype(bool)
    return unmatched(labels, found, *args)


def _record(report, facts: dict, result: dict) -> None:
    report.source_rows = facts["rows"]
    report.matched_keys = result["matched"]
    report.unmatched_keys = result["unmatched"]
    report.unmatched_examples = result["examples"]


def validate_local(report, ds, version, src, on, key_type, types, unmatched_out, storage_options):
    """In this process: load and check the source; return the lookup as a table function."""
    labels, facts = load_broadcast(src, on, key_type, types)
    duplicate_error(src, on, facts["duplicates"], facts["examples"])
    fragments = [f.fragment_id for f in ds.get_fragments()]
    found = found_mask(labels, ds.uri, version, fragments, on, storage_options)
    result = unmatched(labels, found, on, unmatched_out, dict(src.storage_options))
    _record(report, facts, result)
    columns = list(types)
    return lambda table: lookup(table, labels, on, columns)


def validate_broadcast(
    report, ds, version, src, on, key_type, types, unmatched_out, storage_options
):
    """Load the source once on a worker; check it; return the lookup transform."""
    import ray

    labels_ref, facts_ref = ray.remote(num_returns=2)(load_broadcast).remote(
        src, on, key_type, types
    )
    facts = ray.get(facts_ref)
    duplicate_error(src, on, facts["duplicates"], facts["examples"])
    fragments = [f.fragment_id for f in ds.get_fragments()]
    cpus = max(1, int(ray.available_resources().get("CPU", 1)))
    groups = [fragments[i :: cpus * 2] for i in range(min(len(fragments), cpus * 2))]
    found = ray.remote(num_cpus=0.5)(_found_in_fragments)
    masks = ray.get(
        [found.remote([labels_ref], ds.uri, version, g, on, storage_options) for g in groups]
    )
    result = ray.get(
        ray.remote(num_cpus=0.5)(_finish_broadcast_validation).remote(
            [labels_ref], masks, on, unmatched_out, dict(src.storage_options)
        )
    )
    _record(report, facts, result)
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
