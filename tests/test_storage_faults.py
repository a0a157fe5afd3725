"""Jobs against a faulty object store: the fault proxy in front of the loopback S3 server.

Transient faults (a seeded 5% of requests fail with 500, 503 or SlowDown, or
have their reply cut off mid-body) must not change any result: a backfill, a
merge and a reindex through the proxy end as the same jobs on a clean path do.
A persistent fault (requests refused for good) must stop the job with exit 1
and one line naming the cause, keep its checkpoint, and the same command must
finish once the fault is gone.

Every test asserts that the proxy injected faults into its own requests, so
none passes because nothing happened.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3
import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from laion_ray.sample import write_sample
from laion_ray.storage import filesystem

pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).resolve().parent
ROWS = 600
BACKFILL_COLUMNS = ["aspect_ratio", "is_high_res", "moderation_label"]


def _sample(s3_server, name: str, *, rows: int = ROWS) -> str:
    """One small LAION-shaped table (a few corrupt images), written on the clean path."""
    uri = s3_server.uri("faults", name)
    write_sample(uri, rows=rows, fragments=4, seed=5, bad_fraction=0.02,
                 storage_options=s3_server.storage_options)  # fmt: skip
    return uri


def _table(uri: str, columns: list[str], s3_server) -> pa.Table:
    ds = lance.dataset(uri, storage_options=s3_server.storage_options)
    return ds.to_table(columns=["key", *columns]).sort_by("key")


def _keys(s3_server, prefix: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")  # fmt: skip
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", []) if o["Key"][-1] != "/"]


def _prefix(uri: str) -> str:
    return uri.split("/", 3)[3].rstrip("/") + "/"


# --- transient faults: same results as a clean run -------------------------------------


def _exhaustive_neighbours(uri: str, s3_server, queries: np.ndarray, rows: int) -> list:
    """ANN results probing every partition and re-ranking every row: exact, whatever
    the centroids, so they differ only if the index lost or doubled rows."""
    ds = lance.dataset(uri, storage_options=s3_server.storage_options)
    (index,) = ds.describe_indices()
    stats = ds.stats.index_stats(index.name)
    assert stats["num_indexed_rows"] == rows and stats["num_unindexed_rows"] == 0, stats
    nearest = {"column": "img_emb", "k": 10, "nprobes": stats["indices"][0]["num_partitions"],
               "refine_factor": rows // 10 + 1}  # fmt: skip
    return [
        ds.to_table(columns=["key"], nearest={**nearest, "q": q})["key"].to_pylist()
        for q in queries
    ]


@pytest.mark.usefixtures("ray_session")
def test_backfill_merge_and_reindex_through_transient_faults_equal_a_clean_run(
    s3_server, faulty_s3
):
    from laion_ray.backfill import backfill
    from laion_ray.index import reindex
    from laion_ray.merge import merge

    proxy, through_proxy = faulty_s3
    clean_uri, faulty_uri = _sample(s3_server, "clean.lance"), _sample(s3_server, "faulty.lance")
    label_keys = np.arange(0, ROWS, 3, dtype=np.int64)
    labels = pa.table({"key": label_keys, "aesthetic": (label_keys % 10).astype(np.float64)})
    for uri in (clean_uri, faulty_uri):
        fs, path = filesystem(uri.replace(".lance", ".parquet"), s3_server.storage_options)
        with fs.open_output_stream(path) as f:
            pq.write_table(labels, f)

    def jobs(uri: str, server) -> dict[str, int]:
        """The three jobs on ``uri`` through ``server``; faults injected during each."""
        opts, injected = server.storage_options, {}
        before = proxy.injected_total()
        backfill(uri, udfs=["aspect-ratio", "moderation-rules"], unit_rows=50,
                 storage_options=opts)  # fmt: skip
        injected["backfill"], before = proxy.injected_total() - before, proxy.injected_total()
        merge(uri, source=uri.replace(".lance", ".parquet"), on="key", unit_rows=50,
              storage_options=opts, source_storage_options=opts)  # fmt: skip
        injected["merge"], before = proxy.injected_total() - before, proxy.injected_total()
        reindex(uri, partitions=4, sub_vectors=16, num_workers=2, storage_options=opts)
        injected["reindex"] = proxy.injected_total() - before
        return injected

    assert jobs(clean_uri, s3_server) == {"backfill": 0, "merge": 0, "reindex": 0}
    with proxy.faults(rate=0.05):
        injected = jobs(faulty_uri, through_proxy)
    assert all(n > 0 for n in injected.values()), (injected, proxy.snapshot())

    columns = [*BACKFILL_COLUMNS, "aesthetic"]
    expected, got = _table(clean_uri, columns, s3_server), _table(faulty_uri, columns, s3_server)
    assert got.equals(expected)
    assert got["aesthetic"].null_count == ROWS - len(label_keys)  # the merge landed
    queries = np.stack(_table(clean_uri, ["img_emb"], s3_server)["img_emb"].to_numpy(
        zero_copy_only=False)[[7, 142, 301, 555]])  # fmt: skip
    assert _exhaustive_neighbours(faulty_uri, s3_server, queries, ROWS) == _exhaustive_neighbours(
        clean_uri, s3_server, queries, ROWS
    )


def test_a_throttling_burst_longer_than_pyarrows_default_retries_is_ridden_out(
    s3_server, faulty_s3
):
    """The merge source is read with pyarrow: 4 SlowDowns in a row on its GET (pyarrow's
    S3 client gives up after 3 attempts by default; Lance's object_store makes 10)."""
    from laion_ray.merge import merge

    proxy, through_proxy = faulty_s3
    uri = _sample(s3_server, "burst.lance")
    source = uri.replace(".lance", ".parquet")
    keys = np.arange(0, ROWS, 2, dtype=np.int64)
    fs, path = filesystem(source, s3_server.storage_options)
    with fs.open_output_stream(path) as f:
        pq.write_table(pa.table({"key": keys, "score": keys * 0.5}), f)
    proxy.burst("GET", rf"/{_prefix(uri).removesuffix('.lance/')}\.parquet", 4)
    before = proxy.snapshot().get("SlowDown", 0)
    opts = through_proxy.storage_options
    merge(uri, source=source, on="key", unit_rows=100, executor="local",
          storage_options=opts, source_storage_options=opts)  # fmt: skip
    assert proxy.snapshot()["SlowDown"] == before + 4  # the whole burst hit the source
    merged = _table(uri, ["score"], s3_server).to_pydict()
    assert merged["score"] == [k * 0.5 if k % 2 == 0 else None for k in merged["key"]]


# --- persistent faults: exit 1, one line, checkpoint kept; the rerun finishes ---------


def _cli(args: list[str], server, *, timeout: float = 300) -> subprocess.CompletedProcess:
    options = [f for k, v in server.storage_options.items() for f in ("--storage-option", f"{k}={v}")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "laion_ray.cli", *args, *options],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def _backfill_args(uri: str) -> list[str]:
    return ["backfill", uri, "--udf", "aspect-ratio", "--udf", "moderation-rules",
            "--unit-rows", "50", "--executor", "local"]  # fmt: skip


def _one_failure_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("laion-ray: ")]
    assert line.startswith("laion-ray: failed: "), line
    return line


def _checkpoint(s3_server, uri: str) -> list[str]:
    return _keys(s3_server, _prefix(uri) + "_laion_ray/jobs/")


def _clean_backfill(s3_server, name: str) -> pa.Table:
    uri = _sample(s3_server, name)
    assert _cli(_backfill_args(uri), s3_server).returncode == 0
    return _table(uri, BACKFILL_COLUMNS, s3_server)


@pytest.fixture(scope="module")
def clean_backfill(s3_server) -> pa.Table:
    """The backfill's columns, run on the clean path: what every rerun must equal."""
    return _clean_backfill(s3_server, "reference.lance")


def test_refused_data_file_writes_stop_the_job_and_the_rerun_finishes(
    s3_server, faulty_s3, clean_backfill
):
    """Every PUT of a new Lance data file is refused (a prefix the credentials cannot write)."""
    proxy, through_proxy = faulty_s3
    uri = _sample(s3_server, "refused-put.lance")
    proxy.refuse("PUT", rf"/{_prefix(uri)}data/")
    before = proxy.snapshot().get("refused", 0)
    line = _one_failure_line(_cli(_backfill_args(uri), through_proxy))
    assert proxy.snapshot()["refused"] > before
    assert "403" in line or "AccessDenied" in line or "denied" in line.lower(), line
    checkpoint = _checkpoint(s3_server, uri)
    assert any(k.endswith("/job.json") for k in checkpoint), checkpoint
    assert any("/parts/" in k for k in checkpoint), checkpoint
    assert _table(uri, [], s3_server).num_rows == ROWS

    proxy.clear()
    rerun = _cli(_backfill_args(uri), through_proxy)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _table(uri, BACKFILL_COLUMNS, s3_server).equals(clean_backfill)
    assert not _checkpoint(s3_server, uri)


def test_refused_lease_writes_stop_the_job_before_it_plans(s3_server, faulty_s3, clean_backfill):
    proxy, through_proxy = faulty_s3
    uri = _sample(s3_server, "refused-lease.lance")
    proxy.refuse("PUT", rf"/{_prefix(uri)}_laion_ray/leases/")
    before = proxy.snapshot().get("refused", 0)
    line = _one_failure_line(_cli(_backfill_args(uri), through_proxy))
    assert proxy.snapshot()["refused"] > before
    assert "lease" in line and ("denied" in line.lower() or "403" in line), line
    assert not _checkpoint(s3_server, uri)  # nothing planned without the lease

    proxy.clear()
    rerun = _cli(_backfill_args(uri), through_proxy)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _table(uri, BACKFILL_COLUMNS, s3_server).equals(clean_backfill)


def test_refused_deletes_stop_the_job_at_once_and_the_rerun_finishes(
    s3_server, faulty_s3, clean_backfill
):
    """Every DELETE (single and bulk) is refused: the first one, of a committed
    fragment's parts, stops the job with its cause, the checkpoint intact."""
    proxy, through_proxy = faulty_s3
    uri = _sample(s3_server, "refused-delete.lance")
    proxy.refuse("DELETE", rf"/{_prefix(uri)}")
    proxy.refuse("POST", r"\?delete")
    before = proxy.snapshot().get("refused", 0)
    line = _one_failure_line(_cli(_backfill_args(uri), through_proxy))
    assert proxy.snapshot()["refused"] > before
    assert "DeleteObject" in line and "/parts/" in line, line
    assert any(k.endswith("/job.json") for k in _checkpoint(s3_server, uri))

    proxy.clear()
    rerun = _cli(_backfill_args(uri), through_proxy)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _table(uri, BACKFILL_COLUMNS, s3_server).equals(clean_backfill)
    assert not _checkpoint(s3_server, uri)


def test_refused_checkpoint_cleanup_stops_the_job_and_the_rerun_finishes(
    s3_server, faulty_s3, clean_backfill
):
    """DELETEs of the checkpoint's parts and summaries are refused (its ``.tmp`` renames
    pass): the job's work commits, but its checkpoint cannot be removed."""
    proxy, through_proxy = faulty_s3
    uri = _sample(s3_server, "refused-cleanup.lance")
    proxy.refuse("DELETE", rf"/{_prefix(uri)}_laion_ray/jobs/[^?]*(?<!\.tmp)(\?|$)")
    proxy.refuse("POST", r"\?delete")
    before = proxy.snapshot().get("refused", 0)
    first = _cli(_backfill_args(uri), through_proxy)
    assert proxy.snapshot()["refused"] > before
    line = _one_failure_line(first)
    assert "delete" in line.lower(), line
    assert any(k.endswith("/job.json") for k in _checkpoint(s3_server, uri))

    proxy.clear()
    rerun = _cli(_backfill_args(uri), through_proxy)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _table(uri, BACKFILL_COLUMNS, s3_server).equals(clean_backfill)
    assert not _checkpoint(s3_server, uri)


def test_a_store_failure_while_checking_where_is_not_a_bad_where(s3_server, faulty_s3):
    """Only the ``--where`` probe's read fails, after the dataset opened fine.

    Planning a filter on a dataset with an index loads the manifest's index
    section, which a manifest larger than its first read (64 KiB; here by its
    table metadata, in a large table by its fragments) leaves for later: the
    probe's own GET, of the manifest's first bytes, is the one refused.
    """
    proxy, through_proxy = faulty_s3
    uri = _sample(s3_server, "where-probe.lance", rows=100)
    lance.dataset(uri, storage_options=s3_server.storage_options).create_scalar_index(
        "width", "BTREE"
    )
    lance.dataset(uri, storage_options=s3_server.storage_options).update_metadata(
        {"description": "a dataset card " * 20_000}
    )
    args = ["backfill", uri, "--udf", "aspect-ratio", "--where", "width > 10",
            "--executor", "local"]  # fmt: skip
    proxy.refuse("GET", rf"/{_prefix(uri)}_versions/", header=("Range", r"^bytes=0-"))
    before = proxy.snapshot().get("refused", 0)
    line = _one_failure_line(_cli(args, through_proxy))
    assert proxy.snapshot()["refused"] > before
    assert line.startswith("laion-ray: failed: cannot check --where") and "403" in line, line

    proxy.clear()
    rerun = _cli(args, through_proxy)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    table = _table(uri, ["width", "height", "aspect_ratio"], s3_server)
    table = table.filter(pc.greater(table["width"], 10))
    assert table.num_rows
    assert table["aspect_ratio"].null_count == table["height"].to_pylist().count(0)


def test_the_proxy_injects_what_it_is_told(faulty_s3):
    """The fault proxy itself: seeded transient faults, refusals and stripped headers."""
    proxy, through_proxy = faulty_s3
    client = boto3.client("s3", endpoint_url=through_proxy.endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")  # fmt: skip
    bucket, before = through_proxy.bucket, proxy.snapshot()
    with proxy.faults(rate=0.5):
        outcomes = []
        for i in range(40):
            try:
                client.put_object(Bucket=bucket, Key=f"proxy/{i}", Body=b"x" * 100)
                outcomes.append("ok")
            except Exception as exc:  # noqa: BLE001 - any failure counts here
                outcomes.append(type(exc).__name__)
    after = proxy.snapshot()
    for kind in ("500", "503", "SlowDown", "reset"):
        assert after.get(kind, 0) > before.get(kind, 0), (kind, after)
    assert "ok" in outcomes
    proxy.refuse("DELETE", r"/proxy/1$")
    with pytest.raises(client.exceptions.ClientError, match="AccessDenied"):
        client.delete_object(Bucket=bucket, Key="proxy/1")
    client.delete_object(Bucket=bucket, Key="proxy/2")  # other paths pass
    proxy.strip_header("If-None-Match")
    client.put_object(Bucket=bucket, Key="proxy/2", Body=b"a", IfNoneMatch="*")
    client.put_object(Bucket=bucket, Key="proxy/2", Body=b"b", IfNoneMatch="*")  # not refused
    assert proxy.snapshot()["stripped"] >= 2
    proxy.clear()
    with pytest.raises(client.exceptions.ClientError, match="PreconditionFailed"):
        client.put_object(Bucket=bucket, Key="proxy/2", Body=b"c", IfNoneMatch="*")
