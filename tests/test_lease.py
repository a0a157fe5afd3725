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

from laion_ray.backfill import backfill
from laion_ray.engine.lease import JobLease, LeaseHeld, LeaseLost, _name
from laion_ray.errors import StorageError
from laion_ray.sample import write_sample
from laion_ray.storage import object_store

TESTS_DIR = Path(__file__).resolve().parent


def _generations(lease: JobLease) -> list[int]:
    return lease._generations()


def _write_holder(lease: JobLease, generation: int, holder: dict) -> None:
    lease.store.put(_name(generation), json.dumps(holder).encode(), "overwrite")


def _read_holder(lease: JobLease, generation: int) -> dict:
    return json.loads(lease.store.get(_name(generation))[0])


def _remote_holder(
    lease: JobLease, generation: int, heartbeat_age_s: float = 0.0, **changes
) -> dict:
    """A lease file as a driver on another host writes it (its pid means nothing here)."""
    now = time.time()
    holder = {"host": "other-host", "pid": 1, "run": "f" * 32, "since": now - 60,
              "heartbeat": now - heartbeat_age_s, "beats": 3, "released": False}  # fmt: skip
    holder.update(changes)
    _write_holder(lease, generation, holder)
    return holder


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
            holder = _read_holder(probe, 0)
            holder.update(heartbeat=time.time(), beats=beats)
            _write_holder(probe, 0, holder)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        with pytest.raises(LeaseHeld, match="held by driver pid 1 on other-host"):
            probe.acquire()
    finally:
        stop.set()
        thread.join()


def _local_holder(lease: JobLease, generation: int, pid: int, started: int | None) -> None:
    """A lease file as a driver on this host wrote it: pid ``pid``, started at ``started``."""
    _remote_holder(lease, generation, host=lease.holder["host"], pid=pid, started=started)


def _start_ticks(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def test_a_holder_records_when_its_process_started(tmp_path):
    with JobLease(str(tmp_path / "ckpt"), "started") as lease:
        holder = _read_holder(lease, 0)
        assert holder["pid"] == os.getpid() and holder["started"] == _start_ticks(os.getpid())


@pytest.mark.parametrize("whose", ["another process", "this driver"])
def test_a_dead_drivers_pid_running_again_does_not_hold_the_lease(tmp_path, whose):
    """The holder's pid runs, but a process that started later: the driver is gone.

    Another process got the pid (pids wrap), or this very driver did (a
    restarted container numbers its processes alike). Taken at once, long
    before the ttl.
    """
    contender = JobLease(str(tmp_path / "ckpt"), "reused", ttl_s=60.0)
    with subprocess.Popen(["sleep", "60"]) as other:
        pid = other.pid if whose == "another process" else os.getpid()
        _local_holder(contender, 2, pid, started=_start_ticks(pid) - 100)
        started = time.monotonic()
        try:
            with contender:
                assert contender.generation == 3 and _generations(contender) == [3]
            assert time.monotonic() - started < 10.0
        finally:
            other.kill()


def test_a_live_driver_on_this_host_holds_the_lease(tmp_path):
    """Its pid runs the process that started when the holder did: LeaseHeld at first sight."""
    contender = JobLease(str(tmp_path / "ckpt"), "alive-here", ttl_s=60.0)
    with subprocess.Popen(["sleep", "60"]) as other:
        try:
            _local_holder(contender, 0, other.pid, started=_start_ticks(other.pid))
            with pytest.raises(LeaseHeld, match=f"held by driver pid {other.pid} on "):
                contender.acquire()
            other.kill()
            other.wait()
            with contender:  # once it died, its lease is taken at once
                assert contender.generation == 1
        finally:
            other.kill()


def test_a_holder_that_stalled_past_expiry_learns_it_lost_the_lease(tmp_path):
    uri = str(tmp_path / "ckpt")
    stalled = JobLease(uri, "job", ttl_s=1.0, heartbeat_s=0.2).acquire()
    # Simulate a stall (GC pause, frozen VM): no heartbeat, and its file looks old.
    stalled._stop.set()
    stalled._thread.join()
    holder = {**stalled.holder, "host": "frozen-host", "heartbeat": time.time() - 5}
    _write_holder(stalled, 0, holder)
    with JobLease(uri, "job", ttl_s=1.0) as successor:
        assert successor.generation == 1
        assert not stalled._beat()  # it wakes up and tries to renew
        with pytest.raises(LeaseLost, match="took the lease over"):
            stalled.check()


def _stop_heartbeat(lease: JobLease) -> None:
    """Freeze a holder's heartbeat thread (a GC pause, a frozen VM): its file stands still."""
    lease._stop.set()
    lease._thread.join()


def _beating(lease: JobLease, generation: int, holder: dict, *, clock_offset_s: float):
    """Another host's live heartbeat thread whose wall clock is ``clock_offset_s`` off."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(0.2):
            holder.update(heartbeat=time.time() + clock_offset_s, beats=holder["beats"] + 1)
            _write_holder(lease, generation, holder)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    return stop, thread


@pytest.mark.parametrize("offset_s", [-3600.0, 3600.0])
def test_a_live_remote_holder_with_a_skewed_clock_is_never_taken_over(root, offset_s):
    """Its heartbeat moves: alive, however far its wall clock is from ours."""
    uri, opts = root
    contender = JobLease(uri, f"skew-alive-{offset_s:+.0f}", opts, ttl_s=2.0)
    now = time.time() + offset_s
    holder = _remote_holder(contender, 0, since=now - 60, heartbeat=now)
    stop, thread = _beating(contender, 0, holder, clock_offset_s=offset_s)
    try:
        with pytest.raises(LeaseHeld, match="held by driver pid 1 on other-host"):
            contender.acquire()
    finally:
        stop.set()
        thread.join()
    assert _generations(contender) == [0] and contender.generation is None


@pytest.mark.parametrize("offset_s", [-3600.0, 3600.0])
def test_a_dead_remote_holder_with_a_skewed_clock_expires_after_ttl_by_our_clock(root, offset_s):
    """Its heartbeat stands still: taken over once we watched it for ``ttl_s``, not sooner."""
    uri, opts = root
    ttl_s = 2.0
    contender = JobLease(uri, f"skew-dead-{offset_s:+.0f}", opts, ttl_s=ttl_s)
    now = time.time() + offset_s
    _remote_holder(contender, 3, since=now - 60, heartbeat=now - 30)
    started = time.monotonic()
    with contender:
        waited = time.monotonic() - started
        assert contender.generation == 4 and _generations(contender) == [4]
    # A correctness bound, not a speed one: its clock said "stale" (or "fresh for
    # an hour"); only our own watch of its beats may decide, and that takes ttl_s.
    assert waited >= ttl_s


def test_beat_notices_its_file_was_replaced_by_another_run(root):
    """Same generation, another run (a store that ignored the create, a manual edit)."""
    uri, opts = root
    lease = JobLease(uri, "replaced", opts, ttl_s=5.0, heartbeat_s=0.2).acquire()
    _stop_heartbeat(lease)
    intruder = _remote_holder(lease, lease.generation, run="e" * 32)
    assert not lease._beat()
    with pytest.raises(LeaseLost, match="was replaced by run eeeeeeee"):
        lease.check()
    assert _read_holder(lease, lease.generation) == intruder  # it did not write over it
    lease.release()
    assert _read_holder(lease, lease.generation) == intruder  # nor when releasing


def test_fence_passes_while_held_and_carries_a_token(root):
    uri, opts = root
    with JobLease(uri, "fenced", opts) as lease:
        beats = _read_holder(lease, 0)["beats"]
        token = lease.fence()
        assert token == {"lease_generation": "0", "lease_run": lease.holder["run"]}
        assert token == lease.token
        # It went to the store: the file was renewed, not just memory consulted.
        assert _read_holder(lease, 0)["beats"] == beats + 1


def test_fence_raises_lease_lost_once_another_driver_took_over(root):
    uri, opts = root
    stalled = JobLease(uri, "taken", opts, ttl_s=1.0, heartbeat_s=0.2).acquire()
    _stop_heartbeat(stalled)
    _write_holder(stalled, 0, {**stalled.holder, "host": "frozen-host"})
    with JobLease(uri, "taken", opts, ttl_s=1.0) as successor:
        assert successor.generation == 1
        assert stalled.lost is None  # its heartbeat never ran: only the fence can tell
        with pytest.raises(LeaseLost, match="took the lease over"):
            stalled.fence()
        assert successor.fence()["lease_generation"] == "1"


def test_fence_raises_lease_lost_when_its_file_holds_another_run(root):
    uri, opts = root
    lease = JobLease(uri, "swapped", opts, heartbeat_s=10.0).acquire()
    _remote_holder(lease, 0, run="d" * 32)
    with pytest.raises(LeaseLost, match="replaced by run dddddddd"):
        lease.fence()
    lease.release()


def test_fence_refuses_after_renewals_stopped_for_longer_than_is_safe(tmp_path):
    """No newer generation yet, but a contender may be about to take over: do not commit."""
    lease = JobLease(str(tmp_path / "ckpt"), "late", ttl_s=1.0, heartbeat_s=0.2).acquire()
    _stop_heartbeat(lease)
    time.sleep(1.0)  # past ttl_s - heartbeat_s without a renewal
    with pytest.raises(LeaseLost, match="could not renew its lease"):
        lease.fence()
    assert _generations(lease) == [0]


def _listing_stale_once(lease: JobLease) -> None:
    """This racer's first listing was taken before the other racer's create landed."""
    real = lease._generations
    calls = iter([lambda: []])
    lease._generations = lambda: next(calls, real)()


def test_a_store_that_ignores_conditional_create_never_has_two_holders(faulty_s3, tmp_path):
    """Emulated with the proxy dropping ``If-None-Match``: the race two drivers would win."""
    proxy, server = faulty_s3
    uri = server.uri(f"leases-{tmp_path.name}")
    # The same proxy, keeping the header: the lease works (the check is no false alarm).
    JobLease(uri, "honoured", server.storage_options).acquire().release()
    proxy.strip_header("If-None-Match")
    holders, refused = [], []
    for _ in range(2):  # both list "no generation", then both create generation 0
        lease = JobLease(uri, "race", server.storage_options)
        _listing_stale_once(lease)
        try:
            holders.append(lease.acquire())
        except StorageError as exc:
            refused.append(str(exc))
    for lease in holders:
        lease.release()
    assert proxy.injected["stripped"] > 0  # the store really saw no conditional header
    assert len(holders) <= 1, "two drivers hold the lease of one job"
    assert refused and all("ignores conditional writes" in m for m in refused), refused


def test_the_lease_rides_out_transient_store_faults(faulty_s3, tmp_path):
    """5% of requests fail (500, 503, SlowDown, cut-off replies): acquire, fences, release."""
    proxy, server = faulty_s3
    uri = server.uri(f"leases-{tmp_path.name}")
    before = proxy.injected_total()
    with proxy.faults(rate=0.05):
        for i in range(8):
            with JobLease(uri, f"flaky-{i}", server.storage_options) as lease:
                for _ in range(5):
                    assert lease.fence()["lease_generation"] == "0"
            assert _read_holder(lease, 0)["released"]
    assert proxy.injected_total() > before  # faults were injected into these requests


def test_object_store_takes_lance_style_options_for_every_store(tmp_path):
    """Lance's option names map onto obstore (store keys, HTTP client keys, Lance-only keys)."""
    s3 = object_store(
        "s3://bucket/ckpt/leases/job",
        {"aws_access_key_id": "AKIA", "aws_secret_access_key": "s3cr3t",
         "aws_endpoint": "http://127.0.0.1:9", "aws_region": "eu-west-1",
         "allow_http": "true", "download_retry_count": "3", "client_max_retries": "2"},
    )  # fmt: skip
    assert s3.config["access_key_id"] == "AKIA" and s3.config["region"] == "eu-west-1"
    assert s3.config["endpoint"] == "http://127.0.0.1:9"
    assert s3.client_options["allow_http"] == "true" and s3.retry_config["max_retries"] == 2
    assert s3.prefix == "ckpt/leases/job"
    gcs = object_store("gs://bucket/ckpt", {"google_skip_signature": "true", "timeout": "7s"})
    assert gcs.config["skip_signature"] == "true" and gcs.client_options["timeout"] == "7s"
    for key_name in ("azure_storage_account_key", "account_key", "access_key"):
        azure = object_store(
            "az://container/ckpt",
            {"azure_storage_account_name": "acct", key_name: "c2VjcmV0", "allow_http": "true"},
        )
        assert azure.config["account_name"] == "acct" and azure.config["account_key"] == "c2VjcmV0"
        assert azure.config["container_name"] == "container"
    local = object_store(str(tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b").is_dir() and local.prefix is not None


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


def _backfill_in_thread(uri: str, gate: Path) -> tuple[threading.Thread, list]:
    """A backfill in this process (local executor), held at ``gate`` before its commit."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(backfill(uri, udfs=["helpers:held_ratio"], executor="local",
                                    udf_params={"helpers:held_ratio": {"gate": str(gate)}}))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.slow
def test_a_driver_whose_lease_was_taken_over_commits_nothing(tmp_path, monkeypatch):
    """Its heartbeat thread stood still (a frozen thread, a GC pause), so only
    the fence right before the commit can tell that another driver took over."""
    monkeypatch.setattr(JobLease, "_heartbeat", lambda self: None)
    uri, gate = str(tmp_path / "d.lance"), tmp_path / "gate"
    write_sample(uri, rows=200, fragments=2, seed=25)
    version = lance.dataset(uri).version
    thread, outcome = _backfill_in_thread(uri, gate)
    (lease_file,) = _wait_for(lambda: _lease_files(uri), 120, "the driver's lease")
    holder = json.loads(lease_file.read_text())
    taken = {**holder, "host": "other-host", "pid": 1, "run": "c" * 32, "beats": 0}
    lease_file.with_name(_name(int(lease_file.stem) + 1)).write_text(json.dumps(taken))
    gate.touch()
    thread.join(120)
    (exc,) = outcome
    assert isinstance(exc, LeaseLost) and "took the lease over" in str(exc), exc
    ds = lance.dataset(uri)
    assert ds.version == version and "ar_held" not in ds.schema.names  # not even its columns


@pytest.mark.slow
def test_every_commit_of_a_job_carries_its_lease_token(tmp_path):
    uri, gate = str(tmp_path / "d.lance"), tmp_path / "gate"
    write_sample(uri, rows=200, fragments=2, seed=26)
    version = lance.dataset(uri).version
    gate.touch()
    thread, outcome = _backfill_in_thread(uri, gate)
    thread.join(120)
    assert outcome and not isinstance(outcome[0], Exception), outcome
    (lease_file,) = _lease_files(uri)
    holder = json.loads(lease_file.read_text())
    ds = lance.dataset(uri)
    commits = [ds.read_transaction(v) for v in range(version + 1, ds.version + 1)]
    assert {type(t.operation).__name__ for t in commits} >= {"Project", "DataReplacement"}
    for transaction in commits:
        properties = transaction.transaction_properties
        assert properties["laion_ray.lease_generation"] == str(int(lease_file.stem))
        assert properties["laion_ray.lease_run"] == holder["run"]


def test_import_and_a_local_backfill_need_no_obstore(tmp_path):
    """An offline GPU machine gets no obstore (../shared/tools/device_kit.sh packs none).

    ``import laion_ray`` and a job whose lease is on local disk run without it:
    obstore is imported for an object store only.
    """
    uri = str(tmp_path / "d.lance")
    write_sample(uri, rows=60, fragments=2, seed=23)
    code = (
        "import sys; sys.modules['obstore'] = None  # any import of it fails\n"
        "import laion_ray\n"
        f"laion_ray.backfill({uri!r}, udfs=['aspect-ratio'], executor='local')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (lease_file,) = _lease_files(uri)
    assert json.loads(lease_file.read_text())["released"]
    assert lance.dataset(uri).to_table(columns=["aspect_ratio"]).num_rows == 60
