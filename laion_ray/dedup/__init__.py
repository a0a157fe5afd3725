"""``dedup``: semantic near-duplicate groups of an embedding column, on Ray.

SemDeDup's recipe (arXiv 2303.09540) as a distributed job:

1. *partition*: k-means centroids are trained on a sample with the index
   build's trainer (``laion_ray.ivf.train_ivf``, cosine); every row goes to
   its nearest 2 partitions so that a pair straddling a boundary still meets
   in one of them;
2. *compare*: inside each partition, block-wise cosine similarity (a numpy
   matmul) finds every pair at or above ``threshold``. Memory per task is
   bounded by the partition size: partitions above ``max_partition_rows`` are
   cut into blocks and each block pair is its own cell;
3. *merge*: the pairs' connected components are merged across partitions;
   each component keeps one row and the others are its duplicates;
4. *write*: ``dup_group`` (int64, the key of the group's kept row) and
   ``is_duplicate`` (bool, true for every member but the kept one) are written
   by the engine (``laion_ray.engine.run``) as a lookup of step 3's per-fragment
   result files, with the same checkpoints, resume, commit path, history and
   tags as every other job. A row with no duplicate is its own group.

Which row is kept (``keep``):

- ``similarity`` (default): the highest ``similarity`` (the card's CLIP
  image-text cosine), so the best-captioned copy survives;
- ``largest``: the largest image (``width * height``);
- ``first``: the smallest key;
- any other numeric column: its highest value.

Ties, and nulls (ranked last), go to the smallest key.

``exact`` also groups byte-identical images: rows with the same ``md5``
are joined into the same components whatever their embeddings.

``where`` (the SQL of every command's ``--where``) limits the job to some
rows: only they are compared, with each other, and written; the other rows
keep their values.

Incremental: rerunning with the same settings after an append (columns
already present with this job's producer metadata) groups only the rows whose
``dup_group`` is still null. They are compared with every row of their
partitions, old ones included, but no pair of two old rows is computed and no
old row's values change: a new row that matches an old group joins it (the
smallest, if it bridges several) even if it would rank higher under ``keep``.
That costs one scan of the vectors to place the old rows in their partitions,
plus comparisons proportional to the new rows. ``overwrite`` regroups
everything from scratch.

Examples:
    >>> dedup("laion.lance", column="img_emb", threshold=0.95)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from laion_ray.cluster import cluster_capacity
from laion_ray.dedup.tasks import (
    Chunk,
    assign_chunk,
    chunks_of,
    compare_group,
    default_partitions,
    merge_components,
    params_hash,
    score_columns,
    train_plan,
)
from laion_ray.engine.commit import UDF_METADATA
from laion_ray.engine.error_log import checkpoint_root
from laion_ray.engine.failures import root_failure
from laion_ray.engine.plan import KEEP, ROWADDR, fragment_states
from laion_ray.engine.run import COMMIT_EVERY_S, Job, JobReport, classify_outputs, run_job
from laion_ray.engine.stages import MAX_RETRIES
from laion_ray.errors import LaionRayError
from laion_ray.filters import check_filter, sql_and, sql_any_null, to_lance_sql
from laion_ray.ivf import balanced_groups, sample_vectors, vector_dim
from laion_ray.storage import filesystem, join_uri, open_dataset, remove_tree
from laion_ray.udf import TASK_CPUS

log = logging.getLogger(__name__)

__all__ = ["KEEP_RULES", "DedupReport", "dedup"]

#: Named keep rules; any other numeric column name keeps its highest value.
KEEP_RULES = ("similarity", "largest", "first")
#: Mean rows per k-means partition (before the nearest-2 copy): the cost of a
#: row is the rows it is compared with, ~2 x 2 x this, whatever the table size.
PARTITION_ROWS = 2048
#: Most rows (copies included) one compare task holds: ~50 MiB of float32 at 768-d.
MAX_PARTITION_ROWS = 16384
#: Rows one assign task reads at once (~200 MiB of 768-d float32).
CHUNK_ROWS = 65536
OUTPUTS = ("dup_group", "is_duplicate")


@dataclasses.dataclass
class DedupReport:
    """What a dedup found and did; ``report_path`` gets it as JSON."""

    uri: str
    column: str
    threshold: float
    keep: str
    exact: bool
    incremental: bool = False
    rows: int = 0
    vectors: int = 0
    sample_rows: int = 0
    partitions: int = 0
    groups: int = 0
    chunks: int = 0
    max_task_rows: int = 0
    pairs: int = 0
    grouped_rows: int = 0
    duplicates: int = 0
    resumed: bool = False
    peak_task_rss_mb: dict[str, float] = dataclasses.field(default_factory=dict)
    timings_s: dict[str, float] = dataclasses.field(default_factory=dict)
    job: JobReport | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "job"}
        out["job"] = self.job.to_dict() if self.job else None
        return out

    def summary(self) -> str:
        mode = "incremental" if self.incremental else "full"
        head = (
            f"dedup {self.uri} {self.column} >= {self.threshold} (keep {self.keep}"
            + (", exact md5" if self.exact else "")
            + f", {mode}): {self.duplicates} duplicates in {self.grouped_rows} grouped rows; "
            f"{self.vectors} vectors in {self.partitions} partitions, {self.groups} compare "
            f"tasks (at most {self.max_task_rows} rows each), {self.pairs} pairs"
        )
        times = " ".join(f"{k}={v:.1f}s" for k, v in self.timings_s.items())
        return (
            head
            + (f"\ntimings: {times}" if times else "")
            + ("\n" + self.job.summary() if self.job else "")
        )


# --- the write-back lookup -------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _fragment_groups(path: str, storage_options: tuple) -> pa.Table | None:
    fs, fs_path = filesystem(path, dict(storage_options))
    try:
        with fs.open_input_file(fs_path) as f:
            return pa.ipc.open_file(f).read_all()
    except FileNotFoundError:
        return None


def lookup_groups(
    batch: pa.Table, *, groups_dir: str, covered: Sequence[int], storage_options: tuple
) -> pa.Table:
    """Engine stage: each row's ``dup_group`` and ``is_duplicate`` from its fragment's file.

    A row absent from the file has no duplicate: it is its own group. Rows of a
    fragment the grouping did not see (appended since) get ``_keep`` false and
    stay null for the next run.
    """
    if isinstance(batch, pa.RecordBatch):
        batch = pa.Table.from_batches([batch])
    addr = batch[ROWADDR].to_numpy().astype(np.uint64)
    keys = batch["key"].to_numpy(zero_copy_only=False)
    group = keys.astype(np.int64).copy()
    is_dup = np.zeros(len(addr), bool)
    fragments = (addr >> np.uint64(32)).astype(np.int64)
    keep = np.isin(fragments, np.asarray(covered, np.int64))
    for fid in np.unique(fragments[keep]):
        found = _fragment_groups(join_uri(groups_dir, f"{fid}.arrow"), storage_options)
        if found is None:
            continue
        known = found["_rowaddr"].to_numpy()
        rows = np.flatnonzero(fragments == fid)
        pos = np.minimum(np.searchsorted(known, addr[rows]), len(known) - 1)
        hit = known[pos] == addr[rows]
        group[rows[hit]] = found["dup_group"].to_numpy()[pos[hit]]
        is_dup[rows[hit]] = found["is_duplicate"].to_numpy(zero_copy_only=False)[pos[hit]]
    return (
        batch.append_column("dup_group", pa.array(group, pa.int64()))
        .append_column("is_duplicate", pa.array(is_dup))
        .append_column(KEEP, pa.array(keep))
    )


# --- dedup ---------------------------------------------------------------------------


def _validate(ds, column, threshold, keep, exact, partitions, max_partition_rows) -> None:
    vector_dim(ds, column)
    if not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise LaionRayError(f"--threshold must be in (0, 1], got {threshold!r}")
    if "key" not in ds.schema.names or not pa.types.is_integer(ds.schema.field("key").type):
        raise LaionRayError(f"{ds.uri} needs an integer 'key' column: dup_group holds keys")
    for name in score_columns(keep):
        if name not in ds.schema.names:
            rules = ", ".join(KEEP_RULES)
            raise LaionRayError(
                f"--keep {keep!r}: no column {name!r} in {ds.uri} (rules: {rules}, "
                "or a numeric column)"
            )
        t = ds.schema.field(name).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
            raise LaionRayError(f"--keep {keep!r}: column {name!r} is {t}, not numeric")
    if exact and "md5" not in ds.schema.names:
        raise LaionRayError(f"--exact needs an 'md5' column; {ds.uri} has none")
    for flag, v in (("--partitions", partitions), ("--max-partition-rows", max_partition_rows)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise LaionRayError(f"{flag} must be a positive integer, got {v!r}")
    if max_partition_rows < 2:
        raise LaionRayError(f"--max-partition-rows must be >= 2, got {max_partition_rows}")


def _load_done(path: str, ds, read_columns, opts) -> dict | None:
    """The finished grouping of an earlier (crashed) run, if its inputs are unchanged."""
    fs, fs_path = filesystem(path, opts)
    try:
        with fs.open_input_file(fs_path) as f:
            done = json.loads(f.read())
    except (FileNotFoundError, OSError):
        return None
    current = {s.fragment_id: s for s in fragment_states(ds, read_columns)}
    for fid, rows, files in done["states"]:
        state = current.get(fid)
        if state is None or state.physical_rows != rows or list(state.input_files) != files:
            return None
    return done


def dedup(
    uri: str,
    *,
    column: str = "img_emb",
    threshold: float = 0.95,
    keep: str = "similarity",
    exact: bool = False,
    where: str | None = None,
    overwrite: bool = False,
    partitions: int | None = None,
    max_partition_rows: int = MAX_PARTITION_ROWS,
    sample_rate: int = 64,
    num_workers: int | None = None,
    tag: str | None = None,
    unit_rows: int | None = None,
    checkpoint_uri: str | None = None,
    report_path: str | None = None,
    storage_options: Mapping[str, str] | None = None,
    address: str | None = None,
    commit_every_s: float = COMMIT_EVERY_S,
) -> DedupReport:
    """Group near-duplicate rows of ``uri`` by the cosine of ``column``; write the groups.

    Args:
        uri: Lance dataset with an integer ``key`` and a vector column.
        column: Fixed-size float-list column (e.g. ``img_emb``).
        threshold: Rows with cosine >= this are duplicates (transitively).
        keep: Which row of a group is kept: ``similarity``, ``largest``,
            ``first`` or a numeric column (highest value); see the module doc.
        exact: Also group rows with the same ``md5`` (byte-identical images).
        where: SQL filter (:mod:`laion_ray.filters`, e.g. ``'"NSFW" = 0'``): only
            these rows are grouped, compared with each other only; the other
            rows keep their values (null when the columns are new).
        overwrite: Regroup every row, replacing existing ``dup_group`` /
            ``is_duplicate`` (needed when the settings changed).
        partitions: k-means partitions (default: rows / ``PARTITION_ROWS``).
        max_partition_rows: Most rows one compare task holds; larger
            partitions are split into block pairs.
        sample_rate: k-means training rows per partition.
        num_workers: Parallel sample scans (default: the cluster's CPUs).
        tag: Tag the resulting version.
        unit_rows: Rows per engine work unit (checkpoint granularity).
        checkpoint_uri: Where checkpoints and scratch files live
            (default ``<uri>/_laion_ray``).
        report_path: Write the report as JSON here.
        storage_options: Object-store options.
        address: Ray cluster address.
        commit_every_s: Commit finished fragments at least this often.

    Returns:
        A :class:`DedupReport`.

    Examples:
        >>> dedup("laion.lance", threshold=0.95, keep="largest", exact=True)  # doctest: +SKIP
    """
    import ray

    from laion_ray.ray_env import ensure_ray

    ds = open_dataset(uri, storage_options=storage_options)
    _validate(ds, column, threshold, keep, exact, partitions, max_partition_rows)
    given_where, where = where, to_lance_sql(where)
    check_filter(ds, where, given=given_where)
    if not isinstance(sample_rate, int) or sample_rate < 2:
        raise LaionRayError(f"--sample-rate must be an integer >= 2, got {sample_rate!r}")
    settings = {"column": column, "threshold": threshold, "keep": keep, "exact": exact}
    producer = "dedup:" + json.dumps(settings, sort_keys=True)
    outputs = pa.schema(
        [
            pa.field("dup_group", pa.int64()).with_metadata({UDF_METADATA: producer}),
            pa.field("is_duplicate", pa.bool_()).with_metadata({UDF_METADATA: producer}),
        ]
    )
    _, _, incremental = classify_outputs(ds, outputs, overwrite=overwrite)
    incremental = bool(incremental)
    opts = dict(storage_options or {})
    report = DedupReport(uri, column, threshold, keep, exact, incremental=incremental)
    scratch = join_uri(
        checkpoint_root(uri, checkpoint_uri),
        "dedup",
        params_hash(
            {
                **settings,
                "where": where,
                "overwrite": overwrite,
                "partitions": partitions,
                "max_partition_rows": max_partition_rows,
            }
        ),  # fmt: skip
    )
    read_columns = ["key", column, *score_columns(keep), *(["md5"] if exact else [])]
    if incremental and not ds.count_rows(filter=sql_and(where, sql_any_null(OUTPUTS))):
        log.info("every row of %s is grouped already", uri)
        return report
    ensure_ray(address)
    done = _load_done(join_uri(scratch, "done.json"), ds, read_columns, opts)
    report.resumed = done is not None
    if done is None:
        done = _group(ds, report, scratch, read_columns, partitions, max_partition_rows,
                      sample_rate, num_workers, opts, where)  # fmt: skip
    else:
        log.info("resuming dedup from its finished grouping in %s", scratch)
    for name, value in done["facts"].items():
        setattr(report, name, value)
    log.info("%s", report.summary())

    groups_dir = join_uri(scratch, "groups")
    covered = [fid for fid, _, _ in done["states"]]

    def transform(data):
        return data.map_batches(
            lookup_groups,
            fn_kwargs={
                "groups_dir": groups_dir,
                "covered": covered,
                "storage_options": tuple(sorted(opts.items())),
            },  # fmt: skip
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=TASK_CPUS,  # like the read and the part writes: one fused task
            max_retries=MAX_RETRIES,
        )

    job = Job(
        uri=uri,
        name="dedup",
        identity=f"{producer}@{done['version']}:{scratch}",
        read_columns=["key"],
        outputs=outputs,
        producers=[],
        transform=transform,
        where=where,
        overwrite=overwrite,
        details={
            **settings,
            "where": where,
            "duplicates": report.duplicates,
            "groups": report.groups,
            "incremental": incremental,
        },  # fmt: skip
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
            executor="ray",
        )
    except ray.exceptions.RayError as exc:
        # A task's own error keeps its class: a store that failed inside the
        # write-back is a failed job (exit 1), not bad input.
        raise root_failure(exc, "dedup") from exc
    remove_tree(scratch, opts)
    if report_path:
        fs, path = filesystem(report_path, opts)
        with fs.open_output_stream(path) as f:
            f.write(json.dumps(report.to_dict(), indent=2, default=str).encode())
    return report


def _group(ds, report, scratch, read_columns, partitions, max_rows, sample_rate, workers, opts,
           where=None):  # fmt: skip
    """Steps 1-3 on Ray; writes ``groups/<fragment>.arrow`` and ``done.json`` under ``scratch``.

    The partitions are planned (and trained) on all rows, a ``where`` or not: an
    estimate from all rows can only over-split, never overfill a compare task.
    Only the rows that pass ``where`` are assigned, so only they are compared.
    """
    import ray

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    remove_tree(scratch, opts)  # a half-written grouping of a crashed run
    column, keep, exact = report.column, report.keep, report.exact
    version = ds.version
    states = fragment_states(ds, read_columns)
    frags = [(f.fragment_id, f.count_rows()) for f in ds.get_fragments()]
    rows = sum(r for _, r in frags)
    report.rows = rows
    remote = lambda fn, cpus=1: ray.remote(num_cpus=cpus, max_retries=MAX_RETRIES)(fn)  # noqa: E731

    # 1. Sample in parallel (the index build's sampler), train and plan on a worker.
    parts = partitions or default_partitions(rows, PARTITION_ROWS)
    # Sized from the cluster (nodes the autoscaler can add included), never the driver.
    capacity = cluster_capacity()
    workers = capacity.worker_count(workers)
    n_train = min(rows, parts * sample_rate)
    none = np.empty(0, np.int64)
    picks = {fid: (round(n_train * r / rows) if rows else 0, none) for fid, r in frags}
    samples = [
        remote(sample_vectors, 0.5).options(num_returns=5)
        .remote(ds.uri, version, opts, column, {f: picks[f] for f in g}, 0)
        for g in balanced_groups(frags, workers)
    ]  # fmt: skip
    nan_rows = sum(ray.get([s[3] for s in samples]))
    report.sample_rows = sum(ray.get([s[4] for s in samples]))
    report.vectors = rows - nan_rows
    if not report.sample_rows:
        raise LaionRayError(f"no valid vectors in {column!r} of {ds.uri}: nothing to compare")
    if report.sample_rows < parts:
        parts = max(1, report.sample_rows)
    report.partitions = parts
    use_gpu = capacity.gpus >= 1
    plan, n_groups = (
        remote(train_plan)
        .options(num_gpus=1 if use_gpu else 0, num_returns=2)
        .remote([s[0] for s in samples], parts, sample_rate, report.vectors, max_rows, use_gpu)
    )
    report.groups = n_groups = ray.get(n_groups)
    timings["train"] = time.perf_counter() - t0

    # 2. Assign every row to its cells (a shuffle through files), compare per group.
    chunks: list[Chunk] = chunks_of(frags, CHUNK_ROWS)
    report.chunks = len(chunks)
    incremental = report.incremental
    facts = ray.get([
        remote(assign_chunk).remote(ds.uri, version, opts, c, column, keep, exact,
                                    incremental, plan, scratch, where)
        for c in chunks
    ])  # fmt: skip
    timings["assign"] = time.perf_counter() - t0 - sum(timings.values())
    names = [f"{c.index:08d}.arrow" for c in chunks if facts[c.index]["rows"]]
    vec_paths = [join_uri(scratch, "vec", n) for n in names]
    md5_paths = [join_uri(scratch, "md5", n) for n in names] if exact else []
    compare = remote(compare_group).options(num_returns=2)
    results = [
        compare.remote(g, vec_paths, md5_paths, report.threshold, opts) for g in range(n_groups)
    ]
    group_facts = ray.get([r[1] for r in results])
    report.max_task_rows = max((f["rows"] for f in group_facts), default=0)
    report.pairs = sum(f["pairs"] for f in group_facts)
    rss = report.peak_task_rss_mb
    rss["assign"] = max((f["rss_mb"] for f in facts), default=0.0)
    rss["compare"] = max((f["rss_mb"] for f in group_facts), default=0.0)
    timings["compare"] = time.perf_counter() - t0 - sum(timings.values())

    # 3. Components across groups, written per fragment.
    merged = ray.get(remote(merge_components).remote(scratch, opts, *[r[0] for r in results]))
    report.grouped_rows, report.duplicates = merged["grouped_rows"], merged["duplicates"]
    rss["merge"] = merged["rss_mb"]
    for sub in ("vec", "md5"):
        remove_tree(join_uri(scratch, sub), opts)
    timings["merge"] = time.perf_counter() - t0 - sum(timings.values())
    report.timings_s = {k: round(v, 2) for k, v in timings.items()}
    fact_names = ("rows", "vectors", "sample_rows", "partitions", "groups", "chunks",
                  "max_task_rows", "pairs", "grouped_rows", "duplicates", "timings_s",
                  "peak_task_rss_mb")  # fmt: skip
    done = {
        "version": version,
        "states": [[s.fragment_id, s.physical_rows, list(s.input_files)] for s in states],
        "facts": {k: getattr(report, k) for k in fact_names},
    }
    fs, path = filesystem(join_uri(scratch, "done.json"), opts)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(done).encode())
    return done
