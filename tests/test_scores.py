"""clip-score and embedding-head: maths in-process, then through the engine.

Models are seeded random (nothing can be downloaded here): a ViT-S-32 for
clip-score, LAION-shaped MLPs built in the test for the heads. The references
are plain open_clip and plain torch in this process.
"""

from __future__ import annotations

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from laion_ray.backfill import backfill, resolve_stages
from laion_ray.engine.commit import UDF_METADATA
from laion_ray.errors import LaionRayError
from laion_ray.sample import write_sample
from laion_ray.udf import resolve

MODEL = {"model": "ViT-S-32", "random_weights": True}
EMBED_COLUMN = "img_emb_vit_s_32"


# --- heads built the way LAION wrote them -----------------------------------------


def aesthetic_module(seed: int = 0) -> torch.nn.Module:
    """LAION improved-aesthetic-predictor's layout: Linear layers, dropout, no activation."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(768, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    ).eval()


class Standardize(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.randn(width) * 0.01)
        self.register_buffer("variance", torch.rand(width) * 0.01 + 0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.variance.sqrt()


class NsfwModule(torch.nn.Module):
    """The NSFW detector's PyTorch layout: standardisation, Linear+ReLU, sigmoid."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.norm = Standardize(768)
        self.linear_1 = torch.nn.Linear(768, 64)
        self.linear_2 = torch.nn.Linear(64, 512)
        self.linear_3 = torch.nn.Linear(512, 256)
        self.linear_4 = torch.nn.Linear(256, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        for layer in (self.linear_1, self.linear_2, self.linear_3):
            x = torch.relu(layer(x))
        return torch.sigmoid(self.linear_4(x))


def save(module: torch.nn.Module, path) -> str:
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(module.state_dict(), path)
    else:
        torch.save(module.state_dict(), path)
    return path


def reference(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        unit = torch.nn.functional.normalize(torch.from_numpy(x), dim=-1)
        return module(unit)[:, 0].numpy()


def embeddings(n: int, width: int = 768, seed: int = 0, nulls: tuple[int, ...] = ()) -> pa.Array:
    x = np.random.default_rng(seed).normal(size=(n, width)).astype(np.float32)
    mask = np.zeros(n, bool)
    mask[list(nulls)] = True
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), width, mask=pa.array(mask))


def as_matrix(array: pa.Array) -> np.ndarray:
    return np.stack([np.asarray(v, np.float32) for v in array.to_pylist() if v is not None])


# --- embedding-head in-process ------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("preset,module", [("aesthetic", aesthetic_module), ("nsfw", NsfwModule)])
def test_head_equals_the_torch_module_in_process(tmp_path, preset, module, suffix):
    net = module()
    path = save(net, tmp_path / f"head{suffix}")
    (stage,) = resolve("embedding-head", preset=preset, weights=path)
    column = {"aesthetic": "aesthetic_score", "nsfw": "nsfw_score"}[preset]
    assert stage.outputs == [column] and stage.inputs == ("img_emb",)
    assert stage.output_schema.field(column).type == pa.float32()
    emb = embeddings(500, nulls=(3, 77))
    out = stage.instantiate()(pa.table({"img_emb": emb}))[column]
    assert out.null_count == 2 and out[3].as_py() is None
    expected = reference(net, as_matrix(emb))
    got = out.drop_null().to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert np.std(got) > 0  # a real function of the input, not a constant
    if preset == "nsfw":
        assert got.min() >= 0 and got.max() <= 1


@pytest.mark.gpu
@pytest.mark.parametrize("preset,module", [("aesthetic", aesthetic_module), ("nsfw", NsfwModule)])
def test_head_on_cuda_equals_the_torch_module(tmp_path, preset, module):
    net = module()
    path = save(net, tmp_path / "head.pth")
    (stage,) = resolve("embedding-head", preset=preset, weights=path, device="cuda")
    assert stage.num_gpus == 1
    emb = embeddings(1000)
    got = stage.instantiate()(pa.table({"img_emb": emb})).column(0).to_numpy()
    np.testing.assert_allclose(got, reference(net, as_matrix(emb)), rtol=1e-3, atol=1e-5)


def test_layer_order_follows_names_not_text_order(tmp_path):
    """safetensors sorts keys as text: layers.10 must still come after layers.2."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(11)], torch.nn.Linear(32, 1))
    path = save(net, tmp_path / "deep.safetensors")
    (stage,) = resolve("embedding-head", weights=path, column="score", embedding_column="e")
    emb = embeddings(64, width=32)
    got = stage.instantiate()(pa.table({"e": emb}))["score"].to_numpy()
    np.testing.assert_allclose(got, reference(net, as_matrix(emb)), rtol=1e-4, atol=1e-6)


def test_head_refuses_a_wrong_width_random_weights_without_the_flag_and_bad_files(tmp_path):
    path = save(aesthetic_module(), tmp_path / "aesthetic.pth")
    (stage,) = resolve("embedding-head", preset="aesthetic", weights=path)
    narrow = pa.table({"img_emb": embeddings(4, width=512)})
    with pytest.raises(LaionRayError, match="'img_emb' holds 512-d embeddings but the head takes"):
        stage.instantiate()(narrow)
    with pytest.raises(LaionRayError, match="needs weights=.*random_weights=True"):
        resolve("embedding-head", preset="aesthetic")
    with pytest.raises(LaionRayError, match="unknown embedding-head preset 'pretty'"):
        resolve("embedding-head", preset="pretty", random_weights=True)
    torch.save(aesthetic_module(), tmp_path / "module.pt")  # the module, not its state_dict
    with pytest.raises(LaionRayError, match="save the module's state_dict"):
        resolve("embedding-head", preset="aesthetic", weights=str(tmp_path / "module.pt"))
    torch.save({"a.weight": torch.zeros(8, 4), "b.weight": torch.zeros(1, 9)}, tmp_path / "x.pt")
    with pytest.raises(LaionRayError, match="do not chain"):
        resolve("embedding-head", preset="aesthetic", weights=str(tmp_path / "x.pt"))
    torch.save({"conv.weight": torch.zeros(8, 4, 3, 3)}, tmp_path / "conv.pt")
    with pytest.raises(LaionRayError, match="unsupported tensor 'conv.weight'"):
        resolve("embedding-head", preset="aesthetic", weights=str(tmp_path / "conv.pt"))
    torch.save({"a.weight": torch.zeros(2, 768)}, tmp_path / "two.pt")
    with pytest.raises(LaionRayError, match="outputs 2 values, not 1"):
        resolve("embedding-head", preset="aesthetic", weights=str(tmp_path / "two.pt"))
    with pytest.raises(LaionRayError, match="must be a .pt/.pth/.safetensors"):
        resolve("embedding-head", preset="aesthetic", weights=__file__)
    with pytest.raises(LaionRayError, match="is not a file"):
        resolve("embedding-head", preset="aesthetic", weights=str(tmp_path / "missing.pth"))


def test_random_head_is_seeded_and_says_so(caplog):
    (a,) = resolve("embedding-head", preset="nsfw", random_weights=True)
    (b,) = resolve("embedding-head", preset="nsfw", random_weights=True, seed=1)
    assert "RANDOM" in caplog.text
    table = pa.table({"img_emb": embeddings(16)})
    x, y = (s.instantiate()(table)["nsfw_score"].to_numpy() for s in (a, b))
    assert a.key != b.key and not np.allclose(x, y)
    np.testing.assert_array_equal(x, a.instantiate()(table)["nsfw_score"].to_numpy())
    # Said once per planned column, not again by every process that loads it.
    assert sum("RANDOM" in r.getMessage() for r in caplog.records if r.levelno >= 30) == 2


# --- clip-score in-process -----------------------------------------------------------


@pytest.fixture(scope="module")
def reference_clip():
    """ViT-S-32 built by plain open_clip with the seed clip-embed's random weights use."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = open_clip.create_model("ViT-S-32").eval()
    return net, open_clip.get_tokenizer("ViT-S-32")


def reference_scores(reference_clip, images: np.ndarray, captions: list[str]) -> np.ndarray:
    """Cosine of open_clip's image and text features, one process, float64."""
    net, tokenizer = reference_clip
    with torch.no_grad():
        img = torch.from_numpy(images).double()
        txt = net.encode_text(tokenizer(captions)).double()
    img = torch.nn.functional.normalize(img, dim=-1)
    txt = torch.nn.functional.normalize(txt, dim=-1)
    return (img * txt).sum(-1).numpy()


def test_clip_score_null_or_blank_caption_gives_null(reference_clip):
    (stage,) = resolve("clip-score", **MODEL, column="clip_score")
    assert stage.inputs == (EMBED_COLUMN, "caption")
    assert stage.output_schema.field("clip_score").type == pa.float64()
    emb = embeddings(5, width=384, nulls=(4,))
    captions = ["a red car", None, "", "   ", "a dog"]
    out = stage.instantiate()(pa.table({EMBED_COLUMN: emb, "caption": captions}))["clip_score"]
    assert [v is None for v in out.to_pylist()] == [False, True, True, True, True]
    images = as_matrix(emb)[[0]]
    expected = reference_scores(reference_clip, images, ["a red car"])
    assert abs(out[0].as_py() - expected[0]) < 1e-5


def _with_metadata(table: pa.Table, column: str, key: str | None) -> pa.Table:
    field = table.schema.field(column)
    field = field.with_metadata({UDF_METADATA: key.encode()}) if key else field.remove_metadata()
    return table.set_column(table.schema.get_field_index(column), field, table[column])


def test_clip_score_refuses_embeddings_of_another_model(tmp_path):
    """Checked when the job is planned: nothing runs, no Ray is needed."""
    emb = embeddings(4, width=384)
    base = pa.table(
        {"key": pa.array(range(4), pa.int64()), "image": [b"jpeg"] * 4, "caption": ["x"] * 4}
    )
    other_seed = resolve_stages(["clip-embed"], params={"clip-embed": {**MODEL, "seed": 1}})[1]
    cases = {
        "no laion-ray producer metadata": None,
        "was made by clip-embed with .*seed=1, not by clip-embed with .*seed=0": other_seed.key,
    }
    for i, (message, key) in enumerate(cases.items()):
        uri = str(tmp_path / f"t{i}.lance")
        lance.write_dataset(
            _with_metadata(base.append_column(EMBED_COLUMN, emb), EMBED_COLUMN, key), uri
        )
        with pytest.raises(LaionRayError, match=message):
            backfill(uri, udfs=["clip-score"], udf_params={"clip-score": MODEL})
    # In one pass too: the column another model's clip-embed makes in the run.
    with pytest.raises(LaionRayError, match="was made by clip-embed with .*seed=0, not by"):
        backfill(
            uri,
            udfs=["clip-embed", "clip-score"],
            udf_params={"clip-embed": MODEL, "clip-score": {**MODEL, "seed": 1}},
            overwrite=True,
        )
    uri = str(tmp_path / "card.lance")  # the card's own 768-d img_emb
    lance.write_dataset(base.append_column("img_emb", embeddings(4)), uri)
    with pytest.raises(LaionRayError, match="'img_emb' holds 768-d embeddings but ViT-S-32"):
        backfill(
            uri,
            udfs=["clip-score"],
            udf_params={"clip-score": {**MODEL, "embedding_column": "img_emb"}},
        )
    with pytest.raises(LaionRayError, match="overwrite its own input"):
        resolve("clip-score", **MODEL, column="caption")
    with pytest.raises(LaionRayError, match="no weights for model"):
        resolve("clip-score", model="ViT-S-32")


def test_head_wrong_width_is_refused_before_any_work(tmp_path):
    uri = str(tmp_path / "narrow.lance")
    lance.write_dataset(pa.table({"img_emb": embeddings(8, width=512)}), uri)
    with pytest.raises(
        LaionRayError, match="'img_emb' holds 512-d embeddings but the head takes 768-d"
    ):
        backfill(
            uri,
            udfs=["embedding-head"],
            udf_params={"embedding-head": {"preset": "aesthetic", "random_weights": True}},
        )


# --- through the engine (real Lance, real Ray) ----------------------------------------


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """A sample with a few bad images and some null or blank captions."""
    uri = str(tmp_path_factory.mktemp("score") / "sample.lance")
    write_sample(uri, rows=30, fragments=2, seed=5, bad_fraction=0.1)
    table = lance.dataset(uri).to_table()
    captions = table["caption"].to_pylist()
    for i, value in ((1, None), (7, ""), (18, "  ")):
        captions[i] = value
    table = table.set_column(
        table.schema.get_field_index("caption"), "caption", pa.array(captions, pa.string())
    )
    lance.write_dataset(table, uri, mode="overwrite", max_rows_per_file=15)
    return uri


def _expected_scores(reference_clip, uri: str) -> dict[int, float | None]:
    """open_clip on laion-ray's decoded pixels (decode parity is test_clip's), one process."""
    from laion_ray.clip_model import clip_spec
    from laion_ray.preprocess import ImageDecodeError, PixelSpec, preprocess_image

    net, _ = reference_clip
    _, cfg = clip_spec("ViT-S-32")
    spec = PixelSpec.from_preprocess_cfg(cfg)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    table = lance.dataset(uri).to_table(columns=["key", "image", "caption"])
    expected: dict[int, float | None] = {}
    for key, image, caption in zip(
        *(table[c].to_pylist() for c in table.column_names), strict=True
    ):
        try:
            pixels = preprocess_image(image, spec)
        except ImageDecodeError:
            pixels = None
        if pixels is None or not (caption and caption.strip()):
            expected[key] = None
            continue
        x = torch.from_numpy(pixels[None].copy()).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            img = net.encode_image((x - mean) / std).numpy()
        expected[key] = float(reference_scores(reference_clip, img, [caption])[0])
    return expected


def _scores(uri: str, column: str) -> dict[int, float | None]:
    table = lance.dataset(uri).to_table(columns=["key", column])
    return dict(zip(table["key"].to_pylist(), table[column].to_pylist(), strict=True))


def _assert_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    assert {k for k, v in got.items() if v is None} == {k for k, v in expected.items() if v is None}
    diffs = [abs(got[k] - v) for k, v in expected.items() if v is not None]
    assert len(diffs) >= 20 and max(diffs) < 1e-5, max(diffs)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_clip_score_fused_and_reused_equal_open_clip(captioned, reference_clip, tmp_path):
    uri = str(tmp_path / "a.lance")
    lance.write_dataset(lance.dataset(captioned).to_table(), uri, max_rows_per_file=15)
    expected = _expected_scores(reference_clip, uri)

    # Fused: one decode and one image embedding per row, one caption embedding;
    # a stage in between reads the same embeddings (as the demo runs them).
    params = {
        "clip-embed": MODEL,
        "moderation-clip": MODEL,
        "clip-score": {**MODEL, "column": "clip_score"},
    }
    fused = ["clip-embed", "moderation-clip", "clip-score"]
    stages = resolve_stages(fused, params=params)
    assert [s.name for s in stages] == ["clip-preprocess", *fused]
    backfill(uri, udfs=fused, udf_params=params, max_error_fraction=0.5)
    assert lance.dataset(uri).schema.field("clip_score").type == pa.float64()
    _assert_close(_scores(uri, "clip_score"), expected)

    # Alone: reuses the stored embeddings (same model) and writes `similarity`.
    with pytest.raises(LaionRayError, match="'similarity' already exists.*--overwrite"):
        backfill(uri, udfs=["clip-score"], udf_params={"clip-score": MODEL})
    before = lance.dataset(uri).to_table(columns=[EMBED_COLUMN])
    report = backfill(uri, udfs=["clip-score"], udf_params={"clip-score": MODEL}, overwrite=True)
    assert report.rows_failed == 0
    ds = lance.dataset(uri)
    assert ds.schema.field("similarity").type == pa.float64()
    assert ds.to_table(columns=[EMBED_COLUMN]).equals(before)  # no image re-embedded
    _assert_close(_scores(uri, "similarity"), expected)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("executor", ["ray", "local"])
def test_heads_through_the_engine_equal_the_torch_modules(captioned, tmp_path, executor):
    uri = str(tmp_path / "h.lance")
    lance.write_dataset(lance.dataset(captioned).to_table(), uri, max_rows_per_file=15)
    aesthetic, nsfw = aesthetic_module(), NsfwModule()
    udfs = [
        *resolve("embedding-head", preset="aesthetic", weights=save(aesthetic, tmp_path / "a.pth")),
        *resolve("embedding-head", preset="nsfw", weights=save(nsfw, tmp_path / "n.safetensors")),
    ]
    backfill(uri, udfs=udfs, executor=executor)
    table = lance.dataset(uri).to_table(columns=["img_emb", "aesthetic_score", "nsfw_score"])
    x = as_matrix(table["img_emb"])
    assert table["img_emb"].null_count == 0
    for column, module in (("aesthetic_score", aesthetic), ("nsfw_score", nsfw)):
        assert table.schema.field(column).type == pa.float32()
        np.testing.assert_allclose(
            table[column].to_numpy(), reference(module, x), rtol=1e-4, atol=1e-6
        )

    # moderation-rules flags by the score too, next to the NSFW flag.
    threshold = float(np.median(table["nsfw_score"].to_numpy()))
    backfill(
        uri,
        udfs=["moderation-rules"],
        udf_params={"moderation-rules": {"nsfw_score_threshold": threshold}},
        executor=executor,
    )
    rows = lance.dataset(uri).to_table(columns=["NSFW", "nsfw_score", "moderation_label"])
    flagged = pc.or_(pc.greater(rows["NSFW"], 0.5), pc.greater(rows["nsfw_score"], threshold))
    assert rows["moderation_label"].to_pylist() == [
        "review" if f else "ok" for f in flagged.to_pylist()
    ]
