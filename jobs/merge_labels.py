"""Merge label columns from an external table by key (``ray job submit`` entry point).

Takes the flags of ``laion-ray merge`` and runs one ``merge(uri, source=...)``.

Example:
    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/merge_labels.py s3://bucket/laion.lance --from s3://bucket/labels/ \\
        --on key --columns aesthetic,label --unmatched-out s3://bucket/unmatched.parquet
"""

from __future__ import annotations

from collections.abc import Sequence

import _common


def main(argv: Sequence[str] | None = None) -> int:
    return _common.run_command("merge", argv)


if __name__ == "__main__":
    _common.finish(main())
