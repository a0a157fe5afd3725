"""The one commit path: every laion-ray write to a dataset goes through here.

Each commit re-derives its operation from the newest version before trying,
so a retry after a concurrent writer never re-sends a stale snapshot of the
schema or fragment list (the way a whole-schema ``Merge`` drops a column that
another writer added meanwhile). A column file is committed only while the
values it was built from are still the newest (no lost update). Every commit
carries the job's name and details as transaction properties, which
``laion-ray history`` reads back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence

import lance
import pyarrow as pa
import pyarrow.fs as pafs
from lance.commit import CommitConflictError
from lance.dataset import Transaction
from lance.fragment import DataFile

from laion_ray.errors import JobFailed
from laion_ray.storage import (
    filesystem,
    join_uri,
    open_dataset,
    resolve_storage_options,
    with_retries,
)

from .plan import FragmentState

log = logging.getLogger(__name__)

JOB_PROPERTY = "laion_ray.job"
DETAILS_PROPERTY = "laion_ray.details"
# The commit's own id (see engine/writeback.py): a rerun after a crash looks
# for it to tell whether the commit landed.
COMMIT_PROPERTY = "laion_ray.commit"
UDF_METADATA = b"laion_ray.udf"
MAX_ATTEMPTS = 12


class NotRebaseable(JobFailed):
    """Another writer changed what this commit was computed from."""


class Rebuild(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a ``build`` whose inputs were refreshed: build again at the newest version."""


@dataclasses.dataclass(frozen=True)
class ColumnFile:
    """A fragment's new column file and what it was built from.

    Attributes:
        file_name: The file, relative to ``<uri>/data``.
        based_on: The fragment's data files that held the target columns when
            the file was assembled (see :func:`column_files`).
    """

    file_name: str
    based_on: tuple[str, ...]


def field_ids(ds: lance.LanceDataset, columns: Sequence[str]) -> set[int]:
    """Lance field ids of ``columns``, nested fields included."""
    ids: set[int] = set()

    def walk(field) -> None:
        ids.add(field.id())
        for child in field.children():
            walk(child)

    for field in ds.lance_schema.fields():
        if field.name() in columns:
            walk(field)
    return ids


def column_files(fragment: lance.LanceFragment, ids: set[int]) -> tuple[str, ...]:
    """Paths of the fragment's data files holding any of the field ``ids``.

    A writer that changes a column's values in a fragment always swaps in a
    new data file for it, so equal paths mean unchanged values; rows appended,
    deleted or other columns added leave them alone.
    """
    return tuple(sorted(f.path for f in fragment.metadata.files if ids.intersection(f.fields)))


def commit(
    uri: str,
    build: Callable[[lance.LanceDataset], lance.LanceOperation.BaseOperation | None],
    *,
    job: str,
    details: Mapping[str, object],
    storage_options: Mapping[str, str] | None = None,
    commit_id: str | None = None,
    before_commit: Callable[[], Mapping[str, str]] | None = None,
) -> lance.LanceDataset:
    """Commit ``build(latest)`` at the newest version, rebuilding it on conflict.

    ``build`` returns ``None`` when there is nothing left to do at that version.
    ``before_commit`` runs right before every attempt (the lease's fence: a
    driver that lost its lease must not commit); what it returns (the lease's
    token) goes into the transaction properties, as does ``commit_id``
    (:data:`COMMIT_PROPERTY`).
    """
    opts = resolve_storage_options(storage_options)
    properties = {JOB_PROPERTY: job, DETAILS_PROPERTY: json.dumps(details, default=str)}
    if commit_id is not None:
        properties[COMMIT_PROPERTY] = commit_id
    for attempt in range(MAX_ATTEMPTS):
        latest = open_dataset(uri, storage_options=opts)
        try:
            operation = build(latest)
        except Rebuild:
            continue
        if operation is None:
            return latest
        fenced = dict(properties)
        if before_commit is not None:
            fenced.update({f"laion_ray.{k}": v for k, v in before_commit().items()})
        try:
            return lance.LanceDataset.commit(
                uri,
                Transaction(
                    read_version=latest.version,
                    operation=operation,
                    transaction_properties=fenced,
                ),
                storage_options=opts,
                max_retries=0,  # we rebuild the operation ourselves on conflict
            )
        except CommitConflictError as exc:
            delay = min(2.0, 0.05 * 2**attempt) * (0.5 + random.random())
            log.info("commit conflict (%s); retrying at the newest version in %.2fs", exc, delay)
            time.sleep(delay)
    raise JobFailed(f"could not commit to {uri}: {MAX_ATTEMPTS} conflicting writers in a row")


def add_columns(
    uri: str,
    fields: Sequence[pa.Field],
    *,
    job: str,
    details: Mapping[str, object],
    storage_options: Mapping[str, str] | None = None,
    before_commit: Callable[[], Mapping[str, str]] | None = None,
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

    return commit(
        uri,
        build,
        job=job,
        details=details,
        storage_options=storage_options,
        before_commit=before_commit,
    )


def tag_version(
    uri: str, tag: str, version: int, *, storage_options: Mapping[str, str] | None = None
) -> None:
    """Point ``tag`` at ``version``: created, or moved there if it exists (a rerun)."""
    ds = open_dataset(uri, storage_options=storage_options)
    if tag in ds.tags.list():
        ds.tags.update(tag, version)
    else:
        ds.tags.create(tag, version)


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
    files: Mapping[int, ColumnFile],
    planned: Mapping[int, FragmentState],
    *,
    job: str,
    details: Mapping[str, object],
    storage_options: Mapping[str, str] | None = None,
    reassemble: Callable[[Sequence[int]], Mapping[int, ColumnFile]] | None = None,
    commit_id: str | None = None,
    before_commit: Callable[[], Mapping[str, str]] | None = None,
) -> lance.LanceDataset:
    """Swap in new column files, never over values newer than they were built from.

    A fragment may gain rows' worth of other writers' columns or deletions and
    still take our file; one that was rewritten (compaction) or removed cannot,
    and fails with :class:`NotRebaseable` so the checkpoints stay for a rerun.

    A file also carries the values of rows this job did not compute, read at
    assembly. If another writer replaced the target columns of a fragment
    since (its data files for them differ from ``based_on``), committing the
    file would restore that writer's rows to their old values: such fragments
    are rebuilt with ``reassemble`` (fragment ids -> fresh files, built against
    the newest values) and the commit is derived again; unchanged fragments
    keep their files. Superseded files, never referenced by any version, are
    deleted.

    Args:
        uri: The dataset.
        files: Fragment id -> its new column file.
        planned: Fragment states of the plan, to detect rewritten fragments.
        job: Job name for the commit's properties.
        details: Job details for the commit's properties.
        storage_options: Object-store options.
        reassemble: Rebuilds the given fragments' files from the job's
            checkpointed outputs; without it a changed fragment is
            :class:`NotRebaseable`.
        commit_id: Recorded in the transaction properties.
        before_commit: Runs right before every commit attempt (the fence).
    """
    opts = resolve_storage_options(storage_options)
    current = dict(files)

    def build(latest: lance.LanceDataset):
        groups, changed = [], []
        for fragment_id, column_file in sorted(current.items()):
            check_unchanged(latest, fragment_id, planned[fragment_id].physical_rows)
            data_file = DataFile.create(latest, column_file.file_name)
            fragment = latest.get_fragment(fragment_id)
            if column_files(fragment, set(data_file.fields)) != column_file.based_on:
                changed.append(fragment_id)
            groups.append(lance.LanceOperation.DataReplacementGroup(fragment_id, data_file))
        if not changed:
            return lance.LanceOperation.DataReplacement(groups)
        if reassemble is None:
            raise NotRebaseable(
                f"another writer replaced the columns of fragments {changed} of {uri} "
                "after this job assembled them; rerun the same command"
            )
        log.info(
            "fragments %s: another writer committed these columns since assembly; "
            "re-assembling them against the newest values",
            changed,
        )
        fresh = reassemble(changed)
        for fragment_id in changed:
            delete_data_file(uri, current[fragment_id].file_name, opts)
            current[fragment_id] = fresh[fragment_id]
        raise Rebuild

    return commit(
        uri,
        build,
        job=job,
        details=details,
        storage_options=opts,
        commit_id=commit_id,
        before_commit=before_commit,
    )


def landed(
    uri: str,
    commit_id: str,
    since_version: int,
    files: Mapping[int, Sequence[str]],
    storage_options: Mapping[str, str] | None = None,
) -> bool:
    """Whether commit ``commit_id`` (made after ``since_version``) is in the dataset.

    It is if the newest version references one of its ``files`` (fragment id
    -> file names), or if a newer version's transaction carries the id (the
    file may have been replaced by another writer since).
    """
    latest = open_dataset(uri, storage_options=storage_options)
    for fragment_id, names in files.items():
        fragment = latest.get_fragment(int(fragment_id))
        if fragment is not None and set(names) & {f.path for f in fragment.metadata.files}:
            return True
    for version in range(since_version + 1, latest.version + 1):
        try:
            transaction = latest.read_transaction(version)
        except TypeError:  # a compaction pylance cannot decode: not ours
            continue
        except (ValueError, OSError):  # cleaned up: the file check above decides
            continue
        properties = (transaction.transaction_properties or {}) if transaction else {}
        if properties.get(COMMIT_PROPERTY) == commit_id:
            return True
    return False


def data_file_exists(uri: str, file_name: str, opts: Mapping[str, str]) -> bool:
    """Whether ``<uri>/data/<file_name>`` exists (a store that keeps failing raises)."""
    fs, path = filesystem(join_uri(uri, "data", file_name), opts)
    info = with_retries("read", path, lambda: fs.get_file_info(path))
    return info.type != pafs.FileType.NotFound


def delete_data_file(uri: str, file_name: str, opts: Mapping[str, str]) -> None:
    """Delete ``<uri>/data/<file_name>``, a file no version references."""
    fs, path = filesystem(join_uri(uri, "data", file_name), opts)
    with contextlib.suppress(FileNotFoundError, OSError):  # an orphan costs only space
        fs.delete_file(path)
