"""One driver per job: a lease with a heartbeat, next to the job's checkpoint.

Two drivers of the same job (a resubmit while the first still runs) would both
write parts and commit the same fragments, and the first to finish would
delete the checkpoint under the second. So a driver first takes the job's
lease and holds it until it returns.

Layout: ``<checkpoint root>/leases/<fingerprint>/<generation>.json``. Each
file is a holder (host, pid, the process's start ``started``, run id, since,
heartbeat sequence number ``beats``). The files live beside the job's
checkpoint directory, not in it, so removing a finished job's checkpoint never
resets the generations; a released lease stays as one small file per job.

**Taking a generation** is an atomic create-if-absent. On local disk it
takes the standard library alone (an offline GPU machine may lack obstore):
the body is written to a temp file, synced, and hard-linked to its name,
which fails if the name exists (the guarantee of ``O_EXCL``, and the content
appears whole with the name). On an object store it is obstore's
``put(mode="create")`` (the Rust object_store crate, as Lance uses; imported
only then): ``If-None-Match: *`` on S3 and Azure,
``x-goog-if-generation-match: 0`` on GCS. Of several drivers racing for the
next generation exactly one gets it. A create whose reply was lost and that
object_store retried comes back as "already exists": the file is then read,
and it is ours if it holds our bytes.

**A store that accepts but ignores the conditional header** (some
S3-compatible servers, or a proxy that drops it) would let every racer
"create" the same generation, and a read-back cannot tell (each racer may read
its own write before the next one lands). Nothing built from plain PUTs and
GETs on such a store is safe, so the lease refuses to run there: before every
acquisition it creates a probe object twice, and a second create that succeeds
raises :class:`ConditionalWritesIgnored` (a :class:`StorageError`, exit 1)
naming the store; putting the checkpoint on a store that honours conditional
writes (``--checkpoint-uri``) is the way out. The probe costs three requests
per job start.

**Heartbeat.** The holder renews its file every ``HEARTBEAT_S``, incrementing
``beats``. Each renewal first checks that no newer generation exists and that
its file still holds its own run, then replaces it conditionally on the e-tag
it just read (on local disk, a synced temp file renamed over what it read). A
renewal that finds either changed marks the lease lost: the holder stops
before its next commit.

**Expiry is judged by the contender's own clock**, never by comparing wall
clocks across hosts. A driver that finds the lease held:

- takes it over at once when the holder has ``released`` it, or, on the same
  host, when the holder's process is gone (a rerun after a SIGKILL starts at
  once). A process is its pid *and* its start: once a driver died, its pid may
  be given to another process, or to this very driver (a restarted container
  numbers its processes alike), and neither holds the lease;
- exits with :class:`LeaseHeld` (who holds it, since when) as soon as it sees
  the holder alive: its process runs on this host, or its ``beats`` move;
- takes it over when ``beats`` has not moved for ``LEASE_TTL_S`` by its own
  monotonic clock (on another host a rerun waits that long).

**Fencing.** The write-back calls :meth:`JobLease.fence` right before every
commit and puts :attr:`JobLease.token` (generation and run id) into the
commit's transaction properties. ``fence`` renews the lease synchronously, so
it re-reads the store: it raises :class:`LeaseLost` unless this driver still
holds the newest generation with its own run, and also when its last
successful renewal is older than ``ttl_s - heartbeat_s`` (a contender watching
a stalled holder may be about to take over). A commit that follows a
successful ``fence`` therefore starts inside a lease that no other driver can
take for at least ``heartbeat_s``; the heartbeat thread keeps renewing while
the commit runs, and the token records which lease each commit ran under.
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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from laion_ray.errors import JobFailed, StorageError, brief
from laion_ray.storage import is_local, join_uri, object_store, resolve_storage_options

log = logging.getLogger(__name__)

LEASE_TTL_S = 20.0
HEARTBEAT_S = 5.0
POLL_S = 0.5
# Lease requests that fail transiently in a way object_store does not retry
# itself (a reply cut off mid-body) get this many attempts.
IO_ATTEMPTS = 4
IO_BACKOFF_S = 0.1

UNREADABLE = {"host": "?", "pid": -1, "run": "?", "since": 0.0, "beats": -1, "released": False}

T = TypeVar("T")


class LeaseHeld(JobFailed):
    """Another live driver runs this job."""


class LeaseLost(JobFailed):
    """Another driver took the lease over, or this one could not renew it in time."""


class ConditionalWritesIgnored(StorageError):
    """The store accepted a create-if-absent of an object that exists: no lease is safe there."""


def _now() -> float:
    return time.time()


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3 on of ``/proc/<pid>/stat`` (state first); None if no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # the command name before ")" may hold spaces


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot; None where unknown.

    Field 22 of ``/proc/<pid>/stat`` (Linux): exact, and never moved by a step
    of the host's clock, unlike an epoch time.
    """
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def _runs_here(holder: dict) -> bool:
    """Whether the holder's driver process still runs (the holder is on this host).

    The process found under the holder's pid must also have started when the
    holder's did: once the driver died, its pid may be given to another process.
    Without ``/proc`` (not Linux), or for a holder that recorded no start, the
    pid is all there is to go by.
    """
    pid = holder["pid"]
    if not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process
            pass
        return True
    fields = _proc_stat(pid)
    if fields is None or fields[0] == "Z":  # gone, or a zombie: dead for our purpose
        return False
    started = holder.get("started")
    return started is None or int(fields[19]) == started


class JobLease:
    """The lease of one job; use as a context manager around the driver's work.

    Examples:
        >>> with JobLease(root, fingerprint, storage_options) as lease:  # doctest: +SKIP
        ...     plan_and_run()
        ...     lease.fence()  # right before each commit
        ...     commit(properties=lease.token)
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
        # Renew several times per ttl, so one slow renewal never lets it expire.
        self.ttl_s, self.heartbeat_s = ttl_s, min(heartbeat_s, ttl_s / 4)
        self.uri = join_uri(root, "leases", fingerprint)
        self.fingerprint = fingerprint
        if is_local(self.uri):
            self.store: _LocalFiles | _ObjectFiles = _LocalFiles(self.uri)
        else:  # a renewal must give up well before the lease would expire
            self.store = _ObjectFiles(
                object_store(
                    self.uri,
                    resolve_storage_options(storage_options),
                    retry_timeout_s=max(2.0, self.heartbeat_s),
                )
            )
        self.holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _process_start(os.getpid()),
            "run": uuid.uuid4().hex,
            "since": None,
            "heartbeat": None,
            "beats": 0,
            "released": False,
        }
        self.generation: int | None = None
        self.lost: str | None = None
        self._last_ok = 0.0  # monotonic time of this driver's last successful write
        self._local = isinstance(self.store, _LocalFiles)
        self._lock = threading.Lock()  # one renewal at a time: heartbeat thread vs fence
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- public ---------------------------------------------------------------
    def acquire(self) -> JobLease:
        """Take the lease, waiting at most ``ttl_s`` for an unresponsive holder.

        Raises:
            LeaseHeld: A live driver holds it.
            ConditionalWritesIgnored: The store cannot make the lease safe.
            StorageError: The store kept failing.
        """
        if not self._local:
            self._check_conditional_create()
        watched: dict[int, tuple[int, float]] = {}  # generation -> (beats, since when unchanged)
        while True:
            generations = self._generations()
            candidate = 0
            if generations:
                top = generations[-1]
                holder = self._read(top)
                if holder is None:  # deleted by a driver taking over meanwhile: look again
                    time.sleep(POLL_S / 5)
                    continue
                if not self._free(top, holder, watched):
                    time.sleep(POLL_S)
                    continue
                log.info("taking over the lease of job %s from %s", self.fingerprint, holder)
                candidate = top + 1
            now = _now()
            self.holder.update(since=now, heartbeat=now, beats=0, released=False)
            if self._create(candidate):
                self.generation = candidate
                for old in generations:
                    with contextlib.suppress(StorageError, FileNotFoundError):
                        self._io("delete", lambda g=old: self.store.delete(_name(g)))
                self._thread = threading.Thread(
                    target=self._heartbeat, name="laion-ray-lease", daemon=True
                )
                self._thread.start()
                return self
            # Another driver took this generation first: look at it.

    @property
    def token(self) -> dict[str, str]:
        """The fencing token for a commit's transaction properties (strings, as Lance wants)."""
        return {"lease_generation": str(self.generation), "lease_run": self.holder["run"]}

    def fence(self) -> dict[str, str]:
        """Check, on the store, that this driver still holds the lease; call right before a commit.

        Renews the lease synchronously: re-reads the store and rewrites this
        driver's file. Returns :attr:`token`.

        Raises:
            LeaseLost: A newer generation exists, this driver's file no longer
                holds its run, or its last renewal is too old to be sure no
                contender has judged it expired.
            StorageError: The store kept failing.
        """
        with self._lock:
            self.check()
            if self._taken_over():
                raise LeaseLost(self.lost)
            stale = time.monotonic() - self._last_ok
            if stale > self.ttl_s - self.heartbeat_s:
                self.lost = (
                    f"job {self.fingerprint}: this driver could not renew its lease for "
                    f"{stale:.0f}s (a contender takes it over after {self.ttl_s:.0f}s without a "
                    f"heartbeat); it stops before committing"
                )
                raise LeaseLost(self.lost)
            if not self._beat():
                raise LeaseLost(self.lost)
        return self.token

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the heartbeat found the lease lost (no store access)."""
        if self.lost:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        """Stop heartbeating and mark the lease released: the next driver starts at once."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        with self._lock:
            if not self.lost:
                self.holder.update(released=True, heartbeat=_now())
                with contextlib.suppress(StorageError, OSError):
                    self._renew()

    def __enter__(self) -> JobLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # --- contender's view ---------------------------------------------------------
    def _free(self, generation: int, holder: dict, watched: dict) -> bool:
        """Whether the holder of ``generation`` can be taken over now.

        Raises:
            LeaseHeld: The holder is alive.
        """
        if holder["released"]:
            return True
        same_host = holder["host"] == self.holder["host"]
        if same_host and not _runs_here(holder):
            return True  # its driver died on this host: no need to wait
        seen = watched.get(generation)
        if seen is None:
            watched[generation] = (holder["beats"], time.monotonic())
            if same_host:
                raise LeaseHeld(self._held_message(holder))
            return False
        if holder["beats"] != seen[0]:
            raise LeaseHeld(self._held_message(holder))
        # Only our own clock: how long we have watched its beats stand still.
        return time.monotonic() - seen[1] > self.ttl_s

    def _held_message(self, holder: dict) -> str:
        return (
            f"job {self.fingerprint} is already running: its lease is held by driver pid "
            f"{holder['pid']} on {holder['host']} (run {holder['run'][:8]}) since "
            f"{_iso(holder['since'])} by its clock, heartbeat {holder['beats']}. Wait for it to "
            f"finish or stop it; a dead driver's lease expires {self.ttl_s:.0f}s after its last "
            f"heartbeat is seen, at once on its own host ({self.uri})"
        )

    # --- holder's side --------------------------------------------------------------
    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                with self._lock:
                    if self.lost or not self._beat():
                        return
            except (StorageError, OSError) as exc:  # keep trying until the lease would expire
                log.warning("lease heartbeat of job %s failed: %s", self.fingerprint, exc)
                if time.monotonic() - self._last_ok > self.ttl_s:
                    self.lost = (
                        f"job {self.fingerprint}: no lease heartbeat could be written for "
                        f"{self.ttl_s:.0f}s ({brief(exc)}); this driver stops"
                    )
                    return

    def _taken_over(self) -> bool:
        """Whether a newer generation exists (then :attr:`lost` says who took it)."""
        newer = self._generations()
        if not newer or newer[-1] <= self.generation:
            return False
        holder = self._read(newer[-1]) or UNREADABLE
        self.lost = (
            f"job {self.fingerprint}: driver pid {holder['pid']} on {holder['host']} "
            f"took the lease over (generation {newer[-1]}) after this driver's heartbeat "
            f"stood still for {self.ttl_s:.0f}s; this driver stops"
        )
        return True

    def _beat(self) -> bool:
        """Renew the lease once (lock held); False, with :attr:`lost` set, if it was lost."""
        if self._taken_over():
            return False
        self.holder.update(heartbeat=_now(), beats=self.holder["beats"] + 1)
        return self._renew()

    def _renew(self) -> bool:
        """Rewrite this driver's file if it still holds this run; False (lost) if not."""
        name = _name(self.generation)
        current = self._get(name)
        theirs = _parse(current[0]) if current else None
        if theirs is None or theirs.get("run") != self.holder["run"]:
            who = (
                "deleted"
                if current is None
                else f"replaced by run {str(theirs and theirs.get('run'))[:8]}"
            )
            self.lost = (
                f"job {self.fingerprint}: this driver's lease file (generation "
                f"{self.generation}) was {who}; this driver stops"
            )
            return False
        body = self._body()
        if self._local:  # no e-tags on local disk; only this run writes its generation there
            self._io("renew", lambda: self.store.put(name, body, "overwrite"))
        else:
            try:
                self._io("renew", lambda: self.store.put(name, body, {"e_tag": current[1]}))
            except self.store.exists:
                landed = self._get(name)
                if landed is None or landed[0] != body:  # changed under us, not a retried write
                    self.lost = (
                        f"job {self.fingerprint}: this driver's lease file (generation "
                        f"{self.generation}) changed while it renewed it; this driver stops"
                    )
                    return False
        self._last_ok = time.monotonic()
        return True

    # --- storage ----------------------------------------------------------------
    def _io(self, what: str, fn: Callable[[], T]) -> T:
        """One lease request: object_store retries 5xx itself; retry a cut-off reply too."""
        for attempt in range(IO_ATTEMPTS):
            try:
                return fn()
            except (FileNotFoundError, *self.store.exists):
                raise
            except self.store.permanent as exc:
                raise StorageError(f"lease {what} at {self.uri} failed: {brief(exc)}") from exc
            except self.store.transient as exc:
                if attempt == IO_ATTEMPTS - 1:
                    raise StorageError(
                        f"lease {what} at {self.uri} failed {IO_ATTEMPTS} times: {brief(exc)}"
                    ) from exc
                time.sleep(IO_BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    def _body(self) -> bytes:
        return json.dumps(self.holder, sort_keys=True).encode()

    def _generations(self) -> list[int]:
        try:
            names = self._io("list", self.store.names)
        except FileNotFoundError:
            return []
        stems = (n.rsplit("/", 1)[-1].removesuffix(".json") for n in names if n.endswith(".json"))
        return sorted(int(s) for s in stems if s.isdigit())

    def _get(self, name: str) -> tuple[bytes, str | None] | None:
        """``(bytes, e-tag)`` of ``name``, or None if it does not exist."""
        try:
            return self._io("read", lambda: self.store.get(name))
        except FileNotFoundError:
            return None

    def _read(self, generation: int) -> dict | None:
        """The holder of ``generation``; None if absent, :data:`UNREADABLE` if garbled."""
        found = self._get(_name(generation))
        if found is None:
            return None
        return _parse(found[0]) or {**UNREADABLE}

    def _create(self, generation: int) -> bool:
        """Create ``generation`` if absent; True if this driver's file is the one there."""
        name, body = _name(generation), self._body()
        try:
            self._io("create", lambda: self.store.put(name, body, "create"))
        except self.store.exists:
            theirs = self._get(name)
            if theirs is None or theirs[0] != body:
                return False
            # Our own first attempt landed and its reply was lost: it is ours.
        self._last_ok = time.monotonic()
        return True

    def _check_conditional_create(self) -> None:
        """Refuse a store that accepts a create-if-absent of an existing object."""
        from obstore.exceptions import NotSupportedError  # an object store: obstore is there

        probe = f"probe-{self.holder['run']}.json"
        with contextlib.suppress(*self.store.exists):  # a retried first create finds itself
            self._io("probe", lambda: self.store.put(probe, b"1", "create"))
        try:
            self._io("probe", lambda: self.store.put(probe, b"2", "create"))
            ignored = True
        except self.store.exists:
            ignored = False
        except (NotImplementedError, StorageError) as exc:
            cause = exc.__cause__ if isinstance(exc, StorageError) else exc
            if not isinstance(cause, NotSupportedError | NotImplementedError):
                raise
            raise ConditionalWritesIgnored(
                f"the store of {self.uri} has no conditional create ({brief(cause)}); {_WAY_OUT}"
            ) from exc
        finally:
            with contextlib.suppress(StorageError, FileNotFoundError):
                self._io("delete", lambda: self.store.delete(probe))
        if ignored:
            raise ConditionalWritesIgnored(
                f"the store of {self.uri} accepted a create-if-absent (If-None-Match: *) of an "
                f"object that already exists: it ignores conditional writes, so two drivers "
                f"of one job could both take its lease; {_WAY_OUT}"
            )


_WAY_OUT = (
    "put the job's checkpoint on a store that honours them (--checkpoint-uri: local disk, "
    "AWS S3, GCS, Azure, or an S3-compatible server with conditional writes)"
)


def _name(generation: int) -> str:
    return f"{generation:012d}.json"


def _parse(body: bytes) -> dict | None:
    try:
        holder = json.loads(body.decode())
    except (ValueError, UnicodeDecodeError):
        return None
    return holder if isinstance(holder, dict) and "run" in holder else None


class _LocalFiles:
    """The lease's directory on local disk, through the standard library alone.

    A write lands whole or not at all: the body goes to a synced temp file in
    the same directory, which is then hard-linked to its name for a create
    (``link`` fails if the name exists, as ``O_EXCL`` would) or renamed over
    it for an overwrite. Readers never see a half-written holder.
    """

    exists = (FileExistsError,)
    permanent = (PermissionError, IsADirectoryError, NotADirectoryError)  # no retry fixes these
    transient = (OSError,)

    def __init__(self, uri: str):
        self.path = os.path.abspath(uri.removeprefix("file://"))
        os.makedirs(self.path, exist_ok=True)

    def put(self, name: str, body: bytes, mode: str) -> None:
        """Write ``name``; ``mode`` ``"create"`` raises ``FileExistsError`` if it exists."""
        if mode not in ("create", "overwrite"):
            raise ValueError(f"local disk has no e-tags: put mode {mode!r}")
        os.makedirs(self.path, exist_ok=True)  # the checkpoint root may have been removed
        temp = os.path.join(self.path, f".{name}.{uuid.uuid4().hex}.tmp")
        # Mode 0o666 less the umask, as any new file (another user's driver reads it).
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            target = os.path.join(self.path, name)
            if mode == "create":
                os.link(temp, target)
            else:
                os.replace(temp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)

    def get(self, name: str) -> tuple[bytes, None]:
        return Path(self.path, name).read_bytes(), None

    def names(self) -> list[str]:
        return os.listdir(self.path)

    def delete(self, name: str) -> None:
        os.unlink(os.path.join(self.path, name))


class _ObjectFiles:
    """The lease's prefix on an object store, through obstore (imported only for one)."""

    def __init__(self, store):
        from obstore.exceptions import (
            AlreadyExistsError,
            BaseError,
            InvalidPathError,
            NotSupportedError,
            PermissionDeniedError,
            PreconditionError,
            UnauthenticatedError,
        )

        self.store = store
        # "Exists" is also a conditional replace whose e-tag no longer matches.
        self.exists = (AlreadyExistsError, PreconditionError)
        self.permanent = (
            PermissionDeniedError,
            UnauthenticatedError,
            InvalidPathError,
            NotSupportedError,
        )
        self.transient = (BaseError, OSError)

    def put(self, name: str, body: bytes, mode: str | dict) -> None:
        """Write ``name``; ``mode`` is obstore's (``"create"``, ``"overwrite"``, an e-tag)."""
        import obstore

        obstore.put(self.store, name, body, mode=mode)

    def get(self, name: str) -> tuple[bytes, str | None]:
        import obstore

        result = obstore.get(self.store, name)
        return bytes(result.bytes()), result.meta.get("e_tag")

    def names(self) -> list[str]:
        import obstore

        return [meta["path"] for chunk in obstore.list(self.store) for meta in chunk]

    def delete(self, name: str) -> None:
        import obstore

        obstore.delete(self.store, name)
