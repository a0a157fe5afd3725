"""Test UDFs, importable by Ray workers and by the CLI as ``helpers:<name>``.

conftest puts this directory on PYTHONPATH before Ray starts, so workers
import these by reference, exactly as they would a user's own UDF module.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from laion_ray.errors import RowError
from laion_ray.udf import udf


def _log_keys(batch: pa.Table) -> None:
    path = os.environ.get("LAION_RAY_TEST_LOG")
    if path:
        keys = batch["key"].to_numpy()
        with open(path, "a") as f:
            f.write(" ".join(map(str, keys.tolist())) + "\n")


@udf(
    inputs=["key", "width", "height"],
    outputs=pa.schema([("ar_slow", pa.float64())]),
    name="slow-ratio",
    batch_size=50,
)
def slow_ratio(batch: pa.Table) -> pa.Table:
    """Aspect ratio that sleeps per batch and logs the keys it computed."""
    time.sleep(float(os.environ.get("LAION_RAY_TEST_DELAY", "0")))
    _log_keys(batch)
    width = pc.cast(batch["width"], pa.float64())
    height = pc.cast(batch["height"], pa.float64())
    ratio = pc.if_else(pc.greater(height, 0), pc.divide(width, height), None)
    return pa.table({"ar_slow": ratio})


@udf(
    inputs=["key"],
    outputs=pa.schema([("key_check", pa.int64())]),
    name="fail-on-keys",
    batch_size=64,
)
def fail_on_keys(batch: pa.Table) -> pa.Table:
    """Raises for any batch holding a key with ``key % 97 == 5``."""
    keys = batch["key"].to_numpy()
    if np.any(keys % 97 == 5):
        raise ValueError(f"bad key in {keys.min()}..{keys.max()}")
    return pa.table({"key_check": pa.array(keys * 2, pa.int64())})


@udf(
    inputs=["key"],
    outputs=pa.schema([("survivor", pa.int64())]),
    name="die-once",
    batch_size=64,
)
def die_once(batch: pa.Table) -> pa.Table:
    """Kills its own worker process the first time it runs (a marker file remembers)."""
    marker = os.environ["LAION_RAY_TEST_MARKER"]
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return pa.table({"survivor": pc.add(batch["key"], 1)})


EMB_DIM = 768


@udf(
    inputs=["key"],
    outputs=pa.schema([("img_emb", pa.list_(pa.float32(), EMB_DIM))]),
    name="key-embedding",
    batch_size=256,
)
def key_embedding(batch: pa.Table) -> pa.Table:
    """A deterministic unit vector per key, to overwrite ``img_emb`` in place."""
    keys = batch["key"].to_numpy()
    vectors = np.zeros((len(keys), EMB_DIM), np.float32)
    vectors[np.arange(len(keys)), keys % EMB_DIM] = 1.0
    flat = pa.array(vectors.reshape(-1))
    return pa.table({"img_emb": pa.FixedSizeListArray.from_arrays(flat, EMB_DIM)})


@udf(
    inputs=["key"],
    outputs=pa.schema([("survivor", pa.int64())]),
    name="die-once-at",
    batch_size=64,
)
def die_once_at(batch: pa.Table, marker: str) -> pa.Table:
    """``die_once`` with the marker path as a UDF parameter.

    A Ray worker's environment is fixed when its cluster starts, so a test on the
    session Ray cannot reach ``die_once`` through an env var it sets later.
    """
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return pa.table({"survivor": pc.add(batch["key"], 1)})


@udf(
    inputs=["key", "width", "height"],
    outputs=pa.schema([("ar_held", pa.float64())]),
    name="held-ratio",
    batch_size=50,
)
def held_ratio(
    batch: pa.Table, gate: str = "", delay: float = 0.0, timeout_s: float = 120.0
) -> pa.Table:
    """Aspect ratio that waits for the file ``gate`` to exist, then sleeps ``delay`` s.

    Lets a test hold a backfill between its plan and its commit without timing
    races. It never raises on timeout (that would bisect the batch row by row);
    the test's own assertions catch a gate that never opened.
    """
    deadline = time.monotonic() + timeout_s
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    width = pc.cast(batch["width"], pa.float64())
    height = pc.cast(batch["height"], pa.float64())
    return pa.table({"ar_held": pc.if_else(pc.greater(height, 0), pc.divide(width, height), None)})


@udf(inputs=["key"], outputs=pa.schema([("stamp", pa.int64())]), name="stamp", batch_size=64)
def stamp(batch: pa.Table, job: int = 0) -> pa.Table:
    """``key * 10 + job``: which job last wrote a row, readable from its value."""
    return pa.table({"stamp": pc.add(pc.multiply(batch["key"], 10), job)})


# --- failure classes (tests/test_failures.py) ---------------------------------


def _log_call(log: str, batch: pa.Table) -> None:
    """Append the keys of one call to ``log``: what a stage tried, and how often."""
    if log:
        with open(log, "a") as f:
            f.write(" ".join(map(str, batch["key"].to_pylist())) + "\n")


@udf(
    inputs=["key"],
    outputs=pa.schema([("plugin_value", pa.int64())]),
    name="uses-module",
    batch_size=64,
)
def uses_module(batch: pa.Table, module: str, path: str, log: str = "") -> pa.Table:
    """``module.value(keys)``, with ``module`` looked up in the directory ``path``.

    Fails with ``ModuleNotFoundError`` until the test writes the module there:
    a dependency missing on the workers, then installed.
    """
    _log_call(log, batch)
    if path not in sys.path:
        sys.path.insert(0, path)
    importlib.invalidate_caches()  # the directory may have changed since the last import
    plugin = importlib.import_module(module)
    return pa.table({"plugin_value": pa.array(plugin.value(batch["key"].to_numpy()), pa.int64())})


@udf(
    inputs=["key"],
    outputs=pa.schema([("fixed_value", pa.int64())]),
    name="buggy-until",
    batch_size=64,
)
def buggy_until(batch: pa.Table, fix: str, log: str = "") -> pa.Table:
    """A UDF bug, ``TypeError`` on every row, until the file ``fix`` exists."""
    _log_call(log, batch)
    offset = 1 if os.path.exists(fix) else None
    step = offset + 1  # the bug: None + 1
    return pa.table({"fixed_value": pc.add(batch["key"], step)})


@udf(
    inputs=["key"],
    outputs=pa.schema([("tripled", pa.int64())]),
    name="memory-hungry",
    batch_size=64,
)
def memory_hungry(batch: pa.Table, max_rows: int = 8, log: str = "") -> pa.Table:
    """Raises ``MemoryError`` for batches of more than ``max_rows`` rows."""
    _log_call(log, batch)
    if batch.num_rows > max_rows:
        raise MemoryError(f"cannot hold {batch.num_rows} rows")
    return pa.table({"tripled": pc.multiply(batch["key"], 3)})


class BadKeyError(RowError):
    """A row whose key the test declared bad."""


def is_bad_key(key: int, percent: int) -> bool:
    return key % 100 < percent


@udf(
    inputs=["key"],
    outputs=pa.schema([("checked", pa.int64())]),
    name="bad-keys",
    batch_size=64,
    row_errors=(RowError, ValueError),
)
def bad_keys(batch: pa.Table, percent: int = 1, mixed: bool = True) -> pa.Table:
    """Row errors on ``percent`` % of keys: ``ValueError`` when ``key % 3 == 2``
    and ``mixed``, else ``BadKeyError``; ``checked = key + 7`` elsewhere."""
    for key in batch["key"].to_pylist():
        if is_bad_key(key, percent):
            if mixed and key % 3 == 2:
                raise ValueError(f"key {key} is not valid")
            raise BadKeyError(f"key {key} is bad")
    return pa.table({"checked": pc.add(batch["key"], 7)})


@udf(
    inputs=["key"],
    outputs=pa.schema([("loaded", pa.int64())]),
    name="fails-to-load",
    batch_size=64,
    concurrency=1,
)
class FailsToLoad:
    """A model UDF whose weights are missing: every actor fails in ``__init__``."""

    def __init__(self, weights: str = "/models/missing.pt") -> None:
        with open(weights, "rb"):
            pass

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.table({"loaded": batch["key"]})


@udf(
    inputs=["key"],
    outputs=pa.schema([("never", pa.int64())]),
    name="die-always",
    batch_size=64,
)
def die_always(batch: pa.Table) -> pa.Table:
    """Kills its worker on every attempt: Ray's retries cannot help."""
    os._exit(1)


@udf(inputs=["width"], outputs=pa.schema([("width_x2", pa.int64())]), name="device-double")
class DeviceDouble:
    """A user-written class UDF: picks its device like the built-in model UDFs."""

    def __init__(self) -> None:
        from laion_ray.cluster import actor_device

        self.device = actor_device()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.table({"width_x2": pc.multiply(pc.cast(batch["width"], pa.int64()), 2)})


@udf(inputs=["key"], outputs=pa.schema([("key_x3", pa.int64())]), name="counted-model")
class CountedModel:
    """A model UDF that appends a line to ``log`` each time an actor loads it."""

    def __init__(self, log: str) -> None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.table({"key_x3": pc.multiply(batch["key"], 3)})
