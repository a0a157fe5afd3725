"""Rebuild the IVF_PQ index of a Lance table on Ray (``ray job submit`` entry point).

Example:
    ray job submit -- python jobs/rebuild_index.py s3://bucket/laion.lance --min-recall 0.9
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from laion_ray.errors import LaionRayError
from laion_ray.index import reindex
from laion_ray.storage import mask_secrets, parse_storage_options, resolve_storage_options

log = logging.getLogger("jobs.rebuild_index")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, log the config (secrets masked), run ``reindex``; 0 only if swapped."""
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
    p.add_argument("--report")
    p.add_argument("--plot")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        opts = parse_storage_options(args.storage_option)
        config = {**vars(args), "storage_option": mask_secrets(resolve_storage_options(opts))}
        log.info("rebuild_index config: %s", config)
        report = reindex(
            args.uri,
            column=args.column,
            partitions=args.partitions,
            sub_vectors=args.sub_vectors,
            metric=args.metric,
            sample_rate=args.sample_rate,
            min_recall=args.min_recall,
            tag=args.tag,
            num_workers=args.num_workers,
            storage_options=opts,
            report_path=args.report,
            plot_path=args.plot,
        )
    except LaionRayError as exc:
        log.error("%s", exc)
        return 2
    log.info("%s", report.summary())
    return 0 if report.swapped else 1


if __name__ == "__main__":
    sys.exit(main())
