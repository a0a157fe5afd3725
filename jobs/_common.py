"""What every ``jobs/`` entry point shares: it is a ``laion-ray`` subcommand.

A job parses its flags with that subcommand's own parser, logs the parsed
configuration with secrets masked (it ends up in ``ray job logs``), makes the
one library call behind it and exits 0, 2 (bad input, one line) or 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

from laion_ray import cli
from laion_ray.ray_env import release_ray


def run_command(command: str, argv: Sequence[str] | None, *fixed: str) -> int:
    """Run ``laion-ray COMMAND *argv *fixed`` with its configuration logged."""
    args = list(sys.argv[1:] if argv is None else argv)
    return cli.run([command, *args, *fixed], log_config=True)


def finish(code: int) -> NoReturn:
    """Exit the job's driver with ``code``, Ray let go first (Ray's own exit
    hook waits for driver logs; see :func:`laion_ray.ray_env.release_ray`)."""
    release_ray()
    sys.exit(code)


def udf_params(udf: str, values: dict[str, object]) -> list[str]:
    """``--param UDF.KEY=VALUE`` flags for the typed values that were given (not None).

    Each value is written so that the UDF's declared type reads it back as it
    is (``format_param``): a label ``"123"`` stays the string ``"123"``, a
    threshold ``1.0`` the float ``1.0``, ``False`` the bool ``False``.
    """
    from laion_ray.udf import format_param

    return [
        f"--param={udf}.{key}={format_param(value)}"
        for key, value in values.items()
        if value is not None
    ]
