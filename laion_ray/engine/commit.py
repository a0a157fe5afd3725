"""The one commit path: every laion-ray write to a dataset goes through here.

Each commit re-derives its operation from the newest version before trying,
so a retry after a concurrent writer never re-sends a stale snapshot of the
schema or fragment list (the way a whole-schema ``Merge`` drops a column that
another writer added meanwhile). Every commit carries the job's name and
details as transaction properties, which ``laion-ray history`` reads back.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence

import lance
import pyarrow as pa
from lance.commit import CommitConflictError
from lance.dataset import Transaction
from lance.fragment import DataFile

from laion_ray.errors import LaionRayError
from laion_ray.storage import open_dataset, resolve_storage_options

from .plan import FragmentState

log = logging.getLogger(__name__)

JOB_PROPERTY = "laion_ray.job"
DETAILS_PROPERTY = "laion_ray.details"
UDF_METADATA = b"laion_ray.udf"
MAX_ATTEMPTS = 12


class NotRebaseable(LaionRayError):
    """Another writer changed what this commit was computed from."""


def commit(
    uri: str,
    build: Callable[[lance.LanceDataset], lance.LanceOperation.BaseOperation | None],
    *,
    job: str,
    details: Mapping[str, object],
    storage_options: Mapping[str, str] | None = None,
) -> lance.LanceDataset:
    """Commit ``build(latest)`` at the newest version, rebuilding it on conflict.

    ``build`` returns ``None`` when there is nothing left to do at that version.
    """
    opts = resolve_storage_options(storage_options)
    properties = {JOB_PROPERTY: job, DETAILS_PROPERTY: json.dumps(details, default=str)}
    for attempt in range(MAX_ATTEMPTS):
        latest = open_dataset(uri, storage_options=opts)
        operation = build(latest)
        if operation is None:
            return latest
        try:
            return lance.LanceDataset.commit(
                uri,
                Transaction(
                    read_version=latest.version,
                    operation=operation,
                    transaction_properties=properties,
                ),
                storage_options=opts,
                max_retries=0,  # we rebuild the operation ourselves on conflict
            )
        except CommitConflictError as exc:
            delay = min(2.0, 0.05 * 2**attempt) * (0.5 + random.random())
            log.info("commit conflict (%s); retrying at the newest version in %.2fs", exc, delay)
            time.sleep(delay)
    raise LaionRayError(f"could not commit to {uri}: {MAX_ATTEMPTS} conflicting writers in a row")


def add_columns(
    uri: str,
    fields: Sequence[pa.Field],
    *,
    job: str,
    details: Mapping[str, object],
    storage_options: Mapping[str, str] | None = None,
) -> lance.LanceDataset:
    """Add all-null columns (metadata only) on top of the newest schema."""

    def build(latest: lance.LanceDataset):
        missing = [f for f in fields if f.name not in latest.schema.names]
        if not missing:
            return None
        schema = latest.schema
        for field in missing:
            schema = schema.append(field)
        return lance.LanceOperation.Project(schema)

    return commit(uri, build, job=job, details=details, storage_options=storage_options)


def check_unchanged(latest: lance.LanceDataset, fragment_id: int, physical_rows: int) -> None:
    """Raise :class:`NotRebaseable` if the fragment was removed or rewritten."""
    frag = latest.get_fragment(fragment_id)
    if frag is None or frag.metadata.physical_rows != physical_rows:
        raise NotRebaseable(
            f"fragment {fragment_id} of {latest.uri} was rewritten by another writer "
            "(compaction or overwrite) while this job ran; rerun the same command: "
            "fragments already committed are kept and the rest is recomputed"
        )


def replace_column_files(
    uri: str,
    files: Mapping[int, str],
    planned: Mapping[int, FragmentState],
    *,
    job: str,
    details: Mapping[str, object],
    storage_options: Mapping[str, str] | None = None,
) -> lance.LanceDataset:
    """Swap in new column files (``fragment id -> file name under data/``).

    A fragment may gain rows' worth of other writers' columns or deletions and
    still take our file; one that was rewritten (compaction) or removed cannot,
    and fails with :class:`NotRebaseable` so the checkpoints stay for a rerun.
    """

    def build(latest: lance.LanceDataset):
        groups = []
        for fragment_id, file_name in sorted(files.items()):
            check_unchanged(latest, fragment_id, planned[fragment_id].physical_rows)
            data_file = DataFile.create(latest, file_name)
            groups.append(lance.LanceOperation.DataReplacementGroup(fragment_id, data_file))
        return lance.LanceOperation.DataReplacement(groups)

    return commit(uri, build, job=job, details=details, storage_options=storage_options)
