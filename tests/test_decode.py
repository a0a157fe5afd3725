"""``clip-embed``'s ``decode=cpu|device|auto`` (issue 25): parity, bad rows, the plan, the report.

On a CPU device ``decode=device`` runs the same torch code as on a GPU (one
batched ``decode_jpeg`` call, resize, crop and normalise with torch), so its
parity with open_clip's own PIL transform and with ``decode=cpu`` is checked
here, on real photographs (:mod:`photos`). The nvJPEG checks are ``gpu``-marked;
``benchmarks/bench_gpu_e2e.py`` runs them on a GPU machine.
"""

from __future__ import annotations

import io
import itertools
import threading

import lance
import numpy as np
import pyarrow as pa
import pytest
from photos import crawl_encodings, encode, photo, truncated_jpeg
from PIL import Image

from laion_ray.cluster import (
    DECODE_CPUS_PER_GPU,
    DEVICE_DECODE_TASK_CPUS_PER_GPU,
    Capacity,
    Overrides,
    PlacementLog,
    describe_plan,
    format_stages,
    plan_stages,
)
from laion_ray.device_decode import DevicePreprocess, decoder_repeats_chroma, interpolate_chroma
from laion_ray.engine.stages import apply_stage
from laion_ray.errors import LaionRayError
from laion_ray.preprocess import (
    ROUTE_DEVICE,
    ROUTE_DEVICE_420,
    ROUTE_DEVICE_422,
    ROUTE_HOST,
    ImageDecodeError,
    decode_route,
    preprocess_image,
    preprocess_images,
)
from laion_ray.udfs.clip import (
    ROUTE_COLUMN,
    ClipEmbed,
    ClipEmbedDecoding,
    chunk_bounds,
    make_clip_embed,
)
from laion_ray.udfs.moderation_clip import make_moderation_clip

PARITY_MIN_COSINE = 0.995
B32 = {"model": "ViT-B-32", "random_weights": True}
CPU_ONLY = Capacity.of({"CPU": 8})
ONE_GPU = Capacity.of({"CPU": 16, "GPU": 1})

# What each crawl encoding is routed to: the device decoder takes baseline
# YCbCr/gray JPEGs; everything else is decoded on the host.
EXPECTED_ROUTES = {
    "jpeg_420": ROUTE_DEVICE_420,
    "jpeg_444": ROUTE_DEVICE,
    "jpeg_422": ROUTE_DEVICE_422,
    "exif_rotated": ROUTE_DEVICE_420,
    "gray_jpeg": ROUTE_DEVICE,
    "panorama": ROUTE_DEVICE_420,
    "progressive": ROUTE_HOST,
    "jpeg_440": ROUTE_HOST,  # an odd sampling
    "jpeg_411": ROUTE_HOST,
    "cmyk": ROUTE_HOST,
    "webp": ROUTE_HOST,
    "png_alpha": ROUTE_HOST,
    "gif": ROUTE_HOST,
    "gray_png": ROUTE_HOST,
}


def _expected_route(name: str) -> int:
    return next(route for kind, route in EXPECTED_ROUTES.items() if name.endswith(kind))


def _stages(capacity: Capacity, **params):
    return plan_stages(make_clip_embed(**params), capacity, Overrides())


def _matrix(column) -> np.ndarray:
    return np.stack(column.to_numpy(zero_copy_only=False)).astype(np.float32)


# --- routing -----------------------------------------------------------------------


def test_routes_send_what_the_device_decoder_takes_and_refuse_bad_headers():
    for name, data in crawl_encodings().items():
        assert decode_route(data) == _expected_route(name), name
    # A JPEG cut short has no end marker after its scan: the host decoder judges it.
    assert decode_route(truncated_jpeg()) == ROUTE_HOST
    bomb = bytearray(encode(Image.new("RGB", (8, 8))))
    sof = bomb.find(b"\xff\xc0")
    bomb[sof + 5 : sof + 9] = (20000).to_bytes(2, "big") * 2
    for bad in (None, b"", b"<!DOCTYPE html><html></html>", b"\xff\xd8junk", bytes(bomb)):
        with pytest.raises(ImageDecodeError):
            decode_route(bad)


def test_chunks_cover_the_call_with_a_small_first_one():
    assert chunk_bounds(1024, 256) == [(0, 32), (32, 288), (288, 544), (544, 800), (800, 1024)]
    assert chunk_bounds(5, 256) == [(0, 5)]
    assert chunk_bounds(0, 256) == []
    for rows, batch in [(1, 1), (7, 2), (300, 64), (1000, 3)]:
        bounds = chunk_bounds(rows, batch)
        assert bounds[0][0] == 0 and bounds[-1][1] == rows
        assert all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:], strict=False))
        assert all(0 < end - start <= batch for start, end in bounds)


# --- parity on real photographs --------------------------------------------------------


@pytest.fixture(scope="module")
def device_actor():
    """``clip-embed`` planned with ``decode=device`` on a CPU cluster: the actor that
    decodes on its own (CPU) device with the same torch code as on a GPU."""
    pre, embed = _stages(CPU_ONLY, **B32, decode="device").stages
    actor = embed.instantiate()
    assert isinstance(actor, ClipEmbedDecoding) and actor.decode_mode == "device"
    return pre, embed, actor


def test_device_decode_matches_open_clip_and_decode_cpu_on_real_photos(device_actor):
    import torch

    pre, embed, actor = device_actor
    images = crawl_encodings()
    names, data = list(images), list(images.values())
    routes = pre.instantiate()(pa.table({"image": pa.array(data, pa.binary())}))
    assert routes[ROUTE_COLUMN].to_pylist() == [_expected_route(n) for n in names]
    table = pa.table({"image": pa.array(data, pa.binary()), ROUTE_COLUMN: routes[ROUTE_COLUMN]})
    device = _matrix(actor(table)[embed.outputs[0]])
    assert actor.fallback_rows == sum(_expected_route(n) == ROUTE_HOST for n in names)

    # decode=cpu: the decode tasks' pixels through the same model
    cpu = actor.embed_pixels(preprocess_images(data, actor.preprocess.spec))
    # open_clip's own transform (PIL), the reference
    reference = actor.info["preprocess_cfg"]
    from open_clip.transform import PreprocessCfg, image_transform_v2

    transform = image_transform_v2(PreprocessCfg(**reference), is_train=False)
    batch = torch.stack([transform(Image.open(io.BytesIO(d))) for d in data])
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(actor.net.encode_image(batch), dim=-1).numpy()

    vs_open_clip = (device * ref).sum(axis=1)
    vs_cpu = (device * cpu).sum(axis=1)
    worst = int(np.argmin(vs_open_clip))
    print(
        f"decode=device on a CPU device, {len(names)} real photos: cosine with open_clip min "
        f"{vs_open_clip.min():.5f} ({names[worst]}), with decode=cpu min {vs_cpu.min():.5f}"
    )
    assert vs_open_clip.min() >= PARITY_MIN_COSINE, dict(
        zip(names, vs_open_clip.round(5), strict=True)
    )
    assert vs_cpu.min() >= PARITY_MIN_COSINE, dict(zip(names, vs_cpu.round(5), strict=True))


def test_interpolated_chroma_brings_replicated_chroma_back_to_libjpeg():
    """nvJPEG repeats 4:2:0 chroma samples; libjpeg-turbo's fast upsampling does
    the same, so it stands in for nvJPEG here. Re-interpolating brings the
    pixels (rounded to uint8, as a decoder's) closer to libjpeg's (PIL's) decode,
    and leaves luma alone. The nvJPEG figure itself is the gpu test's."""
    import simplejpeg
    import torch

    def luma(a):
        return a @ np.array([0.299, 0.587, 0.114], np.float32)

    cases = [(n, 0, (2, 2)) for n in ("astronaut.png", "chelsea.png", "coffee.png")]
    cases.append(("astronaut.png", 1, (1, 2)))  # 4:2:2: horizontal only
    for name, subsampling, factors in cases:
        data = encode(photo(name), quality=90, subsampling=2 if subsampling == 0 else 1)
        libjpeg = simplejpeg.decode_jpeg(data).astype(np.float32)
        replicated = simplejpeg.decode_jpeg(data, fastupsample=True).astype(np.float32)
        x = torch.from_numpy(replicated).permute(2, 0, 1)[None]
        fixed = interpolate_chroma(x, factors)[0].permute(1, 2, 0).numpy().round()
        before, after = np.abs(replicated - libjpeg), np.abs(fixed - libjpeg)
        off_before, off_after = (before > 2).mean(), (after > 2).mean()
        print(
            f"{name} {factors}: values more than 2 off libjpeg's {off_before:.2%} replicated, "
            f"{off_after:.2%} re-interpolated (99.9th percentile {np.percentile(before, 99.9):.0f}"
            f" -> {np.percentile(after, 99.9):.0f}; mean {before.mean():.3f} -> {after.mean():.3f})"
        )
        assert off_after < off_before / 10, name
        assert np.percentile(after, 99.9) <= np.percentile(before, 99.9) / 2, name
        assert np.abs(luma(fixed) - luma(replicated)).mean() < 0.5

    # Each CUDA actor asks its decoder once which kind it is; both kinds, here:
    def as_tensor(pixels):
        return torch.from_numpy(pixels).permute(2, 0, 1)

    assert decoder_repeats_chroma(lambda d: as_tensor(simplejpeg.decode_jpeg(d, fastupsample=True)))
    assert not decoder_repeats_chroma(lambda d: as_tensor(simplejpeg.decode_jpeg(d)))
    prep = DevicePreprocess({"size": 224, "mean": (0.5,) * 3, "std": (0.5,) * 3}, "cpu")
    assert prep.interpolate_chroma is False  # libjpeg-turbo on a CPU device interpolates already


def test_each_chunk_queues_the_model_before_the_next_decodes(device_actor, monkeypatch):
    """The device never waits for the host between chunks: chunk k's forward is
    queued before chunk k + 1 is decoded, and the embeddings come back (the one
    wait) after the last. On CUDA the queued forward runs while the host and
    nvJPEG decode the next chunk."""
    import laion_ray.udfs.clip as clip

    pre, embed, actor = device_actor
    events: list[str] = []
    preprocess, encode_image, unit = actor.preprocess, actor.net.encode_image, clip.unit_float32

    def decode(images, routes):
        events.append(f"decode {len(images)}")
        return preprocess(images, routes)

    def forward(pixels):
        events.append(f"model {len(pixels)}")
        return encode_image(pixels)

    monkeypatch.setattr(actor, "preprocess", decode)
    monkeypatch.setattr(actor, "model_batch", 2)
    monkeypatch.setattr(actor, "_memo", None)
    monkeypatch.setattr(actor.net, "encode_image", forward)
    monkeypatch.setattr(clip, "unit_float32", lambda x: events.append("wait") or unit(x))
    images = [encode(photo(n), quality=90) for n in ("astronaut.png", "coffee.png")] * 2
    images.append(encode(photo("chelsea.png"), "PNG"))  # a host row in the last chunk
    table = pa.table(
        {
            "image": pa.array(images, pa.binary()),
            ROUTE_COLUMN: pa.array([decode_route(d) for d in images], pa.int8()),
        }
    )
    out = actor(table)
    assert events == ["decode 1", "model 1", "decode 2", "model 2", "decode 2", "model 2", "wait"]
    assert out[embed.outputs[0]].null_count == 0


# --- bad rows -------------------------------------------------------------------------


def _mixed() -> dict[str, bytes]:
    astronaut = photo("astronaut.png")
    return {
        "jpeg": encode(astronaut, quality=90),
        "png": encode(photo("chelsea.png"), "PNG"),
        "webp": encode(photo("coffee.png"), "WEBP"),
        "cmyk": encode(astronaut.convert("CMYK"), quality=90),
        "progressive": encode(photo("rocket.jpg"), progressive=True),
        "truncated": truncated_jpeg(),
        "html": b"<!DOCTYPE html><html><body>404</body></html>",
    }


def test_mixed_batch_embeds_what_decodes_and_fails_only_the_bad_rows(device_actor):
    """The engine's own stage runner over the planned stages, as a worker runs them."""
    pre, embed, actor = device_actor
    images = _mixed()
    batch = pa.table({"image": pa.array(list(images.values()), pa.binary())})
    checked = apply_stage(pre.instantiate(), pre, batch, upstream=set(), keep=["image"])
    calls = []
    original = actor._embed_images
    actor._embed_images = lambda *a: calls.append(len(a[0])) or original(*a)
    try:
        out = apply_stage(
            actor,
            embed,
            checked,
            upstream={ROUTE_COLUMN},
            keep=["image", f"_error:{pre.name}"],
        )
    finally:
        del actor._embed_images  # the class's method again
    names = list(images)
    emb = out[embed.outputs[0]].to_pylist()
    decode_errors = out[f"_error:{pre.name}"].to_pylist()
    embed_errors = out[f"_error:{embed.name}"].to_pylist()
    for name, vector, header, body in zip(names, emb, decode_errors, embed_errors, strict=True):
        if name == "html":  # the header check refuses it: never reaches the model
            assert vector is None and "cannot decode image" in header and body is None
        elif name == "truncated":  # the host decoder refuses it, in the actor: a row error
            assert vector is None and header is None and "corrupt JPEG" in body, body
        else:
            assert vector is not None and header is None and body is None, name
            assert abs(np.linalg.norm(vector) - 1) < 1e-4
    # The engine bisected the failing call to its one bad row; the actor decoded
    # and embedded the rows once, not once per bisection step.
    assert calls == [len(names) - 1]


def test_host_rows_decode_in_threads_into_their_own_rows(monkeypatch):
    """The rows the device decoder does not take decode concurrently (simplejpeg,
    OpenCV and PIL release the GIL), each into its own row, errors kept by row."""
    import torch

    import laion_ray.device_decode as device_decode

    cfg = {"size": 64, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
    prep = DevicePreprocess(cfg, "cpu")
    images = _mixed()
    images.pop("html")  # refused by its header: never reaches the actor
    images["jpeg_444"] = encode(photo("coffee.png"), quality=90, subsampling=0)
    names, data = list(images), list(images.values())
    routes = np.array([decode_route(d) for d in data])
    assert sum(routes == ROUTE_HOST) >= 4 and sum(routes != ROUTE_HOST) >= 2
    # The first two host rows return only once both are being decoded at once.
    both = threading.Barrier(2, timeout=20)
    calls = itertools.count()

    def decode(image, spec):
        if next(calls) < 2:
            both.wait()
        return preprocess_image(image, spec)

    monkeypatch.setattr(device_decode, "preprocess_image", decode)
    prepared = prep(data, routes)

    assert list(prepared.errors) == [names.index("truncated")]
    assert "corrupt JPEG" in prepared.errors[names.index("truncated")]
    assert prepared.fallback == sum(routes == ROUTE_HOST)
    ok = [i for i in range(len(data)) if i not in prepared.errors]
    assert prepared.ok.tolist() == [i in ok for i in range(len(data))]
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1) * 255
    std = torch.tensor(cfg["std"]).view(3, 1, 1) * 255
    for pixels, i in zip(prepared.pixels, ok, strict=True):
        if routes[i] == ROUTE_HOST:  # exactly the host decoder's pixels, normalised
            host = torch.from_numpy(preprocess_image(data[i], prep.spec)).permute(2, 0, 1)
            assert torch.equal(pixels, (host.float() - mean) / std), names[i]
        else:
            assert pixels.shape == (3, 64, 64) and pixels.abs().max() < 10, names[i]


# --- the plan -----------------------------------------------------------------------------


def test_auto_plans_cpu_without_gpus_and_device_with_them():
    tiny = {"model": "ViT-S-32", "random_weights": True}
    cpu = _stages(CPU_ONLY, **tiny)  # decode=auto
    assert cpu.decode == {"clip-preprocess": "cpu", "clip-embed": "cpu"}
    assert cpu.stages[0].output_schema.names == ["_clip_pixels_224x224"]
    assert cpu.stages[1].compute is ClipEmbed

    gpu = _stages(ONE_GPU, **tiny)
    pre, embed = gpu.stages
    assert gpu.decode == {"clip-preprocess": "check", "clip-embed": "device"}
    # No decode tasks: the task stage only checks headers, no stage makes pixels.
    assert pre.output_schema.names == [ROUTE_COLUMN]
    assert not [c for s in gpu.stages for c in s.outputs if c.startswith("_clip_pixels")]
    assert embed.compute is ClipEmbedDecoding and embed.inputs == ("image", ROUTE_COLUMN)
    assert embed.num_gpus == 1.0 and embed.row_errors == (ImageDecodeError,)
    # ... and the keys stay the resolved ones: a column is the same producer's in
    # both shapes, so a rerun with another decode mode fills it incrementally.
    resolved = make_clip_embed(**tiny)
    assert [s.key for s in resolved] == [s.key for s in make_clip_embed(**tiny, decode="auto")]
    assert make_clip_embed(**tiny, decode="cpu")[1].key == resolved[1].key
    assert '"decode": "auto"' in resolved[0].key

    # The GPU gets its model stage's CPU plus reads and header checks, not
    # DECODE_CPUS_PER_GPU decode CPUs; --decode-cpus sizes decode=cpu only.
    assert gpu.decode_cpus == DEVICE_DECODE_TASK_CPUS_PER_GPU
    assert gpu.cpu_limit == DEVICE_DECODE_TASK_CPUS_PER_GPU + embed.num_cpus
    forced = plan_stages(make_clip_embed(**tiny), ONE_GPU, Overrides(decode_cpus=12))
    assert forced.decode_cpus == DEVICE_DECODE_TASK_CPUS_PER_GPU
    as_cpu = _stages(ONE_GPU, **tiny, decode="cpu")
    assert as_cpu.decode_cpus == DECODE_CPUS_PER_GPU and as_cpu.decode["clip-embed"] == "cpu"
    # decode=device is kept on a CPU cluster: the actor decodes on its CPU device.
    assert _stages(CPU_ONLY, **tiny, decode="device").decode["clip-embed"] == "device"
    # gpus=0 keeps the model on CPUs, and auto then keeps the decode tasks.
    no_gpu = plan_stages(make_clip_embed(**tiny), ONE_GPU, Overrides(gpus=0))
    assert no_gpu.decode["clip-embed"] == "cpu"
    with pytest.raises(LaionRayError, match="decode must be one of cpu, device, auto"):
        make_clip_embed(**tiny, decode="gpu")


def test_fused_clip_udfs_share_the_one_decode_in_both_shapes():
    tiny = {"model": "ViT-S-32", "random_weights": True}
    udfs = [*make_clip_embed(**tiny), *make_moderation_clip(**tiny)]
    for capacity, shape in ((CPU_ONLY, "cpu"), (ONE_GPU, "device")):
        plan = plan_stages(udfs, capacity, Overrides())
        readers = [s.name for s in plan.stages if "image" in s.inputs]
        assert readers == (
            ["clip-preprocess"] if shape == "cpu" else ["clip-preprocess", "clip-embed"]
        )
        assert plan.stages[2].inputs == ("img_emb_vit_s_32",)  # moderation reads the embedding
        assert plan.decode["clip-embed"] == shape


def test_auto_on_an_actor_without_cuda_decodes_with_the_cpu_decoder(device_actor):
    """The CI clusters give actors logical GPUs without CUDA: ``auto`` planned the
    device shape, and such an actor decodes every row with the decode=cpu decoder."""
    import torch

    pre, embed, device = device_actor
    auto = ClipEmbedDecoding.__new__(ClipEmbedDecoding)
    # The same loaded model, set up as ClipEmbedDecoding.__init__ does for decode=auto.
    auto.__dict__.update(device.__dict__)
    auto.decode_mode = "cpu"
    auto.preprocess = DevicePreprocess(
        device.info["preprocess_cfg"], torch.device("cpu"), device_decoder=False
    )
    auto.fallback_rows, auto._memo = 0, None
    images = [encode(photo(n), quality=90) for n in ("astronaut.png", "coffee.png")]
    table = pa.table(
        {
            "image": pa.array(images, pa.binary()),
            ROUTE_COLUMN: pa.array([decode_route(d) for d in images], pa.int8()),
        }
    )
    got = _matrix(auto(table)[embed.outputs[0]])
    expected = device.embed_pixels(preprocess_images(images, device.preprocess.spec))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert auto.fallback_rows == 0  # nothing fell back: the host decoder is the mode here
    # How a real actor decides (no CUDA here): device for decode=device, cpu for auto.
    params = {k: v for k, v in embed.params.items() if k != "decode"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("laion_ray.udfs.clip.ClipEmbed.__init__", lambda self, **kw: _fake(self))
        assert ClipEmbedDecoding(**params, decode="auto").decode_mode == "cpu"
        assert ClipEmbedDecoding(**params, decode="device").decode_mode == "device"


def _fake(actor) -> None:
    import torch

    actor.device = torch.device("cpu")
    actor.info = {"preprocess_cfg": {"size": 224, "mean": (0, 0, 0), "std": (1, 1, 1)}}


# --- the report -------------------------------------------------------------------------


def test_report_says_what_decoded_per_actor_with_the_fallback_rows():
    plan = _stages(ONE_GPU, model="ViT-S-32", random_weights=True)
    log = PlacementLog()  # the named actor's class, in this process
    cuda = {"node": "n1" * 28, "device": "cuda", "gpu_ids": ["0"], "cpu_fallback": False}
    cpu = {"node": "n1" * 28, "device": "cpu", "gpu_ids": ["1"], "cpu_fallback": True}
    log.actor_started("clip-embed", "a1", {**cuda, "decode": "device", "decode_in": "actor"})
    log.actor_started("clip-embed", "a2", {**cpu, "decode": "cpu", "decode_in": "actor"})
    log.actor_updated("clip-embed", "a1", {"decode_fallback_rows": 3})
    log.actor_updated("clip-embed", "a1", {"decode_fallback_rows": 5})  # counts are totals
    log.task_ran("clip-preprocess", "n1" * 28)

    seen = log.snapshot()
    stages = describe_plan(plan)
    assert stages[0]["decode"] == "check" and stages[1]["decode"] == "device"
    import laion_ray.cluster as cluster

    class Handle:
        class snapshot:  # noqa: N801 - mimics an actor method
            @staticmethod
            def remote():
                return seen

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("ray.get_actor", lambda *a, **k: Handle)
        patch.setattr("ray.get", lambda ref, timeout=None: ref)
        report = cluster.placement_report(plan, "placement-x")
    embed = report[1]
    assert embed["decode_ran"] == {"on its CPU (no CUDA device)": 1, "on its device (cuda)": 1}
    assert embed["decode_fallback_rows"] == 5
    lines = format_stages(report)
    assert "header checks only: the model stage decodes on its device" in lines[0]
    assert (
        "decoded on its CPU (no CUDA device) x1, on its device (cuda) x1, "
        "5 row(s) fell back to the host decoder" in lines[1]
    ), lines[1]
    cpu_plan = _stages(CPU_ONLY, model="ViT-S-32", random_weights=True)
    log = PlacementLog()
    log.actor_started("clip-embed", "a3", {**cpu, "decode": "cpu", "decode_in": "tasks"})
    seen = log.snapshot()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("ray.get_actor", lambda *a, **k: Handle)
        patch.setattr("ray.get", lambda ref, timeout=None: ref)
        lines = format_stages(cluster.placement_report(cpu_plan, "placement-y"))
    assert "decoded in the decode tasks x1" in lines[1]


# --- through the engine, on Ray -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> dict:
    from laion_ray.demo import write_demo_model

    return {
        "model": write_demo_model(str(tmp_path_factory.mktemp("model"))),
        "random_weights": True,
    }


def _mixed_dataset(uri: str) -> dict[int, str]:
    images = {**_mixed(), **crawl_encodings()}
    names = list(images)
    table = pa.table(
        {
            "key": pa.array(range(len(names)), pa.int64()),
            "image": pa.array(list(images.values()), pa.binary()),
        }
    )
    lance.write_dataset(table, uri, max_rows_per_file=8)
    return dict(enumerate(names))


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_backfill_decode_device_fused_with_moderation_equals_decode_cpu(tmp_path, tiny_model):
    from laion_ray.backfill import backfill
    from laion_ray.engine.error_log import list_errors
    from laion_ray.history import format_history, job_history

    results = {}
    for decode in ("device", "cpu"):
        uri = str(tmp_path / f"{decode}.lance")
        names = _mixed_dataset(uri)
        params = {"clip-embed": {**tiny_model, "decode": decode}, "moderation-clip": tiny_model}
        report = backfill(
            uri,
            udfs=["clip-embed", "moderation-clip"],
            udf_params=params,
            max_error_fraction=0.5,
        )
        results[decode] = (uri, report)
    names_by_key = names
    column = "img_emb_tiny_clip_random"
    tables = {
        d: lance.dataset(u)
        .to_table(columns=["key", column, "moderation_clip_label"])
        .sort_by("key")
        for d, (u, _) in results.items()
    }
    for decode, (uri, report) in results.items():
        # Only the two corrupt rows fail; the job goes on.
        assert report.rows_failed == 2 and report.rows_processed == len(names_by_key), decode
        errors = list_errors(uri)
        bad = {names_by_key[k] for k in errors["key"].to_pylist()}
        assert bad == {"truncated", "html"}, decode
    device_rows = tables["device"][column].to_pylist()
    cpu_rows = tables["cpu"][column].to_pylist()
    for key, (a, b) in enumerate(zip(device_rows, cpu_rows, strict=True)):
        assert (a is None) == (b is None) == (names_by_key[key] in ("truncated", "html"))
        if a is not None:
            assert float(np.dot(a, b)) >= PARITY_MIN_COSINE, names_by_key[key]
    labels = tables["device"]["moderation_clip_label"]
    assert labels.null_count == 2  # moderation read clip-embed's embeddings: one decode

    uri, report = results["device"]
    stages = {s["stage"]: s for s in report.stages}
    assert stages["clip-preprocess"]["decode"] == "check"
    embed = stages["clip-embed"]
    assert embed["decode"] == "device"
    assert embed["decode_ran"] == {"on its device (cpu)": embed["actors_started"]}
    host_rows = sum(_expected_route(n) == ROUTE_HOST for n in crawl_encodings())
    host_rows += 5  # _mixed(): png, webp, cmyk, progressive, truncated
    assert embed["decode_fallback_rows"] == host_rows
    summary = report.summary()
    assert f"{host_rows} row(s) fell back to the host decoder" in summary, summary
    history = format_history(job_history(uri))
    assert "decoded on its device (cpu)" in history, history
    cpu_stages = {s["stage"]: s for s in results["cpu"][1].stages}
    assert cpu_stages["clip-embed"]["decode_ran"] == {
        "in the decode tasks": cpu_stages["clip-embed"]["actors_started"]
    }


# --- on a GPU ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_actor(device_actor):
    import torch

    pre, embed, cpu_actor = device_actor
    actor = embed.with_options(params={"device": "cuda", "precision": "fp32"}).instantiate()
    assert actor.device.type == "cuda" and actor.decode_mode == "device"
    # The same weights as the CPU actor (same seed), on the GPU.
    assert torch.equal(next(actor.net.parameters()).cpu(), next(cpu_actor.net.parameters()).cpu())
    return actor


@pytest.mark.gpu
@pytest.mark.parametrize("interpolate", [False, True])
def test_nvjpeg_decode_matches_open_clip_on_real_photos(device_actor, cuda_actor, interpolate):
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2

    pre, embed, cpu_actor = device_actor
    images = {n: d for n, d in crawl_encodings().items() if _expected_route(n) != ROUTE_HOST}
    data = list(images.values())
    routes = np.array([decode_route(d) for d in data])
    prep = DevicePreprocess(
        cuda_actor.info["preprocess_cfg"], cuda_actor.device, interpolate_chroma=interpolate
    )
    prepared = prep(data, routes)
    assert prepared.ok.all() and prepared.fallback == 0
    with torch.inference_mode():
        gpu = torch.nn.functional.normalize(cuda_actor.net.encode_image(prepared.pixels), dim=-1)
    transform = image_transform_v2(
        PreprocessCfg(**cuda_actor.info["preprocess_cfg"]), is_train=False
    )
    batch = torch.stack([transform(Image.open(io.BytesIO(d))) for d in data])
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(cpu_actor.net.encode_image(batch), dim=-1)
    cosine = (gpu.cpu() * ref).sum(dim=1).numpy()
    print(
        f"nvJPEG (chroma {'re-interpolated' if interpolate else 'as decoded'}) vs open_clip: "
        f"min cosine {cosine.min():.5f} over {len(data)} real photos"
    )
    assert cosine.min() >= PARITY_MIN_COSINE, dict(zip(images, cosine.round(5), strict=True))


@pytest.mark.gpu
def test_cuda_actor_pipeline_matches_the_cpu_device_actor(device_actor, cuda_actor):
    pre, embed, cpu_actor = device_actor
    images = {**_mixed(), **crawl_encodings()}
    images.pop("truncated"), images.pop("html")
    data = list(images.values())
    table = pa.table(
        {
            "image": pa.array(data, pa.binary()),
            ROUTE_COLUMN: pa.array([decode_route(d) for d in data], pa.int8()),
        }
    )
    cuda_actor.model_batch = 4  # several chunks: decode of one overlapping the model on another
    gpu = _matrix(cuda_actor(table)[embed.outputs[0]])
    cpu = _matrix(cpu_actor(table)[embed.outputs[0]])
    assert (gpu * cpu).sum(axis=1).min() >= PARITY_MIN_COSINE


@pytest.mark.gpu
def test_a_chunk_never_makes_the_host_wait_for_the_device(cuda_actor, monkeypatch):
    """Every host-to-device copy of a chunk (host rows' pixels, row indices, the
    colour matrices) is queued behind the model's work, never waited for: torch's
    sync debug mode raises on any operation that synchronises with the device."""
    import torch

    prep = DevicePreprocess(
        cuda_actor.info["preprocess_cfg"], cuda_actor.device, interpolate_chroma=True
    )
    images = {**_mixed(), **crawl_encodings()}
    images.pop("html")
    data = list(images.values())
    routes = np.array([decode_route(d) for d in data])
    prep(data, routes)  # warm: the colour matrices, the host threads, pinned memory
    # nvJPEG is torchvision's to schedule: its decode is taken out of the check.
    rows = [i for i in range(len(data)) if routes[i] != ROUTE_HOST]
    decoded = dict(zip(rows, prep._decode(data, rows), strict=True))
    monkeypatch.setattr(prep, "_decode", lambda _images, rows: [decoded[i] for i in rows])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        prepared = prep(data, routes)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(prepared.errors) == 1 and prepared.fallback == sum(routes == ROUTE_HOST)
