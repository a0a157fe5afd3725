"""Rebuild the IVF_PQ index of a Lance table on Ray (``ray job submit`` entry point).

Exits 0 when the new index was swapped in, 1 when the recall gate kept the old
one (or on an unexpected error), 2 on bad input.

Example:
    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/rebuild_index.py s3://bucket/laion.lance --min-recall 0.9 --tag ivf-v2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import _common

from laion_ray.index import reindex
from laion_ray.storage import parse_storage_options


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and run one ``reindex(uri, ...)``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("uri")
    p.add_argument("--column", default="img_emb")
    p.add_argument("--partitions", type=int)
    p.add_argument("--sub-vectors", type=int)
    p.add_argument("--metric", default="l2", choices=["l2", "cosine", "dot"])
    p.add_argument("--sample-rate", type=int, default=256)
    p.add_argument("--min-recall", type=float)
    p.add_argument("--tag")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--address", help="Ray cluster (default: $RAY_ADDRESS, set by ray job submit)")
    p.add_argument("--report")
    p.add_argument("--plot")
    args = p.parse_args(argv)

    def call():
        from laion_ray.ray_env import ensure_ray

        ensure_ray(args.address)
        return reindex(
            args.uri,
            column=args.column,
            partitions=args.partitions,
            sub_vectors=args.sub_vectors,
            metric=args.metric,
            sample_rate=args.sample_rate,
            min_recall=args.min_recall,
            tag=args.tag,
            num_workers=args.num_workers,
            storage_options=parse_storage_options(args.storage_option),
            report_path=args.report,
            plot_path=args.plot,
        )

    return _common.run("rebuild_index", args, call, succeeded=lambda report: report.swapped)


if __name__ == "__main__":
    sys.exit(main())
