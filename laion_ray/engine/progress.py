"""Progress: a live bar on a terminal, periodic log lines elsewhere (ray job logs)."""

from __future__ import annotations

import logging
import time

from laion_ray.console import terminal

log = logging.getLogger("laion_ray")

LOG_EVERY_S = 15.0


class Progress:
    """Counts rows, errors and units; shows rows/s and an ETA."""

    def __init__(self, job: str, total_rows: int, total_units: int, done_units: int = 0):
        self.job, self.total_rows, self.total_units = job, total_rows, total_units
        self.rows = self.errors = 0
        self.units = done_units
        self.started = time.monotonic()
        self._last_log = self.started
        self._bar = None
        stream = terminal()
        if stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_rows, desc=job, unit="row", dynamic_ncols=True, file=stream
            )

    def update(self, rows: int, errors: int, units: int) -> None:
        self.rows += rows
        self.errors += errors
        self.units += units
        if self._bar is not None:
            self._bar.update(rows)
            self._bar.set_postfix(units=f"{self.units}/{self.total_units}", errors=self.errors)
        elif time.monotonic() - self._last_log >= LOG_EVERY_S:
            self._last_log = time.monotonic()
            log.info("%s", self.line())

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.elapsed if self.elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rows_per_s
        left = max(self.total_rows - self.rows, 0)
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        return (
            f"{self.job}: {self.rows}/{self.total_rows} rows, units {self.units}/{self.total_units}, "
            f"{self.errors} errors, {rate:,.0f} rows/s, ETA {eta}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
