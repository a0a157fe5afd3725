"""Backfill benchmarks (issue 3): laion-ray ``backfill`` against its peers.

Every contender gets its own fresh copy of the same narrow table (``key``,
``width``, ``height``, all int64) and all run in one process on one Ray
instance, side by side, so the printed ratios are fair on a busy machine.

Lines printed:

1. ``laion-ray / lance-ray add_columns rows/s``: ``backfill(udfs=["aspect-ratio"])``
   against lance-ray 0.5 ``add_columns(uri, transform=...)`` with the same maths
   as an Arrow UDF (target >= 2).
2. ``laion-ray / pylance SQL add_columns rows/s``: against single-process
   ``LanceDataset.add_columns`` with two SQL expressions (target >= 0.25).
3. ``fixed overhead``: wall time of each on a 1k-row table (Ray already up).
   ``CLI on a running Ray``: ``laion-ray backfill`` of a 1k-row table as a
   subprocess attached to this Ray (as under ``ray job submit``; target <= 3 s),
   and its rerun, which has nothing to do (target <= 2 s), against a bare
   ``ray.init`` of the same Ray.
   ``where the time goes``: the Ray executor's phases (median over the repeats).
   ``8M rows``: laion-ray (ray executor) / lance-ray at ``--big-rows`` rows in
   ``--big-fragments`` fragments, fixed costs amortised (target >= 2).
4. ``(kill at ~50% + rerun) / clean run wall time``: the CLI as a subprocess with
   a slow UDF (``benchmarks/slow_udf.py``), SIGKILLed at ~50% of the checkpointed rows,
   rerun to completion (target <= 1.15). Three ways: ``--executor auto`` (the
   local executor for this job), ``--executor ray`` attached to a running Ray
   (as on a cluster: the kill takes only the driver), and ``--executor ray``
   with a private local Ray per CLI run, whose start-up the rerun pays again.
5. ``peak worker RSS``: largest single Ray-worker RSS while backfilling
   ``rows/2`` and ``rows`` rows (target ~1: memory bounded by a unit, not the table).

Run:
    python benchmarks/bench_backfill.py                  # 2M rows, 8 fragments
    python benchmarks/bench_backfill.py --quick          # ~2 minute smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
from sampling import WorkerRSS, psutil

from laion_ray.engine.checkpoint import JobCheckpoint
from laion_ray.engine.error_log import checkpoint_root

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
AR_SCHEMA = pa.schema([pa.field("aspect_ratio", pa.float64()), pa.field("is_high_res", pa.bool_())])
SQL_COLUMNS = {
    "aspect_ratio": "CAST(width AS DOUBLE) / CAST(height AS DOUBLE)",
    "is_high_res": "width >= 512 AND height >= 512",
}


# --- data -------------------------------------------------------------------------
def make_table(uri: str, rows: int, fragments: int, seed: int = 0) -> str:
    """Narrow LAION-like table: ``rows`` rows over ``fragments`` fragments (no zero sizes)."""
    rng = np.random.default_rng(seed)
    table = pa.table(
        {
            "key": np.arange(rows, dtype=np.int64),
            "width": rng.integers(64, 2049, rows, dtype=np.int64),
            "height": rng.integers(64, 2049, rows, dtype=np.int64),
        }
    )
    per_file = -(-rows // fragments)
    lance.write_dataset(
        table, uri, max_rows_per_file=per_file, max_rows_per_group=min(per_file, 65536)
    )
    return uri


def fresh_copy(template: str, dest: str) -> str:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(template, dest)
    return dest


def check_columns(uri: str, ratio_column: str = "aspect_ratio") -> float:
    """Sum of the new ratio column (all contenders must agree); fails on nulls."""
    tbl = lance.dataset(uri).to_table(columns=[ratio_column])
    col = tbl[ratio_column]
    assert col.null_count == 0, f"{uri}: {col.null_count} null {ratio_column} values"
    return float(pa.compute.sum(col).as_py())


# --- contenders -----------------------------------------------------------------
def lance_ray_transform(batch: pa.RecordBatch) -> pa.RecordBatch:
    """aspect-ratio's maths as a plain Arrow UDF for ``merge_columns``."""
    width = batch["width"].to_numpy(zero_copy_only=False).astype(np.float64)
    height = batch["height"].to_numpy(zero_copy_only=False).astype(np.float64)
    valid = (width > 0) & (height > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = width / height
    return pa.RecordBatch.from_arrays(
        [pa.array(ratio, mask=~valid), pa.array((width >= 512) & (height >= 512))],
        schema=AR_SCHEMA,
    )


PHASES: list[dict] = []  # the ray executor's phases of each timed run


def run_laion_ray(uri: str, executor: str = "ray") -> float:
    from laion_ray.backfill import backfill

    start = time.perf_counter()
    report = backfill(uri, udfs=["aspect-ratio"], executor=executor)
    wall = time.perf_counter() - start
    assert report.rows_processed == lance.dataset(uri).count_rows(), report.summary()
    if executor == "ray":
        PHASES.append(report.phases)
    return wall


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def median_phases(runs: list[dict]) -> str:
    """The phase line of the run whose wall time is the median."""
    from laion_ray.engine.phases import phases_line

    totals = [sum(r["driver_s"].values()) for r in runs]
    return phases_line(runs[int(np.argsort(totals)[len(totals) // 2])])


def cli_on_running_ray(template: str, workdir: str, address: str, repeats: int) -> dict:
    """Wall time of the CLI attached to a running Ray: a 1k-row backfill, its
    rerun (nothing to do), and a bare ``ray.init`` to the same Ray, interleaved."""
    env = {**os.environ, "RAY_ADDRESS": address}
    times: dict[str, list[float]] = {"backfill": [], "rerun": [], "connect": []}
    connect = f"import ray; ray.init(address={address!r}, log_to_driver=False)"
    for i in range(repeats):
        uri = fresh_copy(template, os.path.join(workdir, f"cli_{i}.lance"))
        for name, cmd in (
            ("backfill", ["laion-ray", "backfill", uri, "--udf", "aspect-ratio"]),
            ("rerun", ["laion-ray", "backfill", uri, "--udf", "aspect-ratio"]),
            ("connect", [sys.executable, "-c", connect]),
        ):
            start = time.perf_counter()
            out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
            times[name].append(time.perf_counter() - start)
            if out.returncode:
                raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr}")
            if name == "rerun":
                assert out.stdout.startswith("nothing to do:"), out.stdout
    return times


def run_lance_ray(uri: str, batch_size: int) -> float:
    import lance_ray
    from ray import cloudpickle

    if __name__ != "__main__":  # imported: ship the transform by value, workers lack benchmarks/
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    start = time.perf_counter()
    lance_ray.add_columns(
        uri, transform=lance_ray_transform, read_columns=["width", "height"], batch_size=batch_size
    )
    return time.perf_counter() - start


def run_pylance_sql(uri: str) -> float:
    start = time.perf_counter()
    lance.dataset(uri).add_columns(SQL_COLUMNS)
    return time.perf_counter() - start


# --- kill and resume ----------------------------------------------------------------
def _cli(
    uri: str, unit_rows: int, delay_s: float, env: dict[str, str], executor: str
) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "laion_ray.cli", "backfill", uri,
        "--udf", "slow_udf:slow_ratio", "--param", f"slow_udf:slow_ratio.delay_s={delay_s}",
        "--unit-rows", str(unit_rows), "--executor", executor,
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True, text=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen, what: str) -> str:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}:\n{out[-3000:]}")
    return out


def _ledger_rows(uri: str) -> int:
    """Rows in the finished units of the job's checkpoint (its part files)."""
    rows = 0
    for job in glob.glob(os.path.join(uri, "_laion_ray", "jobs", "*")):
        checkpoint = JobCheckpoint(checkpoint_root(uri), os.path.basename(job), None)
        rows += sum(u.rows for u in checkpoint.finished_units().values())
    return rows


def _kill_tree(proc: subprocess.Popen) -> int:
    """SIGKILL the CLI's process group and every descendant (its private Ray)."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:  # Ray daemons that left the group still die, by pid
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait()
    psutil.wait_procs(tree, timeout=10)
    return len(tree)


def kill_and_resume(
    template: str,
    workdir: str,
    rows: int,
    unit_rows: int,
    delay_s: float,
    executor: str,
    ray_address: str | None = None,
) -> dict:
    """Clean run, then a run SIGKILLed at ~50% of the checkpointed rows plus its rerun.

    With ``ray_address`` the CLI attaches to that running Ray, as a job on a
    cluster does, and the kill takes only the driver; without it each CLI
    starts (and its kill takes down) a private local Ray.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(HERE), str(REPO), env.get("PYTHONPATH", "")) if p
    )
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    name = f"{executor}_{'cluster' if ray_address else 'private'}"
    clean_uri = fresh_copy(template, os.path.join(workdir, f"kill_clean_{name}.lance"))
    start = time.perf_counter()
    clean_out = _finish(_cli(clean_uri, unit_rows, delay_s, env, executor), "clean run")
    clean_s = time.perf_counter() - start

    uri = fresh_copy(template, os.path.join(workdir, f"kill_resume_{name}.lance"))
    start = time.perf_counter()
    proc = _cli(uri, unit_rows, delay_s, env, executor)
    killed_at = 0
    while proc.poll() is None:
        killed_at = _ledger_rows(uri)
        if killed_at >= rows // 2:
            break
        time.sleep(0.25)
    if proc.poll() is not None:
        raise RuntimeError("the slow run finished before reaching 50%; raise --kill-seconds")
    _kill_tree(proc)
    killed_s = time.perf_counter() - start
    start = time.perf_counter()
    rerun_out = _finish(_cli(uri, unit_rows, delay_s, env, executor), "rerun")
    rerun_s = time.perf_counter() - start
    assert check_columns(uri, "slow_ratio") == check_columns(clean_uri, "slow_ratio")
    return {
        "clean_s": clean_s,
        "killed_s": killed_s,
        "rerun_s": rerun_s,
        "ledger_rows_at_kill": killed_at,
        "clean_summary": clean_out.strip().splitlines()[-1],
        "rerun_summary": rerun_out.strip().splitlines()[-1],
        "ratio": (killed_s + rerun_s) / clean_s,
    }


def ray_startup_s() -> float:
    """Wall time of a bare ``python -c 'ray.init(); ray.shutdown()'`` (for context)."""
    code = (
        "import ray; ray.init(address='local', include_dashboard=False, log_to_driver=False);"
        "ray.shutdown()"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - start


# --- main ------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--fragments", type=int, default=8)
    p.add_argument("--big-rows", type=int, default=8_000_000, help="0 skips the line")
    p.add_argument("--big-fragments", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="smoke run: 200k rows, short kill test")
    p.add_argument(
        "--out", help="working directory for tables and results.json (default: a temp dir)"
    )
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3, help="interleaved throughput repeats")
    p.add_argument("--lance-ray-batch-size", type=int, default=65536,
                   help="lance-ray reader batch; default matches aspect-ratio's batch_size")  # fmt: skip
    p.add_argument(
        "--kill-rows", type=int, help="rows in the kill test (default 131072; quick 65536)"
    )
    p.add_argument("--kill-unit-rows", type=int, default=1024)
    p.add_argument(
        "--kill-seconds",
        type=float,
        help="aimed-for clean-run time of the kill test (default 60; quick 20): the slow"
        " UDF's delay per unit is set from it and each mode's parallelism",
    )
    p.add_argument("--skip-kill", action="store_true")
    p.add_argument(
        "--kill-modes",
        default="auto,cluster,private",
        help="kill-test modes: auto (local executor), cluster (--executor ray on a running"
        " Ray), private (--executor ray, each run its own local Ray)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.rows = min(args.rows, 200_000)
        args.big_rows = min(args.big_rows, 800_000)
    kill_rows = args.kill_rows or (65536 if args.quick else 131072)
    kill_seconds = args.kill_seconds or (20.0 if args.quick else 60.0)
    if args.rows < args.fragments * 2 or args.fragments < 1:
        p.error(f"--rows {args.rows} must be at least twice --fragments {args.fragments}")

    logging.basicConfig(level=logging.WARNING)
    workdir = args.out or tempfile.mkdtemp(prefix="bench-backfill-")
    os.makedirs(workdir, exist_ok=True)
    tables = os.path.join(workdir, "tables")
    shutil.rmtree(tables, ignore_errors=True)
    os.makedirs(tables)
    t = lambda name: os.path.join(tables, name)  # noqa: E731

    from laion_ray.ray_env import ensure_ray

    ensure_ray(num_cpus=args.num_cpus)
    res: dict = {"rows": args.rows, "fragments": args.fragments, "num_cpus": args.num_cpus}

    # 3. fixed overhead on 1k rows (after one untimed warm-up each: imports, pools).
    small = make_table(t("small.lance"), 1000, args.fragments)
    run_laion_ray(fresh_copy(small, t("warm_lr.lance")))
    run_lance_ray(fresh_copy(small, t("warm_lray.lance")), args.lance_ray_batch_size)
    res["overhead_laion_s"] = run_laion_ray(fresh_copy(small, t("small_lr.lance")))
    res["overhead_lance_ray_s"] = run_lance_ray(
        fresh_copy(small, t("small_lray.lance")), args.lance_ray_batch_size
    )
    res["overhead_sql_s"] = run_pylance_sql(fresh_copy(small, t("small_sql.lance")))
    import ray

    running = ray.get_runtime_context().gcs_address  # this process's Ray, left running
    res["cli"] = cli_on_running_ray(small, tables, running, args.repeats)

    # 5a. half-size run for the memory ratio.
    half = make_table(t("half.lance"), args.rows // 2, args.fragments, seed=1)
    with WorkerRSS() as rss_half:
        res["laion_half_s"] = run_laion_ray(fresh_copy(half, t("half_lr.lance")))

    # 1-2 (and 5b). throughput, each contender on its own fresh copy; interleaved
    # repeats, median of each (sub-second runs on a shared machine are noisy).
    full = make_table(t("full.lance"), args.rows, args.fragments, seed=2)
    PHASES.clear()
    contenders = {
        "laion_s": run_laion_ray,
        # What `laion-ray backfill` picks for this job when no Ray is running (auto).
        "laion_local_s": lambda uri: run_laion_ray(uri, "local"),
        "lance_ray_s": lambda uri: run_lance_ray(uri, args.lance_ray_batch_size),
        "sql_s": run_pylance_sql,
    }
    copies = {"laion_s": "lr", "laion_local_s": "local", "lance_ray_s": "lray", "sql_s": "sql"}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for repeat in range(args.repeats):
        for name, run in contenders.items():
            uri = fresh_copy(full, t(f"full_{copies[name]}.lance"))
            if name == "laion_s" and repeat == 0:
                with WorkerRSS() as rss_full:
                    times[name].append(run(uri))
            else:
                times[name].append(run(uri))
    for name, values in times.items():
        res[name] = float(np.median(values))
        res[f"{name}_all"] = values
    sums = {name: check_columns(t(f"full_{name}.lance")) for name in ("lr", "local", "lray", "sql")}
    assert max(sums.values()) - min(sums.values()) < 1e-6 * abs(sums["sql"]), sums
    res["phases"] = list(PHASES)
    if args.big_rows:  # the same contenders on a bigger table: fixed costs amortised
        big = make_table(t("big.lance"), args.big_rows, args.big_fragments, seed=4)
        big_times: dict[str, list[float]] = {"laion_s": [], "lance_ray_s": []}
        for _ in range(args.repeats):
            big_times["laion_s"].append(run_laion_ray(fresh_copy(big, t("big_lr.lance"))))
            big_times["lance_ray_s"].append(
                run_lance_ray(fresh_copy(big, t("big_lray.lance")), args.lance_ray_batch_size)
            )
        res["big"] = big_times
        assert abs(check_columns(t("big_lr.lance")) - check_columns(t("big_lray.lance"))) < (
            1e-6 * abs(check_columns(t("big_lray.lance")))
        )
    res["peak_rss_half_mb"] = rss_half.peak_single / 2**20
    res["peak_rss_full_mb"] = rss_full.peak_single / 2**20
    res["peak_rss_total_half_mb"] = rss_half.peak_total / 2**20
    res["peak_rss_total_full_mb"] = rss_full.peak_total / 2**20

    rate = lambda s: args.rows / s  # noqa: E731
    local = res["laion_local_s"]
    pairs = lambda a, b: [y / x for x, y in zip(times[a], times[b], strict=True)]  # noqa: E731
    lines = [
        f"laion-ray (local executor, auto's choice here) / lance-ray add_columns rows/s = "
        f"{res['lance_ray_s'] / local:.2f} (target >= 2)  [laion-ray {rate(local):,.0f} rows/s"
        f" in {local:.2f}s]",
        f"laion-ray (local executor) / pylance SQL add_columns rows/s = "
        f"{res['sql_s'] / local:.2f} (target >= 0.25)  [median of {args.repeats} interleaved"
        " repeats, as every throughput figure here]",
        f"laion-ray (ray executor) / lance-ray add_columns rows/s = {res['lance_ray_s'] / res['laion_s']:.2f} (target >= 2)"
        f"  [per repeat {spread(pairs('laion_s', 'lance_ray_s'))}; laion-ray"
        f" {rate(res['laion_s']):,.0f} rows/s in {res['laion_s']:.2f}s;"
        f" lance-ray {rate(res['lance_ray_s']):,.0f} rows/s in {res['lance_ray_s']:.2f}s;"
        f" {args.rows:,} rows in {args.fragments} fragments]",
        f"  where the time goes, ray executor (the median run): {median_phases(res['phases'])}",
        f"laion-ray (ray executor) / pylance SQL add_columns rows/s = {res['sql_s'] / res['laion_s']:.2f} (target >= 0.25)"
        f"  [pylance SQL {rate(res['sql_s']):,.0f} rows/s in {res['sql_s']:.2f}s]",
        f"fixed overhead: laion-ray wall time on 1k rows = {res['overhead_laion_s']:.2f} s"
        f"  [lance-ray {res['overhead_lance_ray_s']:.2f} s; pylance SQL {res['overhead_sql_s']:.3f} s;"
        " Ray already running]",
    ]
    cli = res["cli"]
    med = {k: float(np.median(v)) for k, v in cli.items()}
    lines += [
        f"CLI on a running Ray, 1k-row aspect-ratio backfill: wall {med['backfill']:.2f} s"
        f" (target <= 3; spread {spread(cli['backfill'])}); / bare ray.init of the same Ray"
        f" ({med['connect']:.2f} s) = {med['backfill'] / med['connect']:.2f}",
        f"CLI on a running Ray, rerun of the finished job (nothing to do): wall"
        f" {med['rerun']:.2f} s (target <= 2; spread {spread(cli['rerun'])}); / bare ray.init"
        f" = {med['rerun'] / med['connect']:.2f}",
    ]
    if args.big_rows:
        big = {k: float(np.median(v)) for k, v in res["big"].items()}
        per = [y / x for x, y in zip(res["big"]["laion_s"], res["big"]["lance_ray_s"], strict=True)]
        lines.append(
            f"laion-ray (ray executor) / lance-ray add_columns rows/s at {args.big_rows:,} rows in"
            f" {args.big_fragments} fragments = {big['lance_ray_s'] / big['laion_s']:.2f}"
            f" (target >= 2)  [per repeat {spread(per)}; laion-ray"
            f" {args.big_rows / big['laion_s']:,.0f} rows/s in {big['laion_s']:.2f}s;"
            f" lance-ray {args.big_rows / big['lance_ray_s']:,.0f} rows/s in"
            f" {big['lance_ray_s']:.2f}s]"
        )
    if not args.skip_kill:
        kill_tpl = make_table(t("kill.lance"), kill_rows, args.fragments, seed=3)
        res["ray_startup_s"] = ray_startup_s()
        from laion_ray.engine.run import LOCAL_THREADS

        units = -(-kill_rows // args.kill_unit_rows)
        # A function UDF's lane tasks ask 1 CPU each (engine/executors.py).
        ray_tasks = int(ray.cluster_resources()["CPU"])
        modes = {  # name: (label, executor, Ray address, units running at once)
            "auto": ("--executor auto (local here)", "auto", None, LOCAL_THREADS),
            "cluster": ("--executor ray, Ray cluster running", "ray", running, ray_tasks),
            "private": ("--executor ray, private local Ray", "ray", None, ray_tasks),
        }
        for mode in args.kill_modes.split(","):
            label, executor, address, parallel = modes[mode.strip()]
            delay = round(kill_seconds * parallel / units, 3)  # one UDF batch per unit
            k = kill_and_resume(
                kill_tpl, tables, kill_rows, args.kill_unit_rows, delay, executor, address
            )
            res[f"kill_{executor}_{'cluster' if address else 'private'}"] = k
            lines.append(
                f"(kill at ~50% + rerun) / clean run wall time, {label} = "
                f"{k['ratio']:.2f} (target <= 1.15)  [clean {k['clean_s']:.1f}s; killed after"
                f" {k['killed_s']:.1f}s at {k['ledger_rows_at_kill']}/{kill_rows} checkpointed rows;"
                f" rerun {k['rerun_s']:.1f}s; {units} units of {args.kill_unit_rows} rows,"
                f" {parallel} at a time, {delay}s each"
                + ("" if address else f"; bare Ray start {res['ray_startup_s']:.1f}s")
                + "]"
            )
    lines.append(
        f"peak worker RSS {args.rows // 2:,} rows / {args.rows:,} rows = "
        f"{res['peak_rss_half_mb'] / res['peak_rss_full_mb']:.2f} (target ~1)"
        f"  [{res['peak_rss_half_mb']:.0f} MB / {res['peak_rss_full_mb']:.0f} MB"
        f", largest single ray:: worker; sum over workers {res['peak_rss_total_half_mb']:.0f} MB /"
        f" {res['peak_rss_total_full_mb']:.0f} MB]"
    )
    print("\n".join(lines), flush=True)
    res["lines"] = lines
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    if not args.out:
        shutil.rmtree(workdir, ignore_errors=True)
    return res


if __name__ == "__main__":
    main()
