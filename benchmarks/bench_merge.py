"""Merge on key: laion-ray ``merge`` against pylance's single-process ``LanceDataset.merge``.

Builds a 1M-row scalar dataset (8 fragments) and a 1M-key Parquet label table
of two columns (shuffled keys), merges it into two copies, one per tool, checks
that the results are equal and prints the rows/s ratio and the peak driver RSS.

Example:
    python benchmarks/bench_merge.py --rows 1000000 --fragments 8
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _dataset(rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "key": np.arange(rows, dtype=np.int64),
            "caption": pa.array([f"caption {i}" for i in range(rows)]),
            "similarity": rng.random(rows),
            "NSFW": rng.integers(0, 2, rows),
        }
    )


def _labels(rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed + 1)
    keys = rng.permutation(rows).astype(np.int64)
    return pa.table(
        {"key": keys, "aesthetic": rng.random(rows), "label": (keys % 7).astype(np.int32)}
    )


class PeakRSS:
    """Peak resident memory of this (driver) process while the block runs, sampled."""

    def __enter__(self) -> PeakRSS:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while True:
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            if self._stop.wait(0.01):
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--fragments", type=int, default=8)
    p.add_argument("--workdir", help="default: a temporary directory")
    p.add_argument("--num-cpus", type=int, help="local Ray CPUs (default: all)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from laion_ray.merge import merge
    from laion_ray.ray_env import ensure_ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    base, ours, theirs = work / "base.lance", work / "ours.lance", work / "theirs.lance"
    for path in (base, ours, theirs):
        shutil.rmtree(path, ignore_errors=True)
    lance.write_dataset(
        _dataset(args.rows, 0), base, max_rows_per_file=-(-args.rows // args.fragments)
    )
    shutil.copytree(base, ours)
    shutil.copytree(base, theirs)
    labels_path = work / "labels.parquet"
    pq.write_table(_labels(args.rows, 0), labels_path)
    ensure_ray(num_cpus=args.num_cpus)  # started before timing, as a cluster would be

    start = time.perf_counter()
    lance.dataset(str(theirs)).merge(pq.read_table(labels_path), left_on="key")
    pylance_s = time.perf_counter() - start

    with PeakRSS() as rss:
        start = time.perf_counter()
        report = merge(str(ours), source=str(labels_path))
        ours_s = time.perf_counter() - start

    cols = ["key", "aesthetic", "label"]
    got = lance.dataset(str(ours)).to_table(columns=cols).sort_by("key")
    want = lance.dataset(str(theirs)).to_table(columns=cols).sort_by("key")
    assert got.equals(want), "laion-ray and pylance merges differ"
    print(f"rows={args.rows} fragments={args.fragments} label_columns=2 strategy={report.strategy}")
    print(f"pylance LanceDataset.merge: {pylance_s:.2f}s ({args.rows / pylance_s:,.0f} rows/s)")
    print(f"laion-ray merge: {ours_s:.2f}s ({args.rows / ours_s:,.0f} rows/s)")
    print(f"ratio laion-ray/pylance rows/s: {pylance_s / ours_s:.2f}")
    print(f"peak driver RSS during laion-ray merge: {rss.peak / 2**20:,.0f} MiB")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
