"""``laion-ray demo``: every job on a generated sample, on local Ray.

The CLIP model is randomly initialised (no weights can be fetched offline),
and the demo says so: its embeddings exercise the pipeline, not semantics.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

# A tiny CLIP in open_clip's config format (ViT and text transformer of 4 layers
# x 128 wide, 224 px input like the real ones). Even ViT-S-32 costs ~2 TFLOP per
# 1000 images, a minute of a 2-core laptop; this one keeps the demo's model
# steps to seconds while every other part of the path stays the real one.
DEMO_CLIP = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 224, "layers": 4, "width": 128, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
}


def save_demo_model(directory: str, seed: int = 0) -> str:
    """Save :data:`DEMO_CLIP` with random weights as a local open_clip checkpoint.

    Returns its model name, ``local-dir:<absolute path>``: the actors load it
    through the same code as any local checkpoint (absolute, since Ray workers
    need not share the driver's working directory).
    """
    import dataclasses
    import json

    import open_clip
    import torch
    from open_clip.transform import PreprocessCfg
    from safetensors.torch import save_file

    path = os.path.abspath(os.path.join(directory, "tiny-clip-random"))
    os.makedirs(path, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = open_clip.CLIP(**DEMO_CLIP)
    save_file(net.state_dict(), os.path.join(path, "open_clip_model.safetensors"))
    with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        # Complete preprocess settings let the driver plan without open_clip.
        config = {"model_cfg": DEMO_CLIP, "preprocess_cfg": dataclasses.asdict(PreprocessCfg())}
        json.dump(config, f)
    return f"local-dir:{path}"


def _step(lines: list[str], title: str, fn: Callable[[], str]) -> None:
    started = time.monotonic()
    detail = fn()
    lines.append(f"  {title:<34} {time.monotonic() - started:6.1f}s  {detail}")
    print(lines[-1], flush=True)


def run_demo(
    directory: str = "./laion-ray-demo", *, rows: int = 1000, address: str | None = None
) -> list[str]:
    """Generate a sample and run sample -> rules -> embedding heads -> merge ->
    re-embed with zero-shot labels and CLIP score -> dedup -> reindex -> search.

    Ray starts only when a step needs it (the model actors): cheap function
    UDFs and a small merge run in this process, as ``--executor auto`` would
    run them on any laptop.

    Returns the printed account, one line per step.
    """
    from laion_ray.backfill import backfill
    from laion_ray.dedup import dedup
    from laion_ray.index import reindex
    from laion_ray.merge import merge
    from laion_ray.ray_env import ensure_ray
    from laion_ray.sample import write_sample
    from laion_ray.search import format_hits, search

    uri = os.path.join(directory, "laion.lance")
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.makedirs(directory)
    where = f"Ray at {address}" if address else "local Ray"
    lines = [f"laion-ray demo in {directory} ({rows} rows, {where})"]
    print(lines[0], flush=True)

    # Building the model imports torch and open_clip, ~9 s of CPU: a process of
    # its own does it on the second core while the first steps run here.
    model_builder = concurrent.futures.ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn")
    )
    demo_model = model_builder.submit(save_demo_model, directory)
    model_builder.shutdown(wait=False)
    sample = None

    def make_sample() -> str:
        nonlocal sample
        sample = write_sample(
            uri, rows=rows, fragments=4, seed=0, bad_fraction=0.01, duplicates=0.05
        )
        return (
            f"{rows} rows in 4 fragments, {sample.num_bad} bad images and "
            f"{sample.num_duplicates} near-duplicate images injected"
        )

    def rules() -> str:
        report = backfill(
            uri, udfs=["aspect-ratio", "moderation-rules"], tag="rules-v1", address=address
        )
        return f"aspect_ratio, is_high_res, moderation_label: {report.rows_processed} rows"

    def embed() -> str:
        # One job: each image decoded once for the embedding, whose zero-shot
        # labels and caption cosine (the text tower only) come from it in the
        # same pass. A new score column: the card's `similarity` stays
        # (`column="similarity"` with overwrite=True replaces it).
        ensure_ray(address)  # starts Ray while the model's process finishes
        model = {"model": demo_model.result()}
        report = backfill(
            uri,
            udfs=["clip-embed", "moderation-clip", "clip-score"],
            udf_params={
                "clip-embed": model,
                "moderation-clip": model,
                "clip-score": {**model, "column": "clip_score"},
            },
            max_error_fraction=0.05,
            address=address,
        )
        return (
            "a tiny CLIP with RANDOM WEIGHTS, saved as a local checkpoint (demo only, "
            f"embeddings carry no meaning): {report.rows_processed} rows, "
            f"{report.rows_failed} bad images -> null + error record"
        )

    def heads() -> str:
        from laion_ray.udfs.embedding_head import make_embedding_head

        # Over the card's stored 768-d img_emb: no image decode at all.
        udfs = [
            *make_embedding_head(preset="aesthetic", random_weights=True),
            *make_embedding_head(preset="nsfw", random_weights=True),
        ]
        report = backfill(uri, udfs=udfs, address=address)
        return (
            f"aesthetic_score, nsfw_score over img_emb with RANDOM WEIGHTS (demo only; pass "
            f"weights=LAION's .pth): {report.rows_processed} rows"
        )

    def labels() -> str:
        rng = np.random.default_rng(0)
        keys = np.arange(0, rows + rows // 10, dtype=np.int64)  # some keys match no row
        path = os.path.join(directory, "labels.parquet")
        pq.write_table(pa.table({"key": keys, "rating": rng.uniform(3, 9, len(keys))}), path)
        report = merge(uri, source=path, on="key", address=address)
        return (
            f"rating from labels.parquet: {report.matched_keys} keys matched, "
            f"{report.unmatched_keys} label keys not in the dataset"
        )

    def near_duplicates() -> str:
        report = dedup(uri, column="img_emb", threshold=0.95, keep="similarity", exact=True,
                       address=address)  # fmt: skip
        return (
            f"dup_group, is_duplicate on the sample's img_emb (cosine >= 0.95 or same md5, "
            f"keep highest similarity): {report.duplicates} duplicates flagged of "
            f"{sample.num_duplicates} injected, {report.pairs} pairs in {report.groups} tasks"
        )

    def index() -> str:
        report = reindex(
            uri,
            column="img_emb",
            report_path=os.path.join(directory, "recall.json"),
            plot_path=os.path.join(directory, "recall.png"),
        )
        return report.summary()

    def query() -> str:
        hits = search(uri, row=0, k=5, where="`NSFW` = 0 AND width >= 128")
        print(format_hits(hits), flush=True)
        return f"top {len(hits)} neighbours of row 0 (NSFW = 0 AND width >= 128, prefilter)"

    started = time.monotonic()
    _step(lines, "sample", make_sample)
    _step(lines, "backfill aspect-ratio + rules", rules)
    _step(lines, "aesthetic + NSFW heads", heads)
    _step(lines, "merge labels on key", labels)
    _step(lines, "re-embed + zero-shot labels + CLIP score", embed)
    _step(lines, "near-duplicates (dedup)", near_duplicates)
    _step(lines, "rebuild IVF_PQ index", index)
    _step(lines, "ANN search", query)
    lines += [
        f"done in {time.monotonic() - started:.0f}s. Results:",
        f"  dataset       {uri}",
        f"  recall plot   {os.path.join(directory, 'recall.png')} "
        f"(report {os.path.join(directory, 'recall.json')})",
        f"  errors        laion-ray errors {uri}",
        f"  inspect       laion-ray info {uri}   and   laion-ray history {uri}",
    ]
    print("\n".join(lines[-5:]), flush=True)
    return lines
