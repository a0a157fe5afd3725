"""A real two-node Ray cluster on this machine: ``ray job submit``, node loss, resume.

The head runs no work (``--num-cpus=0``, as in ``cluster.yaml``) and hosts the
job server; one worker node carries every task. Both nodes are ``ray start``
processes in sessions of their own, with their own temp dirs and ports, so the
test never touches another Ray on the machine: it stops only the processes of
its own sessions (and their descendants), never with ``ray stop``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lance
import pyarrow as pa
import pytest
import yaml

from laion_ray.sample import write_sample
from laion_ray.udfs.aspect_ratio import aspect_ratio

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
RAY = shutil.which("ray") or "ray"


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held open together while picking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, session id, command line) for every process on the machine."""
    out = subprocess.run(
        ["ps", "-eo", "pid=,ppid=,sid=,args="], capture_output=True, text=True, check=True
    ).stdout
    procs = {}
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) >= 3:
            procs[int(parts[0])] = (
                int(parts[1]),
                int(parts[2]),
                parts[3] if len(parts) > 3 else "",
            )
    return procs


def _exe(pid: int) -> str:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/exe")
    return ""


class LocalCluster:
    """Head and worker nodes started by ``ray start``, each in a session of its own.

    A node's processes (GCS, raylet, dashboard, agents, workers) all stay in the
    session of the ``ray start`` that launched them, so the session id names a
    node. Job drivers get sessions of their own but descend from the head's
    processes, so ``stop`` also collects descendants.
    """

    def __init__(self) -> None:
        # Short root: Ray puts Unix sockets under it (108-byte path limit).
        self.root = Path(tempfile.mkdtemp(prefix="lrc-", dir="/tmp"))
        self.port, self.dashboard_port = _free_ports(2)
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.sessions: dict[str, int] = {}  # node name -> session id (= ray start's pid)
        self.known_nodes: dict[str, str] = {}  # Ray node id -> node name
        self.worker_id = ""
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"
        }
        self.env.update(
            RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
            RAY_USAGE_STATS_ENABLED="0",
            # Loopback test cluster: no token auth. Set explicitly because with the
            # mode unset `ray start --head` turns it on whenever ~/.ray/auth_token
            # exists, while a joining worker does not, and cannot connect.
            RAY_AUTH_MODE="disabled",
        )

    def _node_ports(self) -> list[str]:
        names = (
            "node-manager-port",
            "object-manager-port",
            "metrics-export-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
        )
        return [f"--{n}={p}" for n, p in zip(names, _free_ports(len(names)), strict=True)]

    def _start(self, name: str, args: list[str]) -> None:
        temp = self.root / name
        temp.mkdir()
        log = open(self.root / f"{name}.start.log", "w")  # noqa: SIM115 - closed below
        with log:
            proc = subprocess.Popen(
                [
                    RAY,
                    "start",
                    "--node-ip-address=127.0.0.1",
                    f"--temp-dir={temp}",
                    "--object-store-memory=200000000",
                    "--disable-usage-stats",
                    *self._node_ports(),
                    *args,
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.sessions[name] = proc.pid
            rc = proc.wait(timeout=120)
        if rc != 0:
            raise RuntimeError(f"ray start ({name}) failed:\n{self.log(name)}")

    def log(self, name: str) -> str:
        path = self.root / f"{name}.start.log"
        return path.read_text() if path.exists() else ""

    def start_head(self, *, num_cpus: int = 0) -> None:
        (client_port,) = _free_ports(1)
        self._start(
            "head",
            [
                "--head",
                f"--port={self.port}",
                f"--num-cpus={num_cpus}",
                "--num-gpus=0",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={client_port}",
            ],
        )

    def start_worker(self, name: str, *, num_cpus: int = 2, num_gpus: int = 0) -> str:
        """Start a worker node and return its Ray node id once the head sees it alive.

        ``num_gpus`` declares logical GPUs (Ray accepts them on a CPU machine).
        ``ray start`` gives a joining raylet a fixed 30 s to register, which a
        loaded CI machine can miss; one more try (after clearing the first) is fine.
        """
        args = [
            f"--address={self.address}",
            f"--num-cpus={num_cpus}",
            f"--num-gpus={num_gpus}",
            '--resources={"laion_worker": 1}',
        ]
        try:
            self._start(name, args)
        except RuntimeError:
            self._kill(self._owned(names=[name]))
            shutil.rmtree(self.root / name, ignore_errors=True)
            self._start(name, args)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for node in self.nodes():
                if (
                    node["state"] == "ALIVE"
                    and node["node_id"] not in self.known_nodes
                    and "laion_worker" in node.get("resources_total", {})
                ):
                    self.known_nodes[node["node_id"]] = name
                    return node["node_id"]
            time.sleep(1)
        raise RuntimeError(f"worker {name} never joined:\n{self.log(name)}")

    def ray(self, *args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            [RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout, **kw
        )

    def nodes(self) -> list[dict]:
        from ray.util.state import list_nodes

        return [
            n.__dict__ if hasattr(n, "__dict__") else dict(n)
            for n in list_nodes(address=self.dashboard, detail=True, raise_on_missing_output=False)
        ]

    def session_pids(self, name: str) -> dict[int, str]:
        sid = self.sessions[name]
        return {pid: cmd for pid, (_, s, cmd) in _processes().items() if s == sid}

    def raylet_log(self, name: str) -> str:
        """The end of the node's raylet log, for failure messages."""
        logs = sorted((self.root / name).glob("session_*/logs/raylet.out"))
        return logs[-1].read_text()[-3000:] if logs else "(no raylet log)"

    def raylet_pid(self, name: str) -> int:
        pids = [
            pid
            for pid, cmd in self.session_pids(name).items()
            if _exe(pid).endswith("/raylet") or "/raylet/raylet " in cmd
        ]
        assert len(pids) == 1, (
            f"raylets of {name}: {pids}; sessions {self.sessions}; "
            f"{ {n: len(self.session_pids(n)) for n in self.sessions} }\n"
            f"{ {p: c[:100] for p, c in self.session_pids(name).items()} }\n{self.raylet_log(name)}"
        )
        return pids[0]

    def kill_node(self, name: str) -> int:
        """SIGKILL the node's raylet, then whatever is left of it (a lost spot machine)."""
        raylet = self.raylet_pid(name)
        os.kill(raylet, signal.SIGKILL)
        self._kill(self._owned(names=[name]))
        return raylet

    @staticmethod
    def _kill(pids: set[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def _owned(self, names: list[str] | None = None) -> set[int]:
        """Processes of our nodes' sessions and all their descendants."""
        procs = _processes()
        sids = {self.sessions[n] for n in (names or self.sessions)}
        owned = {pid for pid, (_, sid, _) in procs.items() if sid in sids}
        grew = True
        while grew:
            more = {pid for pid, (ppid, _, _) in procs.items() if ppid in owned} - owned
            owned |= more
            grew = bool(more)
        owned.discard(os.getpid())
        return owned

    def stop(self) -> None:
        """Stop every process this cluster started: SIGTERM, then SIGKILL.

        Each round re-scans the sessions: a raylet may still spawn a worker
        while it is being stopped, and that worker must not outlive the test.
        """
        owned: set[int] = set()
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0), (signal.SIGKILL, 5.0)):
            owned = (owned | (self._owned() if self.sessions else set())) & set(_processes())
            for pid in owned:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while owned and time.monotonic() < deadline:
                time.sleep(0.2)
                owned &= set(_processes())
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPUs, job server) plus one worker node; stopped even on failure."""
    from ray._private.utils import get_dashboard_dependency_error

    if (missing := get_dashboard_dependency_error()) is not None:
        pytest.skip(f"the job server needs ray[default] (dashboard): {missing}")
    c = LocalCluster()
    try:
        c.start_head()
        c.worker_id = c.start_worker("worker-1")
        yield c
    finally:
        c.stop()


def _runtime_env(**env_vars: str) -> str:
    """``jobs/runtime_env.yaml`` with this checkout as working dir and extra env vars."""
    spec = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    spec["working_dir"] = str(REPO)
    spec["env_vars"] = {**spec.get("env_vars", {}), **env_vars}
    return json.dumps(spec)


def _submit_cmd(cluster: LocalCluster, runtime_env: list[str], entrypoint: list[str]) -> list[str]:
    return [RAY, "job", "submit", "--address", cluster.dashboard, *runtime_env, "--", *entrypoint]


def test_job_submit_runs_on_worker(cluster, tmp_path):
    uri = str(tmp_path / "ar.lance")
    write_sample(uri, rows=400, fragments=4, seed=3)
    t0 = time.monotonic()
    proc = subprocess.run(
        _submit_cmd(
            cluster,
            ["--working-dir", str(REPO), "--runtime-env", str(REPO / "jobs/runtime_env.yaml")],
            ["python", "jobs/aspect_ratio.py", uri, "--unit-rows", "50", "--tag", "ar-v1"],
        ),
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    print(f"aspect_ratio job: {time.monotonic() - t0:.1f}s")
    assert "backfill config:" in out and "400 rows processed" in out, out[-4000:]

    ds = lance.dataset(uri)
    table = ds.to_table(columns=["width", "height", "aspect_ratio", "is_high_res"])
    expected = aspect_ratio.compute(table.select(["width", "height"]))
    for name in ("aspect_ratio", "is_high_res"):
        assert table[name].to_pylist() == expected[name].to_pylist(), name
    assert "ar-v1" in ds.tags.list()

    # All work ran on the worker: the head has no CPUs, and the state API says so.
    from ray.util.state import list_tasks

    head = [n for n in cluster.nodes() if n["is_head_node"]]
    assert len(head) == 1 and head[0]["resources_total"].get("CPU", 0) == 0
    tasks = list_tasks(address=cluster.dashboard, detail=True, limit=10000)
    work = [
        t
        for t in tasks
        if t.state == "FINISHED"
        and any(s in t.name for s in ("run_lane", "MapBatches", "ReadLane", "assemble_fragment"))
    ]
    assert work, sorted({t.name for t in tasks})
    assert {t.node_id for t in work} == {cluster.worker_id}, [(t.name, t.node_id) for t in work]


def _log_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_worker_loss_mid_job(cluster, tmp_path):
    uri = str(tmp_path / "slow.lance")
    rows = 1200
    write_sample(uri, rows=rows, fragments=4, seed=4)
    key_log = tmp_path / "keys.log"
    env = _runtime_env(
        PYTHONPATH=str(TESTS),
        LAION_RAY_TEST_DELAY="1.0",
        LAION_RAY_TEST_LOG=str(key_log),
    )
    cmd = _submit_cmd(
        cluster,
        ["--runtime-env-json", env],
        [
            "python",
            "-m",
            "laion_ray.cli",
            "backfill",
            uri,
            "--udf",
            "helpers:slow_ratio",
            "--unit-rows",
            "50",
            "--commit-every",
            "3",
        ],
    )
    t0 = time.monotonic()
    job = subprocess.Popen(
        cmd, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # Kill the worker once a few batches (of 24) are done, well before the end.
        deadline = time.monotonic() + 180
        while _log_lines(key_log) < 4:
            assert job.poll() is None, f"job ended before the kill:\n{job.stdout.read()[-4000:]}"
            assert time.monotonic() < deadline, "no batch finished within 180 s"
            time.sleep(0.2)
        done_before_kill = _log_lines(key_log)
        raylet = cluster.kill_node("worker-1")
        t_kill = time.monotonic()
        print(f"killed raylet {raylet} after {t_kill - t0:.1f}s, {done_before_kill} batches done")
        cluster.start_worker("worker-2")
        print(f"worker-2 joined {time.monotonic() - t_kill:.1f}s after the kill")
        out, _ = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    print(f"first submission: rc={job.returncode} after {time.monotonic() - t0:.1f}s")
    outcome = "completed"
    if job.returncode != 0:
        outcome = "resubmitted"
        t1 = time.monotonic()
        rerun = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=240)
        out = rerun.stdout + rerun.stderr
        assert rerun.returncode == 0, out[-4000:]
        print(f"resubmission: {time.monotonic() - t1:.1f}s")
        assert "resum" in out, out[-4000:]
    print(f"after the worker kill the job {outcome}; {_log_lines(key_log)} batches computed")

    table = lance.dataset(uri).to_table(columns=["key", "width", "height", "ar_slow"])
    assert table.num_rows == rows
    width = table["width"].to_numpy().astype("float64")
    height = table["height"].to_numpy().astype("float64")
    expected = pa.array([w / h if h > 0 else None for w, h in zip(width, height, strict=True)])
    assert table["ar_slow"].to_pylist() == expected.to_pylist()
    # Every key was computed at least once, and the checkpoint was cleaned up.
    logged = {int(k) for line in key_log.read_text().split("\n") for k in line.split()}
    assert logged == set(table["key"].to_pylist())
    leftovers = [p for p in (Path(uri) / "_laion_ray" / "jobs").rglob("*") if p.is_file()]
    assert not leftovers, leftovers


if __name__ == "__main__":  # pragma: no cover - manual runs
    sys.exit(pytest.main([__file__, "-x", "-q", "-s"]))
