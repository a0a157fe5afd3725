"""How the driver judges failed rows: the canary across blocks, the error gate,
the evidence it shows, and the root cause of a stream that failed in Ray.

Workers tell bad rows from broken code per block (:mod:`.stages`). The driver
sees every block's counts, so it also catches what no single block can: many
small blocks whose every row failed alike (the canary), and an error fraction
above ``--max-error-fraction`` (the gate).
"""

from __future__ import annotations

import re
import sys

import pyarrow as pa
import pyarrow.compute as pc

from laion_ray.errors import JobFailed, LaionRayError, SystemicError

from . import checkpoint as ckpt
from .error_log import describe_errors, read_part_errors
from .plan import UnitPlan
from .stages import CANARY_ROWS, WHAT_TO_DO

MIN_ROWS_FOR_ERROR_GATE = 1000
# Failed rows read back from checkpoint parts to show what the gate saw; the
# driver remembers at most this many parts with errors, so it stays O(1).
EVIDENCE_PARTS = 256
EVIDENCE_ROWS = 10_000


class ErrorGate:
    """The driver's judgement of the failed rows of one run.

    The canary settles once ``CANARY_ROWS`` rows are in: if every one failed
    with one error type, the stage is broken (:class:`SystemicError`);
    otherwise the run is *vouched* in the checkpoint (``runs/<run>``), which
    lets a later run reuse this run's parts whose every row failed (they are
    bad data). A run that stops systemically is un-vouched, so those parts
    are recomputed after the fix. Until the canary settles, fragments holding
    failed rows are not committed: their rows would become known-bad.

    Args:
        uri: The dataset (named in the gate's message).
        checkpoint: The job's checkpoint (evidence parts, vouching).
        plan: The job's units (to name a record's part).
        run_id: This run.
        storage_options: Object-store options.
        max_errors: ``--max-error-fraction``.
        retry_errors: Rows that failed before are retried: they may fail
            alike again, as bad data, so the canary is off and the run is
            vouched from the start.
        evidence: Parts with failed rows found on resume.
    """

    def __init__(
        self,
        uri: str,
        checkpoint: ckpt.JobCheckpoint,
        plan: UnitPlan,
        run_id: str,
        storage_options,
        *,
        max_errors: float,
        retry_errors: bool,
        evidence: list[str],
    ):
        self.uri, self.checkpoint, self.plan, self.run_id = uri, checkpoint, plan, run_id
        self.storage_options = storage_options
        self.max_errors = max_errors
        self.retry_errors = retry_errors
        self.evidence_parts = evidence[:EVIDENCE_PARTS]
        self.settled = False
        if retry_errors:
            self._vouch()

    def note(self, records: pa.Table) -> None:
        """Keep (a bounded number of) parts with failed rows as evidence."""
        room = EVIDENCE_PARTS - len(self.evidence_parts)
        if room <= 0:
            return
        for rec in records.filter(pc.greater(records["errors"], 0)).slice(0, room).to_pylist():
            fragment_id = self.plan.states[self.plan.fragment_of(rec["unit"])].fragment_id
            self.evidence_parts.append(self.checkpoint.part_path(fragment_id, rec))

    def may_commit(self, errors: int) -> bool:
        """Whether fragments may be committed before the end of the stream."""
        return self.settled or errors == 0

    def check(self, rows: int, errors: int, *, final: bool) -> None:
        """The canary (once), then the error fraction; raises to stop the job."""
        self._canary(rows, errors)
        if rows and (final or rows >= MIN_ROWS_FOR_ERROR_GATE) and errors / rows > self.max_errors:
            evidence = describe_errors(self._evidence(), failed=errors)
            raise LaionRayError(
                f"{errors} of {rows} rows failed ({errors / rows:.1%}), above "
                f"--max-error-fraction {self.max_errors}; nothing more was committed; "
                f"{evidence}. `laion-ray errors {self.uri}` lists them. "
                "Finished work is checkpointed: fix the input or raise the limit and rerun"
            )

    def stopped_systemically(self) -> None:
        """The run failed for a reason no row explains: its all-failed parts
        must not be reused (see the class docstring)."""
        self.checkpoint.revoke(self.run_id)

    def _vouch(self) -> None:
        self.settled = True
        self.checkpoint.vouch(self.run_id)

    def _canary(self, rows: int, errors: int) -> None:
        if self.settled or rows < CANARY_ROWS:
            return
        if errors == rows:
            evidence = self._evidence()
            kinds = set(evidence["error_type"].to_pylist())
            if len(kinds) == 1:
                first = evidence.slice(0, 1).to_pylist()[0]
                raise SystemicError(
                    f"{first['udf']}: every row failed with {first['error_type']}: "
                    f"{first['message'][:200]} — this looks like an environment or UDF problem, "
                    f"not bad data; {WHAT_TO_DO}"
                )
        self._vouch()

    def _evidence(self) -> pa.Table:
        return read_part_errors(self.evidence_parts, self.storage_options, limit=EVIDENCE_ROWS)


def trusted_parts(
    parts: list[tuple[str, dict]], vouched: set[str]
) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """Split a fragment's parts into those a resumed run may reuse and those it
    must recompute: parts whose every row failed, in a run never vouched."""
    keep, drop = [], []
    for path, rec in parts:
        untrusted = rec["errors"] == rec["rows"] and rec["run"] not in vouched
        (drop if untrusted else keep).append((path, rec))
    return keep, drop


# --- the root cause of a failed stream -------------------------------------------


def _is_ray_wrapper(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] == "ray"


_OWN_ERRORS = (SystemicError, LaionRayError, JobFailed)
# "laion_ray.errors.SystemicError: <message>" in a remote traceback's text.
_REMOTE_ERROR = re.compile(r"^(laion_ray(?:\.\w+)*)\.(\w+): (.+)$", re.MULTILINE)


def _from_text(text: str) -> BaseException | None:
    """Our own error, rebuilt from a Ray error that kept only its text (an
    actor that failed in ``__init__`` surfaces as ``ActorDiedError``)."""
    for module, name, message in _REMOTE_ERROR.findall(text):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, _OWN_ERRORS):
            return cls(message)
    return None


def root_failure(exc: BaseException, job: str) -> BaseException:
    """The exception to report for a failed stream, without Ray's wrappers.

    A stage's own ``SystemicError``, ``LaionRayError`` or ``JobFailed`` (raised
    in a worker, wrapped in ``RayTaskError``) is raised with its original
    message, without the retry notes Ray Data appends. Any other failure from
    Ray (a worker that kept dying) becomes a ``SystemicError`` naming the job
    and the innermost cause. Exceptions that did not come through Ray are
    returned as they are.
    """
    chain, seen, current = [], set(), exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    for cause in chain:
        if isinstance(cause, _OWN_ERRORS) and not _is_ray_wrapper(cause):
            first_line = (str(cause).splitlines() or [""])[0]
            return cause if cause is exc else type(cause)(first_line)
    if not any(_is_ray_wrapper(c) for c in chain):
        return exc
    for cause in chain:
        if (own_error := _from_text(str(cause))) is not None:
            return own_error
    own = [c for c in chain if not _is_ray_wrapper(c)]
    root = own[-1] if own else next((c for c in chain if str(c).strip()), chain[0])
    text = str(root).strip().splitlines()
    return SystemicError(
        f"{job}: {type(root).__name__}: {text[0] if text else ''} — failed after Ray's "
        f"retries; {WHAT_TO_DO}"
    )
