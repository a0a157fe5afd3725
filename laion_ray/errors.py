"""Errors that the CLI turns into a one-line message and exit code 2."""


class LaionRayError(Exception):
    """A problem with the user's input: a bad path, column, argument or data.

    The message must name the bad value; the CLI prints it without a traceback.
    """
