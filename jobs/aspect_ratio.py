"""Backfill ``aspect_ratio`` and ``is_high_res`` on a Lance table (``ray job submit`` entry point).

Example:
    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/aspect_ratio.py s3://bucket/laion.lance --tag aspect-v1
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import _common

from laion_ray.backfill import backfill


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and run one ``backfill(uri, udfs=["aspect-ratio"], ...)``."""
    args = _common.parser(__doc__).parse_args(argv)
    return _common.run(
        "aspect_ratio",
        args,
        lambda: backfill(args.uri, udfs=["aspect-ratio"], **_common.backfill_options(args)),
    )


if __name__ == "__main__":
    sys.exit(main())
