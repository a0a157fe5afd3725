"""Rebuild the IVF_PQ index on Ray (``ray job submit`` entry point).

Takes the flags of ``laion-ray reindex`` and runs one ``reindex(uri, ...)``.
Exits 0 when the new index was swapped in, 1 when the recall gate kept the
old one (or on an unexpected error), 2 on bad input. The gate judges
recall@10 at ``--gate-nprobes``/``--gate-refine-factor`` (default 16/30, the
dataset card's query and ``laion-ray search``'s defaults).

Example:
    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/rebuild_index.py s3://bucket/laion.lance --min-recall 0.9 --tag ivf-v2
"""

from __future__ import annotations

from collections.abc import Sequence

import _common


def main(argv: Sequence[str] | None = None) -> int:
    return _common.run_command("reindex", argv)


if __name__ == "__main__":
    _common.finish(main())
