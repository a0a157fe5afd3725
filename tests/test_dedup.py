"""``laion_ray.dedup`` on real Lance datasets and the session Ray: the injected groups,
the keep rule, ``exact``, the incremental rerun and the CLI's bad input."""

from __future__ import annotations

import importlib
import shutil

import lance
import pytest

from laion_ray.cli import main
from laion_ray.dedup import dedup
from laion_ray.errors import LaionRayError
from laion_ray.history import job_history
from laion_ray.sample import duplicate_plan, sample_table, write_sample

ROWS = 400
# Small partitions and tasks so the split of an oversized partition into block
# pairs and the merge of components across tasks both run.
SMALL = {"partitions": 4, "max_partition_rows": 120}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("dedup") / "laion.lance")
    report = write_sample(uri, rows=ROWS, fragments=3, seed=4, duplicates=0.1, bad_fraction=0.02)
    return uri, report


@pytest.fixture
def copy(sample, tmp_path):
    uri = str(tmp_path / "copy.lance")
    shutil.copytree(sample[0], uri)
    return uri


def _rows(uri: str) -> dict[int, dict]:
    cols = ["key", "dup_group", "is_duplicate", "similarity", "width", "height", "md5"]
    return {r["key"]: r for r in lance.dataset(uri).to_table(columns=cols).to_pylist()}


def _groups(rows: dict[int, dict]) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for key, r in rows.items():
        out.setdefault(r["dup_group"], set()).add(key)
    return {g: m for g, m in out.items() if len(m) > 1}


def test_finds_the_injected_groups_and_keeps_highest_similarity(ray_session, sample, copy):
    _, truth = sample
    report = dedup(copy, threshold=0.95, **SMALL)
    rows = _rows(copy)
    expected = {frozenset({s, *cs}) for s, cs in truth.duplicate_groups.items()}
    assert {frozenset(m) for m in _groups(rows).values()} == expected
    assert (
        report.duplicates == truth.num_duplicates == sum(r["is_duplicate"] for r in rows.values())
    )
    assert report.max_task_rows <= 2 * SMALL["max_partition_rows"]  # split, estimate slack
    for group, members in _groups(rows).items():
        best = max(members, key=lambda k: (rows[k]["similarity"], -k))
        assert group == best and not rows[best]["is_duplicate"]
        assert all(rows[k]["is_duplicate"] for k in members - {best})
    singles = [r for r in rows.values() if r["dup_group"] not in _groups(rows)]
    assert all(r["dup_group"] == r["key"] and not r["is_duplicate"] for r in singles)
    assert job_history(copy)[-1]["job"] == "dedup"


def test_keep_largest_image(ray_session, sample, copy):
    dedup(copy, keep="largest", **SMALL)
    rows = _rows(copy)
    groups = _groups(rows)
    assert len(groups) == len(sample[1].duplicate_groups)
    for group, members in groups.items():
        area = {k: rows[k]["width"] * rows[k]["height"] for k in members}
        assert group == max(members, key=lambda k: (area[k], -k))


def test_exact_groups_md5_twins(ray_session, sample, copy):
    # 0.9995 is above every injected copy's cosine: only md5 can group anything.
    dedup(copy, threshold=0.9995, **SMALL)
    assert not _groups(_rows(copy))
    dedup(copy, threshold=0.9995, exact=True, overwrite=True, **SMALL)
    rows = _rows(copy)
    by_md5: dict[str, set[int]] = {}
    for key, r in rows.items():
        if r["md5"] is not None:
            by_md5.setdefault(r["md5"], set()).add(key)
    twins = {frozenset(m) for m in by_md5.values() if len(m) > 1}
    assert twins and {frozenset(m) for m in _groups(rows).values()} == twins


def test_rerun_after_append_groups_only_the_new_rows(ray_session, sample, copy):
    first = dedup(copy, **SMALL)
    before = _rows(copy)
    new = sample_table(100, seed=4, start_key=ROWS, duplicates=0.2)
    lance.write_dataset(new, copy, mode="append")
    report = dedup(copy, **SMALL)
    after = _rows(copy)
    assert report.incremental and not first.incremental
    assert report.job.rows_processed == 100 and report.job.fragments_committed == 1
    assert all(after[k] == before[k] for k in before)  # no old row changed
    plan = duplicate_plan(100, seed=4, duplicates=0.2, start_key=ROWS)
    assert any(s < ROWS for s in plan)  # some new rows copy old rows
    for source, copies in plan.items():
        members = [source, *copies]
        assert {after[k]["dup_group"] for k in members} == {after[source]["dup_group"]}
        if source < ROWS:  # joins the old group: the old kept row stays kept
            assert all(after[c]["is_duplicate"] for c in copies)
        else:  # a group of new rows elects its kept row
            assert sum(not after[k]["is_duplicate"] for k in members) == 1
    injected = {c for cs in plan.values() for c in cs}
    assert all(after[k]["dup_group"] == k for k in range(ROWS, ROWS + 100) if
               k not in injected and k not in plan)  # fmt: skip


def test_crash_before_write_back_resumes_without_regrouping(ray_session, sample, copy, monkeypatch):
    # The module, not the public function `laion_ray.dedup` that shares its name.
    module = importlib.import_module("laion_ray.dedup")

    def driver_dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "run_job", driver_dies)
    with pytest.raises(KeyboardInterrupt):
        dedup(copy, **SMALL)
    monkeypatch.undo()
    report = dedup(copy, **SMALL)
    assert report.resumed and report.duplicates == sample[1].num_duplicates
    expected = {frozenset({s, *cs}) for s, cs in sample[1].duplicate_groups.items()}
    assert {frozenset(m) for m in _groups(_rows(copy)).values()} == expected


@pytest.mark.parametrize("where", ['"NSFW" = 0', "`NSFW` = 0"])
def test_where_groups_only_the_selected_rows(ray_session, sample, copy, where):
    _, truth = sample
    nsfw = {r["key"]: r["NSFW"] for r in lance.dataset(copy).to_table(["key", "NSFW"]).to_pylist()}
    assert 0 < sum(nsfw.values()) < ROWS  # both kinds of rows are there
    report = dedup(copy, where=where, **SMALL)
    rows = _rows(copy)
    assert all((r["dup_group"] is None) == (nsfw[k] != 0) for k, r in rows.items())
    expected = set()  # the injected groups, among the selected rows only
    for source, copies in truth.duplicate_groups.items():
        kept = frozenset(k for k in (source, *copies) if nsfw[k] == 0)
        if len(kept) > 1:
            expected.add(kept)
    assert expected  # the test means something: some groups survive the filter
    assert {frozenset(m) for g, m in _groups(rows).items() if g is not None} == expected
    assert report.duplicates == sum(len(m) - 1 for m in expected)
    assert report.job.rows_processed == sum(1 for v in nsfw.values() if v == 0)


def test_bad_input_is_one_line_exit_2(sample, capsys):
    uri = sample[0]
    assert main(["dedup", uri, "--threshold", "1.5"]) == 2
    assert main(["dedup", uri, "--keep", "caption"]) == 2
    assert main(["dedup", uri, "--column", "caption"]) == 2
    assert main(["dedup", uri, "--where", "nope = 1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and "--threshold" in err[0] and "not numeric" in err[1]
    assert err[3].startswith("laion-ray: error: bad --where") and "nope" in err[3]
    with pytest.raises(LaionRayError, match="no column 'nope'"):
        dedup(uri, keep="nope")
