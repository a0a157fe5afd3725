"""One test per crash-safety finding of the engine audit (issue 22).

Each reproduces what was found by reading the code, on real Lance (and real
Ray, or the fault-injecting S3 proxy, where the finding lives there), and
checks the fixed behaviour. The sweep of every failpoint is in
``test_crash_points.py``; the lease's findings are in ``test_lease.py``.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from laion_ray.backfill import backfill
from laion_ray.cli import build_parser, main
from laion_ray.engine import checkpoint as ckpt
from laion_ray.engine import executors, failpoints
from laion_ray.engine.error_log import list_errors
from laion_ray.errors import StorageError
from laion_ray.history import job_history
from laion_ray.sample import sample_table, write_sample
from laion_ray.storage import filesystem
from laion_ray.udf import udf

ROWS = 400


@pytest.fixture(autouse=True)
def _no_failpoints():
    yield
    failpoints.arm("")


def _values(uri: str, column: str) -> dict[int, object]:
    table = lance.dataset(uri).to_table(columns=["key", column])
    return dict(zip(*table.to_pydict().values(), strict=True))


def _bad_keys_argv(uri: str, executor: str, *extra: str) -> list[str]:
    return ["backfill", uri, "--udf", "helpers:bad_keys", "--unit-rows", "50",
            "--commit-every", "0", "--max-error-fraction", "0.05", "--executor", executor,
            *extra]  # fmt: skip


def _errors(uri: str) -> Counter:
    table = list_errors(uri, limit=None)
    return Counter(zip(table["key"].to_pylist(), table["udf"].to_pylist(), strict=True))


# --- the dataset cache --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["ray", "local"])
def test_a_table_written_again_at_the_same_path_is_read_afresh(tmp_path, executor, ray_session):
    """Back-fill, delete the table, write another at the same path (version 1
    again, other files), back-fill again in the same process: no stale manifest."""
    uri = str(tmp_path / "t.lance")
    write_sample(uri, rows=ROWS, fragments=4, seed=1)
    assert backfill(uri, udfs=["aspect-ratio"], executor=executor).rows_processed == ROWS
    shutil.rmtree(uri)
    write_sample(uri, rows=ROWS // 2, fragments=2, seed=2)
    report = backfill(uri, udfs=["aspect-ratio"], executor=executor)
    assert report.rows_processed == ROWS // 2 and report.rows_failed == 0
    table = lance.dataset(uri).to_table(columns=["width", "height", "aspect_ratio"])
    for w, h, ratio in zip(*table.to_pydict().values(), strict=True):
        assert ratio == (w / h if h else None)


# --- between recording errors and marking fragments committed -------------------------


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_storage_failure_after_recording_errors_exits_1_and_the_rerun_finishes(
    tmp_path, executor, ray_session
):
    clean, uri = str(tmp_path / "clean.lance"), str(tmp_path / "t.lance")
    for target in (clean, uri):
        write_sample(target, rows=ROWS, fragments=4, seed=3)
    assert main(_bad_keys_argv(clean, executor)) == 0

    failpoints.arm("writeback.after_record_errors=error")
    assert main(_bad_keys_argv(uri, executor)) == 1  # a failed job, not bad input
    failpoints.arm("")
    assert main(_bad_keys_argv(uri, executor)) == 0  # not an AccountingError
    assert _values(uri, "checked") == _values(clean, "checked")
    errors = _errors(uri)
    assert errors == _errors(clean) and set(errors.values()) == {1}
    plans = {e["details"]["plan"] for e in job_history(uri)}
    assert len(plans) == 1


def test_fragments_recomputed_after_their_summaries_were_lost_record_their_errors_once(tmp_path):
    """A kill while the finished job's checkpoint was being removed: its
    ``committed/`` summaries were deleted (they list before ``job.json``), its
    plan was not. The rerun resumes that plan and recomputes every fragment,
    whose failed rows errors.lance already holds: each must be there once."""
    uri = str(tmp_path / "t.lance")
    write_sample(uri, rows=4000, fragments=16, seed=16)
    argv = _bad_keys_argv(uri, "local", "--tag", "t")
    failpoints.arm("job.after_tag=error")  # every fragment committed and recorded
    assert main(argv) == 1
    failpoints.arm("")
    (job,) = (Path(uri) / "_laion_ray" / "jobs").iterdir()
    assert len(list((job / "committed").iterdir())) == 16
    shutil.rmtree(job / "committed")  # the part of the removal that got done
    assert main(argv) == 0
    errors = _errors(uri)
    assert len(errors) == 40 and set(errors.values()) == {1}, errors.most_common(3)
    assert _values(uri, "checked") == {
        k: None if (k, "bad-keys") in errors else k + 7 for k in range(4000)
    }
    assert not job.exists()


# --- errors.lance and several datasets ---------------------------------------------------


def test_datasets_sharing_a_checkpoint_uri_do_not_skip_each_others_rows(tmp_path):
    """Same keys, same fragments, same UDF: A's bad rows are not B's."""
    shared = str(tmp_path / "shared-checkpoints")
    a, b = str(tmp_path / "a.lance"), str(tmp_path / "b.lance")
    for target in (a, b):
        write_sample(target, rows=ROWS, fragments=4, seed=4)
    common = dict(checkpoint_uri=shared, executor="local", max_error_fraction=0.5, unit_rows=50)
    first = backfill(a, udfs=["helpers:bad_keys"], udf_params={"helpers:bad_keys": {"percent": 5}},
                     **common)  # fmt: skip
    assert first.rows_failed == ROWS * 5 // 100
    second = backfill(b, udfs=["helpers:bad_keys"], udf_params={"helpers:bad_keys": {"percent": 0}},
                      **common)  # fmt: skip
    assert second.rows_skipped_failed == 0 and second.rows_processed == ROWS
    assert _values(b, "checked") == {k: k + 7 for k in range(ROWS)}
    assert len(list_errors(a, checkpoint_uri=shared)) == ROWS * 5 // 100
    assert len(list_errors(b, checkpoint_uri=shared)) == 0


# --- a checkpoint left finished -----------------------------------------------------------


def test_a_finished_checkpoint_left_behind_does_not_hide_rows_appended_since(tmp_path):
    uri = str(tmp_path / "t.lance")
    write_sample(uri, rows=ROWS, fragments=4, seed=5)
    failpoints.arm("job.after_tag=error")  # every fragment committed, the checkpoint stays
    with pytest.raises(StorageError):
        backfill(uri, udfs=["aspect-ratio"], executor="local", tag="t")
    assert any((Path(uri) / "_laion_ray" / "jobs").iterdir())
    failpoints.arm("")
    lance.write_dataset(sample_table(100, seed=6, start_key=ROWS), uri, mode="append")
    report = backfill(uri, udfs=["aspect-ratio"], executor="local", tag="t")
    assert report.rows_processed == 100
    assert None not in {v for k, v in _values(uri, "aspect_ratio").items() if k >= ROWS}
    assert not any((Path(uri) / "_laion_ray" / "jobs").iterdir())
    assert lance.dataset(uri).tags.list()["t"]["version"] == lance.dataset(uri).version


# --- parts of a run that failed systemically ------------------------------------------------


def test_parts_left_by_a_run_that_failed_systemically_are_recomputed_after_the_fix(tmp_path):
    """Blocks of 40 rows never trip a worker's canary (64 rows); the driver's
    canary stops the job while other blocks are written. After the fix the
    same command must compute those rows, not record them as bad."""
    uri, fix = str(tmp_path / "t.lance"), tmp_path / "fixed"
    write_sample(uri, rows=ROWS, fragments=10, seed=7)
    argv = ["backfill", uri, "--udf", "helpers:buggy_until",
            "--param", f"helpers:buggy_until.fix={fix}", "--executor", "local"]  # fmt: skip
    assert main(argv) == 1
    jobs = Path(uri) / "_laion_ray" / "jobs"
    (job,) = jobs.iterdir()
    assert list(job.glob("parts/*/*.arrow")), "no block was written before the stop"
    fix.touch()
    out = tmp_path / "report.json"
    assert main([*argv, "--report", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["rows_failed"] == 0 and report["rows_skipped_failed"] == 0
    assert _values(uri, "fixed_value") == {k: k + 2 for k in range(ROWS)}
    assert len(list_errors(uri)) == 0


# --- counts ----------------------------------------------------------------------------------


def _rec(unit, first, rows, digest, errors=0, run="r", unit_rows=100, unit_digest=0):
    return dict(unit=unit, run=run, first=first, rows=rows, unit_rows=unit_rows, errors=errors,
                digest=digest, unit_digest=unit_digest)  # fmt: skip


def test_a_unit_is_finished_by_parts_holding_exactly_its_rows():
    from laion_ray.engine.plan import digest_sum, row_digests

    addresses = pa.array(range(100), pa.uint64()).to_numpy()
    digest = row_digests(addresses)
    whole = digest_sum(digest)
    tally = ckpt.UnitTally()
    # Two parts that overlap (rows 40-59 twice) and miss rows 80-99: 100 rows in all.
    assert tally.add(_rec(0, 0, 60, digest_sum(digest[:60]), unit_digest=whole)) is None
    assert tally.add(_rec(0, 40, 40, digest_sum(digest[40:80]), unit_digest=whole)) is None
    # The same part again (a retried task) counts once; the right split finishes it.
    tally = ckpt.UnitTally()
    assert tally.add(_rec(0, 0, 60, digest_sum(digest[:60]), 2, unit_digest=whole)) is None
    assert tally.add(_rec(0, 0, 60, digest_sum(digest[:60]), 2, unit_digest=whole)) is None
    done = tally.add(_rec(0, 60, 40, digest_sum(digest[60:]), 1, unit_digest=whole))
    assert done is not None and done.rows == 100 and done.errors == 3


def test_records_received_twice_count_their_rows_once(tmp_path, monkeypatch):
    """A retried task's records come again: the report and the error gate see
    each row once."""
    uri = str(tmp_path / "t.lance")
    write_sample(uri, rows=ROWS, fragments=4, seed=8)
    real = executors.LocalExecutor.records

    def twice(self, groups, read_args, part_args):
        for records in real(self, groups, read_args, part_args):
            yield records
            yield records

    monkeypatch.setattr(executors.LocalExecutor, "records", twice)
    report = backfill(uri, udfs=["helpers:bad_keys"], executor="local", unit_rows=50)
    assert report.rows_processed == ROWS and report.rows_failed == ROWS // 100


# --- faults told apart from bad input ----------------------------------------------------------


@pytest.mark.slow
def test_an_unreadable_errors_table_stops_the_job_instead_of_recomputing_known_bad_rows(
    s3_server, faulty_s3, capsys
):
    proxy, through_proxy = faulty_s3
    uri = s3_server.uri("safety", "errors-unreadable.lance")
    write_sample(uri, rows=ROWS, fragments=4, seed=9, storage_options=s3_server.storage_options)
    options = [f for k, v in through_proxy.storage_options.items()
               for f in ("--storage-option", f"{k}={v}")]  # fmt: skip
    argv = _bad_keys_argv(uri, "local", *options)
    assert main(argv) == 0
    lance.write_dataset(sample_table(100, seed=10, start_key=ROWS), uri, mode="append",
                        storage_options=s3_server.storage_options)  # fmt: skip
    proxy.refuse("GET", r"/_laion_ray/errors\.lance/")
    capsys.readouterr()
    assert main(argv) == 1  # a store failure, not "no errors table" (nor bad input)
    assert "cannot read the errors table" in capsys.readouterr().err
    # Listing the errors says so too, rather than "no errors recorded".
    assert main(["errors", uri, *options]) == 1
    out, err = capsys.readouterr()
    assert "no errors recorded" not in out, out
    assert "laion-ray: failed: cannot read the errors table" in err and "403" in err, err
    proxy.clear()
    out = json.dumps(list_errors(uri, storage_options=s3_server.storage_options).to_pylist(),
                     default=str)  # fmt: skip
    assert out.count('"committed": true') == ROWS // 100


@pytest.mark.slow
def test_a_store_failure_is_not_reported_as_a_bad_where(s3_server, faulty_s3, capsys):
    proxy, through_proxy = faulty_s3
    uri = s3_server.uri("safety", "where-unreadable.lance")
    write_sample(uri, rows=100, fragments=1, seed=11, storage_options=s3_server.storage_options)
    options = [f for k, v in through_proxy.storage_options.items()
               for f in ("--storage-option", f"{k}={v}")]  # fmt: skip
    proxy.refuse("GET", r"/where-unreadable\.lance/")
    code = main(["backfill", uri, "--udf", "aspect-ratio", "--where", "width > 10", *options])
    err = capsys.readouterr().err
    assert code == 1 and "bad --where" not in err, err


def _proxy_flags(server, flag: str = "--storage-option") -> list[str]:
    return [f for k, v in server.storage_options.items() for f in (flag, f"{k}={v}")]


@pytest.mark.slow
def test_a_merge_source_the_store_refuses_is_a_failed_job_not_bad_input(
    s3_server, faulty_s3, tmp_path, capsys
):
    proxy, through_proxy = faulty_s3
    uri, source = str(tmp_path / "t.lance"), s3_server.uri("safety", "refused-labels.parquet")
    write_sample(uri, rows=100, fragments=2, seed=13)
    fs, path = filesystem(source, s3_server.storage_options)
    with fs.open_output_stream(path) as f:
        pq.write_table(pa.table({"key": range(100), "label": [k % 3 for k in range(100)]}), f)
    argv = ["merge", uri, "--from", source, "--executor", "local",
            *_proxy_flags(through_proxy, "--source-storage-option")]  # fmt: skip
    proxy.refuse("GET", r"/refused-labels\.parquet")
    capsys.readouterr()
    assert main(argv) == 1  # the store failed: not a file that is not Parquet (exit 2)
    err = capsys.readouterr().err
    assert "laion-ray: failed: cannot read source" in err and "ACCESS_DENIED" in err, err
    proxy.clear()
    assert main(argv) == 0
    assert _values(uri, "label") == {k: k % 3 for k in range(100)}


@pytest.mark.slow
def test_a_materialize_whose_source_reads_fail_is_a_failed_job_not_bad_input(
    s3_server, faulty_s3, tmp_path, capsys
):
    proxy, through_proxy = faulty_s3
    src, dest = s3_server.uri("safety", "unreadable-src.lance"), tmp_path / "out.lance"
    write_sample(src, rows=100, fragments=2, seed=14, storage_options=s3_server.storage_options)
    argv = ["materialize", src, str(dest), "--where", "width > 10",
            *_proxy_flags(through_proxy)]  # fmt: skip
    proxy.refuse("GET", r"/unreadable-src\.lance/data/")  # the manifest reads pass
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "laion-ray: failed: writing" in err and "bad --where" not in err, err
    assert not dest.exists()  # no half-written output blocks the rerun
    proxy.clear()
    assert main(argv) == 0
    assert lance.dataset(str(dest)).count_rows() > 0


@pytest.mark.slow
def test_a_dedup_whose_write_back_the_store_refuses_is_a_failed_job_not_bad_input(
    s3_server, faulty_s3, ray_session, capsys
):
    """The column files are written by Ray tasks: their StorageError comes back
    wrapped by Ray, and must still exit 1 with its cause."""
    proxy, through_proxy = faulty_s3
    uri = s3_server.uri("safety", "dedup-refused.lance")
    write_sample(uri, rows=200, fragments=2, seed=15, duplicates=0.1,
                 storage_options=s3_server.storage_options)  # fmt: skip
    argv = ["dedup", uri, "--partitions", "2", *_proxy_flags(through_proxy)]
    proxy.refuse("PUT", r"/dedup-refused\.lance/data/")
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "laion-ray: failed:" in err and "laion-ray: error:" not in err, err
    assert "privileges" in err or "403" in err, err  # it names the cause
    proxy.clear()
    assert main(argv) == 0
    table = lance.dataset(uri, storage_options=s3_server.storage_options).to_table()
    assert table["dup_group"].null_count == 0


# --- secrets ----------------------------------------------------------------------------------


SECRETS = {
    "azure_storage_account_key": "AZ-ACCOUNT-KEY-1",
    "azure_storage_sas_token": "AZ-SAS-2",
    "access_key": "AZ-ACCESS-3",
    "google_service_account_key": "GCS-KEY-4",
    "aws_session_token": "AWS-SESSION-5",
    # Spelled in camelCase, as in a client's config or a UDF's parameters.
    "apiKey": "CAMEL-API-7",
    "accessKey": "CAMEL-ACCESS-8",
    "sasToken": "CAMEL-SAS-9",
    "authToken": "CAMEL-AUTH-10",
    "authorization": "BEARER-11",
}
# Names that hold no secret keep their values visible (``key`` is a column).
NOT_SECRETS = {"key": "KEY-COLUMN", "keyColumn": "KEY-COLUMN-2", "region": "eu-west-9"}


@udf(inputs=["key"], outputs=pa.schema([("called", pa.int64())]), name="calls-an-api")
def calls_an_api(batch: pa.Table, api_key: str = "", region: str = "eu") -> pa.Table:
    return pa.table({"called": batch["key"]})


def test_secrets_never_reach_logs_reports_or_commit_properties(tmp_path):
    flags = [f for k, v in SECRETS.items() for f in ("--storage-option", f"{k}={v}")]
    dest = [f for k, v in SECRETS.items() for f in ("--dest-storage-option", f"{k}={v}")]
    from laion_ray.cli import _loggable

    for argv in (
        ["backfill", "x.lance", "--udf", "tests:calls_an_api", "--param",
         "tests.calls_an_api.api_key=API-KEY-6", *flags],
        ["materialize", "a.lance", "b.lance", *flags, *dest],
        ["merge", "x.lance", "--from", "l.parquet", *flags,
         *[f.replace("--storage", "--source-storage") for f in flags]],
    ):  # fmt: skip
        logged = str(_loggable(build_parser().parse_args(argv)))
        for secret in [*SECRETS.values(), "API-KEY-6"]:
            assert secret not in logged, (secret, logged)
    assert "eu" in str(_loggable(build_parser().parse_args(
        ["backfill", "x.lance", "--udf", "u", "--param", "u.region=eu"])))  # fmt: skip
    params = [f for k, v in {**SECRETS, **NOT_SECRETS}.items() for f in ("--param", f"u.{k}={v}")]
    logged = str(_loggable(build_parser().parse_args(["backfill", "x", "--udf", "u", *params])))
    assert not [v for v in SECRETS.values() if v in logged], logged
    assert all(v in logged for v in NOT_SECRETS.values()), logged

    uri = str(tmp_path / "t.lance")
    write_sample(uri, rows=100, fragments=1, seed=12)
    report = tmp_path / "report.json"
    backfill(uri, udfs=[calls_an_api], udf_params={"calls-an-api": {"api_key": "API-KEY-6"}},
             executor="local", report_path=str(report))  # fmt: skip
    stored = [json.dumps(job_history(uri)), report.read_text(),
              str(lance.dataset(uri).schema.field("called").metadata)]  # fmt: skip
    assert "API-KEY-6" not in "".join(stored)
    assert '"api_key": "***"' in job_history(uri)[-1]["details"]["udfs"][0]
