"""Merge on key: laion-ray ``merge`` against pylance's single-process ``LanceDataset.merge``.

Builds a 1M-row scalar dataset (8 fragments) and a 1M-key Parquet label table
of two columns (shuffled keys), merges it into one copy per contender, checks
that the results are equal and prints the rows/s ratios and the peak driver RSS.

Contenders: pylance ``LanceDataset.merge`` (one process); laion-ray with the
local executor (what ``--executor auto`` picks for this source when no Ray is
running); laion-ray on Ray (started before timing, as a cluster would be).
Each figure is the median of interleaved repeats on fresh copies.

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
        self.start = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self._rss())
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
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from laion_ray.merge import merge
    from laion_ray.ray_env import ensure_ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    base, theirs = work / "base.lance", work / "theirs.lance"
    ours = {executor: work / f"ours_{executor}.lance" for executor in ("local", "ray")}
    shutil.rmtree(base, ignore_errors=True)
    lance.write_dataset(
        _dataset(args.rows, 0), base, max_rows_per_file=-(-args.rows // args.fragments)
    )
    labels_path = work / "labels.parquet"
    pq.write_table(_labels(args.rows, 0), labels_path)
    ensure_ray(num_cpus=args.num_cpus)  # started before timing, as a cluster would be

    # One untimed warm-up per contender on a small table (imports, Ray worker
    # processes), as in bench_backfill.py; the cold first Ray merge is printed too.
    small = work / "small.lance"
    shutil.rmtree(small, ignore_errors=True)
    lance.write_dataset(_dataset(10_000, 1), small, max_rows_per_file=2_500)
    pq.write_table(_labels(10_000, 1), work / "small_labels.parquet")
    cold = {}
    for contender in ("pylance", "local", "ray"):
        warm = work / f"warm_{contender}.lance"
        shutil.rmtree(warm, ignore_errors=True)
        shutil.copytree(small, warm)
        start = time.perf_counter()
        if contender == "pylance":
            lance.dataset(str(warm)).merge(pq.read_table(work / "small_labels.parquet"), "key")
        else:
            merge(str(warm), source=str(work / "small_labels.parquet"), executor=contender)
        cold[contender] = time.perf_counter() - start

    # Interleaved repeats, each on a fresh copy; the median of each contender.
    times: dict[str, list[float]] = {"pylance": [], "local": [], "ray": []}
    rss, strategy = {}, None
    for repeat in range(args.repeats):
        for path in (theirs, *ours.values()):
            shutil.rmtree(path, ignore_errors=True)
            shutil.copytree(base, path)
        start = time.perf_counter()
        lance.dataset(str(theirs)).merge(pq.read_table(labels_path), left_on="key")
        times["pylance"].append(time.perf_counter() - start)
        for executor, path in ours.items():
            with PeakRSS() as peak:
                start = time.perf_counter()
                report = merge(str(path), source=str(labels_path), executor=executor)
                times[executor].append(time.perf_counter() - start)
            if repeat == 0:
                rss[executor], strategy = (peak.start, peak.peak), report.strategy
    pylance_s = float(np.median(times["pylance"]))
    seconds = {executor: float(np.median(times[executor])) for executor in ours}

    cols = ["key", "aesthetic", "label"]
    want = lance.dataset(str(theirs)).to_table(columns=cols).sort_by("key")
    for executor, path in ours.items():
        got = lance.dataset(str(path)).to_table(columns=cols).sort_by("key")
        assert got.equals(want), f"laion-ray ({executor}) and pylance merges differ"
    print(f"rows={args.rows} fragments={args.fragments} label_columns=2 strategy={strategy}")
    runs = {c: " ".join(f"{t:.2f}" for t in ts) for c, ts in times.items()}
    print(
        f"pylance LanceDataset.merge: {pylance_s:.2f}s ({args.rows / pylance_s:,.0f} rows/s)"
        f"  [runs {runs['pylance']}]"
    )
    for executor, s in seconds.items():
        print(
            f"laion-ray merge, {executor} executor: {s:.2f}s ({args.rows / s:,.0f} rows/s)"
            f"  [runs {runs[executor]}]"
        )
    print(
        "ratio laion-ray (local executor, auto's choice without Ray) / pylance rows/s: "
        f"{pylance_s / seconds['local']:.2f} (target >= 1)"
    )
    print(
        f"ratio laion-ray (ray executor) / pylance rows/s: {pylance_s / seconds['ray']:.2f}"
        " (target >= 1)"
    )
    print(
        "warm-up (10k rows, first call in the process): "
        + ", ".join(f"{c} {t:.2f}s" for c, t in cold.items())
    )
    print(
        "peak driver RSS during laion-ray merge: "
        + ", ".join(
            f"{e} executor {b / 2**20:,.0f} MiB (at its start {a / 2**20:,.0f} MiB)"
            for e, (a, b) in rss.items()
        )
    )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
