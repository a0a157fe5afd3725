"""UDF maths and the stage runner, without Ray."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from laion_ray.engine.stages import UDFContractError, apply_stage
from laion_ray.errors import LaionRayError
from laion_ray.udf import UDF, resolve, udf
from laion_ray.udfs.aspect_ratio import aspect_ratio


@pytest.mark.parametrize(
    "width,height,ratio,high_res",
    [
        (1024, 512, 2.0, True),
        (512, 512, 1.0, True),
        (511, 900, 511 / 900, False),
        (0, 100, None, False),
        (100, 0, None, False),
        (None, 100, None, None),
        (100, None, None, None),
        (-5, 10, None, False),
    ],
)
def test_aspect_ratio_never_inf(width, height, ratio, high_res):
    out = aspect_ratio.instantiate()(
        pa.table(
            {"width": [width], "height": [height]},
            schema=pa.schema([("width", pa.int64()), ("height", pa.int64())]),
        )
    )
    got = out["aspect_ratio"][0].as_py()
    assert (got is None and ratio is None) or math.isclose(got, ratio)
    assert out["is_high_res"][0].as_py() is high_res


@pytest.mark.parametrize(
    "params,nsfw,similarity,expected",
    [
        ({}, [0, 1, None], [0.3, 0.3, 0.3], ["ok", "review", None]),
        ({"nsfw_threshold": 2}, [0, 1], [0.3, 0.3], ["ok", "ok"]),
        ({"min_similarity": 0.25}, [0, 0, 1], [0.2, 0.3, 0.9], ["review", "ok", "review"]),
        ({"flagged_label": "nsfw", "ok_label": "safe"}, [1, 0], [0.3, 0.3], ["nsfw", "safe"]),
    ],
)
def test_moderation_rules(params, nsfw, similarity, expected):
    (stage,) = resolve("moderation-rules", **params)
    table = pa.table({"NSFW": pa.array(nsfw, pa.int64()), "similarity": similarity})
    assert stage.instantiate()(table)["moderation_label"].to_pylist() == expected
    assert ("similarity" in stage.inputs) == ("min_similarity" in params)


@pytest.mark.parametrize(
    "threshold,nsfw,score,expected",
    [
        (
            0.8,
            [0, 0, 1, None, None, 0],
            [0.1, 0.9, 0.1, 0.95, 0.1, None],
            ["ok", "review", "review", "review", None, "ok"],
        ),
        (0.99, [0, 0], [0.9, 0.995], ["ok", "review"]),
    ],
)
def test_moderation_rules_with_nsfw_score(threshold, nsfw, score, expected):
    (stage,) = resolve("moderation-rules", nsfw_score_threshold=threshold)
    assert stage.inputs == ("NSFW", "nsfw_score")
    table = pa.table(
        {"NSFW": pa.array(nsfw, pa.int64()), "nsfw_score": pa.array(score, pa.float32())}
    )
    assert stage.instantiate()(table)["moderation_label"].to_pylist() == expected
    # Runs without the score keep their key, so columns they stored stay theirs.
    (plain,) = resolve("moderation-rules")
    assert "nsfw_score" not in plain.key


def test_registry_errors_name_the_problem():
    with pytest.raises(LaionRayError, match="unknown UDF 'nope'.*aspect-ratio"):
        resolve("nope")
    with pytest.raises(LaionRayError, match="bad parameters for UDF 'moderation-rules'"):
        resolve("moderation-rules", bogus=1)
    with pytest.raises(LaionRayError, match="cannot import UDF"):
        resolve("no_such_module:thing")


@udf(inputs=["x"], outputs=pa.schema([("y", pa.int64())]), name="picky")
def picky(batch: pa.Table) -> pa.Table:
    values = batch["x"].to_pylist()
    if any(v % 10 == 3 for v in values):
        raise ValueError("no threes")
    return pa.table({"y": [v * 2 for v in values]})


def _batch(n: int) -> pa.Table:
    return pa.table(
        {"x": pa.array(range(n), pa.int64()), "_rowaddr": pa.array(range(n), pa.uint64())}
    )


def test_bisection_isolates_bad_rows_and_keeps_the_rest():
    out = apply_stage(picky.instantiate(), picky, _batch(40), upstream=set(), keep=["_rowaddr"])
    bad = [i for i in range(40) if i % 10 == 3]
    assert [i for i, v in enumerate(out["y"].to_pylist()) if v is None] == bad
    assert all(out["y"][i].as_py() == 2 * i for i in range(40) if i not in bad)
    errors = out["_error:picky"].to_pylist()
    assert [i for i, e in enumerate(errors) if e] == bad
    assert errors[3] == "ValueError: no threes"
    assert out.column_names == ["_rowaddr", "y", "_error:picky"]


def test_rows_failed_upstream_are_skipped_not_recomputed():
    calls = []

    def double(batch: pa.Table) -> pa.Table:
        calls.append(batch.num_rows)
        return pa.table({"z": pa.compute.multiply(batch["_pix"], 2)})

    stage = UDF("double", "1", ("_pix",), pa.schema([("z", pa.int64())]), double)
    batch = pa.table({"_pix": pa.array([1, None, 3], pa.int64())})
    out = apply_stage(double, stage, batch, upstream={"_pix"}, keep=[])
    assert out["z"].to_pylist() == [2, None, 6]
    assert out["_error:double"].to_pylist() == [None, None, None]
    assert calls == [2]


def test_wrong_output_schema_is_a_contract_error_not_a_bad_row():
    @udf(inputs=["x"], outputs=pa.schema([("y", pa.int64())]), name="liar")
    def liar(batch: pa.Table) -> pa.Table:
        return pa.table({"not_y": batch["x"]})

    with pytest.raises(UDFContractError, match="does not match its declared schema"):
        apply_stage(liar.instantiate(), liar, _batch(4), upstream=set(), keep=[])

    @udf(inputs=["x"], outputs=pa.schema([("y", pa.int64())]), name="short")
    def short(batch: pa.Table) -> pa.Table:
        return pa.table({"y": batch["x"].slice(1)})

    with pytest.raises(UDFContractError, match="returned 3 rows for 4 inputs"):
        apply_stage(short.instantiate(), short, _batch(4), upstream=set(), keep=[])


def test_udf_key_changes_with_version_and_params():
    (a,) = resolve("moderation-rules")
    (b,) = resolve("moderation-rules", nsfw_threshold=0.9)
    assert a.key != b.key
    assert a.with_options(version="2").key != a.key
