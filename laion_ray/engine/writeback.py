"""The write-back: finished fragments reach the dataset as a sequence of named steps.

One commit takes a batch of fragments whose units are all finished:

1. ``check_accounting``: every selected row of each fragment is in a finished
   unit (rows computed + known-bad rows skipped = rows the job selects).
   Reads only. Redo: run it again.
2. ``add_columns``: new output columns become all-null fields (a metadata-only
   ``Project``), the first time. Redo: adds only columns still missing.
3. ``write_intent``: ``commits/<commit>.json`` in the checkpoint names the
   column file each fragment will get, and the newest version seen, before
   anything is written. Redo: see below.
4. ``assemble``: one column file per fragment from its parts (Ray tasks or
   threads), under the names of step 3; a fragment whose units a single task
   computed whole already has its file (written once, see
   :func:`.assemble.write_fragment`) and *adopts* it, named in the intent as
   adopted. Redo: files of an intent whose commit never landed are deleted
   (adopted ones stay with the parts that record them), and assembly starts over.
5. ``save_errors``: the batch's failed rows (if any) go to
   ``commits/<commit>.errors.arrow``, so that step 7 can be redone without
   the assembly that found them.
6. ``replace_files``: one ``DataReplacement`` commit, re-derived at the newest
   version (see :mod:`.commit`), after the lease's fence, carrying the commit
   id in its transaction properties. Redo: decided by whether it landed.
7. ``record_errors``: the failed rows are appended to ``errors.lance``, each
   naming this commit. Redo: skipped when rows of this commit are there.
8. ``mark_committed``: ``committed/<fragment>_<rows>_<errors>`` summaries.
   Redo: writing an empty file again is harmless.
9. ``drop_parts``: the fragments' parts are deleted, and before them the
   column files written once that the commit did not use (another writer's
   values made us assemble anew). Redo: deleting again; a file is never
   deleted while the newest version references it.
10. ``close_intent``: the intent is deleted; the commit is complete.

A fragment with no rows to write skips steps 2-7. Every step is idempotent,
and what decides its redo is durable: a rerun after a crash anywhere finds the
intents left in ``commits/`` (:meth:`WriteBack.recover`) and asks the dataset
whether each commit landed (:func:`.commit.landed`: its files are referenced,
or a transaction carries its id). If it did, steps 7-10 are redone from the
saved errors and the parts' counts; if not, its files are deleted and the
fragments are committed again by the resumed run. Nothing is decided from the
killed driver's memory.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from laion_ray.errors import JobFailed
from laion_ray.storage import LANCE_SCANS, PinnedVersion, open_dataset

from . import checkpoint as ckpt
from .assemble import AssembledFragment, MissingPart, assemble_fragment
from .commit import (
    add_columns,
    check_unchanged,
    data_file_exists,
    delete_data_file,
    landed,
    replace_column_files,
)
from .error_log import ERROR_SCHEMA, KnownBad, part_errors, record_errors, recorded
from .failpoints import failpoint
from .phases import PhaseClock
from .plan import KEY, FragmentState, UnitPlan, WorkUnit

log = logging.getLogger(__name__)


class AccountingError(JobFailed):
    """The rows a job computed for a fragment are not the rows it selects."""


def new_file_name() -> str:
    return f"{uuid.uuid4().hex}.lance"


class WriteBack:
    """The write-back of one run of a planned job (see the module docstring).

    Args:
        job: The :class:`~.run.Job`.
        manifest: Its plan (``job.json``).
        checkpoint: Its checkpoint.
        plan: The work units of the plan.
        ledger: Finished units, with rows and errors per fragment.
        run_tasks: Runs a function over argument tuples where the executor
            runs work (Ray tasks, or threads), returning each result or the
            exception it raised.
        fence: Called right before every commit; raises if this driver lost
            its lease, else returns the lease's token for the commit's
            properties (:meth:`.lease.JobLease.fence`).
        identity: ``dataset``, ``scope`` (whose errors it reads), ``job``
            (fingerprint), ``plan`` and ``run`` ids.
        root: The checkpoint root (the errors table lives there).
        retry_errors: Whether this run retries rows that failed before.
        storage_options: Object-store options.
        clock: Where the time goes (assembly is a phase of its own).
    """

    def __init__(
        self,
        job,
        manifest: Mapping[str, Any],
        checkpoint: ckpt.JobCheckpoint,
        plan: UnitPlan,
        ledger: ckpt.UnitLedger,
        *,
        run_tasks: Callable[[Callable, list[tuple]], list[Any]],
        fence: Callable[[], Mapping[str, str]],
        identity: Mapping[str, str | None],
        root: str,
        retry_errors: bool,
        storage_options: Mapping[str, str],
        clock: PhaseClock | None = None,
    ):
        self.job, self.manifest, self.checkpoint = job, manifest, checkpoint
        self.plan, self.ledger = plan, ledger
        self.run_tasks, self.fence = run_tasks, fence
        self.identity, self.root = dict(identity), root
        self.retry_errors = retry_errors
        self.storage_options = dict(storage_options)
        self.clock = clock or PhaseClock()
        self.states: dict[int, FragmentState] = {s.fragment_id: s for s in plan.states}
        self.pinned = PinnedVersion(**manifest["pinned"])
        self.columns_ready = False
        self._pinned_ds = None
        self._commits = 0
        self.committed_batches = 0  # commits that wrote column files (the report's count)

    # --- one commit ---------------------------------------------------------------
    def commit(
        self, fragments: Sequence[int], known_bad: Mapping[int, KnownBad], details: dict
    ) -> list[int]:
        """Steps 1-10 for ``fragments``; returns those that had rows to write."""
        self.check_accounting(fragments, known_bad)
        with_rows = [f for f in fragments if self.ledger.counts(f)[0]]
        commit_id = None
        if with_rows:
            details = {**details, "fragments": sorted(with_rows)}
            self.add_columns(details)
            failpoint("writeback.after_add_columns")
            commit_id = f"{self.identity['run']}-{self._commits}"
            self._commits += 1
            latest = open_dataset(self.job.uri, storage_options=self.storage_options)
            for f in with_rows:  # fail fast, before any work, if a fragment was rewritten
                check_unchanged(latest, f, self.states[f].physical_rows)
            with self.clock.phase("assembly"):
                written = self.written_once(with_rows)
            intent = {
                "base_version": latest.version,
                "files": {str(f): [new_file_name()] for f in with_rows if f not in written},
                "adopted": {str(f): a.file_name for f, a in written.items()},
            }
            self.checkpoint.write_intent(commit_id, intent)
            failpoint("writeback.after_write_intent")
            with self.clock.phase("assembly"):
                todo = [f for f in with_rows if f not in written]
                assembled = {**written, **self.assemble(todo, intent, PinnedVersion.of(latest))}
            failpoint("writeback.after_assemble")
            errors = pa.concat_tables(
                [ERROR_SCHEMA.empty_table(), *(a.errors for a in assembled.values())]
            )
            if errors.num_rows:
                self.checkpoint.save_errors(commit_id, errors)
            failpoint("writeback.after_save_errors")
            self.replace_files(commit_id, intent, assembled, details)
            failpoint("writeback.after_replace_files")
            self.record_errors(commit_id, errors, with_rows)
            failpoint("writeback.after_record_errors")
            self.committed_batches += 1
        self.checkpoint.mark_committed({f: self.ledger.counts(f) for f in fragments})
        failpoint("writeback.after_mark_committed")
        self.drop_parts(fragments)
        failpoint("writeback.after_drop_parts")
        if commit_id is not None:
            self.checkpoint.close_intent(commit_id)
            failpoint("writeback.after_close_intent")
        return with_rows

    def check_accounting(self, fragments: Sequence[int], known_bad: Mapping[int, KnownBad]):
        """Fail, naming the fragment, unless its finished units hold every selected row.

        Rows written (the finished units' counts) must equal the rows the filter
        selects at the pinned version, less the known-bad keys the reads skip.
        A unit that silently produced nothing never reaches a commit. Costs one
        count per fragment at commit time (a scan of the filter's columns).
        """
        ds = self.pinned_dataset()
        where = self.manifest["filter"]
        for f in fragments:
            written = self.ledger.counts(f)[0]
            fragment = ds.get_fragment(f)
            bad = known_bad.get(f)
            skip = bad.keys if bad is not None and KEY in self.job.read_columns else ()
            with LANCE_SCANS.alone():  # see storage.ScanGate
                if len(skip):
                    keys = fragment.to_table(columns=[KEY], filter=where)[KEY]
                    hit = pc.sum(pc.is_in(keys, pa.array(skip, keys.type))).as_py()
                    selected = len(keys) - hit
                else:
                    selected = fragment.count_rows(where)
            if written != selected:
                raise AccountingError(
                    f"fragment {f}: {written} rows were computed, but the job selects "
                    f"{selected} (known-bad rows skipped excluded); nothing of fragment {f} "
                    "was committed. Rerun the same command: units without records are "
                    "recomputed"
                )

    def pinned_dataset(self):
        """The driver's own open of the pinned version (for counts).

        Not the one the local executor's reader threads share: a count on that
        object while its scans run in other threads hung inside Lance (pylance
        14.0.2, about one run in 45 on a loaded 2-core machine; none in 220
        with its own).
        """
        if self._pinned_ds is None:
            self._pinned_ds = open_dataset(
                self.job.uri, version=self.pinned.version, storage_options=self.storage_options
            )
        return self._pinned_ds

    def add_columns(self, details: dict) -> None:
        if self.columns_ready:
            return
        new = [f for f in self.job.outputs if f.name in self.manifest["new_fields"]]
        if new:
            add_columns(
                self.job.uri,
                new,
                job=self.job.name,
                details=details,
                storage_options=self.storage_options,
                before_commit=self.fence,
            )
        self.columns_ready = True

    def assemble(
        self, fragments: Sequence[int], intent: dict, pinned: PinnedVersion
    ) -> dict[int, AssembledFragment]:
        """Column files for ``fragments``, named by ``intent``'s last name for each."""
        args = [
            (
                self.checkpoint,
                self.plan.unit_rows,
                int(self.plan.first_unit[self.plan.position[f]]),
                self.job.uri,
                f,
                self.states[f].physical_rows,
                self.job.outputs,
                self.storage_options,
                pinned,
                self.ledger.counts(f)[0],
                intent["files"][str(f)][-1],
            )
            for f in fragments
        ]
        outcomes = self.run_tasks(assemble_task, args)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            for a in outcomes:  # nothing references them: no orphans
                if isinstance(a, AssembledFragment):
                    delete_data_file(self.job.uri, a.file_name, self.storage_options)
            raise failures[0]
        return {a.fragment_id: a for a in outcomes}

    def written_once(self, fragments: Sequence[int]) -> dict[int, AssembledFragment]:
        """Fragments whose column file a task wrote whole, adopted as they are.

        A fragment qualifies when each of its finished units is one
        column-file part, all of one run: that run's file holds every value.
        The failed rows come from the parts (which store only those), and what
        the file's unchanged values were based on from any one part.
        """

        def adopt(fragment_id: int) -> AssembledFragment | None:
            units = ckpt.finished_units(self.checkpoint.fragment_parts(fragment_id))
            paths = [p for u in units.values() for p in u.paths]
            records = [ckpt.parse_part_name(p.rsplit("/", 1)[-1]) for p in paths]
            if (
                not records
                # A part lost since its write: the assembly names what is missing.
                or sum(u.rows for u in units.values()) != self.ledger.counts(fragment_id)[0]
                or len(paths) != len(units)
                or not all(rec["column_file"] for rec in records)
                or len({rec["run"] for rec in records}) != 1
            ):
                return None
            opts = self.storage_options
            stored = [
                ckpt.read_part(p, opts)
                for p, rec in zip(paths, records, strict=True)
                if rec["errors"]
            ]
            spec = ckpt.column_file_of(stored[0] if stored else ckpt.read_part(paths[0], opts))
            errors = pa.concat_tables([ERROR_SCHEMA.empty_table(), *map(part_errors, stored)])
            return AssembledFragment(fragment_id, spec.file, errors.combine_chunks(), spec.based_on)

        with ThreadPoolExecutor(8) as pool:
            adopted = dict(zip(fragments, pool.map(adopt, fragments), strict=True))
        return {f: a for f, a in adopted.items() if a is not None}

    def replace_files(
        self,
        commit_id: str,
        intent: dict,
        assembled: dict[int, AssembledFragment],
        details: dict,
    ) -> None:
        def reassemble(fragments: Sequence[int]) -> dict:
            # Another writer committed these columns meanwhile: rebuild the files
            # from our parts on top of its values, under names recorded first.
            for f in fragments:
                intent["files"].setdefault(str(f), []).append(new_file_name())
            self.checkpoint.write_intent(commit_id, intent)
            latest = open_dataset(self.job.uri, storage_options=self.storage_options)
            fresh = self.assemble(fragments, intent, PinnedVersion.of(latest))
            assembled.update(fresh)
            return {f: a.column_file for f, a in fresh.items()}

        replace_column_files(
            self.job.uri,
            {f: a.column_file for f, a in assembled.items()},
            self.states,
            job=self.job.name,
            details=details,
            storage_options=self.storage_options,
            reassemble=reassemble,
            commit_id=commit_id,
            before_commit=self.fence,
        )

    def record_errors(self, commit_id: str, errors: pa.Table, fragments: Sequence[int]) -> None:
        record_errors(
            self.root,
            errors,
            dataset=self.identity["dataset"],
            scope=self.identity["scope"],
            job=self.identity["job"],
            plan=self.identity["plan"],
            commit=commit_id,
            replace_fragments=fragments if self.retry_errors else (),
            udfs=self.job.producers,
            storage_options=self.storage_options,
        )

    # --- after a crash ------------------------------------------------------------
    def recover(self, *, mark: bool = True) -> list[int]:
        """Settle every commit a killed driver left in flight; returns the
        fragments whose commit had landed.

        ``mark=False`` for a checkpoint about to be discarded (stale): a landed
        commit's failed rows are still recorded, but no summary is written.
        """
        done: list[int] = []
        for commit_id, intent in self.checkpoint.intents():
            names = {f: list(n) for f, n in intent["files"].items()}
            for f, name in intent.get("adopted", {}).items():
                names.setdefault(f, []).append(name)
            fragments = sorted(int(f) for f in names)
            if landed(self.job.uri, commit_id, intent["base_version"], names, self.storage_options):
                log.info("commit %s had landed; completing it", commit_id)
                # The commit comes after save_errors, so no file means no failed rows.
                errors = self.checkpoint.load_errors(commit_id)
                if errors is not None and not recorded(self.root, commit_id, self.storage_options):
                    self.record_errors(commit_id, errors, fragments)
                if mark:
                    self.checkpoint.mark_committed({f: self.ledger.counts(f) for f in fragments})
                    self.drop_parts(fragments)
                done += fragments
            else:
                log.info("commit %s had not landed; its fragments are committed again", commit_id)
                # Adopted files stay: the parts that record them are still the record.
                for assembled in intent["files"].values():
                    for name in assembled:
                        delete_data_file(self.job.uri, name, self.storage_options)
            self.checkpoint.close_intent(commit_id)
        return done

    def discard(self) -> None:
        """Before a stale checkpoint is removed: settle its commits in flight and
        delete the column files its parts recorded (none is committed)."""
        self.recover(mark=False)
        fragments = self.checkpoint.fragments_with_parts()
        self._delete_unused_files({f: self.checkpoint.fragment_parts(f) for f in fragments})

    # --- parts and the column files written once ------------------------------------
    def drop_parts(self, fragments: Sequence[int]) -> None:
        """Step 9: delete committed fragments' parts, and before them the column
        files those parts recorded that the newest version does not use."""
        self._delete_unused_files({f: self.checkpoint.fragment_parts(f) for f in fragments})
        self.checkpoint.drop_parts(fragments)

    def without_lost_files(
        self, fragment_id: int, parts: list[tuple[str, dict]]
    ) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
        """Split parts into records and column-file parts whose file never appeared
        (a task killed between its parts and its file)."""
        names = {_file_of(rec, fragment_id) for _, rec in parts if rec["column_file"]}
        missing = {n for n in names if not data_file_exists(self.job.uri, n, self.storage_options)}
        lost = [(p, rec) for p, rec in parts if _file_of(rec, fragment_id) in missing]
        return [(p, rec) for p, rec in parts if (p, rec) not in lost], lost

    def delete_parts(
        self, fragment_id: int, drop: list[tuple[str, dict]], keep: list[tuple[str, dict]]
    ) -> None:
        """Delete some parts of an uncommitted fragment: first the column files no
        kept part records, so that a file is never left without a part naming it."""
        kept = {_file_of(rec, fragment_id) for _, rec in keep}
        for name in {_file_of(rec, fragment_id) for _, rec in drop} - kept - {None}:
            delete_data_file(self.job.uri, name, self.storage_options)
        for path, _ in drop:
            self.checkpoint.delete_part(path)

    def _delete_unused_files(self, parts: Mapping[int, list[tuple[str, dict]]]) -> None:
        names = {
            (f, _file_of(rec, f)) for f, ps in parts.items() for _, rec in ps if rec["column_file"]
        }
        if not names:
            return
        latest = open_dataset(self.job.uri, storage_options=self.storage_options)
        for fragment_id, name in names:
            fragment = latest.get_fragment(fragment_id)
            used = fragment is not None and name in {f.path for f in fragment.metadata.files}
            if not used:
                delete_data_file(self.job.uri, name, self.storage_options)


def _file_of(rec: Mapping, fragment_id: int) -> str | None:
    """The column file a part records its values in (None: it holds them)."""
    return ckpt.column_file_name(rec["run"], fragment_id) if rec["column_file"] else None


def assemble_task(
    checkpoint: ckpt.JobCheckpoint,
    unit_rows: int,
    first_unit: int,
    uri: str,
    fragment_id: int,
    physical_rows: int,
    schema: pa.Schema,
    storage_options: Mapping[str, str] | None,
    pinned: PinnedVersion,
    rows_computed: int,
    file_name: str,
) -> AssembledFragment:
    """Assemble task: list the fragment's finished parts, then build its column file.

    The parts must hold the ``rows_computed`` rows the driver counted: a part
    lost since its write would otherwise leave its rows at their old values.
    """
    finished = ckpt.finished_units(checkpoint.fragment_parts(fragment_id))
    found = sum(u.rows for u in finished.values())
    if found != rows_computed:
        raise MissingPart(
            f"fragment {fragment_id}: its checkpoint holds parts for {found} of the "
            f"{rows_computed} rows this job computed, so a part is missing; nothing of "
            f"fragment {fragment_id} was committed. Rerun the same command: units without "
            "their parts are recomputed"
        )
    units = []
    for k, start in enumerate(range(0, physical_rows, unit_rows)):
        unit = WorkUnit(first_unit + k, fragment_id, start, min(start + unit_rows, physical_rows))
        units.append((unit, finished[unit.index].paths if unit.index in finished else []))
    return assemble_fragment(
        uri,
        fragment_id,
        units,
        physical_rows,
        schema,
        storage_options,
        pinned=pinned,
        file_name=file_name,
    )
