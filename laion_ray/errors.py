"""Errors that the CLI turns into a one-line message and exit code 2."""


class LaionRayError(Exception):
    """A problem with the user's input: a bad path, column, argument or data.

    The message must name the bad value; the CLI prints it without a traceback.
    """


def brief(exc: BaseException) -> str:
    """First line of an exception, without the Rust source location Lance appends."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(", /")[0].split(", rust/")[0]
