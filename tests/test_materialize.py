"""materialize: stream a filtered subset of a Lance dataset into a new one."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import lance
import numpy as np
import pyarrow as pa
import pytest

from laion_ray.cli import main
from laion_ray.errors import LaionRayError
from laion_ray.materialize import MaterializeReport, materialize
from laion_ray.storage import filesystem

EMB_DIM = 768
CARD_WHERE = '"NSFW" = 0 AND similarity > 0.35 AND width >= 512'
CARD_WHERE_LANCE = "`NSFW` = 0 AND similarity > 0.35 AND width >= 512"


def laion_table(rows: int, *, seed: int = 0, image_bytes: int = 64) -> pa.Table:
    """A LAION-shaped table: random bytes stand in for JPEGs."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((rows, EMB_DIM), dtype=np.float32)
    return pa.table(
        {
            "key": pa.array([f"{seed:03d}{i:07d}" for i in range(rows)]),
            "image": pa.array([rng.bytes(image_bytes) for _ in range(rows)], pa.large_binary()),
            "caption": pa.array([f"a photo of thing {i}" for i in range(rows)]),
            "url": pa.array([f"https://example.com/{seed}/{i}.jpg" for i in range(rows)]),
            "NSFW": pa.array(rng.integers(0, 2, rows), pa.int64()),
            "similarity": pa.array(rng.uniform(0.2, 0.45, rows), pa.float64()),
            "width": pa.array(rng.choice([256, 512, 640, 1024], rows), pa.int64()),
            "height": pa.array(rng.choice([256, 512, 768], rows), pa.int64()),
            "img_emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), EMB_DIM),
        }
    )


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    """500 rows in 5 fragments, so the scan crosses fragment boundaries."""
    uri = str(tmp_path_factory.mktemp("mat") / "src.lance")
    lance.write_dataset(laion_table(500), uri, max_rows_per_file=100)
    assert len(lance.dataset(uri).get_fragments()) == 5
    return uri


def test_local_filter_columns_limit_matches_direct_scan(src, tmp_path):
    dest = str(tmp_path / "out.lance")
    cols = ["key", "caption", "img_emb"]
    report = materialize(src, dest, where="NSFW = 0 AND width >= 512", columns=cols, limit=40)

    expected = (
        lance.dataset(src)
        .scanner(columns=cols, filter="NSFW = 0 AND width >= 512", limit=40)
        .to_table()
    )
    got = lance.dataset(dest).to_table()
    assert isinstance(report, MaterializeReport)
    assert report.rows == got.num_rows == expected.num_rows == 40
    assert got.schema.names == cols
    assert got.equals(expected)
    assert report.bytes_written > 0 and report.bytes_read > 0
    assert report.elapsed_s > 0
    assert "40 rows" in report.summary()


def test_card_where_with_double_quoted_identifier(src, tmp_path):
    dest = str(tmp_path / "subset.lance")
    cols = ["key", "image", "caption", "url", "img_emb"]
    report = materialize(src, dest, where=CARD_WHERE, columns=cols, batch_rows=16)

    assert report.filter == CARD_WHERE_LANCE
    expected = lance.dataset(src).scanner(columns=cols, filter=CARD_WHERE_LANCE).to_table()
    got = lance.dataset(dest).to_table()
    assert 0 < got.num_rows < 500
    assert got.equals(expected)
    # Cross-check the filter itself against the source values.
    full = lance.dataset(src).to_table().to_pandas()
    keep = full[(full.NSFW == 0) & (full.similarity > 0.35) & (full.width >= 512)]
    assert sorted(got["key"].to_pylist()) == sorted(keep.key)


def test_no_filter_copies_everything(src, tmp_path):
    report = materialize(src, str(tmp_path / "all.lance"))
    assert report.rows == 500
    assert lance.dataset(str(tmp_path / "all.lance")).schema == lance.dataset(src).schema


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"where": "width >>"}, "bad --where"),
        ({"where": "no_such_col = 1"}, "no_such_col"),
        ({"columns": ["key", "nope"]}, "nope"),
        ({"columns": []}, "at least one column"),
        ({"limit": -1}, "limit"),
        ({"batch_rows": 0}, "batch_rows"),
    ],
)
def test_bad_arguments_raise(src, tmp_path, kwargs, needle):
    dest = tmp_path / "bad.lance"
    with pytest.raises(LaionRayError, match=needle):
        materialize(src, str(dest), **kwargs)
    assert not dest.exists()


def test_bad_where_shows_first_line_without_rust_location(src, tmp_path):
    with pytest.raises(LaionRayError) as info:
        materialize(src, str(tmp_path / "x.lance"), where="width >>")
    message = str(info.value)
    assert "\n" not in message and ".rs:" not in message


def test_existing_dest_raises(src, tmp_path):
    dest = tmp_path / "exists.lance"
    dest.mkdir()
    with pytest.raises(LaionRayError, match="already exists"):
        materialize(src, str(dest))


def test_missing_src_raises(tmp_path):
    with pytest.raises(LaionRayError, match="no such path"):
        materialize(str(tmp_path / "missing.lance"), str(tmp_path / "out.lance"))


def test_cli(src, tmp_path, capsys):
    dest = str(tmp_path / "cli.lance")
    argv = ["materialize", src, dest, "--where", CARD_WHERE, "--columns", "key,url", "--limit", "5"]
    assert main(argv) == 0
    assert "materialized 5 rows" in capsys.readouterr().out
    assert lance.dataset(dest).schema.names == ["key", "url"]

    assert main(argv) == 2  # dest exists now
    assert "already exists" in capsys.readouterr().err
    assert main(["materialize", src, str(tmp_path / "b.lance"), "--where", "width >>"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("laion-ray: error: bad --where") and err.count("\n") == 1
    assert main(["materialize", src, str(tmp_path / "c.lance"), "--columns", "key,zzz"]) == 2
    assert "zzz" in capsys.readouterr().err


# --- object store (moto) -------------------------------------------------------


def test_filesystem_against_s3_server(s3_server):
    fs, path = filesystem(s3_server.uri("fs-check"), s3_server.storage_options)
    small, big = path + "/small.bin", path + "/big.bin"
    with fs.open_output_stream(small) as f:
        f.write(b"hello")
    # Larger than one multipart part, so the multipart-completion path runs too.
    payload = np.random.default_rng(1).bytes(12 << 20)
    with fs.open_output_stream(big) as f:
        f.write(payload)
    listed = {i.path: i.size for i in fs.get_file_info(pa.fs.FileSelector(path))}
    assert listed == {small: 5, big: len(payload)}
    with fs.open_input_stream(big) as f:
        assert f.read() == payload
    fs.delete_dir(path)
    assert fs.get_file_info(path).type == pa.fs.FileType.NotFound


def test_s3_source_to_local_dest(s3_server, src, tmp_path):
    remote = s3_server.uri("src-copy.lance")
    lance.write_dataset(
        lance.dataset(src).to_table(),
        remote,
        max_rows_per_file=200,
        storage_options=s3_server.storage_options,
    )
    dest = str(tmp_path / "from-s3.lance")
    report = materialize(
        remote,
        dest,
        where=CARD_WHERE,
        columns=["key", "img_emb"],
        storage_options=s3_server.storage_options,
        dest_storage_options={},
    )
    expected = lance.dataset(src).scanner(columns=["key", "img_emb"], filter=CARD_WHERE_LANCE)
    assert lance.dataset(dest).to_table().equals(expected.to_table())
    assert report.rows > 0


def test_local_source_to_s3_dest(s3_server, src):
    dest = s3_server.uri("subset.lance")
    opts = s3_server.storage_options
    report = materialize(src, dest, where="NSFW = 1", limit=50, dest_storage_options=opts)
    got = lance.dataset(dest, storage_options=opts).to_table()
    assert report.rows == got.num_rows == 50
    assert set(got["NSFW"].to_pylist()) == {1}

    with pytest.raises(LaionRayError, match="already exists"):
        materialize(src, dest, dest_storage_options=opts)


def test_cli_s3_dest_with_storage_options(s3_server, src, capsys):
    dest = s3_server.uri("cli-subset.lance")
    flags = [f"--dest-storage-option={k}={v}" for k, v in s3_server.storage_options.items()]
    assert main(["materialize", src, dest, "--limit", "7", *flags]) == 0
    assert "materialized 7 rows" in capsys.readouterr().out
    opts = s3_server.storage_options
    assert lance.dataset(dest, storage_options=opts).count_rows() == 7


# --- bounded memory --------------------------------------------------------------

_MEMORY_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    from laion_ray.materialize import materialize

    src, dest, batch_rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = materialize(src, dest, where='"NSFW" = 0', batch_rows=batch_rows)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rows": report.rows, "growth": (after - before) * 1024,
                      "read": report.bytes_read}))
    """
)


@pytest.mark.slow
def test_memory_stays_bounded(tmp_path):
    """4000 rows x 200 KB (~800 MB) stream through in a fraction of their size."""
    rows, image_bytes, per_file = 4000, 200_000, 500
    src = str(tmp_path / "big.lance")
    rng = np.random.default_rng(0)
    schema = laion_table(1).schema

    def batches():
        for start in range(0, rows, 100):
            t = laion_table(100, seed=start // 100, image_bytes=16)
            images = pa.array([rng.bytes(image_bytes) for _ in range(100)], pa.large_binary())
            t = t.set_column(1, "image", images)
            t = t.set_column(4, "NSFW", pa.array(np.zeros(100, np.int64)))
            yield from t.to_batches()

    reader = pa.RecordBatchReader.from_batches(schema, batches())
    lance.write_dataset(reader, src, schema=schema, max_rows_per_file=per_file)
    data_bytes = rows * image_bytes

    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, src, str(tmp_path / "copy.lance"), "64"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rows"] == rows
    assert result["read"] >= data_bytes
    # Streaming keeps the peak to a few hundred MB of pages, buffers and
    # allocator slack, whatever the dataset size; a full load would be > 800 MB.
    assert result["growth"] < 0.5 * data_bytes, result
