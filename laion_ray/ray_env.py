"""Connect to Ray (an existing cluster when one is named, else a local one) and
keep a crashed driver's Ray Data reservation from starving its rerun."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

log = logging.getLogger(__name__)
# Held while this process connects to Ray (possibly in a background thread).
_CONNECTING = threading.Lock()


def ray_attached(address: str | None = None) -> bool:
    """Whether work here goes to a Ray that is named or already running.

    Never imports Ray (half a second): a process that has not imported it has
    not started it.
    """
    return bool(address or os.environ.get("RAY_ADDRESS") or initialized_ray())


def initialized_ray():
    """The ``ray`` module if this process has initialised Ray, else None.

    Never imports it; another thread may be importing it (the driver attaches
    in the background), so a partly imported module counts as not initialised.
    """
    ray = sys.modules.get("ray")
    return ray if getattr(ray, "is_initialized", lambda: False)() else None


def release_ray() -> None:
    """Disconnect this process from Ray now, if it connected (a private Ray stops).

    For commands about to exit: Ray's own exit hook would sleep 0.5 s first,
    for driver logs this tool does not print, and took ~1 s in all here. A
    connection still being made (a job that found nothing to do) is left to
    the exiting process.
    """
    if not _CONNECTING.acquire(blocking=False):
        return
    try:
        if (ray := initialized_ray()) is not None:
            ray.shutdown()
    finally:
        _CONNECTING.release()


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Initialise Ray once per process.

    ``address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets) attaches to
    a running cluster; without either a private local Ray is started, so a
    laptop run never attaches to a stray ``ray start`` by accident.
    """
    with _CONNECTING:
        import ray

        if ray.is_initialized():
            return
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            log.info("attaching to Ray at %s", address)
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(
                address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False
            )
        if "ray.data" in sys.modules:
            ray_data()


def ray_data():
    """Ray Data, imported where a job uses it (the import takes half a second,
    which jobs of function stages never pay), and set quiet: laion-ray's own
    progress replaces its bars and execution banners."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray.data


def reclaim_expired_reservations() -> None:
    """Make Ray Data's coordinator drop expired reservations soon (in the background).

    A SIGKILLed driver's reservation expires (see ``laion_ray/__init__``) but
    the coordinator purges expired ones only on its 20 s tick, so a rerun that
    starts right after a crash would run on a sliver of the cluster for up to
    half a minute. Asking for a recomputed view purges them; this asks every
    2 s until any reservation alive at the crash must have expired. Ray-internal
    API: best effort, a failure only means the tick does it later.
    """
    expiry = float(os.environ.get("RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S", "10"))

    def poll() -> None:
        try:
            import ray
            from ray.data._internal.cluster_autoscaler import (
                get_or_create_autoscaling_coordinator,
            )

            coordinator = get_or_create_autoscaling_coordinator()
            deadline = time.monotonic() + expiry + 2
            while time.monotonic() < deadline:
                time.sleep(2)
                ray.get(coordinator.get_reserved_resources.remote("laion-ray", recompute=True))
        except Exception as exc:  # best effort by design
            log.debug("could not poll Ray Data's autoscaling coordinator: %s", exc)

    threading.Thread(target=poll, name="laion-ray-reservations", daemon=True).start()
