"""GPU model rate against CPU decode rate: how many decode CPUs one GPU needs.

``laion_ray.cluster.DECODE_CPUS_PER_GPU`` plans that many decode CPUs per model
GPU. This measures it on the machine it runs on:

- the model: ``ClipEmbed.embed_pixels`` (host uint8 pixels -> device, normalise,
  fp16 autocast forward, unit float32 back to the host), the model actor's own
  path, on one GPU, over pre-made pixels; random weights (no hub here), which
  cost the same FLOPs as trained ones;
- decode: ``preprocess_image`` (the decode stage's fast path) on one core,
  per CPU-second, on 384 px JPEGs and on JPEGs of twice the pixels, about
  LAION's average;
- the same model on one CPU core (1 torch thread, fp32): what a CPU actor does,
  and the cosine of its embeddings with the GPU's fp16 ones.

Lines: ``decode CPUs per GPU = model img/s / decode img/s per core`` and
``one GPU / one CPU core model img/s``.

Run (on a machine with CUDA):
    python benchmarks/bench_gpu.py --batch-size 256 --batches 40
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_embed import make_jpegs  # noqa: E402


def _measured_modules() -> types.SimpleNamespace:
    """``laion_ray.preprocess`` and ``laion_ray.udfs.clip``.

    A GPU machine may lack Lance and Ray (the lent one here cannot install
    them: no network, and their wheels exceed what can be carried), and the
    package's ``__init__`` imports the engine. These two modules need neither,
    so without Lance they are loaded without the package's ``__init__``.
    """
    if importlib.util.find_spec("lance") is None:
        for name in ("laion_ray", "laion_ray.udfs"):
            package = types.ModuleType(name)
            package.__path__ = [str(ROOT.joinpath(*name.split(".")))]
            sys.modules[name] = package
    import laion_ray.preprocess as preprocess
    import laion_ray.udfs.clip as clip

    return types.SimpleNamespace(preprocess=preprocess, clip=clip)


def make_embed(mods, model: str, device: str):
    """The model actor's stage object (random weights, same seed on every device)."""
    size = mods.preprocess.PixelSpec.from_preprocess_cfg(mods.clip.clip_spec(model)[1]).size
    return mods.clip.ClipEmbed(
        model=model, pretrained=None, checkpoint=None, random_weights=True, seed=0,
        device=device, precision=None, num_threads=1 if device == "cpu" else None,
        pixel_column="pixels", size=size, column="emb",
    )  # fmt: skip


def model_rate(embed, batch_size: int, batches: int) -> float:
    """Images/s of the model actor's embed path (wall clock)."""
    import numpy as np

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (batch_size, *embed.size, 3), dtype=np.uint8)
    for _ in range(3):  # warm-up: kernels, allocator, autocast caches
        embed.embed_pixels(pixels)
    start = time.perf_counter()
    for _ in range(batches):
        out = embed.embed_pixels(pixels)  # host numpy back: the device has finished
    elapsed = time.perf_counter() - start
    assert out.shape == (batch_size, embed.dim) and np.isfinite(out).all()
    return batches * batch_size / elapsed


def decode_rate(mods, images: list[bytes], size: tuple[int, int], repeats: int) -> float:
    """Best images per CPU-second of the fast decode path, one thread."""
    spec = mods.preprocess.PixelSpec(size=size)
    for data in images[:8]:
        mods.preprocess.preprocess_image(data, spec)
    best = 0.0
    for _ in range(repeats):
        start = time.process_time()
        for data in images:
            mods.preprocess.preprocess_image(data, spec)
        best = max(best, len(images) / (time.process_time() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-batches", type=int, default=4, help="model batches of 32 on CPU")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    import cv2
    import numpy as np
    import torch

    cv2.setNumThreads(1)
    mods = _measured_modules()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device here (use --device cpu to try the script)")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    gpu_embed = make_embed(mods, args.model, args.device)
    cpu_embed = make_embed(mods, args.model, "cpu")
    # The same decoded images through both: fp16 on the GPU must agree with fp32 on the CPU.
    spec = mods.preprocess.PixelSpec(size=gpu_embed.size)
    pixels = np.stack([mods.preprocess.preprocess_image(d, spec) for d in make_jpegs(32, 384)])
    cosine = (gpu_embed.embed_pixels(pixels) * cpu_embed.embed_pixels(pixels)).sum(axis=1)
    gpu = model_rate(gpu_embed, args.batch_size, args.batches)
    torch.set_num_threads(1)
    cpu = model_rate(cpu_embed, 32, args.cpu_batches)
    small = decode_rate(mods, make_jpegs(args.images, 384), spec.size, args.repeats)
    laion = decode_rate(mods, make_jpegs(args.images, 543), spec.size, args.repeats)
    print(
        f"decode CPUs per GPU = {gpu / laion:.1f} ({args.model} random weights, "
        f"{gpu_embed.info['precision']} on one {name}, batch {args.batch_size}: {gpu:,.0f} img/s; "
        f"fast decode of 543 px JPEGs (2x the pixels of 384 px, about LAION's mean): "
        f"{laion:,.0f} img/s per core, {os.cpu_count()} cores here)"
    )
    print(f"  with 384 px JPEGs ({small:,.0f} img/s per core): {gpu / small:.1f}")
    print(
        f"one GPU / one CPU core model img/s = {gpu / cpu:.0f} ({gpu:,.0f} vs {cpu:.1f}; CPU: "
        f"fp32, 1 torch thread, batch 32)"
    )
    print(
        f"  GPU / CPU embeddings of the same 32 decoded JPEGs: cosine min {cosine.min():.4f}, "
        f"mean {cosine.mean():.4f}"
    )


if __name__ == "__main__":
    main()
