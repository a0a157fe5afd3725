"""laion-ray: backfill, re-embed and re-index LAION-style Lance tables on Ray.

Examples:
    >>> import laion_ray
    >>> laion_ray.backfill("laion.lance", udfs=["aspect-ratio"])  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"

# Ray Data keeps a driver's cluster resource reservation until it expires, and
# a SIGKILLed driver never cancels its own: with Ray's defaults (renewed every
# 10 s, expiring after 180 s) the rerun of a crashed job ran on a sliver of the
# cluster for three minutes. Renewed every 3 s, a reservation can expire after
# 10 s. Both are read when ray.data is imported, hence here.
os.environ.setdefault("RAY_DATA_MIN_GAP_BETWEEN_AUTOSCALING_REQUESTS", "3")
os.environ.setdefault("RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S", "10")

# Public name -> module. Resolved on first use so `import laion_ray` (and
# `laion-ray info`) does not pull in Ray or torch.
_EXPORTS = {
    "backfill": "laion_ray.backfill",
    "merge": "laion_ray.merge",
    "dedup": "laion_ray.dedup",
    "reindex": "laion_ray.index",
    "search": "laion_ray.search",
    "materialize": "laion_ray.materialize",
    "write_sample": "laion_ray.sample",
    "dataset_info": "laion_ray.info",
    "job_history": "laion_ray.history",
    "list_errors": "laion_ray.error_log",
    "udf": "laion_ray.udf",
    "UDF": "laion_ray.udf",
    "register": "laion_ray.udf",
    "LaionRayError": "laion_ray.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'laion_ray' has no attribute {name!r}")
