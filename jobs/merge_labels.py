"""Merge label columns from an external table into a Lance table by key (``ray job submit`` entry point).

Example:
    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/merge_labels.py s3://bucket/laion.lance --from s3://bucket/labels/ \\
        --on key --columns aesthetic,label --unmatched-out s3://bucket/unmatched.parquet --tag labels-v1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import _common

from laion_ray.engine.run import COMMIT_EVERY_S
from laion_ray.merge import BROADCAST_MAX_BYTES, FORMATS, merge
from laion_ray.storage import mask_secrets, parse_storage_options


def _parser() -> argparse.ArgumentParser:
    summary, _, example = __doc__.partition("\n")
    p = argparse.ArgumentParser(
        description=summary,
        epilog=example.strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("uri", help="Lance dataset (local path or s3://...)")
    p.add_argument("--from", dest="source", action="append", required=True, metavar="SOURCE")
    p.add_argument("--on", default="key", help="key column in both tables")
    p.add_argument("--columns", help="comma-separated source columns (default: all but the key)")
    p.add_argument("--overwrite", action="store_true", help="update existing columns")
    p.add_argument("--cast", action="store_true", help="allow safe casts to the dataset's types")
    p.add_argument("--tag", help="tag the resulting version")
    p.add_argument("--unmatched-out", metavar="FILE", help=".parquet/.csv of unmatched keys")
    p.add_argument("--format", choices=FORMATS, help="source format (default: by extension)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--source-storage-option", action="append", default=None, metavar="KEY=VALUE")
    p.add_argument("--address", help="Ray cluster (default: $RAY_ADDRESS, set by ray job submit)")
    p.add_argument("--unit-rows", type=int, help="rows per work unit (checkpoint granularity)")
    p.add_argument("--checkpoint-uri", help="where checkpoints live (default URI/_laion_ray)")
    p.add_argument("--report", metavar="FILE", help="write the report as JSON")
    p.add_argument("--broadcast-max-bytes", type=int, default=BROADCAST_MAX_BYTES)
    p.add_argument("--num-partitions", type=int, help="buckets of the shuffle join")
    p.add_argument("--commit-every", type=float, default=COMMIT_EVERY_S, metavar="SECONDS")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and run one ``laion_ray.merge.merge`` call; 0 on success, 2 on bad input."""
    args = _parser().parse_args(argv)
    # _common.run logs the parsed flags; the source's options must be masked too.
    shown = argparse.Namespace(**vars(args))
    if args.source_storage_option is not None:
        shown.source_storage_option = mask_secrets(
            parse_storage_options(args.source_storage_option)
        )
    return _common.run(
        "merge_labels",
        shown,
        lambda: merge(
            args.uri,
            source=args.source,
            on=args.on,
            columns=[c.strip() for c in args.columns.split(",")] if args.columns else None,
            overwrite=args.overwrite,
            cast=args.cast,
            tag=args.tag,
            unmatched_out=args.unmatched_out,
            source_format=args.format,
            storage_options=parse_storage_options(args.storage_option),
            source_storage_options=(
                None
                if args.source_storage_option is None
                else parse_storage_options(args.source_storage_option)
            ),
            address=args.address,
            unit_rows=args.unit_rows,
            checkpoint_uri=args.checkpoint_uri,
            report_path=args.report,
            broadcast_max_bytes=args.broadcast_max_bytes,
            num_partitions=args.num_partitions,
            commit_every_s=args.commit_every,
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
