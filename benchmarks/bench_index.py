"""Distributed IVF_PQ rebuild vs single-node ``create_index`` at equal parameters.

Each phase runs in its own process so peak RSS is per phase: the driver of the
distributed build is compared with a process that holds the full vector column.

Example:
    python benchmarks/bench_index.py --rows 200000 --dim 768 --workers 1,2
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase_gen(a) -> dict:
    import lance
    import numpy as np
    import pyarrow as pa

    from laion_ray.recall import clustered_vectors

    vecs = clustered_vectors(a.rows, a.dim, clusters=256, seed=0)
    table = pa.table({
        "key": np.arange(a.rows),
        "img_emb": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), a.dim),
    })  # fmt: skip
    for name in ("single", "dist"):
        lance.write_dataset(table, f"{a.dir}/{name}.lance", max_rows_per_file=a.rows // a.fragments)
    return {}


def phase_full(a) -> dict:
    import lance

    col = lance.dataset(f"{a.dir}/dist.lance").to_table(columns=["img_emb"])["img_emb"]
    _ = col.combine_chunks().values.to_numpy()
    return {"rss_mb": _rss_mb()}


def phase_single(a) -> dict:
    import lance

    ds = lance.dataset(f"{a.dir}/single.lance")
    t0 = time.perf_counter()
    ds.create_index("img_emb", "IVF_PQ", num_partitions=a.partitions, num_sub_vectors=a.sub_vectors)
    return {"build_s": time.perf_counter() - t0}


def phase_dist(a) -> dict:
    import lance
    import numpy as np

    from laion_ray import recall as rc
    from laion_ray.index import reindex
    from laion_ray.ray_env import ensure_ray

    ensure_ray(num_cpus=4)  # fractional tasks overlap on 2 cores, as in the tests
    builds = {}
    for n in [int(w) for w in a.workers.split(",")]:
        t0 = time.perf_counter()
        report = reindex(f"{a.dir}/dist.lance", partitions=a.partitions,
                         sub_vectors=a.sub_vectors, num_workers=n)  # fmt: skip
        builds[n] = {"build_s": time.perf_counter() - t0, "timings": report.timings_s}
    rss = _rss_mb()
    ds = lance.dataset(f"{a.dir}/dist.lance")
    rows = np.sort(np.random.default_rng(7).choice(a.rows, 100, replace=False))
    batch = ds.take(rows, columns=["img_emb", "_rowid"])
    queries = np.stack(batch["img_emb"].to_numpy(zero_copy_only=False)).astype(np.float32)
    own = batch["_rowid"].to_numpy()
    groups = [[f.fragment_id for f in ds.get_fragments()]]
    truth = rc.exact_neighbours(
        f"{a.dir}/dist.lance", ds.version, None, "img_emb", groups, queries, own, 10, "l2"
    )
    out = {"builds": builds, "rss_mb": rss}
    grid = {"nprobes_grid": (20,), "refine_grid": (None,)}
    for name in ("dist", "single"):
        d = lance.dataset(f"{a.dir}/{name}.lance")
        rc.recall_grid(d, "img_emb", queries, own, truth, **grid)  # warm the index cache
        p = rc.recall_grid(d, "img_emb", queries, own, truth, **grid)[0]
        out[name] = {"recall": p.recall, "mean_ms": p.mean_ms, "segments": len(d.list_indices())}
    return out


PHASES = {"gen": phase_gen, "full": phase_full, "single": phase_single, "dist": phase_dist}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--fragments", type=int, default=8)
    p.add_argument("--partitions", type=int, default=256)
    p.add_argument("--sub-vectors", type=int, default=48)
    p.add_argument("--workers", default="1,2", help="num_workers values to time")
    p.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase:
        print(json.dumps(PHASES[a.phase](a)))
        return
    a.dir = tempfile.mkdtemp(prefix="bench-index-")
    res = {}
    try:
        for phase in ("gen", "full", "single", "dist"):
            cmd = [sys.executable, __file__, "--phase", phase, "--dir", a.dir] + sys.argv[1:]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res[phase] = json.loads(out.strip().splitlines()[-1])
    finally:
        shutil.rmtree(a.dir, ignore_errors=True)
    single, dist = res["single"], res["dist"]
    builds = dist["builds"]
    best = min(builds, key=lambda n: builds[n]["build_s"])
    print(f"data: {a.rows} x {a.dim} clustered, {a.fragments} fragments, "
          f"partitions={a.partitions} sub_vectors={a.sub_vectors}")  # fmt: skip
    print(f"single-node create_index build: {single['build_s']:.1f} s")
    for n, b in builds.items():
        print(f"distributed build, {n} workers: {b['build_s']:.1f} s "
              f"({b['build_s'] / single['build_s']:.2f}x single) phases {b['timings']}")  # fmt: skip
    print(f"build time ratio (distributed/single, best={best} workers): "
          f"{builds[best]['build_s'] / single['build_s']:.2f}  (target <= 1.5)")  # fmt: skip
    print(f"recall@10 nprobes=20: distributed {dist['dist']['recall']:.3f}, single "
          f"{dist['single']['recall']:.3f}, diff {dist['dist']['recall'] - dist['single']['recall']:+.3f}"
          "  (target >= -0.01)")  # fmt: skip
    print(f"query latency ratio (distributed/single, mean of 100): "
          f"{dist['dist']['mean_ms'] / dist['single']['mean_ms']:.2f} "
          f"({dist['dist']['mean_ms']:.2f} / {dist['single']['mean_ms']:.2f} ms, index segments "
          f"{dist['dist']['segments']} / {dist['single']['segments']})  (target <= 1.1)")  # fmt: skip
    print(f"peak driver RSS ratio (driver/full-column holder): "
          f"{dist['rss_mb'] / res['full']['rss_mb']:.2f} "
          f"({dist['rss_mb']:.0f} / {res['full']['rss_mb']:.0f} MB)  (target < 0.5)")  # fmt: skip


if __name__ == "__main__":
    main()
