"""Samplers that poll processes in a thread while a ``with`` block runs.

Both count only this process's descendants, so other people's Ray clusters on
the same machine are left out, and both poll because Ray workers exit (and
take their counters with them) when a job ends.
"""

from __future__ import annotations

import os
import threading
import time

try:
    import psutil
except ImportError:  # Ray vendors psutil in ray/thirdparty_files; importing ray adds it
    import importlib

    importlib.import_module("ray")
    psutil = importlib.import_module("psutil")

GONE = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)


class Poller:
    """Calls ``_sample`` every ``every_s`` seconds in a thread, and once more on exit."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def ray_workers(marker: str = "ray::"):
    """This process's descendants whose command line contains ``marker``."""
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if marker in " ".join(proc.cmdline()):
                yield proc
        except GONE:
            continue


class WorkerRSS(Poller):
    """Peak RSS of this driver's own Ray workers: one worker, and all at once."""

    def __init__(self, every_s: float = 0.1):
        super().__init__(every_s)
        self.peak_single = 0
        self.peak_total = 0

    def _sample(self) -> None:
        total = 0
        for proc in ray_workers():
            try:
                rss = proc.memory_info().rss
            except GONE:
                continue
            total += rss
            self.peak_single = max(self.peak_single, rss)
        self.peak_total = max(self.peak_total, total)


class CpuShare(Poller):
    """Cores kept busy over the block by the model actors, and by everything
    else on the machine (its busy time less theirs): what two actors can
    reach on a shared machine."""

    ACTOR = "MapWorker(MapBatches(ActorStage))"

    def __init__(self, every_s: float = 1.0):
        super().__init__(every_s)
        self.actor_cpu: dict[int, float] = {}  # pid -> CPU seconds, last seen

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)

    def _sample(self) -> None:
        for proc in ray_workers(self.ACTOR):
            try:
                times = proc.cpu_times()
            except GONE:
                continue
            self.actor_cpu[proc.pid] = times.user + times.system

    def __enter__(self) -> CpuShare:
        self._sample()
        self.before = dict(self.actor_cpu)  # the actors alive now are not this block's
        self.started, self.busy = time.monotonic(), self._busy()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        wall = time.monotonic() - self.started
        actors = sum(c - self.before.get(p, 0.0) for p, c in self.actor_cpu.items())
        self.actor_cores = actors / wall
        self.other_cores = (self._busy() - self.busy - actors) / wall
