"""A deliberately slow UDF for the kill-and-resume benchmark (bench_backfill.py).

It sleeps ``delay_s`` seconds per batch (a UDF parameter, so it reaches the
workers of an already running cluster too), so a run lasts long enough for a
SIGKILL to land mid-job, and computes the same ``width / height`` maths as
``aspect-ratio``. Ray workers import it by name, so ``benchmarks/`` must be on
``PYTHONPATH``: ``--udf slow_udf:slow_ratio --param slow_udf:slow_ratio.delay_s=2``.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from laion_ray.udf import udf

SLOW_SCHEMA = pa.schema([pa.field("slow_ratio", pa.float64())])


@udf(inputs=["width", "height"], outputs=SLOW_SCHEMA, name="slow-ratio", batch_size=2048)
def slow_ratio(batch: pa.Table, delay_s: float = 0.5) -> pa.Table:
    """``width / height`` after a fixed sleep per batch."""
    time.sleep(delay_s)
    width = batch["width"].to_numpy(zero_copy_only=False).astype(np.float64)
    height = batch["height"].to_numpy(zero_copy_only=False).astype(np.float64)
    return pa.table({"slow_ratio": width / height}, schema=SLOW_SCHEMA)
