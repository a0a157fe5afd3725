"""``laion-ray`` command line. Each subcommand maps onto one library call.

Heavy modules (ray, torch, open_clip) are imported inside the handlers so that
``laion-ray --help`` and ``laion-ray info`` start fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence

from laion_ray.errors import JobFailed, LaionRayError, SystemicError, brief

Handler = Callable[[argparse.Namespace], int | None]
# Every --where speaks the same SQL (laion_ray.filters); its help says so once.
WHERE_SYNTAX = "\"Col\" and `Col` name a column, 'text' is a string"
_COMMANDS: list[tuple[str, str, str, Callable[[argparse.ArgumentParser], None], Handler]] = []


def command(name: str, *, help: str, example: str):
    """Register ``handler`` as subcommand ``name``; ``configure`` adds its flags."""

    def wrap(configure: Callable[[argparse.ArgumentParser], None]):
        def bind(handler: Handler) -> Handler:
            _COMMANDS.append((name, help, example, configure, handler))
            return handler

        return bind

    return wrap


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        command = self.prog.removeprefix("laion-ray").strip()
        raise LaionRayError(f"{command}: {message}" if command else message)


def _storage_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="object-store option passed to Lance (repeatable); AWS_* env vars are read too",
    )


def _ray_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", help="Ray cluster to attach to (default: $RAY_ADDRESS, else local Ray)"
    )


def _job_flags(parser: argparse.ArgumentParser, *, auto: str) -> None:
    """Flags of every engine job (backfill, merge): checkpoints, report, executor, Ray, storage."""
    from laion_ray.engine.run import COMMIT_EVERY_S

    parser.add_argument("--unit-rows", type=int, help="rows per work unit (checkpoint granularity)")
    parser.add_argument("--commit-every", type=float, default=COMMIT_EVERY_S, metavar="SECONDS")
    parser.add_argument(
        "--checkpoint-uri", help="where checkpoints/errors live (default URI/_laion_ray)"
    )
    parser.add_argument("--report", metavar="FILE", help="write the report as JSON")
    parser.add_argument(
        "--executor",
        choices=["auto", "ray", "local"],
        default="auto",
        help=f"{auto}, the rest on Ray",
    )
    _ray_flags(parser)
    _storage_flags(parser)


def _storage(args: argparse.Namespace) -> dict[str, str]:
    from laion_ray.storage import parse_storage_options

    return parse_storage_options(args.storage_option)


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


# --- sample -----------------------------------------------------------------


@command(
    "sample",
    help="write a LAION-shaped Lance dataset with real JPEGs",
    example=(
        "laion-ray sample ./laion.lance --rows 10000 --fragments 8 --bad-fraction 0.01 "
        "--duplicates 0.1"
    ),
)
def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="dataset URI to create (must not exist)")
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--fragments", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bad-fraction", type=float, default=0.0, help="share of corrupt images")
    p.add_argument(
        "--duplicates",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="share of rows made near-duplicates (copied, re-encoded, resized or cropped "
        "images of other rows); the true groups go to --report",
    )
    p.add_argument("--report", metavar="FILE", help="write the report (bad keys, groups) as JSON")
    _storage_flags(p)


@_sample_args
def _sample(args: argparse.Namespace) -> None:
    from laion_ray.sample import write_sample

    report = write_sample(
        args.out,
        rows=args.rows,
        fragments=args.fragments,
        seed=args.seed,
        bad_fraction=args.bad_fraction,
        duplicates=args.duplicates,
        storage_options=_storage(args),
    )
    if args.report:
        import dataclasses

        with open(args.report, "w") as f:
            json.dump(dataclasses.asdict(report), f, indent=2)
    print(report.summary())


# --- info -------------------------------------------------------------------


@command(
    "info",
    help="show rows, fragments, schema, versions, tags and indices",
    example="laion-ray info ./laion.lance --json",
)
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _storage_flags(p)


@_info_args
def _info(args: argparse.Namespace) -> None:
    from laion_ray.info import dataset_info, format_info

    info = dataset_info(args.uri, storage_options=_storage(args))
    if args.json:
        _print_json(info)
    else:
        print(format_info(info))


# --- more subcommands are registered below this line ------------------------


# --- merge (laion_ray.merge) --------------------------------------------------


@command(
    "merge",
    help="attach or update columns from a Parquet/CSV/JSONL/Lance table, joined on a key",
    example=(
        "laion-ray merge ./laion.lance --from labels.parquet --on key --columns aesthetic "
        "--unmatched-out unmatched.csv --tag labels-v1"
    ),
)
def _merge_args(p: argparse.ArgumentParser) -> None:
    from laion_ray.merge import BROADCAST_MAX_BYTES, FORMATS

    p.add_argument("uri")
    p.add_argument(
        "--from",
        dest="source",
        action="append",
        required=True,
        metavar="SOURCE",
        help="file, directory, glob or .lance dataset (local or s3://); repeatable",
    )
    p.add_argument("--on", default="key", help="key column in both tables (default key)")
    p.add_argument("--columns", help="comma-separated source columns (default: all but the key)")
    p.add_argument(
        "--overwrite", action="store_true", help="update existing columns (matched rows only)"
    )
    p.add_argument(
        "--cast",
        action="store_true",
        help="allow safe casts (int32->int64, '12'->12) of key/columns",
    )
    p.add_argument("--tag", help="tag the resulting version")
    p.add_argument(
        "--unmatched-out", metavar="FILE", help="write unmatched source keys (.parquet/.csv)"
    )
    p.add_argument("--format", choices=FORMATS, help="source format (default: by extension)")
    p.add_argument(
        "--broadcast-max-bytes",
        type=int,
        default=BROADCAST_MAX_BYTES,
        help="sources up to this size are broadcast, larger ones joined by a shuffle",
    )
    p.add_argument("--num-partitions", type=int, help="buckets of the shuffle join")
    p.add_argument(
        "--workers",
        type=int,
        help="parallel tasks to size the shuffle for (default: the cluster's CPUs)",
    )
    p.add_argument(
        "--source-storage-option",
        action="append",
        metavar="KEY=VALUE",
        default=None,
        help="object-store option for the source (default: the --storage-option values)",
    )
    _job_flags(p, auto="auto: small broadcast merges run in-process when no Ray is running")


@_merge_args
def _merge(args: argparse.Namespace) -> None:
    from laion_ray.merge import merge
    from laion_ray.storage import parse_storage_options

    report = merge(
        args.uri,
        source=args.source,
        on=args.on,
        columns=[c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None,
        overwrite=args.overwrite,
        cast=args.cast,
        tag=args.tag,
        unmatched_out=args.unmatched_out,
        source_format=args.format,
        storage_options=_storage(args),
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
        workers=args.workers,
        commit_every_s=args.commit_every,
        executor=args.executor,
    )
    print(report.summary())


# --- dedup (laion_ray.dedup) ------------------------------------------------


@command(
    "dedup",
    help="group near-duplicate rows by embedding cosine on Ray; writes dup_group, is_duplicate",
    example="laion-ray dedup ./laion.lance --column img_emb --threshold 0.95 --keep similarity",
)
def _dedup_args(p: argparse.ArgumentParser) -> None:
    from laion_ray.dedup import KEEP_RULES, MAX_PARTITION_ROWS
    from laion_ray.engine.run import COMMIT_EVERY_S

    p.add_argument("uri")
    p.add_argument("--column", default="img_emb", help="vector column (default img_emb)")
    p.add_argument("--threshold", type=float, default=0.95, help="cosine threshold (0.95)")
    p.add_argument(
        "--keep",
        default="similarity",
        help=f"kept row of a group: {', '.join(KEEP_RULES)} or a numeric column (highest)",
    )
    p.add_argument("--exact", action="store_true", help="also group identical md5 images")
    p.add_argument(
        "--where",
        help=f"SQL filter ({WHERE_SYNTAX}): only these rows are grouped, the others "
        "keep their values",
    )
    p.add_argument("--overwrite", action="store_true", help="regroup every row")
    p.add_argument("--partitions", type=int, help="k-means partitions (default rows/2048)")
    p.add_argument(
        "--max-partition-rows",
        type=int,
        default=MAX_PARTITION_ROWS,
        help="most rows per compare task; larger partitions are split",
    )
    p.add_argument("--sample-rate", type=int, default=64, help="k-means training rows/partition")
    p.add_argument("--tag", help="tag the resulting version")
    p.add_argument("--unit-rows", type=int, help="rows per work unit (checkpoint granularity)")
    p.add_argument("--commit-every", type=float, default=COMMIT_EVERY_S, metavar="SECONDS")
    p.add_argument(
        "--checkpoint-uri", help="where checkpoints/scratch live (default URI/_laion_ray)"
    )
    p.add_argument("--report", metavar="FILE", help="write the report as JSON")
    _ray_flags(p)
    _storage_flags(p)


@_dedup_args
def _dedup(args: argparse.Namespace) -> None:
    from laion_ray.dedup import dedup

    report = dedup(
        args.uri,
        column=args.column,
        threshold=args.threshold,
        keep=args.keep,
        exact=args.exact,
        where=args.where,
        overwrite=args.overwrite,
        partitions=args.partitions,
        max_partition_rows=args.max_partition_rows,
        sample_rate=args.sample_rate,
        tag=args.tag,
        unit_rows=args.unit_rows,
        checkpoint_uri=args.checkpoint_uri,
        report_path=args.report,
        storage_options=_storage(args),
        address=args.address,
        commit_every_s=args.commit_every,
    )
    print(report.summary())


# --- demo -------------------------------------------------------------------


@command(
    "demo",
    help="run every job on a generated sample with local Ray (random-weight CLIP)",
    example="laion-ray demo --dir ./laion-ray-demo --rows 1000",
)
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dir",
        default="./laion-ray-demo",
        help="working directory, recreated; a non-empty one the demo did not make is refused",
    )
    p.add_argument(
        "--force", action="store_true", help="delete --dir even if the demo did not make it"
    )
    p.add_argument("--rows", type=int, default=1000)
    _ray_flags(p)


@_demo_args
def _demo(args: argparse.Namespace) -> None:
    from laion_ray.demo import run_demo

    if args.rows < 600:
        raise LaionRayError(f"--rows must be at least 600 to train the index, got {args.rows}")
    run_demo(args.dir, rows=args.rows, address=args.address, force=args.force)


# --- backfill / errors / history --------------------------------------------


def _parse_params(pairs: list[str], udfs: Sequence[str]) -> dict[str, dict[str, object]]:
    """``--param UDF.KEY=VALUE`` flags, each value converted by the type its UDF declares.

    Strict: a malformed flag, a repeated key, a UDF not in ``udfs``, a name the
    UDF does not declare or a value that does not convert is bad input.
    """
    from laion_ray.udf import typed_params, udf_parameters

    raw: dict[str, dict[str, str]] = {}
    repeats: list[tuple[str, str, str]] = []  # (UDF.KEY, first value, repeated value)
    for pair in pairs:
        target, sep, value = pair.partition("=")
        udf_name, dot, key = target.rpartition(".")
        if not sep or not dot or not udf_name or not key:
            raise LaionRayError(f"--param expects UDF.KEY=VALUE, got {pair!r}")
        given = raw.setdefault(udf_name, {})
        if key in given:
            repeats.append((target, given[key], value))
        else:
            given[key] = value
    # A UDF not in the job or a name it lacks is named first, with its parameters.
    typed = typed_params(udfs, raw)
    if repeats:
        target, first, then = repeats[0]
        udf_name = target.rpartition(".")[0]
        raise LaionRayError(
            f"--param {target} is given twice ({first!r}, then {then!r}): give it once; "
            f"{udf_name} parameters: {udf_parameters(udf_name).describe()}"
        )
    return typed


@command(
    "backfill",
    help="compute UDF columns over a dataset and write them back, resumably",
    example=(
        "laion-ray backfill ./laion.lance --udf aspect-ratio --udf moderation-rules "
        "--param moderation-rules.nsfw_threshold=0.8 --tag v2"
    ),
)
def _backfill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri")
    p.add_argument(
        "--udf",
        action="append",
        required=True,
        help="built-in name (see `laion-ray udfs`) or package.module:Name; repeat to fuse",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="UDF.KEY=VALUE",
        help="UDF parameter, e.g. moderation-rules.nsfw_threshold=0.8; the value is read as "
        "the type the UDF declares (bools: true/false, None: null, lists: JSON)",
    )
    p.add_argument(
        "--where",
        help=f"SQL filter ({WHERE_SYNTAX}); other rows keep their value (null when new)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing columns in place")
    p.add_argument("--retry-errors", action="store_true", help="recompute rows that failed before")
    p.add_argument("--max-error-fraction", type=float, default=0.01)
    p.add_argument("--tag", help="tag the resulting version")
    p.add_argument("--batch-size", type=int, help="rows per UDF call (default: per UDF)")
    p.add_argument("--concurrency", type=int, help="fixed actors per model stage")
    p.add_argument(
        "--gpus",
        type=int,
        help="GPUs per model stage (default: the cluster's GPU capacity; 0 = CPU actors)",
    )
    p.add_argument("--max-actors", type=int, help="upper bound of each model stage's actor pool")
    p.add_argument("--device", help="cpu or cuda for every model stage (default: per actor)")
    p.add_argument(
        "--decode-cpus",
        type=float,
        help="CPU budget of decode/task stages with clip-embed decode=cpu (default: cluster CPUs, at most 4 per GPU)",
    )
    _job_flags(p, auto="auto: small function-UDF jobs on narrow columns run in-process")


@_backfill_args
def _backfill(args: argparse.Namespace) -> None:
    import laion_ray
    from laion_ray.backfill import backfill
    from laion_ray.engine.phases import PhaseClock

    clock = PhaseClock()
    clock.add("import", time.perf_counter() - laion_ray.IMPORT_STARTED)
    report = backfill(
        args.uri,
        udfs=args.udf,
        udf_params=_parse_params(args.param, args.udf),
        where=args.where,
        overwrite=args.overwrite,
        retry_errors=args.retry_errors,
        max_error_fraction=args.max_error_fraction,
        tag=args.tag,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        gpus=args.gpus,
        max_actors=args.max_actors,
        device=args.device,
        decode_cpus=args.decode_cpus,
        unit_rows=args.unit_rows,
        commit_every_s=args.commit_every,
        checkpoint_uri=args.checkpoint_uri,
        report_path=args.report,
        storage_options=_storage(args),
        address=args.address,
        executor=args.executor,
        clock=clock,
    )
    print(report.summary())
    if args.verbose:
        print(report.phases_line())


@command("udfs", help="list the built-in UDFs", example="laion-ray udfs")
def _udfs_args(p: argparse.ArgumentParser) -> None:
    pass


@_udfs_args
def _udfs(args: argparse.Namespace) -> None:
    from laion_ray.udf import registered_names

    print("\n".join(registered_names()))


@command(
    "errors",
    help="list rows that UDFs failed on (key, UDF, error)",
    example="laion-ray errors ./laion.lance --udf clip-preprocess --limit 20",
)
def _errors_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri")
    p.add_argument("--udf", help="only this UDF stage")
    p.add_argument(
        "--where",
        help=f"SQL filter ({WHERE_SYNTAX}) over the error records: key, fragment_id, "
        "row_offset, udf, error_type, message, job, created_at, committed",
    )
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.add_argument("--checkpoint-uri")
    _storage_flags(p)


@_errors_args
def _errors(args: argparse.Namespace) -> None:
    from laion_ray.engine.error_log import list_errors
    from laion_ray.storage import open_dataset

    open_dataset(args.uri, storage_options=_storage(args))  # a clear error for a bad URI
    table = list_errors(
        args.uri,
        checkpoint_uri=args.checkpoint_uri,
        udf=args.udf,
        where=args.where,
        limit=args.limit,
        storage_options=_storage(args),
    )
    rows = table.to_pylist()
    if args.json:
        _print_json(rows)
        return
    if not rows:
        print("no errors recorded")
    for r in rows:
        pending = "" if r["committed"] else f"  (uncommitted run {r['job']})"
        print(f"key={r['key']}  {r['udf']}  {r['error_type']}: {r['message']}{pending}")


@command(
    "history",
    help="list the laion-ray jobs committed to a dataset",
    example="laion-ray history ./laion.lance",
)
def _history_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri")
    p.add_argument("--json", action="store_true")
    _storage_flags(p)


@_history_args
def _history(args: argparse.Namespace) -> None:
    from laion_ray.history import format_history, job_history

    entries = job_history(args.uri, storage_options=_storage(args))
    if args.json:
        _print_json(entries)
    else:
        print(format_history(entries))


# --- reindex / search / demo (laion_ray.index, laion_ray.search) ------------


def _reindex_flags(p: argparse.ArgumentParser) -> None:
    from laion_ray.recall import SEARCH_NPROBES, SEARCH_REFINE_FACTOR

    p.add_argument("--column", default="img_emb", help="vector column (default img_emb)")
    p.add_argument("--partitions", type=int, help="IVF partitions (default: about sqrt(rows))")
    p.add_argument("--sub-vectors", type=int, help="PQ sub-vectors, must divide the dimension")
    p.add_argument("--metric", default="l2", choices=["l2", "cosine", "dot"])
    p.add_argument("--sample-rate", type=int, default=256, help="training rows per centroid")
    p.add_argument(
        "--min-recall",
        type=float,
        help="keep the old index if recall@10 at the gate's search settings is lower",
    )
    p.add_argument(
        "--gate-nprobes",
        type=int,
        default=SEARCH_NPROBES,
        help=f"nprobes the gate measures recall at (default {SEARCH_NPROBES}, the card's "
        "query and `laion-ray search`'s)",
    )
    p.add_argument(
        "--gate-refine-factor",
        type=int,
        default=SEARCH_REFINE_FACTOR,
        help=f"refine_factor the gate measures recall at (default {SEARCH_REFINE_FACTOR}, "
        "as `laion-ray search`; 0: no refine)",
    )
    p.add_argument("--tag", help="tag the committed version")
    p.add_argument(
        "--workers",
        "--num-workers",
        dest="num_workers",
        type=int,
        help="parallel index segments (default: the cluster's CPUs, autoscalable nodes included)",
    )
    p.add_argument("--report", help="write the report JSON here")
    p.add_argument("--plot", help="write the recall-latency PNG here")


@command(
    "reindex",
    help="rebuild the IVF_PQ index on Ray, report recall, swap it in atomically",
    example="laion-ray reindex ./laion.lance --column img_emb --min-recall 0.9 --plot r.png",
)
def _reindex_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("uri")
    _reindex_flags(p)
    _storage_flags(p)
    _ray_flags(p)


@_reindex_args
def _reindex(args: argparse.Namespace) -> int:
    from laion_ray.index import reindex
    from laion_ray.ray_env import ensure_ray

    ensure_ray(args.address)
    report = reindex(
        args.uri,
        column=args.column,
        partitions=args.partitions,
        sub_vectors=args.sub_vectors,
        metric=args.metric,
        sample_rate=args.sample_rate,
        min_recall=args.min_recall,
        gate_nprobes=args.gate_nprobes,
        gate_refine_factor=args.gate_refine_factor or None,
        tag=args.tag,
        num_workers=args.num_workers,
        storage_options=_storage(args),
        report_path=args.report,
        plot_path=args.plot,
    )
    print(report.summary())
    return 0 if report.swapped else 1


@command(
    "search",
    help="ANN search by row, .npy vector or CLIP text; prints similarity, caption, url",
    example="laion-ray search ./laion.lance --row 42 --k 10 --where '\"NSFW\" = 0'",
)
def _search_args(p: argparse.ArgumentParser) -> None:
    from laion_ray.recall import SEARCH_NPROBES, SEARCH_REFINE_FACTOR

    p.add_argument("uri")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--row", type=int, help="use this row's vector as the query")
    q.add_argument("--vector", help=".npy file holding one query vector")
    q.add_argument("--text", help="text query, encoded with --model")
    p.add_argument("--model", help="CLIP model NAME[:PRETRAINED or checkpoint path]")
    p.add_argument("--column", default="img_emb")
    p.add_argument("--k", type=int, default=10)
    p.add_argument(
        "--where", help=f"SQL prefilter ({WHERE_SYNTAX}), e.g. '\"NSFW\" = 0 AND similarity > 0.3'"
    )
    p.add_argument(
        "--nprobes",
        type=int,
        default=SEARCH_NPROBES,
        help=f"IVF partitions probed (default {SEARCH_NPROBES}, as the card's query)",
    )
    p.add_argument(
        "--refine-factor",
        type=int,
        default=SEARCH_REFINE_FACTOR,
        help=f"re-rank k x this candidates exactly (default {SEARCH_REFINE_FACTOR}, as the "
        "card's query; 0: no refine)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _storage_flags(p)


@_search_args
def _search(args: argparse.Namespace) -> None:
    from laion_ray.search import format_hits, search

    hits = search(
        args.uri,
        row=args.row,
        vector=args.vector,
        text=args.text,
        model=args.model,
        k=args.k,
        where=args.where,
        nprobes=args.nprobes,
        refine_factor=args.refine_factor or None,
        column=args.column,
        storage_options=_storage(args),
    )
    if args.json:
        _print_json(hits)
    else:
        print(format_hits(hits))


# --- materialize --------------------------------------------------------------


@command(
    "materialize",
    help="stream a filtered subset of a (remote) Lance dataset into a new dataset",
    example=(
        "laion-ray materialize hf://datasets/lance-format/laion-1m/data/train.lance "
        "./laion-subset/train.lance --where '\"NSFW\" = 0 AND similarity > 0.35 AND width >= 512' "
        "--columns key,image,caption,url,img_emb"
    ),
)
def _materialize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="source dataset URI (local, s3://, hf://...)")
    p.add_argument("dest", help="dataset URI to create (must not exist)")
    p.add_argument(
        "--where",
        help=f"SQL filter ({WHERE_SYNTAX})",
    )
    p.add_argument("--columns", help="comma-separated columns to keep (default: all)")
    p.add_argument("--limit", type=int, help="keep at most N matching rows")
    p.add_argument("--batch-rows", type=int, default=8192, help="rows per streamed batch")
    _storage_flags(p)
    p.add_argument(
        "--dest-storage-option",
        action="append",
        metavar="KEY=VALUE",
        default=None,
        help="object-store option for DEST (repeatable; default: the --storage-option values)",
    )


@_materialize_args
def _materialize(args: argparse.Namespace) -> None:
    from laion_ray.materialize import materialize
    from laion_ray.storage import parse_storage_options

    columns = (
        [c.strip() for c in args.columns.split(",") if c.strip()]
        if args.columns is not None
        else None
    )
    report = materialize(
        args.src,
        args.dest,
        where=args.where,
        columns=columns,
        limit=args.limit,
        storage_options=_storage(args),
        dest_storage_options=(
            None
            if args.dest_storage_option is None
            else parse_storage_options(args.dest_storage_option)
        ),
        batch_rows=args.batch_rows,
    )
    print(report.summary())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="laion-ray",
        description="Backfill, re-embed and re-index LAION-style Lance tables on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text, example, configure, handler in _COMMANDS:
        p = sub.add_parser(
            name,
            help=help_text,
            description=f"{help_text}.\n\nexample:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        configure(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``laion-ray`` with ``argv``; returns the exit code."""
    return run(argv)


def command() -> int:
    """The ``laion-ray`` program: :func:`main`, then Ray let go at once, as the
    process exits (see :func:`laion_ray.ray_env.release_ray`)."""
    from laion_ray.ray_env import release_ray

    code = main()
    release_ray()
    return code


def run(argv: Sequence[str] | None, *, log_config: bool = False) -> int:
    """Parse and run one subcommand; ``log_config`` logs the parsed flags with
    secrets masked (``ray job submit`` entry points do, for their job logs).

    Quiet by default: Ray's and Lance's own output goes to a log file that is
    kept, and named, only when the command fails; ``-v`` shows it all.

    Exit codes: 0 success, 2 bad input (one line, no traceback), 1 any other
    failure, 130 interrupted.
    """
    try:
        args = build_parser().parse_args(argv)
    except LaionRayError as exc:
        print(f"laion-ray: error: {exc}", file=sys.stderr)
        return 2
    if args.verbose:
        logging.basicConfig(
            level=logging.DEBUG,
            format="%(asctime)s %(name)s %(levelname)s %(message)s",
            datefmt="%H:%M:%S",
        )
        return _dispatch(args, log_config=log_config, log_path=None)
    from laion_ray import console

    with console.quiet(args.command) as log_path:
        code = _dispatch(args, log_config=log_config, log_path=log_path)
    if code in (0, 2, 130):  # nothing in the log the user needs
        os.unlink(log_path)
    return code


def _dispatch(args: argparse.Namespace, *, log_config: bool, log_path: str | None) -> int:
    """Run the parsed command; errors become one line on the terminal and an exit code."""
    from laion_ray.console import terminal

    try:
        if log_config:
            logging.getLogger("laion_ray").info("%s config: %s", args.command, _loggable(args))
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("laion-ray: interrupted", file=terminal())
        return 130
    except Exception as exc:
        # Ray re-raises a worker's error wrapped; the user's mistake may be inside.
        user_error = _find_user_error(exc)
        if user_error is not None:
            print(f"laion-ray: error: {user_error}", file=terminal())
            return 2
        if log_path is None:  # -v: the whole story
            raise
        print(
            f"laion-ray: failed: {brief(exc)} (rerun with -v for details; "
            f"Ray and Lance logs: {log_path})",
            file=terminal(),
        )
        return 1


def _loggable(args: argparse.Namespace) -> dict[str, object]:
    """The parsed flags with every secret masked: storage options of any store
    (what the job will use, ``AWS_*`` environment included) and UDF parameters."""
    from laion_ray.storage import mask_secrets, resolve_storage_options

    config = {k: v for k, v in vars(args).items() if k != "handler"}
    for key in ("storage_option", "source_storage_option", "dest_storage_option"):
        if key in config and (key == "storage_option" or config[key] is not None):
            options = dict(o.partition("=")[::2] for o in config[key] or ())
            config[key] = mask_secrets(resolve_storage_options(options))
    if config.get("param"):
        masked = []
        for pair in config["param"]:
            target, _, value = pair.partition("=")
            name = target.rpartition(".")[2]
            masked.append(f"{target}={mask_secrets({name: value})[name]}")
        config["param"] = masked
    return config


def _find_user_error(exc: BaseException | None) -> LaionRayError | None:
    """The bad input behind ``exc``, if that is what it is.

    Stops at the first failure that is not about input (a store that kept
    failing, a systemic stage failure): those exit 1 even when some bad-input
    error appears deeper in the chain.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, LaionRayError):
            return exc
        if isinstance(exc, (JobFailed, SystemicError)):
            return None
        seen.add(id(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


if __name__ == "__main__":
    sys.exit(command())
