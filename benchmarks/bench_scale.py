"""Engine scale: the same rows cut into 1,000 / 10,000 / 100,000 work units.

For each executor and unit count, a fresh driver process runs
``backfill(udfs=["aspect-ratio"])`` over one narrow table (the same rows every
time; only ``unit_rows`` changes) and this prints, side by side:

- ``driver peak RSS ratio``: the driver's peak RSS against the run with the
  fewest units (target <= 1.25 at 100,000 units on Ray);
- ``ms/unit``: wall time per unit, and the marginal driver overhead per unit
  against the run with the fewest units;
- ``checkpoint MB``: bytes the job wrote to its checkpoint (parts, plan, summaries);
- ``dataset opens``: opens of the dataset per job, each one manifest read, in
  the driver and every worker (counted through ``$LAION_RAY_IO_LOG``);
- ``resume/clean``: a second copy is SIGKILLed once half its units are
  finished, then rerun; the rerun's wall time over the clean run's.

Ray runs attach to one local Ray started here, as jobs on a cluster do, so a
kill takes only the driver and Ray's start-up is not timed.

Usage::

    python benchmarks/bench_scale.py --rows 200000 --fragments 50 \\
        --units 1000,10000,100000 --executors local,ray
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

from bench_backfill import check_columns, fresh_copy, make_table  # noqa: E402

from laion_ray.engine.checkpoint import JobCheckpoint  # noqa: E402
from laion_ray.engine.error_log import checkpoint_root  # noqa: E402
from laion_ray.storage import IO_LOG_ENV, read_io_log  # noqa: E402


def child(uri: str, unit_rows: int, executor: str) -> None:
    """One job in this (fresh) process; prints its measurements as JSON."""
    from laion_ray.backfill import backfill

    start = time.perf_counter()
    report = backfill(uri, udfs=["aspect-ratio"], unit_rows=unit_rows, executor=executor)
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall_s": wall, "peak_mb": peak_mb, "units": report.units_total}))


def _start(uri: str, unit_rows: int, executor: str, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--child", uri, str(unit_rows), executor]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"job exited {proc.returncode}:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _finished_units(uri: str) -> int:
    jobs = Path(uri) / "_laion_ray" / "jobs"
    names = [p.name for p in jobs.iterdir()] if jobs.exists() else []
    return sum(len(JobCheckpoint(checkpoint_root(uri), n, None).finished_units()) for n in names)


def measure(
    template: str, workdir: str, units: int, rows: int, executor: str, env: dict, resume: bool
) -> dict:
    unit_rows = -(-rows // units)
    io_log = env[IO_LOG_ENV]
    Path(io_log).write_text("")
    clean = fresh_copy(template, os.path.join(workdir, f"clean_{executor}_{units}.lance"))
    result = _finish(_start(clean, unit_rows, executor, env))
    result["check"] = check_columns(clean)
    io = read_io_log(io_log)
    result.update(
        opens=io.get("dataset_opens", 0),
        ckpt_mb=io.get("checkpoint_bytes", 0) / 1e6,
        ckpt_files=io.get("checkpoint_writes", 0),
    )

    shutil.rmtree(clean, ignore_errors=True)
    result.update(killed_at=float("nan"), resume=float("nan"))
    if not resume:
        return result
    killed = fresh_copy(template, os.path.join(workdir, f"killed_{executor}_{units}.lance"))
    proc = _start(killed, unit_rows, executor, env)
    at_kill = 0
    while proc.poll() is None and (at_kill := _finished_units(killed)) < result["units"] // 2:
        time.sleep(0.05)
    if proc.poll() is not None:
        raise RuntimeError(f"the run finished before half its units were done: {proc.returncode}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = _finish(_start(killed, unit_rows, executor, env))
    assert check_columns(killed) == result["check"]
    result.update(killed_at=at_kill / result["units"], resume=rerun["wall_s"] / result["wall_s"])
    shutil.rmtree(killed, ignore_errors=True)
    return result


def bookkeeping_us_per_unit(units: int = 100_000, fragments: int = 50) -> float:
    """The driver's own work per finished unit: count its part record, set its bit."""
    from laion_ray.engine.checkpoint import UnitLedger, UnitTally
    from laion_ray.engine.plan import FragmentState, UnitPlan

    per_fragment = units // fragments
    plan = UnitPlan([FragmentState(f, per_fragment, ()) for f in range(fragments)], 1)
    ledger, tally = UnitLedger(plan), UnitTally()
    records = [
        {"unit": u, "run": "r", "first": 0, "rows": 1, "unit_rows": 1, "errors": 0}
        for u in range(plan.total)
    ]
    start = time.perf_counter()
    for rec in records:
        if not ledger.done[rec["unit"]] and (unit := tally.add(rec)) is not None:
            ledger.add(unit.unit, unit.rows, unit.errors)
    return (time.perf_counter() - start) / plan.total * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--fragments", type=int, default=50)
    parser.add_argument("--units", default="1000,10000,100000")
    parser.add_argument("--executors", default="local,ray")
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument(
        "--resume-max-units", type=int, default=None, help="skip the kill/resume above this"
    )
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_scale_")
    template = make_table(os.path.join(workdir, "template.lance"), args.rows, args.fragments)
    env = {**os.environ, IO_LOG_ENV: os.path.join(workdir, "io.log")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_MODE"] = "disabled"  # loopback Ray: the job drivers attach without a token
    os.environ.update(RAY_AUTH_MODE="disabled", **{IO_LOG_ENV: env[IO_LOG_ENV]})
    counts = [int(u) for u in args.units.split(",")]
    print(f"driver bookkeeping: {bookkeeping_us_per_unit():.1f} us per finished unit")
    print(f"table: {args.rows} rows in {args.fragments} fragments; units {counts}")
    for executor in args.executors.split(","):
        run_env = dict(env)
        if executor == "ray":
            import ray

            for attempt in range(5):  # a loaded machine can miss Ray's 30 s start-up limit
                try:
                    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False)
                    break
                except Exception:
                    ray.shutdown()
                    if attempt == 4:
                        raise
            run_env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        base = None
        for units in counts:
            resume = args.resume_max_units is None or units <= args.resume_max_units
            r = measure(template, workdir, units, args.rows, executor, run_env, resume)
            base = base or r
            marginal = (
                (r["wall_s"] - base["wall_s"]) / (r["units"] - base["units"]) * 1e3
                if r["units"] > base["units"]
                else float("nan")
            )
            print(
                f"{executor:5s} {r['units']:>7} units: driver peak RSS {r['peak_mb']:.0f} MB, "
                f"ratio vs {base['units']} units = {r['peak_mb'] / base['peak_mb']:.2f}; "
                f"{r['wall_s']:.1f}s = {r['wall_s'] / r['units'] * 1e3:.2f} ms/unit "
                f"(marginal {marginal:.2f} ms/unit); checkpoint {r['ckpt_mb']:.1f} MB in "
                f"{r['ckpt_files']} files; dataset opens {r['opens']}; resume/clean = "
                f"{r['resume']:.2f} after a kill at {r['killed_at']:.0%}",
                flush=True,
            )
        if executor == "ray":
            ray.shutdown()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
