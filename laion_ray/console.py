"""Quiet by default: laion-ray's own account on the terminal, everything else in a log.

Ray and Lance speak on the process's stderr from Python (warnings, loggers)
and from native code (Lance's Rust log, Ray's C++ core worker), much of it
before laion-ray could configure anything. So a quiet command points file
descriptor 2 and ``sys.stderr`` at a log file for its whole run, and writes
its own lines to a copy of the terminal's stream. ``-v`` skips all of this.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import TextIO

OWN_LOGGER = "laion_ray"
_terminal: TextIO | None = None


def terminal() -> TextIO:
    """Where laion-ray's own lines go: the real stderr, also while quiet."""
    return _terminal or sys.stderr


@contextlib.contextmanager
def quiet(command: str) -> Iterator[str]:
    """Divert third-party output to a log file for the duration; yields its path.

    The caller decides whether the log is worth keeping (a failure points at it).
    """
    global _terminal
    fd, log_path = tempfile.mkstemp(prefix=f"laion-ray-{command}-", suffix=".log")
    log_file = os.fdopen(fd, "w", buffering=1)
    # A terminal stream that survives the redirection: a duplicate of fd 2 when
    # sys.stderr is the process's stderr, else whatever stream stands in for it
    # (a test runner's capture).
    previous_stderr = sys.stderr
    try:
        real = previous_stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        real = False
    saved_fd = os.dup(2)
    own = os.fdopen(os.dup(2), "w", buffering=1) if real else previous_stderr
    own_logger = logging.getLogger(OWN_LOGGER)
    handler = logging.StreamHandler(own)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root_handler = logging.StreamHandler(log_file)
    root_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    saved_levels = (own_logger.level, own_logger.propagate, root.level)
    os.dup2(log_file.fileno(), 2)
    sys.stderr, _terminal = log_file, own
    own_logger.addHandler(handler)
    own_logger.setLevel(logging.INFO)
    own_logger.propagate = False
    root.addHandler(root_handler)
    root.setLevel(logging.WARNING)
    try:
        yield log_path
    finally:
        own_logger.removeHandler(handler)
        root.removeHandler(root_handler)
        own_logger.level, own_logger.propagate, root.level = saved_levels
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        sys.stderr, _terminal = previous_stderr, None
        if own is not previous_stderr:
            own.close()
        log_file.close()
