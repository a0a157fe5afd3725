"""The crash-point sweep: kill the driver at every named step, rerun, compare.

Every step between two durable states calls a failpoint
(``laion_ray/engine/failpoints.py``). For each point, a job runs as a CLI
subprocess with ``LAION_RAY_FAILPOINTS=<point>=kill`` and dies there by
SIGKILL; the same command is then run again (in-process) and must give what a
run without the kill gives on an identical copy:

- every column equal, row by row;
- errors.lance holding the same rows, once each;
- one job in the history (one plan), no fragment committed twice;
- no ``AccountingError`` (the rerun exits 0);
- no checkpoint left, and no column file written once that no version uses.

The UDF fails 1% of rows. Local-executor jobs cover a ``--where`` run, an
incremental run after an append and an ``--overwrite``; the Ray executor, the
broadcast merge and dedup's write-back get the write-back's points.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lance
import pyarrow as pa
import pytest

from laion_ray.cli import main
from laion_ray.engine.failpoints import POINTS
from laion_ray.history import job_history
from laion_ray.sample import sample_table, write_sample

pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).resolve().parent
ROWS, FRAGMENTS = 400, 4
BAD_KEYS = ["--udf", "helpers:bad_keys", "--unit-rows", "50", "--commit-every", "0",
            "--max-error-fraction", "0.05", "--tag", "swept"]  # fmt: skip
WRITEBACK = [p for p in POINTS if p.startswith("writeback.")]
# Some points are passed once per commit: the `where` runs die at the second pass.
# Each fragment's records come back at once (it is written whole), and its 67
# selected rows settle the error gate's canary (64), so every fragment's
# records commit on their own: a second commit always comes.
SCENARIOS = {
    "where": dict(setup=[], command=["--where", "key % 3 != 0"], nth=2),
    "incremental": dict(setup=[[]], append=True, command=[], nth=1),
    "overwrite": dict(
        setup=[[]], command=["--overwrite", "--param", "helpers:bad_keys.percent=2"], nth=1
    ),
}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH")) if p)
    return {**env, **extra}


def _killed_at(point: str, argv: list[str], nth: int = 1, **env: str) -> None:
    """Run ``laion-ray ARGV`` until the driver dies at ``point`` (its Nth pass)."""
    spec = f"{point}=kill@{nth}"
    done = subprocess.run(
        [sys.executable, "-m", "laion_ray.cli", *argv],
        env=_env(LAION_RAY_FAILPOINTS=spec, **env),
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,
    )
    assert done.returncode == -signal.SIGKILL, (
        f"the driver did not die at {spec} (rc {done.returncode}): {done.stderr[-2000:]}"
    )


def _errors(uri: str) -> Counter:
    path = Path(uri) / "_laion_ray" / "errors.lance"
    if not path.exists():
        return Counter()
    table = lance.dataset(str(path)).to_table(columns=["key", "udf", "error_type", "message"])
    return Counter(zip(*table.to_pydict().values(), strict=True))


def _jobs_after(uri: str, version: int) -> list[dict]:
    return [e for e in job_history(uri) if e["version"] > version]


def _assert_same_result(
    uri: str, clean: str, setup_version: int, *, written_once: bool = True
) -> None:
    """``written_once``: the job's tasks wrote whole fragments' column files
    (backfills of function UDFs); a merge with unmatched keys and dedup do not."""
    got, want = (lance.dataset(u).to_table().sort_by("key") for u in (uri, clean))
    assert got.schema.equals(want.schema, check_metadata=True)
    for name in want.column_names:
        assert got[name].equals(want[name]), name
    errors = _errors(uri)
    assert errors == _errors(clean) and max(errors.values(), default=1) == 1
    entries = _jobs_after(uri, setup_version)
    assert len({e["details"]["plan"] for e in entries}) == 1, entries  # exactly one job
    committed = [f for e in entries for f in e["details"].get("fragments", [])
                 if e["operation"] == "DataReplacement"]  # fmt: skip
    assert len(committed) == len(set(committed)), f"a fragment was committed twice: {committed}"
    assert lance.dataset(uri).tags.list()["swept"]["version"] == lance.dataset(uri).version
    jobs = Path(uri) / "_laion_ray" / "jobs"
    assert not jobs.exists() or not any(jobs.iterdir()), "the checkpoint was left behind"
    _assert_no_unused_column_files(uri, written_once)


def _assert_no_unused_column_files(uri: str, expected: bool) -> None:
    """Column files tasks wrote once (``data/lr-*``) are all in some version."""
    ds = lance.dataset(uri)
    used = {
        f.path
        for v in ds.versions()
        for frag in ds.checkout_version(v["version"]).get_fragments()
        for f in frag.metadata.files
    }
    written = {p.name for p in (Path(uri) / "data").glob("lr-*.lance")}
    assert bool(written) == expected, f"column files written once: {sorted(written)}"
    assert written <= used, f"column files no version uses: {sorted(written - used)}"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("crash") / "base.lance")
    write_sample(uri, rows=ROWS, fragments=FRAGMENTS, seed=31)
    return uri


@pytest.fixture(scope="module")
def prepared(base, tmp_path_factory) -> dict[str, tuple[str, str, int]]:
    """Per scenario: the table before its swept command, the clean run's result,
    and the version the swept command starts from."""
    out = {}
    for name, scenario in SCENARIOS.items():
        root = tmp_path_factory.mktemp(name)
        start = str(root / "start.lance")
        shutil.copytree(base, start)
        for extra in scenario["setup"]:
            assert main(["backfill", start, *BAD_KEYS, "--executor", "local", *extra]) == 0
        if scenario.get("append"):
            lance.write_dataset(sample_table(100, seed=32, start_key=ROWS), start, mode="append")
        clean = str(root / "clean.lance")
        shutil.copytree(start, clean)
        command = ["backfill", clean, *BAD_KEYS, "--executor", "local", *scenario["command"]]
        assert main(command) == 0
        out[name] = (start, clean, lance.dataset(start).version)
    return out


SWEEP = [p for p in POINTS if p != "stream.after_records"] + ["stream.after_records"]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("point", SWEEP)
def test_a_kill_at_any_point_then_the_same_command_gives_the_clean_result(
    point, scenario, prepared, tmp_path
):
    start, clean, version = prepared[scenario]
    uri = str(tmp_path / "t.lance")
    shutil.copytree(start, uri)
    argv = ["backfill", uri, *BAD_KEYS, "--executor", "local", *SCENARIOS[scenario]["command"]]
    passes = SCENARIOS[scenario]["nth"] if point.startswith(("writeback.", "stream.")) else 1
    _killed_at(point, argv, passes)
    assert main(argv) == 0
    _assert_same_result(uri, clean, version)


# --- the Ray executor, the broadcast merge, dedup ----------------------------------


@pytest.fixture(scope="module")
def ray_clean(base, tmp_path_factory, ray_session) -> tuple[str, int]:
    clean = str(tmp_path_factory.mktemp("ray") / "clean.lance")
    shutil.copytree(base, clean)
    assert main(["backfill", clean, *BAD_KEYS, "--executor", "ray"]) == 0
    return clean, lance.dataset(base).version


@pytest.mark.parametrize("point", [*WRITEBACK, "stream.after_records"])
def test_ray_executor_kill_then_rerun(point, base, ray_clean, ray_session, tmp_path):
    clean, version = ray_clean
    uri = str(tmp_path / "t.lance")
    shutil.copytree(base, uri)
    argv = ["backfill", uri, *BAD_KEYS, "--executor", "ray"]
    address = ray_session.get_runtime_context().gcs_address
    _killed_at(point, argv, 1, RAY_ADDRESS=address)
    assert main(argv) == 0  # in this process: attached to the same session Ray
    _assert_same_result(uri, clean, version)


@pytest.fixture(scope="module")
def labels(base, tmp_path_factory) -> str:
    import pyarrow.parquet as pq

    path = str(tmp_path_factory.mktemp("labels") / "labels.parquet")
    keys = list(range(0, ROWS, 3))
    pq.write_table(pa.table({"key": keys, "label": [k % 7 for k in keys]}), path)
    return path


def _merge_argv(uri: str, labels: str) -> list[str]:
    return ["merge", uri, "--from", labels, "--on", "key", "--executor", "local",
            "--unit-rows", "50", "--commit-every", "0", "--tag", "swept"]  # fmt: skip


@pytest.fixture(scope="module")
def merge_clean(base, labels, tmp_path_factory) -> tuple[str, int]:
    clean = str(tmp_path_factory.mktemp("merge") / "clean.lance")
    shutil.copytree(base, clean)
    assert main(_merge_argv(clean, labels)) == 0
    return clean, lance.dataset(base).version


@pytest.mark.parametrize("point", WRITEBACK)
def test_broadcast_merge_kill_then_rerun(point, base, labels, merge_clean, tmp_path):
    clean, version = merge_clean
    uri = str(tmp_path / "t.lance")
    shutil.copytree(base, uri)
    _killed_at(point, _merge_argv(uri, labels))
    assert main(_merge_argv(uri, labels)) == 0
    _assert_same_result(uri, clean, version, written_once=False)


def _dedup_argv(uri: str) -> list[str]:
    return ["dedup", uri, "--column", "img_emb", "--threshold", "0.9", "--exact",
            "--unit-rows", "50", "--commit-every", "0", "--tag", "swept"]  # fmt: skip


@pytest.fixture(scope="module")
def dedup_base(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("dedup") / "base.lance")
    write_sample(uri, rows=ROWS, fragments=FRAGMENTS, seed=33, duplicates=0.1)
    return uri


@pytest.fixture(scope="module")
def dedup_clean(dedup_base, tmp_path_factory, ray_session) -> tuple[str, int]:
    clean = str(tmp_path_factory.mktemp("dedup-clean") / "clean.lance")
    shutil.copytree(dedup_base, clean)
    assert main(_dedup_argv(clean)) == 0
    return clean, lance.dataset(dedup_base).version


@pytest.mark.parametrize("point", WRITEBACK)
def test_dedup_write_back_kill_then_rerun(point, dedup_base, dedup_clean, ray_session, tmp_path):
    clean, version = dedup_clean
    uri = str(tmp_path / "t.lance")
    shutil.copytree(dedup_base, uri)
    address = ray_session.get_runtime_context().gcs_address
    _killed_at(point, _dedup_argv(uri), 1, RAY_ADDRESS=address)
    assert main(_dedup_argv(uri)) == 0
    _assert_same_result(uri, clean, version, written_once=False)


def test_every_point_is_passed_by_the_engine_and_listed_once():
    """The list is the one place: every point in it is called, every call is listed."""
    import re

    engine = Path(__file__).resolve().parents[1] / "laion_ray" / "engine"
    called = Counter(
        name
        for path in engine.glob("*.py")
        for name in re.findall(r'failpoint\("([\w.]+)"\)', path.read_text())
    )
    assert set(called) == set(POINTS)
    assert all(n == 1 for n in called.values()), called
