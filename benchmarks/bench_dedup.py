"""Dedup quality against brute-force all-pairs, and its scaling, side by side.

1. *quality*: ``--quality-rows`` (20k) x 768 generated vectors with injected
   near-duplicates (``sample_embeddings``); ``laion_ray.dedup`` against exact
   all-pairs cosine (torch, one process): precision and recall of the
   same-group pairs at ``--threshold``.
2. *scale*: dedup on each of ``--sizes``: wall time, the time of each stage,
   peak RSS of the largest task (workers are reused, so an upper bound), and
   the ratio of the largest to the smallest size (linear = size ratio).
3. *brute force*: single-process all-pairs over ``--brute-rows`` (50k) rows of
   the largest table, scaled by (N / 50k)^2 to the largest size.

Example:
    python benchmarks/bench_dedup.py --sizes 200000,1000000 --dir /tmp/bench-dedup
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import lance
import numpy as np


def write_vectors(path: str, rows: int, fragments: int, duplicates: float) -> dict[int, list[int]]:
    """A fresh copy of the generated table at ``path`` (generated once into ``path.base``)."""
    from laion_ray.sample import duplicate_plan, sample_embeddings

    base = f"{path}.base-{rows}-{fragments}-{duplicates}"
    if not os.path.exists(base):
        table, _ = sample_embeddings(rows, seed=0, duplicates=duplicates)
        lance.write_dataset(table, base, max_rows_per_file=-(-rows // fragments))
        del table
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(base, path)
    return duplicate_plan(rows, seed=0, duplicates=duplicates)


def brute_pairs(x: np.ndarray, threshold: float, block: int = 4096) -> tuple[np.ndarray, ...]:
    """All pairs ``i < j`` with cosine >= threshold, one process, block by block."""
    import torch

    t = torch.from_numpy(x)
    a, b = [], []
    for lo in range(0, len(x), block):
        sims = t[lo : lo + block] @ t[lo:].T
        i, j = torch.nonzero(sims >= threshold, as_tuple=True)
        i, j = i + lo, j + lo
        keep = i < j
        a.append(i[keep].numpy())
        b.append(j[keep].numpy())
    return np.concatenate(a), np.concatenate(b)


def same_group_pairs(labels: dict[int, int]) -> set[tuple[int, int]]:
    members: dict[int, list[int]] = {}
    for key, group in labels.items():
        members.setdefault(group, []).append(key)
    out = set()
    for keys in members.values():
        keys.sort()
        out.update((keys[i], keys[j]) for i in range(len(keys)) for j in range(i + 1, len(keys)))
    return out


def quality(a) -> None:
    from laion_ray.dedup import dedup
    from laion_ray.dedup.graph import components

    path = os.path.join(a.dir, "quality.lance")
    truth = write_vectors(path, a.quality_rows, 4, a.duplicates)
    t0 = time.perf_counter()
    report = dedup(path, threshold=a.threshold)
    took = time.perf_counter() - t0
    tab = lance.dataset(path).to_table(columns=["key", "dup_group", "img_emb"])
    keys = tab["key"].to_numpy()
    ours = dict(zip(keys.tolist(), tab["dup_group"].to_numpy().tolist(), strict=True))
    x = tab["img_emb"].combine_chunks().values.to_numpy().reshape(len(keys), -1)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    t0 = time.perf_counter()
    i, j = brute_pairs(x.astype(np.float32), a.threshold)
    brute_s = time.perf_counter() - t0
    nodes, roots = components(keys[i], keys[j])
    brute = same_group_pairs(dict(zip(nodes.tolist(), roots.tolist(), strict=True)))
    found = same_group_pairs(ours)
    injected = same_group_pairs({k: s for s, cs in truth.items() for k in (s, *cs)})
    tp = len(found & brute)
    print(
        f"quality {a.quality_rows} x 768, threshold {a.threshold}: dedup precision = "
        f"{tp / max(1, len(found)):.4f}, recall = {tp / max(1, len(brute)):.4f} "
        f"(same-group pairs vs brute-force all-pairs: {len(found)} found, {len(brute)} true); "
        f"recall of the injected groups = {len(found & injected) / max(1, len(injected)):.4f}; "
        f"dedup {took:.1f}s, brute force {brute_s:.1f}s"
    )
    print(f"  {report.summary().splitlines()[0]}")


def scale(a) -> None:
    from laion_ray.dedup import dedup

    sizes = [int(s) for s in a.sizes.split(",")]
    results = {}
    for n in sizes:
        path = os.path.join(a.dir, f"scale-{n}.lance")
        write_vectors(path, n, max(4, n // 100_000), a.duplicates)
        t0 = time.perf_counter()
        report = dedup(path, threshold=a.threshold)
        wall = time.perf_counter() - t0
        results[n] = wall
        print(
            f"scale {n} x 768: dedup wall {wall:.1f}s ({n / wall:,.0f} rows/s); stages "
            + " ".join(f"{k}={v:.1f}s" for k, v in report.timings_s.items())
            + f", write-back {report.job.elapsed_s:.1f}s; {report.partitions} partitions, "
            f"{report.groups} compare tasks of at most {report.max_task_rows} rows; "
            f"peak task RSS {json.dumps(report.peak_task_rss_mb)} MiB; "
            f"{report.duplicates} duplicates"
        )
        if n != sizes[-1]:
            shutil.rmtree(path, ignore_errors=True)  # the .base copy stays for reruns
    lo, hi = sizes[0], sizes[-1]
    if lo != hi:
        print(
            f"scaling: time({hi}) / time({lo}) = {results[hi] / results[lo]:.2f} "
            f"for {hi / lo:.1f}x the rows (linear = {hi / lo:.1f}, quadratic = {(hi / lo) ** 2:.0f})"
        )
    # Brute force over a subset of the largest table, scaled quadratically.
    path = os.path.join(a.dir, f"scale-{hi}.lance")
    sub = lance.dataset(path).to_table(columns=["img_emb"], limit=a.brute_rows)["img_emb"]
    x = sub.combine_chunks().values.to_numpy().reshape(len(sub), -1).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    t0 = time.perf_counter()
    brute_pairs(x, a.threshold)
    brute_s = time.perf_counter() - t0
    scaled = brute_s * (hi / len(x)) ** 2
    print(
        f"brute force (1 process, torch) over {len(x)} rows: {brute_s:.1f}s, scaled to {hi}: "
        f"{scaled:,.0f}s; brute-force scaled / laion-ray dedup = {scaled / results[hi]:.1f}"
    )
    shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/bench-dedup")
    p.add_argument("--quality-rows", type=int, default=20_000)
    p.add_argument("--sizes", default="200000,1000000")
    p.add_argument("--brute-rows", type=int, default=50_000)
    p.add_argument("--duplicates", type=float, default=0.1)
    p.add_argument("--threshold", type=float, default=0.95)
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-scale", action="store_true")
    p.add_argument("--num-cpus", type=int, help="local Ray CPUs (default: Ray's)")
    a = p.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    from laion_ray.ray_env import ensure_ray

    ensure_ray(num_cpus=a.num_cpus)
    if not a.skip_quality:
        quality(a)
    if not a.skip_scale:
        scale(a)


if __name__ == "__main__":
    main()
