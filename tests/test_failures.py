"""Failure classes: bad rows become null plus an error record; a broken
environment or UDF stops the job at once with its real cause and poisons nothing.

The stage-level rules run without Ray; the job-level ones on real Lance, on
both executors (``local`` in this process, ``ray`` on the session Ray).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import traceback

import lance
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from helpers import BadKeyError, bad_keys, buggy_until, is_bad_key

from laion_ray.backfill import backfill
from laion_ray.cli import main
from laion_ray.engine.error_log import (
    checkpoint_root,
    dataset_identity,
    failed_keys_by_fragment,
    list_errors,
)
from laion_ray.engine.stages import (
    CANARY_ROWS,
    ActorStage,
    StageGuard,
    UDFContractError,
    apply_stage,
    is_row_error,
)
from laion_ray.errors import LaionRayError, RowError, SystemicError
from laion_ray.preprocess import ImageDecodeError
from laion_ray.sample import write_sample
from laion_ray.udf import UDF, udf

ROWS, FRAGMENTS = 1000, 4
PER_FRAGMENT = ROWS // FRAGMENTS
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(params=["local", "ray"])
def executor(request) -> str:
    if request.param == "ray":
        request.getfixturevalue("ray_session")
    return request.param


@pytest.fixture
def dataset(tmp_path) -> str:
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=ROWS, fragments=FRAGMENTS, seed=3)
    return uri


def _known_bad(uri: str, udfs: list[str]) -> dict:
    return failed_keys_by_fragment(checkpoint_root(uri), udfs, dataset=dataset_identity(uri))


def _calls(log) -> list[list[int]]:
    """Keys of each call a test UDF logged."""
    if not os.path.exists(log):
        return []
    return [[int(k) for k in line.split()] for line in open(log).read().splitlines()]


def _column(uri: str, name: str) -> dict[int, object]:
    table = lance.dataset(uri).to_table(columns=["key", name])
    return dict(zip(table["key"].to_pylist(), table[name].to_pylist(), strict=True))


# --- stage rules, no Ray ----------------------------------------------------------


def _stage(fn, row_errors=(Exception,), batch_size=64) -> UDF:
    return udf(
        inputs=["key"],
        outputs=pa.schema([("out", pa.int64())]),
        name="probe",
        batch_size=batch_size,
        row_errors=row_errors,
    )(fn)


def _apply(stage: UDF, rows: int, guard: StageGuard | None = None) -> pa.Table:
    batch = pa.table({"key": pa.array(range(rows), pa.int64())})
    return apply_stage(stage.instantiate(), stage, batch, upstream=set(), keep=[], guard=guard)


def test_systemic_types_are_never_row_errors_whatever_the_udf_declares():
    import torch

    anything = _stage(lambda b: b, row_errors=(BaseException,))
    systemic = [
        ModuleNotFoundError("No module named 'cv2'"),
        ImportError("libGL.so.1: cannot open shared object file"),
        MemoryError(),
        RecursionError("maximum recursion depth exceeded"),
        SystemError("bad internal call"),
        LaionRayError("bad parameter"),
        UDFContractError("wrong schema"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
    ]
    for exc in systemic:
        assert not is_row_error(exc, anything), exc
    # User UDFs keep the old default: any other exception marks a bad row...
    assert is_row_error(ValueError("bad value"), anything)
    assert is_row_error(RuntimeError("row 3 is odd"), _stage(lambda b: b))
    # ...unless they declare their row errors; built-ins do.
    assert not is_row_error(ValueError("bad"), _stage(lambda b: b, row_errors=(RowError,)))
    assert issubclass(ImageDecodeError, RowError) and issubclass(BadKeyError, RowError)
    from laion_ray.udf import resolve

    stages = {s.name: s for s in resolve("clip-embed", random_weights=True, device="cpu")}
    assert stages["clip-preprocess"].row_errors == (ImageDecodeError,)
    assert stages["clip-embed"].row_errors == ()
    assert resolve("aspect-ratio")[0].row_errors == ()


def test_an_extreme_banner_is_a_bad_image_not_an_out_of_memory_job():
    import io

    import numpy as np
    from PIL import Image

    from laion_ray.preprocess import PixelSpec, preprocess_image

    png = io.BytesIO()
    Image.fromarray(np.zeros((1, 300, 3), np.uint8)).save(png, "PNG")
    # It would resize to 224 x 67200 pixels; refused as one bad row instead.
    with pytest.raises(ImageDecodeError, match="aspect ratio limit"):
        preprocess_image(png.getvalue(), PixelSpec())


def test_undeclared_exception_stops_the_stage_with_its_cause():
    def one_bad_row(batch):
        if 3 in batch["key"].to_pylist():
            raise KeyError("width")
        return pa.table({"out": batch["key"]})

    with pytest.raises(SystemicError, match=r"^probe: KeyError: 'width'") as info:
        _apply(_stage(one_bad_row, row_errors=(RowError,)), 10)
    assert isinstance(info.value.__cause__, KeyError)
    # A bad parameter or a broken contract propagates as it is (the CLI exits 2).
    with pytest.raises(LaionRayError, match="bad parameter"):
        _apply(_stage(lambda b: (_ for _ in ()).throw(LaionRayError("bad parameter"))), 4)
    with pytest.raises(UDFContractError, match="returned 1 rows for 4 inputs"):
        _apply(_stage(lambda b: pa.table({"out": [1]})), 4)


def test_declared_row_errors_are_isolated():
    def bad_odd_keys(batch):
        odd = [k for k in batch["key"].to_pylist() if k % 2]
        if odd:
            raise BadKeyError(f"key {odd[0]}")
        return pa.table({"out": batch["key"]})

    out = _apply(_stage(bad_odd_keys, row_errors=(RowError,)), 10)
    assert out["out"].to_pylist() == [0, None, 2, None, 4, None, 6, None, 8, None]
    assert out["_error:probe"].to_pylist()[:2] == [None, "BadKeyError: key 1"]


def test_out_of_memory_halves_the_batch_and_keeps_the_smaller_size():
    import torch

    calls = []

    def needs_small_batches(batch):
        calls.append(batch.num_rows)
        if batch.num_rows > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return pa.table({"out": batch["key"]})

    stage, guard = _stage(needs_small_batches), None
    guard = StageGuard(stage)
    first = _apply(stage, 64, guard)
    assert first["out"].to_pylist() == list(range(64))
    assert first["_error:probe"].null_count == 64  # never recorded against rows
    assert calls[:3] == [64, 32, 16] and set(calls[3:]) == {8}
    calls.clear()
    _apply(stage, 64, guard)  # the next batch starts at the size that fitted
    assert calls == [8] * 8

    def no_row_fits(batch):
        raise MemoryError

    with pytest.raises(SystemicError, match="probe: out of memory on a single row"):
        _apply(_stage(no_row_fits), 4)


def test_canary_stops_a_stage_whose_every_row_fails_alike():
    def always(exc_type):
        def fail(batch):
            raise exc_type("no good")

        return fail

    message = r"probe: every row failed with TypeError: no good — this looks like an environment"
    with pytest.raises(SystemicError, match=message):
        _apply(_stage(always(TypeError)), CANARY_ROWS)
    # Fewer rows than the canary needs, or mixed types, or any success: bad rows.
    assert _apply(_stage(always(TypeError)), CANARY_ROWS - 1)["out"].null_count == CANARY_ROWS - 1

    def mixed(batch):
        key = batch["key"][0].as_py()
        raise (ValueError if key % 2 else TypeError)(f"key {key}")

    assert _apply(_stage(mixed), 2 * CANARY_ROWS)["out"].null_count == 2 * CANARY_ROWS

    def first_row_good(batch):
        if batch["key"][0].as_py() == 0 and batch.num_rows == 1:
            return pa.table({"out": batch["key"]})
        raise TypeError("no good")

    out = _apply(_stage(first_row_good), 2 * CANARY_ROWS)
    assert out["out"].null_count == 2 * CANARY_ROWS - 1


def test_a_model_that_fails_to_load_is_systemic():
    class BrokenModel:
        def __init__(self):
            raise OSError("weights.pt: No such file or directory")

        def __call__(self, batch):
            return batch

    with pytest.raises(SystemicError, match="probe: OSError: weights.pt"):
        ActorStage([(_stage(BrokenModel), set(), [])])


# --- jobs, on both executors -----------------------------------------------------


def _args(uri: str, kind: str, tmp_path) -> tuple[list[str], str, str]:
    """CLI arguments of a job broken by ``kind``, its stage and the expected cause."""
    log = str(tmp_path / "calls.log")
    if kind == "missing-module":
        # A module name unique to this test: Ray workers outlive tests.
        module = f"plugin_{tmp_path.name.replace('-', '_')}"
        params = {"module": module, "path": str(tmp_path / "plugins"), "log": log}
        spec, stage, cause = "helpers:uses_module", "uses-module", f"No module named '{module}'"
    else:
        params = {"fix": str(tmp_path / "fixed"), "log": log}
        spec, stage, cause = "helpers:buggy_until", "buggy-until", "every row failed with TypeError"
    args = ["backfill", uri, "--udf", spec]
    for key, value in params.items():
        args += ["--param", f"{spec}.{key}={value}"]
    return args, stage, cause


def _fix(kind: str, tmp_path) -> None:
    if kind == "missing-module":
        plugins = tmp_path / "plugins"
        plugins.mkdir()
        module = f"plugin_{tmp_path.name.replace('-', '_')}"
        (plugins / f"{module}.py").write_text("def value(keys):\n    return keys * 5\n")
    else:
        (tmp_path / "fixed").touch()


@pytest.mark.parametrize("kind", ["missing-module", "type-error"])
def test_broken_environment_or_udf_stops_at_once_and_the_same_command_succeeds_after_the_fix(
    dataset, tmp_path, executor, kind, capsys
):
    args, stage, cause = _args(dataset, kind, tmp_path)
    version = lance.dataset(dataset).version
    assert main([*args, "--executor", executor]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("laion-ray:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"laion-ray: failed: {stage}: ") and cause in lines[0]
    assert "not bad data" in lines[0] and "rerun the same command" in lines[0]
    # Stopped within each unit's first batch (64 rows), not after 1000 rows.
    calls = _calls(tmp_path / "calls.log")
    tried = {k for call in calls for k in call}
    first_batches = {f * PER_FRAGMENT + i for f in range(FRAGMENTS) for i in range(64)}
    assert tried and tried <= first_batches, sorted(tried - first_batches)[:10]
    if kind == "missing-module":  # systemic at once: one call per unit at most, no bisection
        assert len(calls) <= FRAGMENTS and all(len(c) == 64 for c in calls)
    # Nothing committed, nothing known-bad, nothing listed as a failed row.
    ds = lance.dataset(dataset)
    assert ds.version == version and "plugin_value" not in ds.schema.names
    assert _known_bad(dataset, [stage]) == {}
    assert list_errors(dataset).num_rows == 0

    _fix(kind, tmp_path)
    report = tmp_path / "report.json"
    assert main([*args, "--executor", executor, "--report", str(report)]) == 0
    summary = json.loads(report.read_text())
    assert summary["rows_failed"] == 0 and summary["rows_processed"] == ROWS
    column, expected = (
        ("plugin_value", lambda k: k * 5) if kind == "missing-module" else ("fixed_value", None)
    )
    values = _column(dataset, column)
    expected = expected or (lambda k: k + 2)
    assert values == {k: expected(k) for k in range(ROWS)}
    assert list_errors(dataset).num_rows == 0


def test_cleanly_finished_units_are_reused_after_a_systemic_failure(dataset, tmp_path):
    # Units run in order on the local executor: the first two finish, the third
    # imports a missing module.
    spec = "helpers:uses_module"
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    module = f"plugin_{tmp_path.name.replace('-', '_')}"
    (plugins / f"{module}.py").write_text(
        f"def value(keys):\n    if keys.max() >= {2 * PER_FRAGMENT}:\n"
        f"        import {module}_missing_dependency\n    return keys * 5\n"
    )
    params = [f"--param={spec}.{k}={v}" for k, v in (("module", module), ("path", plugins))]
    args = ["backfill", dataset, "--udf", spec, *params, "--executor", "local"]
    assert main(args) == 1
    (plugins / f"{module}_missing_dependency.py").write_text("")
    report = tmp_path / "report.json"
    assert main([*args, "--report", str(report)]) == 0
    summary = json.loads(report.read_text())
    assert summary["rows_resumed"] == 2 * PER_FRAGMENT
    assert summary["rows_processed"] == ROWS - 2 * PER_FRAGMENT and summary["rows_failed"] == 0
    assert _column(dataset, "plugin_value") == {k: 5 * k for k in range(ROWS)}


def test_retrying_known_bad_rows_that_fail_alike_again_is_not_the_canary(dataset):
    same = bad_keys.with_options(params={"percent": 10, "mixed": False})
    first = backfill(dataset, udfs=[same], max_error_fraction=0.2, executor="local")
    assert first.rows_failed == ROWS // 10 >= CANARY_ROWS
    # Only the 100 known-bad rows are read, and all fail with BadKeyError again.
    again = backfill(
        dataset, udfs=[same], retry_errors=True, max_error_fraction=1, executor="local"
    )
    assert again.rows_processed == again.rows_failed == ROWS // 10
    assert len(list_errors(dataset, limit=1000)) == ROWS // 10


def test_worker_traceback_at_verbose(dataset, tmp_path, executor):
    args, _, _ = _args(dataset, "type-error", tmp_path)
    if executor == "local":  # a fresh CLI process, so -v sets up logging as a user gets it
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS_DIR, *sys.path])}
        run = subprocess.run(
            [sys.executable, "-m", "laion_ray.cli", "-v", *args, "--executor", "local"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert run.returncode == 1
        shown = run.stderr
    else:  # the library raises it with the worker's traceback chained
        with pytest.raises(SystemicError) as info:
            backfill(
                dataset,
                udfs=[buggy_until.with_options(params={"fix": str(tmp_path / "fixed")})],
                executor="ray",
            )
        shown = "".join(traceback.format_exception(info.value))
    assert "every row failed with TypeError" in shown
    assert "helpers.py" in shown and "offset + 1" in shown  # the failing line, in the worker


def test_out_of_memory_batches_are_retried_smaller(dataset, tmp_path, executor):
    log = str(tmp_path / "calls.log")
    report = backfill(
        dataset,
        udfs=["helpers:memory_hungry"],
        udf_params={"helpers:memory_hungry": {"max_rows": 8, "log": log}},
        executor=executor,
    )
    assert report.rows_failed == 0 and report.rows_processed == ROWS
    assert _column(dataset, "tripled") == {k: 3 * k for k in range(ROWS)}
    sizes = [len(call) for call in _calls(log)]
    assert max(sizes) == 64 and sum(s for s in sizes if s <= 8) == ROWS  # every row, once
    assert list_errors(dataset).num_rows == 0 and _known_bad(dataset, ["memory-hungry"]) == {}


def test_row_errors_are_null_and_listed_and_every_other_row_is_correct(dataset, executor, capsys):
    report = backfill(dataset, udfs=[bad_keys], max_error_fraction=0.05, executor=executor)
    bad = {k for k in range(ROWS) if is_bad_key(k, 1)}
    assert report.rows_failed == len(bad) == 10
    values = _column(dataset, "checked")
    assert {k for k, v in values.items() if v is None} == bad
    assert all(values[k] == k + 7 for k in values if k not in bad)
    assert main(["errors", dataset, "--json", "--limit", "100"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {r["key"] for r in listed} == bad and all(r["committed"] for r in listed)
    kinds = {r["key"]: r["error_type"] for r in listed}
    assert kinds == {k: "ValueError" if k % 3 == 2 else "BadKeyError" for k in bad}
    # Known-bad: an incremental rerun skips them.
    again = backfill(dataset, udfs=[bad_keys], max_error_fraction=0.05, executor=executor)
    assert again.rows_processed == 0 and again.rows_skipped_failed == len(bad)


def _streaming_executors() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("StreamingExecutor")]


def test_error_gate_shows_its_evidence_and_errors_are_listed_before_any_commit(
    dataset, executor, capsys
):
    version = lance.dataset(dataset).version
    bad30 = bad_keys.with_options(params={"percent": 30})
    with pytest.raises(LaionRayError, match="above --max-error-fraction") as info:
        backfill(dataset, udfs=[bad30], executor=executor)
    message = str(info.value)
    assert "BadKeyError ×" in message and "ValueError ×" in message
    assert message.index("BadKeyError") < message.index("ValueError")  # most frequent first
    assert "key " in message and "is bad" in message and "is not valid" in message
    if executor == "ray":  # the gate also stopped Ray Data's execution
        deadline = time.monotonic() + 30
        while _streaming_executors() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _streaming_executors()
    ds = lance.dataset(dataset)
    assert ds.version == version and "checked" not in ds.schema.names
    # Listed at once, marked as not committed; none is known-bad yet.
    assert main(["errors", dataset, "--limit", "1000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all("(uncommitted run " in line for line in lines)
    listed = list_errors(dataset, limit=1000)
    bad = {k for k in range(ROWS) if is_bad_key(k, 30)}
    assert set(listed["key"].to_pylist()) <= bad and len(lines) == listed.num_rows
    assert not any(listed["committed"].to_pylist())
    assert _known_bad(dataset, ["bad-keys"]) == {}
    # Bad data, not a broken stage: the finished work is kept for a looser rerun.
    report = backfill(dataset, udfs=[bad30], max_error_fraction=0.5, executor=executor)
    assert report.rows_resumed + report.rows_processed == ROWS
    values = _column(dataset, "checked")
    assert pc.sum(pa.array([v is None for v in values.values()])).as_py() == len(bad)


def test_a_model_that_fails_to_load_stops_the_job_on_ray(dataset, ray_session, capsys):
    version = lance.dataset(dataset).version
    assert main(["backfill", dataset, "--udf", "helpers:FailsToLoad", "--executor", "ray"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("laion-ray:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("laion-ray: failed: fails-to-load: FileNotFoundError")
    assert "missing.pt" in lines[0]
    assert lance.dataset(dataset).version == version
    assert list_errors(dataset).num_rows == 0


def test_a_worker_that_keeps_dying_ends_the_job_with_the_root_cause(dataset, ray_session, capsys):
    assert main(["backfill", dataset, "--udf", "helpers:die_always", "--executor", "ray"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("laion-ray:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("laion-ray: failed: backfill:helpers:die_always: ")
    assert "WorkerCrashedError" in lines[0] and "after Ray's retries" in lines[0]
