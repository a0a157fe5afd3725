"""The whole re-embed pipeline on one GPU machine, against the bare model (issue 25).

One script, CPU work first, for a GPU machine lent for a few minutes:

1. CPU: a LAION-shaped Lance table (``key``, ``caption``, ``image``, ``width``,
   ``height``) of JPEGs of about LAION's mean size (543 px, sizes and aspect
   ratios varied), cut from the real photographs scikit-image ships, with a
   small share of PNG and progressive JPEG (``--odd-share``) for the host
   fallback; and the crawl-encoded photos of ``tests/photos.py`` with open_clip's
   own (PIL) transform of each, for parity.
2. GPU, parity: nvJPEG's decode (``DevicePreprocess`` on CUDA) against open_clip's
   transform, per image, with the chroma as nvJPEG decodes it and re-interpolated
   (``interpolate_chroma``); and the 4:2:0 pixels against libjpeg's, both ways.
3. GPU, the ``gpu``-marked tests (``pytest -m gpu``).
4. GPU, per model (ViT-B-32, ViT-L-14; random weights, fp16): the bare model loop
   on pre-made pixels (``ClipEmbed.embed_pixels``, the model actor's own path:
   host uint8 to the device, normalise, forward, unit float32 back), then
   ``backfill --udf clip-embed`` on a local Ray with the machine's CPUs and its
   GPU, with ``decode=device`` and with ``decode=cpu`` on all CPUs. Each mode
   runs a short job and a long one (``--work-seconds`` of the bare model's
   rate, at least ``--min-rows``, at most the table): the rows between them
   over the time between them is the steady rate, without the fixed start-up
   (Ray Data, the actor's model load) and the commit, and the CPU-seconds
   between them over that time are the cores the pipeline keeps busy. The rate
   over the actor's calls (Ray's timeline: first call's start to last call's
   end) is printed beside it.

Lines: ``parity ...``, ``end-to-end / bare model img/s = R (MODEL, decode=MODE,
E vs B img/s, C CPU cores busy)`` with the issue's targets (decode=device:
>= 0.85 at B/32 and >= 0.95 at L/14 with at most 4 cores busy), and
``decode=device vs decode=cpu`` cosine over the generated rows.

On a GPU machine without network (torch, torchvision, pyarrow, OpenCV there;
pylance, Ray and open_clip from ``../shared/tools/device_kit.sh``'s folders),
from the project root, after that script's lines A and B:

    PYTHONUNBUFFERED=1 python3 benchmarks/bench_gpu_e2e.py

Without CUDA it does the CPU work and says what it skipped; ``--cpu-dry-run``
runs every step on the CPU with a tiny model instead (no figure of it is a
measurement; it checks the script):

    python benchmarks/bench_gpu_e2e.py --rows 64
    python benchmarks/bench_gpu_e2e.py --rows 96 --cpu-dry-run --models tiny
"""

from __future__ import annotations

import argparse
import io
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

import numpy as np  # noqa: E402

TARGETS = {"ViT-B-32": 0.85, "ViT-L-14": 0.95}  # decode=device, end-to-end / bare
MAX_CORES = 4.0
LAION_SIDE = 543  # px, LAION's mean image size
GPU_TESTS = ["tests/test_decode.py", "tests/test_clip.py", "tests/test_scores.py"]


# --- 1. the table (CPU) --------------------------------------------------------------

_PHOTOS: list = []


def _photos():
    """The bundled photographs, loaded once per worker process."""
    if not _PHOTOS:
        from photos import PHOTOS, photo

        _PHOTOS.extend(photo(n).convert("RGB") for n in (*PHOTOS, "hubble_deep_field.jpg"))
    return _PHOTOS


def _make_image(key: int, odd_share: float) -> tuple[bytes, int, int]:
    """One LAION-sized image: a random crop of a real photo, resized, re-encoded."""
    from PIL import Image

    rng = np.random.default_rng(key)
    source = _photos()[key % len(_photos())]
    side = LAION_SIDE * math.exp(rng.normal(0.0, 0.15))
    aspect = float(rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3]))
    width, height = max(32, round(side * aspect**0.5)), max(32, round(side / aspect**0.5))
    sw, sh = source.size
    crop = rng.uniform(0.55, 1.0)
    cw, ch = int(sw * crop), int(sh * crop)
    x, y = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
    image = source.crop((x, y, x + cw, y + ch)).resize((width, height), Image.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    odd = rng.random()
    if odd < odd_share / 2:
        image.save(buf, "PNG")
    elif odd < odd_share:
        image.save(buf, "JPEG", quality=85, progressive=True)
    else:
        image.save(buf, "JPEG", quality=int(rng.integers(75, 96)))
    return buf.getvalue(), width, height


def _make_chunk(args: tuple[int, int, float]) -> list[tuple[bytes, int, int]]:
    start, stop, odd_share = args
    return [_make_image(k, odd_share) for k in range(start, stop)]


def write_table(uri: str, rows: int, odd_share: float) -> dict[str, float]:
    """The LAION-shaped table; returns its mean image size and bytes."""
    step = 256
    chunks = [(a, min(a + step, rows), odd_share) for a in range(0, rows, step)]
    images: list[tuple[bytes, int, int]] = []
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for part in pool.map(_make_chunk, chunks):
            images.extend(part)
    import lance  # after the fork: Lance's runtime is not fork-safe
    import pyarrow as pa

    table = pa.table(
        {
            "key": pa.array(range(rows), pa.int64()),
            "caption": pa.array([f"a photograph, number {k}" for k in range(rows)]),
            "image": pa.array([d for d, _, _ in images], pa.large_binary()),
            "width": pa.array([w for _, w, _ in images], pa.int32()),
            "height": pa.array([h for _, _, h in images], pa.int32()),
        }
    )
    lance.write_dataset(table, uri, max_rows_per_file=2048)
    sides = np.sqrt(np.array([w * h for _, w, h in images], np.float64))
    return {"side": float(sides.mean()), "kb": float(np.mean([len(d) for d, _, _ in images])) / 1e3}


def parity_inputs(preprocess_cfg: dict) -> tuple[list[str], list[bytes], object]:
    """Device-routed crawl encodings of real photos and open_clip's transform of each."""
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from photos import crawl_encodings
    from PIL import Image

    from laion_ray.preprocess import ROUTE_HOST, decode_route

    images = {n: d for n, d in crawl_encodings().items() if decode_route(d) != ROUTE_HOST}
    transform = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
    reference = torch.stack([transform(Image.open(io.BytesIO(d))) for d in images.values()])
    return list(images), list(images.values()), reference


# --- 2. parity (GPU) ----------------------------------------------------------------


def nvjpeg_parity(embed, names, data, reference) -> str:
    """nvJPEG's decode against open_clip's transform, chroma as decoded and re-interpolated."""
    import simplejpeg
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from laion_ray.device_decode import DevicePreprocess, interpolate_chroma
    from laion_ray.preprocess import ROUTE_DEVICE_420, decode_route

    routes = np.array([decode_route(d) for d in data])
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(
            embed.net.encode_image(reference.to(embed.device)), dim=-1
        )
        cosines = {}
        for interpolate in (False, True):
            prep = DevicePreprocess(
                embed.info["preprocess_cfg"], embed.device, interpolate_chroma=interpolate
            )
            out = prep(data, routes)
            assert out.ok.all() and out.fallback == 0, (out.errors, out.fallback)
            got = torch.nn.functional.normalize(embed.net.encode_image(out.pixels), dim=-1)
            cosines[interpolate] = (got * ref).sum(dim=1).float().cpu().numpy()
    # Pixels of the 4:2:0 photos against libjpeg's decode (PIL decodes with libjpeg).
    off = {False: [], True: []}
    for d, route in zip(data, routes, strict=True):
        if route != ROUTE_DEVICE_420:
            continue
        libjpeg = torch.from_numpy(simplejpeg.decode_jpeg(d)).permute(2, 0, 1).float()
        raw = decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB,
                          device=embed.device).float()[None]  # fmt: skip
        fixed = interpolate_chroma(raw, (2, 2)).round()
        for interpolate, pixels in ((False, raw), (True, fixed)):
            diff = (pixels[0].cpu() - libjpeg).abs()
            off[interpolate].append(float((diff > 2).float().mean()))
    repeats = DevicePreprocess(embed.info["preprocess_cfg"], embed.device).interpolate_chroma
    worst = names[int(np.argmin(cosines[False]))]
    decoder = "nvJPEG" if embed.device.type == "cuda" else "torchvision's CPU decoder (dry run)"
    return (
        f"parity, {decoder} (decode=device) vs open_clip's PIL transform: min cosine "
        f"{cosines[False].min():.5f} with the chroma as nvJPEG decodes it (worst {worst}), "
        f"{cosines[True].min():.5f} re-interpolated (the actors' own check, "
        f"decoder_repeats_chroma, says: {'re-interpolate' if repeats else 'leave it'}); "
        f"{len(names)} real photos in crawl encodings, {embed.info['model']} random weights, "
        f"fp32; 4:2:0 pixel values more than 2 off libjpeg's: {np.mean(off[False]):.2%} as "
        f"decoded, {np.mean(off[True]):.2%} re-interpolated"
    )


def gpu_tests(timeout_s: float) -> str:
    """The ``gpu``-marked tests, in a subprocess; their pytest summary line."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *GPU_TESTS]
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout_s, 30)
        )
    except subprocess.TimeoutExpired:
        return f"gpu tests: still running after {timeout_s:.0f}s, stopped"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    summary = lines[-1] if lines else proc.stderr.strip()[-300:]
    return (
        "gpu tests (pytest -m gpu " + " ".join(GPU_TESTS) + "): " + "; ".join([summary, *failures])
    )


# --- 4. bare model and end to end ---------------------------------------------------------


def model_params(model: str, workdir: str) -> dict:
    if model == "tiny":  # the demo's config-only CLIP: checks the script on a CPU
        from laion_ray.demo import write_demo_model

        return {"model": write_demo_model(workdir), "random_weights": True}
    return {"model": model, "random_weights": True}


def make_embed(params: dict, device: str, precision: str | None):
    """The model actor's stage object, outside Ray (the same seed as every actor)."""
    from laion_ray.clip_model import clip_spec
    from laion_ray.preprocess import PixelSpec
    from laion_ray.udfs.clip import ClipEmbed

    size = PixelSpec.from_preprocess_cfg(clip_spec(params["model"])[1]).size
    return ClipEmbed(
        **params, seed=0, precision=precision, device=device, num_threads=None,
        pixel_column="pixels", size=size, column="emb",
    )  # fmt: skip


def bare_rate(embed, batch_size: int, seconds: float) -> float:
    """Images/s of ``embed_pixels`` over pre-made pixels (wall clock, device finished)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (batch_size, *embed.size, 3), dtype=np.uint8)
    for _ in range(3):  # kernels, allocator, autocast caches
        embed.embed_pixels(pixels)
    batches, start = 0, time.perf_counter()
    while batches < 5 or time.perf_counter() - start < seconds:
        out = embed.embed_pixels(pixels)  # host numpy back: the device has finished
        batches += 1
    elapsed = time.perf_counter() - start
    assert out.shape == (batch_size, embed.dim) and np.isfinite(out).all()
    return batches * batch_size / elapsed


def actor_calls(since: float) -> list[tuple[float, float]]:
    """``(start, seconds)`` of every model-actor call since ``since`` (epoch s), from
    Ray's timeline (Ray Data's ``submit`` of a block to an actor; as bench_embed.py)."""
    import ray

    return [
        (e["ts"] / 1e6, e["dur"] / 1e6)
        for e in ray.timeline()
        if e.get("ph") == "X" and e.get("name") == "submit" and e["ts"] / 1e6 >= since
    ]


def run_job(uri: str, rows: int, params: dict, decode: str, args) -> tuple[object, float]:
    """One ``clip-embed`` backfill of the first ``rows`` rows; its report and CPU-seconds."""
    from sampling import CpuShare

    from laion_ray.backfill import backfill

    cpus = float(os.cpu_count() or 1)
    with CpuShare() as cpu:
        report = backfill(
            uri,
            udfs=["clip-embed"],
            udf_params={
                "clip-embed": {
                    **params,
                    "decode": decode,
                    "batch_size": args.batch_size,
                    **({"precision": "fp16"} if not args.cpu_dry_run else {}),
                }
            },
            where=f"key < {rows}",
            overwrite=True,
            max_error_fraction=0.5,
            # decode=cpu on all CPUs (it does not apply to decode=device)
            decode_cpus=cpus if decode == "cpu" else None,
        )
    wall = report.elapsed_s
    return report, (cpu.actor_cores + cpu.other_cores) * wall


def end_to_end(uri: str, model: str, params: dict, bare: float, args) -> list[str]:
    """Both decode modes of one model: the ratio lines, and their embeddings' agreement."""
    import lance

    from laion_ray.clip_model import default_embedding_column

    # Enough rows that the long job's work outweighs the jitter of a job's start.
    rows = int(min(args.rows, max(args.min_rows, bare * args.work_seconds)))
    small = min(rows - 1, max(rows // 5, 2 * args.batch_size))
    lines, embeddings = [], {}
    for decode in ("device", "cpu"):
        short, short_cpu = run_job(uri, small, params, decode, args)
        since = time.time()
        long, long_cpu = run_job(uri, rows, params, decode, args)
        spans = actor_calls(since)
        seconds = long.elapsed_s - short.elapsed_s
        (stage,) = [s for s in long.stages if s["stage"] == "clip-embed"]
        ran = ", ".join(f"{k} x{v}" for k, v in stage.get("decode_ran", {}).items())
        facts = (
            f"decoded {ran or '?'}, {stage.get('decode_fallback_rows', 0)} rows fell back to the "
            f"host decoder, {long.rows_failed} failed; whole {rows:,}-row job "
            f"{long.rows_per_s:,.0f} rows/s in {long.elapsed_s:.1f}s"
        )
        if spans:
            span = max(a + d for a, d in spans) - min(a for a, _ in spans)
            busy = sum(d for _, d in spans) / span if span > 0 else float("nan")
            facts += (
                f"; over the actor's calls {rows / span:,.0f} img/s = {rows / span / bare:.2f} of "
                f"bare, actor in a call {busy:.0%} of that span"
            )
        if seconds <= 0:
            lines.append(
                f"end-to-end / bare model img/s: n/a ({model}, decode={decode}: the {rows:,}-row "
                f"job took no longer than the {small:,}-row one, so too few rows; {facts})"
            )
        else:
            steady, cores = (rows - small) / seconds, (long_cpu - short_cpu) / seconds
            verdict = ""
            if decode == "device" and model in TARGETS:
                met = steady / bare >= TARGETS[model] and cores <= MAX_CORES
                verdict = (
                    f"; target >= {TARGETS[model]} with at most {MAX_CORES:g} cores busy: "
                    + ("met" if met else "NOT met")
                )
            lines.append(
                f"end-to-end / bare model img/s = {steady / bare:.2f} ({model}, decode={decode}, "
                f"{steady:,.0f} vs {bare:,.0f} img/s, {cores:.1f} CPU cores busy{verdict}; steady "
                f"rate between a {small:,}- and a {rows:,}-row job, batch {args.batch_size}; "
                f"{facts})"
            )
        column = default_embedding_column(params["model"])
        table = lance.dataset(uri).to_table(columns=["key", column], filter=f"key < {rows}")
        embeddings[decode] = np.stack(table.sort_by("key")[column].to_numpy(zero_copy_only=False))
    cosine = (embeddings["device"] * embeddings["cpu"]).sum(axis=1)
    lines.append(
        f"  decode=device vs decode=cpu, {model}, {len(cosine):,} generated rows: cosine min "
        f"{cosine.min():.5f}, mean {cosine.mean():.5f}"
    )
    return lines


# --- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60000, help="rows of the generated table")
    parser.add_argument("--min-rows", type=int, default=20000, help="rows of a long job, at least")
    parser.add_argument(
        "--work-seconds", type=float, default=6.0, help="a long job's work at the bare rate"
    )
    parser.add_argument("--models", default="ViT-B-32,ViT-L-14")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per model call")
    parser.add_argument("--odd-share", type=float, default=0.02, help="PNG + progressive share")
    parser.add_argument("--bare-seconds", type=float, default=3.0)
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip steps past this")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--cpu-dry-run", action="store_true", help="every step on the CPU")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    if args.rows < 2:
        parser.error("--rows must be at least 2")
    started = time.monotonic()
    models = [m for m in args.models.split(",") if m]
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-gpu-e2e-")
    uri = os.path.join(workdir, "laion.lance")

    # 1. CPU work first: the table, the parity references.
    shape = write_table(uri, args.rows, args.odd_share)
    print(
        f"table: {args.rows:,} rows, mean image {shape['side']:.0f} px (sqrt of w x h), "
        f"{shape['kb']:.0f} KB, {args.odd_share:.0%} PNG or progressive; written in "
        f"{time.monotonic() - started:.0f}s on {os.cpu_count()} cores",
        flush=True,
    )
    from laion_ray.clip_model import clip_spec

    parity_model = model_params(models[0] if args.cpu_dry_run else "ViT-B-32", workdir)
    names, data, reference = parity_inputs(clip_spec(parity_model["model"])[1])

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_dry_run:
        print(
            "bench_gpu_e2e: no CUDA device here: did the CPU work only (table, parity "
            f"references for {len(names)} photos); skipped the nvJPEG parity, the gpu tests, "
            "the bare model loops and the end-to-end backfills (use --cpu-dry-run to run them "
            "on the CPU as a check of this script)"
        )
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        return
    device = "cuda" if cuda else "cpu"
    if args.cpu_dry_run:
        print("CPU dry run: every figure below is a check of the script, not a measurement")
    where = torch.cuda.get_device_name() if cuda else "CPU"

    # 2. parity on the device
    embed = make_embed(parity_model, device, "fp32")
    print(nvjpeg_parity(embed, names, data, reference), flush=True)
    del embed

    # 3. the gpu-marked tests
    if not args.skip_tests:
        print(gpu_tests(args.budget_s - (time.monotonic() - started) - 120), flush=True)

    # 4. bare model, then the pipeline
    import ray

    ray.init(
        num_cpus=os.cpu_count(),
        num_gpus=1 if cuda else 0,
        include_dashboard=False,
        log_to_driver=False,
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    try:
        for model in models:
            elapsed = time.monotonic() - started
            if elapsed > args.budget_s:
                print(f"{model}: skipped, {elapsed:.0f}s of the {args.budget_s:.0f}s budget spent")
                continue
            params = model_params(model, workdir)
            embed = make_embed(params, device, None if args.cpu_dry_run else "fp16")
            bare = bare_rate(embed, args.batch_size, args.bare_seconds)
            print(
                f"bare model: {model} random weights, {embed.info['precision']} on {where}, "
                f"batch {args.batch_size}: {bare:,.0f} img/s (pre-made pixels)",
                flush=True,
            )
            del embed
            if cuda:
                torch.cuda.empty_cache()  # the actors need the memory, not this process
            for line in end_to_end(uri, model, params, bare, args):
                print(line, flush=True)
    finally:
        ray.shutdown()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"bench_gpu_e2e: {time.monotonic() - started:.0f}s in all")


if __name__ == "__main__":
    main()
