"""Connect to Ray: an existing cluster when one is named, else a local one."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ray_attached(address: str | None = None) -> bool:
    """Whether work here goes to a Ray that is named or already running."""
    import ray

    return bool(address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Initialise Ray once per process.

    ``address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets) attaches to
    a running cluster; without either a private local Ray is started, so a
    laptop run never attaches to a stray ``ray start`` by accident.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("attaching to Ray at %s", address)
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    # Our own progress reporting replaces Ray Data's bars.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
