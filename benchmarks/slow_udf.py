"""A deliberately slow UDF for the kill-and-resume benchmark (bench_backfill.py).

It sleeps ``$BENCH_SLOW_DELAY_S`` seconds per batch (default 0.5), so a run
lasts long enough for a SIGKILL to land mid-job, and computes the same
``width / height`` maths as ``aspect-ratio``. Ray workers import it by name,
so ``benchmarks/`` must be on ``PYTHONPATH``: ``--udf slow_udf:slow_ratio``.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa

from laion_ray.udf import udf

SLOW_SCHEMA = pa.schema([pa.field("slow_ratio", pa.float64())])


@udf(inputs=["width", "height"], outputs=SLOW_SCHEMA, name="slow-ratio", batch_size=2048)
def slow_ratio(batch: pa.Table) -> pa.Table:
    """``width / height`` after a fixed sleep per batch."""
    time.sleep(float(os.environ.get("BENCH_SLOW_DELAY_S", "0.5")))
    width = batch["width"].to_numpy(zero_copy_only=False).astype(np.float64)
    height = batch["height"].to_numpy(zero_copy_only=False).astype(np.float64)
    return pa.table({"slow_ratio": width / height}, schema=SLOW_SCHEMA)
