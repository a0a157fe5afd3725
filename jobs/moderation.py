"""Backfill the ``moderation_label`` column from NSFW/similarity thresholds (``ray job submit`` entry point).

Example:
    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/moderation.py s3://bucket/laion.lance --nsfw-threshold 0.8 --tag mod-v2
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import _common

from laion_ray.backfill import backfill


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and run one ``backfill(uri, udfs=["moderation-rules"], udf_params=...)``."""
    p = _common.parser(__doc__)
    p.add_argument("--nsfw-threshold", type=float, default=0.5, help="flag rows with NSFW above")
    p.add_argument("--min-similarity", type=float, help="also flag rows with similarity below")
    p.add_argument("--flagged-label", default="review")
    p.add_argument("--ok-label", default="ok")
    args = p.parse_args(argv)
    params = {
        "nsfw_threshold": args.nsfw_threshold,
        "min_similarity": args.min_similarity,
        "flagged_label": args.flagged_label,
        "ok_label": args.ok_label,
    }
    return _common.run(
        "moderation",
        args,
        lambda: backfill(
            args.uri,
            udfs=["moderation-rules"],
            udf_params={"moderation-rules": params},
            **_common.backfill_options(args),
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
