"""The maths of dedup, without Ray: pairs above a cosine threshold, components, kept rows.

Nodes are row addresses (``fragment_id << 32 | offset``), so every result can be
written back to its fragment without a key lookup.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# Rows per side of one similarity block (4 MiB of float32). Small enough that the
# upper triangle of a partition skips most of the lower blocks, large enough for
# an efficient matmul.
BLOCK_ROWS = 1024


def _blocks(n: int, start: int = 0, step: int = BLOCK_ROWS) -> Iterator[tuple[int, int]]:
    for lo in range(start, n, step):
        yield lo, min(n, lo + step)


def _above(q: np.ndarray, c: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)`` with ``q[i] . c[j] >= threshold``.

    numpy's BLAS matmul is as fast as torch's on CPU here (18 ms per block
    pair both), and a fresh Ray worker then needn't import torch (4-6 s).
    """
    return np.nonzero(q @ c.T >= threshold)


def similar_pairs(
    vectors: np.ndarray, new: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows of one partition with cosine >= ``threshold``, at least one of them new.

    Block-wise, so memory is the rows plus one ``BLOCK_ROWS``-square block.
    New rows are ordered first and each block of them is compared only with
    the rows after its own start: every new-new pair is computed once and no
    old-old pair at all (old rows were grouped by an earlier run).

    Args:
        vectors: ``[n, dim]`` float32, unit norm.
        new: ``[n]`` bool, rows to group in this run.
        threshold: Cosine threshold.

    Returns:
        ``(a, b)``: row indices of the pairs, ``a != b``.
    """
    order = np.argsort(~new, kind="stable")
    x = np.ascontiguousarray(vectors[order], dtype=np.float32)
    n_new = int(new.sum())
    pa_, pb_ = [], []
    for qlo, qhi in _blocks(n_new):
        for clo, chi in _blocks(len(x), qlo):
            i, j = _above(x[qlo:qhi], x[clo:chi], threshold)
            i, j = i + qlo, j + clo
            keep = i < j
            pa_.append(i[keep])
            pb_.append(j[keep])
    if not pa_:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return order[np.concatenate(pa_)], order[np.concatenate(pb_)]


def cross_pairs(
    left: np.ndarray, right: np.ndarray, new_left: np.ndarray, new_right: np.ndarray, threshold
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i in left, j in right)`` with cosine >= ``threshold``, one of them new.

    Used for the block pairs of a partition too large for one task.
    """
    pa_, pb_ = [], []
    for llo, lhi in _blocks(len(left)):
        if not (new_left[llo:lhi].any() or new_right.any()):
            continue
        for rlo, rhi in _blocks(len(right)):
            i, j = _above(left[llo:lhi], right[rlo:rhi], threshold)
            i, j = i + llo, j + rlo
            keep = new_left[i] | new_right[j]
            pa_.append(i[keep])
            pb_.append(j[keep])
    if not pa_:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(pa_), np.concatenate(pb_)


def equal_value_pairs(values: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows with equal ``values`` (e.g. md5), at least one new: a chain per value."""
    order = np.lexsort((~new, values))  # new rows first within a value
    v = values[order]
    same = v[1:] == v[:-1]
    a, b = order[:-1][same], order[1:][same]
    keep = new[a] | new[b]
    return a[keep], b[keep]


def components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the graph with edges ``a[i] -- b[i]`` (node ids int64).

    Min-label propagation with pointer jumping, vectorised in numpy: each
    round every node takes the smallest label on its edges, then its label's
    label. Labels only fall and stay inside the component, so the fixpoint
    labels every node with its component's smallest node.

    Returns:
        ``(nodes, roots)``: every node that has an edge, and its component's
        smallest node.
    """
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    ea, eb = inverse[: len(a)], inverse[len(a) :]
    label = np.arange(len(nodes))
    while True:
        low = np.minimum(label[ea], label[eb])
        new = label.copy()
        np.minimum.at(new, ea, low)
        np.minimum.at(new, eb, low)
        new = new[new]
        if np.array_equal(new, label):
            break
        label = new
    return nodes, nodes[label]


def assign_groups(
    nodes: np.ndarray,
    roots: np.ndarray,
    keys: np.ndarray,
    scores: np.ndarray,
    old_groups: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``dup_group`` and ``is_duplicate`` of the new rows of each component.

    The kept row of a component is the one with the highest score; ties go
    to the smallest key. A component that reaches rows grouped by an earlier
    run (``old_groups >= 0``) does not elect a new kept row: its new rows join
    the existing group (the smallest one, if they bridge several), so no old
    row ever changes.

    Args:
        nodes: Row addresses.
        roots: Component of each node (see :func:`components`).
        keys: ``key`` of each node.
        scores: Keep score of each node (NaN ranks last).
        old_groups: Earlier ``dup_group`` of each node, -1 for new rows.

    Returns:
        ``(addresses, dup_group, is_duplicate)`` for the new rows, by address.
    """
    if not len(nodes):
        return nodes, nodes.copy(), np.zeros(0, bool)
    scores = np.where(np.isnan(scores), -np.inf, scores)
    order = np.lexsort((keys, -scores, roots))
    roots_o = roots[order]
    first = np.flatnonzero(np.r_[True, roots_o[1:] != roots_o[:-1]])
    kept = order[first]  # best row of each component
    comp = np.searchsorted(roots_o[first], roots)
    group = keys[kept][comp]
    is_dup = nodes != nodes[kept][comp]
    old = old_groups >= 0
    if old.any():
        join = np.full(len(first), np.iinfo(np.int64).max)
        np.minimum.at(join, comp[old], old_groups[old])
        joined = join[comp] != np.iinfo(np.int64).max
        group = np.where(joined, join[comp], group)
        is_dup |= joined
    new = ~old
    by_addr = np.argsort(nodes[new], kind="stable")
    return nodes[new][by_addr], group[new][by_addr], is_dup[new][by_addr]
