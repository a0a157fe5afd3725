"""clip-embed / moderation-clip maths, without Ray (``udf.instantiate()(table)``).

Weights cannot be downloaded here, so every model is a seeded random ViT-B-32;
parity is measured against open_clip's own ``preprocess`` on the same model.
"""

from __future__ import annotations

import io
import os
import time

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

from laion_ray import clip_model
from laion_ray.clip_model import load_clip
from laion_ray.errors import LaionRayError
from laion_ray.preprocess import ImageDecodeError, PixelSpec, preprocess_image
from laion_ray.udf import TASK_CPUS
from laion_ray.udfs import moderation_clip
from laion_ray.udfs.clip import make_clip_embed
from laion_ray.udfs.moderation_clip import make_moderation_clip

PARITY_MIN_COSINE = 0.995


# --- test images --------------------------------------------------------------


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour field, a few shapes, mild noise: photo-like, not white noise."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    image = image.resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(4, max(width, height) // 3 + 5))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.integers(0, 256, 3).tolist()))
    noisy = np.asarray(image).astype(np.int16) + rng.normal(0, 6, (height, width, 3)).astype(
        np.int16
    )
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _varied_images() -> dict[str, bytes]:
    sizes = [(64, 64), (64, 200), (100, 75), (224, 224), (223, 300), (384, 256), (512, 128)]
    sizes += [(512, 512), (480, 640), (500, 333), (1800, 1200)]
    images = {f"jpeg_{w}x{h}": _encode(_photo(w, h, i)) for i, (w, h) in enumerate(sizes)}
    images["gray_jpeg"] = _encode(_photo(300, 200, 20).convert("L"))
    images["cmyk_jpeg"] = _encode(_photo(320, 240, 21).convert("CMYK"))
    images["png"] = _encode(_photo(256, 300, 22), "PNG")
    images["rgba_png"] = _encode(_photo(200, 260, 23).convert("RGBA"), "PNG")
    images["gray_png"] = _encode(_photo(150, 90, 24).convert("L"), "PNG")
    return images


def _sample_images() -> dict[str, bytes]:
    """The project's sample images, with its unusual-but-valid kinds (PNG, gray, CMYK)."""
    from laion_ray.sample import sample_table

    table = sample_table(24, seed=3, bad_fraction=0.4)
    out = {}
    for key, data in zip(table["key"].to_pylist(), table["image"].to_pylist(), strict=True):
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
        except Exception:  # the corrupt kinds are tested below
            continue
        out[f"sample_{key}"] = data
    return out


def _bomb_jpeg() -> bytes:
    data = bytearray(_encode(Image.new("RGB", (8, 8), (128, 128, 128))))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (20000).to_bytes(2, "big") * 2  # claims 20000 x 20000
    return bytes(data)


# --- fixtures -----------------------------------------------------------------


@pytest.fixture(scope="module")
def stages():
    return make_clip_embed(random_weights=True, captions=True)


@pytest.fixture(scope="module")
def embedder(stages):
    return stages[1].instantiate()


def _pixels(stages, images: list[bytes]) -> pa.Table:
    return stages[0].instantiate()(pa.table({"image": pa.array(images, pa.binary())}))


def _as_matrix(column) -> np.ndarray:
    return np.stack(column.to_numpy(zero_copy_only=False)).astype(np.float32)


# --- clip-embed -----------------------------------------------------------------


def test_embed_schema_dtype_and_unit_norm(stages, embedder):
    pre, model = stages
    assert [s.name for s in stages] == ["clip-preprocess", "clip-embed"]
    assert pre.num_cpus == TASK_CPUS and model.num_cpus <= 1
    # GPUs and the pool are the planner's, from the cluster, not the driver's torch.
    assert model.num_gpus is None and model.concurrency is None
    images = list(_varied_images().values())[:6]
    pixels = _pixels(stages, images)
    assert pixels.schema.equals(pre.output_schema)
    captions = ["a dog", None, "a red car", "", "x" * 500, "a cat"]
    out = embedder(pixels.append_column("caption", pa.array(captions, pa.string())))
    assert out.schema.equals(model.output_schema)
    assert out.num_rows == 6
    assert out.schema.names == ["img_emb_vit_b_32", "caption_emb_vit_b_32"]
    assert out.schema.field(0).type == pa.list_(pa.float32(), 512)
    emb = _as_matrix(out["img_emb_vit_b_32"])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    caps = out["caption_emb_vit_b_32"]
    assert caps.null_count == 1 and caps[1].as_py() is None
    np.testing.assert_allclose(np.linalg.norm(_as_matrix(caps.drop_null()), axis=1), 1.0, atol=1e-5)


def column_name(stages) -> str:
    return stages[0].output_schema.names[0]


def test_null_pixels_give_null_embeddings(stages, embedder):
    pixels = _pixels(stages, [_varied_images()["png"]])[0].combine_chunks()
    column = pa.concat_arrays([pixels, pa.nulls(1, pixels.type), pixels])
    out = embedder(pa.table({column_name(stages): column, "caption": ["a", "b", None]}))
    emb = out["img_emb_vit_b_32"]
    assert emb.null_count == 1 and emb[1].as_py() is None
    assert emb[0].as_py() == emb[2].as_py()


def test_parity_with_open_clip_preprocess(stages, embedder):
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2

    images = {**_varied_images(), **_sample_images()}
    assert any(name.startswith("sample_") for name in images)
    pixels = _pixels(stages, list(images.values()))[column_name(stages)].combine_chunks()
    fast = embedder.embed_pixels(pixels.flatten().to_numpy().reshape(-1, 224, 224, 3))
    reference = image_transform_v2(PreprocessCfg(**embedder.info["preprocess_cfg"]), is_train=False)
    batch = torch.stack([reference(Image.open(io.BytesIO(data))) for data in images.values()])
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(embedder.net.encode_image(batch), dim=-1).numpy()
    cosines = (fast * ref).sum(axis=1)
    worst = int(np.argmin(cosines))
    print(f"parity: {len(images)} images, min cosine {cosines[worst]:.5f} ({list(images)[worst]})")
    assert cosines.min() >= PARITY_MIN_COSINE, dict(zip(images, cosines.round(5), strict=True))


@pytest.mark.parametrize(
    "name, data",
    [
        ("truncated", _encode(_photo(300, 200, 1))[:1500]),
        ("empty", b""),
        ("none", None),
        ("random_bytes", np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes()),
        ("jpeg_magic_then_junk", b"\xff\xd8" + bytes(range(256)) * 8),
        ("html", b"<!DOCTYPE html><html><body>404 Not Found</body></html>"),
        ("bomb_header", _bomb_jpeg()),
        ("truncated_png", _encode(_photo(200, 200, 2), "PNG")[:800]),
    ],
)
def test_corrupt_images_raise(stages, name, data):
    with pytest.raises(ImageDecodeError):
        preprocess_image(data, PixelSpec((224, 224)))
    # the stage raises too (the engine bisects to the row), never a silent null
    with pytest.raises(ImageDecodeError):
        _pixels(stages, [_encode(_photo(100, 100, 3)), data])


def test_sample_corrupt_kinds_raise():
    """Every corrupt kind the sample writer injects raises; the unusual kinds decode."""
    from laion_ray.sample import sample_table

    table = sample_table(32, seed=5, bad_fraction=0.5)
    corrupt = ("truncated", "empty", "no image", "not an image", "bomb")
    seen = set()
    for message, data in zip(
        table["error_message"].to_pylist(), table["image"].to_pylist(), strict=True
    ):
        kind = next((k for k in corrupt if message and k in message), None)
        if kind is None:
            assert preprocess_image(data, PixelSpec((224, 224))).shape == (224, 224, 3)
            continue
        seen.add(kind)
        with pytest.raises(ImageDecodeError):
            preprocess_image(data, PixelSpec((224, 224)))
    assert seen == set(corrupt)


def test_preprocess_stage_shared_by_models_of_same_size():
    a = make_clip_embed(random_weights=True)[0]
    b = make_clip_embed(model="ViT-B-16", random_weights=True, column="img_emb", batch_size=7)[0]
    c = make_clip_embed(model="ViT-L-14-336", random_weights=True)[0]
    assert a == b and a.key == b.key
    assert a != c and c.output_schema.names == ["_clip_pixels_336x336"]


def test_column_names_and_bad_params():
    stages = make_clip_embed(random_weights=True, column="img_emb")
    assert stages[1].output_schema.names == ["img_emb"]
    with pytest.raises(LaionRayError, match="no weights"):
        make_clip_embed()
    with pytest.raises(LaionRayError, match="unknown open_clip model"):
        make_clip_embed(model="ViT-Nope", random_weights=True)
    with pytest.raises(LaionRayError, match="unknown pretrained tag"):
        make_clip_embed(pretrained="no-such-tag")
    with pytest.raises(LaionRayError, match="not a file"):
        make_clip_embed(checkpoint="/nonexistent/model.safetensors")
    with pytest.raises(LaionRayError, match="batch_size"):
        make_clip_embed(random_weights=True, batch_size=0)


# --- loading ------------------------------------------------------------------------


def test_random_weights_refused_without_flag():
    with pytest.raises(LaionRayError, match="random-weights"):
        load_clip("ViT-B-32")


def test_unfetchable_tag_fails_fast_with_checkpoint_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(clip_model, "_hub_reachable", lambda: False)  # as on an offline node
    before = os.environ.get("HF_HUB_OFFLINE")
    start = time.perf_counter()
    with pytest.raises(LaionRayError) as err:
        load_clip("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 20
    message = str(err.value)
    assert "\n" not in message
    for part in ("ViT-B-32", "laion2b_s34b_b79k", "--checkpoint", "--random-weights"):
        assert part in message
    assert os.environ.get("HF_HUB_OFFLINE") == before


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_loads_and_matches(embedder, tmp_path, suffix):
    import torch

    path = str(tmp_path / f"open_clip_model{suffix}")
    state = {k: v.detach().clone().contiguous() for k, v in embedder.net.state_dict().items()}
    if suffix == ".pt":
        torch.save(state, path)
    else:
        safetensors = pytest.importorskip("safetensors.torch")
        safetensors.save_file(state, path)
    net, _, _, info = load_clip("ViT-B-32", checkpoint=path)
    assert info["checkpoint"] == path and not info["random"]
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        np.testing.assert_array_equal(
            net.encode_image(x).numpy(), embedder.net.encode_image(x).numpy()
        )
    with pytest.raises(LaionRayError, match="does not fit"):
        load_clip("ViT-B-16", checkpoint=path)


def test_local_dir_model_plans_without_torch_and_loads_its_own_weights(tmp_path):
    import dataclasses
    import json
    import subprocess
    import sys

    import open_clip
    import torch
    from open_clip.constants import OPENAI_DATASET_MEAN
    from open_clip.transform import PreprocessCfg
    from safetensors.torch import save_file

    from laion_ray.demo import DEMO_CLIP, DEMO_PREPROCESS, write_demo_model

    name = write_demo_model(str(tmp_path))  # a config, no weights
    assert name.startswith("local-dir:/")
    # The demo's copy of open_clip's default preprocessing is open_clip's own.
    assert json.loads(json.dumps(dataclasses.asdict(PreprocessCfg()))) == DEMO_PREPROCESS
    # Planning a stage (embedding width, pixel geometry) in a fresh driver
    # imports neither open_clip nor torch when the config is complete.
    probe = (
        "import sys; from laion_ray.clip_model import clip_spec; "
        f"dim, cfg = clip_spec({name!r}); "
        "print(dim, cfg['size'], 'open_clip' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["128", "128", "False", "False"]

    # A config without weights: random only when asked, the same for every actor.
    with pytest.raises(LaionRayError, match="local-dir"):
        load_clip(name)
    first, _, _, info = load_clip(name, allow_random=True, seed=3)
    again, _, _, _ = load_clip(name, allow_random=True, seed=3)
    assert info["random"]
    for key, value in first.state_dict().items():
        torch.testing.assert_close(value, again.state_dict()[key], rtol=0, atol=0)

    # With a weights file beside the config, those weights load, exactly.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        saved = open_clip.CLIP(**DEMO_CLIP).state_dict()
    save_file(saved, os.path.join(name[len("local-dir:") :], "open_clip_model.safetensors"))
    net, _, _, info = load_clip(name, allow_random=True)
    assert not info["random"]
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)

    # "Complete" is open_clip's own field list; a new field there makes this fail.
    assert {f.name for f in dataclasses.fields(PreprocessCfg)} == clip_model.PREPROCESS_KEYS
    # Without preprocess settings, open_clip's defaults fill them in.
    config = tmp_path / "tiny-clip-random" / "open_clip_config.json"
    config.write_text(json.dumps({"model_cfg": DEMO_CLIP}))
    dim, cfg = clip_model.clip_spec(name)
    assert dim == 128 and cfg["size"] == 128
    assert tuple(cfg["mean"]) == OPENAI_DATASET_MEAN
    (tmp_path / "empty").mkdir()
    with pytest.raises(LaionRayError, match="no open_clip_config.json"):
        clip_model.clip_spec(f"local-dir:{tmp_path / 'empty'}")


# --- moderation-clip ------------------------------------------------------------------


def test_moderation_labels_scores_and_nsfw_rule():
    prompts = {"safe": "a safe photo", "nsfw": ["an explicit nsfw photo", "porn"], "cat": "a cat"}
    [udf] = make_moderation_clip(
        random_weights=True, prompts=prompts, use_nsfw_flag=True, embedding_column="emb"
    )
    assert udf.inputs == ("emb", "NSFW")
    assert udf.output_schema.names == ["moderation_clip_label", "moderation_clip_score"]
    moderate = udf.instantiate()
    text = moderate.text_emb  # (3, 512), unit rows, one per label
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(3, 512)).astype(np.float32)
    # rows 0-2: a label's own prompt embedding (scaled: inputs need not be unit);
    # row 3: noise; row 4: null; row 5: the cat prompt but NSFW=1.
    emb = [text[0] * 3, text[1], text[2], noise[0], None, text[2]]
    nsfw = [0, 0, None, 0, 1, 1]
    table = pa.table(
        {"emb": pa.array(emb, pa.list_(pa.float32())), "NSFW": pa.array(nsfw, pa.int64())}
    )
    out = moderate(table)
    assert out.schema.equals(udf.output_schema)
    labels = out["moderation_clip_label"].to_pylist()
    scores = out["moderation_clip_score"].to_pylist()
    assert labels[:3] == ["safe", "nsfw", "cat"]
    np.testing.assert_allclose(scores[:3], 1.0, atol=1e-5)
    assert labels[3] in prompts and scores[3] == pytest.approx(
        float(max(text @ (noise[0] / np.linalg.norm(noise[0])))), abs=1e-5
    )
    assert labels[4] is None and scores[4] is None
    assert labels[5] == "nsfw"
    assert scores[5] == pytest.approx(float(text[1] @ text[2]), abs=1e-5)

    # LAION's string flag, and a dimension mismatch
    table = pa.table({"emb": pa.array([text[0]], pa.list_(pa.float32())), "NSFW": ["NSFW"]})
    assert moderate(table)["moderation_clip_label"].to_pylist() == ["nsfw"]
    with pytest.raises(LaionRayError, match="512"):
        moderate(pa.table({"emb": [[0.1] * 768], "NSFW": [0]}))


def test_moderation_defaults_and_validation():
    [udf] = make_moderation_clip(random_weights=True)
    assert udf.inputs == ("img_emb_vit_b_32",)
    assert udf.params["prompts"] == moderation_clip.DEFAULT_PROMPTS
    with pytest.raises(LaionRayError, match="nsfw_label"):
        make_moderation_clip(random_weights=True, prompts={"ok": "a photo"}, use_nsfw_flag=True)
    with pytest.raises(LaionRayError, match="prompt"):
        make_moderation_clip(random_weights=True, prompts={"ok": ""})
    with pytest.raises(LaionRayError, match="no weights"):
        make_moderation_clip()


# --- GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_half_precision_matches_cpu(stages, embedder):
    cuda = stages[1].with_options(params={"device": "cuda", "precision": "fp16"}).instantiate()
    assert cuda.info["device"] == "cuda" and cuda.info["precision"] == "fp16"
    pixels = _pixels(stages, list(_varied_images().values()))
    table = pixels.append_column("caption", pa.array(["a photo"] * pixels.num_rows))
    gpu = _as_matrix(cuda(table)["img_emb_vit_b_32"])
    cpu = _as_matrix(embedder(table)["img_emb_vit_b_32"])
    assert (gpu * cpu).sum(axis=1).min() >= 0.99
