"""One filter language (``laion_ray.filters``): the card's ``"NSFW"``, pylance's backticks
and bare names mean the same column in every command, and a string literal stays a string."""

from __future__ import annotations

import json

import lance
import numpy as np
import pyarrow as pa
import pytest

from laion_ray.backfill import backfill
from laion_ray.cli import main
from laion_ray.errors import LaionRayError
from laion_ray.filters import (
    check_filter,
    filter_table,
    quote_identifier,
    quote_literal,
    sql_and,
    sql_any_null,
    sql_in,
    to_lance_sql,
)
from laion_ray.materialize import materialize
from laion_ray.search import search

ROWS = 60
CAPTIONS = ['say "hi"', "it's", "plain", '"NSFW"']


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ('"NSFW" = 0', "`NSFW` = 0"),
        ('"NSFW" = 0 AND "width" >= 512', "`NSFW` = 0 AND `width` >= 512"),
        ("`NSFW` = 0", "`NSFW` = 0"),
        ("NSFW = 0", "NSFW = 0"),
        ("caption = '\"NSFW\"'", "caption = '\"NSFW\"'"),  # inside a literal: a string
        ("caption = 'it''s \"NSFW\"'", "caption = 'it''s \"NSFW\"'"),  # escaped quote
        ('"my col" = 1', "`my col` = 1"),
        ('"say ""hi""" = 1', '`say "hi"` = 1'),  # "" is a quote inside an identifier
        ('"odd`name" = 1', "`odd``name` = 1"),  # a backtick inside is escaped for Lance
        ("`a``b` = 'x\"y'", "`a``b` = 'x\"y'"),
        ('caption = "not a column"', "caption = `not a column`"),  # SQL: an identifier
        ("similarity > 0.35", "similarity > 0.35"),
    ],
)
def test_to_lance_sql(where, expected):
    assert to_lance_sql(where) == expected
    assert to_lance_sql(expected) == expected  # Lance SQL passes through unchanged


@pytest.mark.parametrize(
    ("where", "needle"),
    [
        ('"NSFW = 0', 'unterminated quoted identifier (")'),
        ("caption = 'oops", "unterminated string literal (')"),
        ("`NSFW = 0", "unterminated quoted identifier (`)"),
    ],
)
def test_unterminated_quotes_are_bad_input(where, needle):
    with pytest.raises(LaionRayError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        to_lance_sql(where)


def test_no_filter():
    assert to_lance_sql(None) is None and to_lance_sql("  ") is None


def test_quoting_helpers_build_filters_lance_evaluates(tmp_path):
    names = ["my col", "NSFW", "select"]  # a space, upper case, a keyword
    table = pa.table({n: pa.array([0, 1, 2], pa.int64()) for n in names}).append_column(
        "udf", pa.array(["clip-embed", "it's", "x'); DROP"])
    )
    ds = lance.write_dataset(table, str(tmp_path / "q.lance"))
    for name in names:
        assert ds.count_rows(filter=f"{quote_identifier(name)} = 1") == 1
    assert ds.count_rows(filter=sql_in("udf", ["it's", "x'); DROP"])) == 2
    assert ds.count_rows(filter=sql_in("udf", [])) == 0
    assert ds.count_rows(filter=sql_in("NSFW", [0, 2])) == 2
    assert ds.count_rows(filter=f"udf = {quote_literal('it' + chr(39) + 's')}") == 1
    assert sql_any_null(["my col", "NSFW"]) == "`my col` IS NULL OR `NSFW` IS NULL"
    assert sql_any_null([]) is None
    combined = sql_and("`NSFW` >= 1", None, sql_any_null(["select"]))
    assert combined == "(`NSFW` >= 1) AND (`select` IS NULL)"
    assert ds.count_rows(filter=combined) == 0
    assert sql_and(None, None) is None
    assert quote_identifier("a`b") == "`a``b`"
    with pytest.raises(LaionRayError, match="non-empty"):
        quote_identifier("")


def test_check_filter_and_filter_table(tmp_path):
    table = pa.table({"key": [1, 2, 3], "error_type": ["ValueError", "OSError", "ValueError"]})
    ds = lance.write_dataset(table, str(tmp_path / "c.lance"))
    check_filter(ds, "key > 1")
    with pytest.raises(LaionRayError, match=r"^bad --where 'nope = 1': .*nope") as info:
        check_filter(ds, "nope = 1")
    assert "\n" not in str(info.value)
    kept = filter_table(table, to_lance_sql("\"error_type\" = 'ValueError' AND key > 1"))
    assert kept.to_pylist() == [{"key": 3, "error_type": "ValueError"}]
    assert filter_table(table, None) is table


@pytest.fixture
def quoted(tmp_path):
    """Rows whose captions hold double quotes, NSFW flags, sizes and small vectors."""
    rng = np.random.default_rng(0)
    keys = np.arange(ROWS, dtype=np.int64)
    table = pa.table({
        "key": keys,
        "NSFW": keys % 3 % 2,
        "caption": [CAPTIONS[k % len(CAPTIONS)] for k in keys],
        "url": [f"https://x/{k}.jpg" for k in keys],
        "similarity": rng.uniform(0.2, 0.4, ROWS),
        "width": np.full(ROWS, 640, np.int64),
        "height": np.full(ROWS, 480, np.int64),
        "img_emb": pa.FixedSizeListArray.from_arrays(
            pa.array(rng.normal(size=ROWS * 8).astype(np.float32)), 8
        ),
    })  # fmt: skip
    uri = str(tmp_path / "q.lance")
    lance.write_dataset(table, uri, max_rows_per_file=ROWS // 3)
    expected = {
        k for k in keys.tolist() if k % 3 % 2 == 0 and CAPTIONS[k % len(CAPTIONS)] != 'say "hi"'
    }
    return uri, expected


# The card's quoting, pylance's and none: one meaning, and the literal stays a string.
SAME_FILTER = [
    '"NSFW" = 0 AND caption <> \'say "hi"\'',
    "`NSFW` = 0 AND caption <> 'say \"hi\"'",
    'NSFW = 0 AND "caption" <> \'say "hi"\'',
]


@pytest.mark.parametrize("where", SAME_FILTER)
def test_every_command_reads_the_same_filter_alike(quoted, tmp_path, where):
    uri, expected = quoted
    report = backfill(uri, udfs=["aspect-ratio"], where=where, executor="local")
    filled = lance.dataset(uri).to_table(columns=["key", "aspect_ratio"]).to_pylist()
    assert {r["key"] for r in filled if r["aspect_ratio"] is not None} == expected
    assert report.rows_processed == len(expected)

    dest = str(tmp_path / "subset.lance")
    materialize(uri, dest, where=where)
    assert set(lance.dataset(dest).to_table(columns=["key"])["key"].to_pylist()) == expected

    hits = search(uri, row=0, k=ROWS, where=where, columns=("key",), refine_factor=None)
    assert {h["key"] for h in hits} == expected


@pytest.mark.parametrize(
    "command",
    [
        ["backfill", "{uri}", "--udf", "aspect-ratio", "--executor", "local"],
        ["search", "{uri}", "--row", "0"],
        ["materialize", "{uri}", "{dest}"],
        ["errors", "{uri}"],
    ],
    ids=lambda c: c[0],
)
def test_a_bad_filter_is_the_same_one_line_everywhere(quoted, tmp_path, capsys, command):
    uri, _ = quoted
    argv = [a.format(uri=uri, dest=str(tmp_path / "d.lance")) for a in command]
    assert main([*argv, "--where", '"nope" = 1']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # The filter as the user wrote it, and Lance's reason.
    assert len(err) == 1 and err[0].startswith("laion-ray: error: bad --where '\"nope\" = 1': ")
    assert "nope" in err[0].split(": ", 2)[2]


def test_backfill_cli_where_in_the_cards_quoting(quoted, capsys):
    uri, expected = quoted
    argv = ["backfill", uri, "--udf", "aspect-ratio", "--executor", "local"]
    assert main([*argv, "--where", SAME_FILTER[0]]) == 0
    filled = lance.dataset(uri).to_table(columns=["key", "aspect_ratio"]).to_pylist()
    assert {r["key"] for r in filled if r["aspect_ratio"] is not None} == expected
    capsys.readouterr()  # the run's progress line
    assert main([*argv, "--where", '"NSFW = 0']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("laion-ray: error: unterminated")


def test_errors_where_filters_the_error_records(quoted, capsys):
    uri, _ = quoted
    backfill(uri, udfs=["helpers:fail_on_keys"], executor="local", max_error_fraction=1.0)
    failing = [k for k in range(ROWS) if k % 97 == 5]
    assert failing == [5]  # fail_on_keys' rule, on this table
    argv = ["errors", uri, "--json"]
    assert main(argv) == 0
    assert [r["key"] for r in json.loads(capsys.readouterr().out)] == failing
    assert main([*argv, "--where", "\"error_type\" = 'ValueError' AND key < 10"]) == 0
    assert [r["key"] for r in json.loads(capsys.readouterr().out)] == failing
    assert main([*argv, "--where", "`key` > 10"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["errors", uri, "--where", "message LIKE '%bad key%'"]) == 0
    assert "key=5" in capsys.readouterr().out
    assert main(["errors", uri, "--where", "nope = 1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("laion-ray: error: bad --where") and "nope" in err[0]
