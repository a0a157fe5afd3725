"""laion-ray: backfill, re-embed and re-index LAION-style Lance tables on Ray.

Examples:
    >>> import laion_ray
    >>> laion_ray.backfill("laion.lance", udfs=["aspect-ratio"])  # doctest: +SKIP
"""

from __future__ import annotations

import os
import time

# Where a CLI run's "import" phase starts (see laion_ray/engine/phases.py).
IMPORT_STARTED = time.perf_counter()
__version__ = "0.1.0"

# Ray Data keeps a driver's cluster resource reservation until it expires, and
# a SIGKILLed driver never cancels its own: with Ray's defaults (renewed every
# 10 s, expiring after 180 s) the rerun of a crashed job ran on a sliver of the
# cluster for three minutes. Renewed every 3 s, a reservation can expire after
# 10 s. Both are read when ray.data is imported, hence here.
os.environ.setdefault("RAY_DATA_MIN_GAP_BETWEEN_AUTOSCALING_REQUESTS", "3")
os.environ.setdefault("RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S", "10")

# The public API, bound eagerly. Several names are also the names of the
# modules that implement them (laion_ray.backfill, .merge, .search, ...): Python
# sets a package attribute to the submodule when the submodule is first
# imported, so a lazily resolved name would turn from the function into the
# module on its second use. Binding here, after those imports, keeps each name
# the documented callable. These modules import Lance and Arrow but never Ray
# or torch at import time, so `import laion_ray` stays quick.
from laion_ray.backfill import backfill  # noqa: E402
from laion_ray.dedup import dedup  # noqa: E402
from laion_ray.engine.error_log import list_errors  # noqa: E402
from laion_ray.errors import (  # noqa: E402
    JobFailed,
    LaionRayError,
    RowError,
    StorageError,
    SystemicError,
)
from laion_ray.history import job_history  # noqa: E402
from laion_ray.index import reindex  # noqa: E402
from laion_ray.info import dataset_info  # noqa: E402
from laion_ray.materialize import materialize  # noqa: E402
from laion_ray.merge import merge  # noqa: E402
from laion_ray.sample import write_sample  # noqa: E402
from laion_ray.search import search  # noqa: E402
from laion_ray.udf import UDF, register, udf  # noqa: E402

__all__ = [
    "UDF",
    "JobFailed",
    "LaionRayError",
    "RowError",
    "StorageError",
    "SystemicError",
    "backfill",
    "dataset_info",
    "dedup",
    "job_history",
    "list_errors",
    "materialize",
    "merge",
    "register",
    "reindex",
    "search",
    "udf",
    "write_sample",
]
