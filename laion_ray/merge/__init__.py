"""``merge``: attach or update columns from an external table, joined on a key.

The source (Parquet, CSV, JSONL or Lance; local, object store or several files)
is validated first (duplicate keys, key and column types, source keys absent
from the dataset) and only then joined onto the dataset's rows by the engine
(``laion_ray.engine.run``): the same plan, checkpoints, commit path, history
and tags as a backfill. Existing data files are never rewritten; each fragment
gains one new column file.

Two join strategies, chosen by the source's size (``broadcast_max_bytes``):

- *broadcast*: one worker task loads the source, sorts it by key and keeps it
  in the object store; each unit batch looks its keys up (vectorised binary
  search, or ``pc.index_in`` for string keys). Nothing reaches the driver.
  With ``executor="auto"`` and no Ray running, a source of at most
  ``LOCAL_SOURCE_MAX_BYTES`` merged into at most ``LOCAL_MAX_ROWS`` rows is
  joined the same way in this process, as small backfills are.
- *shuffle*: the unit stream and the source are hash-partitioned on the key
  by Ray Data (``groupby(bucket).map_groups``) and joined per bucket, so the
  source never has to fit on one node. (Ray Data's ``Dataset.join`` needs
  polars, which is not a dependency here; the bucket join is the same hash
  join built from primitives the project already has.)

Re-merging the same source without ``overwrite`` is an incremental fill: the
columns carry ``laion_ray.udf = merge:<source>`` metadata, so the engine reads
only rows whose merged columns are still null (appended rows, or keys the
source has gained) and fills those. Use ``overwrite`` to refresh values.

Examples:
    >>> merge("laion.lance", source="labels.parquet", on="key")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from laion_ray.engine.commit import UDF_METADATA
from laion_ray.engine.run import COMMIT_EVERY_S, Job, JobReport, choose_executor, run_job
from laion_ray.errors import LaionRayError
from laion_ray.merge.broadcast import validate_broadcast, validate_local
from laion_ray.merge.shuffle import validate_shuffle
from laion_ray.merge.source import FORMATS, SourceTable, open_source, plan_types, unwrap
from laion_ray.ray_env import ray_attached
from laion_ray.storage import filesystem, open_dataset

log = logging.getLogger(__name__)


__all__ = ["BROADCAST_MAX_BYTES", "FORMATS", "MergeReport", "SourceTable", "merge", "open_source"]

# A source up to this size (bytes on disk) is broadcast; above it, shuffled.
BROADCAST_MAX_BYTES = 512 * 1024**2
# ``auto`` may join a source up to this size in this process (see merge()).
LOCAL_SOURCE_MAX_BYTES = 128 * 1024**2


# --- the report ---------------------------------------------------------------


@dataclasses.dataclass
class MergeReport:
    """What a merge found and did; ``report_path`` gets it as JSON."""

    uri: str
    source: str
    on: str
    columns: list[str]
    strategy: str
    partitions: int | None = None
    source_rows: int = 0
    matched_keys: int = 0
    unmatched_keys: int = 0
    unmatched_examples: list[Any] = dataclasses.field(default_factory=list)
    unmatched_out: str | None = None
    job: JobReport | None = None

    @property
    def version(self) -> int | None:
        return self.job.version if self.job else None

    @property
    def rows_processed(self) -> int:
        return self.job.rows_processed if self.job else 0

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "job"}
        out["job"] = self.job.to_dict() if self.job else None
        return out

    def summary(self) -> str:
        head = (
            f"merge {self.source} -> {self.uri} on {self.on!r} ({self.strategy}"
            + (f", {self.partitions} buckets" if self.partitions else "")
            + "): "
            f"{self.source_rows} source rows, {self.matched_keys} keys matched, "
            f"{self.unmatched_keys} source keys not in the dataset"
            + (f" (written to {self.unmatched_out})" if self.unmatched_out else "")
        )
        return head + ("\n" + self.job.summary() if self.job else "")


# --- merge ------------------------------------------------------------------------


def _identity(source: SourceTable, on: str, types: Mapping[str, pa.DataType]) -> str:
    payload = {
        "source": source.identity,
        "on": on,
        "columns": {k: str(v) for k, v in types.items()},
    }
    return "merge:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def merge(
    uri: str,
    *,
    source: str | Sequence[str],
    on: str = "key",
    columns: Sequence[str] | None = None,
    overwrite: bool = False,
    cast: bool = False,
    tag: str | None = None,
    unmatched_out: str | None = None,
    source_format: str | None = None,
    storage_options: Mapping[str, str] | None = None,
    source_storage_options: Mapping[str, str] | None = None,
    address: str | None = None,
    unit_rows: int | None = None,
    checkpoint_uri: str | None = None,
    report_path: str | None = None,
    broadcast_max_bytes: int = BROADCAST_MAX_BYTES,
    num_partitions: int | None = None,
    workers: int | None = None,
    commit_every_s: float = COMMIT_EVERY_S,
    executor: str = "auto",
) -> MergeReport:
    """Attach (or, with ``overwrite``, update) ``source``'s columns to ``uri`` by key.

    Validation runs distributed and before anything is committed: duplicate
    source keys are an error (with examples), key and column types must agree
    (``cast`` allows safe casts), and source keys absent from the dataset are
    counted (and written to ``unmatched_out``). Dataset rows without a label
    get null; with ``overwrite`` they keep their old values.

    Resumable and safe against concurrent writers like every engine job; the
    checkpoint key includes the source's content identity (file sizes and
    mtimes, or the Lance version), so a changed source starts afresh.

    Args:
        uri: Lance dataset to merge into.
        source: Parquet/CSV/JSONL file(s), a directory or glob of them, or a Lance dataset.
        on: Key column, present in both.
        columns: Source columns to merge (default: all but the key).
        overwrite: Update existing columns (matched rows only).
        cast: Allow safe casts of the key and of columns to the dataset's types.
        tag: Tag the resulting version.
        unmatched_out: Write source keys absent from the dataset here (.parquet/.csv).
        source_format: ``parquet``, ``csv``, ``json`` or ``lance`` (default: by extension).
        storage_options: Object-store options for the dataset.
        source_storage_options: Options for the source (default: ``storage_options``).
        address: Ray cluster address.
        unit_rows: Rows per work unit (checkpoint granularity).
        checkpoint_uri: Where checkpoints live (default ``<uri>/_laion_ray``).
        report_path: Write the report as JSON here.
        broadcast_max_bytes: Sources up to this size are broadcast, larger ones shuffled.
        num_partitions: Buckets of the shuffle join (default: from the sizes,
            and at least two per worker).
        workers: Parallel tasks the shuffle is sized for (default: the
            cluster's CPUs, autoscalable nodes included).
        commit_every_s: Commit finished fragments at least this often.
        executor: ``ray``, ``local`` (this process; broadcast joins only) or
            ``auto``: local for a source of at most ``LOCAL_SOURCE_MAX_BYTES``
            when no cluster is named and no Ray is running (see
            :func:`laion_ray.engine.run.choose_executor`).

    Returns:
        A :class:`MergeReport`.

    Examples:
        >>> merge("laion.lance", source="s3://b/labels/", columns=["aesthetic"])  # doctest: +SKIP
    """
    import ray

    from laion_ray.ray_env import ensure_ray

    src_opts = dict(
        source_storage_options if source_storage_options is not None else storage_options or {}
    )
    ds = open_dataset(uri, storage_options=storage_options)
    src = open_source(source, format=source_format, storage_options=src_opts)
    names = list(columns) if columns else [c for c in src.schema.names if c != on]
    if not names:
        raise LaionRayError(f"source {src.display} has no columns besides the key {on!r}")
    if len(set(names)) != len(names):
        raise LaionRayError(f"--columns names a column twice: {', '.join(names)}")
    key_type, types = plan_types(ds.schema, src, on, names, overwrite, cast)
    if unmatched_out and os.path.splitext(unmatched_out)[1].lower() not in (".parquet", ".csv"):
        raise LaionRayError(f"--unmatched-out must end in .parquet or .csv, got {unmatched_out!r}")
    producer = f"merge:{src.display}".encode()
    outputs = pa.schema(
        [pa.field(n, t).with_metadata({UDF_METADATA: producer}) for n, t in types.items()]
    )
    strategy = "broadcast" if src.size_bytes <= broadcast_max_bytes else "shuffle"
    local = choose_executor(
        executor,
        can_run_local=strategy == "broadcast",
        planned_rows=sum(f.metadata.physical_rows for f in ds.get_fragments()),
        # The lookup is light per row; what a local run must hold is the source.
        narrow=src.size_bytes <= LOCAL_SOURCE_MAX_BYTES,
        ray_attached=ray_attached(address),
    )
    report = MergeReport(uri, src.display, on, list(types), strategy, unmatched_out=unmatched_out)
    version = ds.version
    args = (report, ds, version, src, on, key_type, types, unmatched_out)
    if local:
        transform = validate_local(*args, storage_options)
    else:
        ensure_ray(address)
        try:
            if strategy == "broadcast":
                transform = validate_broadcast(*args, storage_options)
            else:
                transform = validate_shuffle(*args, num_partitions, workers, storage_options)
        except (ray.exceptions.RayError, RuntimeError, ValueError) as exc:
            raise (unwrap(exc) or exc) from exc
    log.info("%s", report.summary())
    job = Job(
        uri=uri,
        name=f"merge:{src.display}",
        identity=_identity(src, on, types),
        read_columns=[on],
        outputs=outputs,
        producers=[],
        transform=None if local else transform,
        local_transform=transform if local else None,
        overwrite=overwrite,
        details={
            "source": src.display,
            "source_identity": src.identity[:2000],
            "on": on,
            "strategy": strategy,
            "source_rows": report.source_rows,
            "unmatched_keys": report.unmatched_keys,
        },
    )
    try:
        report.job = run_job(
            job,
            tag=tag,
            unit_rows=unit_rows,
            commit_every_s=commit_every_s,
            checkpoint_uri=checkpoint_uri,
            storage_options=storage_options,
            address=address,
            executor="local" if local else "ray",
        )
    except (ray.exceptions.RayError, RuntimeError) as exc:
        raise (unwrap(exc) or exc) from exc
    if report_path:
        fs, path = filesystem(report_path, storage_options)
        with fs.open_output_stream(path) as f:
            f.write(json.dumps(report.to_dict(), indent=2, default=str).encode())
    return report
