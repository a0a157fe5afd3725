"""``laion_ray.sample``: schema, determinism, fragments, images and bad-image injection."""

from __future__ import annotations

import hashlib
import io

import lance
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from laion_ray.errors import LaionRayError
from laion_ray.sample import (
    BAD_KINDS,
    CORRUPT_KINDS,
    SampleReport,
    duplicate_plan,
    sample_embeddings,
    sample_table,
    write_sample,
)

# Written out from the LAION-1M dataset card, not imported, so a drift in
# laion_ray.sample.SCHEMA fails here.
CARD_SCHEMA = pa.schema(
    [
        ("key", pa.int64()),
        ("image", pa.large_binary()),
        ("image_path", pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("NSFW", pa.int64()),
        ("LICENSE", pa.string()),
        ("similarity", pa.float64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("exif", pa.string()),
        ("md5", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("img_emb", pa.list_(pa.float32(), 768)),
    ]
)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[lance.LanceDataset, SampleReport]:
    uri = str(tmp_path_factory.mktemp("sample") / "laion.lance")
    report = write_sample(uri, rows=120, fragments=3, seed=7)
    return lance.dataset(uri), report


@pytest.fixture(scope="module")
def bad_sample(tmp_path_factory) -> tuple[pa.Table, SampleReport]:
    uri = str(tmp_path_factory.mktemp("bad") / "laion.lance")
    report = write_sample(uri, rows=48, fragments=2, seed=1, bad_fraction=0.5)
    return lance.dataset(uri).to_table(), report


def test_schema_matches_dataset_card(sample):
    ds, _ = sample
    assert ds.schema.names == CARD_SCHEMA.names
    for field, expected in zip(ds.schema, CARD_SCHEMA, strict=True):
        assert field.type == expected.type, field.name
    assert sample_table(3, seed=0).schema.equals(CARD_SCHEMA)


def test_report(sample):
    ds, report = sample
    assert (report.rows, report.fragments, report.seed, report.bad_keys) == (120, 3, 7, {})
    assert lance.dataset(report.uri).count_rows() == ds.count_rows() == 120
    assert report.elapsed > 0
    assert "120 rows" in report.summary() and "3 fragments" in report.summary()


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a = write_sample(str(tmp_path / "a.lance"), rows=40, fragments=2, seed=5, bad_fraction=0.2)
    b = write_sample(str(tmp_path / "b.lance"), rows=40, fragments=2, seed=5, bad_fraction=0.2)
    c = write_sample(str(tmp_path / "c.lance"), rows=40, fragments=2, seed=6, bad_fraction=0.2)
    ta, tb, tc = (lance.dataset(r.uri).to_table() for r in (a, b, c))
    assert ta.equals(tb)
    assert a.bad_keys == b.bad_keys
    assert ta["image"].to_pylist() == tb["image"].to_pylist()
    assert not ta.equals(tc)
    assert ta["image"].to_pylist() != tc["image"].to_pylist()
    assert ta["img_emb"] != tc["img_emb"]


def test_rows_depend_only_on_seed_and_key(tmp_path):
    one = write_sample(str(tmp_path / "one.lance"), rows=30, fragments=1, seed=2)
    many = write_sample(str(tmp_path / "many.lance"), rows=30, fragments=4, seed=2)
    table = lance.dataset(one.uri).to_table()
    assert table.equals(lance.dataset(many.uri).to_table())
    assert table.equals(sample_table(30, seed=2))
    # start_key continues the same key space, so appended rows fit after a sample.
    assert sample_table(10, seed=2, start_key=20).equals(table.slice(20))


@pytest.mark.parametrize(("rows", "fragments"), [(5, 1), (10, 3), (17, 8), (8, 8)])
def test_fragment_count_and_even_spread(tmp_path, rows, fragments):
    write_sample(str(tmp_path / "d.lance"), rows=rows, fragments=fragments)
    ds = lance.dataset(str(tmp_path / "d.lance"))
    sizes = [f.count_rows() for f in ds.get_fragments()]
    assert len(sizes) == fragments
    assert sum(sizes) == ds.count_rows() == rows
    assert max(sizes) - min(sizes) <= 1
    assert sorted(ds.to_table(columns=["key"])["key"].to_pylist()) == list(range(rows))


def test_images_decode_and_metadata_matches(sample):
    ds, _ = sample
    rows = ds.to_table().to_pylist()
    sizes, formats = set(), set()
    for row in rows:
        image = Image.open(io.BytesIO(row["image"]))
        formats.add(image.format)
        assert image.convert("RGB").size == (row["width"], row["height"])
        assert row["original_width"] >= row["width"]
        assert row["original_height"] >= row["height"]
        assert row["md5"] == hashlib.md5(row["image"]).hexdigest()
        assert (row["status"], row["error_message"]) == ("success", None)
        assert row["NSFW"] in (0, 1)
        assert row["caption"] and row["url"].startswith("https://")
        sizes.add((row["width"], row["height"]))
    assert formats == {"JPEG"}
    assert len(sizes) > len(rows) // 2, "sizes should vary"
    assert any(w >= 512 and h >= 512 for w, h in sizes), "some rows must be high-res"
    assert any(w / h > 1.5 for w, h in sizes) and any(h / w > 1.5 for w, h in sizes)
    assert len({r["key"] for r in rows}) == len(rows)


def test_images_are_not_flat(sample):
    ds, _ = sample
    for data in ds.to_table(columns=["image"], limit=10)["image"].to_pylist():
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
        assert pixels.std() > 10


def test_embeddings_are_normalised_and_clustered(sample):
    ds, _ = sample
    emb = np.stack(ds.to_table(columns=["img_emb"])["img_emb"].to_numpy(zero_copy_only=False))
    assert emb.shape == (120, 768) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Clustered: every row has a close neighbour, far closer than random directions.
    cos = emb @ emb.T
    np.fill_diagonal(cos, -1)
    assert np.median(cos.max(axis=1)) > 0.5
    assert np.median(cos) < 0.1


def test_every_bad_kind_is_injected_and_recorded(bad_sample):
    table, report = bad_sample
    assert set(report.bad_keys) == set(BAD_KINDS)
    assert report.num_bad == 24
    rows = {r["key"]: r for r in table.to_pylist()}
    recorded = {
        k: r["status"].removeprefix("bad:") for k, r in rows.items() if r["status"] != "success"
    }
    assert recorded == {k: kind for kind, keys in report.bad_keys.items() for k in keys}
    for key in recorded:
        assert rows[key]["error_message"]
        assert rows[key]["width"] > 0 and rows[key]["height"] > 0
    for key in set(rows) - set(recorded):
        assert rows[key]["error_message"] is None


@pytest.mark.parametrize("kind", sorted(CORRUPT_KINDS))
def test_corrupt_kinds_do_not_decode(bad_sample, kind):
    table, report = bad_sample
    rows = {r["key"]: r for r in table.to_pylist()}
    for key in report.bad_keys[kind]:
        data = rows[key]["image"]
        if kind == "null":
            assert data is None
            continue
        if kind == "empty":
            assert data == b""
        with pytest.raises((OSError, SyntaxError, Image.DecompressionBombError)):
            Image.open(io.BytesIO(data)).convert("RGB")


@pytest.mark.parametrize(
    ("kind", "fmt", "mode"),
    [("png", "PNG", "RGB"), ("grayscale", "JPEG", "L"), ("cmyk", "JPEG", "CMYK")],
)
def test_unusual_kinds_decode(bad_sample, kind, fmt, mode):
    table, report = bad_sample
    rows = {r["key"]: r for r in table.to_pylist()}
    for key in report.bad_keys[kind]:
        row = rows[key]
        image = Image.open(io.BytesIO(row["image"]))
        assert (image.format, image.mode) == (fmt, mode)
        assert image.convert("RGB").size == (row["width"], row["height"])
        assert row["md5"] == hashlib.md5(row["image"]).hexdigest()


def test_bomb_keeps_crawl_dimensions(bad_sample):
    table, report = bad_sample
    rows = {r["key"]: r for r in table.to_pylist()}
    for key in report.bad_keys["bomb"]:
        assert rows[key]["width"] < 1000 and rows[key]["height"] < 1000
        with pytest.raises(Image.DecompressionBombError):
            Image.open(io.BytesIO(rows[key]["image"]))


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"rows": 0, "fragments": 1}, "rows"),
        ({"rows": 5, "fragments": 0}, "fragments"),
        ({"rows": 5, "fragments": 6}, "fragments"),
        ({"rows": 5, "fragments": 1, "bad_fraction": -0.1}, "-0.1"),
        ({"rows": 5, "fragments": 1, "bad_fraction": 1.5}, "1.5"),
        ({"rows": 5, "fragments": 1, "seed": -1}, "seed"),
    ],
)
def test_validation(tmp_path, kwargs, named):
    uri = str(tmp_path / "v.lance")
    with pytest.raises(LaionRayError, match=named):
        write_sample(uri, **kwargs)
    assert not (tmp_path / "v.lance").exists()


def test_existing_destination_is_refused(tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(LaionRayError, match="exists"):
        write_sample(str(tmp_path / "exists"), rows=2, fragments=1)


# --- near-duplicates ------------------------------------------------------------


@pytest.fixture(scope="module")
def dup_sample(tmp_path_factory) -> tuple[pa.Table, SampleReport]:
    uri = str(tmp_path_factory.mktemp("dups") / "laion.lance")
    report = write_sample(uri, rows=160, fragments=2, seed=3, duplicates=0.15, bad_fraction=0.05)
    return lance.dataset(uri).to_table(), report


def test_duplicates_are_recorded_and_near_their_source(dup_sample):
    table, report = dup_sample
    copies = {c: s for s, cs in report.duplicate_groups.items() for c in cs}
    assert report.num_duplicates == len(copies) == round(160 * 0.15)
    assert not set(copies) & set(report.duplicate_groups)  # no copy is a source
    bad = {k for keys in report.bad_keys.values() for k in keys}
    assert not (set(copies) | set(report.duplicate_groups)) & bad
    emb = np.stack(table["img_emb"].to_numpy(zero_copy_only=False))
    rows = table.to_pylist()
    kinds = {"exact": 0, "other": 0}
    for c, s in copies.items():
        assert 0.97 < float(emb[c] @ emb[s]) < 1.0
        same_bytes = rows[c]["image"] == rows[s]["image"]
        assert same_bytes == (rows[c]["md5"] == rows[s]["md5"])
        kinds["exact" if same_bytes else "other"] += 1
        Image.open(io.BytesIO(rows[c]["image"])).load()  # every copy decodes
        assert (rows[c]["width"], rows[c]["height"]) == Image.open(
            io.BytesIO(rows[c]["image"])
        ).size
    assert kinds["exact"] and kinds["other"]
    # Unrelated rows are far apart: only the injected pairs pass 0.95.
    sims = emb @ emb.T
    np.fill_diagonal(sims, 0)
    a, b = np.nonzero(np.triu(sims >= 0.95))
    truth = {tuple(sorted((c, s))) for c, s in copies.items()}
    same_source = {
        tuple(sorted((x, y)))
        for cs in report.duplicate_groups.values()
        for x in cs
        for y in cs
        if x != y
    }
    assert set(zip(a.tolist(), b.tolist(), strict=True)) <= truth | same_source
    assert truth <= set(zip(a.tolist(), b.tolist(), strict=True))


def test_sample_embeddings_match_the_written_sample(dup_sample):
    table, report = dup_sample
    # Same plan only without bad images: compare the rows that no bad image shifts.
    fast, groups = sample_embeddings(160, seed=3, duplicates=0.15)
    assert fast["key"].to_pylist() == list(range(160))
    again = sample_table(160, seed=3, duplicates=0.15)
    np.testing.assert_allclose(  # copies are normalised in one go: float32 rounding apart
        np.stack(fast["img_emb"].to_numpy(zero_copy_only=False)),
        np.stack(again["img_emb"].to_numpy(zero_copy_only=False)),
        atol=1e-6,
    )
    assert groups == duplicate_plan(160, seed=3, duplicates=0.15)
    assert report.duplicate_groups == duplicate_plan(
        160, seed=3, duplicates=0.15, bad_fraction=0.05
    )


def test_duplicates_out_of_range():
    with pytest.raises(LaionRayError, match="duplicates"):
        sample_table(10, duplicates=0.6)
