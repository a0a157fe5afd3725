"""The error classes a user sees, and what each means for a job.

- :class:`LaionRayError`: bad user input; the CLI prints one line, exit code 2.
- :class:`RowError`: raised by a UDF for one bad row (a corrupt image): the row
  gets null outputs and an error record, and the job goes on.
- :class:`SystemicError`: a stage failed in a way that is not about one row (a
  missing module, out of memory, a UDF bug): the job stops, nothing is
  recorded against rows, and the CLI prints one line, exit code 1.
- :class:`JobFailed`: the job could not finish for a reason outside its input:
  the store kept failing, another writer or driver got in the way. Exit code
  1; finished work stays checkpointed and the same command resumes it.
"""


class LaionRayError(Exception):
    """A problem with the user's input: a bad path, column, argument or data.

    The message must name the bad value; the CLI prints it without a traceback.
    """


class RowError(Exception):
    """A row whose data a UDF cannot process: null outputs plus an error record.

    Raise it (or a subclass) from a UDF that declares ``row_errors=(RowError,)``
    to mark one row as bad; every other exception then stops the job.
    """


class SystemicError(Exception):
    """A stage failed for every row or for a reason no row explains; the job stops.

    The message names the stage and the root cause. The failed work is not
    checkpointed, so rerunning the same command after the fix recomputes it.
    """


class JobFailed(Exception):
    """The store, a concurrent writer or another driver stopped the job: not bad input.

    The message names the cause. Finished work stays checkpointed, so the same
    command resumes once the cause is gone.
    """


class StorageError(JobFailed):
    """A storage request kept failing after its retries (or failed for good)."""


def brief(exc: BaseException) -> str:
    """First line of an exception, without the Rust source location Lance appends."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split(", /")[0].split(", rust/")[0]
