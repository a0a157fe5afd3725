"""Distributed IVF_PQ rebuild, recall gate, atomic swap, and ANN search."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import lance
import numpy as np
import pyarrow as pa
import pytest

from laion_ray import recall as rc
from laion_ray.errors import JobFailed, LaionRayError
from laion_ray.index import default_sub_vectors, reindex
from laion_ray.search import search

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_table(uri, rows=3000, dim=64, fragments=4, seed=0, nan_rows=0, clusters=16):
    vecs = rc.clustered_vectors(rows, dim, clusters=clusters, seed=seed)
    vecs[:nan_rows] = np.nan
    rng = np.random.default_rng(seed)
    table = pa.table({
        "key": np.arange(rows, dtype=np.int64),
        "caption": [f"caption {i}" for i in range(rows)],
        "url": [f"https://x/{i}.jpg" for i in range(rows)],
        "similarity": rng.uniform(0.2, 0.4, rows),
        "NSFW": np.arange(rows) % 2,
        "img_emb": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), dim),
    })  # fmt: skip
    return lance.write_dataset(table, str(uri), max_rows_per_file=max(1, rows // fragments))


def index_uuids(uri):
    return [i["uuid"] for i in lance.dataset(str(uri)).list_indices()]


def plan_uses(ds, uuid, dim=64):
    q = np.ones(dim, dtype=np.float32)
    return uuid in ds.scanner(nearest={"column": "img_emb", "q": q, "k": 5}).explain_plan()


@pytest.fixture
def indexed(tmp_path):
    ds = write_table(tmp_path / "t.lance")
    ds.create_index("img_emb", "IVF_PQ", num_partitions=16, num_sub_vectors=8)
    return tmp_path / "t.lance"


def test_rebuild_replaces_existing_index_atomically(ray_session, indexed, tmp_path):
    (old,) = index_uuids(indexed)
    report = reindex(
        str(indexed), partitions=16, sub_vectors=8, tag="rebuilt",
        report_path=str(tmp_path / "r.json"), plot_path=str(tmp_path / "r.png"),
    )  # fmt: skip
    ds = lance.dataset(str(indexed))
    assert report.swapped and report.replaced == [old]
    assert index_uuids(indexed) == [report.new_index_uuid] != [old]
    assert ds.list_indices()[0]["name"] == "img_emb_idx"
    assert ds.list_indices()[0]["fragment_ids"] == {f.fragment_id for f in ds.get_fragments()}
    assert report.segments == 4 and report.recall_at_10 > 0.3
    props = ds.read_transaction(ds.version).transaction_properties
    assert props["laion_ray.job"] == "reindex"
    assert json.loads(props["laion_ray.details"])["partitions"] == 16
    assert ds.tags.list()["rebuilt"]["version"] == ds.version == report.committed_version
    assert plan_uses(ds, report.new_index_uuid)
    assert json.loads((tmp_path / "r.json").read_text())["swapped"] is True
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"

    import lancedb

    tbl = lancedb.connect(str(tmp_path)).open_table("t")
    query = tbl.search(np.ones(64, dtype=np.float32)).metric("L2").limit(5)
    assert report.new_index_uuid in query.explain_plan(verbose=True)
    assert len(query.to_list()) == 5


def test_old_index_answers_until_swap(ray_session, indexed, monkeypatch):
    (old,) = index_uuids(indexed)
    seen = {}
    real = rc.recall_grid

    def spy(staged, *args, **kwargs):
        main = lance.dataset(str(indexed))  # what every other reader sees mid-rebuild
        seen["main"] = [i["uuid"] for i in main.list_indices()]
        seen["main_plan_old"] = plan_uses(main, old)
        seen["staged"] = [i["uuid"] for i in staged.list_indices()]
        return real(staged, *args, **kwargs)

    monkeypatch.setattr(rc, "recall_grid", spy)
    report = reindex(str(indexed), partitions=16, sub_vectors=8)
    assert seen == {"main": [old], "main_plan_old": True, "staged": [report.new_index_uuid]}
    assert index_uuids(indexed) == [report.new_index_uuid]


def _during_verify(monkeypatch, action):
    """Run ``action()`` while the rebuild measures recall: after its build, before its commit."""
    real = rc.recall_grid

    def spy(*args, **kwargs):
        action()
        return real(*args, **kwargs)

    monkeypatch.setattr(rc, "recall_grid", spy)


def test_swap_commits_through_the_commit_path_on_top_of_concurrent_writers(
    ray_session, indexed, monkeypatch
):
    from laion_ray.history import job_history

    extra = write_table(indexed.parent / "extra.lance", rows=500, seed=7).to_table()

    def other_writer():  # appends rows, then adds a column: two versions after the build's
        lance.dataset(str(indexed)).insert(extra)
        lance.dataset(str(indexed)).add_columns({"doubled": "key * 2"})

    _during_verify(monkeypatch, other_writer)
    built_on = lance.dataset(str(indexed)).version
    report = reindex(str(indexed), partitions=16, sub_vectors=8, tag="ivf")
    ds = lance.dataset(str(indexed))
    assert report.swapped and report.committed_version == ds.version == built_on + 3
    assert ds.count_rows() == 3500 and "doubled" in ds.schema.names
    assert index_uuids(indexed) == [report.new_index_uuid]
    (entry,) = [e for e in job_history(str(indexed)) if e["job"] == "reindex"]
    assert entry["operation"] == "CreateIndex" and entry["details"]["partitions"] == 16
    assert entry["tags"] == ["ivf"]

    # Same tag semantics as a backfill: a rerun moves the tag instead of failing.
    monkeypatch.undo()
    again = reindex(str(indexed), partitions=16, sub_vectors=8, tag="ivf")
    assert lance.dataset(str(indexed)).tags.list()["ivf"]["version"] == again.committed_version


def test_swap_is_refused_when_the_indexed_fragments_were_rewritten(
    ray_session, indexed, monkeypatch
):
    compacted = {}

    def compact():
        ds = lance.dataset(str(indexed))
        ds.optimize.compact_files(target_rows_per_fragment=10_000)
        compacted["version"] = lance.dataset(str(indexed)).version
        compacted["indices"] = index_uuids(indexed)  # compaction remaps the old index

    _during_verify(monkeypatch, compact)
    # A writer rewrote the indexed fragments: a failed job (exit 1), not bad input.
    with pytest.raises(JobFailed, match="was rewritten by another writer"):
        reindex(str(indexed), partitions=16, sub_vectors=8)
    ds = lance.dataset(str(indexed))
    assert len(ds.get_fragments()) == 1
    assert ds.version == compacted["version"], "nothing may be committed after the compaction"
    assert index_uuids(indexed) == compacted["indices"]


def test_min_recall_gate_keeps_old_index(ray_session, indexed):
    (old,) = index_uuids(indexed)
    version = lance.dataset(str(indexed)).version
    sys.path.insert(0, str(ROOT / "jobs"))  # the entry point imports its sibling ``_common``
    spec = importlib.util.spec_from_file_location("rebuild_index", ROOT / "jobs/rebuild_index.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    # 2 sub-vectors of 32 dims cannot reach perfect recall without refine.
    argv = [str(indexed), "--partitions", "16", "--sub-vectors", "2", "--min-recall", "1.0",
            "--gate-refine-factor", "0"]  # fmt: skip
    assert job.main(argv) == 1
    ds = lance.dataset(str(indexed))
    assert ds.version == version and index_uuids(indexed) == [old]
    assert plan_uses(ds, old)


def test_rebuild_after_append_covers_new_rows(ray_session, indexed):
    ds = lance.dataset(str(indexed))
    extra = write_table(indexed.parent / "extra.lance", rows=1000, seed=5).to_table()
    ds.insert(extra)
    ds = lance.dataset(str(indexed))
    report = reindex(str(indexed), partitions=16, sub_vectors=8)
    assert report.swapped and report.rows == 4000
    covered = lance.dataset(str(indexed)).list_indices()[0]["fragment_ids"]
    assert covered == {f.fragment_id for f in ds.get_fragments()}


def test_nan_vectors_are_reported_and_excluded(ray_session, tmp_path):
    uri = str(tmp_path / "nan.lance")
    write_table(uri, rows=2000, nan_rows=37, fragments=1)
    report = reindex(uri, partitions=8, sub_vectors=8, num_workers=1)
    assert report.swapped and report.nan_rows == 37 and report.segments == 1
    assert report.sample_rows <= 2000 - 37


@pytest.mark.parametrize(
    ("kwargs", "rows", "message"),
    [
        ({"column": "caption"}, 3000, "not a vector column"),
        ({"column": "nope"}, 3000, "no column 'nope'"),
        ({"sub_vectors": 7}, 3000, "does not divide dimension 64"),
        ({"partitions": 0}, 3000, "--partitions must be a positive integer, got 0"),
        ({"metric": "hamming"}, 3000, "got 'hamming'"),
        ({"min_recall": 1.5}, 3000, "got 1.5"),
        ({"sample_rate": 1}, 3000, "got 1"),
        ({"partitions": 2000}, 3000, "too few rows to train"),
        ({}, 300, "too few rows to train: 300 rows"),
    ],
)
def test_bad_reindex_input(tmp_path, kwargs, rows, message):
    uri = str(tmp_path / "bad.lance")
    write_table(uri, rows=rows)
    with pytest.raises(LaionRayError, match=message):
        reindex(uri, **kwargs)


def test_all_nan_is_too_few_valid(ray_session, tmp_path):
    uri = str(tmp_path / "nan.lance")
    write_table(uri, rows=1000, nan_rows=900)
    with pytest.raises(LaionRayError, match="too few valid vectors to train: 100 of 1000"):
        reindex(uri, partitions=4, sub_vectors=8)


def test_default_sub_vectors_divide_dim():
    assert default_sub_vectors(768) == 48
    for dim in (64, 100, 250, 7):
        assert dim % default_sub_vectors(dim) == 0


def test_search_by_row_vector_and_prefilter(indexed, tmp_path):
    hits = search(str(indexed), row=7, k=5, refine_factor=10)
    assert len(hits) == 5 and hits[0]["caption"] == "caption 7"
    assert set(hits[0]) == {"caption", "url", "similarity", "_distance"}
    vec = lance.dataset(str(indexed)).take([7], columns=["img_emb"])["img_emb"][0].values
    np.save(tmp_path / "q.npy", vec.to_numpy())
    assert search(str(indexed), vector=str(tmp_path / "q.npy"), k=5, refine_factor=10) == hits
    odd = search(str(indexed), row=8, k=20, where='"NSFW" = 1', columns=("key", "NSFW"))
    assert len(odd) == 20 and all(h["NSFW"] == 1 for h in odd)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vector": np.zeros(3)}, r"shape \(3,\), but 'img_emb' is 64-d"),
        ({"row": 10**6}, "out of range"),
        ({}, "exactly one of"),
        ({"row": 1, "k": 0}, "--k must be a positive integer, got 0"),
        ({"text": "a cat"}, "--model"),
        ({"text": "a cat", "model": "ViT-B-32:openai"}, "ViT-B-32"),
    ],
)
def test_bad_search_input(indexed, kwargs, message):
    with pytest.raises(LaionRayError, match=message):
        search(str(indexed), **kwargs)


def test_cli_search_and_reindex_errors(indexed, capsys):
    from laion_ray.cli import main

    assert main(["search", str(indexed), "--row", "3", "--k", "2", "--refine-factor", "5"]) == 0
    assert "caption 3" in capsys.readouterr().out
    assert main(["reindex", str(indexed), "--column", "caption"]) == 2
    assert "not a vector column" in capsys.readouterr().err


@pytest.mark.slow
def test_recall_parity_with_single_node_20k_768(ray_session, tmp_path):
    uri = str(tmp_path / "p.lance")
    # ~10 rows per cluster: true neighbours are well separated, so recall is high
    # and the parity check is not dominated by sampling noise of 1000 hits.
    ds = write_table(uri, rows=20_000, dim=768, fragments=8, clusters=2000)
    params = {"num_partitions": 64, "num_sub_vectors": 48}
    single_uri = str(tmp_path / "single.lance")
    single = write_table(single_uri, rows=20_000, dim=768, fragments=8, clusters=2000)
    single.create_index("img_emb", "IVF_PQ", **params)
    report = reindex(uri, partitions=64, sub_vectors=48)
    rng = np.random.default_rng(3)
    rows = np.sort(rng.choice(20_000, 100, replace=False))
    batch = ds.take(rows, columns=["img_emb", "_rowid"])
    queries = np.stack(batch["img_emb"].to_numpy(zero_copy_only=False)).astype(np.float32)
    own = batch["_rowid"].to_numpy()
    groups = [[f.fragment_id for f in ds.get_fragments()]]
    truth = rc.exact_neighbours(uri, ds.version, None, "img_emb", groups, queries, own, 10, "l2")
    grid = {"nprobes_grid": (20,), "refine_grid": (None,)}
    dist = rc.recall_grid(lance.dataset(uri), "img_emb", queries, own, truth, **grid)[0].recall
    base = rc.recall_grid(lance.dataset(single_uri), "img_emb", queries, own, truth, **grid)
    assert report.swapped
    assert abs(dist - base[0].recall) <= 0.02, (dist, base[0].recall)


# --- the gate judges what users run ----------------------------------------------------


def _commands(text: str, needle: str) -> list[list[str]]:
    """Shell commands (continuation lines joined, comments cut) that contain ``needle``."""
    import shlex

    joined = text.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if needle in line]


def test_readme_and_job_reindex_examples_swap_the_index_as_written(
    ray_session, tmp_path, monkeypatch, capsys
):
    """The README's ``laion-ray reindex`` and ``jobs/rebuild_index.py`` lines, run on a
    generated sample with their own flags; only the job's ``s3://bucket/...`` URI is
    replaced by the sample's path."""
    from readme import README, blocks

    from laion_ray.cli import main
    from laion_ray.sample import write_sample

    monkeypatch.chdir(tmp_path)  # the examples' relative paths: ./laion.lance, recall.json
    write_sample("laion.lance", rows=1000, fragments=4, seed=2)
    bash = "\n".join(blocks("bash"))
    (cli,) = _commands(bash, "laion-ray reindex")
    assert cli[:3] == ["laion-ray", "reindex", "./laion.lance"] and "--min-recall" in cli
    jobs = [c[c.index("jobs/rebuild_index.py") + 1 :] for c in _commands(bash, "rebuild_index.py")]
    docstring = (ROOT / "jobs/rebuild_index.py").read_text()
    jobs += [
        c[c.index("jobs/rebuild_index.py") + 1 :] for c in _commands(docstring, "python jobs/")
    ]
    assert len(jobs) == 2 and all(j[0] == "s3://bucket/laion.lance" for j in jobs)

    assert main(cli[1:]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "swapped in index 'img_emb_idx'" in out
    assert "at the gate (nprobes=16, refine_factor=30)" in out
    report = json.loads((tmp_path / "recall.json").read_text())
    assert report["swapped"] and (report["gate_nprobes"], report["gate_refine_factor"]) == (16, 30)
    assert (tmp_path / "recall.png").read_bytes()[:4] == b"\x89PNG"

    job = _load_job()
    for argv in jobs:
        before = index_uuids(tmp_path / "laion.lance")
        assert job.main(["./laion.lance", *argv[1:]]) == 0
        assert index_uuids(tmp_path / "laion.lance") != before  # a new index is live
    assert "ivf-v2" in lance.dataset(str(tmp_path / "laion.lance")).tags.list()
    assert README.exists()


def _load_job():
    sys.path.insert(0, str(ROOT / "jobs"))  # the entry point imports its sibling ``_common``
    spec = importlib.util.spec_from_file_location("rebuild_index", ROOT / "jobs/rebuild_index.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def test_gate_measures_at_the_stated_settings(ray_session, indexed, tmp_path):
    report = reindex(
        str(indexed), partitions=16, sub_vectors=2, gate_nprobes=3, gate_refine_factor=None,
        min_recall=0.0, report_path=str(tmp_path / "r.json"),
    )  # fmt: skip
    grid = {(p["nprobes"], p["refine_factor"]): p["recall"] for p in report.grid}
    assert (3, None) in grid and (16, 30) not in grid  # the gate's point is measured
    assert report.recall_at_10 == grid[(3, None)]
    table = report.summary().splitlines()
    (marked,) = [line for line in table if line.endswith("<- gate")]
    assert marked.split()[:2] == ["3", "-"]
    assert "recall@10" in table[-2] and "at the gate (nprobes=3, no refine)" in table[-2]


def test_the_plot_marks_the_gate_point():
    points = [
        rc.RecallPoint(nprobes=n, refine_factor=r, recall=0.5 + n / 100 + (r or 0) / 100,
                       p50_ms=float(n), mean_ms=float(n))
        for r in (None, 30) for n in (5, 16, 20)
    ]  # fmt: skip
    fig = rc.recall_figure(points, gate=(16, 30), min_recall=0.7)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    (gate,) = [h for h, label in zip(handles, labels, strict=True) if label.startswith("gate")]
    assert labels[handles.index(gate)] == "gate: nprobes=16, refine_factor=30 (0.960)"
    (judged,) = [p for p in points if (p.nprobes, p.refine_factor) == (16, 30)]
    assert list(gate.get_xdata()) == [judged.p50_ms] and list(gate.get_ydata()) == [judged.recall]
    assert "--min-recall 0.7" in labels
    assert rc.gate_grid(16, 30) == ((5, 10, 16, 20, 50), (None, 10, 30))


def test_search_uses_the_gates_settings_by_default(indexed, monkeypatch):
    import inspect

    from laion_ray.cli import build_parser

    defaults = inspect.signature(search).parameters
    assert (defaults["nprobes"].default, defaults["refine_factor"].default) == (16, 30)
    assert (rc.SEARCH_NPROBES, rc.SEARCH_REFINE_FACTOR) == (16, 30)  # the card's query
    args = build_parser().parse_args(["search", str(indexed), "--row", "1"])
    assert (args.nprobes, args.refine_factor) == (16, 30)
    gate = build_parser().parse_args(["reindex", str(indexed)])
    assert (gate.gate_nprobes, gate.gate_refine_factor) == (16, 30)

    seen = []
    real = lance.LanceDataset.to_table

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("nearest"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(lance.LanceDataset, "to_table", spy)
    from laion_ray.cli import main

    assert main(["search", str(indexed), "--row", "1", "--k", "3"]) == 0
    assert main(["search", str(indexed), "--row", "1", "--k", "3", "--refine-factor", "0"]) == 0
    queries = [n for n in seen if n]
    assert (queries[0]["nprobes"], queries[0]["refine_factor"]) == (16, 30)
    assert "refine_factor" not in queries[1]
