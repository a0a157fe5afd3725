"""One driver per job: the lease on local disk and on S3 (moto), and two real CLI drivers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lance
import pytest

from laion_ray.engine.lease import JobLease, LeaseHeld, LeaseLost
from laion_ray.sample import write_sample

TESTS_DIR = Path(__file__).resolve().parent


def _generations(lease: JobLease) -> list[int]:
    return lease._generations()


def _remote_holder(lease: JobLease, generation: int, heartbeat_age_s: float = 0.0) -> None:
    """A lease file as a driver on another host writes it (its pid means nothing here)."""
    now = time.time()
    holder = {"host": "other-host", "pid": 1, "run": "f" * 32, "since": now - 60,
              "heartbeat": now - heartbeat_age_s, "beats": 3, "released": False}  # fmt: skip
    lease.fs.create_dir(lease.dir, recursive=True)
    with lease.fs.open_output_stream(lease._path(generation)) as f:
        f.write(json.dumps(holder).encode())


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ckpt"), None
    server = request.getfixturevalue("s3_server")
    return server.uri(f"leases-{tmp_path.name}"), server.storage_options


def test_second_driver_of_a_live_job_gets_who_and_since(root):
    uri, opts = root
    with JobLease(uri, "job1", opts) as first:
        with pytest.raises(LeaseHeld) as held:
            JobLease(uri, "job1", opts).acquire()
        message = str(held.value)
        assert f"held by driver pid {os.getpid()} on " in message
        assert " since 20" in message and "expires 20s after its last heartbeat" in message
        assert first.generation == 0
        JobLease(uri, "other-job", opts).acquire().release()  # another job is not blocked
    # Released: the next driver takes the next generation at once.
    with JobLease(uri, "job1", opts) as second:
        assert second.generation == 1 and _generations(second) == [1]


def test_drivers_racing_for_a_free_lease_exactly_one_wins(root):
    uri, opts = root
    leases = [JobLease(uri, "race", opts) for _ in range(6)]
    outcomes: list[object] = [None] * len(leases)
    barrier = threading.Barrier(len(leases))

    def contend(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = leases[i].acquire()
        except LeaseHeld as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(leases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [o for o in outcomes if isinstance(o, JobLease)]
    assert len(winners) == 1, outcomes
    assert all(isinstance(o, LeaseHeld) for o in outcomes if o is not winners[0])
    winners[0].release()


def test_a_silent_remote_holder_expires_and_is_taken_over(root):
    """Another host's driver died: its heartbeat stops; the lease expires after ``ttl_s``."""
    uri, opts = root
    probe = JobLease(uri, "dead", opts, ttl_s=2.0)
    _remote_holder(probe, 4, heartbeat_age_s=0.5)  # fresh by its clock: must be watched
    with probe:
        assert probe.generation == 5 and _generations(probe) == [5]


def test_a_remote_holder_whose_heartbeat_moves_is_alive(root):
    uri, opts = root
    probe = JobLease(uri, "alive", opts, ttl_s=30.0)
    _remote_holder(probe, 0)
    stop = threading.Event()

    def beat() -> None:  # the other host's heartbeat thread
        beats = 3
        while not stop.wait(0.3):
            beats += 1
            holder = json.loads(probe.fs.open_input_stream(probe._path(0)).read())
            holder.update(heartbeat=time.time(), beats=beats)
            with probe.fs.open_output_stream(probe._path(0)) as f:
                f.write(json.dumps(holder).encode())

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        with pytest.raises(LeaseHeld, match="held by driver pid 1 on other-host"):
            probe.acquire()
    finally:
        stop.set()
        thread.join()


def test_a_holder_that_stalled_past_expiry_learns_it_lost_the_lease(tmp_path):
    uri = str(tmp_path / "ckpt")
    stalled = JobLease(uri, "job", ttl_s=1.0, heartbeat_s=0.2).acquire()
    # Simulate a stall (GC pause, frozen VM): no heartbeat, and its file looks old.
    stalled._stop.set()
    stalled._thread.join()
    holder = {**stalled.holder, "host": "frozen-host", "heartbeat": time.time() - 5}
    Path(stalled._path(0)).write_text(json.dumps(holder))
    with JobLease(uri, "job", ttl_s=1.0) as successor:
        assert successor.generation == 1
        assert not stalled._beat()  # it wakes up and tries to renew
        with pytest.raises(LeaseLost, match="took the lease over"):
            stalled.check()


# --- real drivers (the CLI in subprocesses, local executor: no Ray start) ----------


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH")) if p)
    return env


def _driver(uri: str, gate: Path, err: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "laion_ray.cli", "backfill", uri, "--udf", "helpers:held_ratio",
           "--param", f"helpers:held_ratio.gate={gate}", "--unit-rows", "50",
           "--executor", "local"]  # fmt: skip
    with open(err, "wb") as f:
        return subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=f)


def _lease_files(uri: str) -> list[Path]:
    return sorted((Path(uri) / "_laion_ray" / "leases").glob("*/*.json"))


def _wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := cond():
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def _ratios_are_complete(uri: str) -> None:
    table = lance.dataset(uri).to_table(columns=["width", "height", "ar_held"])
    assert table["ar_held"].null_count == sum(h == 0 for h in table["height"].to_pylist())


@pytest.mark.slow
def test_two_identical_drivers_started_together_one_runs_one_exits(tmp_path):
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=200, fragments=2, seed=21)
    gate = tmp_path / "gate"
    drivers = [_driver(uri, gate, tmp_path / f"d{i}.err") for i in range(2)]
    # The loser exits while the winner is held at the gate.
    loser = _wait_for(lambda: next((d for d in drivers if d.poll() is not None), None), 120,
                      "one driver to exit")  # fmt: skip
    winner = drivers[1 - drivers.index(loser)]
    # A job stopped by another driver is a failed job (exit 1), not bad input (2).
    assert loser.returncode == 1 and winner.poll() is None
    err = (tmp_path / f"d{drivers.index(loser)}.err").read_text()
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("laion-ray: failed:")]
    assert f"is already running: its lease is held by driver pid {winner.pid}" in line
    assert " since " in line
    gate.touch()
    assert winner.wait(timeout=120) == 0
    _ratios_are_complete(uri)


@pytest.mark.slow
def test_a_rerun_right_after_a_sigkill_does_not_wait_for_the_lease_to_expire(tmp_path):
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=200, fragments=2, seed=22)
    gate = tmp_path / "gate"
    first = _driver(uri, gate, tmp_path / "first.err")
    (lease_file,) = _wait_for(lambda: _lease_files(uri), 120, "the first driver's lease")
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    holder = json.loads(lease_file.read_text())
    assert holder["pid"] == first.pid and not holder["released"]

    gate.touch()
    rerun = _driver(uri, gate, tmp_path / "rerun.err")
    assert rerun.wait(timeout=120) == 0, (tmp_path / "rerun.err").read_text()[-2000:]
    # It took over while the dead driver's lease was still fresh by its heartbeat.
    (taken,) = _lease_files(uri)
    after = json.loads(taken.read_text())
    assert taken.name == "000000000001.json" and after["released"]
    assert after["since"] - holder["heartbeat"] < 20.0
    _ratios_are_complete(uri)
