"""``laion-ray demo``: every job on a generated sample, on local Ray.

The CLIP model is randomly initialised (no weights can be fetched offline),
and the demo says so: its embeddings exercise the pipeline, not semantics.

The demo recreates its working directory on every run, so it marks the
directories it makes (:data:`MARKER`) and deletes nothing else: a non-empty
directory without the marker is refused unless ``force`` is given.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import shutil
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

#: The file that says a directory is the demo's own, to delete and recreate.
MARKER = ".laion-ray-demo"

# A tiny CLIP in open_clip's config format (ViT and text transformer of 4 layers
# x 128 wide, 128 px input in 16 patches). Even ViT-S-32 costs ~2 TFLOP per 1000
# images, a minute of a 2-core laptop; at 224 px this one still took 5 s of one
# core. Every other part of the path (decode, resize, actors, commit) is the
# real one.
DEMO_CLIP = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 128, "layers": 4, "width": 128, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
}


# open_clip's default preprocessing (``PreprocessCfg()``, OpenAI's mean and std),
# written out whole so that planning needs neither open_clip nor torch.
DEMO_PREPROCESS = {
    "size": 224,
    "mode": "RGB",
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "fill_color": 0,
}


def write_demo_model(directory: str) -> str:
    """Write :data:`DEMO_CLIP` as a local open_clip config, without weights.

    Returns its model name, ``local-dir:<absolute path>`` (absolute: Ray
    workers need not share the driver's working directory). With
    ``random_weights=True`` each model actor initialises it from the same
    seed; no process of the demo has to import torch to make it.
    """
    import json

    path = os.path.abspath(os.path.join(directory, "tiny-clip-random"))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        size = DEMO_CLIP["vision_cfg"]["image_size"]
        json.dump({"model_cfg": DEMO_CLIP, "preprocess_cfg": {**DEMO_PREPROCESS, "size": size}}, f)
    return f"local-dir:{path}"


def prepare_directory(directory: str, *, force: bool = False) -> None:
    """Make ``directory`` an empty demo directory, holding only :data:`MARKER`.

    A missing or empty directory, or one an earlier demo made (its marker is
    there), is (re)created. Anything else holds someone's files: refused,
    unless ``force``.

    Raises:
        LaionRayError: ``directory`` is not a directory, or is a non-empty one
            without the marker and ``force`` is not set.
    """
    from laion_ray.errors import LaionRayError

    if os.path.lexists(directory):
        if os.path.islink(directory) or not os.path.isdir(directory):
            raise LaionRayError(f"--dir {directory} exists and is not a directory")
        entries = os.listdir(directory)
        if entries and MARKER not in entries and not force:
            raise LaionRayError(
                f"--dir {directory} is not empty and was not made by laion-ray demo (no "
                f"{MARKER} file in it); choose another --dir, or pass --force to delete "
                f"its {len(entries)} entries"
            )
        shutil.rmtree(directory)
    os.makedirs(directory)
    with open(os.path.join(directory, MARKER), "w") as f:
        f.write("made by `laion-ray demo`, which deletes and recreates this directory\n")


def _step(
    lines: list[str], title: str, fn: Callable[[], str], started: float | None = None
) -> None:
    started = started or time.monotonic()
    detail = fn()
    lines.append(f"  {title:<34} {time.monotonic() - started:6.1f}s  {detail}")
    print(lines[-1], flush=True)


def run_demo(
    directory: str = "./laion-ray-demo",
    *,
    rows: int = 1000,
    address: str | None = None,
    force: bool = False,
) -> list[str]:
    """Generate a sample and run rules, embedding heads, a merge, a re-embed
    with zero-shot labels and CLIP score, dedup, an index rebuild and a search.

    Ray starts while the sample is written, for the model actors, dedup and
    the index; the re-embed runs in the background alongside the other steps.
    Cheap function UDFs and a small merge run in this process.

    ``directory`` is recreated (see :func:`prepare_directory`): one that the
    demo did not make is refused unless ``force``.

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
    prepare_directory(directory, force=force)
    where = f"Ray at {address}" if address else "local Ray"
    lines = [f"laion-ray demo in {directory} ({rows} rows, {where})"]
    print(lines[0], flush=True)

    sample = None
    # Cheap function UDFs and a small merge run in this process on a laptop, as
    # --executor auto would choose if Ray were not already up for the model.
    in_process = "auto" if address else "local"

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
            uri,
            udfs=["aspect-ratio", "moderation-rules"],
            tag="rules-v1",
            address=address,
            executor=in_process,
        )
        return f"aspect_ratio, is_high_res, moderation_label: {report.rows_processed} rows"

    def embed() -> str:
        # One job: each image decoded once for the embedding, whose zero-shot
        # labels and caption cosine (the text tower only) come from it in the
        # same pass. A new score column: the card's `similarity` stays
        # (`column="similarity"` with overwrite=True replaces it).
        model = {"model": write_demo_model(directory), "random_weights": True}
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
            "a tiny CLIP with RANDOM WEIGHTS (demo only, embeddings carry no meaning), "
            f"alongside the steps above: {report.rows_processed} rows, "
            f"{report.rows_failed} bad images -> null + error record"
        )

    def heads() -> str:
        from laion_ray.udfs.embedding_head import make_embedding_head

        # Over the card's stored 768-d img_emb: no image decode at all.
        udfs = [
            *make_embedding_head(preset="aesthetic", random_weights=True),
            *make_embedding_head(preset="nsfw", random_weights=True),
        ]
        report = backfill(uri, udfs=udfs, address=address, executor=in_process)
        return (
            f"aesthetic_score, nsfw_score over img_emb with RANDOM WEIGHTS (demo only; pass "
            f"weights=LAION's .pth): {report.rows_processed} rows"
        )

    def labels() -> str:
        rng = np.random.default_rng(0)
        keys = np.arange(0, rows + rows // 10, dtype=np.int64)  # some keys match no row
        path = os.path.join(directory, "labels.parquet")
        pq.write_table(pa.table({"key": keys, "rating": rng.uniform(3, 9, len(keys))}), path)
        report = merge(uri, source=path, on="key", address=address, executor=in_process)
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
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="demo") as background:
        # Ray's start (~6 s, mostly its own processes) runs while the sample is
        # written; Ray installs its signal handlers from the main thread only.
        sampling = background.submit(make_sample)
        ensure_ray(address)
        _step(lines, "sample (while Ray starts)", sampling.result, started=started)
        # The re-embed's model actor spends ~10 s importing torch and open_clip.
        # The other steps neither read its columns nor write the ones it reads,
        # so they run meanwhile: other writers of the same table, whose commits
        # the engine reconciles as it does any concurrent writer's.
        embed_started = time.monotonic()
        embedding = background.submit(embed)
        _step(lines, "backfill aspect-ratio + rules", rules)
        _step(lines, "aesthetic + NSFW heads", heads)
        _step(lines, "merge labels on key", labels)
        _step(lines, "near-duplicates (dedup)", near_duplicates)
        _step(lines, "rebuild IVF_PQ index", index)
        title = "re-embed + zero-shot labels + CLIP score"
        _step(lines, title, embedding.result, started=embed_started)
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
