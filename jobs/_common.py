"""Flags and error handling shared by the ``jobs/`` backfill entry points.

Each entry point adds its own flags, then maps everything onto one
``laion_ray.backfill.backfill`` call; this module keeps the common flags, the
logged configuration (secrets masked) and the exit codes in one place.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

from laion_ray.errors import LaionRayError
from laion_ray.storage import mask_secrets, parse_storage_options, resolve_storage_options

log = logging.getLogger("jobs")


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every backfill job shares."""
    from laion_ray.engine.run import COMMIT_EVERY_S

    summary, _, example = doc.partition("\n")
    p = argparse.ArgumentParser(
        description=summary,
        epilog=example.strip() or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("uri", help="Lance dataset (local path or s3://...)")
    p.add_argument("--where", help="SQL filter; other rows keep their value (null when new)")
    p.add_argument("--tag", help="tag the resulting version")
    p.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="object-store option passed to Lance (repeatable)",
    )
    p.add_argument("--address", help="Ray cluster (default: $RAY_ADDRESS, set by ray job submit)")
    p.add_argument("--report", metavar="FILE", help="write the final summary as JSON")
    p.add_argument("--unit-rows", type=int, help="rows per work unit (checkpoint granularity)")
    p.add_argument("--commit-every", type=float, default=COMMIT_EVERY_S, metavar="SECONDS")
    p.add_argument("--overwrite", action="store_true", help="replace existing columns in place")
    p.add_argument("--max-error-fraction", type=float, default=0.01)
    return p


def backfill_options(args: argparse.Namespace) -> dict[str, Any]:
    """The common flags as ``backfill`` keyword arguments (``uri`` stays positional)."""
    return dict(
        where=args.where,
        tag=args.tag,
        storage_options=parse_storage_options(args.storage_option),
        address=args.address,
        report_path=args.report,
        unit_rows=args.unit_rows,
        commit_every_s=args.commit_every,
        overwrite=args.overwrite,
        max_error_fraction=args.max_error_fraction,
    )


def run(
    name: str,
    args: argparse.Namespace,
    call: Callable[[], Any],
    succeeded: Callable[[Any], bool] = lambda report: True,
) -> int:
    """Log the configuration, run ``call`` and turn its outcome into an exit code.

    Returns:
        0 on success; 2 for a :class:`LaionRayError` (bad input, logged as one
        line); 1 when ``succeeded(report)`` is false (e.g. a recall gate kept the
        old index) or for any other error (logged with its traceback).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        options = parse_storage_options(args.storage_option)
        # Log what the job will really use, AWS_* environment included, but masked.
        config = {**vars(args), "storage_option": mask_secrets(resolve_storage_options(options))}
        log.info("%s config: %s", name, config)
        report = call()
    except LaionRayError as exc:
        log.error("%s: %s", name, exc)
        return 2
    except Exception:
        log.exception("%s failed", name)
        return 1
    log.info("%s", report.summary())
    return 0 if succeeded(report) else 1
