"""Dedup's Ray tasks: train the partitions, assign rows, compare per group, merge components.

Data moves between the stages as files under the job's scratch directory (same
store as the checkpoints), so tasks exchange only URIs and small facts:

- ``assign`` (one task per chunk of a fragment) writes one Arrow IPC file whose
  record batch ``g`` holds the chunk's rows for compare group ``g``;
- ``compare`` (one task per group) reads batch ``g`` of every chunk file, so its
  memory is bounded by the group's rows, which the plan keeps under
  ``max_rows``;
- ``merge`` (one task) joins the groups' components and writes one small
  result file per fragment, holding only rows that have a duplicate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laion_ray.dedup import graph
from laion_ray.filters import sql_and
from laion_ray.ivf import batch_vectors, train_ivf
from laion_ray.storage import filesystem, join_uri, resolve_storage_options

# Vectors travel between tasks as float16: half the shuffle, and the cosine of two
# unit vectors moves by ~1e-4 at most, far below any useful threshold's margin.
SHUFFLE_DTYPE = np.float16
NEIGHBOURS = 2  # every row goes to its nearest 2 partitions: boundary pairs meet


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Logical rows ``[offset, offset + limit)`` of one fragment."""

    index: int
    fragment_id: int
    offset: int
    limit: int


@dataclasses.dataclass
class Plan:
    """Partitions and how they map onto compare groups (small: O(partitions)).

    A partition too large for one task is cut into ``blocks[p]`` blocks by a
    hash of the row address; every block pair ``(i <= j)`` is one *cell*, so
    all of its pairs are still compared, each cell holding two blocks at most.
    Cells (whole partitions, mostly) are packed into groups of at most
    ``max_rows`` estimated rows: one compare task per group.
    """

    centroids: np.ndarray  # [P, dim] float32, unit norm
    blocks: np.ndarray  # [P] blocks of each partition (1: whole)
    cell_base: np.ndarray  # [P] first cell of each partition
    cell_group: np.ndarray  # [cells] group of each cell
    groups: int
    estimated_rows: np.ndarray  # [P] estimated members (nearest-2) of each partition


def _tri(i: np.ndarray, j: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Index of block pair ``(i <= j)`` among the ``s (s + 1) / 2`` pairs of ``s`` blocks."""
    return i * s - i * (i - 1) // 2 + (j - i)


def _nearest(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """``[n, k]`` indices of each unit vector's nearest ``k = min(2, P)`` centroids."""
    sims = vectors @ centroids.T
    if len(centroids) <= NEIGHBOURS:
        return np.argsort(-sims, axis=1, kind="stable")
    # argpartition, not a full sort: partitions can number thousands.
    return np.argpartition(-sims, NEIGHBOURS - 1, axis=1)[:, :NEIGHBOURS]


def _normalise(vectors: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(vectors, axis=1)
    valid = valid & (norms > 0)
    out = np.zeros_like(vectors)
    out[valid] = vectors[valid] / norms[valid, None]
    return out, valid


def make_plan(sample: np.ndarray, centroids: np.ndarray, rows: int, max_rows: int) -> Plan:
    """Size partitions from the sample's nearest-2 counts; split and pack them into groups."""
    parts = len(centroids)
    sample, valid = _normalise(sample, np.ones(len(sample), bool))
    counts = np.bincount(_nearest(sample[valid], centroids).ravel(), minlength=parts)
    est = np.ceil(counts * rows / max(1, valid.sum())).astype(np.int64)
    # A cell of two blocks must fit: blocks of at most max_rows / 2 rows.
    blocks = np.where(est > max_rows, np.ceil(2 * est / max_rows), 1).astype(np.int64)
    cells_per = blocks * (blocks + 1) // 2
    cell_base = np.concatenate([[0], np.cumsum(cells_per)[:-1]]).astype(np.int64)
    cell_rows = np.repeat(np.where(blocks > 1, 2 * est // blocks, est), cells_per)
    cell_group = np.empty(len(cell_rows), np.int64)
    group, load = 0, 0
    for c, n in enumerate(cell_rows):  # O(cells) first-fit in order
        if load and load + n > max_rows:
            group, load = group + 1, 0
        cell_group[c], load = group, load + n
    return Plan(centroids, blocks, cell_base, cell_group, group + 1, est)


def train_plan(
    sample_refs, partitions: int, sample_rate: int, rows: int, max_rows: int, use_gpu: bool
) -> tuple[Plan, int]:
    """Worker task: k-means centroids with the index build's trainer; ``(plan, groups)``."""
    import ray

    sample = np.concatenate([s for s in ray.get(list(sample_refs)) if len(s)])
    if partitions == 1:
        centroids = sample.mean(axis=0, keepdims=True)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            _, ivf = train_ivf(sample, partitions, "cosine", sample_rate, use_gpu, tmp)
        cents = ivf.centroids
        centroids = cents.values.to_numpy().reshape(len(cents), -1).astype(np.float32)
    centroids, _ = _normalise(centroids.astype(np.float32), np.ones(len(centroids), bool))
    plan = make_plan(sample, centroids, rows, max_rows)
    return plan, plan.groups


def _block_of(addresses: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """A stable pseudo-random block per row: a Fibonacci hash of its address."""
    mixed = addresses.astype(np.uint64) * np.uint64(11400714819323198485)
    return ((mixed >> np.uint64(32)) % blocks.astype(np.uint64)).astype(np.int64)


def md5_ids(md5: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(64-bit ids, valid)`` of hex md5 strings (the first 16 hex digits)."""
    valid = pc.is_valid(md5).to_numpy(zero_copy_only=False)
    hexes = pc.utf8_slice_codeunits(pc.fill_null(md5, "0" * 16), 0, 16).to_pylist()
    ids = np.array([int(h or "0", 16) for h in hexes], np.uint64).view(np.int64)
    return ids, valid


VECTOR_FIELDS = [
    ("cell", pa.int64()),
    ("side", pa.int8()),
    ("node", pa.int64()),
    ("key", pa.int64()),
    ("score", pa.float64()),
    ("old_group", pa.int64()),
]
MD5_SCHEMA = pa.schema([*VECTOR_FIELDS[2:], ("md5", pa.int64())])


def _write_grouped(path: str, table: pa.Table, group: np.ndarray, groups: int, opts) -> None:
    """One IPC file, record batch ``g`` = the rows of group ``g`` (possibly empty)."""
    order = np.argsort(group, kind="stable")
    table = table.take(pa.array(order))
    bounds = np.searchsorted(group[order], np.arange(groups + 1))
    fs, fs_path = filesystem(path, opts)
    parent = fs_path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(fs_path) as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for g in range(groups):
            batch = table.slice(int(bounds[g]), int(bounds[g + 1] - bounds[g]))
            writer.write_batch(batch.combine_chunks().to_batches()[0] if batch.num_rows else
                               pa.RecordBatch.from_pylist([], schema=table.schema))  # fmt: skip


def score_columns(keep: str) -> list[str]:
    """Columns the keep rule reads (see ``laion_ray.dedup.KEEP_RULES``)."""
    return {"first": [], "largest": ["width", "height"]}.get(keep, [keep])


def keep_scores(table: pa.Table, keep: str) -> np.ndarray:
    """Higher is kept; NaN (null) ranks last."""
    n = table.num_rows
    if keep == "first":
        return np.zeros(n)
    if keep == "largest":
        w = pc.cast(table["width"], pa.float64()).to_numpy(zero_copy_only=False)
        h = pc.cast(table["height"], pa.float64()).to_numpy(zero_copy_only=False)
        return w * h
    return pc.cast(table[keep], pa.float64()).to_numpy(zero_copy_only=False)


def _selected(ds, fragment_id: int, addresses: np.ndarray, where: str | None) -> np.ndarray:
    """Which of a chunk's rows (by row address) pass ``where``.

    A second scan of the chunk's address range, reading only the filter's
    columns: a filtered scan cannot be cut by ``offset``/``limit`` (they count
    matching rows), and the chunk's rows must stay the ones it was planned with.
    """
    if not where or not len(addresses):
        return np.ones(len(addresses), bool)
    bounds = f"_rowaddr >= {int(addresses.min())} AND _rowaddr <= {int(addresses.max())}"
    passing = (
        ds.get_fragment(fragment_id)
        .scanner(columns=[], filter=sql_and(where, bounds), with_row_address=True)
        .to_table()["_rowaddr"]
        .to_numpy()
        .astype(np.int64)
    )
    return np.isin(addresses, passing)


def assign_chunk(
    uri: str,
    version: int,
    storage_options: Mapping[str, str] | None,
    chunk: Chunk,
    column: str,
    keep: str,
    exact: bool,
    incremental: bool,
    plan: Plan,
    out_dir: str,
    where: str | None = None,
) -> dict:
    """Worker task: place one chunk's rows in their nearest partitions' cells; write them.

    Only rows that pass ``where`` (Lance SQL) take part: the others are never
    compared, so they are nobody's duplicate.

    Returns:
        Facts: rows, rows with a valid vector, row copies written.
    """
    import lance

    opts = resolve_storage_options(storage_options)
    ds = lance.dataset(uri, version=version, storage_options=opts)
    columns = ["key", column, *score_columns(keep), *(["md5"] if exact else [])]
    columns += ["dup_group"] if incremental else []
    table = (
        ds.get_fragment(chunk.fragment_id)
        .scanner(columns=columns, with_row_address=True, offset=chunk.offset, limit=chunk.limit)
        .to_table()
    )
    nodes = table["_rowaddr"].to_numpy().astype(np.int64)
    selected = _selected(ds, chunk.fragment_id, nodes, where)
    vectors, valid = batch_vectors(table[column])
    vectors, valid = _normalise(vectors, valid & selected)
    keys = table["key"].to_numpy(zero_copy_only=False)
    scores = keep_scores(table, keep)
    old = (
        pc.fill_null(table["dup_group"], -1).to_numpy()
        if incremental
        else np.full(len(nodes), -1, np.int64)
    )

    rows = np.flatnonzero(valid)
    nearest = _nearest(vectors[rows], plan.centroids)  # [n, k]
    row_of = np.repeat(rows, nearest.shape[1])
    part = nearest.ravel()
    blocks = plan.blocks[part]
    cell = plan.cell_base[part]  # whole partitions: their only cell
    side = np.zeros(len(part), np.int8)
    split = np.flatnonzero(blocks > 1)
    if len(split):  # a row of block k goes to every pair (k, j): s copies
        s = blocks[split]
        k = _block_of(nodes[row_of[split]], s)
        reps = np.repeat(np.arange(len(split)), s)
        j = np.concatenate([np.arange(n) for n in s])
        kk, ss = k[reps], s[reps]
        lo, hi = np.minimum(kk, j), np.maximum(kk, j)
        extra_cell = plan.cell_base[part[split]][reps] + _tri(lo, hi, ss)
        extra_side = ((kk == hi) & (lo != hi)).astype(np.int8)
        whole = np.setdiff1d(np.arange(len(part)), split)
        row_of = np.concatenate([row_of[whole], row_of[split][reps]])
        cell = np.concatenate([cell[whole], extra_cell])
        side = np.concatenate([side[whole], extra_side])
    half = vectors[row_of].astype(SHUFFLE_DTYPE)
    out = pa.table(
        [
            pa.array(cell, pa.int64()),
            pa.array(side),
            pa.array(nodes[row_of]),
            pa.array(keys[row_of], pa.int64()),
            pa.array(scores[row_of], pa.float64()),
            pa.array(old[row_of], pa.int64()),
            pa.FixedSizeListArray.from_arrays(pa.array(half.ravel()), vectors.shape[1]),
        ],
        schema=pa.schema([*VECTOR_FIELDS, ("vec", pa.list_(pa.float16(), vectors.shape[1]))]),
    )
    name = f"{chunk.index:08d}"
    _write_grouped(join_uri(out_dir, "vec", name + ".arrow"), out, plan.cell_group[cell],
                   plan.groups, opts)  # fmt: skip
    if exact:
        ids, has = md5_ids(table["md5"].combine_chunks())
        r = np.flatnonzero(has & selected)
        md5 = pa.table(
            [pa.array(nodes[r]), pa.array(keys[r], pa.int64()), pa.array(scores[r]),
             pa.array(old[r], pa.int64()), pa.array(ids[r])],
            schema=MD5_SCHEMA,
        )  # fmt: skip
        bucket = (ids[r].view(np.uint64) % np.uint64(plan.groups)).astype(np.int64)
        _write_grouped(join_uri(out_dir, "md5", name + ".arrow"), md5, bucket, plan.groups, opts)
    return {"rows": len(nodes), "copies": len(row_of), "rss_mb": peak_rss_mb()}


def _read_group(paths: Sequence[str], group: int, opts) -> pa.Table | None:
    batches = []
    for path in paths:
        fs, fs_path = filesystem(path, opts)
        with fs.open_input_file(fs_path) as f:
            batch = pa.ipc.open_file(f).get_batch(group)
        if batch.num_rows:
            batches.append(batch)
    return pa.Table.from_batches(batches) if batches else None


def compare_group(
    group: int,
    vec_paths: Sequence[str],
    md5_paths: Sequence[str],
    threshold: float,
    storage_options: Mapping[str, str] | None,
) -> tuple[pa.Table, dict]:
    """Worker task: every pair above ``threshold`` in this group's cells, as components.

    Returns:
        ``(nodes table, facts)``: node, root (its component's smallest node),
        key, score, old_group of each row that has a pair; rows and pairs seen.
    """
    opts = resolve_storage_options(storage_options)
    edges_a, edges_b, attrs = [], [], []
    rows = pairs = 0
    table = _read_group(vec_paths, group, opts)
    if table is not None:
        rows = table.num_rows
        cells = table["cell"].to_numpy()
        order = np.argsort(cells, kind="stable")
        bounds = np.flatnonzero(np.r_[True, cells[order][1:] != cells[order][:-1], True])
        dim = table.schema.field("vec").type.list_size
        flat = table["vec"].combine_chunks().values.to_numpy(zero_copy_only=False)
        vectors = flat.reshape(-1, dim)
        nodes = table["node"].to_numpy()
        new = table["old_group"].to_numpy() < 0
        side = table["side"].to_numpy()
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            idx = order[lo:hi]
            if not new[idx].any():
                continue  # old rows only: grouped by an earlier run
            x = vectors[idx].astype(np.float32)
            right = side[idx] == 1
            if right.any():
                a, b = graph.cross_pairs(x[~right], x[right], new[idx][~right], new[idx][right],
                                         threshold)  # fmt: skip
                a, b = idx[~right][a], idx[right][b]
            else:
                a, b = graph.similar_pairs(x, new[idx], threshold)
                a, b = idx[a], idx[b]
            edges_a.append(nodes[a])
            edges_b.append(nodes[b])
        pairs = sum(len(a) for a in edges_a)
        attrs.append(table.select(["node", "key", "score", "old_group"]))
    md5 = _read_group(md5_paths, group, opts) if md5_paths else None
    if md5 is not None:
        a, b = graph.equal_value_pairs(md5["md5"].to_numpy(), md5["old_group"].to_numpy() < 0)
        nodes = md5["node"].to_numpy()
        edges_a.append(nodes[a])
        edges_b.append(nodes[b])
        attrs.append(md5.select(["node", "key", "score", "old_group"]))
        rows += md5.num_rows
    if not edges_a:
        empty = np.empty(0, np.int64)
        return _nodes_table(empty, empty, None), {"rows": rows, "pairs": 0, "rss_mb": 0.0}
    members, roots = graph.components(np.concatenate(edges_a), np.concatenate(edges_b))
    facts = {"rows": rows, "pairs": pairs, "rss_mb": peak_rss_mb()}
    return _nodes_table(members, roots, pa.concat_tables(attrs)), facts


def _nodes_table(members: np.ndarray, roots: np.ndarray, attrs: pa.Table | None) -> pa.Table:
    if attrs is None or not len(members):
        attrs = pa.table({"node": pa.array([], pa.int64()), "key": pa.array([], pa.int64()),
                          "score": pa.array([], pa.float64()),
                          "old_group": pa.array([], pa.int64())})  # fmt: skip
    nodes = attrs["node"].to_numpy()
    uniq, first = np.unique(nodes, return_index=True)
    pos = first[np.searchsorted(uniq, members)] if len(members) else np.empty(0, np.int64)
    picked = attrs.take(pa.array(pos, pa.int64()))
    return picked.append_column("root", pa.array(roots, pa.int64()))


RESULT_SCHEMA = pa.schema(
    [("_rowaddr", pa.uint64()), ("dup_group", pa.int64()), ("is_duplicate", pa.bool_())]
)


def merge_components(
    out_dir: str, storage_options: Mapping[str, str] | None, *tables: pa.Table
) -> dict:
    """Worker task: components across groups; write each fragment's grouped new rows.

    Memory is that of the rows that have a duplicate (a few dozen bytes each).
    """
    opts = resolve_storage_options(storage_options)
    table = pa.concat_tables(tables)
    nodes, first = np.unique(table["node"].to_numpy(), return_index=True)
    attrs = table.take(pa.array(first, pa.int64()))
    members, roots = graph.components(table["node"].to_numpy(), table["root"].to_numpy())
    assert np.array_equal(members, nodes)
    addr, group, is_dup = graph.assign_groups(
        nodes,
        roots,
        attrs["key"].to_numpy(),
        attrs["score"].to_numpy(),
        attrs["old_group"].to_numpy(),
    )
    fragments = addr >> 32
    bounds = np.flatnonzero(np.r_[True, fragments[1:] != fragments[:-1], True])
    bounds = bounds if len(addr) else bounds[:1]  # no pairs at all: no file
    fs, _ = filesystem(out_dir, opts)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        part = pa.table(
            [pa.array(addr[lo:hi].astype(np.uint64)), pa.array(group[lo:hi]),
             pa.array(is_dup[lo:hi])],
            schema=RESULT_SCHEMA,
        )  # fmt: skip
        path = join_uri(out_dir, "groups", f"{int(fragments[lo])}.arrow")
        fs_path = filesystem(path, opts)[1]
        fs.create_dir(fs_path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(fs_path) as sink, pa.ipc.new_file(sink, RESULT_SCHEMA) as w:
            w.write_table(part)
    kept_groups = len(np.unique(group[~is_dup])) if len(group) else 0
    return {
        "grouped_rows": len(addr),
        "duplicates": int(is_dup.sum()),
        "new_groups": kept_groups,
        "fragments": len(bounds) - 1,
        "rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    """This worker process's peak RSS (workers are reused: an upper bound for the task)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def params_hash(params: Mapping[str, object]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def chunks_of(fragments: Sequence[tuple[int, int]], rows_per_chunk: int) -> list[Chunk]:
    """Cut ``(fragment_id, rows)`` into chunks of at most ``rows_per_chunk`` rows."""
    out = []
    for fid, rows in fragments:
        for offset in range(0, rows, rows_per_chunk):
            out.append(Chunk(len(out), fid, offset, min(rows_per_chunk, rows - offset)))
    return out


def default_partitions(rows: int, partition_rows: int) -> int:
    return max(1, math.ceil(rows / partition_rows))
