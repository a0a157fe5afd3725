"""Named steps at which a test can make the driver die: one list, one switch.

Crash safety is proven by killing the driver at every step where it can die
and checking that the same command then finishes with the same result
(``tests/test_crash_points.py``). Each step the driver takes between durable
states calls :func:`failpoint` with its name; every name is in
:data:`POINTS`, in the order a job passes them.

``LAION_RAY_FAILPOINTS`` switches points on, comma-separated::

    LAION_RAY_FAILPOINTS="writeback.after_record_errors=kill"
    LAION_RAY_FAILPOINTS="writeback.after_replace_files=kill@2,stream.after_records=error"

``kill`` sends the driver SIGKILL (no cleanup, no ``finally``, like a
preempted node); ``error`` raises :class:`~laion_ray.errors.StorageError`, as a
store that refuses a request would. ``@N`` acts on the Nth pass through the
point (default the first). The variable is read once, at import: with it
unset, a point costs one truth test.
"""

from __future__ import annotations

import os
import signal

from laion_ray.errors import LaionRayError, StorageError

ENV = "LAION_RAY_FAILPOINTS"

POINTS: dict[str, str] = {
    "plan.after_manifest": "the plan (job.json) is written; nothing computed",
    "stream.after_records": "a batch of part records reached the driver",
    "writeback.after_add_columns": "new columns exist as all-null fields",
    "writeback.after_write_intent": "the commit's intent (file names) is in the checkpoint",
    "writeback.after_assemble": "the fragments' column files are written, not committed",
    "writeback.after_save_errors": "the commit's failed rows are in the checkpoint",
    "writeback.after_replace_files": "the column files are committed to the dataset",
    "writeback.after_record_errors": "the failed rows are in errors.lance",
    "writeback.after_mark_committed": "the fragments' committed/ summaries are written",
    "writeback.after_drop_parts": "the fragments' parts are deleted",
    "writeback.after_close_intent": "the intent is deleted: the commit is complete",
    "job.after_tag": "the job's tag points at its version",
}
ACTIONS = ("kill", "error")


def _parse(spec: str) -> dict[str, tuple[str, int]]:
    armed: dict[str, tuple[str, int]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, action = item.partition("=")
        action, _, nth = action.partition("@")
        if name not in POINTS or action not in ACTIONS or (nth and not nth.isdigit()):
            raise LaionRayError(
                f"{ENV}: bad entry {item!r}; expected NAME=kill|error[@N], NAME one of "
                f"{', '.join(POINTS)}"
            )
        armed[name] = (action, int(nth or 1))
    return armed


_armed = _parse(os.environ.get(ENV, ""))
_passes: dict[str, int] = {}


def failpoint(name: str) -> None:
    """Die here (or fail here) if the test switched this point on."""
    if not _armed:
        return
    if name not in POINTS:
        raise AssertionError(f"unlisted failpoint {name!r}")
    if name not in _armed:
        return
    _passes[name] = _passes.get(name, 0) + 1
    action, nth = _armed[name]
    if _passes[name] != nth:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise StorageError(f"failpoint {name}: injected storage failure")


def arm(spec: str) -> None:
    """Switch points on in this process (tests that run the driver in-process)."""
    global _armed
    _armed = _parse(spec)
    _passes.clear()
