"""Distributed IVF_PQ rebuild: plan -> sample -> train -> build -> merge -> verify -> commit.

Every heavy step runs in Ray tasks that receive the URI, a pinned version and
fragment ids. The driver only holds the plan, the trained model (centroids and
codebook), a few hundred query vectors and ``Index`` metadata.

The new index is built under the *same name* as the one it replaces and is
first committed as a detached version: recall is measured there while readers
of the main history keep using the old index. The gate judges recall@10 at
stated search settings (``gate_nprobes``, ``gate_refine_factor``: by default
the dataset card's query, ``nprobes=16, refine_factor=30``, which ``laion-ray
search`` uses too), so it judges what users will run. Only if it passes is one
``CreateIndex`` (new segment in, old segments out) committed, so the swap is a
single atomic manifest change. It goes through the engine's one commit path
(:func:`laion_ray.engine.commit.commit`): derived at the newest version, with
the same retries, job properties and tag semantics as a backfill.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from laion_ray import recall as rc
from laion_ray.engine.commit import NotRebaseable, column_files, commit, field_ids, tag_version
from laion_ray.errors import LaionRayError
from laion_ray.ivf import balanced_groups, sample_vectors, train_ivf, vector_dim
from laion_ray.storage import (
    is_local,
    join_uri,
    open_dataset,
    remove_tree,
    resolve_storage_options,
)

log = logging.getLogger(__name__)

METRICS = ("l2", "cosine", "dot")
PQ_CODES = 256  # 8-bit PQ: every sub-quantizer has 256 centroids
NUM_QUERIES = 100
JOB = "reindex"


@dataclass
class ReindexReport:
    """What a rebuild did, what it measured and whether it swapped the index in."""

    uri: str
    column: str
    index_name: str
    metric: str
    partitions: int
    sub_vectors: int
    rows: int
    nan_rows: int
    sample_rows: int
    segments: int
    num_workers: int
    read_version: int
    committed_version: int | None = None
    swapped: bool = False
    replaced: list[str] = field(default_factory=list)
    new_index_uuid: str = ""
    recall_at_10: float = 0.0
    min_recall: float | None = None
    gate_nprobes: int = rc.SEARCH_NPROBES
    gate_refine_factor: int | None = rc.SEARCH_REFINE_FACTOR
    grid: list[dict] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    tag: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """Human-readable report: parameters, recall table, outcome."""
        head = (
            f"{self.uri} {self.column}: IVF_PQ partitions={self.partitions} "
            f"sub_vectors={self.sub_vectors} metric={self.metric}; {self.rows} rows "
            f"({self.nan_rows} NaN/null excluded), {self.sample_rows} sampled, "
            f"{self.segments} segments merged"
        )
        points = [rc.RecallPoint(**p) for p in self.grid]
        gate = (self.gate_nprobes, self.gate_refine_factor)
        judged = f"recall@10 {self.recall_at_10:.3f} at the gate ({rc.setting(*gate)})"
        if self.swapped:
            bar = "" if self.min_recall is None else f" >= --min-recall {self.min_recall}"
            outcome = (
                f"swapped in index {self.index_name!r} at version {self.committed_version}: "
                f"{judged}{bar}"
            )
        else:
            outcome = f"NOT swapped: {judged} < --min-recall {self.min_recall}; the old index stays"
        times = " ".join(f"{k}={v:.1f}s" for k, v in self.timings_s.items())
        table = rc.format_table(points, gate=gate)
        return "\n".join([head, table, outcome, f"timings: {times}"])


def default_sub_vectors(dim: int) -> int:
    """dim/16 (Lance's choice, 16-d sub-vectors), else the largest divisor giving >= 8-d."""
    if dim % 16 == 0:
        return dim // 16
    return max(d for d in range(1, dim + 1) if dim % d == 0 and dim // d >= min(8, dim))


def _train_task(sample_refs, partitions, sub_vectors, metric, sample_rate, use_gpu):
    """Train IVF centroids and the PQ codebook with Lance's own trainers.

    The sample is written to a scratch Lance dataset on the worker so training
    is the exact algorithm single-node ``create_index`` runs, on the GPU
    (Lance's ``accelerator``) when this task was given one.
    """
    import ray

    sample = np.concatenate([s for s in ray.get(list(sample_refs)) if len(s)])
    with tempfile.TemporaryDirectory() as tmp:
        builder, ivf = train_ivf(sample, partitions, metric, sample_rate, use_gpu, tmp)
        pq = builder.train_pq(
            ivf, sub_vectors, sample_rate=max(2, min(sample_rate, len(sample) // PQ_CODES))
        )
    return ivf.centroids, pq.codebook


def _build_task(
    uri, version, storage_options, column, name, metric, p, m, centroids, codebook, fids
):
    """Build one uncommitted index segment over ``fids`` with the shared model."""
    import lance

    ds = lance.dataset(uri, version=version, storage_options=dict(storage_options or {}))
    return ds.create_index_uncommitted(
        column, "IVF_PQ", name=name, replace=True, metric=metric, num_partitions=p,
        num_sub_vectors=m, ivf_centroids=centroids, pq_codebook=codebook,
        fragment_ids=list(fids), storage_options=dict(storage_options or {}) or None,
    )  # fmt: skip


def _merge_task(uri, version, storage_options, segments):
    """Merge segments into one (so queries probe one index), then drop the parts."""
    import lance

    ds = lance.dataset(uri, version=version, storage_options=dict(storage_options or {}))
    merged = ds.merge_existing_index_segments(list(segments)) if len(segments) > 1 else segments[0]
    for seg in segments:
        if seg.uuid != merged.uuid:  # never referenced by any manifest
            remove_tree(join_uri(uri, "_indices", seg.uuid), storage_options)
    return merged


def _swap_operation(latest, built_on, column: str, name: str, merged):
    """``CreateIndex`` of ``merged`` at ``latest``, replacing that version's ``name`` segments.

    The index holds the vectors of ``built_on``: if another writer since
    replaced the column's values in, or rewrote, a fragment it covers, it
    would answer with stale vectors, so the swap is refused.
    """
    from lance.dataset import Index, LanceOperation

    ids = field_ids(built_on, [column])
    for fragment_id in merged.fragment_ids:
        before, now = built_on.get_fragment(fragment_id), latest.get_fragment(fragment_id)
        if now is None or (now.metadata.physical_rows, column_files(now, ids)) != (
            before.metadata.physical_rows,
            column_files(before, ids),
        ):
            raise NotRebaseable(
                f"fragment {fragment_id} of {latest.uri}: {column!r} was rewritten by another "
                "writer while the index was built; rerun the rebuild"
            )
    removed = [
        Index(uuid=s.uuid, name=i.name, fields=list(i.fields), fragment_ids=s.fragment_ids,
              dataset_version=s.dataset_version_at_last_update, index_version=s.index_version)
        for i in latest.describe_indices() if i.name == name for s in i.segments
    ]  # fmt: skip
    return LanceOperation.CreateIndex(new_indices=[merged], removed_indices=removed)


def _validate(partitions, sub_vectors, metric, sample_rate, min_recall, num_workers, tag,
              gate_nprobes, gate_refine_factor):  # fmt: skip
    if metric not in METRICS:
        raise LaionRayError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    for flag, v in (("--partitions", partitions), ("--sub-vectors", sub_vectors),
                    ("--num-workers", num_workers)):  # fmt: skip
        if v is not None and (not isinstance(v, int) or v < 1):
            raise LaionRayError(f"{flag} must be a positive integer, got {v!r}")
    if not isinstance(sample_rate, int) or sample_rate < 2:
        raise LaionRayError(f"--sample-rate must be an integer >= 2, got {sample_rate!r}")
    if min_recall is not None and not 0.0 <= min_recall <= 1.0:
        raise LaionRayError(f"--min-recall must be within [0, 1], got {min_recall!r}")
    if not isinstance(gate_nprobes, int) or gate_nprobes < 1:
        raise LaionRayError(f"--gate-nprobes must be a positive integer, got {gate_nprobes!r}")
    if gate_refine_factor is not None and (
        not isinstance(gate_refine_factor, int) or gate_refine_factor < 1
    ):
        raise LaionRayError(
            f"--gate-refine-factor must be a positive integer (0 on the command line: no "
            f"refine), got {gate_refine_factor!r}"
        )
    if tag is not None and not str(tag).strip():
        raise LaionRayError(f"--tag must be a non-empty name, got {tag!r}")


def reindex(
    uri: str,
    *,
    column: str = "img_emb",
    partitions: int | None = None,
    sub_vectors: int | None = None,
    metric: str = "l2",
    sample_rate: int = 256,
    min_recall: float | None = None,
    gate_nprobes: int = rc.SEARCH_NPROBES,
    gate_refine_factor: int | None = rc.SEARCH_REFINE_FACTOR,
    tag: str | None = None,
    num_workers: int | None = None,
    storage_options: Mapping[str, str] | None = None,
    report_path: str | None = None,
    plot_path: str | None = None,
) -> ReindexReport:
    """Rebuild the IVF_PQ index on ``column`` with Ray and swap it in atomically.

    Args:
        uri: Lance dataset URI.
        column: Fixed-size float-list column to index.
        partitions: IVF partitions; default ``round(sqrt(rows))``.
        sub_vectors: PQ sub-vectors; must divide the dimension; default ``dim/16``.
        metric: ``l2``, ``cosine`` or ``dot``.
        sample_rate: Training rows per centroid, as in Lance's ``create_index``.
        min_recall: If recall@10 at the gate's search settings is below this,
            the new index is not committed and the old one stays.
        gate_nprobes, gate_refine_factor: The search settings the gate measures
            recall@10 at (``None``: no refine). The defaults are the dataset
            card's query and ``laion-ray search``'s: ``nprobes=16, refine_factor=30``.
        tag: Tag the committed version with this name.
        num_workers: Fragment groups built in parallel; default: the cluster's
            CPUs, autoscalable nodes included (:mod:`laion_ray.cluster`).
        storage_options: Object-store options for Lance.
        report_path: Write the report as JSON here.
        plot_path: Write the recall-latency PNG here.

    Returns:
        The report; ``report.swapped`` says whether the new index is live.

    Examples:
        >>> reindex("./laion.lance", partitions=256, min_recall=0.9)  # doctest: +SKIP
    """
    import ray

    from laion_ray.cluster import cluster_capacity
    from laion_ray.ray_env import ensure_ray

    _validate(partitions, sub_vectors, metric, sample_rate, min_recall, num_workers, tag,
              gate_nprobes, gate_refine_factor)  # fmt: skip
    if is_local(uri) and "://" not in uri:
        # Ray tasks open the URI in their own working directory, which is the
        # raylet's (`ray start` somewhere else), not necessarily this one.
        uri = os.path.abspath(uri)
    opts = resolve_storage_options(storage_options)
    ds = open_dataset(uri, storage_options=opts)
    dim = vector_dim(ds, column)
    frags = [(f.fragment_id, f.count_rows()) for f in ds.get_fragments()]
    rows = sum(r for _, r in frags)
    partitions = partitions or max(1, round(math.sqrt(rows)))
    sub_vectors = sub_vectors or default_sub_vectors(dim)
    if dim % sub_vectors:
        raise LaionRayError(f"--sub-vectors {sub_vectors} does not divide dimension {dim}")
    if rows < max(2 * PQ_CODES, 2 * partitions):
        raise LaionRayError(
            f"too few rows to train: {rows} rows in {column!r}; IVF_PQ with {partitions} "
            f"partitions needs at least {max(2 * PQ_CODES, 2 * partitions)}"
        )
    ensure_ray()
    capacity = cluster_capacity()  # autoscalable nodes count: a 0-CPU head is not the cluster
    num_workers = capacity.worker_count(num_workers)
    groups = balanced_groups(frags, num_workers)
    version, timings, t0 = ds.version, {}, time.perf_counter()
    old = [i for i in ds.describe_indices() if list(i.field_names) == [column]]
    name = old[0].name if old else f"{column}_idx"
    remote = lambda fn, cpus=0.5: ray.remote(num_cpus=cpus, max_retries=1)(fn)  # noqa: E731

    # Sample: training quota proportional to fragment size; query rows held out.
    rng = np.random.default_rng(0)
    n_train = min(rows, max(partitions, PQ_CODES) * sample_rate)
    qpos = np.sort(rng.choice(rows, size=min(NUM_QUERIES, rows // 10), replace=False))
    starts = np.cumsum([0] + [r for _, r in frags])
    picks = {
        fid: (round(n_train * r / rows), qpos[(qpos >= s) & (qpos < s + r)] - s)
        for (fid, r), s in zip(frags, starts[:-1], strict=True)
    }
    parts = [
        remote(sample_vectors)
        .options(num_returns=5)
        .remote(uri, version, opts, column, {f: picks[f] for f in g}, 0)
        for g in groups
    ]
    nan_rows = sum(ray.get([p[3] for p in parts]))
    queries = np.concatenate(ray.get([p[1] for p in parts]))
    qids = np.concatenate(ray.get([p[2] for p in parts]))
    sample_rows = sum(ray.get([p[4] for p in parts]))
    if nan_rows:
        log.warning("%d rows of %r are NaN or null: excluded from training", nan_rows, column)
    if rows - nan_rows < max(2 * PQ_CODES, 2 * partitions):
        raise LaionRayError(
            f"too few valid vectors to train: {rows - nan_rows} of {rows} rows in {column!r} "
            f"are not NaN/null; need {max(2 * PQ_CODES, 2 * partitions)}"
        )
    timings["sample"] = time.perf_counter() - t0

    # Train on one worker (GPU if the cluster has one), then build segments.
    use_gpu = capacity.gpus >= 1
    train = remote(_train_task, 1).options(num_gpus=1 if use_gpu else 0, num_returns=2)
    cref, bref = train.remote([p[0] for p in parts], partitions, sub_vectors, metric,
                              sample_rate, use_gpu)  # fmt: skip
    ray.wait([cref, bref], num_returns=2)
    timings["train"] = time.perf_counter() - t0 - sum(timings.values())
    segs = ray.get([
        remote(_build_task).remote(uri, version, opts, column, name, metric, partitions,
                                   sub_vectors, cref, bref, g)
        for g in groups
    ])  # fmt: skip
    merged = ray.get(remote(_merge_task, 1).remote(uri, version, opts, segs))
    timings["build"] = time.perf_counter() - t0 - sum(timings.values())

    # Stage as a detached version: readers of the main history still see the old index.
    # It is never part of that history, so it does not go through the commit path.
    from lance import LanceDataset
    from lance.dataset import Index, LanceOperation, Transaction

    removed = [
        Index(uuid=s.uuid, name=i.name, fields=list(i.fields), fragment_ids=s.fragment_ids,
              dataset_version=s.dataset_version_at_last_update, index_version=s.index_version)
        for i in old for s in i.segments
    ]  # fmt: skip
    op = LanceOperation.CreateIndex(new_indices=[merged], removed_indices=removed)
    staged = LanceDataset.commit(uri, Transaction(version, op), storage_options=opts, detached=True)
    truth = rc.exact_neighbours(uri, version, opts, column, groups, queries, qids, 10, metric)
    nprobes_grid, refine_grid = rc.gate_grid(gate_nprobes, gate_refine_factor)
    points = rc.recall_grid(staged, column, queries, qids, truth, k=10,
                            nprobes_grid=nprobes_grid, refine_grid=refine_grid)  # fmt: skip
    timings["verify"] = time.perf_counter() - t0 - sum(timings.values())

    report = ReindexReport(
        uri=uri, column=column, index_name=name, metric=metric, partitions=partitions,
        sub_vectors=sub_vectors, rows=rows, nan_rows=nan_rows, sample_rows=sample_rows,
        segments=len(segs), num_workers=num_workers, read_version=version,
        replaced=[r.uuid for r in removed], new_index_uuid=merged.uuid,
        recall_at_10=rc.recall_at(points, gate_nprobes, gate_refine_factor), min_recall=min_recall,
        gate_nprobes=gate_nprobes, gate_refine_factor=gate_refine_factor,
        grid=rc.points_as_dicts(points), tag=tag,
    )  # fmt: skip
    if min_recall is None or report.recall_at_10 >= min_recall:
        details = {
            k: v
            for k, v in report.to_dict().items()
            if k not in ("grid", "uri", "committed_version", "swapped", "timings_s")
        }
        new_ds = commit(
            uri,
            lambda latest: _swap_operation(latest, ds, column, name, merged),
            job=JOB,
            details=details,
            storage_options=opts,
        )
        report.committed_version, report.swapped = new_ds.version, True
        if tag:
            tag_version(uri, tag, new_ds.version, storage_options=opts)
        log.info("committed %s as version %d", name, new_ds.version)
    else:
        # Only the throwaway detached version references the rejected index.
        remove_tree(join_uri(uri, "_indices", merged.uuid), opts)
        log.warning(
            "recall@10 %.3f at %s < %s: old index kept",
            report.recall_at_10, rc.setting(gate_nprobes, gate_refine_factor), min_recall,
        )  # fmt: skip
    timings["commit"] = time.perf_counter() - t0 - sum(timings.values())
    report.timings_s = {k: round(v, 3) for k, v in timings.items()}
    if report_path:
        rc.write_json(report_path, report.to_dict())
    if plot_path:
        rc.write_plot(plot_path, points, title=f"{name} on {column}",
                      gate=(gate_nprobes, gate_refine_factor), min_recall=min_recall)  # fmt: skip
    return report
