"""Job history: the laion-ray commits of a dataset, read from Lance transactions."""

from __future__ import annotations

import json
from collections.abc import Mapping

from laion_ray.cluster import format_stages
from laion_ray.engine.commit import DETAILS_PROPERTY, JOB_PROPERTY
from laion_ray.storage import open_dataset


def job_history(uri: str, *, storage_options: Mapping[str, str] | None = None) -> list[dict]:
    """One entry per version committed by laion-ray, oldest first.

    Each has ``version``, ``timestamp``, ``job``, ``operation`` and the job's
    ``details`` (UDFs and versions, parameters, row/error/time counts, and
    ``stages``: what each stage requested and where it ran).
    """
    ds = open_dataset(uri, storage_options=storage_options)
    tags_by_version: dict[int, list[str]] = {}
    for name, tag in ds.tags.list().items():
        tags_by_version.setdefault(tag["version"], []).append(name)
    entries = []
    for version in ds.versions():
        number = version["version"]
        try:
            transaction = ds.read_transaction(number)
        except TypeError:
            # pylance (14.x) cannot decode a compaction that rewrote an index
            # (its RewrittenIndex lacks fields). laion-ray never commits a
            # Rewrite, so such a version is never one of its jobs.
            continue
        properties = (transaction.transaction_properties or {}) if transaction else {}
        if JOB_PROPERTY not in properties:
            continue
        entries.append(
            {
                "version": number,
                "timestamp": version["timestamp"].isoformat(timespec="seconds"),
                "job": properties[JOB_PROPERTY],
                "operation": type(transaction.operation).__name__,
                "details": json.loads(properties.get(DETAILS_PROPERTY) or "{}"),
                "tags": tags_by_version.get(number, []),
            }
        )
    return entries


def format_history(entries: list[dict]) -> str:
    if not entries:
        return "no laion-ray jobs in this dataset's history"
    lines = [f"{'version':>7}  {'time':19}  {'operation':17}  job / details"]
    for e in entries:
        d = e["details"]
        counts = ", ".join(
            f"{k}={d[k]}" for k in ("rows_processed", "rows_failed", "elapsed_s") if k in d
        )
        tags = f"  [tags: {', '.join(e['tags'])}]" if e["tags"] else ""
        lines.append(
            f"{e['version']:>7}  {e['timestamp']:19}  {e['operation']:17}  {e['job']}"
            f"{'  (' + counts + ')' if counts else ''}{tags}"
        )
        lines.extend(" " * 7 + line for line in format_stages(d.get("stages", [])))
    return "\n".join(lines)
