"""One driver per job: a lease with a heartbeat, next to the job's checkpoint.

Two drivers of the same job (a resubmit while the first still runs) would both
append to the ledger, both rewrite ``job.json``, and the first to finish would
delete the checkpoint under the second. So a driver first takes the job's
lease and holds it until it returns.

Layout: ``<checkpoint root>/leases/<fingerprint>/<generation>.json``. Each
file is a holder (host, pid, run id, since, heartbeat). A generation is taken
by an atomic create-if-absent: ``open(O_CREAT | O_EXCL)`` on local disk, a PUT
with ``If-None-Match: *`` on S3 (read back, for stores that ignore the
header). So when a lease has expired and several drivers try to take the
next generation, exactly one gets it. The holder rewrites its own file every
``HEARTBEAT_S``; a holder that sees a newer generation has lost the lease and
stops before its next commit. The files live beside the job's checkpoint
directory, not in it, so removing a finished job's checkpoint never resets
the generations; a released lease stays as one small file per job.

A driver that finds the lease held:

- exits with :class:`LeaseHeld` (who holds it, since when) once it sees the
  holder is alive: the holder's pid runs on this host, or its heartbeat moves;
- takes it over once it is released or expired: no heartbeat for
  ``LEASE_TTL_S`` (by the holder's clock or by watching it), or, on the same
  host, the holder's pid is gone. A rerun after a SIGKILL therefore starts at
  once on the same host and waits at most ``LEASE_TTL_S`` elsewhere.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from laion_ray.errors import JobFailed
from laion_ray.storage import filesystem, is_local, join_uri, resolve_storage_options

log = logging.getLogger(__name__)

LEASE_TTL_S = 20.0
HEARTBEAT_S = 5.0
POLL_S = 0.5
SETTLE_S = 1.0  # write-then-read-back on stores without conditional writes


UNREADABLE = {"host": "?", "pid": -1, "run": "?", "since": 0.0, "beats": -1, "released": False}


class LeaseHeld(JobFailed):
    """Another live driver runs this job."""


class LeaseLost(JobFailed):
    """This driver stopped heartbeating long enough for another to take over."""


def _now() -> float:
    return time.time()


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):  # a zombie is dead for our purpose
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


class JobLease:
    """The lease of one job; use as a context manager around the driver's work.

    Examples:
        >>> with JobLease(root, fingerprint, storage_options):  # doctest: +SKIP
        ...     run_the_job()
    """

    def __init__(
        self,
        root: str,
        fingerprint: str,
        storage_options: Mapping[str, str] | None = None,
        *,
        ttl_s: float = LEASE_TTL_S,
        heartbeat_s: float = HEARTBEAT_S,
    ):
        self.uri = join_uri(root, "leases", fingerprint)
        self.fingerprint = fingerprint
        self.opts = resolve_storage_options(storage_options)
        self.ttl_s, self.heartbeat_s = ttl_s, heartbeat_s
        self.fs, self.dir = filesystem(self.uri, self.opts)
        self.holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "run": uuid.uuid4().hex,
            "since": None,
            "heartbeat": None,
            "beats": 0,
            "released": False,
        }
        self.generation: int | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- public ---------------------------------------------------------------
    def acquire(self) -> JobLease:
        """Take the lease, waiting at most ``ttl_s`` for an unresponsive holder.

        Raises:
            LeaseHeld: A live driver holds it.
        """
        watched: dict[int, tuple[int, float]] = {}  # generation -> (beats, first seen)
        while True:
            generations = self._generations()
            candidate = 0
            if generations:
                top = generations[-1]
                # None: being written this instant (look again), or unreadable for
                # good (then it expires by watching, like a silent holder).
                holder = self._read(top) or {**UNREADABLE, "heartbeat": _now()}
                beats, first_seen = watched.setdefault(top, (holder["beats"], time.monotonic()))
                if not self._expired(holder, beats, first_seen):
                    if holder["beats"] != beats or self._alive_here(holder):
                        raise LeaseHeld(self._held_message(holder))
                    time.sleep(POLL_S)
                    continue
                log.info("taking over the expired lease of job %s: %s", self.fingerprint, holder)
                candidate = top + 1
            now = _now()
            self.holder.update(since=now, heartbeat=now)
            if self._create(candidate):
                self.generation = candidate
                for old in generations:
                    with contextlib.suppress(OSError):
                        self.fs.delete_file(self._path(old))
                self._thread = threading.Thread(
                    target=self._heartbeat, name="laion-ray-lease", daemon=True
                )
                self._thread.start()
                return self
            # Another driver took this generation first: look at it.

    def check(self) -> None:
        """Raise :class:`LeaseLost` if another driver has taken the lease over."""
        if self.lost:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        """Stop heartbeating and mark the lease released: the next driver starts at once."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if not self.lost:
            self.holder.update(released=True, heartbeat=_now())
            with contextlib.suppress(OSError):
                self._write(self.generation)

    def __enter__(self) -> JobLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # --- holder state -----------------------------------------------------------
    def _expired(self, holder: dict, beats: int, first_seen: float) -> bool:
        if holder["released"] or _now() - holder["heartbeat"] > self.ttl_s:
            return True
        if holder["host"] == self.holder["host"] and not _pid_alive(holder["pid"]):
            return True  # its driver died on this host: no need to wait
        # Clocks may differ between hosts: also expire what we saw stand still.
        return holder["beats"] == beats and time.monotonic() - first_seen > self.ttl_s

    def _alive_here(self, holder: dict) -> bool:
        return holder["host"] == self.holder["host"] and _pid_alive(holder["pid"])

    def _held_message(self, holder: dict) -> str:
        return (
            f"job {self.fingerprint} is already running: its lease is held by driver pid "
            f"{holder['pid']} on {holder['host']} (run {holder['run'][:8]}) since "
            f"{_iso(holder['since'])}, last heartbeat {max(0.0, _now() - holder['heartbeat']):.0f}s "
            f"ago. Wait for it to finish or stop it; a dead driver's lease expires "
            f"{self.ttl_s:.0f}s after its last heartbeat ({self.uri})"
        )

    def _heartbeat(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._beat():
                    return
                last_ok = time.monotonic()
            except OSError as exc:  # transient: keep trying until the lease would expire
                log.warning("lease heartbeat of job %s failed: %s", self.fingerprint, exc)
                if time.monotonic() - last_ok > self.ttl_s:
                    self.lost = (
                        f"job {self.fingerprint}: no lease heartbeat could be written for "
                        f"{self.ttl_s:.0f}s ({exc}); this driver stops"
                    )
                    return

    def _beat(self) -> bool:
        """Renew the lease once; False, with :attr:`lost` set, if another driver took it."""
        newer = self._generations()
        if newer and newer[-1] > self.generation:
            holder = self._read(newer[-1]) or UNREADABLE
            self.lost = (
                f"job {self.fingerprint}: driver pid {holder['pid']} on {holder['host']} "
                f"took the lease over after this driver missed its heartbeats for "
                f"{self.ttl_s:.0f}s; this driver stops"
            )
            return False
        self.holder.update(heartbeat=_now(), beats=self.holder["beats"] + 1)
        self._write(self.generation)
        return True

    # --- storage ----------------------------------------------------------------
    def _path(self, generation: int) -> str:
        return f"{self.dir}/{generation:012d}.json"

    def _generations(self) -> list[int]:
        selector = pafs.FileSelector(self.dir, allow_not_found=True)
        try:
            names = [info.base_name for info in self.fs.get_file_info(selector)]
        except FileNotFoundError:
            # pyarrow's local listing fails, despite allow_not_found, when the
            # directory is missing as it lists and a racing driver creates it
            # before pyarrow checks again: there was no generation yet.
            return []
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def _read(self, generation: int) -> dict | None:
        try:
            with self.fs.open_input_stream(self._path(generation)) as f:
                return json.loads(f.read().decode())
        except FileNotFoundError:
            return None
        except ValueError:  # a local create seen before its bytes: look again
            return None

    def _write(self, generation: int) -> None:
        with self.fs.open_output_stream(self._path(generation)) as f:
            f.write(json.dumps(self.holder).encode())

    def _create(self, generation: int) -> bool:
        """Create ``generation`` if absent; True if this driver's file is the one there."""
        path, body = self._path(generation), json.dumps(self.holder).encode()
        if is_local(self.uri):
            os.makedirs(self.dir, exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            return True
        if urlparse(self.uri).scheme in ("s3", "s3a"):
            if not _s3_put_if_absent(path, body, self.opts):
                return False
        else:  # no conditional create in pyarrow: write, let racers land, read back
            if self._read(generation) is not None:
                return False
            self._write(generation)
            time.sleep(SETTLE_S)
        # Read back: guards stores that accept but ignore If-None-Match.
        theirs = self._read(generation)
        return theirs is not None and theirs["run"] == self.holder["run"]


def _s3_put_if_absent(path: str, body: bytes, opts: Mapping[str, str]) -> bool:
    """PUT with ``If-None-Match: *`` (S3 and compatible stores); False if the key exists."""
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.session.Session().client(  # a session per call: thread-safe
        "s3",
        endpoint_url=opts.get("aws_endpoint") or opts.get("endpoint") or None,
        aws_access_key_id=opts.get("aws_access_key_id"),
        aws_secret_access_key=opts.get("aws_secret_access_key"),
        aws_session_token=opts.get("aws_session_token"),
        region_name=opts.get("aws_region") or opts.get("region") or "us-east-1",
    )
    bucket, _, key = path.partition("/")
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status in (409, 412):  # exists, or a concurrent conditional write won
            return False
        raise
    return True
