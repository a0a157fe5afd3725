"""Backfill ``aspect_ratio`` and ``is_high_res`` (``ray job submit`` entry point).

Takes the flags of ``laion-ray backfill`` (--where, --tag, --unit-rows,
--storage-option, ...) and runs one ``backfill(uri, udfs=["aspect-ratio"])``.

Example:
    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/aspect_ratio.py s3://bucket/laion.lance --tag aspect-v1
"""

from __future__ import annotations

from collections.abc import Sequence

import _common


def main(argv: Sequence[str] | None = None) -> int:
    return _common.run_command("backfill", argv, "--udf", "aspect-ratio")


if __name__ == "__main__":
    _common.finish(main())
