"""k-means (IVF) and vector helpers shared by the index build, recall and dedup.

``index.py`` (the IVF_PQ rebuild), ``recall.py`` (exact neighbours) and
``dedup`` (SemDeDup's partitions) all read fixed-size float-list columns,
split fragments into balanced groups for Ray tasks, sample training rows
and train Lance's k-means. Those pieces live here so that none of those
modules imports another's internals, and ``index`` and ``recall`` no longer
import each other.

Nothing here imports Ray: the sampler runs as a Ray task only because its
callers wrap it with ``ray.remote``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from laion_ray.errors import LaionRayError


def batch_vectors(arr: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """``(float32 [n, dim] matrix, valid mask)`` of a fixed-size-list array chunk.

    Null and NaN vectors are marked invalid rather than dropped so that row
    positions stay aligned with the fragment's offsets.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    dim = arr.type.list_size
    flat = arr.values.slice(arr.offset * dim, len(arr) * dim)
    vecs = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    valid = ~np.isnan(vecs).any(axis=1)
    if arr.null_count:
        valid &= arr.is_valid().to_numpy(zero_copy_only=False)
    return vecs, valid


def vector_dim(ds, column: str) -> int:
    """Dimension of a fixed-size float-list column, or a ``LaionRayError`` naming it."""
    if column not in ds.schema.names:
        raise LaionRayError(f"no column {column!r} in {ds.uri} (columns: {ds.schema.names})")
    t = ds.schema.field(column).type
    if not (pa.types.is_fixed_size_list(t) and pa.types.is_floating(t.value_type)):
        raise LaionRayError(
            f"column {column!r} is {t}, not a vector column (fixed_size_list<float, dim>)"
        )
    return t.list_size


def balanced_groups(fragments: Sequence[tuple[int, int]], n: int) -> list[list[int]]:
    """Split ``(fragment_id, rows)`` into at most ``n`` groups of similar row counts.

    Largest fragment first into the lightest group; each group's ids sorted.
    """
    groups: list[list[int]] = [[] for _ in range(max(1, min(n, len(fragments))))]
    loads = [0] * len(groups)
    for fid, rows in sorted(fragments, key=lambda f: -f[1]):
        i = loads.index(min(loads))
        groups[i].append(fid)
        loads[i] += rows
    return [sorted(g) for g in groups if g]


def sample_vectors(
    uri: str,
    version: int,
    storage_options: Mapping[str, str] | None,
    column: str,
    picks: Mapping[int, tuple[int, np.ndarray]],
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Scan some fragments once: random training rows, query rows, NaN count.

    Meant to run as a Ray task (``num_returns=5``) on a group of fragments.

    Args:
        uri, version, storage_options: The dataset, pinned.
        column: Vector column.
        picks: Fragment id -> (training quota, sorted query offsets). Query
            rows are held out of training so recall is measured on unseen vectors.
        seed: Base seed; each fragment draws with ``seed + fragment_id``.

    Returns:
        ``(training vectors, query vectors, query row ids, NaN/null rows,
        training rows)``.
    """
    import lance

    ds = lance.dataset(uri, version=version, storage_options=dict(storage_options or {}))
    train, queries, qids, nan_rows = [], [], [], 0
    for fid, (quota, qoffsets) in picks.items():
        frag = ds.get_fragment(fid)
        n = frag.count_rows()
        rng = np.random.default_rng(seed + fid)
        candidates = np.setdiff1d(np.arange(n), qoffsets)
        chosen = np.sort(rng.choice(candidates, size=min(quota, len(candidates)), replace=False))
        start = 0
        for batch in frag.scanner(columns=[column], with_row_id=True).to_batches():
            vecs, valid = batch_vectors(batch.column(column))
            nan_rows += int((~valid).sum())
            end = start + len(vecs)
            sel = chosen[(chosen >= start) & (chosen < end)] - start
            train.append(vecs[sel][valid[sel]].copy())
            qsel = qoffsets[(qoffsets >= start) & (qoffsets < end)] - start
            qsel = qsel[valid[qsel]]
            queries.append(vecs[qsel].copy())
            qids.append(batch.column("_rowid").to_numpy()[qsel])
            start = end
    dim = ds.schema.field(column).type.list_size
    cat = lambda xs, shape: np.concatenate(xs) if xs else np.empty(shape, np.float32)  # noqa: E731
    sample = cat(train, (0, dim))
    return sample, cat(queries, (0, dim)), cat(qids, (0,)), nan_rows, len(sample)


def train_ivf(sample: np.ndarray, partitions, metric, sample_rate, use_gpu, tmp: str):
    """``(builder, IVF model)``: Lance's k-means over ``sample`` (``[n, dim]``), as
    single-node ``create_index`` trains it; ``dedup`` partitions with it too.

    The sample is written to a scratch Lance dataset under ``tmp`` so that the
    trainer is exactly the one ``create_index`` runs, on the GPU (Lance's
    ``accelerator``) when ``use_gpu``.
    """
    import lance
    from lance.indices import IndicesBuilder

    vec = pa.FixedSizeListArray.from_arrays(pa.array(sample.ravel()), sample.shape[1])
    scratch = lance.write_dataset(pa.table({"v": vec}), f"{tmp}/sample.lance")
    builder = IndicesBuilder(scratch, "v")
    ivf = builder.train_ivf(
        partitions,
        distance_type=metric,
        # Same row count as single-node create_index: partitions x sample_rate.
        sample_rate=max(2, min(sample_rate, len(sample) // partitions)),
        accelerator="cuda" if use_gpu else None,
    )
    return builder, ivf
