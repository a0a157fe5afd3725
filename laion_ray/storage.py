"""URIs, storage options and dataset opening shared by every job.

Lance takes object-store credentials as ``storage_options``; checkpoints and
error tables go through the same options so they live in the same store as the
dataset.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar
from urllib.parse import urlparse

import lance
import pyarrow.fs as pafs

from laion_ray.errors import JobFailed, LaionRayError, StorageError, brief

# Environment variables Lance itself reads for S3; passed on explicitly so that
# pyarrow (checkpoint files) sees the same credentials and endpoint.
_ENV_OPTIONS = {
    "AWS_ACCESS_KEY_ID": "aws_access_key_id",
    "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
    "AWS_SESSION_TOKEN": "aws_session_token",
    "AWS_REGION": "aws_region",
    "AWS_DEFAULT_REGION": "aws_region",
    "AWS_ENDPOINT": "aws_endpoint",
    "AWS_ENDPOINT_URL": "aws_endpoint",
    "AWS_ALLOW_HTTP": "allow_http",
}
# Words that make an option or parameter name a secret's: its value is never
# printed or stored (logs, reports, commit properties, `ray job logs`).
SECRET_WORDS = frozenset(
    {
        "secret",
        "token",
        "password",
        "passwd",
        "credential",
        "credentials",
        "sas",
        "session",
        "authorization",
    }
)
# The words of a name: split at anything not a letter or digit and where case
# changes (`sasToken`, `APIKey`, `aws_access_key_id`).
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
# Secret words also recognised glued to the word before, in one case (`apikey`,
# `sastoken`).
_GLUED = ("key", "token", "secret", "password")
# How pyarrow's filesystems name a store's own errors (S3, GCS, Azure).
_ARROW_STORE_ERRORS = ("AWS Error", "google::cloud::Status(", "Azure Error")
# Checkpoint I/O: attempts and first backoff for transient errors (doubling).
IO_ATTEMPTS = 6
IO_BACKOFF_S = 0.1
# pyarrow's S3 client (checkpoints, merge sources, reports): attempts per request
# on 5xx, SlowDown and dropped connections. Its default, 3, gives up inside one
# throttling burst; Lance's object_store makes 10 by default, and so do we.
S3_ATTEMPTS = 10
# Set to a local file path to have every process (Ray workers included) append
# its I/O counts there; benchmarks read it (see ``io_counts``).
IO_LOG_ENV = "LAION_RAY_IO_LOG"
DATASET_CACHE_SIZE = 4

T = TypeVar("T")


def parse_storage_options(pairs: Iterable[str] | None) -> dict[str, str]:
    """Parse repeated ``key=value`` CLI flags into a storage-options dict."""
    options: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LaionRayError(f"--storage-option expects key=value, got {pair!r}")
        options[key.strip()] = value
    return options


def resolve_storage_options(options: Mapping[str, str] | None) -> dict[str, str]:
    """Explicit options win over the ``AWS_*`` environment."""
    resolved = {opt: os.environ[env] for env, opt in _ENV_OPTIONS.items() if os.environ.get(env)}
    resolved.update(options or {})
    return resolved


def is_secret(name: str) -> bool:
    """Whether ``name`` names a secret: a word of :data:`SECRET_WORDS`, or ``key``
    after another word (``aws_access_key_id``, ``account_key``, ``apiKey``; not
    ``key`` or ``key_column``), in any case or spelling (``sasToken``,
    ``Authorization``, ``apikey``)."""
    words = [w.lower() for w in _WORD.findall(name)]
    if SECRET_WORDS.intersection(words) or "key" in words[1:]:
        return True
    return any(w.endswith(_GLUED) and w not in _GLUED for w in words)


def mask_secrets(options: Mapping[str, object]) -> dict[str, object]:
    """Copy of ``options`` safe to log: the values of secrets' names are masked."""
    return {k: "***" if is_secret(k) and v else v for k, v in options.items()}


def is_local(uri: str) -> bool:
    return urlparse(uri).scheme in ("", "file") or len(urlparse(uri).scheme) == 1


def join_uri(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def open_dataset(
    uri: str,
    *,
    version: int | str | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> lance.LanceDataset:
    """Open a Lance dataset.

    Raises:
        LaionRayError: Nothing (or no such version) is there: bad input.
        StorageError: The store could not be read (credentials, network).
    """
    if is_local(uri) and not os.path.exists(uri.removeprefix("file://")):
        raise LaionRayError(f"no such path: {uri}")
    try:
        return lance.dataset(
            uri, version=version, storage_options=resolve_storage_options(storage_options)
        )
    except (ValueError, OSError) as exc:
        if is_storage_failure(exc):
            raise StorageError(f"cannot read {uri}: {brief(exc)}") from exc
        raise LaionRayError(f"cannot open {uri} as a Lance dataset: {brief(exc)}") from exc
    finally:
        count_io("dataset_opens")


def is_storage_failure(exc: BaseException) -> bool:
    """Whether a Lance or pyarrow error is the store failing (I/O, credentials),
    not the request or the bytes read.

    Lance raises ``ValueError`` for both a bad request (an unknown column, a
    bad filter, nothing at the path) and an I/O failure; the latter's message
    starts with ``LanceError(IO)``. pyarrow raises ``OSError`` both for a
    store's failure, whose message names the store's error (``AWS Error
    ACCESS_DENIED``) or which carries an errno (local disk), and for bytes it
    cannot decode (a corrupt gzip stream or Parquet footer).
    """
    text = str(exc)
    if "LanceError(IO)" in text:
        return "was not found" not in text
    return isinstance(exc, OSError) and (
        exc.errno is not None or any(name in text for name in _ARROW_STORE_ERRORS)
    )


@dataclasses.dataclass(frozen=True)
class PinnedVersion:
    """One version of one table, told apart from the same number of a table
    re-created at the same path.

    Attributes:
        version: The version number.
        created: When that version's manifest was written (microseconds,
            ISO 8601): a table deleted and written again at the same path
            restarts at version 1, at another time.
    """

    version: int
    created: str

    @classmethod
    def of(cls, ds: lance.LanceDataset) -> PinnedVersion:
        # get_version() reads the loaded manifest: no storage request.
        return cls(ds.version, ds.get_version()["timestamp"].isoformat())


class ScanGate:
    """Lance scans of this process that may run together, and the ones that
    must run alone.

    pylance 14.0.2 deadlocks, now and then, when the driver counts a
    fragment's rows while reader threads scan: the count in the main thread,
    two ``to_table`` calls in the readers and Lance's runtime threads all
    waiting, for ever (3 runs in about 200 of a 400-row ``--where`` job on a
    loaded 2-core machine; the count had its own dataset object). Readers take
    the gate together (``shared``); the driver's counts take it ``alone``,
    which waits for the scans in flight and holds new ones back. It costs the
    readers nothing but the counts' own time, once per commit.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._scans = 0
        self._alone = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._alone)
            self._scans += 1
        try:
            yield
        finally:
            with self._cond:
                self._scans -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._alone)
            self._alone = True  # new scans wait from here on
            self._cond.wait_for(lambda: self._scans == 0)
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()


LANCE_SCANS = ScanGate()

_datasets: collections.OrderedDict[tuple, lance.LanceDataset] = collections.OrderedDict()
_datasets_lock = threading.Lock()


def cached_dataset(
    uri: str, *, pinned: PinnedVersion, storage_options: Mapping[str, str] | None = None
) -> lance.LanceDataset:
    """The dataset at a pinned version, opened once per process.

    Every open reads the version's manifest (tens of MB for a table of tens of
    thousands of fragments), so read and assemble tasks that run in the same
    worker process share one open instead of paying it per work unit. The
    cache is keyed by the version *and its creation time*: a long-lived
    worker that opened version 1 of a table must not serve it for version 1
    of another table written at the same path since.

    Raises:
        JobFailed: The version at ``uri`` is not the pinned one any more (the
            table was deleted and written again while the job ran).
    """
    opts = tuple(sorted(resolve_storage_options(storage_options).items()))
    key = (uri, pinned, opts)
    with _datasets_lock:  # one open even when the local executor's threads race
        ds = _datasets.get(key)
        if ds is None:
            ds = open_dataset(uri, version=pinned.version, storage_options=storage_options)
            if PinnedVersion.of(ds) != pinned:
                raise JobFailed(
                    f"{uri}: version {pinned.version} is not the one this job pinned (written "
                    f"{pinned.created}); the table was written again at this path while the job "
                    "ran. Rerun the same command: it plans on the new table"
                )
            _datasets[key] = ds
            while len(_datasets) > DATASET_CACHE_SIZE:
                _datasets.popitem(last=False)
        else:
            _datasets.move_to_end(key)
        return ds


# --- I/O accounting and transient errors ------------------------------------------

_io_counts: collections.Counter[str] = collections.Counter()
_io_lock = threading.Lock()


def count_io(event: str, n: int = 1) -> None:
    """Count an I/O event in this process (and in ``$LAION_RAY_IO_LOG`` when set)."""
    with _io_lock:
        _io_counts[event] += n
    if log_path := os.environ.get(IO_LOG_ENV):
        with open(log_path, "a") as f:  # one short O_APPEND write per event
            f.write(f"{event} {n}\n")


def io_counts() -> dict[str, int]:
    """This process's I/O counts so far: ``dataset_opens``, ``checkpoint_writes``, ..."""
    with _io_lock:
        return dict(_io_counts)


def read_io_log(path: str) -> dict[str, int]:
    """Sum the counts every process appended to an ``$LAION_RAY_IO_LOG`` file."""
    totals: collections.Counter[str] = collections.Counter()
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            event, n = line.split()
            totals[event] += int(n)
    return dict(totals)


_faults: collections.Counter[str] = collections.Counter()


@contextlib.contextmanager
def injected_io_errors(op: str, count: int = 1) -> Iterator[None]:
    """Make the next ``count`` checkpoint ``op`` calls in this process fail transiently.

    A test hook for :func:`with_retries` (``op`` is ``"read"``, ``"list"`` or
    ``"write"``): the failure is an ``OSError`` that is not "not found", as a
    dropped connection or a throttled request on an object store would be.
    """
    _faults[op] += count
    try:
        yield
    finally:
        _faults[op] = 0


def with_retries(op: str, what: str, fn: Callable[[], T]) -> T:
    """Run one checkpoint I/O call, retrying transient errors with backoff.

    ``FileNotFoundError`` is a true "not found" and passes straight through;
    any other ``OSError`` is retried and, after ``IO_ATTEMPTS``, raised as a
    :class:`LaionRayError`: a flaky store must stop the job, never read as an
    empty checkpoint.
    """
    for attempt in range(IO_ATTEMPTS):
        try:
            if _faults[op] > 0:
                _faults[op] -= 1
                raise OSError(f"injected transient {op} error")
            return fn()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if attempt == IO_ATTEMPTS - 1:
                raise StorageError(
                    f"checkpoint {op} of {what} failed {IO_ATTEMPTS} times: {brief(exc)}"
                ) from exc
            count_io("io_retries")
            time.sleep(IO_BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def filesystem(uri: str, storage_options: Mapping[str, str] | None = None):
    """Return ``(pyarrow FileSystem, path)`` for ``uri`` using Lance-style options."""
    opts = resolve_storage_options(storage_options)
    parsed = urlparse(uri)
    if is_local(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    if parsed.scheme in ("s3", "s3a"):
        endpoint = opts.get("aws_endpoint") or opts.get("endpoint")
        kwargs = {
            "access_key": opts.get("aws_access_key_id"),
            "secret_key": opts.get("aws_secret_access_key"),
            "session_token": opts.get("aws_session_token"),
            "region": opts.get("aws_region") or opts.get("region") or "us-east-1",
        }
        if endpoint:
            endpoint_url = urlparse(endpoint)
            kwargs["endpoint_override"] = endpoint_url.netloc or endpoint
            kwargs["scheme"] = endpoint_url.scheme or "https"
        fs = pafs.S3FileSystem(
            **{k: v for k, v in kwargs.items() if v is not None},
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS),
        )
        return fs, parsed.netloc + parsed.path
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


# --- obstore: conditional writes (the job lease) -------------------------------------

# Lance passes its storage options to the Rust object_store crate, which obstore
# wraps too, so the store keys (aws_*, google_*, azure_* and their short aliases)
# carry over as they are. obstore wants the HTTP client's keys apart, and
# rejects keys that only Lance reads.
_CLIENT_KEYS = frozenset(
    {
        "allow_http",
        "allow_invalid_certificates",
        "connect_timeout",
        "default_content_type",
        "http1_only",
        "http2_only",
        "pool_idle_timeout",
        "pool_max_idle_per_host",
        "proxy_url",
        "proxy_ca_certificate",
        "proxy_excludes",
        "randomize_addresses",
        "read_timeout",
        "timeout",
        "user_agent",
    }
)
# Lance's own knobs (lance-io ObjectStoreParams); the retry pair sets obstore's retries.
_LANCE_ONLY_KEYS = frozenset(
    {
        "client_max_retries",
        "client_retry_timeout",
        "download_retry_count",
        "expires_at_millis",
        "use_opendal",
        "use_constant_size_upload_parts",
        "aws_credential_refresh_offset",
    }
)
_UNKNOWN_KEY = re.compile(r"Configuration key: '([^']+)' is not valid")


def object_store(
    uri: str,
    storage_options: Mapping[str, str] | None = None,
    *,
    max_retries: int = 6,
    retry_timeout_s: float = 20.0,
    request_timeout_s: float = 10.0,
):
    """An obstore store rooted at ``uri``, from Lance-style ``storage_options``.

    obstore covers every store Lance supports (local, S3 and S3-compatibles, GCS,
    Azure) with one API, including atomic conditional writes
    (``put(mode="create")``: ``If-None-Match: *`` on S3 and Azure, a generation
    match on GCS, a no-replace link on local disk). Transient failures (5xx,
    ``SlowDown``, dropped connections) are retried by object_store itself, with
    backoff, for at most ``retry_timeout_s`` (Lance's ``client_max_retries`` and
    ``client_retry_timeout`` options override the defaults), so a caller that
    must act within a deadline (the lease's heartbeat) is not held for minutes.

    Raises:
        StorageError: The options do not make a store (e.g. unreadable credentials).
    """
    import obstore.exceptions
    import obstore.store

    opts = resolve_storage_options(storage_options)
    if is_local(uri):
        path = os.path.abspath(uri.removeprefix("file://"))
        return obstore.store.LocalStore(path, mkdir=True)
    client = {k: v for k, v in opts.items() if k in _CLIENT_KEYS}
    client.setdefault("timeout", f"{request_timeout_s:g}s")
    config = {k: v for k, v in opts.items() if k not in _CLIENT_KEYS | _LANCE_ONLY_KEYS}
    retry = {
        "max_retries": int(opts.get("client_max_retries", max_retries)),
        "retry_timeout": dt.timedelta(
            seconds=float(opts.get("client_retry_timeout", retry_timeout_s))
        ),
        "backoff": {
            "init_backoff": dt.timedelta(milliseconds=50),
            "max_backoff": dt.timedelta(seconds=2),
            "base": 2,
        },
    }
    for _ in range(len(config) + 1):
        try:
            return obstore.store.from_url(
                uri, config=config, client_options=client, retry_config=retry
            )
        except obstore.exceptions.UnknownConfigurationKeyError as exc:
            # An option only Lance (or another store type) reads: not ours to judge.
            match = _UNKNOWN_KEY.search(str(exc))
            if not match or match.group(1) not in config:
                raise StorageError(f"storage options for {uri}: {brief(exc)}") from exc
            config.pop(match.group(1))
        except (obstore.exceptions.BaseError, ValueError) as exc:
            raise StorageError(f"cannot open the store of {uri}: {brief(exc)}") from exc
    raise AssertionError("unreachable")


def remove_tree(uri: str, storage_options: Mapping[str, str] | None = None) -> None:
    """Delete a directory tree (a fragment's parts, a finished job's checkpoint).

    Missing is fine; a store that keeps refusing raises :class:`StorageError`:
    a checkpoint left behind unnoticed would make the next run of the same
    command resume a finished job.
    """
    fs, path = filesystem(uri, storage_options)

    def delete() -> None:
        with contextlib.suppress(FileNotFoundError):
            fs.delete_dir(path)

    with_retries("write", uri, delete)
