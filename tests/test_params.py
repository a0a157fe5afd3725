"""``--param`` is strict and typed: values are read as the UDF's signature declares them,
and a parameter for a UDF not in the job, an unknown name or a repeated key is bad input."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Literal

import lance
import numpy as np
import pyarrow as pa
import pytest

from laion_ray.backfill import backfill
from laion_ray.cli import main
from laion_ray.errors import LaionRayError
from laion_ray.udf import UDF, convert_value, format_param, typed_params, udf, udf_parameters

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("annotation", "text", "expected"),
    [
        (float, "0.8", 0.8),
        (float, "1", 1.0),
        (int, "123", 123),
        (str, "123", "123"),  # a label that looks like a number stays a label
        (str, "true", "true"),
        (str, "null", "null"),  # str does not admit None: the text it is
        (float | None, "null", None),
        (float | None, "NULL", None),
        (str | None, "none", "none"),  # only `null` is None: activation=none is a word
        (str | None, "null", None),
        (bool, "true", True),
        (bool, "False", False),
        (bool, "1", True),
        (bool, "0", False),
        (bool, "yes", True),
        (bool, "no", False),
        (Literal["fp16", "fp32"] | None, "fp16", "fp16"),
        (Literal[1, 2], "2", 2),
        (Sequence[int], "[768, 64, 1]", [768, 64, 1]),
        (int | tuple[int, int] | None, "[1, 4]", (1, 4)),
        (int | tuple[int, int] | None, "4", 4),
        (str | list[str], "a photo", "a photo"),
        (str | list[str], '["a", "b"]', ["a", "b"]),
        (dict[str, str], '{"ok": "a photo"}', {"ok": "a photo"}),
        (inspect.Parameter.empty, "123", "123"),  # unannotated: the string
    ],
)
def test_values_convert_by_the_declared_type(annotation, text, expected):
    got = convert_value(annotation, text)
    assert got == expected and type(got) is type(expected)


def test_nan_is_a_float_only_where_a_float_is_declared():
    assert math.isnan(convert_value(float, "NaN"))
    assert convert_value(str, "NaN") == "NaN"
    with pytest.raises(ValueError, match="integer"):
        convert_value(int, "NaN")


@pytest.mark.parametrize(
    ("annotation", "text", "needle"),
    [
        (int, "1.5", "integer"),
        (float, "high", "number"),
        (bool, "maybe", "boolean"),
        (Literal["fp16", "fp32"], "fp64", "'fp16' or 'fp32'"),
        (float | None, "none", "number"),
        (Sequence[int], '[1, "x"]', "integer"),
        (Sequence[int], "[1, 'x']", "a JSON value"),
    ],
)
def test_values_that_do_not_convert(annotation, text, needle):
    with pytest.raises(ValueError, match=needle):
        convert_value(annotation, text)


@pytest.mark.parametrize(
    "value", ["123", "a b", 0.8, 3, True, False, None, [768, 64, 1], {"ok": "x"}]
)
def test_format_param_round_trips(value):
    annotation = {str: str, float: float, int: int, bool: bool, list: list[int], dict: dict}
    declared = float | None if value is None else annotation[type(value)]
    assert convert_value(declared, format_param(value)) == value


# --- what a UDF declares ---------------------------------------------------------------


@udf(inputs=["width"], outputs=pa.schema([("scaled", pa.float64())]), name="scaled")
def scaled(batch: pa.Table, factor: float = 1.0, *, label: str = "x", untyped=None) -> pa.Table:
    return pa.table({"scaled": pa.array(batch["width"].to_numpy() * factor, pa.float64())})


@udf(inputs=["width"], outputs=pa.schema([("model_out", pa.int64())]), name="model-udf")
class ModelUDF:
    def __init__(self, layers: int = 2, precision: Literal["fp16", "fp32"] = "fp32") -> None:
        self.layers = layers

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.table({"model_out": pa.array(batch["width"].to_numpy() * self.layers)})


def make_scaled(*, factor: float = 2.0, keep: bool = False) -> list[UDF]:
    """A factory given as ``module:factory``."""
    return [scaled.with_options(params={"factor": factor})]


def test_parameters_come_from_the_signature():
    rules = udf_parameters("moderation-rules")
    assert rules.types["nsfw_threshold"] is float and rules.types["flagged_label"] is str
    assert rules.types["min_similarity"] == float | None
    assert "num_cpus" in rules.types and "batch_size" in rules.types  # **resources
    assert not rules.any_name
    function = udf_parameters(scaled)  # the compute's parameters after the batch
    assert list(function.types) == ["factor", "label", "untyped"]
    assert function.types["untyped"] is inspect.Parameter.empty
    assert udf_parameters("test_params:ModelUDF").types == {
        "layers": int,
        "precision": Literal["fp16", "fp32"],
    }
    factory = udf_parameters("test_params:make_scaled")
    assert factory.types == {"factor": float, "keep": bool}
    assert typed_params(
        ["test_params:make_scaled"], {"test_params:make_scaled": {"keep": "no"}}
    ) == {"test_params:make_scaled": {"keep": False}}


# --- the CLI ------------------------------------------------------------------------------


@pytest.fixture
def table(tmp_path):
    rows = 40
    keys = np.arange(rows, dtype=np.int64)
    uri = str(tmp_path / "t.lance")
    lance.write_dataset(
        pa.table({
            "key": keys,
            "NSFW": (keys % 2).astype(np.float64),
            "similarity": np.linspace(0.1, 0.5, rows),
            "width": np.full(rows, 640, np.int64),
            "height": np.full(rows, 480, np.int64),
        }),
        uri,
        max_rows_per_file=20,
    )  # fmt: skip
    return uri


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("laion-ray: error:"), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


@pytest.mark.parametrize(
    ("params", "needles"),
    [
        (
            ["moderation-rules.nsfw_threshold=0.8"],
            ["moderation-rules.nsfw_threshold", "not in this job", "aspect-ratio"],
        ),
        (["aspect-ratio.nsfw_threshold=0.8"], ["no parameter 'nsfw_threshold'", "num_cpus: float"]),
        (
            ["aspect-ratio.batch_size=100", "aspect-ratio.batch_size=200"],
            [
                "aspect-ratio.batch_size is given twice",
                "'100'",
                "'200'",
                "aspect-ratio parameters: num_cpus: float",
                "batch_size: int",
            ],
        ),
        (  # repeated, and for a UDF not in the job: the latter is what to fix
            ["moderation-rules.nsfw_threshold=0.8", "moderation-rules.nsfw_threshold=0.9"],
            ["moderation-rules.nsfw_threshold", "not in this job"],
        ),
        (["aspect-ratio.batch_size=lots"], ["aspect-ratio.batch_size='lots'", "expected int"]),
        (["aspect-ratio.batch_size=1.5"], ["expected int", "batch_size: int"]),
        (["aspect-ratio"], ["UDF.KEY=VALUE"]),
    ],
)
def test_bad_params_are_one_line_exit_2(table, capsys, params, needles):
    argv = ["backfill", table, "--udf", "aspect-ratio", "--executor", "local"]
    assert main([*argv, *(f"--param={p}" for p in params)]) == 2
    _one_error_line(capsys, *needles)
    assert "aspect_ratio" not in lance.dataset(table).schema.names


def test_a_value_that_does_not_convert_names_the_udf_and_its_parameters(table, capsys):
    argv = ["backfill", table, "--udf", "moderation-rules", "--executor", "local"]
    assert main([*argv, "--param", "moderation-rules.nsfw_threshold=high"]) == 2
    line = _one_error_line(capsys, "moderation-rules.nsfw_threshold='high'", "expected float")
    assert (
        "moderation-rules parameters: nsfw_threshold: float, min_similarity: float | None" in line
    )


def test_values_keep_the_declared_types(table):
    argv = ["backfill", table, "--udf", "moderation-rules", "--executor", "local"]
    labels = [
        "--param=moderation-rules.flagged_label=123",
        "--param=moderation-rules.ok_label=true",
    ]
    assert main([*argv, *labels, "--param=moderation-rules.nsfw_threshold=0"]) == 0
    got = lance.dataset(table).to_table(columns=["NSFW", "moderation_label"]).to_pylist()
    assert {(r["NSFW"], r["moderation_label"]) for r in got} == {(0.0, "true"), (1.0, "123")}
    (field,) = [f for f in lance.dataset(table).schema if f.name == "moderation_label"]
    producer = field.metadata[b"laion_ray.udf"].decode()
    assert UDF.parse_key(producer)[2]["nsfw_threshold"] == 0.0  # a float, from "0"


def test_the_python_api_takes_typed_values_and_refuses_unknown_names(table):
    # One parameter dict may serve several jobs: entries of other UDFs are left alone.
    shared = {
        "moderation-rules": {"nsfw_threshold": 0.5, "flagged_label": "flag"},
        "clip-embed": {"model": "ViT-S-32"},
    }
    report = backfill(table, udfs=["moderation-rules"], udf_params=shared, executor="local")
    assert report.rows_processed == 40
    labels = lance.dataset(table).to_table(columns=["moderation_label"])["moderation_label"]
    assert set(labels.to_pylist()) == {"flag", "ok"}
    with pytest.raises(LaionRayError, match="no parameter 'threshold'.*nsfw_threshold: float"):
        backfill(
            table, udfs=["moderation-rules"], udf_params={"moderation-rules": {"threshold": 1}}
        )


# --- jobs/ --------------------------------------------------------------------------------


def _job(name: str):
    sys.path.insert(0, str(ROOT / "jobs"))  # the entry points import their sibling _common
    spec = importlib.util.spec_from_file_location(name, ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def captured(monkeypatch):
    """The ``udf_params`` a job hands to ``backfill`` (which is not run)."""
    # The module: the package attribute of the same name is the function.
    module = importlib.import_module("laion_ray.backfill")
    seen = {}

    def fake_backfill(uri, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(module, "backfill", fake_backfill)
    return seen


def test_jobs_pass_typed_values(captured):
    with pytest.raises(SystemExit):
        _job("moderation").main(
            ["X.lance", "--nsfw-threshold", "1", "--flagged-label", "123", "--ok-label", "null"]
        )
    params = captured["udf_params"]["moderation-rules"]
    assert params == {"nsfw_threshold": 1.0, "flagged_label": "123", "ok_label": "null"}
    assert type(params["nsfw_threshold"]) is float

    captured.clear()
    with pytest.raises(SystemExit):
        _job("reembed").main(["X.lance", "--model", "ViT-S-32", "--random-weights", "--captions"])
    params = captured["udf_params"]["clip-embed"]
    assert params == {"model": "ViT-S-32", "random_weights": True, "captions": True}
