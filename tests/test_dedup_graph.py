"""``laion_ray.dedup.graph``: pairs, components and the keep rule, without Ray."""

from __future__ import annotations

import numpy as np
import pytest

from laion_ray.dedup import graph
from laion_ray.dedup.tasks import make_plan


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute(x: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    sims = x @ x.T
    a, b = np.nonzero(np.triu(sims >= threshold, k=1))
    return set(zip(a.tolist(), b.tolist(), strict=True))


@pytest.fixture
def vectors() -> np.ndarray:
    rng = np.random.default_rng(0)
    base = _unit(rng.standard_normal((300, 32)))
    copies = _unit(base[:60] + 0.02 * rng.standard_normal((60, 32)))
    return np.concatenate([base, copies])


@pytest.mark.parametrize("block", [7, 64, 4096])
def test_similar_pairs_equal_brute_force_at_any_block_size(vectors, block, monkeypatch):
    monkeypatch.setattr(graph, "BLOCK_ROWS", block)
    a, b = graph.similar_pairs(vectors, np.ones(len(vectors), bool), 0.95)
    found = {tuple(sorted(p)) for p in zip(a.tolist(), b.tolist(), strict=True)}
    truth = _brute(vectors, 0.95)
    assert len(truth) >= 60 and found == truth and len(a) == len(truth)


def test_similar_pairs_skip_old_old_pairs(vectors, monkeypatch):
    monkeypatch.setattr(graph, "BLOCK_ROWS", 50)
    new = np.zeros(len(vectors), bool)
    new[330:] = True  # the last 30 copies are new; their sources (30..59) old
    a, b = graph.similar_pairs(vectors, new, 0.95)
    found = {tuple(sorted(p)) for p in zip(a.tolist(), b.tolist(), strict=True)}
    truth = {p for p in _brute(vectors, 0.95) if new[p[0]] or new[p[1]]}
    assert found == truth and len(truth) >= 30


def test_cross_pairs_find_only_pairs_across(vectors):
    left, right = vectors[:320], vectors[320:]
    a, b = graph.cross_pairs(left, right, np.ones(320, bool), np.ones(40, bool), 0.95)
    truth = {(i, j - 320) for i, j in _brute(vectors, 0.95) if i < 320 <= j}
    assert set(zip(a.tolist(), b.tolist(), strict=True)) == truth


def test_components_chains_and_cycles():
    a = np.array([10, 11, 12, 50, 51, 99])
    b = np.array([11, 12, 13, 51, 50, 13])
    nodes, roots = graph.components(a, b)
    assert dict(zip(nodes.tolist(), roots.tolist(), strict=True)) == {
        10: 10, 11: 10, 12: 10, 13: 10, 99: 10, 50: 50, 51: 50,
    }  # fmt: skip


def test_components_long_chain_converges():
    n = 5000
    order = np.random.default_rng(1).permutation(n)
    nodes, roots = graph.components(order[:-1], order[1:])
    assert len(nodes) == n and set(roots.tolist()) == {0}


def test_equal_value_pairs_link_every_copy():
    values = np.array([5, 7, 5, 9, 5, 7])
    a, b = graph.equal_value_pairs(values, np.ones(6, bool))
    nodes, roots = graph.components(a, b)
    assert dict(zip(nodes.tolist(), roots.tolist(), strict=True)) == {
        0: 0, 2: 0, 4: 0, 1: 1, 5: 1,
    }  # fmt: skip


def test_kept_row_is_highest_score_then_smallest_key():
    nodes = np.array([1, 2, 3, 4, 5])
    roots = np.array([1, 1, 1, 4, 4])
    keys = np.array([100, 200, 300, 400, 500])
    scores = np.array([0.3, 0.9, np.nan, 0.5, 0.5])
    addr, group, dup = graph.assign_groups(nodes, roots, keys, scores, np.full(5, -1))
    assert addr.tolist() == [1, 2, 3, 4, 5]
    assert group.tolist() == [200, 200, 200, 400, 400]
    assert dup.tolist() == [True, False, True, False, True]


def test_no_pairs_no_groups():
    empty = np.empty(0, np.int64)
    nodes, roots = graph.components(empty, empty)
    addr, group, dup = graph.assign_groups(nodes, roots, empty, np.empty(0), empty)
    assert len(nodes) == len(addr) == len(group) == len(dup) == 0


def test_new_rows_join_the_old_group_and_old_rows_stay():
    nodes = np.array([1, 2, 3, 7, 8])
    roots = np.array([1, 1, 1, 7, 7])
    keys = np.array([10, 20, 30, 70, 80])
    scores = np.array([0.1, 0.99, 0.2, 0.5, 0.4])
    old = np.array([10, -1, -1, -1, -1])  # node 1 was grouped before, as group 10
    addr, group, dup = graph.assign_groups(nodes, roots, keys, scores, old)
    assert addr.tolist() == [2, 3, 7, 8]  # old rows are not returned
    assert group.tolist() == [10, 10, 70, 70]
    assert dup.tolist() == [True, True, False, True]


def test_plan_splits_oversized_partitions_and_bounds_groups():
    rng = np.random.default_rng(2)
    centroids = _unit(rng.standard_normal((8, 16)))
    # Most of the sample sits near centroid 0: that partition must be split.
    sample = np.concatenate([centroids[:1] + 0.01 * rng.standard_normal((800, 16)),
                             _unit(rng.standard_normal((200, 16)))]).astype(np.float32)  # fmt: skip
    plan = make_plan(sample, centroids, rows=10_000, max_rows=2_000)
    assert plan.blocks[0] > 1 and plan.blocks.max() == plan.blocks[0]
    s = plan.blocks
    assert len(plan.cell_group) == int((s * (s + 1) // 2).sum())
    cell_rows = np.repeat(np.where(s > 1, 2 * plan.estimated_rows // s, plan.estimated_rows),
                          s * (s + 1) // 2)  # fmt: skip
    loads = np.bincount(plan.cell_group, weights=cell_rows)
    assert plan.groups == len(loads) and loads.max() <= 2_000


def test_merge_without_pairs_writes_nothing(tmp_path):
    from laion_ray.dedup.tasks import _nodes_table, merge_components

    empty = np.empty(0, np.int64)
    facts = merge_components(str(tmp_path), None, _nodes_table(empty, empty, None))
    assert (facts["grouped_rows"], facts["duplicates"], facts["fragments"]) == (0, 0, 0)
    assert not (tmp_path / "groups").exists()
