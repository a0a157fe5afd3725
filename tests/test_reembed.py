"""CLIP re-embedding through the backfill engine (real Lance, real Ray, random weights)."""

from __future__ import annotations

import lance
import numpy as np
import pyarrow as pa
import pytest

from laion_ray.backfill import backfill, resolve_stages
from laion_ray.engine.error_log import list_errors
from laion_ray.sample import CORRUPT_KINDS, sample_table, write_sample

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]

MODEL = {"model": "ViT-B-32", "random_weights": True}
PARAMS = {"clip-embed": MODEL, "moderation-clip": MODEL}


def _embedding_matrix(column: pa.ChunkedArray) -> np.ndarray:
    return np.stack([np.asarray(v, np.float32) for v in column.to_pylist()])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("clip") / "images.lance")
    report = write_sample(uri, rows=40, fragments=2, seed=3, bad_fraction=0.2)
    return uri, report


def _copy(uri: str, tmp_path, name: str) -> str:
    dest = str(tmp_path / name)
    lance.write_dataset(lance.dataset(uri).to_table(), dest, max_rows_per_file=20)
    return dest


def test_embeddings_match_in_process_udf_and_bad_images_get_errors(images, tmp_path):
    uri = _copy(images[0], tmp_path, "a.lance")
    report = backfill(uri, udfs=["clip-embed"], udf_params=PARAMS, max_error_fraction=0.5)
    table = lance.dataset(uri).to_table(columns=["key", "image", "img_emb_vit_b_32"])
    assert table.schema.field("img_emb_vit_b_32").type == pa.list_(pa.float32(), 512)
    bad = {k for kind, keys in images[1].bad_keys.items() if kind in CORRUPT_KINDS for k in keys}
    values = dict(zip(table["key"].to_pylist(), table["img_emb_vit_b_32"].to_pylist(), strict=True))
    assert {k for k, v in values.items() if v is None} == bad
    assert report.rows_failed == len(bad)
    errors = list_errors(uri)
    assert set(errors["key"].to_pylist()) == bad
    assert set(errors["udf"].to_pylist()) == {"clip-preprocess"}

    good = table.filter(pa.compute.is_valid(table["img_emb_vit_b_32"]))
    got = _embedding_matrix(good["img_emb_vit_b_32"])
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    # The same stages called in-process on the same rows give the same vectors.
    batch = pa.table({"image": good["image"]})
    for stage in resolve_stages(["clip-embed"], params=PARAMS):
        batch = batch.append_column(
            stage.output_schema.field(0), stage.instantiate()(batch).column(0)
        )
    expected = _embedding_matrix(batch["img_emb_vit_b_32"])
    assert np.min(np.sum(got * expected, axis=1)) > 0.9999


def test_fused_run_equals_separate_runs(images, tmp_path):
    fused = _copy(images[0], tmp_path, "fused.lance")
    separate = _copy(images[0], tmp_path, "separate.lance")
    udfs = ["clip-embed", "moderation-clip", "aspect-ratio"]
    backfill(fused, udfs=udfs, udf_params=PARAMS, max_error_fraction=0.5)
    backfill(separate, udfs=["clip-embed"], udf_params=PARAMS, max_error_fraction=0.5)
    backfill(separate, udfs=["moderation-clip"], udf_params=PARAMS, max_error_fraction=0.5)
    backfill(separate, udfs=["aspect-ratio"])
    columns = [
        "key",
        "img_emb_vit_b_32",
        "moderation_clip_label",
        "moderation_clip_score",
        "aspect_ratio",
    ]
    a = lance.dataset(fused).to_table(columns=columns).sort_by("key")
    b = lance.dataset(separate).to_table(columns=columns).sort_by("key")
    assert a["moderation_clip_label"].to_pylist() == b["moderation_clip_label"].to_pylist()
    assert a["aspect_ratio"].to_pylist() == b["aspect_ratio"].to_pylist()
    for x, y in zip(
        a["img_emb_vit_b_32"].to_pylist(), b["img_emb_vit_b_32"].to_pylist(), strict=True
    ):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_allclose(x, y, atol=1e-5)
    # One decode stage served both model UDFs in the fused run.
    names = [s.name for s in resolve_stages(udfs, params=PARAMS)]
    assert names.count("clip-preprocess") == 1


def test_overwrite_img_emb_in_place_keeps_index_ready_type(tmp_path):
    table = sample_table(24, seed=5)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(24, 512)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 512)
    table = table.set_column(table.schema.get_field_index("img_emb"), "img_emb", emb)
    uri = str(tmp_path / "b32.lance")
    lance.write_dataset(table, uri, max_rows_per_file=12)
    params = {"clip-embed": {**MODEL, "column": "img_emb"}}
    backfill(uri, udfs=["clip-embed"], udf_params=params, overwrite=True)
    ds = lance.dataset(uri)
    assert ds.schema.field("img_emb").type == pa.list_(pa.float32(), 512)
    assert ds.schema.names == table.schema.names  # replaced in place, no new column
    new = _embedding_matrix(ds.to_table(columns=["img_emb"])["img_emb"])
    assert not np.allclose(new, vectors)
    np.testing.assert_allclose(np.linalg.norm(new, axis=1), 1.0, atol=1e-4)
