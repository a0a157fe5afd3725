"""Quiet runs: laion-ray's own lines reach the terminal; Python warnings, other
loggers and native writes to file descriptor 2 (as Lance's Rust log and Ray's
C++ core worker make) go to the log file; everything is restored afterwards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROBE = """
import logging, os, sys, warnings
from laion_ray import console

with console.quiet("probe") as log_path:
    logging.getLogger("laion_ray.engine").info("our progress line")
    logging.getLogger("ray.data").warning("ray data chatter")
    warnings.warn("lance is not fork-safe", UserWarning)
    os.write(2, b"[WARN lance_table] native chatter\\n")
    print("laion-ray: failed: x", file=console.terminal())
print(log_path)
assert console.terminal() is sys.stderr
os.write(2, b"native write after\\n")
"""

CHATTER = ("ray data chatter", "fork-safe", "native chatter")


def test_quiet_keeps_own_lines_and_diverts_the_rest():
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "our progress line" in proc.stderr
    assert "laion-ray: failed: x" in proc.stderr
    assert "native write after" in proc.stderr  # fd 2 restored
    for chatter in CHATTER:
        assert chatter not in proc.stderr
    log = Path(proc.stdout.strip())
    text = log.read_text()
    log.unlink()
    for chatter in CHATTER:
        assert chatter in text
