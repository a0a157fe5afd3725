"""Where a job's time goes: the driver's wall time split into phases, and the
seconds workers spent reading, computing and writing.

The driver's phases are exclusive: a phase entered inside another pauses it,
so they add up to the job's wall time. Worker seconds come back with the
parts' records (:data:`.plan.READ_S`); summed over workers, they can exceed
the wall time of a parallel job.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

# In the order a job passes them.
DRIVER_PHASES = (
    "import",  # the CLI's interpreter start and imports (CLI runs only)
    "plan",  # open, lease, plan or resume, known-bad rows, lanes
    "connect",  # waiting for Ray after planning (the connection overlaps planning)
    "pipeline_start",  # from starting the stream to its first records
    "stream",  # handling records: progress, the ledger, the error gate
    "driver_idle",  # waiting for the cluster's next records
    "assembly",  # column files from parts, and adopting files written once
    "commit",  # the other write-back steps: columns, intents, commits, errors, summaries
    "cleanup",  # tag, checkpoint removal, the report
)
WORKER_PHASES = ("read", "udf", "write")


class PhaseClock:
    """Exclusive wall-time phases of the driver, plus worker seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(DRIVER_PHASES, 0.0)
        self.worker: dict[str, float] = dict.fromkeys(WORKER_PHASES, 0.0)
        self._stack: list[str] = []
        self._since = time.monotonic()

    def _flip(self) -> None:
        now = time.monotonic()
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._since
        self._since = now

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the time inside the block to ``name`` (and not to the phase around it)."""
        if name not in self.seconds:
            raise ValueError(f"unknown phase {name!r}")
        self._flip()
        self._stack.append(name)
        try:
            yield
        finally:
            self._flip()
            self._stack.pop()

    def add(self, name: str, seconds: float) -> None:
        """Add driver seconds measured elsewhere (the CLI's import time)."""
        self.seconds[name] += seconds

    def add_worker(self, read: float, udf: float, write: float) -> None:
        self.worker["read"] += read
        self.worker["udf"] += udf
        self.worker["write"] += write

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {
            "driver_s": {k: round(v, 3) for k, v in self.seconds.items()},
            "worker_s": {k: round(v, 3) for k, v in self.worker.items()},
        }


def phases_line(phases: dict[str, dict[str, float]]) -> str:
    """``time: plan 0.12s · connect 0.40s · … | worker seconds: read 1.3 · udf 0.2 · write 0.4``."""
    driver = " · ".join(f"{k} {v:.2f}s" for k, v in phases["driver_s"].items() if v >= 0.005)
    worker = " · ".join(f"{k} {v:.2f}" for k, v in phases["worker_s"].items())
    return f"time: {driver} | worker seconds: {worker}"
