"""Group near-duplicate rows by embedding cosine (``ray job submit`` entry point).

Takes the flags of ``laion-ray dedup`` and runs one ``dedup(uri, ...)``.

Example:
    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/dedup.py s3://bucket/laion.lance --column img_emb --threshold 0.95 \\
        --keep similarity --exact --tag dedup-v1
"""

from __future__ import annotations

from collections.abc import Sequence

import _common


def main(argv: Sequence[str] | None = None) -> int:
    return _common.run_command("dedup", argv)


if __name__ == "__main__":
    _common.finish(main())
